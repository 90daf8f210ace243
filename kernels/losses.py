"""Detection losses straight from ``SparseTargets``, without dense targets.

A dense target tensor for RetinaNet is [B, A, C] (a one-hot class per anchor); the
sparse form lists only positives and ignored anchors. Each loss here is computed
element-wise over the network's outputs as if every anchor were negative, then the
listed anchors are patched in place: ignored anchors are zeroed (their outputs replaced
by 0 before, so that no gradient reaches them, as none does in torchvision's, which
index the anchors they count), positives get their positive-target value at their
class. The box losses read only the positives' rows.

What they equal (tested against torchvision itself):

* ``retinanet_loss`` == torchvision ``RetinaNetHead.compute_loss``: sigmoid focal loss
  over every anchor that is not ignored, and an L1 / smooth-L1 / GIoU / DIoU / CIoU box loss
  over the positives, each summed per image, divided by ``max(1, positives of the image)`` and
  averaged over images (``normalize="per_image"``). ``normalize="positives"`` divides the
  batch sums by the sum over images of ``max(1, positives of the image)`` instead
  (mmdet's ``avg_factor`` with the ``PseudoSampler`` of its RetinaNet: its
  ``SamplingResult`` counts at least one positive per image; with a ``RandomSampler``,
  as its RPN's, mmdet divides by at least one positive and one negative per image: not
  this), ``"sum"`` divides by nothing.
* ``ssd_loss`` == torchvision ``SSD.compute_loss``: softmax cross-entropy over the
  positives and each image's hardest negatives (``neg_to_pos_ratio`` per positive, by
  their own loss), smooth-L1 over the positives, both divided by ``max(1, positives of
  the batch)``.
* ``rpn_loss`` == torchvision ``RegionProposalNetwork.compute_loss`` when the sampled
  anchors are the non-ignored ones (sample with ``MatchConfig.sample_size``: anchors not
  drawn are ignored): binary cross-entropy averaged over them, smooth-L1 (beta 1/9) summed
  over the positives and divided by the number of sampled anchors, as torchvision does.

Sums run in a different order than torchvision's (per image over all anchors rather
than over the selected rows), so results agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .boxes import decode
from .config import EncodeConfig
from .problem import checked_counts, checked_real, plain_xyxy
from .targets import SparseTargets, offsets_problem

__all__ = [
    "NORMALIZATIONS",
    "BOX_LOSSES",
    "sigmoid_focal_loss",
    "box_regression_loss",
    "retinanet_loss",
    "rpn_loss",
    "ssd_loss",
]

NORMALIZATIONS = ("per_image", "positives", "sum")
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")
_DECODED = ("giou", "diou", "ciou")  # box losses of the decoded prediction against its matched box


def _check_sparse(targets: object) -> SparseTargets:
    """The targets' types and shapes, and their offsets where they are on the host (a GPU's
    are not read: no wait for it). The rest of the lists' values are as ``assign_sparse``
    made them; lists built or edited by hand: ``targets.check()``."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(
            f"targets: expected SparseTargets (assign_sparse, or Targets.to_sparse()), got {type(targets).__name__}"
        )
    try:
        targets.check_shapes()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"targets: {exc}") from None
    if targets.batch_size == 0:  # as assign refuses it; every per-image mean would be NaN
        raise ValueError("targets: the batch is empty (need at least one image)")
    for which in ("positive", "ignored"):
        offsets = getattr(targets, f"{which}_offsets")
        if offsets.device.type == "cpu":  # decreasing offsets would make _rows write out of bounds
            problem = offsets_problem(which, offsets.tolist(), getattr(targets, f"{which}_anchors").shape[0])
            if problem is not None:
                raise ValueError(f"targets: {problem}")
    return targets


