"""``assign``: the one entry point, whatever the backend.

Backends are modules with ``solve(problem: Problem) -> Targets`` and are imported
only when first used, so ``import tritarget.kernels`` needs neither triton nor a GPU.
A backend lists in ``CHECKS_GT_BOXES`` the solve functions that check the gt boxes as
they read them (``problem.CheckBoxesFirst``): for those the boxes are not checked twice.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch

from .config import TargetConfig
from .problem import CheckBoxesFirst, Kept, Problem, build_problem, check_flags
from .sampling import image_seeds, sample
from .targets import SparseTargets, Targets, check_dense_fits

__all__ = ["BACKENDS", "assign", "assign_sparse", "resolve_backend"]

# Backend name -> module within tritarget.kernels.
_BACKEND_MODULES = {"reference": "reference", "cpu": "cpu", "triton": "triton_backend"}
BACKENDS = (*_BACKEND_MODULES, "auto")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a name: ``auto`` is triton on CUDA, cpu otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend 'auto': tensors on {device}; move them to the CPU or a CUDA GPU")
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend


@functools.cache  # import_module resolves the name on every call
def _backend_module(backend: str):
    return importlib.import_module(f".{_BACKEND_MODULES[backend]}", __package__)


# (backend name, device) -> the module that solves there: resolved once per pair.
_MODULE_FOR: dict[tuple[str, torch.device], object] = {}
_CPU = torch.device("cpu")


def _backend_for(backend: str, gt_boxes: object):
    """The module of the backend that will solve boxes where ``gt_boxes`` live (chosen
    before the inputs are checked, so that the cpu backend can check CPU boxes itself;
    ``build_problem`` refuses a ``gt_boxes`` that is not a tensor)."""
    key = (backend, gt_boxes.device if isinstance(gt_boxes, torch.Tensor) else _CPU)
    module = _MODULE_FOR.get(key) if isinstance(backend, str) else None
    if module is None:
        module = _MODULE_FOR[key] = _backend_module(resolve_backend(*key))
    return module


def assign(
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor | Sequence[int],
    canvas: tuple[int, int],
    config: TargetConfig,
    *,
    gt_classes: torch.Tensor | None = None,
    ignore_boxes: torch.Tensor | None = None,
    ignore_counts: torch.Tensor | Sequence[int] | None = None,
    image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    pad_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    anchors: torch.Tensor | None = None,
    backend: str = "auto",
    drop_invalid: bool = False,
    return_max_iou: bool = False,
    seed: int | Sequence[int] | None = None,
) -> Targets:
    """Training targets of a ragged batch of images.

    Args:
        gt_boxes (Tensor[N, 4] float32): every image's boxes, xyxy canvas pixels,
            image after image (float64 is rounded to float32 first: IoU is float32 on
            every backend, so an IoU a hair under a threshold in float64 may reach it;
            float16 is widened to float32, where torchvision's and detectron2's coders
            compute widths in float16 and mmdet's areas overflow past 65,504 px²).
        gt_counts (Tensor[B], numpy array or list of B ints): boxes per image (0 is fine).
        canvas ((int, int)): padded batch (height, width).
        config (TargetConfig): anchors, matching, encoding (``presets.get(name)``).
        gt_classes (Tensor[N] int, optional): class of each box -> ``Targets.classes``.
        ignore_boxes (Tensor[M, 4]), ignore_counts (B ints), optional: crowd regions,
            read only where ``config.match.ignore_iof_thr`` > 0 (mmdet's rule; every preset
            has it off, as its peer does).
        image_sizes (Tensor[B, 2] int, optional): valid (height, width) per image,
            for the border rule; the canvas when omitted.
        pad_sizes (Tensor[B, 2] int, optional): padded (height, width) per image, as
            mmdet's ``pad_shape`` (the image resized and padded to its size divisor,
            before the batch pads it to the canvas). Anchors whose feature-map cell lies
            beyond it (mmdet's ``valid_flags``: per level ``min(ceil(pad / stride),
            feature size)`` rows and columns are valid) are excluded before matching,
            like ``pre_match`` border anchors: ignored (label -1, matched -1; mmdet's
            label weight 0) and not counted for any box's best anchor. Needs generated
            anchors; at least ``image_sizes`` when both are given.
        anchors (Tensor[A, 4] float32, optional): explicit anchors (proposals, custom
            layouts) instead of the config's generated ones. Read anew on every call
            (the cpu backend derives their blocks' bounds each time, ~0.2 ms per 200k
            anchors): a change through any path, ``.data`` or a numpy view included,
            is seen.
        backend: ``reference`` | ``cpu`` | ``triton`` | ``auto`` (triton on CUDA
            tensors, cpu otherwise).
        drop_invalid: drop invalid boxes (reported in ``Targets.dropped``) instead
            of raising ``ValueError``.
        return_max_iou: also return each anchor's best IoU.
        seed: sampling seed (only with ``config.match.sample_size``): image i uses
            ``seed + i``, or give one seed per image. None (the default): a fresh one
            per call from torch's global generator, so each batch samples anew (a fixed
            seed samples the same anchors every time).
    Returns:
        Targets with labels/matched_gt/deltas of shape [B, A] ([B, A, 4]). matched_gt
        indexes the boxes of its image as given (before dropping).
    """
    check_flags(drop_invalid=drop_invalid, return_max_iou=return_max_iou)
    gt_boxes, ignore_boxes, anchors = _detached(gt_boxes), _detached(ignore_boxes), _detached(anchors)
    module = _backend_for(backend, gt_boxes)
    targets, problem, kept = _solved(
        module, "solve", drop_invalid,
        lambda host_check, check_gt_boxes: build_problem(
            gt_boxes, gt_counts, canvas, config, gt_classes=gt_classes, ignore_boxes=ignore_boxes,
            ignore_counts=ignore_counts, image_sizes=image_sizes, pad_sizes=pad_sizes, anchors=anchors,
            drop_invalid=drop_invalid, want_max_iou=return_max_iou, host_check=host_check,
            check_gt_boxes=check_gt_boxes,
        ),
    )  # fmt: skip
    seeds = image_seeds(seed, problem.batch_size)
    if config.match.sample_size > 0:
        targets = sample(targets, config.match, seeds)
    if kept.original_index is not None:
        _restore_given_indices(targets.matched_gt, problem, kept)
    targets.dropped, targets.dropped_ignore = kept.dropped, kept.dropped_ignore
    targets.level_starts = _level_starts(problem)
    return targets


def assign_sparse(
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor | Sequence[int],
    canvas: tuple[int, int],
    config: TargetConfig,
    *,
    gt_classes: torch.Tensor | None = None,
    ignore_boxes: torch.Tensor | None = None,
    ignore_counts: torch.Tensor | Sequence[int] | None = None,
    image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    pad_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    anchors: torch.Tensor | None = None,
    backend: str = "auto",
    drop_invalid: bool = False,
    seed: int | Sequence[int] | None = None,
) -> SparseTargets:
    """``assign(...).to_sparse()``, compacted on the device where the backend can.

    Same arguments as ``assign`` (no ``return_max_iou``: the sparse form has no place
    for it). The triton and cpu backends write the sparse lists directly: triton on the
    GPU without a host round trip, cpu in its C kernel without [B, A] dense targets. With
    sampling, or on the reference backend, the dense targets are built first.
    """
    check_flags(drop_invalid=drop_invalid)
    gt_boxes, ignore_boxes, anchors = _detached(gt_boxes), _detached(ignore_boxes), _detached(anchors)
    module = _backend_for(backend, gt_boxes)
    # (A config that is not a TargetConfig goes to "solve", whose build_problem refuses it.)
    direct = isinstance(config, TargetConfig) and config.match.sample_size == 0 and hasattr(module, "solve_sparse")
    solved, problem, kept = _solved(
        module, "solve_sparse" if direct else "solve", drop_invalid,
        lambda host_check, check_gt_boxes: build_problem(
            gt_boxes, gt_counts, canvas, config, gt_classes=gt_classes, ignore_boxes=ignore_boxes,
            ignore_counts=ignore_counts, image_sizes=image_sizes, pad_sizes=pad_sizes, anchors=anchors,
            drop_invalid=drop_invalid, host_check=host_check, check_gt_boxes=check_gt_boxes,
        ),
    )  # fmt: skip
    seeds = image_seeds(seed, problem.batch_size)
    if direct:
        sparse = solved
    else:
        targets = solved
        if config.match.sample_size > 0:
            targets = sample(targets, config.match, seeds)
        sparse = targets.to_sparse()
    if kept.original_index is not None:
        counts = sparse.positive_offsets.diff()
        image = torch.repeat_interleave(
            torch.arange(counts.numel(), device=counts.device), counts, output_size=sparse.positive_anchors.numel()
        )  # output_size: no sync to size the result
        sparse.positive_matched_gt = _original_indices(sparse.positive_matched_gt, image, problem.gt_offsets, kept)
    sparse.dropped, sparse.dropped_ignore = kept.dropped, kept.dropped_ignore
    sparse.level_starts = _level_starts(problem)
    return sparse


def _solved(module, function: str, drop_invalid: bool, build) -> tuple[object, Problem, Kept]:
    """``module.<function>(problem)``, the problem and what was kept, for the problem
    ``build(host_check, check_gt_boxes)`` makes (``build_problem`` with the caller's
    arguments): built without the gt boxes' check where that function checks them itself,
    and built again with it when the function asks (``CheckBoxesFirst``: some box may be
    invalid, so the check raises or drops as ``drop_invalid`` says) or raises another
    ``ValueError`` (an invalid box is named before the backend's own refusals, as when the
    boxes were checked first).

    With ``drop_invalid`` the caller expects invalid boxes: they are checked first, so
    that a batch with one is not solved twice (the triton backend finds them at the end).
    Dense targets on the host are refused first where they would not fit
    (``_check_dense_fits``)."""
    host_check = getattr(module, "boxes_valid", None)

    def solve(problem: Problem) -> object:
        if function == "solve":
            _check_dense_fits(problem)
        return getattr(module, function)(problem)

    if function in getattr(module, "CHECKS_GT_BOXES", ()) and not drop_invalid:
        problem, kept = build(host_check, False)
        try:
            return solve(problem), problem, kept
        except (CheckBoxesFirst, ValueError):
            pass
    problem, kept = build(host_check, True)
    return solve(problem), problem, kept


def _check_dense_fits(problem: Problem) -> None:
    """``MemoryError`` where the dense targets of ``problem``, on the host, would not fit
    in its memory (``host_memory``)."""
    if problem.device.type != "cpu":
        return  # a device's allocator refuses what does not fit (torch.OutOfMemoryError)
    check_dense_fits(
        problem.batch_size, problem.num_anchors, problem.gt_classes is not None, problem.want_max_iou,
        "fewer images per call, a smaller canvas, or assign_sparse (positives and ignored anchors only)",
    )  # fmt: skip


def _detached(value: object) -> object:
    """Targets are data, not a function of the boxes: an input that requires grad is read
    detached, so that no target joins the caller's graph, on any backend. (Looking at the
    inputs costs ~1 us; a ``torch.no_grad()`` block around every call cost 6-16 us, a
    tenth of a one-image call's budget outside the kernel.)"""
    return value.detach() if isinstance(value, torch.Tensor) and value.requires_grad else value


