"""Known answers from detectron2's published tests, through our detectron2 presets.

detectron2 cannot be installed here, so the facts its own tests assert (inputs and
expected outputs, not its code) are restated and run end to end through ``assign`` /
``generate_anchors`` with ``rpn_detectron2`` and ``retinanet_detectron2``, on every
backend (triton under the interpreter on CPU). Sources, facebookresearch/detectron2:

* ``tests/modeling/test_matcher.py`` at 33653a47d456194f20d2f2abee2a0ae38fbacd00
  (``test_scriptability``): RPN matcher (``cfg.MODEL.RPN.IOU_THRESHOLDS`` [0.3, 0.7],
  ``IOU_LABELS`` [0, -1, 1], ``allow_low_quality_matches=True``) on a 3 x 4 quality
  matrix, expected matches [1, 1, 2, 0] and match labels [-1, 1, 0, 1];
* ``tests/modeling/test_anchor_generator.py`` at 273e3b9746473a7469550bf793bbfb4c0a47c7d5
  (``test_default_anchor_generator``: cfg SIZES [[32, 64]], ASPECT_RATIOS [[0.25, 1, 4]],
  stride 4, cfg OFFSET 0.0; ``test_default_anchor_generator_centered``: the same
  explicitly, with ``DefaultAnchorGenerator``'s own default offset 0.5), on a 1 x 2
  feature map: 12 expected anchors each.

``tests/test_known_answers.py`` pins the reference's ``match_image`` to the same matrix
directly; here the matrix is realised by real boxes and explicit anchors (see
``MATRIX_BOXES``), so the whole path -- IoU, matching, the preset's thresholds and
low-quality mode, sampling, adapters -- is exercised on each backend.
"""

from __future__ import annotations

import pytest
import torch
from test_known_answers import D2_ANCHORS_OFFSET_0, D2_QUALITY

from support import on_device
from tritarget.kernels import AnchorLevel, assign, box_iou, generate_anchors, presets
from tritarget.kernels.adapters import detectron2_targets

BACKENDS = ["reference", "cpu", "triton"]

# --- test_matcher.py ---------------------------------------------------------------------

# The published quality matrix (D2_QUALITY, 3 boxes x 4 anchors, shared with
# test_known_answers) and the expected Matcher output.
D2_EXPECTED_MATCHES = [1, 1, 2, 0]
D2_EXPECTED_MATCH_LABELS = [-1, 1, 0, 1]

# Boxes and anchors (integer pixels) whose IoU matrix is the published one within 0.005
# and keeps every fact the expected output depends on, exactly: anchor 0's best IoU is
# 0.3 (inter / union = 3 / 10 in integers: equal to the low threshold, so ignored, not
# negative); box 2's best IoU is a tie between anchors 1 and 3 (anchor 3 is anchor 1
# mirrored about box 2's centre); anchors 1 (0.646) and 3 (0.596) are below 0.7 and
# positive only as boxes 1 and 0's best anchors. Found by a small integer search.
MATRIX_BOXES = [[12.0, 38.0, 43.0, 90.0], [31.0, 35.0, 53.0, 83.0], [23.0, 38.0, 36.0, 94.0]]
MATRIX_ANCHORS = [[34.0, 11.0, 45.0, 71.0], [23.0, 39.0, 53.0, 86.0], [19.0, 20.0, 34.0, 63.0],
                  [6.0, 39.0, 36.0, 86.0]]  # fmt: skip
MATRIX_CANVAS = (128, 128)


def _matrix_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MATRIX_BOXES), torch.tensor(MATRIX_ANCHORS)


def test_realised_matrix_is_the_published_one():
    boxes, anchors = _matrix_inputs()
    iou = box_iou(boxes, anchors)
    torch.testing.assert_close(iou, torch.tensor(D2_QUALITY), rtol=0, atol=0.005)
    assert iou[1, 0] == torch.tensor(0.3)  # float32(0.3), exactly the RPN's low threshold
    assert iou[2, 1] == iou[2, 3]  # box 2's best anchor: a tie
    assert iou[2, 1] == iou[2].max() and iou[0].argmax() == 3 and iou[1].argmax() == 1
    assert iou.max(dim=0).values.lt(0.7).all()  # no anchor reaches the high threshold


