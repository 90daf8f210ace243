"""The fast CPU backend: ``solve(problem) -> Targets`` with the reference's results.

The work is done by one fused C kernel (``cpu_kernel.c``, built on first use by
``cpu_build``) that streams over anchors in chunks of 512, multi-threaded over
(image, chunk) work items with ``torch.get_num_threads()`` threads (the calling thread
and helper threads the library keeps between calls), in two passes:

1. every anchor's best IoU and box, its outputs as the thresholds, ignore and border
   rules decide them (labels, matched box, deltas, class: written once), and every
   box's best IoU and anchor (what the low-quality rules need) as per-thread partial
   maxima, merged afterwards (a shared per-box bound lets every thread skip by what any
   thread found);
2. the low-quality rule: only chunks whose best IoU reaches some box's best IoU are
   revisited, only those boxes' IoUs recomputed, only the lifted anchors rewritten.

``solve`` writes the dense [B, A] targets. ``solve_sparse`` never builds them: the kernel
keeps each chunk's positives and ignored anchors as rows and copies them, in ascending
anchor order, into outputs sized by its counts (two calls: solve and count, then emit).

Skipping: each block of 64 anchors has bounds (bounding box, area range), cached here per
generated anchor set (explicit anchors' are computed on each call). A box that misses a
block has IoU exactly 0 there; a box whose IoU there is provably below both thresholds
and below its best IoU found so far changes no label there. Either way the block is
neither read nor computed for that box: this is what makes crowded images cheap, and
what lets a sparse solve of a COCO-like image read a small fraction of the anchors.

Memory beyond the outputs: box maxima (8 bytes per box and thread, 4 shared), ~50 bytes
per (image, chunk of 512 anchors), ~20 KiB of stack per thread, the sparse rows (8 bytes
per positive, 4 per ignored anchor; a chunk pass 2 changes is stored twice, lists grow by
doubling) and the cached bounds (24 bytes per 64 anchors): O(threads x G + B x A / 512 +
rows), no [G, A] matrix and, for the sparse form, nothing [B, A].

Labels and matched indices equal the reference bit for bit: IoU is computed in float32
in torchvision's operation order, without fused multiply-add, and thresholds are rounded
to float32 as torch compares them.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import threading
import weakref

import torch

from .config import LOW_QUALITY_MODES, TargetConfig
from .cpu_build import load_library
from .problem import CheckBoxesFirst, Problem
from .targets import SparseTargets, Targets

__all__ = ["CHECKS_GT_BOXES", "solve", "solve_sparse", "boxes_valid"]

# Both solves check the gt boxes themselves (``problem.CheckBoxesFirst``), in the C call
# that solves them: no separate pass over the boxes before it.
CHECKS_GT_BOXES = ("solve", "solve_sparse")
_INVALID_BOX = 2  # tritarget_cpu_solve's status for an invalid gt box

_F32_4, _I64_2 = ctypes.c_float * 4, ctypes.c_int64 * 2
# The sparse outputs are made by ``new_empty`` on these (dtype and device with it, whatever
# torch's defaults): ~0.8 us cheaper per tensor than ``torch.empty(..., dtype=...)``, whose
# keywords cost more to parse than the allocation.
_INT32, _INT64, _FLOAT32 = (torch.empty(0, dtype=t, device="cpu") for t in (torch.int32, torch.int64, torch.float32))
# Anchors per skipping block and per work item, numbers in their bounds (cpu_kernel.c's
# BLOCK, CHUNK, BOUNDS).
_BLOCK, _CHUNK, _BOUNDS = 64, 512, 6


class _CProblem(ctypes.Structure):
    """Mirror of ``Problem`` in cpu_kernel.c (same fields, same order)."""

    _fields_ = [
        ("anchors", ctypes.c_void_p),
        ("bounds", ctypes.c_void_p),
        ("gt_boxes", ctypes.c_void_p),
        ("gt_offsets", ctypes.c_void_p),
        ("gt_classes", ctypes.c_void_p),
        ("gt_classes64", ctypes.c_void_p),
        ("ignore_boxes", ctypes.c_void_p),
        ("ignore_offsets", ctypes.c_void_p),
        ("border_limits", ctypes.c_void_p),
        ("valid_cells", ctypes.c_void_p),
        ("levels", ctypes.c_void_p),
        ("num_anchors", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("num_levels", ctypes.c_int64),
        # c_float fields round a Python float to nearest float32, as torch rounds the
        # scalar in `iou >= high`: the kernel compares with the same thresholds.
        ("high", ctypes.c_float),
        ("low", ctypes.c_float),
        ("min_pos_iou", ctypes.c_float),
        ("ignore_iof_thr", ctypes.c_float),
        ("strict_high", ctypes.c_int32),
        ("low_quality", ctypes.c_int32),
        ("use_ignore", ctypes.c_int32),
        ("iof_wrt_anchor", ctypes.c_int32),
        ("border_post", ctypes.c_int32),
        ("shape_major", ctypes.c_int32),
        ("weights", _F32_4),
        ("means", _F32_4),
        ("stds", _F32_4),
        ("background_class", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("check_gt_boxes", ctypes.c_int32),
        ("canvas_width", ctypes.c_float),
        ("canvas_height", ctypes.c_float),
        ("labels", ctypes.c_void_p),
        ("matched", ctypes.c_void_p),
        ("deltas", ctypes.c_void_p),
        ("classes", ctypes.c_void_p),
        ("max_iou", ctypes.c_void_p),
    ]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    library = load_library()
    pointer, size, problem = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_CProblem)
    signatures = {
        "tritarget_cpu_solve": ([problem], ctypes.c_int),
        "tritarget_cpu_solve_sparse": ([problem, pointer], pointer),
        "tritarget_cpu_emit_sparse": ([pointer] * 8, None),
        "tritarget_cpu_free_sparse": ([pointer], None),
        "tritarget_cpu_bounds": ([pointer, size, pointer], None),
        "tritarget_cpu_boxes_valid": ([pointer, size, *[ctypes.c_float] * 4], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


def boxes_valid(boxes: torch.Tensor, low: float, width: float, height: float, reach: float) -> bool:
    """``build_problem``'s host check of contiguous float32 CPU boxes, compiled: whether
    every box is valid against these limits (``problem.HostCheck``). A call costs ~2 us
    for a few boxes (Python's loop ~0.6 us per box) and 0.09 ms for RetinaNet's 201,600
    explicit anchors (one thread, the 2-core VM)."""
    return bool(_library().tritarget_cpu_boxes_valid(boxes.data_ptr(), boxes.shape[0], low, width, height, reach))


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# Held to change the cache below: another thread's eviction iterates over it (lookups
# need no lock).
_CACHE_LOCK = threading.Lock()


def _new_lock_after_fork() -> None:
    """A forked child (a DataLoader worker) gets a free lock: another thread of the parent
    may have held this one at the fork, and nothing in the child would release it."""
    global _CACHE_LOCK
    _CACHE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _compute_bounds(anchors: torch.Tensor) -> torch.Tensor:
    """Tensor[ceil(A / 64) + ceil(A / 512), 6] float32: each block's, then each chunk's,
    bounding box and area range."""
    count = anchors.shape[0]
    bounds = torch.empty(-(-count // _BLOCK) - (-count // _CHUNK), _BOUNDS, dtype=torch.float32, device="cpu")
    _library().tritarget_cpu_bounds(anchors.data_ptr(), count, bounds.data_ptr())
    return bounds


class _Template:
    """The kernel arguments a config and an anchor set decide (thresholds, encoding, the
    anchors and their bounds), filled in once and copied for each call.

    Holds the config (so that its id, the cache key, is not reused) and the anchors weakly.
    """

    __slots__ = ("config", "anchors", "bounds", "args")

    def __init__(self, config: TargetConfig, anchors: torch.Tensor, bounds: torch.Tensor | None = None):
        self.config, self.anchors = config, weakref.ref(anchors)
        self.bounds = _compute_bounds(anchors) if bounds is None else bounds
        match, encode = config.match, config.encode
        self.args = _CProblem(
            anchors=anchors.data_ptr(), bounds=self.bounds.data_ptr(), num_anchors=anchors.shape[0],
            high=match.high, low=match.low, min_pos_iou=match.min_pos_iou, ignore_iof_thr=match.ignore_iof_thr,
            strict_high=match.strict_high, low_quality=LOW_QUALITY_MODES.index(match.low_quality),
            iof_wrt_anchor=match.ignore_iof_wrt_anchor, border_post=match.border_order == "post_match",
            weights=_F32_4(*encode.weights), means=_F32_4(*encode.means), stds=_F32_4(*encode.stds),
            background_class=config.background_class,
        )  # fmt: skip


# (id(config), id(anchors)) -> _Template of generated anchors, most recent last. They are
# one cached tensor per config and canvas, never written, so a training loop computes their
# bounds once (reading all 201,600 RetinaNet anchors takes ~0.2 ms, more than a sparse solve
# of a COCO-like image). Keyed by identity: hashing a frozen config walks all its fields. A
# new config object with anchors already seen (``presets.get`` on each call) reuses their
# bounds: otherwise each such call would spend those 0.2 ms and leave 85 kB cached in the
# middle of the heap it had just freed its outputs to, so that a dense batch's outputs no
# longer fitted there and the heap grew for calls on end (tests/test_cpu_backend.py).
_TEMPLATES: dict[tuple[int, int], _Template] = {}
_TEMPLATES_KEPT = 8


def _template(config: TargetConfig, anchors: torch.Tensor, generated: bool) -> _Template:
    """The template of a call's kernel arguments. Explicit anchors get one of their own on
    each call: they are the caller's, who may have written them since the last call where no
    counter shows it (through ``.data``, a numpy view, DLPack), and bounds cached by their
    version then skipped blocks the anchors had moved into (no positives, no error).
    Computing them reads every anchor once more, as their check in ``build_problem`` does."""
    if not generated:
        return _Template(config, anchors)
    key = (id(config), id(anchors))
    cached = _TEMPLATES.get(key)
    if cached is not None and cached.config is config and cached.anchors() is anchors:
        return cached
    kept = tuple(_TEMPLATES.values())  # one C call: no other thread's insertion can interrupt it
    seen = next((t for t in kept if t.anchors() is anchors), None)
    template = _Template(config, anchors, None if seen is None else seen.bounds)
    with _CACHE_LOCK:
        _TEMPLATES.pop(key, None)
        while len(_TEMPLATES) >= _TEMPLATES_KEPT:
            _TEMPLATES.pop(next(iter(_TEMPLATES)))
        _TEMPLATES[key] = template
    return template


def _border_limits(problem: Problem) -> array.array:
    """Float32 ``(-b, -b, w + b, h + b)`` per image, [B, 4], computed in float64 and rounded
    to float32 as torch rounds a Python scalar it compares a float32 tensor with."""
    border = problem.config.match.allowed_border
    sizes = problem.host_ints.sizes
    limits = array.array("f")  # a C cast from double: round to nearest, as torch's .to(float32)
    for height, width in zip(sizes[::2], sizes[1::2]):
        limits.extend((-border, -border, float(width) + border, float(height) + border))
    return limits


def _padding_tables(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid_cells [B, L, 2] int32, levels [L, 4] int64: first anchor, height, width,
    shapes per cell) for the padded-size rule."""
    grid = problem.grid
    levels = [[start, lv.height, lv.width, lv.cells.shape[0]] for lv, start in zip(grid.levels, grid.level_starts)]
    return problem.valid_cells.contiguous(), torch.tensor(levels, dtype=torch.int64, device="cpu")


class _Inputs:
    """A problem as the kernel reads it: ``args``, and what they point into, held.

    The tensors are read in place: build_problem made them contiguous, of the dtypes
    ``Problem`` documents, and packed the offsets on the host.
    """

    def __init__(self, problem: Problem):
        if not problem.gt_boxes.is_cpu:
            raise ValueError(f"the cpu backend needs CPU tensors, got tensors on {problem.device}")
        if not (problem.gt_classes_checked and problem.ignore_boxes_checked):
            raise CheckBoxesFirst  # build_problem checks classes and ignore boxes on the host: the kernel does not
        config, classes, ignore, host = problem.config, problem.gt_classes, problem.ignore_boxes, problem.host_ints
        self.problem, self.template = problem, _template(config, problem.anchors, problem.grid is not None)
        args = self.args = _CProblem.from_buffer_copy(self.template.args)
        args.gt_boxes, args.gt_offsets, args.batch = problem.gt_boxes.data_ptr(), host.gt_offsets_address, host.batch
        if classes is not None and classes.dtype is torch.int64:  # read as given: no conversion
            args.gt_classes64 = classes.data_ptr()
        elif classes is not None:
            args.gt_classes = classes.data_ptr()
        if ignore.shape[0] > 0:
            args.ignore_boxes, args.ignore_offsets = ignore.data_ptr(), host.ignore_offsets_address
            args.use_ignore = config.match.ignore_iof_thr > 0
        if config.match.allowed_border >= 0:  # the border rule
            self.border_limits = _border_limits(problem)
            args.border_limits = self.border_limits.buffer_info()[0]
        if problem.valid_cells is not None:  # the padded-size rule
            self.valid_cells, self.levels = _padding_tables(problem)
            args.valid_cells, args.levels = self.valid_cells.data_ptr(), self.levels.data_ptr()
            args.num_levels, args.shape_major = self.levels.shape[0], problem.grid.shape_major
        args.num_threads = torch.get_num_threads()
        if not problem.gt_boxes_checked:
            args.check_gt_boxes = True
            args.canvas_height, args.canvas_width = problem.canvas


def solve(problem: Problem) -> Targets:
    """Dense targets of a checked batch (see ``tritarget.kernels.reference.solve``)."""
    inputs = _Inputs(problem)
    batch, num_anchors = problem.batch_size, problem.num_anchors
    # Largest first: under keep_freed_memory the next call's deltas find the block these
    # deltas leave whole (glibc's best fit), before smaller outputs can split it. Smallest
    # first, the heap grew by ~50 MB (and faulted) per 16-image call for up to ~10 calls, to
    # 546 MB; largest first it settles within 4 calls at 250-300 MB (mallinfo2, this VM).
    deltas = torch.empty(batch, num_anchors, 4, dtype=torch.float32, device="cpu")
    matched = torch.empty(batch, num_anchors, dtype=torch.int32, device="cpu")
    classes = None if problem.gt_classes is None else torch.empty(batch, num_anchors, dtype=torch.int32, device="cpu")
    max_iou = torch.empty(batch, num_anchors, dtype=torch.float32, device="cpu") if problem.want_max_iou else None
    labels = torch.empty(batch, num_anchors, dtype=torch.int8, device="cpu")
    args = inputs.args
    args.labels, args.matched, args.deltas = labels.data_ptr(), matched.data_ptr(), deltas.data_ptr()
    args.classes, args.max_iou = _pointer(classes), _pointer(max_iou)
    status = _library().tritarget_cpu_solve(args)  # passed by reference (argtypes)
    if status == _INVALID_BOX:
        raise CheckBoxesFirst
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its scratch memory")
    background = problem.config.background_class
    return Targets(labels, matched, deltas, classes, max_iou, background_class=background)


def solve_sparse(problem: Problem) -> SparseTargets:
    """The sparse form of ``solve(problem)`` (what ``assign_sparse`` and the service send),
    equal to ``solve(problem).to_sparse()`` without building the dense targets."""
    inputs = _Inputs(problem)
    library = _library()
    totals = _I64_2()  # positives, ignored: cheaper to read than a tensor element
    job = library.tritarget_cpu_solve_sparse(inputs.args, totals)  # passed by reference (argtypes)
    positives, ignored = totals
    if not job:
        if positives < 0:
            raise CheckBoxesFirst
        raise MemoryError("the CPU kernel could not allocate its scratch memory")
    try:
        batch = problem.host_ints.batch
        positive_offsets = _INT64.new_empty(batch + 1)
        ignored_offsets = _INT64.new_empty(batch + 1)
        anchors = _INT32.new_empty(positives)
        matched = _INT32.new_empty(positives)
        deltas = _FLOAT32.new_empty(positives, 4)
        classes = None if problem.gt_classes is None else _INT32.new_empty(positives)
        ignored_anchors = _INT32.new_empty(ignored)
    except BaseException:
        library.tritarget_cpu_free_sparse(job)
        raise
    library.tritarget_cpu_emit_sparse(  # frees the job
        job, positive_offsets.data_ptr(), ignored_offsets.data_ptr(), anchors.data_ptr(), matched.data_ptr(),
        deltas.data_ptr(), _pointer(classes), ignored_anchors.data_ptr(),
    )  # fmt: skip
    return SparseTargets(
        num_anchors=problem.num_anchors, positive_offsets=positive_offsets, positive_anchors=anchors,
        positive_matched_gt=matched, positive_deltas=deltas, ignored_offsets=ignored_offsets,
        ignored_anchors=ignored_anchors, positive_classes=classes, background_class=problem.config.background_class,
    )  # fmt: skip
