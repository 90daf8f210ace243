"""The reference backend: the executable specification, in plain PyTorch.

It builds each image's full [G, A] IoU matrix and applies the rules one readable
step at a time. Slow and memory-hungry on purpose; every other backend is tested
against it (labels and matched indices exactly, deltas to a stated tolerance).

Matching of one image (DESIGN §4), on the [G, A] IoU matrix ``iou``:

1. Anchors that are taken out before matching -- inside an ignore region
   (IoF > ``ignore_iof_thr``), across the border with ``border_order="pre_match"``, or
   on a feature-map cell beyond the image's padded size (``pad_sizes``, mmdet's
   ``valid_flags``; whatever the border order, as mmdet drops them before assigning) --
   are *excluded*: they are ignored and do not count for any box's maximum (mmdet sets
   their overlaps to -1; its ``label_weights`` are 0 for them, which is what ignored
   means).
2. Each anchor's best box: ``max_iou, argmax`` over boxes, lowest box index on ties.
3. Thresholds: ``max_iou >= high`` positive, matched to argmax; ``< low`` negative;
   otherwise ignored (the ``[low, high)`` convention). ``strict_high`` flips both
   comparisons to ``> high`` positive, ``<= low`` negative (``(low, high]``): DALI's and
   MLPerf SSD's single criterion matches an anchor iff IoU > criterion and makes every
   other anchor background, so an IoU equal to it must be negative, not ignored.
4. Low-quality matches, for each box g whose best IoU over the included anchors
   is above 0 and ``box_max[g] >= min_pos_iou`` (a box with best IoU 0 would make
   every zero-IoU anchor positive under torchvision's and mmdet's rules; here it
   makes none):
   * ``torchvision`` / ``detectron2``: every included anchor with ``iou[g, a] ==
     box_max[g]`` (ties included) becomes positive, matched to *its own* argmax box.
     Example: anchor 7 is box 0's best (IoU 0.3) but box 1 overlaps it more (0.35):
     anchor 7 is positive and matched to box 1.
   * ``mmdet``: the same anchors become positive matched to g itself; boxes are
     applied in order, so a later box overwrites an earlier one.
   * ``ssd_forced``: only box g's best anchor (lowest anchor index on ties) becomes
     positive, matched to g; the later box wins a shared best anchor.
5. Anchors across the border with ``border_order="post_match"`` become ignored.
6. matched_gt is -1 except for positives -- but ``detectron2`` keeps every included
   anchor's argmax box, as detectron2's ``Matcher`` returns it (-1 for an image
   without boxes, where detectron2 returns 0, an index into nothing).
"""

from __future__ import annotations

import torch

from .anchors import AnchorGrid
from .boxes import box_iof, box_iou, encode
from .config import MatchConfig
from .problem import Problem
from .targets import IGNORED, NEGATIVE, POSITIVE, Targets

__all__ = ["solve", "match_image", "excluded_by_ignore", "outside_border", "outside_padding"]


def excluded_by_ignore(anchors: torch.Tensor, ignore_boxes: torch.Tensor, config: MatchConfig) -> torch.Tensor:
    """Tensor[A] bool: anchors inside an ignore region (mmdet's ``ignore_iof_thr``)."""
    if config.ignore_iof_thr <= 0 or ignore_boxes.shape[0] == 0:  # mmdet: only a positive threshold ignores
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    if config.ignore_iof_wrt_anchor:
        iof = box_iof(anchors, ignore_boxes)  # [A, M]
    else:
        iof = box_iof(ignore_boxes, anchors).T  # [A, M]
    # mmdet compares the max; "any region over" is the same but where an IoF is NaN (inf /
    # inf: areas past float32's range), which max() spreads to the anchor's other regions.
    return (iof > config.ignore_iof_thr).any(dim=1)


def outside_border(anchors: torch.Tensor, image_size: tuple[int, int], config: MatchConfig) -> torch.Tensor:
    """Tensor[A] bool: anchors reaching beyond ``allowed_border`` pixels outside the image.

    Inside means ``x1 >= -b, y1 >= -b, x2 < w + b, y2 < h + b`` (mmdet's
    ``anchor_inside_flags`` and detectron2's ``Boxes.inside_box``).
    """
    if config.allowed_border < 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    b = config.allowed_border
    height, width = image_size
    inside = (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < width + b) & (anchors[:, 3] < height + b)
    return ~inside


