"""Regression tests for the load-test findings: bytes that are not a message (D4), the
exact DENSE response size (D5), an over-size response inside a stream (D6), a huge
request that must not hold the compute worker while others wait, and a burst of calls
answered as overload."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import random
import re
import threading
import time

import grpc
import pytest
import torch
from test_service_harness import ServerThread, batching, limits, unread_call, until

from tritarget.clients import TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.kernels import presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import encode_tensor
from tritarget.service import codec, servicer
from tritarget.service.errors import Overloaded, ResourceExhausted

CANVAS = (96, 128)
GOOD = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])
ASSIGN = "/tritarget.v1.TargetAssigner/Assign"
MIB = 1 << 20


@pytest.fixture(scope="module")
def server():
    with ServerThread(limits=limits(max_message_bytes=MIB)) as srv:
        yield srv


def _good_request(**kwargs) -> pb.AssignRequest:
    return build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", **kwargs)


def _garbage(seed: int) -> bytes:
    """Bytes that do not parse as a message: field 1 (request_id, length-delimited)
    claims more bytes than follow, then random bytes."""
    return b"\x0a\xff\x7f" + random.Random(seed).randbytes(1021)


def test_undecodable_bytes_are_invalid_argument_without_a_traceback(server, caplog):  # D4
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.ERROR):
        assign = channel.unary_unary(ASSIGN)  # bytes in, bytes out
        for seed in range(3):
            with pytest.raises(grpc.RpcError) as info:
                assign(_garbage(seed), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1024 bytes that do not parse as a tritarget.v1.AssignRequest" in info.value.details()
            assert "class" not in info.value.details()
        reply = pb.AssignResponse.FromString(assign(_good_request().SerializeToString(), timeout=10))
        assert reply.batch_size == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_undecodable_stream_item_gets_an_in_band_error_and_the_stream_goes_on(server):  # D4
    items = [_good_request(request_id="a").SerializeToString(), _garbage(7),
             _good_request(request_id="c").SerializeToString()]  # fmt: skip
    with grpc.insecure_channel(server.address) as channel:
        stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream")
        replies = [pb.AssignResponse.FromString(r) for r in stream(iter(items), timeout=10)]
    assert [r.request_id for r in replies] == ["a", "", "c"]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not replies[0].HasField("error") and not replies[2].HasField("error")


def test_undecodable_list_presets_and_get_anchors_requests_are_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("ListPresets", "GetAnchors"):
            call = channel.unary_unary(f"/tritarget.v1.TargetAssigner/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(_garbage(1), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"1024 bytes that do not parse as a tritarget.v1.{method}Request" in info.value.details()


# Fields this server's proto does not have, as a newer client would send them: AssignRequest
# field 18 (varint 1), a Tensor's field 4 inside gt_boxes, and return_max_iou (field 15, a
# bool) sent as 32 bits. Parsed, protobuf kept them aside and the request was answered as if
# they were unset (a newer client's pad_sizes, field 17 once, ignored by an older server).
_UNKNOWN_FIELDS = [
    (
        b"\x90\x01\x01",
        "request: field number 18 (varint) is not one of tritarget.v1.AssignRequest's on this "
        "server: a client built for a newer version?",
    ),
    (b"\x2a\x02\x20\x05", "gt_boxes: field number 4 (varint) is not one of tritarget.v1.Tensor's"),
    (b"\x7d\x01\x00\x00\x00", "return_max_iou: sent as 32-bit (field number 15), not as its type is"),
]


@pytest.mark.parametrize("extra, message", _UNKNOWN_FIELDS, ids=["request", "tensor", "wire_type"])
def test_a_field_this_server_does_not_know_is_refused_by_number(server, extra, message):
    """A helper's wire audit: answered OK with targets computed without the option."""
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(ASSIGN)(_good_request().SerializeToString() + extra, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
        items = [_good_request(request_id="a").SerializeToString() + extra, _good_request(request_id="b")]
        stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream")
        replies = [pb.AssignResponse.FromString(r) for r in stream(iter([items[0], items[1].SerializeToString()]),
                                                                   timeout=10)]  # fmt: skip
    assert [r.request_id for r in replies] == ["a", "b"]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and message in replies[0].error.message
    assert not replies[1].HasField("error")


def test_list_presets_and_get_anchors_refuse_a_field_they_do_not_have(server):
    requests = {
        "ListPresets": b"",
        "GetAnchors": pb.GetAnchorsRequest(
            config=pb.ConfigRef(preset="retinanet_torchvision"), canvas_height=64, canvas_width=64
        ).SerializeToString(),
    }
    with grpc.insecure_channel(server.address) as channel:
        for method, request in requests.items():
            call = channel.unary_unary(f"/tritarget.v1.TargetAssigner/{method}")
            assert call(request, timeout=10)  # as sent by this version's client
            with pytest.raises(grpc.RpcError) as info:
                call(request + b"\x98\x06\x01", timeout=10)  # field 99
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"field number 99 (varint) is not one of tritarget.v1.{method}Request's" in info.value.details()


def test_a_stream_items_error_that_cannot_echo_its_id_comes_without_it(server):
    """A refused stream item whose id (within the request limit) would take its error
    response past the message limit: the error comes without the id, in its item's place,
    and the stream goes on (gRPC ends the whole stream on a response over the limit)."""
    bad = _good_request(request_id="z" * (MIB - 100))
    bad.gt_counts[:] = [3]  # 2 boxes
    assert bad.ByteSize() <= MIB  # the request fits; its error (112 bytes) beside the id does not
    with TargetClient(server.address, retries=0, timeout=30, max_message_bytes=4 * MIB) as client:
        results = list(client.stream([bad, _good_request(request_id="c")], return_exceptions=True))
    assert len(results) == 2
    assert isinstance(results[0], TargetServiceError) and results[0].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "counts sum to 3, but gt_boxes has 2 rows" in results[0].details
    assert (results[1].labels == 1).any()


def test_the_dense_size_precheck_counts_one_byte_field_tags():
    """``codec.dense_response_bytes`` counts each length-delimited field's tag as one byte,
    true of field numbers below 16 only: a field numbered past 15 in the messages it sizes
    would put its exact size, checked against the message limit, off by a byte a field."""
    sized = (pb.AssignResponse, pb.DenseTargets, pb.Tensor, pb.DroppedBoxes, pb.GetAnchorsResponse)
    assert max(field.number for message in sized for field in message.DESCRIPTOR.fields) < 16


DENSE_CASES = [
    {},
    {"delta_dtype": "float16"},
    {"gt_classes": torch.tensor([3, 9]), "return_classes": True},
    {"return_max_iou": True, "request_id": "x" * 300},
    {"request_id": "y" * 70_000, "gt_classes": torch.tensor([1, 2]), "delta_dtype": "float16"},
]


@pytest.mark.parametrize("kwargs", DENSE_CASES)
def test_dense_response_size_is_exact(kwargs):  # D5
    config = presets.get("retinanet_torchvision").replace(background_class=200)
    request = build_request(GOOD, [2], CANVAS, config=config, format="dense", **kwargs)
    job = codec.decode_assign(request, codec.Limits())
    from tritarget.kernels import assign

    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, gt_classes=job.gt_classes,
                     return_max_iou=job.return_max_iou, backend="reference")  # fmt: skip
    anchors = resolve_grid(config.anchors, CANVAS).num_anchors
    predicted = codec.dense_response_bytes(1, anchors, request, config.background_class)
    assert predicted == codec.encode_assign(request, targets).ByteSize()


