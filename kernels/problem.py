"""Checking a user's batch and turning it into the ``Problem`` every backend solves.

A backend never sees raw user input: ``build_problem`` checks types, shapes, counts
and every box, drops invalid boxes when asked (remembering where each kept box came
from), and fills in defaults (valid sizes = canvas, no ignore boxes).

Invalid boxes are degenerate (x2 <= x1 or y2 <= y1), not finite, or wholly outside
the canvas. They are refused rather than matched because a box with IoU 0 against
every anchor would, under torchvision's and mmdet's low-quality rule, turn every
zero-IoU anchor positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .anchors import AnchorGrid, check_canvas, generate_anchors, resolve_grid
from .config import TargetConfig

__all__ = ["Problem", "build_problem"]


@dataclass(frozen=True, eq=False)
class Problem:
    """A checked, ragged batch; what ``backend.solve(problem) -> Targets`` receives.

    grid: per-level anchor tables, or None when explicit anchors were given.
    anchors (Tensor[A, 4] float32): every anchor, on ``device`` (generated or explicit).
    gt_boxes (Tensor[N, 4] float32), gt_offsets (Tensor[B + 1] int64): image i owns rows
        ``gt_offsets[i]:gt_offsets[i + 1]``.
    gt_classes (Tensor[N] int32 or None).
    ignore_boxes (Tensor[M, 4] float32), ignore_offsets (Tensor[B + 1] int64): crowd
        regions, possibly none.
    image_sizes (Tensor[B, 2] int64): valid (height, width) of each image.
    """

    config: TargetConfig
    canvas: tuple[int, int]
    grid: AnchorGrid | None
    anchors: torch.Tensor
    gt_boxes: torch.Tensor
    gt_offsets: torch.Tensor
    gt_classes: torch.Tensor | None
    ignore_boxes: torch.Tensor
    ignore_offsets: torch.Tensor
    image_sizes: torch.Tensor
    want_max_iou: bool = False

    @property
    def batch_size(self) -> int:
        return self.gt_offsets.numel() - 1

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gt_boxes.device


@dataclass(frozen=True, eq=False)
class Kept:
    """Which given boxes survived ``drop_invalid``.

    original_index (Tensor[N_kept] int64): index within its image of each kept box.
    dropped (list of B Tensor[D_i] int64): indices within each image of dropped boxes.
    """

    original_index: torch.Tensor | None
    dropped: list[torch.Tensor]


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _boxes(name: str, value: object, device: torch.device) -> torch.Tensor:
    boxes = _tensor(name, value)
    if not boxes.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32 xyxy), got {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if boxes.device != device:
        raise ValueError(f"{name}: on {boxes.device}, but gt_boxes are on {device}")
    return boxes.to(torch.float32).contiguous()


def _counts(name: str, value: object, total: int, total_name: str, batch: int | None) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name}: expected integers, got {value!r}")
        value = torch.tensor(value, dtype=torch.int64)
    counts = _tensor(name, value)
    if counts.dtype.is_floating_point or counts.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"{name}: expected an integer tensor, got {counts.dtype}")
    if counts.dim() != 1:
        raise ValueError(f"{name}: expected shape [B], got {list(counts.shape)}")
    counts = counts.to(device="cpu", dtype=torch.int64)
    if batch is not None and counts.numel() != batch:
        raise ValueError(f"{name}: has {counts.numel()} images, but gt_counts has {batch}")
    if counts.numel() == 0:
        raise ValueError(f"{name}: the batch is empty (need at least one image)")
    if (counts < 0).any():
        image = int(torch.nonzero(counts < 0)[0])
        raise ValueError(f"{name}[{image}]: negative count {int(counts[image])}")
    if int(counts.sum()) != total:
        raise ValueError(f"{name}: counts sum to {int(counts.sum())}, but {total_name} has {total} rows")
    return counts


def _invalid_reasons(boxes: torch.Tensor, canvas: tuple[int, int] | None) -> list[tuple[int, str]]:
    """(row, reason) for every invalid box, in row order; ``canvas=None`` skips the canvas check."""
    x1, y1, x2, y2 = boxes.unbind(1)
    checks = [
        (~torch.isfinite(boxes).all(dim=1), "coordinates are not finite"),
        (~(x2 > x1), "degenerate box (x2 <= x1)"),
        (~(y2 > y1), "degenerate box (y2 <= y1)"),
    ]
    if canvas is not None:
        height, width = canvas
        outside = (x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height)
        checks.append((outside, f"wholly outside the {height}x{width} canvas"))
    reasons: dict[int, str] = {}
    for bad, reason in checks:
        for row in torch.nonzero(bad).flatten().tolist():
            reasons.setdefault(row, reason)
    return sorted(reasons.items())


def _drop_or_raise(
    name: str, boxes: torch.Tensor, counts: torch.Tensor, canvas: tuple[int, int], drop: bool
) -> tuple[torch.Tensor, torch.Tensor, Kept]:
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    reasons = _invalid_reasons(boxes, canvas)
    batch = counts.numel()
    if not reasons:
        return counts, offsets, Kept(None, [torch.zeros(0, dtype=torch.int64) for _ in range(batch)])
    image_of_row = torch.repeat_interleave(torch.arange(batch), counts)
    if not drop:
        row, reason = reasons[0]
        image = int(image_of_row[row])
        box = int(row - offsets[image])
        more = f" ({len(reasons) - 1} more invalid boxes)" if len(reasons) > 1 else ""
        raise ValueError(
            f"{name}: image {image}, box {box}: {reason}: {boxes[row].tolist()}{more}; "
            "pass drop_invalid=True to drop invalid boxes instead"
        )
    bad = torch.zeros(boxes.shape[0], dtype=torch.bool)
    bad[[row for row, _ in reasons]] = True
    within = torch.arange(boxes.shape[0]) - offsets[image_of_row]
    dropped = [within[bad & (image_of_row == i)] for i in range(batch)]
    keep = ~bad
    kept_counts = torch.bincount(image_of_row[keep], minlength=batch)
    kept_offsets = torch.cat([counts.new_zeros(1), kept_counts.cumsum(0)])
    return kept_counts, kept_offsets, Kept(within[keep], dropped)


def _image_sizes(value: object, batch: int, canvas: tuple[int, int], device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.tensor([list(canvas)] * batch, dtype=torch.int64, device=device)
    sizes = torch.as_tensor(value) if isinstance(value, (list, tuple)) else _tensor("image_sizes", value)
    if sizes.dtype.is_floating_point or sizes.dtype == torch.bool:
        raise TypeError(f"image_sizes: expected integers (height, width), got {sizes.dtype}")
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes: expected shape [{batch}, 2] (height, width), got {list(sizes.shape)}")
    sizes = sizes.to(device="cpu", dtype=torch.int64)
    for i, (h, w) in enumerate(sizes.tolist()):
        if not (0 < h <= canvas[0] and 0 < w <= canvas[1]):
            raise ValueError(
                f"image_sizes[{i}]: ({h}, {w}) must be positive and fit the {canvas[0]}x{canvas[1]} canvas"
            )
    return sizes.to(device)


def build_problem(
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor | list[int],
    canvas: tuple[int, int],
    config: TargetConfig,
    *,
    gt_classes: torch.Tensor | None = None,
    ignore_boxes: torch.Tensor | None = None,
    ignore_counts: torch.Tensor | list[int] | None = None,
    image_sizes: torch.Tensor | list | None = None,
    anchors: torch.Tensor | None = None,
    drop_invalid: bool = False,
    want_max_iou: bool = False,
) -> tuple[Problem, Kept]:
    """Check a batch and build its ``Problem`` (see ``tritarget.kernels.assign``)."""
    if not isinstance(config, TargetConfig):
        raise TypeError(f"config: expected TargetConfig, got {type(config).__name__}")
    canvas = check_canvas(canvas)
    gt = _tensor("gt_boxes", gt_boxes)
    device = gt.device
    boxes = _boxes("gt_boxes", gt, device)
    counts = _counts("gt_counts", gt_counts, boxes.shape[0], "gt_boxes", None)
    batch = counts.numel()

    if anchors is None:
        grid = resolve_grid(config.anchors, canvas)
        anchor_boxes = generate_anchors(config.anchors, canvas).to(device)
    else:
        grid = None
        anchor_boxes = _boxes("anchors", anchors, device)
        # A degenerate anchor has no centre to encode against (log of a zero width) and
        # NaN coordinates order differently on GPU and CPU: refuse both.
        invalid = _invalid_reasons(anchor_boxes.cpu(), None)
        if invalid:
            row, reason = invalid[0]
            raise ValueError(f"anchors: anchor {row}: {reason}: {anchor_boxes[row].tolist()}")

    classes = None
    if gt_classes is not None:
        classes = _tensor("gt_classes", gt_classes)
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise TypeError(f"gt_classes: expected an integer tensor, got {classes.dtype}")
        if classes.shape != (boxes.shape[0],):
            raise ValueError(f"gt_classes: expected shape [{boxes.shape[0]}] (one per box), got {list(classes.shape)}")
        classes = classes.to(device=device, dtype=torch.int32)

    _, gt_offsets, kept = _drop_or_raise("gt_boxes", boxes.cpu(), counts, canvas, drop_invalid)
    if kept.original_index is not None:
        keep_rows = _kept_rows(boxes.shape[0], counts, kept)
        boxes = boxes[keep_rows.to(device)]
        if classes is not None:
            classes = classes[keep_rows.to(device)]

    if (ignore_boxes is None) != (ignore_counts is None):
        raise ValueError("ignore_boxes and ignore_counts must be given together")
    if ignore_boxes is None:
        ignore = torch.zeros(0, 4, dtype=torch.float32, device=device)
        ignore_offsets = torch.zeros(batch + 1, dtype=torch.int64)
    else:
        ignore = _boxes("ignore_boxes", ignore_boxes, device)
        ign_counts = _counts("ignore_counts", ignore_counts, ignore.shape[0], "ignore_boxes", batch)
        _, ignore_offsets, ign_kept = _drop_or_raise("ignore_boxes", ignore.cpu(), ign_counts, canvas, drop_invalid)
        if ign_kept.original_index is not None:
            ignore = ignore[_kept_rows(ignore.shape[0], ign_counts, ign_kept).to(device)]

    problem = Problem(
        config=config,
        canvas=canvas,
        grid=grid,
        anchors=anchor_boxes,
        gt_boxes=boxes,
        gt_offsets=gt_offsets.to(device),
        gt_classes=classes,
        ignore_boxes=ignore,
        ignore_offsets=ignore_offsets.to(device),
        image_sizes=_image_sizes(image_sizes, batch, canvas, device),
        want_max_iou=want_max_iou,
    )
    return problem, kept


def _kept_rows(total: int, counts: torch.Tensor, kept: Kept) -> torch.Tensor:
    bad = torch.zeros(total, dtype=torch.bool)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    for image, rows in enumerate(kept.dropped):
        bad[offsets[image] + rows] = True
    return torch.nonzero(~bad).flatten()
