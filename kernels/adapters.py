"""Targets in each framework's own conventions: torchvision, detectron2, mmdetection.

tritarget labels every anchor 1 (positive), 0 (negative) or -1 (ignored: between the
thresholds, in a crowd region, across the border or beyond the image's padded size).
Each framework spells the same three states differently:

* torchvision ``matched_idxs``: the matched box index / -1 (``BELOW_LOW_THRESHOLD``) /
  -2 (``BETWEEN_THRESHOLDS``);
* detectron2 ``gt_labels``: 1 / 0 / -1 (RPN), or the class / ``num_classes`` / -1
  (RetinaNet);
* mmdet ``labels`` and ``label_weights``: (class, 1) / (``num_classes``, 1) /
  (``num_classes``, 0).

Box targets are the encoded deltas of the positives; every framework's loss reads them
only where the anchor is positive (detectron2 computes deltas against the argmax box for
every anchor, mmdet zeroes them, tritarget zeroes them: the losses are the same).

Every function takes dense ``Targets`` or ``SparseTargets`` (densified on their device)
and returns tensors on the targets' device. Sources mirrored: torchvision
``models/detection/_utils.py`` (``Matcher``) and ``retinanet.py`` (``compute_loss``);
detectron2 ``modeling/meta_arch/retinanet.py`` (``label_anchors``) and
``modeling/proposal_generator/rpn.py`` (``label_and_sample_anchors``); mmdet
``models/dense_heads/anchor_head.py`` (``_get_targets_single``).
"""

from __future__ import annotations

import operator

import torch

from .problem import checked_real
from .targets import IGNORED, NEGATIVE, POSITIVE, SparseTargets, Targets

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "torchvision_matched_idxs",
    "detectron2_targets",
    "mmdet_targets",
]

# torchvision's Matcher sentinels (models/detection/_utils.py).
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2

# The largest weight float32 holds: past it a positive weighs infinitely (NaN losses).
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _dense(targets: Targets | SparseTargets) -> Targets:
    if isinstance(targets, SparseTargets):
        return Targets.from_sparse(targets)
    if isinstance(targets, Targets):
        return targets
    raise TypeError(f"targets: expected Targets or SparseTargets, got {type(targets).__name__}")


def _num_classes(value: object, name: str) -> int:
    """``value`` as a positive int: any integer (a numpy one too, as a config may hold it), not a bool."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count <= 0:
        raise ValueError(f"{name}: num_classes must be a positive int, got {value!r}")
    return count


def _classes(targets: Targets, num_classes: int, name: str) -> torch.Tensor:
    """Tensor[B, A] int64: each positive's class (checked to be in [0, num_classes))."""
    if targets.classes is None:
        raise ValueError(f"{name}: the targets have no classes; pass gt_classes to assign")
    positive = targets.labels == POSITIVE
    classes = targets.classes.long()
    bad = positive & ((classes < 0) | (classes >= num_classes))
    if bad.any():
        image, anchor = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name}: image {image}, anchor {anchor} is matched to class {int(classes[image, anchor])}, "
            f"outside [0, num_classes={num_classes})"
        )
    return classes


def torchvision_matched_idxs(targets: Targets | SparseTargets) -> list[torch.Tensor]:
    """torchvision's ``matched_idxs``: one Tensor[A] int64 per image, the matched box index
    for positives, ``BELOW_LOW_THRESHOLD`` (-1) for negatives and ``BETWEEN_THRESHOLDS`` (-2)
    for ignored anchors -- what ``RetinaNet.compute_loss`` builds with its ``Matcher``, and
    what ``RetinaNetHead.compute_loss`` takes.
    """
    dense = _dense(targets)
    matched = dense.matched_gt.long()
    idxs = torch.where(dense.labels == POSITIVE, matched, torch.full_like(matched, BELOW_LOW_THRESHOLD))
    idxs = torch.where(dense.labels == IGNORED, torch.full_like(idxs, BETWEEN_THRESHOLDS), idxs)
    return list(idxs.unbind(0))


def detectron2_targets(
    targets: Targets | SparseTargets, num_classes: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """detectron2's ``(gt_labels, gt_anchor_deltas)``, one Tensor per image.

    Without ``num_classes`` (RPN): ``gt_labels`` is 1 / 0 / -1 (int64), as
    ``RPN.label_and_sample_anchors`` returns. With it (RetinaNet): the positive's class,
    ``num_classes`` for background and -1 for ignored, as ``RetinaNet.label_anchors``
    returns. ``gt_anchor_deltas`` (Tensor[A, 4] float32) are the positives' encoded deltas
    (zeros elsewhere: detectron2's losses read only the foreground's).
    """
    dense = _dense(targets)
    labels = dense.labels.long()
    if num_classes is not None:
        num_classes = _num_classes(num_classes, "detectron2_targets")
        classes = _classes(dense, num_classes, "detectron2_targets")
        labels = torch.where(labels == POSITIVE, classes, torch.where(labels == NEGATIVE, num_classes, IGNORED))
    return list(labels.unbind(0)), list(dense.deltas.unbind(0))


def mmdet_targets(
    targets: Targets | SparseTargets, num_classes: int, pos_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """mmdet's ``AnchorHead`` targets, row i for image i (``_get_targets_single`` of each
    image, stacked as ``get_targets`` stacks them before splitting by level):

    * ``labels`` (Tensor[B, A] int64): the positive's class, ``num_classes`` elsewhere
      (background, and also ignored anchors, whose weight is 0). Targets without classes
      (RPN, class-agnostic) give class 0 to every positive, as mmdet's RPN does.
    * ``label_weights`` (Tensor[B, A] float32): ``pos_weight`` for positives (mmdet's
      ``train_cfg.pos_weight``, 1 when it is <= 0), 1 for negatives, 0 for ignored.
    * ``bbox_targets`` (Tensor[B, A, 4] float32): encoded deltas of positives, 0 elsewhere.
    * ``bbox_weights`` (Tensor[B, A, 4] float32): 1 for positives, 0 elsewhere.
    """
    dense = _dense(targets)
    num_classes = _num_classes(num_classes, "mmdet_targets")
    positive = dense.labels == POSITIVE
    if dense.classes is None:
        classes = torch.zeros_like(dense.labels, dtype=torch.int64)
    else:
        classes = _classes(dense, num_classes, "mmdet_targets")
    labels = torch.where(positive, classes, num_classes)
    pos_weight = checked_real("pos_weight", pos_weight, high=_FLOAT32_MAX, note=" (a float32 weight)")
    weight = pos_weight if pos_weight > 0 else 1.0
    label_weights = torch.where(positive, weight, (dense.labels == NEGATIVE).to(torch.float32))
    bbox_weights = positive.to(torch.float32)[..., None].expand(-1, -1, 4).contiguous()
    return {
        "labels": labels,
        "label_weights": label_weights.to(torch.float32),
        "bbox_targets": dense.deltas,
        "bbox_weights": bbox_weights,
    }