def test_dense_response_size_with_every_box_and_ignore_region_dropped_is_exact():
    """drop_invalid: the size held before computing counts every box and ignore region
    dropped; when they all are, it is the response's size (fewer: a bound)."""
    invalid = torch.tensor([[5.0, 5.0, 5.0, 9.0]] * 12)
    request = build_request(invalid, [12], CANVAS, preset="retinanet_mmdet", ignore_boxes=invalid[:3],
                            ignore_counts=[3], drop_invalid=True, format="dense")  # fmt: skip
    job = codec.decode_assign(request, codec.Limits())
    from tritarget.kernels import assign

    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, ignore_boxes=job.ignore_boxes,
                     ignore_counts=job.ignore_counts, drop_invalid=True, backend="cpu")  # fmt: skip
    assert [len(d) for d in targets.dropped] == [12] and [len(d) for d in targets.dropped_ignore] == [3]
    anchors = targets.num_anchors
    assert codec.dense_response_bytes(1, anchors, request, 0) == codec.encode_assign(request, targets).ByteSize()


def test_dense_response_size_with_128_boxes_dropped_counts_their_indices_as_one_byte_each():
    """Indices 0 to 127 take one varint byte each: the largest index is count - 1, not
    count (whose 128 would take two), so every box dropped is still the exact size."""
    invalid = torch.tensor([[5.0, 5.0, 5.0, 9.0]] * 128)
    request = build_request(invalid, [128], CANVAS, preset="retinanet_mmdet", drop_invalid=True, format="dense")
    job = codec.decode_assign(request, codec.Limits())
    from tritarget.kernels import assign

    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, drop_invalid=True, backend="cpu")
    assert [len(d) for d in targets.dropped] == [128]
    anchors = targets.num_anchors
    assert codec.dense_response_bytes(1, anchors, request, 0) == codec.encode_assign(request, targets).ByteSize()


def test_dense_response_one_byte_over_the_limit_is_refused_before_computing(server):  # D5
    anchors = resolve_grid(presets.get("retinanet_torchvision").anchors, CANVAS).num_anchors
    base = codec.dense_response_bytes(1, anchors, _good_request(format="dense"), 0)
    # Grow the echoed request_id until the response is exactly at the limit, then one byte over.
    padding = MIB - base
    while codec.dense_response_bytes(1, anchors, _good_request(format="dense", request_id="r" * padding), 0) > MIB:
        padding -= 1
    at_limit = _good_request(format="dense", request_id="r" * padding)
    over = _good_request(format="dense", request_id="r" * (padding + 1))
    assert codec.dense_response_bytes(1, anchors, at_limit, 0) == MIB
    assert codec.dense_response_bytes(1, anchors, over, 0) == MIB + 1
    with TargetClient(server.address, retries=0, timeout=30, max_message_bytes=4 * MIB) as client:
        batches = server.metrics.value("tritarget_compute_seconds_count")
        with pytest.raises(TargetServiceError) as info:
            client.assign_raw(over)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"would be {MIB + 1} bytes, over the {MIB}-byte message limit" in info.value.details
        # The id is what does not fit: named, not the format and the images (one already).
        assert info.value.details.startswith(f"request_id: the DENSE response (echoing the {padding + 1}-byte")
        assert server.metrics.value("tritarget_compute_seconds_count") == batches  # refused before computing
        assert client.assign_raw(at_limit).ByteSize() == MIB
    # Too big without the id too: the format and the images are named.
    with pytest.raises(
        ResourceExhausted, match=r"^format: the DENSE response would be \d+ bytes, .* use FORMAT_SPARSE"
    ):
        codec.decode_assign(
            _good_request(format="dense", request_id="r" * 100), codec.Limits(max_message_bytes=base - 1)
        )
    # A short id, but the response fits without it: the id is named.
    with pytest.raises(ResourceExhausted, match=r"^request_id: the DENSE response \(echoing the 100-byte request_id\)"):
        codec.decode_assign(
            _good_request(format="dense", request_id="r" * 100), codec.Limits(max_message_bytes=base + 50)
        )


