"""A detection dataset's boxes in the model's pixels: COCO annotation JSON or tensors.

Anchor statistics only mean something in the pixels the anchors live in, so boxes are
resized the way the model's input transform resizes images (``Resize``): shortest side
to ``min_size`` capped by ``max_size`` (torchvision ``GeneralizedRCNNTransform``, whose
resized size is floored; detectron2 ``ResizeShortestEdge`` and mmdet ``keep_ratio`` round
it half up instead: a pixel more on some sides, ~0.2% at 416 px), stretched to a
fixed canvas (SSD), letterboxed into one (YOLO, top-left as the others pad), or left as
they are.
Each image's canvas is its resized size padded up to ``size_divisible`` (the batch
padding of the FPN frameworks) or the fixed canvas.

COCO conventions: ``bbox`` is ``[x, y, width, height]`` in image pixels; ``iscrowd: 1``
annotations become ignore regions; boxes are clipped to the image and dropped when
empty after clipping (torchvision's ``ConvertCocoPolysToMask`` does the same), and the
number dropped is kept in ``BoxDataset.skipped``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BoxDataset", "Resize", "from_tensors", "load_coco", "read_json"]

_RESIZE_MODES = ("min_max", "fixed", "letterbox", "none")


@dataclass(frozen=True)
class Resize:
    """How the model's transform maps an image of (height, width) to its input.

    mode: ``min_max`` (shortest side to ``min_size``, longest at most ``max_size``),
        ``fixed`` (stretch to ``canvas``), ``letterbox`` (keep the aspect ratio, fit
        inside ``canvas``, sides rounded up as YOLOv5 loads images, image at the top-left),
        ``none``.
    size_divisible: ``min_max`` and ``none`` pad each image's canvas up to a multiple
        of it (32 in torchvision, detectron2 and mmdet FPN models).
    """

    mode: str = "min_max"
    min_size: int = 800
    max_size: int = 1333
    canvas: tuple[int, int] | None = None
    size_divisible: int = 32

    def __post_init__(self) -> None:
        if self.mode not in _RESIZE_MODES:
            raise ValueError(f"Resize.mode: must be one of {', '.join(_RESIZE_MODES)}; got {self.mode!r}")
        if self.mode in ("fixed", "letterbox"):
            sides = () if self.canvas is None else tuple(self.canvas)
            whole = all(isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in sides)
            if len(sides) != 2 or not whole or min(sides) <= 0:  # 0.5 was cut to 0
                raise ValueError(f"Resize.canvas: the {self.mode} mode needs a (height, width) of positive integers, "
                                 f"got {self.canvas!r}")  # fmt: skip
            object.__setattr__(self, "canvas", (int(sides[0]), int(sides[1])))
        for name in ("min_size", "max_size", "size_divisible"):  # pixels: 0.5 made float canvases
            require_integer(f"Resize.{name}", getattr(self, name))
        if self.mode == "min_max" and not 0 < self.min_size <= self.max_size:
            raise ValueError(f"Resize: need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.size_divisible <= 0:
            raise ValueError(f"Resize.size_divisible: must be positive, got {self.size_divisible}")

    def apply(self, height: int, width: int) -> tuple[float, float, tuple[int, int], tuple[int, int]]:
        """(scale_y, scale_x, resized (h, w), canvas (h, w)) for one image of (height, width)."""
        if self.mode == "fixed":
            canvas = self.canvas
            return canvas[0] / height, canvas[1] / width, canvas, canvas
        if self.mode == "letterbox":
            canvas = self.canvas
            scale = min(canvas[0] / height, canvas[1] / width)
            # Rounded up, as YOLOv5's and ultralytics' load_image resize (math.ceil; capped at
            # the canvas, as ultralytics caps it: the long side's product may land a hair over).
            size = (min(canvas[0], math.ceil(height * scale)), min(canvas[1], math.ceil(width * scale)))
            return size[0] / height, size[1] / width, size, canvas
        if self.mode == "min_max":
            scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
            # torchvision interpolates with recompute_scale_factor=True: floor of the scaled size.
            size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
        else:
            size = (height, width)
        d = self.size_divisible
        canvas = (-(-size[0] // d) * d, -(-size[1] // d) * d)
        return size[0] / height, size[1] / width, size, canvas


@dataclass
class BoxDataset:
    """Ground truth of B images in model pixels, ragged like ``assign``'s inputs.

    image_ids (Tensor[B] int64): dataset image id of each image.
    image_sizes (Tensor[B, 2] int64): resized (height, width), the valid area.
    canvases (Tensor[B, 2] int64): padded canvas (height, width) each image is matched on.
    boxes (Tensor[N, 4] float32): xyxy boxes, image after image; box_counts (Tensor[B] int64).
    annotation_ids (Tensor[N] int64): the COCO annotation id of each box, -1 when unknown.
    ignore_boxes (Tensor[M, 4] float32), ignore_counts (Tensor[B] int64): crowd regions.
    skipped: annotations dropped while loading (empty after clipping to the image).
    """

    image_ids: torch.Tensor
    image_sizes: torch.Tensor
    canvases: torch.Tensor
    boxes: torch.Tensor
    box_counts: torch.Tensor
    annotation_ids: torch.Tensor
    ignore_boxes: torch.Tensor
    ignore_counts: torch.Tensor
    skipped: int = 0

    @property
    def num_images(self) -> int:
        return self.image_ids.numel()

    @property
    def num_boxes(self) -> int:
        return self.boxes.shape[0]

    @property
    def box_offsets(self) -> torch.Tensor:
        """Tensor[B + 1] int64: image i owns boxes ``box_offsets[i]:box_offsets[i + 1]``."""
        return torch.cat([self.box_counts.new_zeros(1), self.box_counts.cumsum(0)])

    @property
    def ignore_offsets(self) -> torch.Tensor:
        """Tensor[B + 1] int64, likewise for the ignore boxes."""
        return torch.cat([self.ignore_counts.new_zeros(1), self.ignore_counts.cumsum(0)])

    @property
    def box_image(self) -> torch.Tensor:
        """Tensor[N] int64: the image (row of this dataset) of every box."""
        return torch.repeat_interleave(torch.arange(self.num_images), self.box_counts)

    def subset(self, images: torch.Tensor) -> BoxDataset:
        """The images at the given rows (Tensor[K] int64), in that order."""
        images = images.long()
        return BoxDataset(
            image_ids=self.image_ids[images],
            image_sizes=self.image_sizes[images],
            canvases=self.canvases[images],
            boxes=self.boxes[ragged_rows(self.box_offsets, images)],
            box_counts=self.box_counts[images],
            annotation_ids=self.annotation_ids[ragged_rows(self.box_offsets, images)],
            ignore_boxes=self.ignore_boxes[ragged_rows(self.ignore_offsets, images)],
            ignore_counts=self.ignore_counts[images],
            skipped=self.skipped,
        )

    def row_of(self, image_id: int) -> int:
        """The row of a dataset image id; ``KeyError`` when absent."""
        hits = torch.nonzero(self.image_ids == image_id).flatten()
        if hits.numel() == 0:
            raise KeyError(f"image id {image_id} is not in the dataset ({self.num_images} images)")
        return int(hits[0])


def ragged_rows(offsets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Rows owned by the given images of a CSR list, image after image.

    offsets (Tensor[B + 1] int64), images (Tensor[K] int64) -> Tensor[sum of counts] int64.
    """
    starts = offsets[images]
    counts = offsets[images + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    first_out = torch.cumsum(counts, 0) - counts  # where each image's rows start in the output
    return torch.arange(total) + torch.repeat_interleave(starts - first_out, counts, output_size=total)


def from_tensors(
    boxes: Sequence[torch.Tensor],
    image_sizes: Sequence[Sequence[int]],
    *,
    ignore_boxes: Sequence[torch.Tensor] | None = None,
    image_ids: Sequence[int] | None = None,
    resize: Resize | None = None,
) -> BoxDataset:
    """A dataset from per-image tensors.

    boxes: B tensors [G_i, 4], xyxy pixels of the original image (G_i may be 0).
    image_sizes: B original (height, width).
    ignore_boxes: B tensors [M_i, 4] of crowd regions, optional.
    image_ids: B ids (default 0..B-1). resize: default ``Resize(mode="none")``.
    Boxes are clipped to their image; boxes empty after clipping are dropped and counted
    in ``skipped``.
    """
    count = len(boxes)
    if len(image_sizes) != count:
        raise ValueError(f"image_sizes: expected {count} (height, width) pairs, one per image, got {len(image_sizes)}")
    if ignore_boxes is not None and len(ignore_boxes) != count:
        raise ValueError(f"ignore_boxes: expected {count} tensors, one per image, got {len(ignore_boxes)}")
    ids = list(range(count)) if image_ids is None else [_image_id(n, i) for n, i in enumerate(image_ids)]
    if len(ids) != count:
        raise ValueError(f"image_ids: expected {count} ids, got {len(ids)}")
    if len(set(ids)) != count:  # ``row_of`` and the missing-box report look images up by id
        raise ValueError(f"image_ids: duplicate id {next(i for n, i in enumerate(ids) if i in ids[:n])}")
    gt, gt_rows = _flatten([_as_boxes(f"boxes[{i}]", b) for i, b in enumerate(boxes)])
    crowd, crowd_rows = _flatten(
        [] if ignore_boxes is None else [_as_boxes(f"ignore_boxes[{i}]", b) for i, b in enumerate(ignore_boxes)]
    )
    sizes = []
    for i, size in enumerate(image_sizes):
        if any(isinstance(side, (bool, np.bool_)) for side in size):  # True would read as 1 pixel
            raise ValueError(f"image_sizes[{i}]: expected (height, width) in whole pixels, got {tuple(size)!r}")
        sides = [float(side) for side in size]  # ints, whole floats, one-element tensors
        if len(sides) != 2 or not all(side.is_integer() for side in sides):  # 99.9 was cut to 99
            raise ValueError(f"image_sizes[{i}]: expected (height, width) in whole pixels, got {tuple(size)!r}")
        sizes.append((int(sides[0]), int(sides[1])))
    resize = resize if resize is not None else Resize(mode="none")
    unknown_ids = torch.full((gt.shape[0],), -1, dtype=torch.int64)
    return _build(ids, sizes, resize, gt, gt_rows, unknown_ids, crowd, crowd_rows)


def require_integer(name: str, value: object) -> None:
    """Refuse, naming it, a count or a size in pixels that is not an integer (a float was
    taken and failed later, in a slice or a split, without the argument's name)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got {value!r}")


def _image_id(n: int, value: object) -> int:
    """An integer id (7.9 was cut to 7): a Python or numpy int, or a one-element integer tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"image_ids[{n}]: expected an integer, got {value!r}")
    return int(value)


