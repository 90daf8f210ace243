"""Known answers from the peers' own published tests and worked examples.

Each case restates a fact a peer publishes -- an input and the output its test or
book asserts -- and checks that our reference (or our anchors) gives the same answer.
The peer file a case comes from is named above it. Peer sentinels are translated to
ours: labels 1 positive / 0 negative / -1 ignored, ``matched_gt`` a 0-based box index
or -1 (mmdet's ``gt_inds`` are 1-based with 0 for negative).

Other backends are compared with the reference elsewhere; these tests pin the
reference itself to the peers.
"""

from __future__ import annotations

import math

import pytest
import torch

from tritarget.kernels import (
    AnchorConfig,
    AnchorLevel,
    EncodeConfig,
    MatchConfig,
    TargetConfig,
    assign,
    box_iof,
    box_iou,
    decode,
    encode,
    generate_anchors,
    presets,
    resolve_grid,
)
from tritarget.kernels.boxes import box_area
from tritarget.kernels.reference import match_image

# Anchors are passed explicitly in the matcher cases; this layout only fills the config.
ANY_ANCHORS = AnchorConfig(layout="torchvision", levels=(AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1.0,)),))


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def match_matrix(quality: list[list[float]] | torch.Tensor, **match) -> tuple[list[int], list[int]]:
    """Labels and matched_gt of a [G, A] quality matrix under a MatchConfig."""
    iou = torch.as_tensor(quality, dtype=torch.float32)
    none = torch.zeros(iou.shape[1], dtype=torch.bool)
    labels, matched = match_image(iou, none, none, MatchConfig(**match))
    return labels.tolist(), matched.tolist()


def run(anchors, boxes, canvas=(64, 64), counts=None, **kwargs):
    """Reference targets with explicit anchors; ``match``/``encode`` select the config."""
    config = TargetConfig(
        anchors=ANY_ANCHORS,
        match=kwargs.pop("match", MatchConfig()),
        encode=kwargs.pop("encode", EncodeConfig()),
        background_class=kwargs.pop("background_class", 0),
    )
    boxes = tensor(boxes)
    counts = [boxes.shape[0]] if counts is None else counts
    return assign(boxes, counts, canvas, config, anchors=tensor(anchors), backend="reference", **kwargs)


# ---------------------------------------------------------------------------------------
# detectron2 tests/modeling/test_matcher.py (test_scriptability)
# ---------------------------------------------------------------------------------------

# 3 boxes x 4 anchors. RPN config: IOU_THRESHOLDS [0.3, 0.7], IOU_LABELS [0, -1, 1],
# allow_low_quality_matches=True. Anchor 0's best is exactly 0.3 (ignored, not negative);
# anchor 1 (0.65) and anchor 3 (0.6) are only positive as some box's best anchor; box 2
# has its best (0.4) at anchors 1 and 3, a tie.
D2_QUALITY = [[0.15, 0.45, 0.2, 0.6], [0.3, 0.65, 0.05, 0.1], [0.05, 0.4, 0.25, 0.4]]


def test_detectron2_matcher_quality_matrix():
    labels, matched = match_matrix(D2_QUALITY, high=0.7, low=0.3, low_quality="detectron2")
    assert labels == [-1, 1, 0, 1]  # detectron2: expected_match_labels
    assert matched == [1, 1, 2, 0]  # detectron2: expected_matches (argmax kept for every anchor)


def test_torchvision_mode_on_detectron2_matrix_keeps_only_positive_matches():
    # torchvision's Matcher lifts the same anchors to the same (own argmax) boxes, but
    # returns a negative sentinel for the others.
    labels, matched = match_matrix(D2_QUALITY, high=0.7, low=0.3, low_quality="torchvision")
    assert labels == [-1, 1, 0, 1]
    assert matched == [-1, 1, -1, 0]