@pytest.mark.parametrize("sample", [True, False], ids=["preset", "no_sampling"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rpn_matcher_published_answer(backend, sample):
    """rpn_detectron2 (Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)):
    the published matches and match labels. detectron2's matches keep every anchor's
    argmax box, negatives and ignored included (the preset's ``detectron2`` mode). The
    preset's sampling (256 anchors, half positive) draws all four anchors."""
    config = presets.get("rpn_detectron2")
    assert (config.match.low, config.match.high) == (0.3, 0.7)
    if not sample:
        config = config.replace(**{"match.sample_size": 0})
    boxes, anchors = _matrix_inputs()
    targets = on_device(
        assign, boxes, [3], MATRIX_CANVAS, config, anchors=anchors, backend=backend, return_max_iou=True
    )
    assert targets.labels[0].tolist() == D2_EXPECTED_MATCH_LABELS
    assert targets.matched_gt[0].tolist() == D2_EXPECTED_MATCHES
    assert targets.max_iou[0][0] == torch.tensor(0.3)
    torch.testing.assert_close(targets.max_iou[0], torch.tensor(D2_QUALITY).max(dim=0).values, rtol=0, atol=0.005)
    # RPN.label_and_sample_anchors' gt_labels: the match labels (1 / 0 / -1).
    gt_labels, gt_deltas = detectron2_targets(targets)
    assert gt_labels[0].tolist() == D2_EXPECTED_MATCH_LABELS
    assert gt_labels[0].dtype == torch.int64
    assert torch.all(gt_deltas[0][torch.tensor(D2_EXPECTED_MATCH_LABELS) != 1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retinanet_matcher_keeps_every_anchors_argmax_box(backend):
    # retinanet_detectron2 (Matcher([0.4, 0.5], [0, -1, 1], True)) returns the argmax box of negatives too, as the RPN's
    boxes, anchors = _matrix_inputs()
    config = presets.get("retinanet_detectron2")
    targets = on_device(assign, boxes, [3], MATRIX_CANVAS, config, anchors=anchors, backend=backend)
    assert targets.labels[0].tolist() == [0, 1, 0, 1]  # anchors 0 (0.3) and 2 are below 0.4
    assert targets.matched_gt[0].tolist() == D2_EXPECTED_MATCHES


# --- test_anchor_generator.py ------------------------------------------------------------

# SIZES [[32, 64]], ASPECT_RATIOS [[0.25, 1, 4]] (h / w), stride 4, a 1 x 2 feature map.
D2_LEVEL = AnchorLevel(stride=4, sizes=(32, 64), aspect_ratios=(0.25, 1, 4))
D2_CANVAS = (4, 8)  # ceil(4 / 4) x ceil(8 / 4) = the published 1 x 2 feature map

# The published anchors (D2_ANCHORS_OFFSET_0, shared with test_known_answers); the
# centered test's published list is the same anchors moved by half the stride (2 px).
D2_ANCHORS_OFFSET_HALF = (torch.tensor(D2_ANCHORS_OFFSET_0) + 2).tolist()


def _d2_config(name: str, offset: float | None = None):
    """The preset with its pyramid replaced by the published single level."""
    overrides = {"anchors.levels": (D2_LEVEL,)}
    if offset is not None:
        overrides["anchors.offset"] = offset
    return presets.get(name).replace(**overrides)


@pytest.mark.parametrize("name", ["rpn_detectron2", "retinanet_detectron2"])
def test_default_anchor_generator_published_anchors(name):
    """The presets' anchor layout and offset (cfg OFFSET 0.0) give the published anchors:
    size-outer, ratio-inner, location-major."""
    config = _d2_config(name)
    assert config.anchors.offset == 0.0
    assert torch.equal(generate_anchors(config.anchors, D2_CANVAS), torch.tensor(D2_ANCHORS_OFFSET_0))


@pytest.mark.parametrize("name", ["rpn_detectron2", "retinanet_detectron2"])
def test_default_anchor_generator_centered_published_anchors(name):
    config = _d2_config(name, offset=0.5)
    assert torch.equal(generate_anchors(config.anchors, D2_CANVAS), torch.tensor(D2_ANCHORS_OFFSET_HALF))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rpn_detectron2", "retinanet_detectron2"])
def test_published_anchors_feed_assign(name, backend):
    """assign runs on the published anchors (generated, not passed): a box equal to the
    published anchor 4 (the 64-size square of cell 0) is matched there, IoU 1."""
    config = _d2_config(name).replace(**{"match.sample_size": 0})
    box = torch.tensor([D2_ANCHORS_OFFSET_0[4]])
    targets = on_device(assign, box, [1], D2_CANVAS, config, backend=backend, return_max_iou=True)
    assert targets.labels.shape == (1, 12)
    assert int(targets.labels[0, 4]) == 1 and int(targets.matched_gt[0, 4]) == 0
    assert float(targets.max_iou[0, 4]) == 1.0
    assert torch.equal(targets.deltas[0, 4], torch.zeros(4))
