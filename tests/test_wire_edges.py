"""Responses at the message-size limit: the server's own size checks hold to the byte, so
a caller gets the codec's error (and the stream goes on), never gRPC's generic one."""

from __future__ import annotations

import json
import re

import grpc
import pytest
import torch
from test_service_harness import ServerThread, limits

from tritarget.clients import TargetClient, TargetServiceError, wire
from tritarget.clients.wire import build_request, decode_response
from tritarget.kernels import TargetConfig, assign, generate_anchors, presets
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import encode_tensor
from tritarget.service import codec
from tritarget.service.errors import ResourceExhausted

MIB = 1 << 20
CANVAS = (96, 128)
GOOD = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])


def test_stream_error_too_large_to_echo_its_id_is_answered_and_the_stream_goes_on():
    """A bad item whose id nearly fills a message: its error response drops the id (the
    client pairs by position) instead of ending the stream over the message limit."""
    good = lambda i: build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", request_id=f"id{i}")  # noqa: E731
    bad = pb.AssignRequest(request_id="X" * (MIB - 40), gt_counts=[-2])
    assert bad.ByteSize() <= MIB  # the request itself is within the limit
    with (
        ServerThread(limits=limits(max_message_bytes=MIB)) as server,
        TargetClient(server.address, retries=0, timeout=30, max_message_bytes=4 * MIB) as client,
    ):
        results = list(client.stream([good(0), bad, good(2)], return_exceptions=True))
        assert len(results) == 3
        assert (results[0].labels == 1).any() and (results[2].labels == 1).any()
        assert isinstance(results[1], TargetServiceError)
        assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT and "config" in results[1].details
        assert results[1].request_id == bad.request_id  # no room to echo it: the client's own
        # A long id that does fit is still echoed.
        fits = pb.AssignRequest(request_id="Y" * 1000, gt_counts=[-2])
        (error,) = client.stream([fits], return_exceptions=True)
        assert error.request_id == "Y" * 1000


def test_get_anchors_over_the_limit_by_its_envelope_is_refused_by_the_codec():
    """The limit counts the whole message (tensor header, field tags), not just A x 16 bytes."""
    config = presets.get("retinanet_torchvision")
    anchors = generate_anchors(config.anchors, CANVAS)
    size = pb.GetAnchorsResponse(anchors=encode_tensor(anchors)).ByteSize()
    assert size > anchors.shape[0] * 16
    with (
        ServerThread(limits=limits(max_message_bytes=size - 1)) as server,
        TargetClient(server.address, retries=0, timeout=30, max_message_bytes=4 * MIB) as client,
    ):
        with pytest.raises(TargetServiceError) as info:
            client.get_anchors(CANVAS, preset="retinanet_torchvision")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the anchors would be {size} bytes, over the {size - 1}-byte limit" in info.value.details
        errors = {"method": "GetAnchors", "code": "RESOURCE_EXHAUSTED"}
        assert server.metrics.value("tritarget_errors_total", errors) == 1
        assert client.get_anchors((64, 64), preset="retinanet_torchvision").shape[1] == 4  # smaller still served


def test_get_anchors_at_exactly_the_limit_is_taken_and_one_byte_less_refused():
    """The codec's own check of the anchors' size is inclusive, as gRPC's limit is."""
    anchors = generate_anchors(presets.get("retinanet_torchvision").anchors, CANVAS)
    size = pb.GetAnchorsResponse(anchors=encode_tensor(anchors)).ByteSize()
    request = pb.GetAnchorsRequest(config=pb.ConfigRef(preset="retinanet_torchvision"), canvas_height=CANVAS[0],
                                   canvas_width=CANVAS[1])  # fmt: skip
    assert codec.anchors_request(request, codec.Limits(max_message_bytes=size))[2] == size
    with pytest.raises(ResourceExhausted, match=f"the anchors would be {size} bytes, over the {size - 1}-byte limit"):
        codec.anchors_request(request, codec.Limits(max_message_bytes=size - 1))


