"""Invariants of the reference on arbitrary small problems (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritarget.kernels import TargetConfig, Targets, assign, generate_anchors
from tritarget.kernels.boxes import box_iou
from tritarget.kernels.config import LOW_QUALITY_MODES, AnchorConfig, AnchorLevel, MatchConfig

CANVAS = (48, 48)
ANCHORS = AnchorConfig(layout="detectron2", levels=(AnchorLevel(stride=16, sizes=(16, 32), aspect_ratios=(0.5, 1.0)),))

coordinate = st.integers(min_value=0, max_value=47)


@st.composite
def boxes(draw, max_count):
    count = draw(st.integers(min_value=0, max_value=max_count))
    out = []
    for _ in range(count):
        x1, y1 = draw(coordinate), draw(coordinate)
        out.append([x1, y1, x1 + draw(st.integers(1, 30)), y1 + draw(st.integers(1, 30))])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


ANCHOR_BOXES = generate_anchors(ANCHORS, CANVAS)


@settings(max_examples=150, deadline=None)
@given(
    first=boxes(6),
    second=boxes(6),
    mode=st.sampled_from(LOW_QUALITY_MODES),
    high=st.sampled_from([0.3, 0.5, 0.7]),
    low_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    border=st.sampled_from([-1.0, 0.0, 8.0]),
)
def test_targets_are_consistent(first, second, mode, high, low_fraction, border):
    low = high * low_fraction
    config = TargetConfig(
        anchors=ANCHORS, match=MatchConfig(high=high, low=low, low_quality=mode, allowed_border=border)
    )
    counts = [first.shape[0], second.shape[0]]
    t = assign(torch.cat([first, second]), counts, CANVAS, config, backend="reference", return_max_iou=True)
    for image, (gt, count) in enumerate(zip((first, second), counts)):
        labels, matched = t.labels[image], t.matched_gt[image]
        positive = labels == 1
        assert set(labels.unique().tolist()) <= {-1, 0, 1}
        assert (((matched >= 0) & (matched < count)) | (matched == -1)).all()
        assert (matched[positive] >= 0).all(), "every positive has a box"
        if mode != "detectron2":
            assert (matched[~positive] == -1).all()
        assert (t.deltas[image][~positive] == 0).all()
        if count == 0:
            assert not positive.any() and (t.max_iou[image] == 0).all()
            continue
        best, argmax = box_iou(gt, ANCHOR_BOXES).max(dim=0)
        assert torch.equal(t.max_iou[image], best)
        if border < 0:
            assert positive[best >= high].all(), "at or above `high` is always positive"
            assert (labels[(best < low) & ~positive] == 0).all()
        if mode in ("none", "torchvision", "detectron2"):
            assert torch.equal(matched[positive], argmax[positive].to(torch.int32))
        if mode == "none" and border < 0:
            assert torch.equal(positive, best >= high)
    back = Targets.from_sparse(t.to_sparse())
    assert torch.equal(back.labels, t.labels) and torch.equal(back.deltas, t.deltas)