def _flatten(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [G_i, 4] tensors -> (Tensor[sum G_i, 4], Tensor[sum G_i] int64 image of each)."""
    if not parts:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
    return torch.cat(parts), torch.repeat_interleave(torch.arange(len(parts)), counts)


def _as_boxes(name: str, value: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.numel() == 0:
        return torch.zeros(0, 4)
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        raise ValueError(f"{name}: expected a [G, 4] tensor of xyxy boxes, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():  # as given: float64 past float32's range is finite, and clipped as in JSON
        raise ValueError(f"{name}: boxes must be finite")
    return tensor.to(torch.float64).clamp(-_FLOAT32_MAX, _FLOAT32_MAX).to(torch.float32)


# Sides beyond any canvas: anchors are counted in int64, and no canvas of 2**31 px fits in memory.
_MAX_SIDE = 2**31 - 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _build(
    image_ids: list[int],
    sizes: list[tuple[int, int]],
    resize: Resize,
    boxes: torch.Tensor,
    box_rows: torch.Tensor,
    annotation_ids: torch.Tensor,
    crowd: torch.Tensor,
    crowd_rows: torch.Tensor,
) -> BoxDataset:
    """Clip every box to its image, drop the empty ones, resize, group image after image.

    boxes (Tensor[N, 4]) with box_rows (Tensor[N] int64, image of each box, any order) and
    annotation_ids (Tensor[N]); crowd (Tensor[M, 4]) with crowd_rows (Tensor[M]).
    """
    for (height, width), image_id in zip(sizes, image_ids):
        if height <= 0 or width <= 0:
            raise ValueError(f"image {image_id}: size must be positive, got height {height}, width {width}")
    count = len(image_ids)
    applied = [resize.apply(h, w) for h, w in sizes]
    for (_, _, size, canvas), image_id in zip(applied, image_ids):
        if max(*size, *canvas) > _MAX_SIDE:  # torch's int64 overflowed with an error naming nothing
            raise ValueError(f"image {image_id}: resized to {size}, on a canvas of {canvas}: a side is over "
                             f"{_MAX_SIDE:,} px (the resize's sizes?)")  # fmt: skip
    original = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2)  # [B, 2] (h, w)
    scale = torch.tensor([(sx, sy, sx, sy) for sy, sx, _, _ in applied], dtype=torch.float64).reshape(-1, 4)
    skipped = 0

    def clip_resize(rects: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal skipped
        limit = original[rows].flip(1).repeat(1, 2)  # [n, 4] (w, h, w, h)
        clipped = torch.minimum(rects.clamp(min=0), limit)
        resized = (clipped.to(torch.float64) * scale[rows]).to(torch.float32)
        # Empty after the resize too: a sliver the float32 cast closes is no box the matcher takes.
        keep = (resized[:, 2] > resized[:, 0]) & (resized[:, 3] > resized[:, 1])
        skipped += int((~keep).sum())
        kept_rows = rows[keep]
        order = torch.sort(kept_rows, stable=True).indices  # image after image, file order within
        return resized[keep][order], torch.nonzero(keep).flatten()[order]

    gt, gt_index = clip_resize(boxes, box_rows)
    ignore, ignore_index = clip_resize(crowd, crowd_rows)
    return BoxDataset(
        image_ids=torch.tensor(image_ids, dtype=torch.int64),
        image_sizes=torch.tensor([size for _, _, size, _ in applied], dtype=torch.int64).reshape(-1, 2),
        canvases=torch.tensor([canvas for _, _, _, canvas in applied], dtype=torch.int64).reshape(-1, 2),
        boxes=gt,
        box_counts=torch.bincount(box_rows[gt_index], minlength=count),
        annotation_ids=annotation_ids[gt_index].to(torch.int64),
        ignore_boxes=ignore,
        ignore_counts=torch.bincount(crowd_rows[ignore_index], minlength=count),
        skipped=skipped,
    )


def _is_int64(value: object) -> bool:
    """An integer as JSON writes one (not a bool, a float or a string) that fits int64."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _in_int64(value: object) -> str:
    """What to add to "must be an integer" for ``value``: that it must fit int64, where it
    is an integer that does not."""
    return " in the int64 range" if isinstance(value, int) and not isinstance(value, bool) else ""


def _shown(value: object) -> str:
    """``repr(value)`` for an error, cut at 200 characters: a bbox of a million numbers
    made a one-line error of 8 MB. Worded as the service's cut messages (``service/status.py``)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text) - 200:,} more characters)"


def _is_finite_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits: no float holds it
        return False


def read_json(path: str):
    """The JSON document in the file ``path``, a byte-order mark skipped. A read that fails
    once the file is open (EIO) names the file, as the open's own errors do."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except OSError as exc:
        exc.filename = exc.filename or path
        raise


def load_coco(path: str | os.PathLike, resize: Resize | None = None) -> BoxDataset:
    """A COCO-format annotation file (``instances_*.json``) as a ``BoxDataset``.

    Every image in ``images`` is kept, with or without annotations, in file order.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file
    and the offending entry for anything that is not COCO detection JSON.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"annotations file: {path} is a folder; give the COCO JSON file")
    if not os.path.exists(path):  # a pipe (<(zcat instances.json.gz)) or /dev/stdin is read as a file
        raise FileNotFoundError(f"annotations file not found: {path}")
    try:
        data = read_json(path)
    except (ValueError, RecursionError) as exc:  # decoding, nesting too deep, an integer of thousands of digits
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not COCO annotation JSON (needs an 'images' list)")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    order, ids, sizes = {}, [], []
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise ValueError(f"{path}: images[{n}] needs integer 'id', 'height' and 'width', got {_shown(image)}")
        for key in ("id", "height", "width"):
            if not _is_int64(image.get(key)):
                got = _shown(image[key]) if key in image else "nothing"
                raise ValueError(f"{path}: images[{n}]: {key!r} must be an integer{_in_int64(image.get(key))}, "
                                 f"got {got}")  # fmt: skip
        image_id, height, width = image["id"], image["height"], image["width"]
        if height <= 0 or width <= 0:
            raise ValueError(f"{path}: images[{n}]: size must be positive, got height {height}, width {width}")
        if max(height, width) > _MAX_SIDE:
            raise ValueError(f"{path}: images[{n}]: height {height}, width {width}: a side is over {_MAX_SIDE:,} px")
        if image_id in order:
            raise ValueError(f"{path}: images[{n}]: duplicate image id {image_id}")
        order[image_id] = n
        ids.append(image_id)
        sizes.append((height, width))
    flat = ([], [], []), ([], [], [])  # (xyxy, image row, annotation id) for boxes, then crowd
    for n, ann in enumerate(annotations):
        where = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
            raise ValueError(f"{where}: needs 'image_id' and 'bbox'")
        if not _is_int64(ann["image_id"]):
            image_id = ann["image_id"]
            raise ValueError(f"{where}: image_id must be an integer{_in_int64(image_id)}, got {_shown(image_id)}")
        row = order.get(ann["image_id"])
        if row is None:
            raise ValueError(f"{where}: image_id {_shown(ann['image_id'])} is not in 'images'")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {_shown(bbox)}")
        annotation_id = ann.get("id", -1)
        if not _is_int64(annotation_id):
            raise ValueError(f"{where}: id must be an integer{_in_int64(annotation_id)}, got {_shown(annotation_id)}")
        crowd = ann.get("iscrowd", 0)
        if not isinstance(crowd, int) or crowd not in (0, 1):  # JSON false and true pass: bools are ints
            raise ValueError(f"{where}: iscrowd must be 0 or 1, got {_shown(crowd)}")
        x, y, w, h = map(float, bbox)  # JSON integers sum exactly, past what a float holds
        rects, rows, anns = flat[1] if crowd else flat[0]
        rects.append((x, y, x + w, y + h))
        rows.append(row)
        anns.append(annotation_id)
    (boxes, box_rows, ann_ids), (crowd, crowd_rows, _) = flat
    return _build(
        ids, sizes, resize if resize is not None else Resize(),
        torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4).to(torch.float32),
        torch.tensor(box_rows, dtype=torch.int64), torch.tensor(ann_ids, dtype=torch.int64),
        torch.tensor(crowd, dtype=torch.float64).reshape(-1, 4).to(torch.float32),
        torch.tensor(crowd_rows, dtype=torch.int64),
    )  # fmt: skip