def _level_starts(problem: Problem) -> tuple[int, ...] | None:
    """Each level's first anchor, then A (generated anchors); None for explicit anchors."""
    return None if problem.grid is None else problem.grid.level_starts


def _restore_given_indices(matched: torch.Tensor, problem: Problem, kept: Kept) -> None:
    """Dense ``matched`` [B, A] int32, in place: kept-box indices back to the indices as
    given, by one lookup per anchor of each image that lost boxes (-1 looks up -1). The
    other images kept every box, so their indices already are as given; mapping the whole
    batch through int64 temporaries made one dropped box cost an 8-image call 5x its time."""
    offsets = problem.host_ints.ints  # starts with the kept boxes' offsets [B + 1]
    for i, lost in enumerate(kept.dropped):
        if lost.numel() == 0:
            continue
        given = kept.original_index[offsets[i] : offsets[i + 1]].to(torch.int32)
        lookup = torch.cat([given, given.new_full((1,), -1)]).to(matched.device)
        matched[i] = lookup[matched[i].long()]


def _original_indices(matched: torch.Tensor, image: torch.Tensor, gt_offsets: torch.Tensor, kept: Kept) -> torch.Tensor:
    """Box indices within each image as the caller gave them, before dropping.

    matched (int32, any shape): index among the image's kept boxes, or -1.
    image (int64, broadcastable to matched): the image of each element.
    kept: with ``original_index`` set (some box was dropped).
    """
    if kept.original_index.numel() == 0:  # every box dropped: nothing is matched
        return matched
    original = kept.original_index.to(matched.device)
    row = gt_offsets.to(matched.device)[image] + matched.long().clamp(min=0)  # kept-box row
    restored = original[row.clamp(max=original.numel() - 1)]
    return torch.where(matched >= 0, restored, matched.long()).to(torch.int32)
