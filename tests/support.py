"""Shared test helpers: random ragged batches and a comparison that shows mismatches."""

from __future__ import annotations

import torch

from tritarget.kernels import Targets


def random_boxes(
    generator: torch.Generator, count: int, canvas: tuple[int, int], min_size: float = 4.0, max_frac: float = 0.6
) -> torch.Tensor:
    """Tensor[count, 4] float32 valid boxes, partly outside the canvas now and then."""
    height, width = canvas
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = min_size + torch.rand(count, 2, generator=generator) * (size * max_frac)
    centre = torch.rand(count, 2, generator=generator) * size
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    return boxes.clamp(min=torch.tensor([-8.0, -8.0, 1.0, 1.0]), max=torch.cat([size - 1, size + 8]))


def random_batch(
    generator: torch.Generator, counts: list[int], canvas: tuple[int, int], **kwargs
) -> tuple[torch.Tensor, list[int]]:
    """(gt_boxes [sum(counts), 4], counts): one random image per count."""
    boxes = [random_boxes(generator, c, canvas, **kwargs) for c in counts]
    return torch.cat(boxes) if boxes else torch.zeros(0, 4), list(counts)


def with_ties(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Repeat some boxes (exact duplicates tie on every IoU) and snap to a coarse grid."""
    snapped = (boxes / 8).round() * 8
    snapped[:, 2:] = torch.maximum(snapped[:, 2:], snapped[:, :2] + 8)
    if snapped.shape[0] >= 2:
        dup = torch.randint(0, snapped.shape[0], (snapped.shape[0] // 2,), generator=generator)
        snapped[-dup.numel() :] = snapped[dup]
    return snapped


def _describe(name: str, ours: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor) -> str:
    where = torch.nonzero(bad)[:8].tolist()
    rows = [f"  at {w}: ours={ours[tuple(w)].tolist()} reference={ref[tuple(w)].tolist()}" for w in where]
    return f"{name}: {int(bad.sum())} mismatches\n" + "\n".join(rows)


def assert_targets_equal(ours: Targets, ref: Targets, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Labels, matched indices and classes exactly; deltas within rtol/atol."""
    assert ours.labels.shape == ref.labels.shape, (ours.labels.shape, ref.labels.shape)
    for name in ("labels", "matched_gt", "classes"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), f"{name}: present in only one result"
        if a is not None:
            a, b = a.cpu(), b.cpu()
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            bad = a != b
            assert not bad.any(), _describe(name, a, b, bad)
    a, b = ours.deltas.cpu(), ref.deltas.cpu()
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol)
    assert not bad.any(), _describe("deltas", a, b, bad)
    if ours.max_iou is not None and ref.max_iou is not None:
        a, b = ours.max_iou.cpu(), ref.max_iou.cpu()
        bad = a != b
        assert not bad.any(), _describe("max_iou", a, b, bad)


def on_device(function, boxes, counts, canvas, config, *, backend: str, **kwargs):
    """``function`` (``assign`` or ``assign_sparse``) with its tensors on ``backend``'s
    device: CUDA for triton on a GPU machine, where it runs compiled, else the CPU (triton
    in the interpreter). The result comes back on the host."""
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    return function(boxes.to(device), counts, canvas, config, backend=backend, **moved).to("cpu")
