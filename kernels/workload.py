"""Synthetic COCO-like ground truth, for the demo, the benchmarks and load tests.

DESIGN §9's workload: boxes per image with a mean of about 7 and a long tail to 100
(COCO train2017 averages 7.3), aspect ratios around 1, on an 800 x 1344 canvas, box
scale spread over small / medium / large about as in COCO. COCO's classes (area below
32², below 96², above: 41% / 34% / 24%) are counted on its ~640 x 480 originals; the
canvas holds them resized x ~1.67 (to an 800-pixel short side), where the same classes
end at sides of ~53 and ~160 pixels. Measured over 20,000 images: 43% / 25% / 32% of
boxes in those classes (31% / 25% / 43% against 32 and 96 canvas pixels). Deterministic
for a seed.
"""

from __future__ import annotations

import math

import torch

from .anchors import fixed_canvas
from .config import TargetConfig

__all__ = ["COCO_CANVAS", "YOLO_CANVAS", "default_canvas", "coco_like_counts", "coco_like_boxes", "coco_like_batch"]

COCO_CANVAS = (800, 1344)
YOLO_CANVAS = (640, 640)  # YOLOv5 trains, and fits its anchors (autoanchor), on 640 x 640 letterboxes


def default_canvas(config: TargetConfig) -> tuple[int, int]:
    """The canvas a model with ``config`` trains on unless told otherwise: that of its
    fixed feature maps (SSD300: 300 x 300, d2l: 256 x 256), YOLOv5's 640 x 640, or COCO's
    800 x 1344 (the FPN detectors' shortest side 800, longest 1333, padded to 32)."""
    if all(level.feature_size is not None for level in config.anchors.levels):
        return fixed_canvas(config.anchors)
    return YOLO_CANVAS if config.anchors.layout == "yolo" else COCO_CANVAS


_MAX_BOXES = 100


def coco_like_counts(batch: int, generator: torch.Generator) -> list[int]:
    """Boxes per image: log-normal, mean ~7, capped at 100, zero now and then."""
    normal = torch.randn(batch, generator=generator, dtype=torch.float64, device="cpu")
    counts = torch.exp(1.55 + 0.95 * normal).floor().clamp(max=_MAX_BOXES)
    return [int(c) for c in counts]


def _fitted(sides: torch.Tensor, extent: int) -> torch.Tensor:
    """Box sides of at least 2 and at most ``extent - 1`` pixels, room left to place them; on
    a canvas of 1 or 2 pixels, half of it (clamped to 2 .. 0 there, the boxes had no area)."""
    most = extent - 1.0 if extent > 2 else extent / 2.0
    return sides.clamp(min=min(2.0, most), max=most)


def coco_like_boxes(count: int, canvas: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Tensor[count, 4] float32 valid xyxy boxes inside the canvas."""
    height, width = canvas
    # sqrt(area) log-uniform over [8, 640] canvas pixels: the module docstring's size mix.
    side = torch.exp(
        math.log(8.0)
        + torch.rand(count, generator=generator, dtype=torch.float32, device="cpu") * math.log(640.0 / 8.0)
    )
    ratio = torch.exp(0.5 * torch.randn(count, generator=generator, dtype=torch.float32, device="cpu"))  # h / w
    w = _fitted(side / ratio.sqrt(), width)
    h = _fitted(side * ratio.sqrt(), height)
    x1 = torch.rand(count, generator=generator, dtype=torch.float32, device="cpu") * (width - w)
    y1 = torch.rand(count, generator=generator, dtype=torch.float32, device="cpu") * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).to(torch.float32)


def coco_like_batch(
    batch: int, seed: int = 0, canvas: tuple[int, int] = COCO_CANVAS, boxes_per_image: int | None = None
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(gt_boxes [N, 4], gt_counts [B], gt_classes [N] int32 in 1..80).

    ``boxes_per_image`` fixes G for every image (the crowded cases G = 200, 1000).
    """
    generator = torch.Generator().manual_seed(seed)
    counts = [boxes_per_image] * batch if boxes_per_image is not None else coco_like_counts(batch, generator)
    boxes = (
        torch.cat([coco_like_boxes(c, canvas, generator) for c in counts])
        if batch
        else torch.zeros(0, 4, dtype=torch.float32, device="cpu")
    )
    classes = torch.randint(1, 81, (boxes.shape[0],), generator=generator, dtype=torch.int32, device="cpu")
    return boxes, counts, classes