def test_mmdet_mode_on_detectron2_matrix_later_box_overwrites():
    # mmdet MaxIoUAssigner (source rule, gt_max_assign_all=True): boxes in order assign
    # themselves to all their best anchors, so box 2's tie at anchors 1 and 3 overwrites
    # boxes 1 and 0. min_pos_iou 0.3 (rpn_mmdet) still admits box 2 (0.4).
    labels, matched = match_matrix(D2_QUALITY, high=0.7, low=0.3, low_quality="mmdet", min_pos_iou=0.3)
    assert labels == [-1, 1, 0, 1]
    assert matched == [-1, 2, -1, 2]


def test_detectron2_matcher_without_boxes_is_background():
    # detectron2 Matcher: an empty matrix gives labels[0] (0) everywhere.
    labels, matched = match_matrix(torch.zeros(0, 4), low_quality="detectron2")
    assert labels == [0, 0, 0, 0]
    assert matched == [-1, -1, -1, -1]  # detectron2 returns 0 here, an index into nothing (README)


# ---------------------------------------------------------------------------------------
# detectron2 tests/modeling/test_anchor_generator.py
# ---------------------------------------------------------------------------------------

# SIZES [[32, 64]], ASPECT_RATIOS [[0.25, 1, 4]], stride 4, a 1 x 2 feature map:
# size-outer, ratio-inner; h/w ratio (0.25 is a wide anchor).
D2_ANCHORS_OFFSET_0 = [
    [-32.0, -8.0, 32.0, 8.0],
    [-16.0, -16.0, 16.0, 16.0],
    [-8.0, -32.0, 8.0, 32.0],
    [-64.0, -16.0, 64.0, 16.0],
    [-32.0, -32.0, 32.0, 32.0],
    [-16.0, -64.0, 16.0, 64.0],
    [-28.0, -8.0, 36.0, 8.0],
    [-12.0, -16.0, 20.0, 16.0],
    [-4.0, -32.0, 12.0, 32.0],
    [-60.0, -16.0, 68.0, 16.0],
    [-28.0, -32.0, 36.0, 32.0],
    [-12.0, -64.0, 20.0, 64.0],
]


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_detectron2_default_anchor_generator(offset):
    level = AnchorLevel(stride=4, sizes=(32, 64), aspect_ratios=(0.25, 1, 4), feature_size=(1, 2))
    anchors = generate_anchors(AnchorConfig(layout="detectron2", levels=(level,), offset=offset), (4, 8))
    # test_default_anchor_generator (cfg OFFSET 0.0) and ..._centered (offset 0.5: every
    # anchor moves by half the stride, 2 px).
    expected = tensor(D2_ANCHORS_OFFSET_0) + 4 * offset
    assert torch.equal(anchors, expected)


# ---------------------------------------------------------------------------------------
# mmdet tests/test_models/test_task_modules/test_assigners/test_max_iou_assigner.py
# ---------------------------------------------------------------------------------------

# MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5), defaults min_pos_iou=0,
# gt_max_assign_all=True, match_low_quality=True.
MMDET_MATCH = MatchConfig(high=0.5, low=0.5, low_quality="mmdet", min_pos_iou=0.0)
MMDET_PRIORS = [[0, 0, 10, 10], [10, 10, 20, 20], [5, 5, 15, 15], [32, 32, 38, 42]]
MMDET_GT = [[0, 0, 10, 9], [0, 10, 10, 19]]


def test_mmdet_max_iou_assigner():
    t = run(MMDET_PRIORS, MMDET_GT, match=MMDET_MATCH)
    # expected_gt_inds [1, 0, 2, 0]: prior 2 is box 1's best prior (IoU 25/165), a
    # low-quality match; prior 0 matches box 0 at IoU 0.9.
    assert t.labels[0].tolist() == [1, 0, 1, 0]
    assert t.matched_gt[0].tolist() == [0, -1, 1, -1]


