"""``Targets`` as a container: each conversion (``to``, ``levels``, ``to_sparse`` and back,
``summary``) keeps every field it can carry. Built by hand with every field away from its
default, so that a field a conversion forgets (a default put back) shows."""

from __future__ import annotations

import pytest
import torch

from tritarget.kernels import Targets


def full_targets() -> Targets:
    """One image over 6 anchors in two levels (0:4, 4:6): positives at 0 and 4, ignored at 2;
    classes with background 80, max IoU, a dropped box and a dropped ignore region."""
    return Targets(
        labels=torch.tensor([[1, 0, -1, 0, 1, 0]], dtype=torch.int8),
        matched_gt=torch.tensor([[0, -1, -1, -1, 1, -1]], dtype=torch.int32),
        deltas=torch.arange(24, dtype=torch.float32).reshape(1, 6, 4) * torch.tensor([1, 0, 0, 0, 1, 0]).view(1, 6, 1),
        classes=torch.tensor([[3, 80, 80, 80, 5, 80]], dtype=torch.int32),
        max_iou=torch.tensor([[0.7, 0.1, 0.45, 0.0, 0.6, 0.2]]),
        dropped=[torch.tensor([2])],
        background_class=80,
        level_starts=(0, 4, 6),
        dropped_ignore=[torch.tensor([1])],
    )


def assert_same(got: Targets, expected: Targets, *, max_iou: bool = True) -> None:
    for name in ("labels", "matched_gt", "deltas", "classes") + (("max_iou",) if max_iou else ()):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert (got.background_class, got.level_starts) == (expected.background_class, expected.level_starts)
    for name in ("dropped", "dropped_ignore"):
        assert [d.tolist() for d in getattr(got, name)] == [d.tolist() for d in getattr(expected, name)], name


def test_to_keeps_every_field():
    targets = full_targets()
    assert_same(targets.to("cpu"), targets)
    assert_same(targets.to(torch.device("cpu")), targets)


def test_to_refuses_what_is_not_a_device():
    """``to(True)`` would be device 1 to torch; a dtype would make the labels floats."""
    for device in (True, torch.float32):
        with pytest.raises(TypeError, match="device: expected a torch.device or its name"):
            full_targets().to(device)


def test_the_sparse_form_and_back_keep_every_field_but_max_iou():
    targets = full_targets()
    sparse = targets.to_sparse()
    assert (sparse.background_class, sparse.level_starts) == (80, (0, 4, 6))
    back = sparse.to_dense()
    assert_same(back, targets, max_iou=False)
    assert back.max_iou is None  # the sparse form has no place for it
    # Anchors no list names take the background class, not 0.
    assert back.classes[0, [1, 2, 3, 5]].tolist() == [80] * 4


def test_levels_keep_every_field_each_its_own_slice():
    targets = full_targets()
    first, second = targets.levels()
    assert (first.level_starts, second.level_starts) == ((0, 4), (0, 2))
    for level, (a, b) in ((first, (0, 4)), (second, (4, 6))):
        for name in ("labels", "matched_gt", "deltas", "classes", "max_iou"):
            assert torch.equal(getattr(level, name), getattr(targets, name)[:, a:b]), name
        assert level.background_class == 80
        assert [d.tolist() for d in level.dropped] == [[2]] and [d.tolist() for d in level.dropped_ignore] == [[1]]


def test_summary_counts_each_label():
    assert full_targets().summary() == [{"positive": 2, "negative": 3, "ignored": 1}]