def test_over_size_response_in_a_stream_is_an_in_band_error_and_the_stream_goes_on(server):  # D6
    # SPARSE: its size is known only after computing; the echoed id makes it too big.
    huge = _good_request(request_id="z" * (MIB - 200))
    with TargetClient(server.address, retries=0, timeout=30, max_message_bytes=4 * MIB) as client:
        items = [_good_request(request_id="a"), huge, _good_request(request_id="c")]
        results = list(client.stream(items, return_exceptions=True))
    assert len(results) == 3
    assert (results[0].labels == 1).any() and (results[2].labels == 1).any()
    assert isinstance(results[1], TargetServiceError)
    assert results[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in results[1].details
    assert results[1].details.startswith(f"request_id: the response (echoing the {MIB - 200}-byte request_id)")


def _crowded(images: int, per_image: int, side: int) -> torch.Tensor:
    corners = torch.rand(images * per_image, 2, generator=torch.Generator().manual_seed(0)) * (side - 48)
    return torch.cat([corners, corners + 8 + 40 * torch.rand(images * per_image, 2)], dim=1)


def test_a_huge_request_does_not_hold_the_compute_worker():
    """One request of 48 crowded images runs in bounded slices (4 images each); a small
    request sent meanwhile is answered long before the huge one finishes."""
    options = batching(max_batch_images=4, max_queue_delay_s=0.0)
    with ServerThread(backend="cpu", batching=options, limits=limits(max_boxes=100_000)) as srv:
        with TargetClient(srv.address, retries=0, timeout=120) as client:
            finished = {}

            def huge() -> None:
                client.assign(_crowded(48, 500, 320), [500] * 48, (320, 320), preset="retinanet_torchvision")
                finished["huge"] = time.monotonic()

            before = srv.metrics.value("tritarget_compute_seconds_count")
            thread = threading.Thread(target=huge)
            thread.start()
            until(lambda: srv.metrics.value("tritarget_compute_seconds_count") >= before + 2)  # slices running
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
            finished["small"] = time.monotonic()
            thread.join(120)
            batches = srv.metrics.value("tritarget_compute_seconds_count") - before
    assert finished["small"] < finished["huge"]
    assert batches == 48 / 4 + 1


def test_slices_of_a_caller_that_has_gone_are_not_computed():
    options = batching(max_batch_images=2, max_queue_delay_s=0.0)
    # The reference backend: the whole request takes seconds, far past the deadline.
    with ServerThread(backend="reference", batching=options, limits=limits(max_boxes=100_000)) as srv:
        with TargetClient(srv.address, retries=0) as client:
            before = srv.metrics.value("tritarget_compute_seconds_count")
            with pytest.raises(TargetServiceError) as info:
                client.assign(_crowded(64, 500, 320), [500] * 64, (320, 320), preset="retinanet_torchvision",
                              timeout=0.5)  # fmt: skip
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # The slice running at the deadline finishes; then nothing more is computed.
            counts = [srv.metrics.value("tritarget_compute_seconds_count")]
            while len(counts) < 2 or counts[-1] != counts[-2]:
                assert len(counts) < 30, counts
                time.sleep(1.5)
                counts.append(srv.metrics.value("tritarget_compute_seconds_count"))
            assert counts[-1] - before < 64 / 2


@pytest.mark.parametrize("enabled", [True, False])
def test_access_log_has_one_line_per_call(enabled, caplog):
    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]

    with ServerThread(access_log=enabled) as srv, TargetClient(srv.address, retries=0) as client:
        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            client.assign_raw(_good_request(request_id="job-7"))
            with pytest.raises(TargetServiceError):
                client.assign(GOOD, [1], CANVAS, preset="retinanet_torchvision", request_id="bad-1")
            bad = build_request(GOOD, [1, 1], CANVAS, preset="retinanet_torchvision", request_id="s1")
            bad.gt_counts[:] = [1, 2]  # 3 counted, 2 boxes
            with pytest.raises(TargetServiceError):
                list(client.stream([_good_request(request_id="s0"), bad]))
            if enabled:  # a stream item's line is written once gRPC took its answer: the client may read it first
                until(lambda: len(logged()) >= 4)
    lines = logged()
    if not enabled:
        assert lines == []
        return
    assert len(lines) == 4, lines
    # The caller's address on every line, and a failure's reason (an operator could tell
    # neither who sent a bad request nor what was wrong with it).
    assert re.fullmatch(r"Assign id='job-7' images=1 boxes=2 OK \d+\.\d\d ms peer=ipv4:127\.0\.0\.1:\d+", lines[0])
    assert re.fullmatch(r"Assign id='bad-1' images=1 boxes=1 INVALID_ARGUMENT \d+\.\d\d ms peer=ipv4:127\.0\.0\.1:\d+ "
                        r"reason='gt_counts: counts sum to 1, but gt_boxes has 2 rows'", lines[1])  # fmt: skip
    assert lines[2].startswith("AssignStream id='s0' images=1 boxes=2 OK")
    assert re.fullmatch(r"AssignStream id='s1' images=2 boxes=3 INVALID_ARGUMENT \d+\.\d\d ms "
                        r"peer=ipv4:127\.0\.0\.1:\d+ reason='gt_counts: .*'", lines[3]), lines[3]  # fmt: skip


@pytest.mark.parametrize("enabled", [True, False])
def test_a_stream_refused_while_draining_is_logged_only_with_the_access_log(enabled, caplog):
    """A stream's own end (here refused as the server drains) gets a line of its own in the
    access log, and none where the access log is off."""
    with ServerThread(access_log=enabled) as srv, TargetClient(srv.address, retries=0) as client:
        srv.loop.call_soon_threadsafe(srv.server.servicer.drain)
        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            with pytest.raises(TargetServiceError) as info:
                list(client.stream([_good_request()]))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.1)  # the line is written by the server's thread as the call ends
    lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
    if not enabled:
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("AssignStream ended UNAVAILABLE peer=ipv4:127.0.0.1:"), lines