@pytest.mark.parametrize("wrt_anchor", [False, True])
def test_mmdet_max_iou_assigner_with_ignore(wrt_anchor):
    # ignore_iof_thr=0.5, ignore_wrt_candidates=False in the peer test; the last prior
    # [30, 32, 40, 42] covers 80% of the ignore box [30, 30, 40, 40] (and 80% of itself).
    priors = MMDET_PRIORS[:3] + [[30, 32, 40, 42]]
    match = MatchConfig(high=0.5, low=0.5, low_quality="mmdet", ignore_iof_thr=0.5, ignore_iof_wrt_anchor=wrt_anchor)
    t = run(priors, MMDET_GT, match=match, ignore_boxes=tensor([[30, 30, 40, 40]]), ignore_counts=[1])
    assert t.labels[0].tolist() == [1, 0, 1, -1]  # expected_gt_inds [1, 0, 2, -1]
    assert t.matched_gt[0].tolist() == [0, -1, 1, -1]


def test_mmdet_max_iou_assigner_with_empty_gt():
    t = run(MMDET_PRIORS, [], counts=[0], match=MMDET_MATCH)
    assert t.labels[0].tolist() == [0, 0, 0, 0]  # expected_gt_inds [0, 0, 0, 0]
    assert t.matched_gt[0].tolist() == [-1, -1, -1, -1]


def test_empty_gt_with_ignore_keeps_crowd_anchors_ignored():
    # mmdet's empty-GT shortcut labels every prior negative, crowd ones included
    # (assign_wrt_overlaps returns before looking at the -1 overlaps); we keep them
    # ignored, a documented deliberate difference (README, "Ignore regions").
    match = MatchConfig(high=0.5, low=0.5, low_quality="mmdet", ignore_iof_thr=0.5)
    priors = MMDET_PRIORS[:3] + [[30, 32, 40, 42]]
    t = run(priors, [], counts=[0], match=match, ignore_boxes=tensor([[30, 30, 40, 40]]), ignore_counts=[1])
    assert t.labels[0].tolist() == [0, 0, 0, -1]


@pytest.mark.parametrize("with_ignore", [False, True])
@pytest.mark.parametrize("low_quality", ["mmdet", "torchvision", "detectron2", "ssd_forced", "none"])
def test_mmdet_max_iou_assigner_with_empty_priors(low_quality, with_ignore):
    # test_max_iou_assigner_with_empty_priors / _with_empty_boxes_and_ignore: no priors,
    # two boxes -> an empty assignment, not an error.
    match = MatchConfig(high=0.5, low=0.5, low_quality=low_quality, ignore_iof_thr=0.5 if with_ignore else -1.0)
    ignore = {"ignore_boxes": tensor([[30, 30, 40, 40]]), "ignore_counts": [1]} if with_ignore else {}
    t = run([], MMDET_GT, match=match, **ignore)
    assert t.labels.shape == (1, 0) and t.matched_gt.shape == (1, 0) and t.deltas.shape == (1, 0, 4)


def test_mmdet_max_iou_assigner_with_empty_priors_and_gt():
    t = run([], [], counts=[0], match=MMDET_MATCH)
    assert t.labels.shape == (1, 0)


# ---------------------------------------------------------------------------------------
# mmdet tests/test_core/test_anchor/test_anchor_generator.py
# ---------------------------------------------------------------------------------------


def test_mmdet_anchor_generator_square_strides():
    # test_strides: AnchorGenerator(strides=[10], ratios=[1.], scales=[1.], base_sizes=[10])
    # on a 2 x 2 feature map.
    level = AnchorLevel(stride=10, scales=(1.0,), aspect_ratios=(1.0,), base_size=10, feature_size=(2, 2))
    anchors = generate_anchors(AnchorConfig(layout="mmdet", levels=(level,)), (20, 20))
    assert torch.equal(anchors, tensor([[-5, -5, 5, 5], [5, -5, 15, 5], [-5, 5, 5, 15], [5, 5, 15, 15]]))


