"""The reference backend on hand-built cases whose every IoU is known (DESIGN §4).

Anchors are explicit so each case is a few boxes; IoUs are exact fractions.
"""

import math

import numpy as np
import pytest
import torch

from support import IOF_AT_THRESHOLD, random_batch
from tritarget.kernels import (
    TargetConfig,
    Targets,
    assign,
    assign_sparse,
    box_iof,
    box_iou,
    decode,
    encode,
    generate_anchors,
    presets,
)
from tritarget.kernels.config import AnchorConfig, AnchorLevel, EncodeConfig, MatchConfig
from tritarget.kernels.sampling import _draw, fresh_seed, image_seeds
from tritarget.kernels.targets import filled

CANVAS = (64, 96)
# Any anchor config will do: explicit anchors replace the generated ones.
ANCHORS = AnchorConfig(layout="torchvision", levels=(AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1.0,)),))


def run(anchors, boxes, counts=None, backend="reference", **match):
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(**match))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    counts = [boxes.shape[0]] if counts is None else counts
    return assign(boxes, counts, CANVAS, config, anchors=torch.tensor(anchors, dtype=torch.float32), backend=backend)


# a0 is the best anchor of both boxes; box 0 overlaps it more (IoU 0.4) than box 1 (1/3).
# a1 touches nothing. With high=0.5, low=0.3, a0 is only positive through a low-quality rule.
LQ_ANCHORS = [[0, 0, 10, 10], [100 - 40, 40, 110 - 40, 50]]
LQ_BOXES = [[0, 0, 25, 10], [0, 0, 30, 10]]


@pytest.mark.parametrize(
    ("mode", "labels", "matched"),
    [
        ("none", [-1, 0], [-1, -1]),  # 0.4 lies in [low, high): ignored
        ("torchvision", [1, 0], [0, -1]),  # lifted, matched to its own argmax (box 0)
        ("detectron2", [1, 0], [0, 0]),  # same, and a1 keeps its argmax (box 0 on a 0-0 tie)
        ("mmdet", [1, 0], [1, -1]),  # lifted by box 0, then overwritten by the later box 1
        ("ssd_forced", [1, 0], [1, -1]),  # both boxes force a0; the later box wins
    ],
)
def test_low_quality_modes(mode, labels, matched):
    t = run(LQ_ANCHORS, LQ_BOXES, high=0.5, low=0.3, low_quality=mode)
    assert t.labels[0].tolist() == labels
    assert t.matched_gt[0].tolist() == matched


def test_min_pos_iou_keeps_weak_boxes_out():
    # Box 1's best IoU (1/3) is below 0.35: only box 0 lifts a0 under mmdet's rule.
    t = run(LQ_ANCHORS, LQ_BOXES, high=0.5, low=0.3, low_quality="mmdet", min_pos_iou=0.35)
    assert t.matched_gt[0].tolist() == [0, -1]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["torchvision", "mmdet", "ssd_forced"])