def test_a_burst_of_calls_is_refused_as_overload_not_cancelled():
    """3,000 calls at once: those the queue cannot take get RESOURCE_EXHAUSTED, the
    overload answer a client backs off from. gRPC's own backlog limit (1,000 calls taken in
    but not yet picked up by the event loop) answered hundreds of them CANCELLED instead
    (715 here), a code that reads as the caller's own doing, and they never reached the
    servicer or its metrics."""
    request = _good_request().SerializeToString()

    async def burst(address: str) -> collections.Counter:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(ASSIGN)

            async def one() -> str:
                try:
                    await call(request, timeout=120)
                except grpc.RpcError as error:
                    return error.code().name
                return "OK"

            return collections.Counter(await asyncio.gather(*(one() for _ in range(3000))))

    with ServerThread(batching=batching(max_queue_images=64)) as srv:
        codes = asyncio.run(burst(srv.address))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes


def _errors(srv, method: str, code: str) -> float:
    return srv.metrics.value("tritarget_errors_total", {"method": method, "code": code})


def test_calls_ended_by_their_deadline_or_their_caller_are_counted_and_logged(caplog):
    """A call cancelled under its handler (deadline passed, caller gone, its stream cancelled)
    is a failed request like any other: counted by code and logged (asyncio's
    CancelledError is no Exception, and slipped past both)."""
    with ServerThread(batching=batching(max_queue_delay_s=5.0)) as srv:  # the batch never runs while they wait

        async def received(method: str, count: int) -> None:  # cancelled before the server had it, it logs nothing
            for _ in range(3000):
                if srv.metrics.value("tritarget_requests_total", {"method": method}) >= count:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"the server had not received {count} {method} calls within 30 s")

        async def calls() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)  # connected: the deadline is the call's alone
                unary = channel.unary_unary(ASSIGN, request_serializer=pb.AssignRequest.SerializeToString,
                                            response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary(_good_request(request_id="late"), timeout=0.15)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                call = unary(_good_request(request_id="gone"), timeout=30)
                await received("Assign", 2)
                call.cancel()
                stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream",
                                               request_serializer=pb.AssignRequest.SerializeToString,
                                               response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
                streaming = stream(iter([_good_request(request_id="streamed")]))
                await received("AssignStream", 1)
                streaming.cancel()

        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            asyncio.run(calls())

            def logged() -> list[str]:
                return sorted(r.getMessage() for r in caplog.records if r.name == "tritarget.access")

            # The server counts a failed call before it logs it: wait for the last line, not the count.
            until(lambda: len(logged()) == 3)
        assert _errors(srv, "Assign", "DEADLINE_EXCEEDED") == 1 and _errors(srv, "Assign", "CANCELLED") == 1
        assert _errors(srv, "AssignStream", "CANCELLED") == 1
        lines = logged()
        assert [line.split(" ")[:2] + line.split(" ")[4:5] for line in lines] == [
            ["Assign", "id='gone'", "CANCELLED"], ["Assign", "id='late'", "DEADLINE_EXCEEDED"],
            ["AssignStream", "id='streamed'", "CANCELLED"]]  # fmt: skip


def test_a_stream_cancelled_while_its_answers_are_sent_logs_no_error(caplog):
    """A caller that reads one megabyte answer of its stream and cancels: the server's send
    of the next one fails. gRPC logged most such failed sends as an ERROR with a traceback
    (ExecuteBatchError, for 7 of these 12 streams) for ordinary client behaviour; each answer
    left unsent is counted CANCELLED, and its bytes let go."""
    streams, per_stream = 12, 6
    request = build_request(GOOD, [2], (800, 1344), preset="retinanet_torchvision", format="dense")
    with ServerThread(backend="cpu") as srv, caplog.at_level(logging.WARNING):
        with grpc.insecure_channel(srv.address, options=[("grpc.max_receive_message_length", 64 * MIB)]) as channel:
            stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream",
                                           request_serializer=pb.AssignRequest.SerializeToString,
                                           response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
            for index in range(streams):
                call = stream(iter([request] * per_stream))
                assert next(call).dense.labels.shape
                time.sleep(0.02 * (index % 3))
                call.cancel()

        # Every request the server read is answered or counted CANCELLED, once.
        until(lambda: srv.metrics.value("tritarget_request_seconds_count", {"method": "AssignStream"})
              == srv.metrics.value("tritarget_requests_total", {"method": "AssignStream"}))  # fmt: skip
        until(lambda: srv.metrics.value("tritarget_unsent_response_bytes") == 0)
        assert _errors(srv, "AssignStream", "CANCELLED") >= streams
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("method", ["Assign", "AssignStream"])
def test_a_call_computed_on_the_event_loop_past_its_deadline_is_counted_as_exceeded(method, caplog):
    """A small SPARSE call (or a stream's item) at an idle cpu server is computed on the
    event loop: no await lets gRPC's cancellation reach its handler, which returned after
    the deadline (the stream's) had passed. The caller had DEADLINE_EXCEEDED; the server
    logged OK, counted no error and counted the response's bytes as sent."""
    with ServerThread(backend="cpu") as srv, TargetClient(srv.address, retries=0) as client:
        client.wait_until_ready(timeout=30)  # connected (a health check: no batch): the deadline is the call's alone
        batcher = srv.server.batcher
        compute = batcher._assign
        batcher._assign = lambda jobs: (time.sleep(1.5), compute(jobs))[1]  # the loop held past the deadline
        inline = srv.metrics.value("tritarget_inline_batches_total")
        time.sleep(0.05)  # the server idles: the call is computed where it arrives
        arguments = {"canvas": CANVAS, "preset": "retinanet_torchvision", "timeout": 0.75}
        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            with pytest.raises(TargetServiceError) as info:
                if method == "Assign":
                    client.assign(GOOD, [2], request_id="late", **arguments)
                else:
                    list(client.stream([{"gt_boxes": GOOD, "gt_counts": [2], "request_id": "late"}], **arguments))
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # The error is counted, then logged (by the server's thread): wait for both.
            access = lambda: [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]  # noqa: E731
            until(lambda: _errors(srv, method, "DEADLINE_EXCEEDED") == 1 and access())
        assert srv.metrics.value("tritarget_inline_batches_total") == inline + 1
        assert srv.metrics.value("tritarget_response_bytes_total", {"method": method}) == 0
        lines = access()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{method} id='late' images=1 boxes=2 DEADLINE_EXCEEDED"), lines


def test_a_response_whose_caller_has_gone_is_neither_encoded_nor_counted_as_sent():
    """The caller's deadline passes while its batch computes (held here until the caller has
    had its DEADLINE_EXCEEDED): its DENSE response (megabytes) was encoded for nobody and
    counted as sent."""
    gone = threading.Event()
    with ServerThread() as srv, TargetClient(srv.address, retries=0) as client:
        client.wait_until_ready(timeout=30)  # connected: the deadline is the call's alone
        batcher = srv.server.batcher
        compute = batcher._assign
        batcher._assign = lambda jobs: (gone.wait(30), compute(jobs))[1]
        with pytest.raises(TargetServiceError) as info:
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision", format="dense", timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        until(lambda: _errors(srv, "Assign", "DEADLINE_EXCEEDED") == 1)  # the server has seen it go
        gone.set()
        until(lambda: srv.metrics.value("tritarget_compute_seconds_count") == 1)
        time.sleep(0.2)  # the encode would follow the batch on its worker
        assert srv.metrics.value("tritarget_encode_seconds_count") == 0
        assert srv.metrics.value("tritarget_response_bytes_total", {"method": "Assign"}) == 0
        client.assign_raw(_good_request())  # one that waits is encoded and counted
        assert srv.metrics.value("tritarget_encode_seconds_count") == 1
        assert srv.metrics.value("tritarget_response_bytes_total", {"method": "Assign"}) > 0


def test_a_stream_ended_by_the_drain_counts_no_failed_request(caplog):
    """Its three requests were answered; the stream then ends UNAVAILABLE (the client sends
    the rest elsewhere). Requests are counted one by one, and none of them failed. The end
    was also timed as a fourth request of ~0 ms and logged as one of no images."""
    srv = ServerThread().start()

    async def stream_then_drain() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream",
                                           request_serializer=pb.AssignRequest.SerializeToString,
                                           response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
            requests: asyncio.Queue = asyncio.Queue()

            async def send():
                while (request := await requests.get()) is not None:
                    yield request

            call = stream(send())
            for _ in range(3):
                requests.put_nowait(_good_request())
                assert not (await call.read()).HasField("error")
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.server.stop(5), srv.loop))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            await stopping
            return info.value.code()

    try:
        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            assert asyncio.run(stream_then_drain()) == grpc.StatusCode.UNAVAILABLE
        assert srv.metrics.value("tritarget_requests_total", {"method": "AssignStream"}) == 3
        assert srv.metrics.value("tritarget_request_seconds_count", {"method": "AssignStream"}) == 3
        assert _errors(srv, "AssignStream", "UNAVAILABLE") == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
        assert len(lines) == 4 and lines[-1].startswith("AssignStream ended UNAVAILABLE peer=ipv4:127.0.0.1:"), lines
        assert "reason='the server is shutting down; resend the unanswered requests" in lines[-1], lines
    finally:
        srv.server = None
        srv.stop()


