"""assign_sparse equals assign(...).to_sparse() on every backend, dropping and sampling included."""

import importlib

import numpy as np
import pytest
import torch

from support import random_batch
from tritarget.kernels import SparseTargets, TargetConfig, Targets, assign, assign_sparse, presets
from tritarget.kernels.config import MatchConfig

CANVAS = (96, 128)


def _equal_sparse(a, b):
    for name in (
        "positive_offsets",
        "positive_anchors",
        "positive_matched_gt",
        "positive_deltas",
        "ignored_offsets",
        "ignored_anchors",
        "positive_classes",
    ):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)
    assert a.num_anchors == b.num_anchors
    assert [d.tolist() for d in a.dropped] == [d.tolist() for d in b.dropped]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_block_whose_best_iou_is_exactly_low_lists_its_ignored_anchor(backend):
    """The sparse pass skips a block of anchors whose best IoU is under the floor (low,
    here): at exactly low the anchor is ignored, not negative, and its block is listed
    (a mutant of the C kernel's block test, ``>`` for ``>=``, passed every test)."""
    config = TargetConfig(anchors=presets.get("retinanet_torchvision").anchors,
                          match=MatchConfig(high=0.7, low=0.5, low_quality="none"))  # fmt: skip
    anchors = torch.tensor([[200.0, 200.0, 210.0, 210.0]]).repeat(128, 1)  # blocks of 64: all far from the box
    anchors[0] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # IoU 50 / 100: exactly low, ignored
    anchors[64] = torch.tensor([0.0, 0.0, 10.0, 6.0])  # IoU 50 / 60: positive, in the other block
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0]], device=device)
    sparse = assign_sparse(boxes, [1], (256, 256), config, anchors=anchors.to(device), backend=backend)
    assert (sparse.ignored_anchors.tolist(), sparse.positive_anchors.tolist()) == ([0], [64])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("preset", ["retinanet_torchvision", "rpn_mmdet"])