def test_a_box_whose_best_iou_equals_min_pos_iou_still_lifts(mode, backend):
    """mmdet's ``max_overlaps >= min_pos_iou``: box 0's best IoU is exactly 0.4 (100 / 250),
    so with min_pos_iou=0.4 it lifts a0; box 1's (1/3) does not."""
    t = run(LQ_ANCHORS, LQ_BOXES, high=0.5, low=0.3, low_quality=mode, min_pos_iou=0.4, backend=backend)
    assert t.labels[0].tolist() == [1, 0]
    assert t.matched_gt[0].tolist() == [0, -1]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_max_iou_is_each_anchors_best_iou_over_the_boxes(backend):
    """return_max_iou gives the best IoU over the image's boxes, unclamped: 1 for an anchor
    equal to a box, 0.4 for a0 with LQ_BOXES, 0 where no box touches the anchor or the
    image has none."""
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(high=0.5, low=0.3))
    anchors = torch.tensor(LQ_ANCHORS + [[30, 30, 40, 40]], dtype=torch.float32)
    boxes = torch.tensor(LQ_BOXES + [[30, 30, 40, 40]], dtype=torch.float32)
    got = assign(boxes, [3, 0], CANVAS, config, anchors=anchors, return_max_iou=True, backend=backend)
    assert got.max_iou.tolist() == [[pytest.approx(0.4), 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_strict_high_excludes_equality():
    boxes = [[0, 0, 20, 10]]  # IoU with a0 is exactly 0.5
    assert run(LQ_ANCHORS, boxes, high=0.5, low=0.3, low_quality="none").labels[0].tolist() == [1, 0]
    assert run(LQ_ANCHORS, boxes, high=0.5, low=0.3, low_quality="none", strict_high=True).labels[0].tolist() == [
        -1,
        0,
    ]


def test_ties_torchvision_lifts_every_tied_anchor_ssd_forces_the_lowest():
    anchors = [[0, 0, 10, 10], [0, 0, 10, 10], [40, 40, 50, 50]]
    boxes = [[0, 0, 20, 10]]  # 0.5 with both a0 and a1
    tv = run(anchors, boxes, high=0.6, low=0.3, low_quality="torchvision")
    assert tv.labels[0].tolist() == [1, 1, 0]
    ssd = run(anchors, boxes, high=0.6, low=0.3, low_quality="ssd_forced")
    assert ssd.labels[0].tolist() == [1, -1, 0]


def test_argmax_ties_between_boxes_take_the_lowest_box_index():
    boxes = [[0, 0, 20, 10], [0, 0, 10, 20]]  # both IoU 0.5 with a0
    t = run(LQ_ANCHORS, boxes, high=0.5, low=0.3, low_quality="none")
    assert t.matched_gt[0].tolist() == [0, -1]


# a0 overlaps box g a lot (5/6) but lies 40% inside the ignore region [0, 4] x [0, 10];
# a1 overlaps g less (7/15).
IGN_ANCHORS = [[0, 0, 10, 10], [5, 0, 15, 10]]
IGN_BOX = [[0, 0, 12, 10]]


def run_ignore(threshold, wrt_anchor=True):
    config = TargetConfig(
        anchors=ANCHORS,
        match=MatchConfig(high=0.5, low=0.4, ignore_iof_thr=threshold, ignore_iof_wrt_anchor=wrt_anchor),
    )
    return assign(
        torch.tensor(IGN_BOX, dtype=torch.float32),
        [1],
        CANVAS,
        config,
        anchors=torch.tensor(IGN_ANCHORS, dtype=torch.float32),
        ignore_boxes=torch.tensor([[0.0, 0.0, 4.0, 10.0]]),
        ignore_counts=[1],
        backend="reference",
    )


def test_ignore_region_excludes_anchor_from_matching():
    without = run_ignore(-1)
    assert without.labels[0].tolist() == [1, -1]  # a1 (7/15) sits in [0.4, 0.5)
    with_ignore = run_ignore(0.3)  # IoF of a0 = 40/100 > 0.3
    # a0 is ignored and no longer g's best anchor: a1 becomes g's best and is lifted.
    assert with_ignore.labels[0].tolist() == [-1, 1]
    assert with_ignore.matched_gt[0].tolist() == [-1, 0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_ignore_threshold_of_zero_is_off_as_in_mmdet(backend):
    """mmdet's MaxIoUAssigner applies ``ignore_iof_thr`` only when it is > 0."""
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(high=0.5, low=0.4, ignore_iof_thr=0.0))
    got = assign(torch.tensor(IGN_BOX, dtype=torch.float32), [1], CANVAS, config,
                 anchors=torch.tensor(IGN_ANCHORS, dtype=torch.float32),
                 ignore_boxes=torch.tensor([[0.0, 0.0, 4.0, 10.0]]), ignore_counts=[1], backend=backend)  # fmt: skip
    assert got.labels[0].tolist() == run_ignore(-1).labels[0].tolist() == [1, -1]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_anchor_inside_any_one_of_several_ignore_regions_is_excluded(backend):
    """mmdet compares an anchor's largest IoF over the image's ignore regions: one region
    over the threshold excludes it, whatever the others (here a far-away first region)."""
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(high=0.5, low=0.4, ignore_iof_thr=0.3))
    regions = torch.tensor([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 4.0, 10.0]])
    got = assign(torch.tensor(IGN_BOX, dtype=torch.float32), [1], CANVAS, config,
                 anchors=torch.tensor(IGN_ANCHORS, dtype=torch.float32), ignore_boxes=regions, ignore_counts=[2],
                 backend=backend)  # fmt: skip
    assert got.labels[0].tolist() == run_ignore(0.3).labels[0].tolist() == [-1, 1]
    assert got.matched_gt[0].tolist() == [-1, 0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ignore_regions_apply_to_their_own_image_only(backend):
    """ignore_counts splits the regions by image: image 1's region excludes a0 there, and
    image 0 (no region) matches as without one."""
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(high=0.5, low=0.4, ignore_iof_thr=0.3))
    got = assign(torch.tensor(IGN_BOX * 2, dtype=torch.float32), [1, 1], CANVAS, config,
                 anchors=torch.tensor(IGN_ANCHORS, dtype=torch.float32),
                 ignore_boxes=torch.tensor([[0.0, 0.0, 4.0, 10.0]]), ignore_counts=[0, 1], backend=backend)  # fmt: skip
    assert got.labels.tolist() == [[1, -1], [-1, 1]]
    assert got.matched_gt.tolist() == [[0, -1], [-1, 0]]