@pytest.mark.parametrize(("remaining", "code"), [(-0.2, "DEADLINE_EXCEEDED"), (0.0, "DEADLINE_EXCEEDED"),
                                                 (0.0015, "DEADLINE_EXCEEDED"), (0.05, "DEADLINE_EXCEEDED"),
                                                 (0.2, "CANCELLED"), (None, "CANCELLED")])  # fmt: skip
def test_a_call_cut_off_at_its_deadline_counts_as_deadline_exceeded(remaining, code):
    """The caller's deadline passes a moment before the server's (which runs from the call's
    arrival): its cancellation came while the server had 1-2 ms left, and the queued items
    of a stream that ran out of time were counted as CANCELLED (16 of 24 in a review's run
    with the compute worker busy, a race too rare to pin in a test of its own), as if their
    callers had hung up."""
    assert servicer.cut_off_code(remaining) == code


def test_stream_items_wait_for_room_under_the_unsent_bound():
    """A stream's item is not refused by the unsent bound (it failed in-band, in the middle
    of a data loader's epoch, its stream having no other replica to go to): it waits, in
    order, without its work or its bytes (a DENSE one's were held while it waited for
    queue room); meanwhile unary calls are refused, and a stream's SPARSE response, built
    past the bound, is sent (dropping it freed nothing)."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12.6 MB of anchors
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense")
    sparse = {"gt_boxes": GOOD, "gt_counts": [2]}
    # Room for the anchors (12,570,642 bytes) and less than a SPARSE response beside them.
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=12_570_642 + 64)) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        waiting = lambda: srv.metrics.value("tritarget_stream_requests_waiting")  # noqa: E731
        computed = lambda: srv.metrics.value("tritarget_compute_seconds_count")  # noqa: E731
        with TargetClient(srv.address, retries=0) as client:
            dense_response = client.assign_raw(dense).SerializeToString()
            until(lambda: unsent() == 0)  # let go when gRPC has sent it, which may follow the caller's having it
            held = unread_call(srv.port, "GetAnchors", anchors.SerializeToString())
            until(lambda: unsent() > 12e6)
            # Built past the bound: a unary SPARSE response is dropped (documented), a stream's sent.
            with pytest.raises(TargetServiceError, match="RESOURCE_EXHAUSTED"):
                client.assign(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="sparse")
            answers = list(client.stream([sparse] * 3, preset="retinanet_torchvision", canvas=(2048, 2048)))
            assert len(answers) == 3
            assert _errors(srv, "AssignStream", "RESOURCE_EXHAUSTED") == 0
            before = computed()
            stream = unread_call(srv.port, "AssignStream", *[dense.SerializeToString()] * 3)
            until(lambda: waiting() == 3)
            assert computed() == before  # waiting without their work
            with pytest.raises(TargetServiceError, match="3 stream requests waiting for room"):
                client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
            held.close()  # room: the first item is computed and held until its caller reads it
            # One DENSE response, held from the start (alone, it passes the bound).
            until(lambda: computed() > before and waiting() == 2 and unsent() == len(dense_response))
            stream.close()  # the stream ends: its waiting items leave, its held bytes are let go
            until(lambda: unsent() == 0 and waiting() == 0)
            assert _errors(srv, "AssignStream", "RESOURCE_EXHAUSTED") == 0
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")


def test_stream_answers_never_sent_count_as_their_callers_gone_not_as_sent(caplog):
    """A stream whose caller read none of its answers, then went away: its three computed
    DENSE answers were logged OK and counted in the response bytes, none as CANCELLED."""
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense")
    with ServerThread(backend="cpu") as srv, caplog.at_level(logging.INFO, logger="tritarget.access"):
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        with TargetClient(srv.address, retries=0) as client:
            size = len(client.assign_raw(dense).SerializeToString())
        until(lambda: unsent() == 0)
        caplog.clear()
        sent = srv.metrics.value("tritarget_response_bytes_total", {"method": "AssignStream"})
        encoded = lambda: srv.metrics.value("tritarget_encode_seconds_count")  # noqa: E731
        before = encoded()
        stream = unread_call(srv.port, "AssignStream", *[dense.SerializeToString()] * 3)
        until(lambda: encoded() == before + 3)  # all three computed
        assert unsent() == 3 * size  # none taken by the transport
        stream.close()
        until(lambda: unsent() == 0 and _errors(srv, "AssignStream", "CANCELLED") == 3)
        assert srv.metrics.value("tritarget_response_bytes_total", {"method": "AssignStream"}) == sent
        assert srv.metrics.value("tritarget_request_seconds_count", {"method": "AssignStream"}) == 3
        lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
        assert [line.split(" boxes=2 ")[1].split()[0] for line in lines] == ["CANCELLED"] * 3, lines


def test_an_error_answer_its_stream_never_sent_is_recorded_with_its_own_code(caplog):
    """A stream whose caller read none of its answers, then went away: its refused item's
    answer (an in-band error, never sent) is timed and logged all the same, with its own
    code, and its DENSE item's as CANCELLED."""
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense")
    bad = _good_request(request_id="bad")
    bad.gt_counts[:] = [3]  # 2 boxes
    with ServerThread(backend="cpu") as srv, caplog.at_level(logging.INFO, logger="tritarget.access"):
        encoded = lambda: srv.metrics.value("tritarget_encode_seconds_count")  # noqa: E731
        logged = lambda: [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]  # noqa: E731
        before = encoded()
        stream = unread_call(srv.port, "AssignStream", dense.SerializeToString(), bad.SerializeToString())
        until(lambda: encoded() == before + 1 and _errors(srv, "AssignStream", "INVALID_ARGUMENT") == 1)
        stream.close()
        until(lambda: len(logged()) == 2, timeout=10)
        assert srv.metrics.value("tritarget_request_seconds_count", {"method": "AssignStream"}) == 2
        lines = logged()
    assert lines[0].startswith("AssignStream id='' images=1 boxes=2 CANCELLED"), lines
    assert lines[1].startswith("AssignStream id='bad' images=1 boxes=3 INVALID_ARGUMENT"), lines


