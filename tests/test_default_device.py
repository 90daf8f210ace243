"""The library under ``torch.set_default_device(...)`` and ``torch.set_default_dtype(...)``:
host inputs give host targets, equal to those of a process without either.

A training script that calls ``torch.set_default_device("cuda")`` sends every factory call
without a ``device=`` there: sampling's draws met their CPU generator on the GPU (an
error), and the cpu backend's outputs were allocated on the GPU and handed to C as host
pointers (a segfault; review 49). These tests set ``meta`` as the default device, which
no GPU is needed for and no value can be read from: any tensor the library makes on the
default device instead of the host fails them. On a GPU machine the triton case passes
CUDA inputs (compiled, the backend refuses host ones) and compares its targets on the host.
"""

import pytest
import torch

from support import on_device, triton_runs_here
from tritarget.clients.wire import build_request, decode_response, decode_sparse
from tritarget.kernels import (
    SparseTargets,
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
from tritarget.kernels.adapters import detectron2_targets, mmdet_targets, torchvision_matched_idxs
from tritarget.kernels.losses import retinanet_loss, rpn_loss
from tritarget.kernels.workload import coco_like_batch
from tritarget.service import codec

CANVAS = (64, 96)
BOXES = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0], [float("nan")] * 4])
COUNTS = [2, 0, 2]
CLASSES = torch.tensor([1, 5, 2, 7], dtype=torch.int32)
IGNORE = torch.tensor([[50.0, 0.0, 90.0, 30.0]])
BACKENDS = [
    "reference",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_runs_here(), reason="no triton")),
]


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def float64_default():
    """``torch.set_default_dtype(torch.float64)`` (scientific code sets it): float factories
    without a dtype make float64; the library's own tensors must not follow."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def _equal(got, expected) -> None:
    assert type(got) is type(expected)
    if isinstance(got, torch.Tensor):
        assert got.device.type == "cpu" and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            _equal(g, e)
    elif isinstance(got, dict):
        assert got.keys() == expected.keys()
        for key in got:
            _equal(got[key], expected[key])
    elif isinstance(got, (Targets, SparseTargets)):
        for name in vars(expected):
            _equal(getattr(got, name), getattr(expected, name))
    else:
        assert got == expected


DEFAULTS = ["meta_default", "float64_default"]


def _both(call, request):
    """``call()`` in a plain process state, then under the test's default (``default``)."""
    expected = call()
    request.getfixturevalue(request.node.callspec.params["default"])
    return call(), expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", [assign, assign_sparse])
@pytest.mark.parametrize("preset", ["retinanet_torchvision", "fasterrcnn_rpn_torchvision", "ssd300_torchvision"])
@pytest.mark.parametrize("default", DEFAULTS)
def test_host_targets_under_a_default_device(function, backend, preset, default, request):
    config = presets.get(preset)

    extra = {"return_max_iou": True} if function is assign else {}

    def call():  # on a GPU machine the triton backend's inputs are CUDA tensors, its targets copied back
        return on_device(function, BOXES, COUNTS, CANVAS, config, gt_classes=CLASSES, ignore_boxes=IGNORE,
                         ignore_counts=[1, 0, 0], drop_invalid=True, seed=3, backend=backend, **extra)  # fmt: skip

    got, expected = _both(call, request)
    _equal(got, expected)


@pytest.mark.parametrize("default", DEFAULTS)
def test_anchors_boxes_and_conversions_under_a_default_device(default, request):
    config = presets.get("retinanet_torchvision")
    boxes = BOXES[:3]

    def call():
        anchors = generate_anchors(config.anchors, CANVAS)
        dense = assign(boxes, [2, 1], CANVAS, config, gt_classes=CLASSES[:3], backend="reference")
        sparse = dense.to_sparse()
        deltas = encode(boxes[:2], anchors[:2], config.encode)
        return (anchors, box_iou(boxes, anchors[:50]), box_iof(boxes, anchors[:50]), deltas,
                decode(deltas, anchors[:2], config.encode), sparse, sparse.to_dense(), Targets.from_sparse(sparse),
                torchvision_matched_idxs(dense), detectron2_targets(dense, num_classes=10),
                mmdet_targets(sparse, num_classes=10), coco_like_batch(2, 7, CANVAS))  # fmt: skip

    got, expected = _both(call, request)
    _equal(got, expected)


@pytest.mark.parametrize("default", DEFAULTS)
def test_losses_under_a_default_device(default, request):
    config = presets.get("retinanet_torchvision")
    sparse = assign_sparse(BOXES[:3], [2, 1], CANVAS, config, gt_classes=CLASSES[:3], backend="reference")
    rpn = assign_sparse(BOXES[:3], [2, 1], CANVAS, presets.get("fasterrcnn_rpn_torchvision"), seed=0)
    logits = torch.linspace(-3.0, 3.0, 2 * sparse.num_anchors * 10).reshape(2, -1, 10)
    regression = torch.linspace(-1.0, 1.0, 2 * sparse.num_anchors * 4).reshape(2, -1, 4)
    objectness = torch.linspace(-2.0, 2.0, 2 * rpn.num_anchors).reshape(2, -1)
    proposals = torch.linspace(-1.0, 1.0, 2 * rpn.num_anchors * 4).reshape(2, -1, 4)

    def call():
        return (retinanet_loss({"cls_logits": logits, "bbox_regression": regression}, sparse),
                rpn_loss(objectness, proposals, rpn))  # fmt: skip

    got, expected = _both(call, request)
    _equal(got, expected)


@pytest.mark.parametrize("format", ["dense", "sparse"])
@pytest.mark.parametrize("default", DEFAULTS)
def test_decoded_responses_under_a_default_device(format, default, request):
    """What the client decodes: a response of the server's own encoder."""
    wire = build_request(BOXES[:3], [2, 1], CANVAS, preset="fasterrcnn_rpn_torchvision", gt_classes=CLASSES[:3],
                         format=format, seed=5)  # fmt: skip
    job = codec.decode_assign(wire, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, gt_classes=job.gt_classes, seed=job.seed,
                     backend="cpu")  # fmt: skip
    response = codec.encode_assign(wire, targets if format == "dense" else targets.to_sparse())

    def call():
        return decode_response(response, wire) if format == "dense" else decode_sparse(response, wire)

    got, expected = _both(call, request)
    _equal(got, expected)