def outside_padding(grid: AnchorGrid, valid: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tensor[A] bool: anchors whose feature-map cell is beyond the image's valid cells.

    valid (Tensor[L, 2] int): per level, the rows and columns inside the image's padded
    size (``problem.valid_cells``). Every shape of an excluded cell is excluded, in the
    grid's anchor order (location-major, or shape-major for yolo).
    """
    masks = []
    for level, (rows, columns) in zip(grid.levels, valid.tolist()):
        y = torch.arange(level.height, device=device)[:, None]
        x = torch.arange(level.width, device=device)[None, :]
        cell_outside = ((y >= rows) | (x >= columns)).reshape(-1)  # [H * W], row-major cells
        shapes = level.cells.shape[0]
        if grid.shape_major:
            masks.append(cell_outside.repeat(shapes))  # [K, H * W]
        else:
            masks.append(cell_outside.repeat_interleave(shapes))  # [H * W, K]
    return torch.cat(masks)


def match_image(
    iou: torch.Tensor, excluded: torch.Tensor, outside_post: torch.Tensor, config: MatchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's anchors (steps 2-6 of the module docstring).

    Args:
        iou (Tensor[G, A] float32): IoU of every box with every anchor.
        excluded (Tensor[A] bool): anchors taken out before matching.
        outside_post (Tensor[A] bool): anchors ignored after matching.
    Returns:
        labels (Tensor[A] int8), matched_gt (Tensor[A] int64).
    """
    num_boxes, num_anchors = iou.shape
    device = iou.device
    included = ~excluded
    labels = torch.full((num_anchors,), IGNORED, dtype=torch.int8, device=device)
    if num_boxes == 0:
        labels[included] = NEGATIVE
        labels[outside_post] = IGNORED
        return labels, torch.full((num_anchors,), -1, dtype=torch.int64, device=device)

    # Excluded anchors get IoU -1 so they never win a box's maximum (mmdet's trick).
    masked = torch.where(included[None, :], iou, torch.full_like(iou, -1.0))
    anchor_max, anchor_argmax = masked.max(dim=0)  # [A]: best box, lowest index on ties

    positive = anchor_max > config.high if config.strict_high else anchor_max >= config.high
    positive &= included
    below_low = anchor_max <= config.low if config.strict_high else anchor_max < config.low
    negative = included & below_low & ~positive
    matched = torch.where(positive, anchor_argmax, torch.full_like(anchor_argmax, -1))

    # Without anchors there is no best anchor per box (mmdet's empty-priors test: empty result).
    if config.low_quality != "none" and num_anchors > 0:
        box_max, box_best = masked.max(dim=1)  # [G]: best anchor, lowest index on ties
        # A box whose best IoU is 0 (every anchor it touches excluded, or explicit anchors
        # that miss it) would lift every zero-IoU anchor: the peers' pitfall. It lifts none.
        qualifies = (box_max > 0) & (box_max >= config.min_pos_iou)  # [G]
        if config.low_quality in ("torchvision", "detectron2"):
            ties = (masked == box_max[:, None]) & qualifies[:, None]  # [G, A]
            lifted = ties.any(dim=0) & included
            matched = torch.where(lifted, anchor_argmax, matched)
            positive |= lifted
        elif config.low_quality == "mmdet":
            for g in range(num_boxes):  # in box order: a later box overwrites
                if qualifies[g]:
                    lifted = (masked[g] == box_max[g]) & included
                    matched[lifted] = g
                    positive |= lifted
        else:  # ssd_forced
            for g in range(num_boxes):  # in box order: a later box wins a shared anchor
                anchor = box_best[g]
                if qualifies[g] and included[anchor]:
                    matched[anchor] = g
                    positive[anchor] = True
        negative &= ~positive

    labels[negative] = NEGATIVE
    labels[positive] = POSITIVE
    labels[outside_post] = IGNORED
    if config.low_quality == "detectron2":
        matched = torch.where(included, anchor_argmax, torch.full_like(anchor_argmax, -1))
    else:
        matched = torch.where(labels == POSITIVE, matched, torch.full_like(matched, -1))
    return labels, matched


def solve(problem: Problem) -> Targets:
    """Dense targets of a checked batch, image by image."""
    config = problem.config
    match = config.match
    anchors = problem.anchors
    batch, num_anchors = problem.batch_size, problem.num_anchors
    device = problem.device
    labels = torch.empty(batch, num_anchors, dtype=torch.int8, device=device)
    matched_gt = torch.empty(batch, num_anchors, dtype=torch.int32, device=device)
    deltas = torch.zeros(batch, num_anchors, 4, dtype=torch.float32, device=device)
    classes = None
    if problem.gt_classes is not None:
        classes = torch.full((batch, num_anchors), config.background_class, dtype=torch.int32, device=device)
    max_iou = torch.zeros(batch, num_anchors, dtype=torch.float32, device=device) if problem.want_max_iou else None

    gt_offsets = problem.gt_offsets.tolist()
    ignore_offsets = problem.ignore_offsets.tolist()
    for i in range(batch):
        boxes = problem.gt_boxes[gt_offsets[i] : gt_offsets[i + 1]]
        ignore = problem.ignore_boxes[ignore_offsets[i] : ignore_offsets[i + 1]]
        image_size = tuple(problem.image_sizes[i].tolist())
        outside = outside_border(anchors, image_size, match)
        pre = match.border_order == "pre_match"
        excluded = excluded_by_ignore(anchors, ignore, match) | (outside if pre else torch.zeros_like(outside))
        if problem.valid_cells is not None:
            excluded |= outside_padding(problem.grid, problem.valid_cells[i], device)
        outside_post = torch.zeros_like(outside) if pre else outside

        iou = box_iou(boxes, anchors)  # [G, A]
        image_labels, image_matched = match_image(iou, excluded, outside_post, match)
        labels[i] = image_labels
        matched_gt[i] = image_matched.to(torch.int32)

        positive = image_labels == POSITIVE
        if positive.any():
            owner = image_matched[positive]
            deltas[i, positive] = encode(boxes[owner], anchors[positive], config.encode)
            if classes is not None:
                classes[i, positive] = problem.gt_classes[gt_offsets[i] + owner].to(torch.int32)
        if max_iou is not None and boxes.shape[0] > 0:
            max_iou[i] = iou.max(dim=0).values
    return Targets(labels, matched_gt, deltas, classes, max_iou, background_class=config.background_class)
