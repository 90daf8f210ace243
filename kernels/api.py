"""``assign``: the one entry point, whatever the backend.

Backends are modules with ``solve(problem: Problem) -> Targets`` and are imported
only when first used, so ``import tritarget.kernels`` needs neither triton nor a GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from .config import TargetConfig
from .problem import Kept, build_problem
from .sampling import image_seeds, sample
from .targets import Targets

__all__ = ["BACKENDS", "assign", "resolve_backend"]

# Backend name -> module within tritarget.kernels.
_BACKEND_MODULES = {"reference": "reference", "cpu": "cpu", "triton": "triton_backend"}
BACKENDS = (*_BACKEND_MODULES, "auto")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a name: ``auto`` is triton on CUDA, cpu otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend


def _solver(backend: str):
    return importlib.import_module(f".{_BACKEND_MODULES[backend]}", __package__).solve


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
    anchors: torch.Tensor | None = None,
    backend: str = "auto",
    drop_invalid: bool = False,
    return_max_iou: bool = False,
    seed: int | Sequence[int] = 0,
) -> Targets:
    """Training targets of a ragged batch of images.

    Args:
        gt_boxes (Tensor[N, 4] float32): every image's boxes, xyxy canvas pixels,
            image after image.
        gt_counts (Tensor[B] or list of B ints): boxes per image (0 is fine).
        canvas ((int, int)): padded batch (height, width).
        config (TargetConfig): anchors, matching, encoding (``presets.get(name)``).
        gt_classes (Tensor[N] int, optional): class of each box -> ``Targets.classes``.
        ignore_boxes (Tensor[M, 4]), ignore_counts (B ints), optional: crowd regions.
        image_sizes (Tensor[B, 2] int, optional): valid (height, width) per image,
            for the border rule; the canvas when omitted.
        anchors (Tensor[A, 4] float32, optional): explicit anchors (proposals, custom
            layouts) instead of the config's generated ones.
        backend: ``reference`` | ``cpu`` | ``triton`` | ``auto`` (triton on CUDA
            tensors, cpu otherwise).
        drop_invalid: drop invalid boxes (reported in ``Targets.dropped``) instead
            of raising ``ValueError``.
        return_max_iou: also return each anchor's best IoU.
        seed: sampling seed (only with ``config.match.sample_size``): image i uses
            ``seed + i``, or give one seed per image.
    Returns:
        Targets with labels/matched_gt/deltas of shape [B, A] ([B, A, 4]). matched_gt
        indexes the boxes of its image as given (before dropping).
    """
    problem, kept = build_problem(
        gt_boxes, gt_counts, canvas, config,
        gt_classes=gt_classes, ignore_boxes=ignore_boxes, ignore_counts=ignore_counts,
        image_sizes=image_sizes, anchors=anchors, drop_invalid=drop_invalid, want_max_iou=return_max_iou,
    )  # fmt: skip
    seeds = image_seeds(seed, problem.batch_size)
    targets = _solver(resolve_backend(backend, problem.device))(problem)
    if config.match.sample_size > 0:
        targets = sample(targets, config.match, seeds)
    return _restore_indices(targets, problem.gt_offsets, kept)


def _restore_indices(targets: Targets, gt_offsets: torch.Tensor, kept: Kept) -> Targets:
    """Make matched_gt index the boxes as the caller gave them, before dropping."""
    targets.dropped = kept.dropped
    if kept.original_index is None:
        return targets
    original = kept.original_index.to(targets.matched_gt.device)
    matched = targets.matched_gt.long()
    row = gt_offsets[:-1, None].to(matched.device) + matched.clamp(min=0)  # [B, A] kept-box row
    restored = original[row.clamp(max=max(original.numel() - 1, 0))] if original.numel() else matched
    targets.matched_gt = torch.where(matched >= 0, restored, matched).to(torch.int32)
    return targets