def test_sparse_stream_items_are_not_held_back_by_a_lone_response_past_the_bound():
    """One response always fits, so a lone unread one may pass max_unsent_bytes: a stream's
    SPARSE items (whose size is known only once computed) wait for room only behind other
    items waiting; with none, they are computed and sent at once."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12.6 MB of anchors
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=MIB)) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        held = unread_call(srv.port, "GetAnchors", anchors.SerializeToString())
        until(lambda: unsent() > 12e6)
        with TargetClient(srv.address, retries=0) as client:
            items = [{"gt_boxes": GOOD, "gt_counts": [2]}] * 3
            assert len(list(client.stream(items, preset="retinanet_torchvision", canvas=CANVAS, timeout=5))) == 3
        held.close()
        until(lambda: unsent() == 0)


def test_a_unary_call_that_fits_is_refused_while_stream_items_wait_for_room():
    """Stream items waiting for room under max_unsent_bytes come first: a unary call is
    refused while they wait, even one whose response fits beside the bytes held."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12,570,642 bytes of anchors
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense").SerializeToString()
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=12_570_642 + (64 << 10))) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        waiting = lambda: srv.metrics.value("tritarget_stream_requests_waiting")  # noqa: E731
        held = unread_call(srv.port, "GetAnchors", anchors.SerializeToString())
        until(lambda: unsent() > 12e6)
        with TargetClient(srv.address, retries=0) as client:
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")  # a small response fits beside them
            stream = unread_call(srv.port, "AssignStream", dense)  # 15.7 MB: waits
            until(lambda: waiting() == 1)
            with pytest.raises(TargetServiceError, match=r"\(limit \d+, 1 stream requests waiting for room\)"):
                client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
            stream.close()
            until(lambda: waiting() == 0)
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
        held.close()
        until(lambda: unsent() == 0)