def _kind(value: object) -> str:
    """What an input is, for an error: a tensor's dtype, else its type."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_outputs(name: str, outputs: object, targets: SparseTargets, trailing: int | None) -> torch.Tensor:
    """A network output of shape [B, A] (trailing None) or [B, A, trailing] (-1: any)."""
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {_kind(outputs)}")
    batch, anchors = targets.batch_size, targets.num_anchors
    ok = outputs.dim() == (2 if trailing is None else 3) and tuple(outputs.shape[:2]) == (batch, anchors)
    if ok and trailing is not None and trailing > 0:
        ok = outputs.shape[2] == trailing
    if not ok:
        want = f"[{batch}, {anchors}" + ("" if trailing is None else ", C" if trailing < 0 else f", {trailing}") + "]"
        raise ValueError(f"{name}: expected shape {want} (images, anchors of the targets), got {list(outputs.shape)}")
    return outputs


def _rows(offsets: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Image index (int64) of each row of a CSR list."""
    counts = offsets.diff().to(device)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=total)


def _ignored(targets: SparseTargets, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, anchor) int64 indices of the ignored anchors."""
    return (_rows(targets.ignored_offsets, targets.ignored_anchors.numel(), device),
            targets.ignored_anchors.to(device).long())  # fmt: skip


def _unread(outputs: torch.Tensor, ignored: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``outputs`` with the ignored anchors' rows replaced by 0, out of place.

    torchvision's losses index the anchors they count, so an ignored anchor's output
    reaches neither the loss nor the gradient. Ours run element-wise over every anchor
    and zero the ignored anchors' losses after: the loss's value is right, but its
    gradient there is 0 times the element-wise loss's derivative, NaN for a NaN or
    infinite output (a diverging or float16-overflowing head). Replaced before the loss,
    the rows get an exact 0 gradient, as torchvision's do."""
    return outputs.index_put(ignored, outputs.new_zeros(()))


def _normalized(per_image: torch.Tensor, positives: torch.Tensor, normalize: str) -> torch.Tensor:
    """Per-image sums [B] -> the loss under a normalization (see the module docstring), in
    the sums' dtype. Divided in at least float32: a count past 65,504 is inf in float16 (a
    batch of 32 COCO images at ~2,100 positives each), which made a float16 loss 0, and
    the images' sums are added without overflowing where each fits."""
    dtype = torch.promote_types(per_image.dtype, torch.float32)
    counts = positives.clamp(min=1).to(dtype)
    if normalize == "per_image":
        return (per_image.to(dtype) / counts).mean().to(per_image.dtype)
    if normalize == "positives":
        return (per_image.to(dtype).sum() / counts.sum()).to(per_image.dtype)
    if normalize == "sum":
        return per_image.to(dtype).sum().to(per_image.dtype)
    raise ValueError(f"normalize: must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")


