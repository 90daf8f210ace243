"""assign_sparse equals assign(...).to_sparse() on every backend, dropping and sampling included."""

import pytest
import torch

from support import random_batch
from tritarget.kernels import assign, assign_sparse, presets

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
