"""Box arithmetic of the reference: IoU, IoF, encode, decode (plain PyTorch).

All boxes are ``(x1, y1, x2, y2)`` float32. The operation order is torchvision's
(``box_iou``, ``BoxCoder.encode_boxes``), because every rounding step decides which
anchor wins a tie; the CPU path and the Triton kernels repeat it exactly.
"""

from __future__ import annotations

import torch

from .config import EncodeConfig

__all__ = ["box_area", "box_iou", "box_iof", "encode", "decode"]


def _upcast(boxes: torch.Tensor) -> torch.Tensor:
    """16-bit float boxes as float32: in float16 the area of a 300 x 300 box is already
    infinite (its IoU with itself 0, its IoF NaN). torchvision upcasts later, after taking
    the corners' differences in 16 bits, so its 16-bit IoUs differ from these (by up to
    ~1e-3 in float16); these are the float32 IoUs of the same boxes. Integer boxes as int64:
    in their own type areas wrapped (uint8 20 x 20: 144, an IoU of 1.39; int32 50,000 x
    50,000: negative), where torchvision's int32 still wraps past 46,340 pixels a side."""
    if boxes.is_floating_point():
        return boxes.float() if boxes.element_size() < 4 else boxes
    return boxes.long()


def plain_xyxy(name: str, boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` as a plain tensor of xyxy rows. torchvision's BoundingBoxes carry their
    format: read as xyxy, XYWH boxes would be wrong targets (or a wrong loss) without an
    error, so another format is refused by name."""
    if type(boxes) is torch.Tensor or getattr(boxes, "format", None) is None:
        return boxes
    form = getattr(boxes.format, "name", boxes.format)
    if form != "XYXY":
        raise ValueError(f"{name}: torchvision BoundingBoxes in format {form}, but boxes are xyxy here: convert "
                         "them (torchvision.ops.box_convert, or v2.ConvertBoundingBoxFormat('XYXY'))")  # fmt: skip
    return boxes.as_subclass(torch.Tensor)


def _checked_boxes(name: str, boxes: object, *, batched: bool = False) -> torch.Tensor:
    """[N, 4] boxes, or [..., 4] where ``batched``, as a plain xyxy tensor."""
    if not isinstance(boxes, torch.Tensor):  # a numpy array or a list: converted by the caller, as assign's are
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(boxes).__name__} (torch.as_tensor converts it)")
    if not (boxes.dim() >= 1 and boxes.shape[-1] == 4 and (batched or boxes.dim() == 2)):
        raise ValueError(f"{name}: expected shape [{'...' if batched else 'N'}, 4] (x1, y1, x2, y2), "
                         f"got {list(boxes.shape)}")  # fmt: skip
    return plain_xyxy(name, boxes)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """boxes (Tensor[..., 4]) -> Tensor[...] (float32 for 16-bit float boxes, int64 for
    integer boxes)."""
    boxes = _upcast(_checked_boxes("boxes", boxes, batched=True))
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [N, M] intersections, and both inputs checked and upcast."""
    boxes1, boxes2 = _upcast(_checked_boxes("boxes1", boxes1)), _upcast(_checked_boxes("boxes2", boxes2))
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    return wh[..., 0] * wh[..., 1], boxes1, boxes2  # [N, M]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): float32 xyxy (16-bit floats are
            converted to float32 first; float64 stays float64).
    Returns:
        Tensor[N, M] of the inputs' dtype (float32 for 16-bit floats and integers):
        ``inter / (area1 + area2 - inter)``, and 0 where the union is 0 (torchvision would
        give NaN there); NaN where a coordinate is NaN, as torchvision gives.
    """
    inter, boxes1, boxes2 = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    # inter * 0: 0, or NaN where a NaN coordinate made the intersection NaN (bad data stays visible)
    return torch.where(union > 0, inter / union, inter * 0)


def box_iof(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over the area of ``boxes1`` ("foreground"), mmdet's ``mode='iof'``.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): float32 xyxy.
    Returns:
        Tensor[N, M], 0 where ``boxes1`` has no area; NaN where a coordinate is NaN.
    """
    inter, boxes1, _ = _intersection(boxes1, boxes2)
    area = box_area(boxes1)[:, None].expand_as(inter)
    return torch.where(area > 0, inter / area, inter * 0)  # inter * 0: as in box_iou


def _checked_rows(
    name: str, rows: torch.Tensor, anchors: torch.Tensor, config: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of ``rows`` goes with anchor i: both [N, 4] (a batched [B, A, 4] would broadcast
    against the anchors into wrong values, not fail); as plain xyxy tensors, upcast."""
    if not isinstance(config, EncodeConfig):
        raise TypeError(f"config: expected EncodeConfig (config.encode), got {type(config).__name__}")
    for label, tensor in ((name, rows), ("anchors", anchors)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != 4:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{label}: expected shape [N, 4] (one row per anchor; flatten a batch), got {shape}")
    if rows.shape[0] != anchors.shape[0]:
        raise ValueError(f"{name} and anchors: {rows.shape[0]} rows against {anchors.shape[0]}")
    return _upcast(plain_xyxy(name, rows)), _upcast(plain_xyxy("anchors", anchors))


def _centers(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centre x, centre y, width and height of xyxy rows, in the peers' order of operations
    (x1 + 0.5 * w: the deltas are exact with theirs)."""
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * width, boxes[:, 1] + 0.5 * height, width, height


def encode(boxes: torch.Tensor, anchors: torch.Tensor, config: EncodeConfig) -> torch.Tensor:
    """Offsets of matched boxes w.r.t. their anchors.

    Args:
        boxes (Tensor[N, 4]), anchors (Tensor[N, 4]): float32 xyxy, row i with row i
            (16-bit floats are computed in float32, as mmdet's ``bbox2delta`` does).
            Rows are not checked: a degenerate or non-finite box gives infinite or NaN
            deltas, as the peers' coders do (``assign`` checks its boxes before encoding).
    Returns:
        Tensor[N, 4] ``(dx, dy, dw, dh)``, float32 (float64 for float64 inputs); see
        ``EncodeConfig``.
    """
    boxes, anchors = _checked_rows("boxes", boxes, anchors, config)
    wx, wy, ww, wh = config.weights
    acx, acy, aw, ah = _centers(anchors)
    gcx, gcy, gw, gh = _centers(boxes)
    deltas = torch.stack(
        [wx * (gcx - acx) / aw, wy * (gcy - acy) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=1
    )
    means = torch.tensor(config.means, dtype=deltas.dtype, device=deltas.device)
    stds = torch.tensor(config.stds, dtype=deltas.dtype, device=deltas.device)
    return (deltas - means) / stds


def decode(deltas: torch.Tensor, anchors: torch.Tensor, config: EncodeConfig) -> torch.Tensor:
    """The inverse of ``encode``: ``decode(encode(b, a), a) == b`` up to rounding.

    Args:
        deltas (Tensor[N, 4]), anchors (Tensor[N, 4]) float32 (16-bit floats are computed
            in float32).
    Returns:
        Tensor[N, 4] xyxy boxes, float32 (float64 for float64 inputs). dw/dh are clamped
        to ``config.scale_clamp`` (and to ``-config.scale_clamp`` with
        ``config.symmetric_clamp``).
    """
    deltas, anchors = _checked_rows("deltas", deltas, anchors, config)
    if not deltas.is_floating_point():  # the stds would become integers (0.1 -> 0)
        raise TypeError(f"deltas: expected floats, got {deltas.dtype}")
    means = torch.tensor(config.means, dtype=deltas.dtype, device=deltas.device)
    stds = torch.tensor(config.stds, dtype=deltas.dtype, device=deltas.device)
    d = deltas * stds + means
    wx, wy, ww, wh = config.weights
    acx, acy, aw, ah = _centers(anchors)
    least = -config.scale_clamp if config.symmetric_clamp else None
    dw = (d[:, 2] / ww).clamp(min=least, max=config.scale_clamp)
    dh = (d[:, 3] / wh).clamp(min=least, max=config.scale_clamp)
    cx = d[:, 0] / wx * aw + acx
    cy = d[:, 1] / wy * ah + acy
    w = torch.exp(dw) * aw
    h = torch.exp(dh) * ah
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)