def test_dense_size_with_one_box_dropped_and_an_image_without_any_is_exact():
    """drop_invalid: an image's dropped lists take their message's tag and length even when
    empty, and one dropped index (0) a byte; the size held before computing is the response's."""
    invalid = torch.tensor([[5.0, 5.0, 5.0, 9.0]])
    request = build_request(invalid, [1, 0, 0], CANVAS, preset="retinanet_mmdet", ignore_boxes=invalid,
                            ignore_counts=[0, 1, 0], drop_invalid=True, format="dense")  # fmt: skip
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, ignore_boxes=job.ignore_boxes,
                     ignore_counts=job.ignore_counts, drop_invalid=True, backend="cpu")  # fmt: skip
    response = codec.encode_assign(request, targets)
    assert [(list(d.box_index), list(d.ignore_box_index)) for d in response.dropped] == [([0], []), ([], [0]), ([], [])]
    assert codec.dense_response_bytes(3, targets.num_anchors, request, 0) == response.ByteSize()


def test_a_dense_request_is_held_to_its_response_size_with_its_own_background_class():
    """The DENSE precheck sizes the response with the config's background class (a varint:
    200 takes two bytes more than 0, which is not sent): a limit of exactly that size takes
    the request, one byte less refuses it."""
    config = presets.get("retinanet_torchvision").replace(background_class=200)
    request = build_request(GOOD, [2], CANVAS, config=config, format="dense")
    job = codec.decode_assign(request, codec.Limits())
    size = codec.encode_assign(request, assign(job.gt_boxes, job.gt_counts, job.canvas, job.config)).ByteSize()
    assert codec.decode_assign(request, codec.Limits(max_message_bytes=size)).images == 1
    with pytest.raises(ResourceExhausted, match=f"^format: the DENSE response would be {size} bytes"):
        codec.decode_assign(request, codec.Limits(max_message_bytes=size - 1))


@pytest.mark.parametrize("name", presets.names())
def test_a_config_travels_without_fields_added_later_at_their_old_value(name):
    """encode.symmetric_clamp came after the first release; a server from before it refuses
    a config naming it. At False (the config as it was before) the JSON leaves it out, and
    the server still reads the same config."""
    config = presets.get(name)
    sent = json.loads(wire.config_ref(None, config, None).config_json)
    assert ("symmetric_clamp" in sent["encode"]) == config.encode.symmetric_clamp
    assert TargetConfig.from_dict(sent) == config
    assert config.to_dict()["encode"]["symmetric_clamp"] is config.encode.symmetric_clamp  # the library's own: whole


@pytest.mark.parametrize("format", ["dense", "sparse"])
def test_float16_deltas_are_decoded_as_float32(format):
    """The client widens float16 deltas, DENSE (a view of the bytes) as SPARSE (densified):
    a trainer gets float32 whatever the request's delta_dtype."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format=format, delta_dtype="float16")
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, backend="cpu")
    response = codec.encode_assign(request, targets)
    decoded = decode_response(response, request)
    assert decoded.deltas.dtype == torch.float32
    assert torch.equal(decoded.deltas, targets.deltas.half().float())


@pytest.mark.parametrize("box_format", ["xyxyn", "xywhn", "cxcywhn"])
def test_normalised_boxes_scale_x_by_width_and_y_by_height_of_a_non_square_canvas(box_format):
    """Fractions of the canvas (height 96, width 128): x by the width, y by the height."""
    given = {"xyxyn": [0.1, 0.25, 0.5, 0.75], "xywhn": [0.1, 0.25, 0.4, 0.5], "cxcywhn": [0.3, 0.5, 0.4, 0.5]}
    request = build_request(torch.tensor([given[box_format]]), [1], CANVAS, preset="retinanet_torchvision",
                            box_format=box_format)  # fmt: skip
    sent = torch.frombuffer(bytearray(request.gt_boxes.data), dtype=torch.float32)
    assert torch.allclose(sent, torch.tensor([12.8, 24.0, 64.0, 72.0]))


def test_float32_boxes_of_another_width_are_refused_by_the_client():
    """The no-copy path for float32 boxes still checks their shape: [N, 5] is named here."""
    with pytest.raises(ValueError, match=re.escape("gt_boxes: expected shape [N, 4], got [2, 5]")):
        build_request(torch.zeros(2, 5), [2], CANVAS, preset="retinanet_torchvision")