def _focal(logits: torch.Tensor, target: float, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss against a constant target 0 or 1 (torchvision
    ``ops.sigmoid_focal_loss``'s formula, operation for operation)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, logits.new_full((), target).expand_as(logits), reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


def sigmoid_focal_loss(
    cls_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    normalize: str = "per_image",
) -> torch.Tensor:
    """Sigmoid focal loss of class logits over every anchor that is not ignored.

    Args:
        cls_logits (Tensor[B, A, C] float): class scores, anchors in the targets' order.
        targets: with ``positive_classes`` (``assign_sparse(..., gt_classes=...)``), each
            in [0, C): the positive's one-hot target; all other targets are 0.
        alpha, gamma: torchvision's (``alpha < 0``: no weighting).
        normalize: ``per_image`` | ``positives`` | ``sum`` (module docstring).
    Returns:
        Tensor[] scalar.
    """
    targets = _check_sparse(targets)
    cls_logits = _check_outputs("cls_logits", cls_logits, targets, -1)
    if targets.positive_classes is None:
        raise ValueError("targets: no classes for the classification loss; pass gt_classes to assign_sparse")
    alpha = checked_real("alpha", alpha, high=1.0, note=" (negative: no weighting)")  # above 1 negatives weigh < 0
    gamma = checked_real("gamma", gamma, low=0.0)
    device = cls_logits.device
    num_classes = cls_logits.shape[2]
    positive_classes = targets.positive_classes.to(device).long()
    if positive_classes.numel() and not bool(((positive_classes >= 0) & (positive_classes < num_classes)).all()):
        raise ValueError(f"targets: a positive's class is outside [0, {num_classes}) (cls_logits has {num_classes})")
    ignored = _ignored(targets, device)
    loss = _focal(_unread(cls_logits, ignored), 0.0, alpha, gamma)  # [B, A, C]: every anchor negative
    loss[ignored] = 0.0
    positive_image = _rows(targets.positive_offsets, positive_classes.numel(), device)
    positive_anchor = targets.positive_anchors.to(device).long()
    loss[positive_image, positive_anchor, positive_classes] = _focal(
        cls_logits[positive_image, positive_anchor, positive_classes], 1.0, alpha, gamma
    )
    return _normalized(loss.sum(dim=(1, 2)), targets.positive_offsets.diff().to(device), normalize)


def box_regression_loss(
    bbox_regression: torch.Tensor,
    targets: SparseTargets,
    *,
    loss: str = "l1",
    beta: float = 1.0,
    normalize: str = "per_image",
    anchors: torch.Tensor | None = None,
    gt_boxes: torch.Tensor | None = None,
    gt_counts: torch.Tensor | list[int] | None = None,
    encode: EncodeConfig | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Box loss over the positives (torchvision ``_box_loss``).

    Args:
        bbox_regression (Tensor[B, A, 4] float): predicted deltas.
        targets: the positives' encoded deltas (and matched boxes, for the IoU losses).
        loss: ``l1`` | ``smooth_l1`` (with ``beta``) against the encoded deltas, or an IoU
            loss of the decoded prediction with the matched box: ``giou`` (1 - generalized
            IoU), ``diou`` (1 - IoU + the centres' squared distance over the enclosing
            box's squared diagonal), ``ciou`` (DIoU + an aspect-ratio term), as
            torchvision's ``*_box_iou_loss``. They need ``anchors`` (Tensor[A, 4]), the
            batch's ``gt_boxes`` (Tensor[N, 4]) and ``gt_counts`` as given to
            ``assign_sparse``, and the config's ``encode``.
        normalize: ``per_image`` | ``positives`` | ``sum`` (module docstring).
    Returns:
        Tensor[] scalar.
    """
    targets = _check_sparse(targets)
    bbox_regression = _check_outputs("bbox_regression", bbox_regression, targets, 4)
    if loss not in BOX_LOSSES:
        raise ValueError(f"loss: must be one of {', '.join(BOX_LOSSES)}; got {loss!r}")
    beta, eps = _finite_at_least_zero("beta", beta), _finite_at_least_zero("eps", eps)
    device = bbox_regression.device
    count = targets.positive_anchors.numel()
    image = _rows(targets.positive_offsets, count, device)
    anchor = targets.positive_anchors.to(device).long()
    # In at least float32, the targets' precision: torchvision's L1 losses promote float16
    # predictions against float32 targets rather than round the targets to float16. (Its
    # IoU losses decode float16 predictions in float16: ours in float32 differ by ~5e-5.)
    predicted = bbox_regression[image, anchor].to(torch.promote_types(bbox_regression.dtype, torch.float32))  # [P, 4]
    if loss in _DECODED:
        decoded, matched = _decoded_inputs(
            loss, predicted, targets, image, anchor, anchors, gt_boxes, gt_counts, encode
        )
        per_row = _iou_loss(loss, decoded, matched, eps)
    else:
        wanted = targets.positive_deltas.to(device=device, dtype=predicted.dtype)
        if loss == "l1":
            per_row = F.l1_loss(predicted, wanted, reduction="none").sum(dim=1)
        else:
            per_row = F.smooth_l1_loss(predicted, wanted, reduction="none", beta=beta).sum(dim=1)
    per_image = per_row.new_zeros(targets.batch_size).index_add(0, image, per_row)
    return _normalized(per_image, targets.positive_offsets.diff().to(device), normalize)


def _decoded_inputs(loss, predicted, targets, image, anchor, anchors, gt_boxes, gt_counts, encode):
    """(decoded predictions [P, 4], matched boxes [P, 4]) for an IoU loss."""
    if anchors is None or gt_boxes is None or gt_counts is None or encode is None:
        raise ValueError(f"loss={loss!r} needs anchors, gt_boxes, gt_counts and encode (the boxes are decoded)")
    if not isinstance(encode, EncodeConfig):
        raise TypeError(f"encode: expected EncodeConfig (config.encode), got {type(encode).__name__}")
    for name, boxes in (("anchors", anchors), ("gt_boxes", gt_boxes)):
        if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point Tensor[N, 4], got {_kind(boxes)}")
    anchors, gt_boxes = plain_xyxy("anchors", anchors), plain_xyxy("gt_boxes", gt_boxes)  # as assign_sparse takes them
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes: expected shape [N, 4], got {list(gt_boxes.shape)}")
    device = predicted.device
    listed = checked_counts("gt_counts", gt_counts, gt_boxes.shape[0], "gt_boxes", None)
    if len(listed) != targets.batch_size:
        raise ValueError(f"gt_counts: has {len(listed)} images, but the targets have {targets.batch_size}")
    counts = torch.tensor(listed, dtype=torch.int64, device=device)
    if anchors.shape != (targets.num_anchors, 4):
        raise ValueError(f"anchors: expected shape [{targets.num_anchors}, 4], got {list(anchors.shape)}")
    matched_gt = targets.positive_matched_gt.to(device).long()
    if bool((matched_gt < 0).any()):  # it would read the previous image's last box
        raise ValueError("targets: a positive's matched box is negative")
    if bool((matched_gt >= counts[image]).any()):  # the same total, counted in another order
        raise ValueError("gt_counts: a positive's matched box is beyond its image's count; "
                         "give the counts the targets were assigned with")  # fmt: skip
    first = torch.cumsum(counts, 0) - counts
    rows = first[image] + matched_gt
    matched = gt_boxes.to(device=device, dtype=predicted.dtype)[rows]
    decoded = decode(predicted, anchors.to(device=device, dtype=predicted.dtype)[anchor], encode)
    return decoded, matched


def _finite_at_least_zero(name: str, value: object) -> float:
    """A smooth-L1 ``beta`` or an IoU loss's ``eps``: torch refused a negative beta as
    its own error (a NaN one too, called negative), and an infinite one gave no box loss."""
    value = checked_real(name, value, low=0.0)
    if math.isinf(value):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return value


def _iou_loss(loss: str, boxes: torch.Tensor, others: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise IoU loss of xyxy boxes, Tensor[P]. GIoU (Rezatofighi et al. 2019): 1 - IoU
    plus the part of the smallest enclosing box that the union does not cover. DIoU (Zheng
    et al. 2020): 1 - IoU plus the centres' squared distance over the enclosing box's
    squared diagonal; CIoU adds the difference of the boxes' aspect angles, weighted by a
    factor that, as in the paper and torchvision, gets no gradient."""
    low = torch.maximum(boxes[:, :2], others[:, :2])
    high = torch.minimum(boxes[:, 2:], others[:, 2:])
    overlaps = (high > low).all(dim=1)
    sides = (high - low).clamp(min=0)
    inter = torch.where(overlaps, sides[:, 0] * sides[:, 1], 0.0)
    size, other_size = boxes[:, 2:] - boxes[:, :2], others[:, 2:] - others[:, :2]
    union = size.prod(dim=1) + other_size.prod(dim=1) - inter
    iou = inter / (union + eps)
    hull = torch.maximum(boxes[:, 2:], others[:, 2:]) - torch.minimum(boxes[:, :2], others[:, :2])
    if loss == "giou":
        hull_area = hull[:, 0] * hull[:, 1]
        return 1 - (iou - (hull_area - union) / (hull_area + eps))
    centre_gap = ((boxes[:, :2] + boxes[:, 2:]) - (others[:, :2] + others[:, 2:])) / 2
    distance = 1 - iou + centre_gap.pow(2).sum(dim=1) / (hull.pow(2).sum(dim=1) + eps)
    if loss == "diou":
        return distance
    angles = torch.atan(other_size[:, 0] / other_size[:, 1]) - torch.atan(size[:, 0] / size[:, 1])
    aspect = (4 / math.pi**2) * angles.pow(2)
    with torch.no_grad():
        weight = aspect / (1 - iou + aspect + eps)
    return distance + weight * aspect


def retinanet_loss(
    head_outputs: dict[str, torch.Tensor],
    targets: SparseTargets,
    *,
    box_loss: str = "l1",
    alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 1.0,
    normalize: str = "per_image",
    anchors: torch.Tensor | None = None,
    gt_boxes: torch.Tensor | None = None,
    gt_counts: torch.Tensor | list[int] | None = None,
    encode: EncodeConfig | None = None,
    eps: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """torchvision ``RetinaNetHead.compute_loss`` from sparse targets.

    Args:
        head_outputs: the head's ``{"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}``.
        box_loss: the head's ``_loss_type`` (``l1`` in torchvision's RetinaNet).
        anchors, gt_boxes, gt_counts, encode, eps: for the IoU box losses (``giou``,
            ``diou``, ``ciou``), as ``box_regression_loss`` takes them; the others do not
            read them (a config may switch the loss and pass them always).
    Returns:
        ``{"classification": ..., "bbox_regression": ...}``, scalars.
    """
    if not isinstance(head_outputs, dict) or not {"cls_logits", "bbox_regression"} <= head_outputs.keys():
        raise ValueError("head_outputs: expected a dict with 'cls_logits' and 'bbox_regression' (the head's output)")
    return {
        "classification": sigmoid_focal_loss(
            head_outputs["cls_logits"], targets, alpha=alpha, gamma=gamma, normalize=normalize
        ),
        "bbox_regression": box_regression_loss(
            head_outputs["bbox_regression"],
            targets,
            loss=box_loss,
            beta=beta,
            normalize=normalize,
            anchors=anchors,
            gt_boxes=gt_boxes,
            gt_counts=gt_counts,
            encode=encode,
            eps=eps,
        ),  # fmt: skip
    }


def rpn_loss(
    objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, targets: SparseTargets, *, beta: float = 1.0 / 9
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision ``RegionProposalNetwork.compute_loss`` from sparse (sampled) targets.

    Args:
        objectness (Tensor[B, A] float): objectness logits.
        pred_bbox_deltas (Tensor[B, A, 4] float): predicted deltas.
        targets: every anchor not ignored counts as sampled (1 positive, 0 negative).
    Returns:
        (objectness_loss, box_loss): binary cross-entropy averaged over the sampled
        anchors; smooth-L1 (``beta``) summed over the positives, divided by the number of
        sampled anchors.
    """
    targets = _check_sparse(targets)
    objectness = _check_outputs("objectness", objectness, targets, None)
    device = objectness.device
    ignored = _ignored(targets, device)
    # float32 labels, as torchvision's: 16-bit logits are promoted, and the loss summed in
    # float32 (in float16, 512 sampled anchors of loss ~200 summed to inf).
    dtype = torch.promote_types(objectness.dtype, torch.float32)
    loss = F.binary_cross_entropy_with_logits(
        _unread(objectness, ignored), objectness.new_zeros((), dtype=dtype).expand_as(objectness), reduction="none"
    )  # every anchor negative
    loss[ignored] = 0.0
    positive_image = _rows(targets.positive_offsets, targets.positive_anchors.numel(), device)
    positive_anchor = targets.positive_anchors.to(device).long()
    picked = objectness[positive_image, positive_anchor]
    loss[positive_image, positive_anchor] = F.binary_cross_entropy_with_logits(
        picked, torch.ones_like(picked, dtype=dtype), reduction="none"
    )
    # At least 1: a batch where every anchor is ignored has losses 0 (torchvision: NaN).
    sampled = max(1, targets.batch_size * targets.num_anchors - targets.ignored_anchors.numel())
    box = box_regression_loss(pred_bbox_deltas, targets, loss="smooth_l1", beta=beta, normalize="sum")
    return loss.sum() / sampled, box / sampled


def ssd_loss(
    head_outputs: dict[str, torch.Tensor],
    targets: SparseTargets,
    *,
    neg_to_pos_ratio: float = 3.0,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """torchvision ``SSD.compute_loss`` from sparse targets.

    Args:
        head_outputs: the head's ``{"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}``,
            class ``background_class`` (0 in torchvision) the background.
        targets: with ``positive_classes`` (``assign_sparse(..., gt_classes=...)``), in [0, C)
            and not ``background_class`` (torchvision counts such a positive in N and regresses
            it, but classifies it as a negative: a box labelled background is refused here).
        neg_to_pos_ratio: hard negatives per positive of an image (torchvision's 3.0).
        beta: the smooth-L1 box loss's (torchvision's 1).
    Returns:
        ``{"bbox_regression": ..., "classification": ...}``, scalars. Ignored anchors (SSD
        has none of its own; ignore regions, border rules) are neither positive nor
        negative. Where an image has fewer negatives than its quota, all of them count
        (torchvision would then count positives a second time).
    """
    if not isinstance(head_outputs, dict) or not {"cls_logits", "bbox_regression"} <= head_outputs.keys():
        raise ValueError("head_outputs: expected a dict with 'cls_logits' and 'bbox_regression' (the head's output)")
    targets = _check_sparse(targets)
    cls_logits = _check_outputs("cls_logits", head_outputs["cls_logits"], targets, -1)
    bbox_regression = _check_outputs("bbox_regression", head_outputs["bbox_regression"], targets, 4)
    if targets.positive_classes is None:
        raise ValueError("targets: no classes for the classification loss; pass gt_classes to assign_sparse")
    neg_to_pos_ratio = checked_real("neg_to_pos_ratio", neg_to_pos_ratio, low=0.0)  # torchvision's: 3.0
    beta = _finite_at_least_zero("beta", beta)
    device = cls_logits.device
    batch, count, num_classes = cls_logits.shape
    positive_classes = targets.positive_classes.to(device).long()
    if not 0 <= targets.background_class < num_classes or (
        positive_classes.numel() and not bool(((positive_classes >= 0) & (positive_classes < num_classes)).all())
    ):
        raise ValueError(f"targets: a class is outside [0, {num_classes}) (cls_logits has {num_classes})")
    if bool((positive_classes == targets.background_class).any()):
        raise ValueError(f"targets: a positive anchor's box has the background class {targets.background_class}; "
                         "label boxes with the other classes")  # fmt: skip
    positive = (_rows(targets.positive_offsets, positive_classes.numel(), device),
                targets.positive_anchors.to(device).long())  # fmt: skip
    classes = torch.full((batch, count), targets.background_class, dtype=torch.int64, device=device)
    classes[positive] = positive_classes
    ignored = _ignored(targets, device)
    loss = F.cross_entropy(_unread(cls_logits, ignored).flatten(0, 1), classes.flatten(), reduction="none")
    loss = loss.view(batch, count)
    # The hardest negatives: each image's highest losses among anchors neither positive nor
    # ignored. A NaN or infinite loss ranks first and is kept (the loss is then NaN, as
    # torchvision's): a diverging network must not pass for a finite loss.
    negative = torch.ones_like(loss, dtype=torch.bool)
    negative[positive] = False
    negative[ignored] = False
    hardness = torch.where(negative, loss.detach(), -torch.inf)
    quota = neg_to_pos_ratio * targets.positive_offsets.diff().to(device).unsqueeze(1)
    rank = hardness.argsort(dim=1, descending=True).argsort(dim=1)
    hardest = (rank < quota) & negative
    positives = max(1, positive_classes.numel())
    predicted = bbox_regression[positive]
    wanted = targets.positive_deltas.to(device=device, dtype=torch.promote_types(predicted.dtype, torch.float32))
    box = F.smooth_l1_loss(predicted.to(wanted.dtype), wanted, reduction="sum", beta=beta)
    return {
        "bbox_regression": box / positives,
        "classification": (loss[positive].sum() + loss[hardest].sum()) / positives,
    }