def test_ignore_iof_relative_to_the_ignore_box():
    assert run_ignore(0.5, wrt_anchor=True).labels[0].tolist() == [1, -1]  # 0.4 is not > 0.5
    assert run_ignore(0.5, wrt_anchor=False).labels[0].tolist() == [-1, 1]  # 40/40 = 1 > 0.5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("wrt_anchor", "anchors", "region"), IOF_AT_THRESHOLD)
def test_an_iof_equal_to_the_threshold_leaves_the_anchor_in_matching(backend, wrt_anchor, anchors, region):
    """README: an anchor is taken out when its IoF with a crowd box *exceeds*
    ``ignore_iof_thr``; at exactly the threshold it stays (negative here), just above it
    it is ignored."""
    match = MatchConfig(high=0.5, low=0.4, ignore_iof_thr=0.5, ignore_iof_wrt_anchor=wrt_anchor)
    anchors, region = torch.tensor(anchors, dtype=torch.float32), torch.tensor([region], dtype=torch.float32)
    got = assign(torch.tensor([[40.0, 40.0, 50.0, 50.0]]), [1], CANVAS, TargetConfig(anchors=ANCHORS, match=match),
                 anchors=anchors, ignore_boxes=region, ignore_counts=[1], backend=backend)  # fmt: skip
    assert got.labels[0].tolist() == [0, -1, 1]
    assert got.matched_gt[0].tolist() == [-1, -1, 0]