def test_sparse_equals_dense_then_sparse(backend, preset, generator):
    config = presets.get(preset)  # rpn_mmdet samples 256 anchors per image
    boxes, counts = random_batch(generator, [4, 0, 9], CANVAS)
    boxes[2] = torch.tensor([30.0, 30.0, 20.0, 40.0])  # invalid: dropped, later indices shift
    classes = torch.randint(1, 80, (boxes.shape[0],), generator=generator)
    # Compiled Triton takes CUDA tensors only; CPU tensors run under TRITON_INTERPRET=1 (no GPU).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    boxes, classes = boxes.to(device), classes.to(device)
    kwargs = dict(gt_classes=classes, backend=backend, drop_invalid=True, seed=3)
    sparse = assign_sparse(boxes, counts, CANVAS, config, **kwargs)
    dense = assign(boxes, counts, CANVAS, config, **kwargs)
    assert [d.tolist() for d in dense.dropped] == [[2], [], []]
    assert (dense.matched_gt[0][dense.labels[0] == 1] != 2).all()
    _equal_sparse(sparse, dense.to_sparse())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sparse_first_backends_never_compute_dense_targets(backend, generator, monkeypatch):
    """Without sampling, the cpu and triton backends write the sparse lists directly
    (``assign_sparse``'s docstring): their dense ``solve`` is never called, and the lists
    are the reference's."""
    config = presets.get("retinanet_torchvision")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    boxes, counts = random_batch(generator, [4, 0, 9], CANVAS)
    boxes = boxes.to(device)
    expected = assign_sparse(boxes, counts, CANVAS, config, backend="reference")

    def dense_solve(problem):
        raise AssertionError(f"assign_sparse on {backend} computed dense targets")

    module = importlib.import_module(f"tritarget.kernels.{'cpu' if backend == 'cpu' else 'triton_backend'}")
    monkeypatch.setattr(module, "solve", dense_solve)
    _equal_sparse(assign_sparse(boxes, counts, CANVAS, config, backend=backend), expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matched_indices_are_as_given_when_an_images_first_box_is_dropped(backend, generator):
    """Dropping box 0 of an image makes its box 1 the first kept one (index 0 among the kept):
    the sparse form still names it 1, as the dense form does."""
    boxes, counts = random_batch(generator, [5, 3, 4], CANVAS)
    boxes[0] = boxes[5] = torch.tensor([30.0, 30.0, 20.0, 40.0])  # invalid: each image's first box but the last
    sparse = assign_sparse(boxes, counts, CANVAS, presets.get("retinanet_torchvision"), backend=backend,
                           drop_invalid=True)  # fmt: skip
    dense = assign(boxes, counts, CANVAS, presets.get("retinanet_torchvision"), backend=backend, drop_invalid=True)
    assert [d.tolist() for d in dense.dropped] == [[0], [0], []]
    assert 1 in dense.matched_gt[0].tolist() and 0 not in dense.matched_gt[0].tolist()
    _equal_sparse(sparse, dense.to_sparse())


def _lists(**changes):
    """Two images over 6 anchors: image 0 positive at 1 and ignored at 2, image 1 positive at 4."""
    lists = dict(num_anchors=6, positive_offsets=torch.tensor([0, 1, 2]),
                 positive_anchors=torch.tensor([1, 4], dtype=torch.int32),
                 positive_matched_gt=torch.tensor([0, 0], dtype=torch.int32), positive_deltas=torch.ones(2, 4),
                 ignored_offsets=torch.tensor([0, 1, 1]),
                 ignored_anchors=torch.tensor([2], dtype=torch.int32))  # fmt: skip
    return SparseTargets(**{**lists, **changes})


@pytest.mark.parametrize(
    "changes, error",
    [({"positive_offsets": torch.tensor([0, 1, 1])}, r"positive_offsets: must start at 0, never decrease and end at 2"),
     ({"positive_offsets": torch.tensor([0, 0, 0])}, r"positive_offsets: must .* end at 2 \(the positive anchors\)"),
     # offsets not starting at 0 leave the first positive in no image (mutation review: no case held it)
     ({"positive_offsets": torch.tensor([1, 1, 2])}, r"positive_offsets: must start at 0, .* got \[1, 1, 2\]"),
     ({"positive_anchors": torch.tensor([1, -1], dtype=torch.int32)},
      r"positive_anchors: image 1 lists anchor -1, outside \[0, num_anchors=6\)"),
     # int8 at more anchors than int8 holds: read as unsigned, -3 was 253, under 300, and
     # to_dense marked anchor 297 (review 48).
     ({"num_anchors": 300, "positive_anchors": torch.tensor([-3, 4], dtype=torch.int8)},
      r"positive_anchors: image 0 lists anchor -3, outside \[0, num_anchors=300\)"),
     ({"ignored_anchors": torch.tensor([1], dtype=torch.int32)},
      r"positive_anchors: image 0 lists anchor 1 as positive and as ignored"),
     ({"positive_offsets": torch.tensor([0, 2, 2]), "positive_anchors": torch.tensor([4, 1], dtype=torch.int32)},
      r"positive_anchors: image 0 lists anchor 1 after 4 \(must ascend\)"),
     ({"positive_matched_gt": torch.tensor([5], dtype=torch.int32)},
      r"positive_matched_gt: shape \[1\], expected \[2\]"),
     ({"positive_matched_gt": torch.tensor([0, -1], dtype=torch.int32)},
      r"positive_matched_gt: a positive matches box -1"),
     ({"positive_deltas": torch.ones(2)}, r"positive_deltas: shape \[2\], expected \[2, 4\]"),
     ({"ignored_offsets": torch.tensor([0, 1])}, r"ignored_offsets: shape \[2\], expected \[batch_size \+ 1\] = \[3\]"),
     # int64 lists past int32: densified, they wrapped around to box 1 and class 7.
     ({"positive_matched_gt": torch.tensor([0, 2**32 + 1])},
      r"positive_matched_gt: a positive matches box 4294967297 \(expected 0 to 2147483647\)"),
     ({"positive_classes": torch.tensor([3, 2**32 + 7])},
      r"positive_classes: a positive has class 4294967303 \(expected 0 to 2147483647\)"),
     ({"positive_classes": torch.tensor([3, -2])}, r"positive_classes: a positive has class -2 \(expected 0 to"),
     ({"level_starts": (0, 3, 99)}, r"level_starts: \(0, 3, 99\), expected ascending integers from 0 to num"),
     ({"level_starts": ()}, r"level_starts: \(\), expected ascending integers from 0 to num_anchors \(6\)"),
     ({"positive_anchors": torch.tensor([1.0, 4.0])}, r"positive_anchors: expected integers, got torch.float32"),
     # Offsets of a narrow type passed the check and stopped in torch's repeat_interleave.
     ({"positive_offsets": torch.tensor([0, 1, 2], dtype=torch.int16)},
      r"positive_offsets: expected int64 \(or int32\) offsets, got torch.int16"),
     ({"ignored_offsets": torch.tensor([0, 1, 1], dtype=torch.uint8)},
      r"ignored_offsets: expected int64 \(or int32\) offsets, got torch.uint8"),
     # Not tensors, or not floats: an AttributeError, or integer deltas densified.
     ({"positive_anchors": np.array([1, 4], dtype=np.int32)}, r"positive_anchors: expected a tensor, got ndarray"),
     ({"positive_classes": [3, 7]}, r"positive_classes: expected a tensor, got list"),
     ({"positive_deltas": torch.ones(2, 4, dtype=torch.int64)}, r"positive_deltas: expected floats, got torch.int64"),
     ({"background_class": "0"}, r"background_class: expected an int, got '0'"),
     ({"background_class": 2**31, "positive_classes": torch.tensor([3, 7])},
      r"background_class: 2147483648, expected 0 to 2147483647"),
     # Review 48: each passed check and failed later, unnamed (numpy, slicing, iterating).
     ({"num_anchors": True}, r"num_anchors: expected an int >= 0, got True"),
     ({"level_starts": (0, 2.5, 6)}, r"level_starts: \(0, 2.5, 6\), expected ascending integers"),
     ({"dropped": 5}, r"dropped: expected a list of tensors \(one per image, or none\), got 5"),
     # A list in sparse layout failed in numpy ("can't convert Sparse layout tensor"), unnamed.
     ({"positive_anchors": torch.tensor([1, 4]).to_sparse()},
      r"positive_anchors: expected a dense \(strided\) tensor, got a sparse_coo one \(.to_dense\(\) it\)"),
     # A mutation review: no case held these checks.
     ({"background_class": True}, r"background_class: expected an int, got True"),
     ({"positive_matched_gt": torch.tensor([False, False])}, r"positive_matched_gt: expected integers, got torch.bool"),
     ({"dropped": [0, 1]}, r"dropped: expected a list of tensors \(one per image, or none\), got \[0, 1\]"),
     ({"level_starts": (1, 6)}, r"level_starts: \(1, 6\), expected ascending integers from 0"),
     ({"level_starts": (0, 4, 2, 6)}, r"level_starts: \(0, 4, 2, 6\), expected ascending integers"),
     ({"level_starts": (0, True, 6)}, r"level_starts: \(0, True, 6\), expected ascending integers"),
     ({"positive_offsets": torch.tensor([0, 2, 2]), "positive_anchors": torch.tensor([1, 1], dtype=torch.int32)},
      r"positive_anchors: image 0 lists anchor 1 after 1 \(must ascend\)"),
     ({"ignored_offsets": torch.tensor([0, 1, 2]), "ignored_anchors": torch.tensor([1, 4], dtype=torch.int32)},
      r"positive_anchors: image 0 lists anchor 1 as positive and as ignored")],  # the first of two overlaps
)  # fmt: skip
def test_lists_that_break_their_contract_are_refused_not_densified_into_other_targets(changes, error):
    """Hand-made or edited lists (cached on disk, say): a positive counted in another image,
    an index wrapped around to the last anchor, one matched box given to every positive."""
    assert _lists().to_dense().labels.tolist() == [[0, 1, -1, 0, 0, 0], [0, 0, 0, 0, 1, 0]]
    with pytest.raises((ValueError, TypeError), match=f"^{error}"):
        _lists(**changes).to_dense()
    with pytest.raises((ValueError, TypeError), match=f"^{error}"):
        Targets.from_sparse(_lists(**changes))


@pytest.mark.parametrize(
    ("changes", "positives"),
    [({"positive_classes": torch.tensor([3, 2**31 - 1])}, [[1], [4]]),  # the largest class an int32 holds
     # int16 anchors past int16's range of num_anchors, all of them valid
     ({"num_anchors": 40_000, "positive_anchors": torch.tensor([1, 30_000], dtype=torch.int16)}, [[1], [30_000]]),
     ({"num_anchors": 0, "positive_offsets": torch.tensor([0, 0, 0]),
       "positive_anchors": torch.zeros(0, dtype=torch.int32), "positive_matched_gt": torch.zeros(0, dtype=torch.int32),
       "positive_deltas": torch.zeros(0, 4), "ignored_offsets": torch.tensor([0, 0, 0]),
       "ignored_anchors": torch.zeros(0, dtype=torch.int32)}, [[], []]),
     # positives and not one ignored anchor: the overlap check must not index the empty ignored list
     ({"ignored_offsets": torch.tensor([0, 0, 0]), "ignored_anchors": torch.zeros(0, dtype=torch.int32)}, [[1], [4]])],
)  # fmt: skip
def test_lists_at_the_edges_of_their_contract_are_accepted(changes, positives):
    dense = _lists(**changes).to_dense()
    assert [torch.nonzero(row == 1).flatten().tolist() for row in dense.labels] == positives
    if "positive_classes" in changes:
        assert dense.classes[1, 4].item() == 2**31 - 1