# test_retina_anchor: octave_base_scale=4, scales_per_octave=3, ratios [0.5, 1, 2],
# strides [8 .. 128]; base anchors of the first level (ratio-outer, scale-inner). Every
# other level is the same scaled by its stride / 8.
MMDET_RETINA_BASE_P3 = [
    [-22.6274, -11.3137, 22.6274, 11.3137],
    [-28.5088, -14.2544, 28.5088, 14.2544],
    [-35.9188, -17.9594, 35.9188, 17.9594],
    [-16.0000, -16.0000, 16.0000, 16.0000],
    [-20.1587, -20.1587, 20.1587, 20.1587],
    [-25.3984, -25.3984, 25.3984, 25.3984],
    [-11.3137, -22.6274, 11.3137, 22.6274],
    [-14.2544, -28.5088, 14.2544, 28.5088],
    [-17.9594, -35.9188, 17.9594, 35.9188],
]


def test_mmdet_retina_base_anchors_match_retinanet_mmdet_preset():
    config = presets.get("retinanet_mmdet").anchors
    grid = resolve_grid(config, (640, 640))
    for k, level in enumerate(grid.levels):
        expected = tensor(MMDET_RETINA_BASE_P3) * 2**k
        torch.testing.assert_close(level.cells, expected, rtol=1e-5, atol=1e-4 * 2**k)
    # With center_offset 0 the first cell's anchors are the base anchors; the next cell
    # along x is shifted by the stride. Feature maps 80, 40, 20, 10, 5 as in the test.
    assert [(lv.height, lv.width) for lv in grid.levels] == [(80, 80), (40, 40), (20, 20), (10, 10), (5, 5)]
    anchors = generate_anchors(config, (640, 640))
    torch.testing.assert_close(anchors[:9], tensor(MMDET_RETINA_BASE_P3), rtol=1e-5, atol=1e-4)
    assert torch.equal(anchors[9:18], anchors[:9] + torch.tensor([8.0, 0.0, 8.0, 0.0]))


# test_yolo_anchor_generator: base anchors (cell at the origin, centred at stride / 2).
MMDET_YOLO_BASE = {
    32: [[-42.0, -29.0, 74.0, 61.0], [-62.0, -83.0, 94.0, 115.0], [-170.5, -147.0, 202.5, 179.0]],
    16: [[-7.0, -22.5, 23.0, 38.5], [-23.0, -14.5, 39.0, 30.5], [-21.5, -51.5, 37.5, 67.5]],
    8: [[-1.0, -2.5, 9.0, 10.5], [-4.0, -11.0, 12.0, 19.0], [-12.5, -7.5, 20.5, 15.5]],
}


def test_mmdet_yolo_base_anchors_match_yolov5_preset():
    config = presets.get("yolov5").anchors
    canvas = (448, 576)  # feature maps (56, 72), (28, 36), (14, 18) as in the test
    grid = resolve_grid(config, canvas)
    anchors = generate_anchors(config, canvas)
    for level, start in zip(grid.levels, grid.level_starts):
        stride = 448 // level.height
        cells = level.height * level.width
        # YOLOv5's order is shape-major: shape k of cell (0, 0) is anchor start + k * cells.
        first_cell = anchors[[start + k * cells for k in range(3)]]
        assert torch.equal(first_cell, tensor(MMDET_YOLO_BASE[stride]))


# ---------------------------------------------------------------------------------------
# mmdet tests/test_core/test_bbox/test_coder/test_delta_xywh_bbox_coder.py
# ---------------------------------------------------------------------------------------


def test_mmdet_delta_xywh_decode():
    rois = tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]])
    deltas = tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]])
    expected = tensor([[0, 0, 1, 1], [0.1409, 0.1409, 2.8591, 2.8591], [0, 0.3161, 4.1945, 0.6839], [5, 5, 5, 5]])
    out = decode(deltas, rois, EncodeConfig())
    # mmdet clips decoded boxes to max_shape (32, 32); our decode does not clip, so the
    # one clipped coordinate (x1 = 0.5 - e^2 / 2 = -3.1945) is compared unclipped.
    expected[2, 0] = 0.5 - math.exp(2) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------