def test_border_pre_match_and_post_match():
    anchors = [[-5, 0, 5, 10], [5, 0, 15, 10]]  # a0 crosses the left border
    boxes = [[0, 0, 6, 10]]  # IoU 5/11 with a0, 1/15 with a1
    pre = run(anchors, boxes, high=0.5, low=0.3, allowed_border=0, border_order="pre_match")
    assert pre.labels[0].tolist() == [-1, 1]  # a0 left out: a1 becomes the box's best
    post = run(anchors, boxes, high=0.5, low=0.3, allowed_border=0, border_order="post_match")
    assert post.labels[0].tolist() == [-1, 0]  # a0 lifted, then ignored for crossing
    generous = run(anchors, boxes, high=0.5, low=0.3, allowed_border=5, border_order="pre_match")
    assert generous.labels[0].tolist() == [1, 0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_anchor_ignored_after_matching_keeps_no_matched_box(backend):
    """With ``border_order="post_match"`` a0 is lifted (box 0's best) and then ignored for
    crossing the border: matched_gt is -1 everywhere but on positives, so it is -1 there."""
    anchors, boxes = [[-5, 0, 5, 10], [5, 0, 15, 10]], [[0, 0, 6, 10]]
    post = run(anchors, boxes, high=0.5, low=0.3, allowed_border=0, border_order="post_match", backend=backend)
    assert post.labels[0].tolist() == [-1, 0]
    assert post.matched_gt[0].tolist() == [-1, -1]
    kept = run(anchors, boxes, high=0.5, low=0.3, allowed_border=-1, border_order="post_match", backend=backend)
    assert kept.labels[0].tolist() == [1, 0] and kept.matched_gt[0].tolist() == [0, -1]


def test_border_uses_each_images_valid_size():
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(allowed_border=0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    t = assign(boxes, [1, 1], CANVAS, config, anchors=anchors, image_sizes=[[64, 96], [64, 45]], backend="reference")
    assert t.labels.tolist() == [[1, 0], [1, -1]]


def test_empty_image_is_all_negative_except_excluded():
    t = run(LQ_ANCHORS, [], counts=[0], allowed_border=0)
    assert t.labels[0].tolist() == [0, 0]
    crossing = run([[-5, 0, 5, 10]], [], counts=[0], allowed_border=0)
    assert crossing.labels[0].tolist() == [-1]


def test_deltas_and_classes_of_positives():
    config = TargetConfig(anchors=ANCHORS, match=MatchConfig(high=0.5, low=0.4), background_class=7)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = torch.tensor([[1.0, 2.0, 11.0, 14.0]])
    t = assign(
        boxes, [1], CANVAS, config, anchors=anchors, gt_classes=torch.tensor([3]), backend="reference",
        return_max_iou=True,
    )  # fmt: skip
    assert t.labels[0].tolist() == [1, 0]
    assert t.classes[0].tolist() == [3, 7]
    # dx = (6 - 5) / 10, dy = (8 - 5) / 10, dw = log(10 / 10), dh = log(12 / 10)
    expected = torch.tensor([0.1, 0.3, 0.0, torch.log(torch.tensor(1.2)).item()])
    torch.testing.assert_close(t.deltas[0, 0], expected)
    assert (t.deltas[0, 1] == 0).all()
    assert t.max_iou[0, 0].item() == pytest.approx(72 / (100 + 120 - 72))
    assert t.max_iou[0, 1].item() == 0.0


def test_encode_decode_round_trip(generator):
    boxes, _ = random_batch(generator, [50], (512, 512))
    anchors, _ = random_batch(generator, [50], (512, 512))
    for config in (
        EncodeConfig(),
        EncodeConfig(weights=(10.0, 10.0, 5.0, 5.0)),
        EncodeConfig(means=(0.1, -0.1, 0.0, 0.2), stds=(0.1, 0.1, 0.2, 0.2)),
    ):
        torch.testing.assert_close(decode(encode(boxes, anchors, config), anchors, config), boxes, rtol=1e-5, atol=1e-3)


def test_iou_and_iof_are_zero_where_they_divide_by_zero():
    """As the docstrings say (torchvision gives NaN): IoU where the union is 0 (two boxes
    of no area), IoF where the first box has no area; a box of area meets one (a
    mutation review: no test held either)."""
    point, line, box = [[5.0, 5.0, 5.0, 5.0]], [[0.0, 5.0, 10.0, 5.0]], [[0.0, 0.0, 10.0, 10.0]]
    assert box_iou(torch.tensor(point), torch.tensor(point + line)).tolist() == [[0.0, 0.0]]
    assert box_iof(torch.tensor(line), torch.tensor(box)).tolist() == [[0.0]]
    assert box_iof(torch.tensor(box), torch.tensor(line)).tolist() == [[0.0]]


def test_iou_and_iof_are_nan_where_a_coordinate_is_nan():
    """As torchvision's ``box_iou`` gives them: they read 0 (no overlap), hiding the bad data
    (``assign`` refuses such a box by name; the helpers compute what they are given)."""
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    for column in range(4):
        bad = box.clone()
        bad[0, column] = float("nan")
        assert box_iou(bad, box).isnan().all() and box_iou(box, bad).isnan().all(), column
        assert box_iof(bad, box).isnan().all() and box_iof(box, bad).isnan().all(), column
    assert box_iou(box, torch.tensor([[0.0, 0.0, float("inf"), 10.0]])).tolist() == [[0.0]]


def test_each_weight_scales_its_own_offset():
    """Every preset's weights pair x with y and w with h (10, 10, 5, 5): a weight applied to
    another offset went unseen (a mutation review). Known answer: centres (8, 4) -> (20, 6),
    sizes 16 x 8 -> 32 x 8."""
    config = EncodeConfig(weights=(1.0, 2.0, 3.0, 4.0))
    anchors, boxes = torch.tensor([[0.0, 0.0, 16.0, 8.0]]), torch.tensor([[4.0, 2.0, 36.0, 10.0]])
    deltas = encode(boxes, anchors, config)
    torch.testing.assert_close(deltas, torch.tensor([[0.75, 0.5, 3 * math.log(2.0), 0.0]]))
    torch.testing.assert_close(decode(deltas, anchors, config), boxes)


def test_decode_clamps_huge_scales():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchors, EncodeConfig())
    assert torch.isfinite(boxes).all()
    assert (boxes[0, 2] - boxes[0, 0]).item() == pytest.approx(1000.0, rel=1e-4)


@pytest.mark.parametrize("name", presets.names())
def test_sparse_round_trip_every_preset(name, generator):
    config = presets.get(name)
    canvas = (96, 128)
    boxes, counts = random_batch(generator, [3, 0, 12], canvas)
    classes = torch.randint(1, 80, (boxes.shape[0],), generator=generator)
    dense = assign(boxes, counts, canvas, config, gt_classes=classes, backend="reference")
    back = Targets.from_sparse(dense.to_sparse())
    assert torch.equal(back.labels, dense.labels)
    assert torch.equal(back.deltas, dense.deltas)
    assert torch.equal(back.classes, dense.classes)
    positive = dense.labels == 1
    assert torch.equal(back.matched_gt[positive], dense.matched_gt[positive])
    if config.match.low_quality != "detectron2":
        assert torch.equal(back.matched_gt, dense.matched_gt)


@pytest.mark.parametrize(
    "shape, value, dtype",
    [((3, 5), -1, torch.int32), ((2, 4), 7, torch.int8), ((2, 3), 0, torch.float32),
     ((1, 201_600, 4), 0, torch.float32), ((1, 201_600), 91, torch.int32),
     ((2, 201_600), -1, torch.int32), ((8, 201_600), -1, torch.int8), ((2, 201_600), 91, torch.int32)],
)  # fmt: skip
def test_dense_outputs_are_filled_like_torch_full_each_in_its_own_memory(shape, value, dtype):
    """``filled`` (numpy's fill, or zero pages from the kernel for a megabyte of zeros;
    a megabyte or more of any other value is filled with that value)."""
    first, second = filled(shape, value, dtype, torch.device("cpu")), filled(shape, value, dtype, "cpu")
    assert torch.equal(first, torch.full(shape, value, dtype=dtype))
    first.view(-1)[[0, -1]] = 3
    assert second.view(-1)[0] == value and second.view(-1)[-1] == value


def test_dense_targets_from_sparse_of_full_size_images_match_nothing_off_the_positives():
    """Two RetinaNet images at 800x1344: ``matched_gt`` (1.6 MB of int32) is -1 wherever
    the anchor is not positive, as the dense solve has it."""
    canvas, config = (800, 1344), presets.get("retinanet_torchvision")
    boxes, counts = random_batch(torch.Generator().manual_seed(3), [7, 4], canvas)
    dense = assign(boxes, counts, canvas, config, backend="cpu")
    back = Targets.from_sparse(assign_sparse(boxes, counts, canvas, config, backend="cpu"))
    assert back.matched_gt.shape == (2, 201_600)
    positive = back.labels == 1
    assert 0 < int(positive.sum()) < 1000
    assert bool((back.matched_gt[~positive] == -1).all())
    assert torch.equal(back.matched_gt, dense.matched_gt)
    assert torch.equal(back.labels, dense.labels)


def test_anchors_grouped_by_level_in_documented_order():
    config = presets.get("retinanet_torchvision").anchors
    anchors = generate_anchors(config, (800, 1344))
    assert anchors.shape == (201_600, 4)  # 9 x (100x168 + 50x84 + 25x42 + 13x21 + 7x11)
    # location-major: the 9 shapes of cell (0, 0), then cell (0, 1) shifted by the stride.
    torch.testing.assert_close(anchors[9] - anchors[0], torch.tensor([8.0, 0.0, 8.0, 0.0]))
    yolo = generate_anchors(presets.get("yolov5").anchors, (64, 64))
    # shape-major (YOLOv5's [na, ny, nx]): the first 8 x 8 anchors all have shape (10, 13).
    widths = yolo[:64, 2] - yolo[:64, 0]
    assert torch.all(widths == 10.0)


class TestSampling:
    CONFIG = presets.get("retinanet_torchvision").replace(**{"match.sample_size": 64, "match.positive_fraction": 0.25})

    def test_quota_and_determinism(self, generator):
        boxes, counts = random_batch(generator, [30, 2], (128, 192))
        a = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=5)
        b = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=5)
        c = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=6)
        assert torch.equal(a.labels, b.labels)
        assert not torch.equal(a.labels, c.labels)
        for row in a.labels:
            assert int((row == 1).sum()) <= 16
            assert int((row >= 0).sum()) == 64
        dropped = a.labels != 1
        assert (a.deltas[dropped] == 0).all() and (a.matched_gt[dropped] == -1).all()

    def test_without_a_seed_each_call_samples_anew_under_torchs_seed(self, generator):
        """A fixed default seed kept the same negatives every iteration of a training run;
        the default draws from torch's global generator, as torchvision's sampler does."""
        boxes, counts = random_batch(generator, [30, 2], (128, 192))
        first = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference")
        second = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference")
        assert not torch.equal(first.labels, second.labels)
        torch.manual_seed(1234)
        reference = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference")
        torch.manual_seed(1234)
        assert torch.equal(assign(boxes, counts, (128, 192), self.CONFIG, backend="cpu").labels, reference.labels)

    def test_seed_takes_numpy_and_tensor_integers_and_names_the_rest(self, generator):
        boxes, counts = random_batch(generator, [30, 2], (128, 192))
        expected = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=3).labels
        for seed in (np.int64(3), torch.tensor(3), [np.int32(3), 4], torch.tensor([3, 4])):
            assert torch.equal(assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=seed).labels,
                               expected)  # fmt: skip
        refused = ((3.0, TypeError, "seed: expected an int or 2 ints"),
                   (torch.tensor([3, 4, 5]), ValueError, "seed: expected an int or 2 ints"),
                   (True, TypeError, "seed"), ("3", TypeError, "seed"),
                   (2**70, ValueError, "seed: .* is outside what a torch.Generator takes"))  # fmt: skip
        for seed, error, message in refused:
            with pytest.raises(error, match=message):
                assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=seed)

    def test_seeds_at_the_edges_of_what_a_generator_takes(self, generator):
        """torch.Generator takes seeds in [-2**63, 2**64): each end samples (the last image's
        seed included), one past it is refused by name; a one-element seed tensor is one
        image's seed, not an int for every image."""
        boxes, counts = random_batch(generator, [30, 2], (128, 192))

        def labels(seed):
            return assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=seed).labels

        low, high = -(2**63), 2**64 - 1
        assert torch.equal(labels(low), labels([low, low + 1]))
        assert torch.equal(labels(high - 1), labels([high - 1, high]))
        for seed in (high, [high + 1, 0], [low - 1, 0], low - 1):
            with pytest.raises(ValueError, match=r"seed: -?\d+ is outside what a torch.Generator takes"):
                labels(seed)
        with pytest.raises(ValueError, match="seed: expected an int or 2 ints"):
            labels(torch.tensor([3]))

    # (row size, every k-th anchor a member, members to keep, seed) -> the members kept, in
    # the order drawn: a permutation where members are rare (under a quarter of the row) or
    # most are kept; draws over the whole row otherwise, at both boundaries in the first.
    PINNED = {(64, 4, 8, 1): [12, 8, 0, 16, 60, 20, 28, 4],
              (64, 8, 3, 2): [0, 32, 56],
              (200, 2, 30, 3): [186, 48, 160, 80, 40, 114, 14, 84, 156, 6, 72, 18, 94, 170, 50, 4, 82, 0, 62, 74, 96,
                                134, 16, 136, 54, 166, 12, 44, 110, 192]}  # fmt: skip

    @pytest.mark.parametrize("case", PINNED)
    def test_the_members_a_seed_draws_are_pinned(self, case):
        """What a seed samples is part of the contract: a training run repeated with its
        seeds, on any backend or release, gets the same anchors (a mutation review: the
        way of drawing and its boundaries were pinned by no test)."""
        size, every, count, seed = case
        members = np.zeros(size, dtype=bool)
        members[::every] = True
        drawn = _draw(members, int(members.sum()), count, torch.Generator().manual_seed(seed))
        assert drawn.tolist() == self.PINNED[case]

    @pytest.mark.parametrize("seed", [3, np.int64(3), torch.tensor(3), [3, 4], (np.int32(3), torch.tensor(4))],
                             ids=["int", "numpy", "tensor", "list", "mixed"])  # fmt: skip
    def test_image_seeds_gives_exactly_one_seed_per_image(self, seed):
        """The service concatenates ``image_seeds`` over the requests of a merged batch, so
        each request must give exactly one seed per image, whatever integer type its seed
        is (a mutation review: a numpy seed could give one seed too many unnoticed)."""
        assert image_seeds(seed, 2) == [3, 4]

    @pytest.mark.parametrize("seed", [[3.0, 4], [True, 4], ["3", 4], [None, 4]])
    def test_a_seed_list_with_a_non_integer_is_refused_by_name(self, seed):
        """A list holding something other than an integer is refused as not one int per
        image, not reported as a seed "outside what a torch.Generator takes"."""
        with pytest.raises(ValueError, match=r"seed: expected an int or 2 ints \(one per image\), got \["):
            image_seeds(seed, 2)

    def test_fresh_seed_draws_once_from_the_generator_it_is_given(self):
        """``fresh_seed(generator)`` (a loader's stream of batch seeds) draws from that
        generator only: two generators seeded alike give the same seed, and torch's global
        generator is left as it was."""
        state = torch.get_rng_state()
        first, second = (fresh_seed(torch.Generator().manual_seed(9)) for _ in range(2))
        assert first == second and 0 <= first < 2**62
        assert torch.equal(torch.get_rng_state(), state)
        generator = torch.Generator().manual_seed(9)
        assert fresh_seed(generator) == first and fresh_seed(generator) != first  # one draw each

    def test_negatives_fill_the_places_the_positives_leave(self, generator):
        """Fewer positives than the quota: negatives fill the rest of the sample, as
        torchvision's ``num_neg = batch_size_per_image - num_pos`` does (a mutation review:
        a sample capped at ``sample_size - quota`` negatives passed every test)."""
        boxes = torch.tensor([[20.0, 20.0, 44.0, 44.0]])
        for seed in range(3):
            got = assign(boxes, [1], (128, 192), self.CONFIG, backend="reference", seed=seed)
            positives = int((got.labels == 1).sum())
            assert 0 < positives < 16
            assert int((got.labels == 0).sum()) == 64 - positives

    def test_positives_sampled_away_get_the_background_class(self, generator):
        """A positive left out of the sample is ignored and gets the background class (80
        here, not 0), as every anchor that is not positive has; the kept positives keep
        their boxes' classes (a mutation review: no test looked at classes after sampling)."""
        config = self.CONFIG.replace(background_class=80)
        boxes, counts = random_batch(generator, [30], (128, 192))
        classes = torch.arange(1, 31, dtype=torch.int64)
        unsampled = assign(boxes, counts, (128, 192), config.replace(**{"match.sample_size": 0}), gt_classes=classes,
                           backend="reference")  # fmt: skip
        got = assign(boxes, counts, (128, 192), config, gt_classes=classes, backend="reference", seed=2)
        dropped = (unsampled.labels == 1) & (got.labels == -1)
        kept = got.labels == 1
        assert bool(dropped.any()) and bool(kept.any())
        assert bool((got.classes[got.labels != 1] == 80).all())
        assert torch.equal(got.classes[kept], unsampled.classes[kept])

    def test_image_sample_does_not_depend_on_its_batch(self, generator):
        boxes, counts = random_batch(generator, [30, 7], (128, 192))
        batch = assign(boxes, counts, (128, 192), self.CONFIG, backend="reference", seed=[11, 12])
        alone = assign(boxes[30:], [7], (128, 192), self.CONFIG, backend="reference", seed=12)
        assert torch.equal(batch.labels[1], alone.labels[0])

    def test_positive_quota_rounds_down(self, generator):
        """At most ``int(sample_size * positive_fraction)`` positives, as torchvision's
        sampler counts them: 10 x 0.35 = 3.5 keeps 3, and negatives fill the other 7."""
        config = self.CONFIG.replace(**{"match.sample_size": 10, "match.positive_fraction": 0.35})
        boxes, counts = random_batch(generator, [30], (128, 192))
        unsampled = assign(boxes, counts, (128, 192), config.replace(**{"match.sample_size": 0}), backend="reference")
        assert int((unsampled.labels == 1).sum()) > 10
        for seed in range(5):
            got = assign(boxes, counts, (128, 192), config, backend="reference", seed=seed)
            assert int((got.labels == 1).sum()) == 3 and int((got.labels == 0).sum()) == 7

    def test_a_sample_of_one_anchor(self, generator):
        """The smallest sample: one anchor per image, a negative (1 x 0.25 positives rounds
        down to none), every other anchor ignored; the sparse form samples the same one."""
        config = self.CONFIG.replace(**{"match.sample_size": 1})
        boxes, counts = random_batch(generator, [30, 2], (128, 192))
        got = assign(boxes, counts, (128, 192), config, backend="reference", seed=4)
        assert (got.labels != -1).sum(dim=1).tolist() == [1, 1] and int((got.labels == 1).sum()) == 0
        sparse = assign_sparse(boxes, counts, (128, 192), config, backend="reference", seed=4)
        assert torch.equal(sparse.to_dense().labels, got.labels)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    def test_detectron2_keeps_the_matched_box_of_positives_sampled_away(self, backend, generator):
        """detectron2 keeps every anchor's argmax box (its Matcher's ``matches``), and its
        sampler only relabels: a positive left out of the sample (label -1) keeps the
        ``matched_gt`` it had before sampling, as does every other anchor."""
        config, canvas = presets.get("rpn_detectron2"), (128, 160)
        boxes, counts = random_batch(generator, [60], canvas)
        unsampled = assign(boxes, counts, canvas, config.replace(**{"match.sample_size": 0}), backend=backend)
        sampled = assign(boxes, counts, canvas, config, backend=backend, seed=7)
        assert int((unsampled.labels == 1).sum()) > 128  # more than the quota: some are dropped
        dropped = (sampled.labels == -1) & (unsampled.labels == 1)
        assert bool(dropped.any()) and bool((unsampled.matched_gt[dropped] >= 0).all())
        assert torch.equal(sampled.matched_gt[dropped], unsampled.matched_gt[dropped])
        assert torch.equal(sampled.matched_gt, unsampled.matched_gt)

    @pytest.mark.parametrize("members, count", [(900, 60), (100, 60), (100, 100), (150, 0)])
    def test_draws_are_distinct_members_uniformly(self, members, count):
        """Common members are drawn over the whole row, rare ones from their list: either
        way ``count`` distinct members, each as likely as the others, the same per seed."""
        row = np.zeros(1000, dtype=bool)
        row[torch.randperm(1000, generator=torch.Generator().manual_seed(members))[:members].numpy()] = True
        hits = torch.zeros(1000)
        for seed in range(400):
            drawn = _draw(row, members, count, torch.Generator().manual_seed(seed))
            assert drawn.size == count and np.unique(drawn).size == count and row[drawn].all()
            hits[torch.from_numpy(drawn)] += 1
        again = _draw(row, members, count, torch.Generator().manual_seed(399))
        assert np.array_equal(again, drawn)
        row_mask = torch.from_numpy(row)
        if 0 < count < members:  # each member is drawn 400 * count / members times on average
            expected = 400 * count / members
            spread = hits[row_mask].std().item()
            assert abs(hits[row_mask].mean().item() - expected) < 1e-3
            assert spread < 1.5 * (expected * (1 - count / members)) ** 0.5  # binomial spread


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["torchvision", "detectron2", "mmdet", "ssd_forced"])
def test_box_with_zero_best_iou_lifts_nothing(mode, backend):
    # Box 1 touches only a1, which the border rule takes out: its best IoU is 0. The
    # peers would make every zero-IoU anchor (a2) positive; it lifts nothing here.
    anchors = [[0, 0, 10, 10], [-4, 30, 6, 40], [50, 0, 60, 10]]
    boxes = [[0, 0, 10, 10], [0, 30, 5, 40]]
    t = run(anchors, boxes, backend=backend, high=0.5, low=0.3, low_quality=mode, allowed_border=0)
    assert t.labels[0].tolist() == [1, -1, 0]
