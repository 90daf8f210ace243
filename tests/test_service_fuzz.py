"""Property-based fuzzing of the request message over a real socket: whatever the bytes
or field values, the answer is a response or a caller's error (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN, and the server goes on
serving. Small limits keep every accepted request cheap to compute."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service_harness import ServerThread, limits

from tritarget.clients.wire import build_request
from tritarget.kernels import presets
from tritarget.protos import target_assigner_pb2 as pb

ASSIGN = "/tritarget.v1.TargetAssigner/Assign"
STREAM = "/tritarget.v1.TargetAssigner/AssignStream"
BUGS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def channel():
    bounds = limits(max_images=6, max_boxes=64, max_canvas_side=512, max_anchor_rows=1 << 20, max_message_bytes=1 << 20)
    with ServerThread(backend="cpu", limits=bounds) as srv, grpc.insecure_channel(srv.address) as channel:
        yield channel


def _valid() -> pb.AssignRequest:
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])
    return build_request(boxes, [2], (96, 128), preset="retinanet_torchvision", gt_classes=torch.tensor([1, 2]))


def _call(channel, raw: bytes) -> None:
    try:
        pb.AssignResponse.FromString(channel.unary_unary(ASSIGN)(raw, timeout=60))
    except grpc.RpcError as error:
        assert error.code() not in BUGS, (error.code(), error.details())


def _still_serving(channel) -> None:
    reply = pb.AssignResponse.FromString(channel.unary_unary(ASSIGN)(_valid().SerializeToString(), timeout=60))
    assert reply.batch_size == 1 and not reply.HasField("error")


int32s = st.integers(-(2**31), 2**31 - 1)
small = st.integers(-3, 600) | int32s
tensor = st.builds(
    pb.Tensor,
    dtype=st.integers(0, 7),
    shape=st.lists(st.integers(-2, 70) | st.integers(-(2**62), 2**62), max_size=3),
    data=st.binary(max_size=600),
)
float_boxes = st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=4, max_size=64).map(
    lambda values: values[: len(values) // 4 * 4]
)


@st.composite
def box_tensor(draw) -> pb.Tensor:
    """Mostly well-formed float32 boxes (so the checks behind the wire format run too)."""
    if draw(st.booleans()):
        return draw(tensor)
    values = torch.tensor(draw(float_boxes), dtype=torch.float32).reshape(-1, 4)
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(values.shape), data=values.numpy().tobytes())


config_text = st.text(max_size=60) | st.sampled_from(['{"anchors": {}}', "[]", "null", "1e999", '{"match": 3}'])
config = st.one_of(
    st.builds(pb.ConfigRef, preset=st.sampled_from(presets.names()) | st.text(max_size=20)),
    st.builds(pb.ConfigRef, config_json=config_text),
    st.builds(
        pb.ConfigRef,
        preset=st.sampled_from(presets.names()),
        overrides=st.dictionaries(
            st.sampled_from(["match.high", "match.low", "background_class", "anchors.levels[0].sizes", "nope", ""]),
            st.sampled_from(["0.5", "-1", "2147483648", "[1, 2]", "{}", "nan", '"x"', "[[[]]]", "1e308"])
            | st.text(max_size=10),
            max_size=3,
        ),
    ),
)
request = st.builds(
    pb.AssignRequest,
    request_id=st.text(max_size=30),
    config=config,
    canvas_height=small,
    canvas_width=small,
    gt_boxes=box_tensor(),
    gt_counts=st.lists(st.integers(-2, 20) | int32s, max_size=7),
    gt_classes=tensor,
    ignore_boxes=box_tensor(),
    ignore_counts=st.lists(st.integers(-2, 4), max_size=7),
    image_sizes=tensor,
    drop_invalid=st.booleans(),
    format=st.integers(0, 4) | int32s,
    delta_dtype=st.integers(0, 7) | int32s,
    return_classes=st.booleans(),
    return_max_iou=st.booleans(),
    seed=st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def plausible_request(draw) -> pb.AssignRequest:
    """A wild request with most fields (each with odds 4:1) made plausible, so that the
    fuzzing gets past the first checks into boxes, classes, sizes and computing."""
    message = draw(request)
    plausible = lambda: draw(st.integers(0, 4)) > 0  # noqa: E731
    if plausible():
        message.format = draw(st.integers(0, 2))
    if plausible():
        message.delta_dtype = draw(st.integers(0, 2))
    if plausible():
        message.seed = draw(st.integers(0, 2**40))
    if plausible():
        message.config.CopyFrom(pb.ConfigRef(preset=draw(st.sampled_from(presets.names()))))
    if plausible():
        message.canvas_height, message.canvas_width = draw(st.integers(16, 400)), draw(st.integers(16, 400))
    if plausible():
        boxes = torch.tensor(draw(float_boxes), dtype=torch.float32).reshape(-1, 4).abs() * 4
        boxes[:, 2:] += boxes[:, :2] + 1
        message.gt_boxes.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(boxes.shape),
                                            data=boxes.numpy().tobytes()))  # fmt: skip
        images = draw(st.integers(1, 4))
        counts = [boxes.shape[0] // images] * images
        counts[0] += boxes.shape[0] - sum(counts)
        message.gt_counts[:] = counts
        if plausible():
            message.ClearField("image_sizes")
        if plausible():
            message.ClearField("ignore_boxes")
            message.ClearField("ignore_counts")
        if plausible():
            classes = torch.tensor(draw(st.lists(st.integers(-2, 90), min_size=boxes.shape[0],
                                                 max_size=boxes.shape[0])), dtype=torch.int32)  # fmt: skip
            message.gt_classes.CopyFrom(pb.Tensor(dtype=pb.DTYPE_INT32, shape=[boxes.shape[0]],
                                                  data=classes.numpy().tobytes()))  # fmt: skip
    return message


@FUZZ
@given(request | plausible_request())
def test_any_field_values(channel, message):
    _call(channel, message.SerializeToString())


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes(channel, raw):
    _call(channel, raw)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_valid_request_with_bytes_flipped(channel, flips):
    raw = bytearray(_valid().SerializeToString())
    for position, value in flips:
        raw[position % len(raw)] = value
    _call(channel, bytes(raw))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request.map(lambda m: m.SerializeToString()) | st.binary(max_size=300), min_size=1, max_size=6))
def test_a_stream_of_anything_answers_every_item_in_band(channel, items):
    replies = list(channel.stream_stream(STREAM)(iter([*items, _valid().SerializeToString()]), timeout=120))
    assert len(replies) == len(items) + 1
    for raw in replies:
        reply = pb.AssignResponse.FromString(raw)
        if reply.HasField("error"):
            assert reply.error.code not in (code.value[0] for code in BUGS), reply.error
    assert not pb.AssignResponse.FromString(replies[-1]).HasField("error")


def test_still_serving_after_the_fuzzing(channel):
    _still_serving(channel)
