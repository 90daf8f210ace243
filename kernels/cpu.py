"""The fast CPU backend: ``solve(problem) -> Targets`` with the reference's results.

The work is done by one fused C kernel (``cpu_kernel.c``, built on first use by
``cpu_build``) that streams over anchors in chunks of 512, multi-threaded over
(image, chunk) work items with ``torch.get_num_threads()`` threads, in two passes:

1. every anchor's best IoU and box, its outputs as the thresholds, ignore and border
   rules decide them (labels, matched box, deltas, class: written once, straight into
   the result tensors), and every box's best IoU and anchor (what the low-quality rules
   need) as per-thread partial maxima, merged afterwards;
2. the low-quality rule: only chunks whose best IoU reaches some box's best IoU are
   revisited, only those boxes' IoUs recomputed, only the lifted anchors rewritten.

Memory is the outputs plus O(threads x (chunk + G) + A / chunk): no [G, A] matrix is
ever built.
A box that misses a chunk's bounding box is skipped (its IoU there is exactly 0), which
is what makes crowded images cheap. Labels and matched indices equal the reference
bit for bit: IoU is computed in float32 in torchvision's operation order, without
fused multiply-add, and thresholds are rounded to float32 as torch compares them.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .config import LOW_QUALITY_MODES
from .cpu_build import load_library
from .problem import Problem
from .targets import SparseTargets, Targets

__all__ = ["solve", "solve_sparse"]

_F32_4 = ctypes.c_float * 4


class _CProblem(ctypes.Structure):
    """Mirror of ``Problem`` in cpu_kernel.c (same fields, same order)."""

    _fields_ = [
        ("anchors", ctypes.c_void_p),
        ("gt_boxes", ctypes.c_void_p),
        ("gt_offsets", ctypes.c_void_p),
        ("gt_classes", ctypes.c_void_p),
        ("ignore_boxes", ctypes.c_void_p),
        ("ignore_offsets", ctypes.c_void_p),
        ("border_limits", ctypes.c_void_p),
        ("num_anchors", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("high", ctypes.c_float),
        ("low", ctypes.c_float),
        ("min_pos_iou", ctypes.c_float),
        ("ignore_iof_thr", ctypes.c_float),
        ("strict_high", ctypes.c_int32),
        ("low_quality", ctypes.c_int32),
        ("use_ignore", ctypes.c_int32),
        ("iof_wrt_anchor", ctypes.c_int32),
        ("border_post", ctypes.c_int32),
        ("weights", _F32_4),
        ("means", _F32_4),
        ("stds", _F32_4),
        ("background_class", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("labels", ctypes.c_void_p),
        ("matched", ctypes.c_void_p),
        ("deltas", ctypes.c_void_p),
        ("classes", ctypes.c_void_p),
        ("max_iou", ctypes.c_void_p),
        ("box_max", ctypes.c_void_p),
        ("box_best", ctypes.c_void_p),
    ]


@functools.lru_cache(maxsize=1)
def _kernel():
    function = load_library().tritarget_cpu_solve
    function.argtypes = [ctypes.POINTER(_CProblem)]
    function.restype = ctypes.c_int
    return function


@functools.lru_cache(maxsize=1)
def _sparse_kernels():
    library = load_library()
    count, gather = library.tritarget_cpu_count_sparse, library.tritarget_cpu_gather_sparse
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    count.argtypes = [pointer, size, size, pointer, pointer]
    gather.argtypes = [pointer, pointer, pointer, pointer, size, size, pointer, pointer, pointer, pointer, pointer]
    count.restype = gather.restype = None
    return count, gather


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _border_limits(problem: Problem) -> torch.Tensor | None:
    """Tensor[B, 4] float32 ``(-b, -b, w + b, h + b)``, rounded to float32 as torch rounds a
    Python scalar it compares a float32 tensor with; None when the rule is off."""
    border = problem.config.match.allowed_border
    if border < 0:
        return None
    sizes = problem.image_sizes.to(torch.float64)
    limits = torch.stack(
        [torch.full_like(sizes[:, 0], -border), torch.full_like(sizes[:, 0], -border),
         sizes[:, 1] + border, sizes[:, 0] + border], dim=1,
    )  # fmt: skip
    return limits.to(torch.float32).contiguous()


def solve(problem: Problem) -> Targets:
    """Dense targets of a checked batch (see ``tritarget.kernels.reference.solve``)."""
    if problem.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got tensors on {problem.device}")
    config = problem.config
    match, encode = config.match, config.encode
    batch, num_anchors = problem.batch_size, problem.num_anchors
    # The kernel reads raw row-major float32 / int64 / int32 memory; these are no-ops for
    # a Problem from build_problem, which already checked and converted everything.
    anchors = problem.anchors.to(torch.float32).contiguous()
    gt_boxes = problem.gt_boxes.to(torch.float32).contiguous()
    gt_offsets = problem.gt_offsets.to(torch.int64).contiguous()
    gt_classes = None if problem.gt_classes is None else problem.gt_classes.to(torch.int32).contiguous()
    ignore_boxes = problem.ignore_boxes.to(torch.float32).contiguous()
    ignore_offsets = problem.ignore_offsets.to(torch.int64).contiguous()
    border_limits = _border_limits(problem)

    labels = torch.empty(batch, num_anchors, dtype=torch.int8)
    matched = torch.empty(batch, num_anchors, dtype=torch.int32)
    deltas = torch.empty(batch, num_anchors, 4, dtype=torch.float32)
    classes = None if gt_classes is None else torch.empty(batch, num_anchors, dtype=torch.int32)
    max_iou = torch.empty(batch, num_anchors, dtype=torch.float32) if problem.want_max_iou else None
    box_max = torch.empty(gt_boxes.shape[0], dtype=torch.float32)  # scratch: each box's best IoU
    box_best = torch.empty(gt_boxes.shape[0], dtype=torch.int32)  # scratch: and the anchor reaching it

    # Thresholds become float32 exactly as torch rounds the scalar in `iou >= high`.
    as_f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    args = _CProblem(
        anchors=_pointer(anchors), gt_boxes=_pointer(gt_boxes), gt_offsets=_pointer(gt_offsets),
        gt_classes=_pointer(gt_classes), ignore_boxes=_pointer(ignore_boxes),
        ignore_offsets=_pointer(ignore_offsets), border_limits=_pointer(border_limits),
        num_anchors=num_anchors, batch=batch,
        high=as_f32(match.high), low=as_f32(match.low), min_pos_iou=as_f32(match.min_pos_iou),
        ignore_iof_thr=as_f32(match.ignore_iof_thr),
        strict_high=match.strict_high, low_quality=LOW_QUALITY_MODES.index(match.low_quality),
        use_ignore=match.ignore_iof_thr >= 0 and ignore_boxes.shape[0] > 0,
        iof_wrt_anchor=match.ignore_iof_wrt_anchor, border_post=match.border_order == "post_match",
        weights=_F32_4(*encode.weights), means=_F32_4(*encode.means), stds=_F32_4(*encode.stds),
        background_class=config.background_class, num_threads=torch.get_num_threads(),
        labels=_pointer(labels), matched=_pointer(matched), deltas=_pointer(deltas),
        classes=_pointer(classes), max_iou=_pointer(max_iou), box_max=_pointer(box_max),
        box_best=_pointer(box_best),
    )  # fmt: skip
    if _kernel()(ctypes.byref(args)) != 0:
        raise MemoryError("the CPU kernel could not allocate its per-thread scratch")
    return Targets(labels, matched, deltas, classes, max_iou, background_class=config.background_class)


def solve_sparse(problem: Problem) -> SparseTargets:
    """The sparse form of ``solve(problem)`` (what ``assign_sparse`` and the service send):
    the same as ``solve(problem).to_sparse()``, compacted in one scan in C instead of
    torch's nonzero and gathers (about 2.5 ms per RetinaNet image)."""
    return _compact(solve(problem))


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _compact(dense: Targets) -> SparseTargets:
    count, gather = _sparse_kernels()
    batch, num_anchors = dense.labels.shape
    positives = torch.empty(batch, dtype=torch.int64)
    ignored = torch.empty(batch, dtype=torch.int64)
    count(_pointer(dense.labels), batch, num_anchors, _pointer(positives), _pointer(ignored))
    total_pos, total_ign = int(positives.sum()), int(ignored.sum())
    pos_anchors = torch.empty(total_pos, dtype=torch.int32)
    pos_matched = torch.empty(total_pos, dtype=torch.int32)
    pos_deltas = torch.empty(total_pos, 4, dtype=torch.float32)
    pos_classes = None if dense.classes is None else torch.empty(total_pos, dtype=torch.int32)
    ign_anchors = torch.empty(total_ign, dtype=torch.int32)
    gather(
        _pointer(dense.labels), _pointer(dense.matched_gt), _pointer(dense.deltas), _pointer(dense.classes),
        batch, num_anchors, _pointer(pos_anchors), _pointer(pos_matched), _pointer(pos_deltas),
        _pointer(pos_classes), _pointer(ign_anchors),
    )  # fmt: skip
    return SparseTargets(
        num_anchors=num_anchors, positive_offsets=_offsets(positives), positive_anchors=pos_anchors,
        positive_matched_gt=pos_matched, positive_deltas=pos_deltas, ignored_offsets=_offsets(ignored),
        ignored_anchors=ign_anchors, positive_classes=pos_classes, background_class=dense.background_class,
    )  # fmt: skip