def test_unsent_bytes_up_to_the_bound_fit_and_one_more_does_not():
    """max_unsent_bytes is the most held: a response (or a stream item) that brings the
    bytes held exactly to it is taken, one byte more is refused (or waits)."""
    with ServerThread(limits=limits(max_unsent_bytes=1000)) as srv:
        held = srv.server.servicer

        async def at_the_bound() -> None:
            held._hold(600)
            held._hold(400)  # 1,000 bytes
            with pytest.raises(Overloaded, match=r"1000 bytes .* \(limit 1000\); this 1-byte response"):
                held._hold(1)
            held._let_go(400)
            await asyncio.wait_for(held._unsent_room_for(400), 2)  # a stream item: let in at once
            item = asyncio.ensure_future(held._unsent_room_for(1))
            await asyncio.sleep(0.05)
            assert not item.done() and held.waiting_requests == 1
            held._let_go(1000)
            await asyncio.wait_for(item, 2)
            held._let_go(1)

        srv.run(at_the_bound())
        assert srv.metrics.value("tritarget_unsent_response_bytes") == 0


def test_a_stream_item_that_leaves_the_line_lets_the_next_in_at_once():
    """A stream item waiting for room goes away (its stream ended): the item behind it,
    which fits, is let in then, not once some other response is let go."""
    with ServerThread(limits=limits(max_unsent_bytes=1000)) as srv:
        held = srv.server.servicer

        async def first_goes() -> None:
            held._hold(800)  # a response not yet taken by its caller
            first = asyncio.ensure_future(held._unsent_room_for(900))  # waits for the 800 bytes
            second = asyncio.ensure_future(held._unsent_room_for(200))  # fits, but waits its turn
            await asyncio.sleep(0.05)
            assert held.waiting_requests == 2
            first.cancel()
            await asyncio.wait_for(second, 2)
            assert held.waiting_requests == 0
            held._let_go(200)
            held._let_go(800)

        srv.run(first_goes())
        assert srv.metrics.value("tritarget_unsent_response_bytes") == 0


def test_a_stream_item_let_in_as_its_stream_ends_gives_its_room_back():
    """A stream item is let in (its bytes held for it) and its stream ends before it runs
    on: the bytes held for it are let go, not held for good."""
    with ServerThread(limits=limits(max_unsent_bytes=1000)) as srv:
        held = srv.server.servicer

        async def let_in_then_gone() -> None:
            held._hold(800)
            item = asyncio.ensure_future(held._unsent_room_for(600))
            await asyncio.sleep(0.05)
            assert held.waiting_requests == 1
            held._let_go(800)  # room: the item is let in, its 600 bytes held for it
            item.cancel()  # and its stream ends before it runs again
            with contextlib.suppress(asyncio.CancelledError):
                await item

        srv.run(let_in_then_gone())
        assert srv.metrics.value("tritarget_unsent_response_bytes") == 0


def test_a_stream_that_ends_leaves_the_line_for_unsent_room_at_once():
    """Two streams wait behind an unread response; the second ends: its items leave the
    line, and the gauge and the "server busy" message count the first one's only (they
    counted the gone ones until the line moved past them)."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12,570,642 bytes of anchors
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense").SerializeToString()
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=12_570_642 + 64)) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        waiting = lambda: srv.metrics.value("tritarget_stream_requests_waiting")  # noqa: E731
        held = unread_call(srv.port, "GetAnchors", anchors.SerializeToString())
        until(lambda: unsent() > 12e6)
        first = unread_call(srv.port, "AssignStream", dense, dense)
        until(lambda: waiting() == 2)
        second = unread_call(srv.port, "AssignStream", dense, dense, dense)
        until(lambda: waiting() == 5)
        second.close()
        until(lambda: waiting() == 2, timeout=10)
        with TargetClient(srv.address, retries=0) as client:
            with pytest.raises(
                TargetServiceError, match=r"server busy: .*\(limit \d+, 2 stream requests waiting for room\)"
            ):
                client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
        first.close()
        held.close()
        until(lambda: unsent() == 0 and waiting() == 0)


def test_a_sparse_stream_item_waits_its_turn_behind_a_dense_one():
    """A stream of [DENSE, SPARSE] while another caller held bytes: the SPARSE item was
    computed at once and held its bytes, the DENSE one ahead of it waited for them, and
    its stream answers in order: stuck for good, every unary call refused meanwhile."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12,570,642 bytes of anchors
    items = [build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format=kind)
             for kind in ("dense", "sparse")]  # fmt: skip
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=12_570_642 + 64)) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        waiting = lambda: srv.metrics.value("tritarget_stream_requests_waiting")  # noqa: E731
        held = unread_call(srv.port, "GetAnchors", anchors.SerializeToString())
        until(lambda: unsent() > 12e6)
        with TargetClient(srv.address, retries=0) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(lambda: list(client.stream(items, timeout=20)))
            until(lambda: waiting() == 2)  # the SPARSE one in line behind the DENSE one
            held.close()
            dense, sparse = streamed.result(20)
            assert dense.labels.shape == sparse.labels.shape and torch.equal(dense.labels, sparse.labels)
        until(lambda: unsent() == 0 and waiting() == 0)


