"""Synthetic COCO-format annotations, for examples, tests and the scan benchmark.

``coco_like`` draws boxes from ``tritarget.kernels.workload`` (DESIGN §9's COCO-like
distribution: ~7 boxes per image, COCO's small / medium / large mix, aspect ratios
around 1). ``skewed`` draws what default anchors serve badly: boxes of aspect 1:4 and
4:1 and tiny boxes. Both are deterministic for a seed and return a JSON-compatible dict.
"""

from __future__ import annotations

import math

import torch

from tritarget.kernels.workload import coco_like_boxes, coco_like_counts

__all__ = ["coco_like", "skewed"]


def _document(sizes: list[tuple[int, int]], boxes: list[torch.Tensor], crowd: list[bool]) -> dict:
    """COCO JSON from per-image xyxy boxes; crowd[k] marks the k-th box overall as iscrowd."""
    images = [{"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
    annotations, k = [], 0
    for i, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": k + 1, "image_id": i + 1, "category_id": 1, "bbox": [x1, y1, w, h],
                "area": w * h, "iscrowd": int(crowd[k]),
            })  # fmt: skip
            k += 1
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def coco_like(
    num_images: int, seed: int = 0, image_size: tuple[int, int] = (480, 640), crowd_rate: float = 0.01
) -> dict:
    """COCO-like annotations on images of ``image_size`` (height, width) (COCO's commonest).

    About ``crowd_rate`` of the boxes are marked iscrowd (COCO: ~1%).
    """
    generator = torch.Generator().manual_seed(seed)
    counts = coco_like_counts(num_images, generator)
    # The workload's sizes are model pixels after the 800/1333 resize: draw on the image as
    # that resize makes it, then scale back by the same factor on both axes (which keeps
    # the drawn aspect ratios).
    height, width = image_size
    scale = min(800 / min(height, width), 1333 / max(height, width))
    resized = (math.floor(height * scale), math.floor(width * scale))
    boxes = [coco_like_boxes(c, resized, generator) / scale for c in counts]
    crowd = (torch.rand(sum(counts), generator=generator) < crowd_rate).tolist()
    return _document([image_size] * num_images, boxes, crowd)


def skewed(num_images: int, seed: int = 0, image_size: tuple[int, int] = (256, 256), boxes_per_image: int = 6) -> dict:
    """Boxes default anchors miss: a third tall (h/w = 4), a third wide (w/h = 4), a third
    tiny squares; sizes in pixels of ``image_size``, jittered by up to ±10% in aspect.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    all_boxes = []
    for _ in range(num_images):
        kind = torch.randint(0, 3, (boxes_per_image,), generator=generator)
        side = torch.exp(math.log(32) + torch.rand(boxes_per_image, generator=generator) * math.log(64 / 32))
        aspect = 4.0 * torch.exp((torch.rand(boxes_per_image, generator=generator) - 0.5) * 0.2)
        # sqrt(area) = side; tall: h/w = aspect, wide: w/h = aspect; tiny: 16-24 px squares.
        w = torch.where(kind == 0, side / aspect.sqrt(), side * aspect.sqrt())
        h = torch.where(kind == 0, side * aspect.sqrt(), side / aspect.sqrt())
        tiny = 16 + 8 * torch.rand(boxes_per_image, generator=generator)
        w = torch.where(kind == 2, tiny, w).clamp(max=width - 1)
        h = torch.where(kind == 2, tiny, h).clamp(max=height - 1)
        x1 = torch.rand(boxes_per_image, generator=generator) * (width - w)
        y1 = torch.rand(boxes_per_image, generator=generator) * (height - h)
        all_boxes.append(torch.stack([x1, y1, x1 + w, y1 + h], dim=1))
    return _document([image_size] * num_images, all_boxes, [False] * num_images * boxes_per_image)