# torchvision test/test_ops.py (TestBoxIou) and detectron2 tests/structures/test_boxes.py
# ---------------------------------------------------------------------------------------


def test_torchvision_box_iou_int_boxes():
    boxes1 = tensor([[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300], [0, 0, 25, 25]])
    boxes2 = boxes1[:3]
    expected = torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0625, 0.25, 0.0]])
    torch.testing.assert_close(box_iou(boxes1, boxes2), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, side", [(torch.uint8, 20), (torch.int8, 20), (torch.int16, 200),
                                         (torch.int32, 50_000)])  # fmt: skip
def test_integer_boxes_areas_do_not_wrap(dtype, side):
    """Areas were taken in the boxes' own integer type: uint8 20 x 20 read 144 (an IoU of
    1.39), int8 0, int32 50,000 x 50,000 negative (an IoU of 0; torchvision's too)."""
    whole = torch.tensor([[0, 0, side, side]], dtype=dtype)
    half = torch.tensor([[0, 0, side, side // 2]], dtype=dtype)
    assert box_area(whole).tolist() == [side * side]
    assert box_iou(half, whole).tolist() == [[0.5]] and box_iof(half, whole).tolist() == [[1.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torchvision_box_iou_float_boxes(dtype):
    """16-bit boxes are computed in float32, as torchvision does (in float16 these areas,
    ~600,000, are infinite: every IoU read 0)."""
    boxes = tensor(
        [
            [285.3538, 185.5758, 1193.5110, 851.4551],
            [285.1472, 188.7374, 1192.4984, 851.0669],
            [279.2440, 197.9812, 1189.4746, 849.2019],
        ]
    ).to(dtype)
    expected = torch.tensor([[1.0, 0.9933, 0.9673], [0.9933, 1.0, 0.9737], [0.9673, 0.9737, 1.0]])
    atol = 1e-3 if dtype in (torch.float32, torch.float64) else 2e-2  # bfloat16 keeps 8 bits of the corners
    torch.testing.assert_close(box_iou(boxes, boxes).to(torch.float32), expected, rtol=0, atol=atol)
    torch.testing.assert_close(box_iof(boxes[:1], boxes[:1]).to(torch.float32), torch.ones(1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_and_decode_compute_16_bit_floats_in_float32(dtype):
    """As documented and as mmdet's ``bbox2delta`` does (it upcasts): float16 deltas were
    returned, rounded to 3 digits (-0.0692 for -0.0690)."""
    config = presets.get("fasterrcnn_rpn_torchvision").encode
    boxes, anchors = tensor([[10.0, 20.0, 110.0, 170.0]]), tensor([[12.0, 15.0, 118.0, 180.0]])
    deltas = encode(boxes, anchors, config)
    assert encode(boxes.to(dtype), anchors.to(dtype), config).dtype == torch.float32
    torch.testing.assert_close(encode(boxes.to(dtype), anchors.to(dtype), config), deltas, rtol=0, atol=1e-6)
    decoded = decode(deltas.to(dtype), anchors.to(dtype), config)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, decode(deltas.to(dtype).float(), anchors, config), rtol=0, atol=1e-4)


def test_box_functions_name_a_wrong_shape():
    with pytest.raises(ValueError, match=r"boxes1: expected shape \[N, 4\] \(x1, y1, x2, y2\), got \[2, 5\]"):
        box_iou(torch.zeros(2, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"boxes2: expected shape \[N, 4\] .*, got \[1, 2, 4\]"):
        box_iof(torch.zeros(2, 4), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match=r"boxes: expected a torch.Tensor, got list \(torch.as_tensor converts it\)"):
        box_area([[0, 0, 1, 1]])
    with pytest.raises(TypeError, match="deltas: expected floats, got torch.int64"):  # stds 0.1 became 0
        decode(torch.ones(1, 4, dtype=torch.int64), torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
               presets.get("fasterrcnn_rpn_torchvision").encode)  # fmt: skip


def test_detectron2_pairwise_iou():
    boxes1 = tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    boxes2 = tensor(
        [[0, 0, 1, 1], [0, 0, 0.5, 1], [0, 0, 1, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0.5, 0.5, 1.5, 1.5]]
    )
    row = [1.0, 0.5, 0.5, 0.25, 0.25, 0.25 / (2 - 0.25)]
    torch.testing.assert_close(box_iou(boxes1, boxes2), torch.tensor([row, row]))


# ---------------------------------------------------------------------------------------
# torchvision test/test_models_detection_anchor_utils.py
# ---------------------------------------------------------------------------------------


def test_torchvision_anchor_generator():
    # AnchorGenerator(((10,),), ((1,),)) on a 15 x 15 image with a 3 x 3 feature map
    # (stride 15 // 3 = 5), anchors at offset 0.
    level = AnchorLevel(stride=5, sizes=(10,), aspect_ratios=(1.0,))
    anchors = generate_anchors(AnchorConfig(layout="torchvision", levels=(level,)), (15, 15))
    expected = tensor([[x - 5, y - 5, x + 5, y + 5] for y in (0, 5, 10) for x in (0, 5, 10)])
    assert torch.equal(anchors, expected)


def test_torchvision_default_box_generator():
    # DefaultBoxGenerator([[2]]): scales (0.15, 0.9), no steps (one cell of a 1 x 1 map
    # covers the 15 x 15 image, i.e. step 15).
    level = AnchorLevel(stride=15, sizes=(0.15, 0.9), aspect_ratios=(2,), feature_size=(1, 1))
    boxes = generate_anchors(AnchorConfig(layout="ssd", levels=(level,)), (15, 15))
    expected = tensor(
        [
            [6.3750, 6.3750, 8.6250, 8.6250],
            [4.7443, 4.7443, 10.2557, 10.2557],
            [5.9090, 6.7045, 9.0910, 8.2955],
            [6.7045, 5.9090, 8.2955, 9.0910],
        ]
    )
    torch.testing.assert_close(boxes, expected, rtol=1e-5, atol=1e-4)


def test_torchvision_fpn_stride_is_integer_division():
    # AnchorGenerator.forward: stride = image_size // feature_size per axis, so P6 of an
    # 800 x 1344 canvas (feature map 13 x 21) has strides 61 (y) and 64 (x).
    grid = resolve_grid(presets.get("retinanet_torchvision").anchors, (800, 1344))
    p6 = grid.levels[3]
    assert (p6.height, p6.width, p6.factor_y, p6.factor_x) == (13, 21, 61, 64)


# ---------------------------------------------------------------------------------------
# d2l, chapter "Anchor Boxes" (multibox_prior / multibox_target worked examples)
# ---------------------------------------------------------------------------------------


def test_d2l_multibox_prior_example():
    # multibox_prior on a 561 x 728 image, sizes [0.75, 0.5, 0.25], ratios [1, 2, 0.5]:
    # 561 * 728 * 5 anchors; the first anchor centred on pixel (250, 250) is
    # [0.06, 0.07, 0.63, 0.82] in image fractions (printed to 2 decimals).
    height, width = 561, 728
    level = AnchorLevel(stride=1, sizes=(0.75, 0.5, 0.25), aspect_ratios=(1, 2, 0.5), feature_size=(height, width))
    config = AnchorConfig(layout="d2l", levels=(level,))
    grid = resolve_grid(config, (height, width))
    assert grid.num_anchors == 2042040
    anchor = grid.levels[0]
    cells = anchor.cells.shape[0]
    index = (250 * width + 250) * cells
    box = generate_anchors(config, (height, width))[index] / torch.tensor([width, height, width, height])
    torch.testing.assert_close(box, torch.tensor([0.06, 0.07, 0.63, 0.82]), rtol=0, atol=0.005)


def test_d2l_multibox_prior_orders_sizes_then_ratios():
    # The same example's five anchors centred on pixel (250, 250): every size with the first
    # ratio, then the first size with the other ratios; w = s * sqrt(r) * 561 / 728, h = s / sqrt(r).
    height, width = 561, 728
    level = AnchorLevel(stride=1, sizes=(0.75, 0.5, 0.25), aspect_ratios=(1, 2, 0.5), feature_size=(height, width))
    index = (250 * width + 250) * 5
    boxes = generate_anchors(AnchorConfig(layout="d2l", levels=(level,)), (height, width))[index : index + 5]
    expected = torch.tensor(
        [
            [0.0551, 0.0715, 0.6331, 0.8215],
            [0.1514, 0.1965, 0.5367, 0.6965],
            [0.2478, 0.3215, 0.4404, 0.5715],
            [-0.0646, 0.1814, 0.7528, 0.7117],
            [0.1398, -0.0838, 0.5484, 0.9769],
        ]
    )
    torch.testing.assert_close(boxes / torch.tensor([width, height, width, height]), expected, rtol=0, atol=1e-4)


def test_d2l_tinyssd_anchor_count():
    # Chapter "Single Shot Multibox Detection": TinySSD on 256 x 256 has 5444 anchors.
    assert generate_anchors(presets.get("d2l_multibox").anchors, (256, 256)).shape == (5444, 4)


def test_d2l_tinyssd_last_level_anchors_follow_its_ratios_order():
    # TinySSD's ratios [1, 2, 0.5]: the 1 x 1 level holds sizes 0.88, 0.961 at ratio 1, then 0.88 at 2 and 0.5
    half = [0.44, 0.4805, 0.44 * math.sqrt(2), 0.44 / math.sqrt(2)]  # half widths; half heights swap the last two
    expected = torch.tensor([[0.5 - w, 0.5 - h, 0.5 + w, 0.5 + h] for w, h in zip(half, half[:2] + half[:1:-1])])
    anchors = generate_anchors(presets.get("d2l_multibox").anchors, (256, 256))[-4:] / 256
    torch.testing.assert_close(anchors, expected, rtol=0, atol=1e-6)


def test_d2l_multibox_target_dog_and_cat():
    # Ground truth: dog (class 0) and cat (class 1), five anchors A0..A4, all in image
    # fractions. d2l's answer: classes [0, 1, 2, 0, 2] (background 0, dog 1, cat 2);
    # A4 is the cat's best anchor, A1 the dog's, A2 overlaps the cat above 0.5.
    dog_cat = [[0.1, 0.08, 0.52, 0.92], [0.55, 0.2, 0.9, 0.88]]
    anchors = [
        [0, 0.1, 0.2, 0.3],
        [0.15, 0.2, 0.4, 0.4],
        [0.63, 0.05, 0.88, 0.98],
        [0.66, 0.45, 0.8, 0.8],
        [0.57, 0.3, 0.92, 0.9],
    ]
    config = presets.get("d2l_multibox")
    t = run(
        anchors, dog_cat, canvas=(1, 1), match=config.match, encode=config.encode,
        gt_classes=torch.tensor([1, 2]),
    )  # fmt: skip
    assert t.classes[0].tolist() == [0, 1, 2, 0, 2]
    assert t.labels[0].tolist() == [0, 1, 1, 0, 1]  # d2l's bbox_mask, one flag per anchor
    assert t.matched_gt[0].tolist() == [-1, 0, 1, -1, 1]
    # d2l's offsets (printed to 3 significant digits; d2l adds 1e-6 inside the log, which
    # is why its A4 dw reads 4e-06 rather than 0).
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [1.40, 10.0, 2.59, 7.18],
            [-1.20, 0.269, 1.68, -1.57],
            [0.0, 0.0, 0.0, 0.0],
            [-0.571, -1.00, 0.0, 0.626],
        ]
    )
    torch.testing.assert_close(t.deltas[0], expected, rtol=5e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------
# keras-retinanet tests/utils/test_anchors.py
# ---------------------------------------------------------------------------------------


def test_keras_anchors_for_shape_values():
    # sizes [12], strides [8], ratios [1, 2], scales [1, 2] on a 16 x 16 image: a 2 x 2
    # map, centres at (i + 0.5) * 8; ratio-outer, scale-inner; width size*scale/sqrt(r),
    # height size*scale*sqrt(r) (ratio = h / w).
    level = AnchorLevel(stride=8, sizes=(12, 24), aspect_ratios=(1, 2))
    anchors = generate_anchors(AnchorConfig(layout="keras", levels=(level,)), (16, 16))
    expected = []
    for cy in (4.0, 12.0):
        for cx in (4.0, 12.0):
            for ratio in (1, 2):
                for scale in (1, 2):
                    w, h = 12 * scale / math.sqrt(ratio), 12 * scale * math.sqrt(ratio)
                    expected.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    torch.testing.assert_close(anchors, tensor(expected), rtol=0, atol=1e-5)


def test_keras_anchors_for_shape_dimensions():
    # sizes [32, 64, 128], strides [8, 16, 32], ratios [0.5, 1, 2, 3], scales [1, 1.2, 1.6]
    # on a 64 x 64 image: 1008 anchors.
    levels = tuple(
        AnchorLevel(stride=s, sizes=tuple(size * k for k in (1, 1.2, 1.6)), aspect_ratios=(0.5, 1, 2, 3))
        for s, size in ((8, 32), (16, 64), (32, 128))
    )
    assert generate_anchors(AnchorConfig(layout="keras", levels=levels), (64, 64)).shape == (1008, 4)


# ---------------------------------------------------------------------------------------
# DALI operators/ssd/box_encoder.cc: a match needs IoU > criteria (strict)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict, label", [(True, 0), (False, 1)])
def test_dali_strict_criteria(strict, label):
    # Anchor [0, 0, 10, 10] vs box [0, 0, 10, 5]: IoU exactly 0.5 = criteria. DALI does
    # not match it and so makes it background (label 0), not "ignored": with strict_high
    # and high == low the two rules must split [0, 1] with nothing in between. The
    # second anchor (IoU 1) is positive either way; with >= the first one is too.
    match = MatchConfig(high=0.5, low=0.5, strict_high=strict, low_quality="none")
    t = run([[0, 0, 10, 10], [0, 0, 10, 5]], [[0, 0, 10, 5]], match=match)
    assert t.labels[0].tolist() == [label, 1]


# ---------------------------------------------------------------------------------------
# Encoding: torchvision BoxCoder / detectron2 Box2BoxTransform invariant
# ---------------------------------------------------------------------------------------


def test_encode_known_values_and_round_trip():
    # Box [0, 0, 20, 10] on anchor [0, 0, 10, 10]: centres 10 vs 5, width 20 vs 10, so
    # (dx, dy, dw, dh) = (0.5, 0, log 2, 0); weights (10, 10, 5, 5) scale each term.
    box, anchor = tensor([[0, 0, 20, 10]]), tensor([[0, 0, 10, 10]])
    config = EncodeConfig(weights=(10.0, 10.0, 5.0, 5.0))
    deltas = encode(box, anchor, config)
    torch.testing.assert_close(deltas, torch.tensor([[5.0, 0.0, 5 * math.log(2), 0.0]]))
    # detectron2 Box2BoxTransform: target == apply_deltas(get_deltas(src, target), src).
    torch.testing.assert_close(decode(deltas, anchor, config), box)