def test_responses_their_callers_do_not_read_are_bounded():
    """A 30-byte GetAnchors request (or a DENSE Assign) makes a response of up to the message
    limit, which gRPC keeps while its caller does not read: 8 such calls pinned 5 GB, with
    nothing to refuse the next. Now responses waiting for their callers are bounded
    (max_unsent_bytes, one response always fits) and the calls beyond are refused, before
    their work where their size is known before (DENSE, GetAnchors)."""
    anchors = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
    anchors.config.preset = "retinanet_torchvision"  # 12.6 MB of anchors
    dense = build_request(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense")  # 15.7 MB
    with ServerThread(backend="cpu", limits=limits(max_unsent_bytes=30 << 20)) as srv:
        unsent = lambda: srv.metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
        refused = lambda method: _errors(srv, method, "RESOURCE_EXHAUSTED")  # noqa: E731
        calls = [unread_call(srv.port, "GetAnchors", anchors.SerializeToString())]
        until(lambda: unsent() > 12e6)
        calls.append(unread_call(srv.port, "GetAnchors", anchors.SerializeToString()))
        until(lambda: unsent() > 24e6)
        calls.append(unread_call(srv.port, "GetAnchors", anchors.SerializeToString()))
        calls.append(unread_call(srv.port, "Assign", dense.SerializeToString()))
        until(lambda: refused("GetAnchors") == 1 and refused("Assign") == 1)
        assert unsent() <= 30 << 20
        # Their sizes are known before the work: refused without computing (it was done, then dropped).
        assert srv.metrics.value("tritarget_compute_seconds_count") == 0
        for call in calls:
            call.close()
        until(lambda: unsent() == 0)
        with TargetClient(srv.address, retries=0) as client:  # callers that read are served, and let go
            assert client.get_anchors((2048, 2048), preset="retinanet_torchvision").shape[1] == 4
            client.assign(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense")
            until(lambda: unsent() == 0)  # let go when gRPC has sent it, which may follow the caller's having it
            # Held at its largest size before the work (every box dropped), then at its own size.
            client.assign(GOOD, [2], (2048, 2048), preset="retinanet_torchvision", format="dense", drop_invalid=True)
            until(lambda: unsent() == 0)
            with pytest.raises(TargetServiceError, match="INVALID_ARGUMENT"):  # failed in the work: let go
                client.assign(GOOD.flip(1), [2], (2048, 2048), preset="retinanet_torchvision", format="dense")
            assert len(list(client.stream([{"gt_boxes": GOOD, "gt_counts": [2]}] * 3,
                                          preset="retinanet_torchvision", canvas=(2048, 2048)))) == 3  # fmt: skip
        until(lambda: unsent() == 0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def test_the_largest_request_the_limits_allow_fits_the_request_bound():
    """max_boxes boxes with int64 classes and as many crowd regions, max_images images with
    counts, image and pad sizes, a config of max_config_bytes: within the bound, twice over."""
    bound = codec.Limits()
    images, boxes = bound.max_images, bound.max_boxes
    counts = [boxes // images] * images
    counts[-1] += boxes - sum(counts)
    request = build_request(torch.tensor([[1.0, 1.0, 5.0, 5.0]]).expand(boxes, 4), counts, (4096, 4096),
                            preset="retinanet_torchvision",
                            ignore_boxes=torch.tensor([[1.0, 1.0, 5.0, 5.0]]).expand(boxes, 4),
                            ignore_counts=counts)  # fmt: skip
    # The widest types the server takes (the client sends int32).
    encode_tensor(torch.arange(boxes), request.gt_classes)
    encode_tensor(torch.full((images, 2), 4096), request.image_sizes)
    request.pad_sizes.CopyFrom(request.image_sizes)
    request.config.config_json = "x" * bound.max_config_bytes
    assert request.gt_classes.dtype == pb.DTYPE_INT64 and request.image_sizes.dtype == pb.DTYPE_INT64
    assert 2 * request.ByteSize() <= bound.max_request_bytes < 9 * MIB
    assert codec.Limits(max_message_bytes=MIB).max_request_bytes == MIB


def test_a_request_past_the_bound_is_refused_before_the_server_takes_it_in():
    """12 MiB of padding in a field the server does not know: refused by gRPC (it was read
    whole, up to the 256 MiB response limit); a request of 150,000 boxes, past the box limit
    but inside the bound, is refused by name."""
    padding = 12 * MIB
    with ServerThread() as srv, grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length",
                                                                              64 * MIB)]) as channel:  # fmt: skip
        call = channel.unary_unary(ASSIGN, response_deserializer=pb.AssignResponse.FromString)
        padded = _good_request().SerializeToString() + _varint(1000 << 3 | 2) + _varint(padding) + bytes(padding)
        with pytest.raises(grpc.RpcError) as refused:
            call(padded, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        many = build_request(GOOD[:1].expand(150_000, 4), [150_000], CANVAS, preset="retinanet_torchvision")
        with pytest.raises(grpc.RpcError) as named:
            call(many.SerializeToString(), timeout=60)
        assert named.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "150000 boxes is over the server's limit of 100000" in named.value.details()


def test_a_message_over_a_size_limit_says_what_to_do():
    """gRPC refuses a message over a size limit with its sizes only ("SERVER: Received message
    larger than max (3200058 vs. 1260320)"), which tells a caller neither which limit nor
    what to change: the client's error says it, for the server's request bound and for its
    own limit on a response, on unary calls and streams."""
    many = _crowded(1, 100_000, 96)  # 1.6 MB: over the 1.26 MB these limits let a request take
    with ServerThread(limits=limits(max_boxes=1000, max_images=8)) as srv:
        with TargetClient(srv.address, retries=0) as client:
            for call in (lambda: client.assign(many, [100_000], CANVAS, preset="retinanet_torchvision"),
                         lambda: list(client.stream([{"gt_boxes": many, "gt_counts": [100_000]}], canvas=CANVAS,
                                                    preset="retinanet_torchvision"))):  # fmt: skip
                with pytest.raises(TargetServiceError) as over:
                    call()
                assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "SERVER: Received message larger than max" in over.value.details, over.value.details
                assert "over the server's request size limit" in over.value.details
                assert "send fewer images or boxes per request" in str(over.value)
        with TargetClient(srv.address, retries=0, max_message_bytes=MIB) as small:
            with pytest.raises(TargetServiceError) as over:
                small.assign(GOOD, [2], (800, 1344), preset="retinanet_torchvision", format="dense")
            assert "CLIENT: Received message larger than max" in over.value.details, over.value.details
            assert "the response is over this client's max_message_bytes: raise it" in over.value.details
