"""tritarget.clients.anchor_design: fit anchors to a dataset, check what the matcher does with them, see it.

Library first, the ``tritarget anchors`` command on top (``cli``):

* ``dataset``: COCO annotation JSON or tensors -> ``BoxDataset`` in the model's pixels
  (``Resize`` as the model's transform resizes);
* ``check``: BPR under the real matcher, positives per box (by size and level), boxes
  without positives, best-anchor IoU, shapes never positive, ignored anchors -> ``CheckResult``;
* ``fit``: k-means with 1 - IoU, then evolution on the matcher's own BPR -> ``FitResult``;
* ``plots``: the pictures (needs matplotlib: the ``plot`` extra);
* ``synthetic``: COCO-format examples (COCO-like, and skewed shapes).
"""

from .check import CheckResult, MatchCounts, best_anchor_iou, check, count_positives, format_check_table, format_missing
from .dataset import BoxDataset, Resize, from_tensors, load_coco
from .fit import FitResult, fit_anchors, fitness, kmeans_iou

__all__ = [
    "BoxDataset",
    "CheckResult",
    "FitResult",
    "MatchCounts",
    "Resize",
    "best_anchor_iou",
    "check",
    "count_positives",
    "fit_anchors",
    "fitness",
    "format_check_table",
    "format_missing",
    "from_tensors",
    "kmeans_iou",
    "load_coco",
]
