"""``tritarget loadtest`` against real servers on loopback: every mode answers, counts and
verifies; errors and differences fail the run."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from test_service_harness import ServerThread, fake_assigner, free_port, limits, peer_recording_server, serve_process

from support import closed_pipe, run_into_a_closed_pipe, run_without_stderr
from tritarget.clients import loadtest
from tritarget.clients.loadtest import (
    LoadTestOptions,
    Report,
    Workload,
    _Driver,
    _histogram,
    _value_at,
    plot_format,
    run,
    verify_response,
)
from tritarget.kernels import assign
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service import codec
from tritarget.service.cli import build_parser, main
from tritarget.service.output import WhileRead

WORKLOAD = Workload(canvas=(256, 320), images=2, variants=4)


@pytest.fixture(scope="module")
def server():
    with ServerThread(backend="cpu") as srv:
        yield srv


def _options(server, **kwargs) -> LoadTestOptions:
    defaults = {"targets": (server.address,), "workload": WORKLOAD, "duration_s": 1.5, "warmup_s": 0.3,
                "concurrency": 4, "verify": 4}  # fmt: skip
    return LoadTestOptions(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stream": True, "window": 2}, {"workload": Workload(canvas=(256, 320), images=1, format="dense", fp16=True,
                                                               boxes=20, variants=4)}],
    ids=["unary", "stream", "dense-fp16-fixed-G"],
)  # fmt: skip
def test_closed_loop_answers_and_verifies(server, kwargs, tmp_path):
    before = server.metrics.value("tritarget_requests_total", {"method": "AssignStream" if kwargs.get("stream")
                                                               else "Assign"})  # fmt: skip
    report = run(_options(server, **kwargs))
    assert report.ok, report.table()
    assert report.errors == {} and report.mismatches == [] and report.verified == 4
    assert report.requests > 0 and report.warmup_requests > 0
    served = server.metrics.value("tritarget_requests_total", {"method": "AssignStream" if kwargs.get("stream")
                                                               else "Assign"}) - before  # fmt: skip
    assert served >= report.requests + report.warmup_requests  # every counted answer came from the server
    latency = report.percentiles_ms()
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert sum(row["ok"] for row in report.series) == report.requests
    report.write_json(tmp_path / "out.json")
    report.write_csv(tmp_path / "out.csv")
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["requests"] == report.requests and summary["ok"] is True and summary["series"]
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert sum(int(row["ok"]) for row in rows) == report.requests


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_open_loop_sends_on_schedule(server, stream):
    """Most requests go out within 10 ms of their time. Not every one: on a CI machine
    whose 2 cores another test worker kept busy, 3 of 80 went out 10 ms late, and 15 where
    other jobs loaded those cores three times over. A generator that falls behind its
    schedule (waiting for answers, or for its own work) is late on nearly every send."""
    report = run(_options(server, rate=40, duration_s=2.0, stream=stream, concurrency=2))
    assert report.ok, report.table()
    assert abs(report.requests - 80) <= 2  # the schedule, whatever the answers did
    assert report.sends >= 78 and report.late_sends < report.sends / 2, report.table()


@pytest.mark.parametrize("rate", [None, 40.0], ids=["closed", "open"])
def test_streams_make_way_before_the_server_closes_their_connections(monkeypatch, rate):
    """A server closes connections past its --connection-age-s (then a grace): a stream held
    for the whole run was cut, and its requests in flight counted as errors. Streams now
    make way for fresh ones in time; every request is answered."""
    from tritarget.service import server as server_module

    # Connections cut 2.4-2.6 s after they open (age 1 s, gRPC's jitter of 10%, then the
    # grace): a stream that never made way is cut within the 4 s run, and one that opened
    # just before its connection's age has a second for its last answers.
    monkeypatch.setattr(server_module, "_CONNECTION_AGE_GRACE_S", 1.5)
    monkeypatch.setattr(loadtest, "_STREAM_ROTATE_S", 0.4)
    with ServerThread(backend="cpu", connection_age_s=1.0) as srv:
        window = {} if rate else {"window": 2}
        report = run(_options(srv, stream=True, rate=rate, duration_s=4.0, concurrency=2, **window))
    assert report.ok and report.errors == {}, report.table()
    assert report.requests > 0 and report.mismatches == []


def test_several_client_processes(server):
    report = run(_options(server, processes=2, duration_s=2.0))
    assert report.ok, report.table()
    assert report.verified == 4
    # The clients' CPU is their load's, not their start-up's (each spawned process imports
    # torch and gRPC first, seconds of CPU): within the load's window no more than the
    # machine's cores can have been busy.
    assert 0 < report.client_cpu_s <= (os.cpu_count() or 1) * report.window_s
    assert report.window_s >= report.options.warmup_s + report.options.duration_s
    assert report.summary()["client_cpu_s"] == report.client_cpu_s
    assert "load generator: " in report.table() and "2 process(es)" in report.table()
    # The processes began their windows together (0.9 s apart before: each its own start-up).
    assert 0 <= report.start_skew_s < 0.5  # a few ms on a quiet machine; room for a busy one
    assert report.summary()["client_start_skew_s"] == report.start_skew_s


@pytest.mark.parametrize(
    "loop, concurrency, connections",
    [({}, 5, 5), ({"rate": 60}, 5, 5), ({"stream": True}, 5, 5), ({}, 70, 64)],
    ids=["closed", "open", "stream", "past-the-cap"],
)
def test_each_caller_has_its_own_connection(loop, concurrency, connections):
    """Front ends sharing a port (`serve --workers N`) are handed connections, not calls:
    the load comes over one connection per caller or stream (open loop: `concurrency`
    connections), as from a training job's many data-loader workers; at most 64 per client
    process, which more callers share (a thousand would otherwise hold a thousand sockets)."""
    with peer_recording_server() as (address, peers):
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=0.5, warmup_s=0.1,
                                     concurrency=concurrency, **loop))  # fmt: skip
    assert report.ok and report.requests > 10, report.table()
    assert len(peers) == connections, peers


def test_asking_to_verify_more_than_was_answered_fails_the_run_and_says_so(server):
    report = run(_options(server, verify=10**6, duration_s=0.5))
    assert 0 < report.verified <= report.requests
    assert report.mismatches == [] and report.unverified == 10**6 - report.verified and not report.ok
    table = report.table()
    assert f"verify: {report.verified} responses recomputed in-process, all equal" in table
    assert f"verify: 1,000,000 asked, only {report.verified:,} verified (no more were answered while measured)" in table
    assert "differ" not in table


def test_errors_are_counted_by_code_and_fail_the_run():
    with ServerThread(backend="cpu", limits=limits(max_images=1)) as srv:
        report = run(_options(srv, verify=0, duration_s=1.0))
        assert not report.ok
        assert report.requests == 0 and list(report.errors) == ["RESOURCE_EXHAUSTED"]
        assert "errors by code: RESOURCE_EXHAUSTED" in report.table()
        # What the server said, once per code: the code and a count alone named nothing.
        said = "gt_counts: 2 images is over the server's limit of 1"
        assert f"  RESOURCE_EXHAUSTED: {said}" in report.table()
        assert report.summary()["error_details"] == {"RESOURCE_EXHAUSTED": said}
        streamed = run(_options(srv, verify=0, duration_s=0.5, stream=True, processes=2))
        assert streamed.summary()["error_details"] == {"RESOURCE_EXHAUSTED": said}, streamed.table()
        code = main(["loadtest", "--target", srv.address, "--duration", "0.5", "--warmup", "0", "--canvas", "256",
                     "320", "--images", "2", "--no-progress"])  # fmt: skip
    assert code == 1


def test_the_warm_ups_errors_are_reported_apart_not_measured():
    """A server that fails its first calls (still starting up) then answers: the warm-up's
    failures are reported apart, with their message, and fail nothing; they were counted
    nowhere (review 49), and a warm-up message could stand for a measured error's code."""
    first_call = []

    def answer(request: bytes, context) -> bytes:
        first_call.append(first_call[0] if first_call else time.monotonic())
        if time.monotonic() - first_call[0] < 0.3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "still warming up")
        return b""

    with fake_assigner(answer, lambda requests, context: (answer(b"", context) for _ in requests)) as address:
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=0.5, warmup_s=0.8, concurrency=2,
                                     verify=0))  # fmt: skip
    assert report.ok and report.requests > 0 and report.errors == {}, report.table()
    failed = report.warmup_errors.get("UNAVAILABLE", 0)
    assert 0 < failed <= report.warmup_requests and set(report.warmup_errors) == {"UNAVAILABLE"}, report.table()
    assert f"warm-up (not measured): {failed:,} of {report.warmup_requests:,} requests failed: UNAVAILABLE" in (
        report.table()
    )
    assert "  UNAVAILABLE: still warming up" in report.table() and report.summary()["error_details"] == {}
    assert report.summary()["warmup_errors"] == {"UNAVAILABLE": failed}


def _response(workload: Workload, index: int) -> pb.AssignResponse:
    request = workload.request(index)
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, gt_classes=job.gt_classes, seed=job.seed,
                     backend="cpu")  # fmt: skip
    return codec.encode_assign(request, targets)


def test_verification_finds_a_wrong_label_and_a_wrong_delta():
    response = _response(WORKLOAD, 1)
    assert verify_response(WORKLOAD, 1, response) is None
    assert "request_id 'loadtest-1', expected 'loadtest-2'" in verify_response(WORKLOAD, 2, response)
    other = pb.AssignResponse()
    other.CopyFrom(response)
    other.request_id = "loadtest-2"
    assert verify_response(WORKLOAD, 2, other).startswith("request 2: ")  # another request's targets
    swapped = _response(WORKLOAD, 2)  # ignored anchors listed as negative and the other way round
    lists = swapped.sparse
    lists.listed_label, lists.unlisted_label = lists.unlisted_label, lists.listed_label
    assert "labels differ" in verify_response(WORKLOAD, 2, swapped)
    tampered = pb.AssignResponse()
    tampered.CopyFrom(response)
    deltas = torch.frombuffer(bytearray(tampered.sparse.positive_deltas.data), dtype=torch.float32).clone()
    deltas[0] += 0.01
    tampered.sparse.positive_deltas.data = deltas.numpy().tobytes()
    assert "deltas of positives differ by up to 0.01" in verify_response(WORKLOAD, 1, tampered)


@pytest.mark.parametrize("change", ["deltas", "matched"])
def test_verification_reads_every_anchor_of_a_dense_answer(change):
    """DENSE carries a matched box and deltas for every anchor: a wrong one of an anchor that
    is not positive passed, as only the positives' were compared (review 48)."""
    workload = dataclasses.replace(WORKLOAD, format="dense", preset="retinanet_detectron2")
    response = _response(workload, 1)
    assert verify_response(workload, 1, response) is None
    labels = torch.frombuffer(bytearray(response.dense.labels.data), dtype=torch.int8)
    anchor = int(torch.nonzero(labels == 0)[0])  # a negative anchor
    field = response.dense.deltas if change == "deltas" else response.dense.matched_gt
    values = torch.frombuffer(bytearray(field.data), dtype=torch.float32 if change == "deltas" else torch.int32)
    if change == "deltas":
        values.view(-1, 4)[anchor] += 1000
    else:
        values[anchor] = 0 if values[anchor] != 0 else 1
    field.data = values.numpy().tobytes()
    assert f"{'deltas' if change == 'deltas' else 'matched boxes'} of anchors differ" in verify_response(
        workload, 1, response
    )


def test_a_sampling_presets_answers_verify():
    """Each request was built with a fresh sampling seed and recomputed with none: a correct
    server failed --verify on every RPN preset (review 48). Built with ``seed + index`` now,
    recomputed with the request's."""
    workload = dataclasses.replace(WORKLOAD, preset="rpn_detectron2")
    assert workload.request(1).seed == workload.request(1).seed == workload.seed + 1
    with ServerThread(backend="cpu") as srv:
        report = run(_options(srv, workload=workload, duration_s=0.5, warmup_s=0.1, concurrency=2, verify=3))
    assert report.ok and report.verified == 3, report.table()


def test_verification_names_a_response_in_another_format_or_delta_dtype():
    """A response must carry its targets as its request asked: DENSE targets for a SPARSE
    request, or float16 deltas for float32 ones, are named as such."""
    dense = dataclasses.replace(WORKLOAD, format="dense")
    assert verify_response(WORKLOAD, 1, _response(dense, 1)) == "request 1: DENSE targets, asked SPARSE"
    fp16 = dataclasses.replace(WORKLOAD, fp16=True)
    assert verify_response(WORKLOAD, 1, _response(fp16, 1)) == "request 1: deltas DTYPE_FLOAT16, asked DTYPE_FLOAT32"


def test_verification_holds_float32_deltas_to_a_tight_tolerance():
    """float32 deltas are compared within 1e-5: one off by 1e-4 differs (float16's 1e-3 would pass it)."""
    response = _response(WORKLOAD, 1)
    deltas = torch.frombuffer(bytearray(response.sparse.positive_deltas.data), dtype=torch.float32).clone()
    deltas[0] += 1e-4
    response.sparse.positive_deltas.data = deltas.numpy().tobytes()
    assert "deltas of positives differ by up to" in verify_response(WORKLOAD, 1, response)


def test_the_deadline_counts_from_the_start_line_not_while_requests_are_built(server, monkeypatch):
    """One client process built its requests under the collector's deadline (the run, the
    timeout and a minute): the largest workload, two minutes to build, failed before any
    load (review 48). Here the run, the timeout and the slack are 1.8 s and the build 3 s
    (a request's timeout of 1 s: at 0.2 s a busy 2-core CI machine timed 4 of 83 out)."""
    build = Workload.request

    def slow(self, index):
        time.sleep(1.0)
        return build(self, index)

    monkeypatch.setattr(Workload, "request", slow)
    monkeypatch.setattr(loadtest, "_FINISH_SLACK_S", 0.5)
    workload = dataclasses.replace(WORKLOAD, variants=3)
    report = run(_options(server, workload=workload, duration_s=0.3, warmup_s=0.0, timeout_s=1.0, verify=0))
    assert report.ok and report.requests > 0, report.table()


def test_percentiles_are_nearest_rank():
    """hdrhistogram rounds the rank to the nearest count: of 160 answers, 2 slow ones, the
    p99 was the 158th, fast (review 48); the 159th by nearest rank."""
    latency = _histogram()
    for micros in [9_000] * 158 + [302_000, 502_000]:
        latency.record_value(micros)
    assert [_value_at(latency, p) // 1000 for p in (50, 99, 99.9, 100)] == [9, 302, 502, 502]


def test_cli_against_tritarget_serve(tmp_path):
    """The issue's command, shortened: a `tritarget serve` process, exit 0, the table, the JSON."""
    process, port = serve_process("--backend", "cpu", "--warmup-canvas", "64", "64")
    try:
        out = tmp_path / "out.json"
        code = main(["loadtest", "--target", f"127.0.0.1:{port}", "--duration", "2", "--warmup", "0.5",
                     "--concurrency", "4", "--verify", "5", "--canvas", "256", "320", "--images", "2",
                     "--json", str(out), "--no-progress"])  # fmt: skip
        assert code == 0
        summary = json.loads(out.read_text())
        assert summary["errors"] == {} and summary["verified"] == 5 and summary["requests"] > 0
        assert summary["workload"].startswith("retinanet_torchvision 256x320, 2 COCO-like images")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


# --------------------------------------------------------------------------- failures, Ctrl-C, bad flags

# The load generator's own behaviour: a tiny workload, answered by a server that computes nothing.
TINY = Workload(canvas=(64, 64), images=1, variants=2)


@contextlib.contextmanager
def _echo_server(end_first_stream: grpc.StatusCode | str | None = None, stall: tuple[int, float] | None = None,
                 peers: int = 1) -> Iterator[tuple[str, threading.Event, list[int]]]:  # fmt: skip
    """A gRPC server on loopback that answers Assign and every AssignStream item with an
    empty response (answered, no error). Its first stream answers 3 requests, reads 2 more
    (a window of 2 then holds the client: it is not writing when the stream ends) and ends,
    with the status code ``end_first_stream``, or without error ("OK"); ``stall=(n, s)``:
    the n-th unary answer waits s seconds. Yields its address, an event set once ``peers``
    connections have been answered, and the count of answers."""
    seen, answered, streams, lock = set(), [0], [0], threading.Lock()
    loading = threading.Event()

    def answer(request: bytes, context) -> bytes:
        with lock:
            seen.add(context.peer())
            answered[0] += 1
            if len(seen) >= peers:
                loading.set()
            stalled = stall is not None and answered[0] == stall[0]
        if stalled:
            time.sleep(stall[1])  # the server stalls: the behaviour under test
        return b""

    def answer_stream(requests, context):
        with lock:
            streams[0] += 1
            first = streams[0] == 1
        for n, _ in enumerate(requests):
            if first and n >= 3 and end_first_stream is not None:
                if n == 3:
                    continue
                if end_first_stream == "OK":
                    return
                context.abort(end_first_stream, "the first stream ends here")
            yield answer(b"", context)

    with fake_assigner(answer, answer_stream) as address:
        yield address, loading, answered


def _closed_port() -> str:
    """An address nothing listens on: connections are refused."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("end, code", [(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"), ("OK", "UNANSWERED")],
                         ids=["error", "closed-early"])  # fmt: skip
def test_a_stream_that_fails_is_reopened(end, code):
    with _echo_server(end_first_stream=end) as (address, _, _):
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=0.5, warmup_s=0, concurrency=1,
                                     stream=True, window=2))  # fmt: skip
    assert report.errors == {code: 2}, report.table()  # the two in flight
    assert report.requests > 3, report.table()  # answered after the failure, by a new stream


def test_a_stream_ending_while_a_request_is_written_is_not_blamed_on_the_server():
    """A server that ends every stream after 3 answers with UNAVAILABLE, while the client
    still writes (a window of 8): gRPC's aio client reports a made-up INTERNAL for some of
    them (a few percent of streams, a race); the report must not count them as INTERNAL."""

    def end_after_three(requests, context):
        for n, _ in enumerate(requests):
            if n == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "this stream ends here")
            yield b""

    with fake_assigner(lambda request, context: b"", end_after_three) as address:
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=1.0, warmup_s=0, concurrency=8,
                                     stream=True, window=8))  # fmt: skip
    assert set(report.errors) <= {"UNAVAILABLE", "ENDED_WHILE_SENDING"}, report.table()
    assert report.errors["UNAVAILABLE"] > 0 and report.requests >= 3 * 8, report.table()


def test_the_failed_send_grpc_reports_as_internal_is_told_from_the_servers_internal():
    """The race above, without the race: grpc.aio's error for a write to a stream that ended
    (as grpcio 1.85 words it, read from a real one) counts as ENDED_WHILE_SENDING; an INTERNAL
    from the server, or another code, counts as itself."""
    failed_send = 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f4cae5321b0>,)'

    def error(code: grpc.StatusCode, debug: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "", debug)

    assert loadtest._code(error(grpc.StatusCode.INTERNAL, failed_send)) == "ENDED_WHILE_SENDING"
    assert loadtest._code(error(grpc.StatusCode.INTERNAL, "")) == "INTERNAL"
    assert loadtest._code(error(grpc.StatusCode.UNAVAILABLE, failed_send)) == "UNAVAILABLE"


@pytest.mark.parametrize("server", ["fails-a-stream", "down"])
def test_an_open_loop_stream_answers_or_counts_every_scheduled_request(server, monkeypatch):
    """40 requests scheduled: each is answered or an error, however the streams fail.
    A stream reopens 0.2 s after a failure and a send is late past 50 ms: the waits for a
    stream are well past the bound, a busy machine's scheduling well within it (at 10 ms
    a busy CI machine sent 3 of 80 late)."""
    monkeypatch.setattr(loadtest, "_REOPEN_PAUSE_S", 0.2)
    monkeypatch.setattr(loadtest, "_LATE_S", 0.05)
    with _echo_server(end_first_stream=grpc.StatusCode.UNAVAILABLE) as (address, _, _):
        report = run(
            LoadTestOptions(
                targets=(address if server == "fails-a-stream" else _closed_port(),),
                workload=TINY,
                duration_s=1.0,
                warmup_s=0,
                rate=40,
                concurrency=2,
                stream=True,
            )
        )
    assert abs(report.requests + sum(report.errors.values()) - 40) <= 1, report.table()
    assert list(report.errors) == ["UNAVAILABLE"], report.table()
    # Requests that waited for their stream to reopen are the server's doing, not a load
    # generator short of CPU (which the table said of a server that was down).
    assert "could not keep its schedule" not in report.table(), report.table()
    if server == "fails-a-stream":
        assert report.requests > 30, report.table()  # the failed stream was replaced
    else:
        assert report.requests == 0
        assert report.held_sends > 2 and "waited more than 50 ms for their stream" in report.table(), report.table()


def test_a_closed_loop_stream_keeps_trying_a_server_that_is_down():
    report = run(LoadTestOptions(targets=(_closed_port(),), workload=TINY, duration_s=0.5, warmup_s=0, concurrency=2,
                                 stream=True))  # fmt: skip
    assert report.requests == 0 and list(report.errors) == ["UNAVAILABLE"], report.table()
    assert report.errors["UNAVAILABLE"] >= 4, report.table()  # a failed open each time, until the end
    assert report.window_s >= 0.5


def test_a_stream_may_outlast_the_timeout_of_one_request():
    """``timeout_s`` bounds each request: a stream held for a run longer than it is not cut
    (a run 2.5 times its timeout, each answer a second of room)."""
    with _echo_server() as (address, _, _):
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=2.5, warmup_s=0, concurrency=1,
                                     stream=True, timeout_s=1.0))  # fmt: skip
    assert report.ok and report.errors == {} and report.requests > 0, report.table()


class _FakeStream:
    """A stream that takes every write at once; subclasses say how it answers."""

    async def write(self, request) -> None:
        pass

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> bool:
        return False


class _SelfCancellingChannel(_FakeStream):
    """A channel each of whose calls gRPC cancelled on its own: awaiting one raises
    asyncio.CancelledError (as grpc.aio does for any call cancelled on the client side),
    though nobody cancelled the caller. Its stream_stream calls are this object too."""

    def unary_unary(self, *args):
        async def call(request, **kwargs):
            await asyncio.sleep(0)
            raise asyncio.CancelledError

        return call

    def stream_stream(self, *args):
        return lambda **kwargs: self

    async def read(self):
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_call_grpc_cancelled_itself_is_a_cancelled_error(monkeypatch, stream):
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_SelfCancellingChannel()])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=0.2, warmup_s=0, concurrency=1,
                                 stream=stream))  # fmt: skip
    assert report.requests == 0 and list(report.errors) == ["CANCELLED"], report.table()


class _AnsweringStream(_FakeStream):
    """Answers each request written to it, in order, and ends once the client is done writing."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue = asyncio.Queue()

    async def write(self, request) -> None:
        self.answers.put_nowait(pb.AssignResponse())

    async def done_writing(self) -> None:
        self.answers.put_nowait(grpc.aio.EOF)

    async def read(self):
        return await self.answers.get()


class _StallingStream(_AnsweringStream):
    """A stream that takes every write at once and answers it; every 20th answer costs
    the client 30 ms of its own CPU (decoding a burst, a garbage collection): the load
    generator's event loop stalls, the stream never does."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def unary_unary(self, *args) -> None:
        return None  # the load test makes both kinds of call; this one is not used

    def stream_stream(self, *args):
        return lambda **kwargs: self

    async def read(self):
        answer = await super().read()
        self.reads += 1
        if self.reads % 20 == 0:
            busy_until = time.perf_counter() + 0.03
            while time.perf_counter() < busy_until:
                pass
        return answer

    async def close(self) -> None:
        pass


def test_an_open_loop_stream_late_for_the_generators_sake_says_so(monkeypatch):
    """Requests late because the client's own loop stalled were put down to their stream
    ("waited for their stream", "the server fell behind"): the case the lateness report
    is for. Only a write that blocked holds the stream."""
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_StallingStream()])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=1.5, warmup_s=0, concurrency=1,
                                 rate=500, stream=True))  # fmt: skip
    assert report.held_sends == 0 and report.late_sends > 2, report.table()
    assert "could not keep its schedule" in report.table() and "for their stream" not in report.table()


class _Streams:
    """A channel each of whose streams ``open_stream`` makes (its unary calls are not used)."""

    def __init__(self, open_stream: Callable[[], object]) -> None:
        self.open_stream = open_stream

    def unary_unary(self, *args) -> None:
        return None

    def stream_stream(self, *args):
        return lambda **kwargs: self.open_stream()

    async def close(self) -> None:
        pass


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _RefusedStream(_FakeStream):
    """Fails at once, before its first request is written (a server refusing every stream)."""

    async def read(self):
        raise _unavailable("refused")


def test_a_closed_loop_stream_that_fails_before_sending_counts_an_error(monkeypatch):
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_Streams(_RefusedStream)])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=0.3, warmup_s=0, concurrency=1,
                                 stream=True))  # fmt: skip
    assert report.requests == 0 and report.errors.get("UNAVAILABLE", 0) >= 1, report.table()
    assert report.error_details == {"UNAVAILABLE": "refused"}


class _StuckStream(_FakeStream):
    """Takes no request (its first write never ends) and fails 0.7 s after it is opened."""

    async def write(self, request) -> None:
        await asyncio.Event().wait()

    async def read(self):
        await asyncio.sleep(0.7)
        raise _unavailable("stuck")


def test_an_open_loop_stream_failing_after_the_window_counts_what_it_never_took(monkeypatch):
    """5 requests due in 0.5 s, the stream stuck on the first and failing after the window:
    the 4 it never took are errors under its code too (no time is left to reopen it)."""
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_Streams(_StuckStream)])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=0.5, warmup_s=0, concurrency=1,
                                 rate=10, stream=True))  # fmt: skip
    assert report.requests == 0 and report.errors == {"UNAVAILABLE": 5}, report.table()


class _SlowStream(_AnsweringStream):
    """Answers each request in turn, ``delay_s`` after the last answer (or its opening)."""

    delay_s = 0.6

    async def read(self):
        answer = await super().read()
        if answer is not grpc.aio.EOF:
            await asyncio.sleep(self.delay_s)
        return answer


def test_an_open_loop_stream_making_way_hands_its_schedule_over_at_once(monkeypatch):
    """Requests at 0, 0.25, 0.5 and 0.75 s; the stream makes way after 0.4 s (having sent
    the one due at 0.5) and its last answer comes after the window. Its successor opens at
    once and sends the one due at 0.75 on time (opened only after those answers, as it was
    before, it found that request too late to send: NOT_SENT)."""
    monkeypatch.setattr(loadtest, "_STREAM_ROTATE_S", 0.4)
    monkeypatch.setattr(loadtest, "_LATE_S", 0.05)  # a busy machine's scheduling is no late send; 0.6 s is
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_Streams(_SlowStream)])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=1.0, warmup_s=0, concurrency=1,
                                 rate=4, stream=True))  # fmt: skip
    assert report.errors == {} and report.requests == 4, report.table()
    assert report.sends == 4 and report.late_sends == report.held_sends == 0, report.table()


class _CountedStream(_SlowStream):
    """A _SlowStream answering in 0.1 s that counts the streams open at once (opened, not
    yet ended)."""

    delay_s = 0.1
    open_now = most_open = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).open_now += 1
        type(self).most_open = max(self.most_open, self.open_now)

    async def read(self):
        answer = await super().read()
        if answer is grpc.aio.EOF:
            type(self).open_now -= 1
        return answer


def test_a_closed_loop_stream_making_way_lets_its_successor_wait(monkeypatch):
    """Closed loop: a successor opened while its predecessor still waits for answers would
    double the caller's window (the load it holds in flight)."""
    monkeypatch.setattr(loadtest, "_STREAM_ROTATE_S", 0.15)
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_Streams(_CountedStream)])
    monkeypatch.setattr(_CountedStream, "open_now", 0)
    monkeypatch.setattr(_CountedStream, "most_open", 0)
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=1.0, warmup_s=0, concurrency=1,
                                 window=2, stream=True))  # fmt: skip
    assert report.errors == {} and report.requests >= 5, report.table()  # ~10 at 0.1 s an answer: streams went on
    assert _CountedStream.most_open == 1


class _UnansweringStream(_FakeStream):
    """Takes every request and, once the client is done writing, ends without error and
    without an answer."""

    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def done_writing(self) -> None:
        self.done.set()

    async def read(self):
        await self.done.wait()
        return grpc.aio.EOF


def test_an_open_loop_stream_closed_without_its_answers_counts_them_unanswered(monkeypatch):
    monkeypatch.setattr(_Driver, "_channels", lambda self: [_Streams(_UnansweringStream)])
    report = run(LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=0.5, warmup_s=0, concurrency=1,
                                 rate=10, stream=True))  # fmt: skip
    assert report.requests == 0 and report.errors.get("UNANSWERED", 0) >= 4, report.table()
    assert sum(report.errors.values()) == 5 and set(report.errors) <= {"UNANSWERED", "NOT_SENT"}, report.table()


def _ctrl_c_when(loading: threading.Event, children: Callable[[], list] | None = None) -> threading.Thread:
    """Once the load is on, Ctrl-C as a terminal sends it: to the main thread (and, if
    given, to the client processes too: the process group)."""

    def press() -> None:
        if loading.wait(60):
            for process in children() if children else []:
                os.kill(process.pid, signal.SIGINT)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=press)
    thread.start()
    return thread


def test_ctrl_c_prints_and_writes_what_was_measured(tmp_path, capsys):
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    with _echo_server() as (address, loading, _):
        pressing = _ctrl_c_when(loading)
        try:
            code = main(["loadtest", "--target", address, "--duration", "60", "--warmup", "0", "--canvas", "64", "64",
                         "--images", "1", "--variants", "2", "--no-progress", "--json", str(out_json),
                         "--csv", str(out_csv)])  # fmt: skip
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the load test")
        finally:
            pressing.join()
    assert code == 130
    assert "INTERRUPTED" in capsys.readouterr().out
    summary = json.loads(out_json.read_text())
    assert summary["interrupted"] is True and summary["ok"] is False and summary["requests"] > 0
    assert 0 < summary["measured_s"] < 60
    rows = list(csv.DictReader(open(out_csv)))
    assert sum(int(row["ok"]) for row in rows) == summary["requests"]


@pytest.mark.parametrize("rate", [None, 200.0], ids=["closed", "open"])
def test_ctrl_c_ends_every_stream_counting_nothing_after_it(rate):
    """Each stream runs as a task of its own (open loop: one that made way reads its last
    answers beside its successor): Ctrl-C ends them all before the report is taken, and
    nothing is counted after it (a stream left running counted its cancelled requests as
    errors)."""
    with _echo_server() as (address, loading, _):
        pressing = _ctrl_c_when(loading)
        try:
            report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=60, warmup_s=0.0,
                                         concurrency=2, stream=True, rate=rate))  # fmt: skip
        finally:
            pressing.join()
    assert report.interrupted and report.requests > 0 and 0 < report.measured_s < 60, report.table()
    assert report.errors == {}, report.table()


def test_ctrl_c_during_the_load_still_verifies_what_was_kept():
    """One Ctrl-C stopped the load and the verification both: a run cut short verified
    nothing (5 asked, 0 verified)."""
    answer = lambda raw, context: _response(TINY, int(pb.AssignRequest.FromString(raw).request_id  # noqa: E731
                                                      .split("-")[1])).SerializeToString()  # fmt: skip
    loading = threading.Event()
    with fake_assigner(lambda raw, context: loading.set() or answer(raw, context), None) as address:
        pressing = _ctrl_c_when(loading)
        try:
            report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=60, warmup_s=0.0,
                                         concurrency=1, verify=5))  # fmt: skip
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the load test")
        finally:
            pressing.join()
    assert report.interrupted and not report.verify_interrupted
    assert report.verified == min(5, report.requests) and not report.mismatches


def test_the_clients_reports_never_wait_for_a_reader_that_stopped():
    """A run cut short (a second Ctrl-C) stops reading and joins its clients: the client
    thread's result, sent through a pipe, waited for a reader once over the pipe's 64 KiB
    (the answers kept for verify), and the run for its --timeout; pickled, those answers
    took three times their memory. A client process's send fails at once instead."""
    result = ("done", 0, {"kept": [b"x" * 1_000_000]})
    inbox = loadtest._ThreadInbox()
    sending = threading.Thread(target=inbox.sender(0).send, args=(result,), daemon=True)
    sending.start()
    sending.join(5)
    assert not sending.is_alive()
    (message,) = inbox.receive(timeout=1.0)
    assert message is result  # handed over, not copied
    assert inbox.receive(timeout=0.01) == []

    inbox = loadtest._ProcessInbox(1)
    failed = []

    def send() -> None:
        try:
            inbox.sender(0).send(result)
        except OSError as exc:
            failed.append(exc)

    sending = threading.Thread(target=send, daemon=True)
    sending.start()
    sending.join(0.5)
    assert sending.is_alive()  # 1 MB in a pipe nobody reads
    inbox.close()
    sending.join(5)
    assert not sending.is_alive() and isinstance(failed[0], BrokenPipeError)


def _children_since(before: set) -> list:
    """This test's child processes: another test's may outlive it (a DataLoader's
    persistent workers live until a garbage collection), which a check or a kill of
    every child would take for the load test's."""
    return [child for child in multiprocessing.active_children() if child not in before]


def test_ctrl_c_with_client_processes_keeps_every_process_measurements():
    before = set(multiprocessing.active_children())
    with _echo_server(peers=2) as (address, loading, answered):
        pressing = _ctrl_c_when(loading, lambda: _children_since(before))
        try:
            report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=60, warmup_s=0, concurrency=2,
                                         processes=2))  # fmt: skip
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the load test")
        finally:
            pressing.join()
    assert report.interrupted and not report.worker_failures and not report.errors, report.table()
    # Both processes' answers, but for the one call each may have had in flight.
    assert answered[0] - 2 <= report.requests <= answered[0], (answered, report.requests)
    assert not _children_since(before)


@dataclasses.dataclass(frozen=True)
class _FailsInOneProcess(Workload):
    """The workload of which the first client process to build it (``marker`` does not
    exist yet) fails."""

    marker: str = ""

    def request(self, index: int) -> pb.AssignRequest:
        if index == 0:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return super().request(index)
            raise RuntimeError("this client process fails on purpose")
        return super().request(index)


def test_a_client_process_that_fails_stops_the_others(tmp_path):
    workload = _FailsInOneProcess(canvas=(64, 64), images=1, variants=2, marker=str(tmp_path / "failed"))
    before = set(multiprocessing.active_children())
    with _echo_server() as (address, _, _):
        started = time.monotonic()
        report = run(LoadTestOptions(targets=(address,), workload=workload, duration_s=60, warmup_s=0, concurrency=2,
                                     processes=2))  # fmt: skip
    assert time.monotonic() - started < 50  # the other process did not load the server to the end
    assert not _children_since(before)
    assert len(report.worker_failures) == 1 and "fails on purpose" in report.worker_failures[0]
    assert not report.ok and "client process failed" in report.table()


def test_a_killed_client_process_is_a_failure_and_the_others_results_are_kept():
    """A client process killed (the OOM killer) reports nothing: the run waited a minute
    past its end and then dropped every other process's measurements. It stops the others
    (they ran their whole window: the check came only when no progress came, and the
    others' came every half second)."""
    before = set(multiprocessing.active_children())
    with _echo_server(peers=2) as (address, loading, _):
        options = LoadTestOptions(targets=(address,), workload=Workload(canvas=(64, 64), images=1, variants=2),
                                  duration_s=20.0, warmup_s=0.0, concurrency=2, processes=2)  # fmt: skip
        started = time.monotonic()
        reports = []
        runner = threading.Thread(target=lambda: reports.append(run(options)))
        runner.start()
        assert loading.wait(30)  # both processes are loading the server
        time.sleep(1.0)
        os.kill(_children_since(before)[0].pid, signal.SIGKILL)
        runner.join(60)
    assert time.monotonic() - started < 30
    (report,) = reports
    assert len(report.worker_failures) == 1 and "exited with code -9" in report.worker_failures[0]
    assert report.requests > 0 and report.measured_s < 10  # the other process's, stopped early
    assert f"\n{report.measured_s:.1f} of 20 s measured\n" in report.table()  # req/s is over those


def test_a_client_process_that_never_ends_is_killed_at_the_end_of_the_run(monkeypatch):
    """A client process that stops answering (stopped here; stuck in a call in life) fails
    the run at its deadline, and is killed: it was left running, and since client
    processes ignore SIGTERM, multiprocessing's exit (terminate, then join every child)
    waited for it for ever."""
    monkeypatch.setattr(loadtest, "_FINISH_SLACK_S", 0.5)
    before = set(multiprocessing.active_children())
    with _echo_server(peers=2) as (address, loading, _):
        options = LoadTestOptions(targets=(address,), workload=Workload(canvas=(64, 64), images=1, variants=2),
                                  duration_s=1.0, warmup_s=0.0, timeout_s=1.0, concurrency=2, processes=2)  # fmt: skip
        errors: list[Exception] = []
        runner = threading.Thread(target=lambda: errors.extend(_raised(run, options)))
        runner.start()
        assert loading.wait(30)
        stopped = _children_since(before)[0]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            runner.join(30)
            assert not runner.is_alive()
            assert not stopped.is_alive() and stopped.exitcode == -signal.SIGKILL
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped.pid, signal.SIGKILL)
    (error,) = errors
    assert "load test workers did not finish" in str(error)
    assert not _children_since(before)


def _raised(function, *args) -> list[Exception]:
    try:
        function(*args)
    except Exception as error:
        return [error]
    return []


def _step_like_a_busy_client(stop, sending) -> None:
    def write() -> None:  # over and over: blocked in the middle of a message once the pipe is full
        while True:
            sending.send(("progress", 0, b"x" * 100_000))

    threading.Thread(target=write, daemon=True).start()
    while True:  # and reads the parent's stop flag
        stop.is_set()


def test_a_client_process_killed_mid_step_holds_no_lock_and_its_pipe_ends():
    """A client process killed (SIGKILL, the OOM killer) at any point: the parent's stop
    still goes out, and the process's pipe ends, a message it was cut in the middle of
    included. The stop was a multiprocessing.Event, which takes a lock even to be read: a
    process killed holding it hung the parent's set() for good (7-8 of 12 of these tries);
    the clients' shared queue had a writers' lock too."""
    context = multiprocessing.get_context("spawn")
    for _ in range(4):
        stop = loadtest._StopFlag(context)
        receiving, sending = multiprocessing.Pipe(duplex=False)
        process = context.Process(target=_step_like_a_busy_client, args=(stop, sending), daemon=True)
        process.start()
        sending.close()
        receiving.recv()  # it runs
        time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        setting = threading.Thread(target=stop.set, daemon=True)
        setting.start()
        setting.join(5)
        assert not setting.is_alive() and stop.is_set()
        with pytest.raises((EOFError, OSError)):  # the end; OSError: in the middle of a message
            while receiving.poll(5):
                receiving.recv()
        receiving.close()


_PARENT = """
import sys
from tritarget.clients.loadtest import LoadTestOptions, Workload, run
run(LoadTestOptions(targets=(sys.argv[1],), workload=Workload(canvas=(64, 64), images=1, variants=2), duration_s=60,
                    warmup_s=0, concurrency=2, processes=2))
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_client_processes_stop_when_their_parent_is_killed():
    """The parent killed (SIGKILL, the OOM killer), its client processes went on loading the
    server to the end of their window, and could hang for ever writing their result."""
    with _echo_server(peers=2) as (address, loading, _):
        parent = subprocess.Popen([sys.executable, "-c", _PARENT, address])
        try:
            assert loading.wait(120)  # both client processes are loading the server
            children = [pid for pid in _children(parent.pid) if _running(pid)]
        finally:
            parent.kill()
            parent.wait()
        assert len(children) >= 2
        deadline = time.monotonic() + 10
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, children))


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, processes):
    """``timeout`` or a cancelled CI job sends SIGTERM (``timeout`` to the whole process
    group): the run died without its report, its client processes orphaned (or killed,
    then reported as failed). It now stops as on Ctrl-C, and writes what it measured."""
    out = tmp_path / "out.json"
    with _echo_server(peers=processes) as (address, loading, _):
        run_ = subprocess.Popen([sys.executable, "-m", "tritarget.service.cli", "loadtest", "--target", address,
                                 "--duration", "60", "--warmup", "0", "--canvas", "64", "64", "--images", "1",
                                 "--variants", "2", "--no-progress", "--json", str(out), "--concurrency", "2",
                                 "--processes", str(processes)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            assert loading.wait(120)
            os.killpg(run_.pid, signal.SIGTERM)
            output, _ = run_.communicate(timeout=60)
        finally:
            if run_.poll() is None:
                run_.kill()
    assert run_.returncode == 130, output
    assert "INTERRUPTED" in output
    summary = json.loads(out.read_text())
    assert summary["interrupted"] is True and summary["requests"] > 0 and summary["measured_s"] < 60


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_client_processes_stop_when_their_parent_dies_before_the_start():
    """Killed while its client processes were starting up, the parent left them waiting
    for the start line for ever."""
    with _echo_server(peers=2) as (address, _, answered):
        parent = subprocess.Popen([sys.executable, "-c", _PARENT, address])
        try:
            deadline = time.monotonic() + 60
            while len(children := [pid for pid in _children(parent.pid) if _running(pid)]) < 3:  # + resource tracker
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            parent.kill()
            parent.wait()
        deadline = time.monotonic() + 60  # their imports first
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, children)) and answered[0] == 0


def _sleepy_server(seconds: float):
    """Answers every Assign after ``seconds``, many at once."""

    def answer(raw: bytes, context) -> bytes:
        time.sleep(seconds)
        return _response(WORKLOAD, int(pb.AssignRequest.FromString(raw).request_id.split("-")[1])).SerializeToString()

    return fake_assigner(answer, None)


@pytest.mark.parametrize("rate", [None, 10.0], ids=["closed", "open"])
def test_a_server_that_keeps_up_is_measured_over_the_window(rate):
    """Answers of 0.3 s in a 1 s window: req/s divided by the window plus the last answer's
    latency (23% low) and the table said the server fell behind, in closed loop (where
    nothing can fall behind a schedule) and in an open loop it kept up with."""
    with _sleepy_server(0.3) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=1.5, warmup_s=0.0,
                                     concurrency=2, rate=rate, timeout_s=5.0))  # fmt: skip
    # Of 15 (open) and 10 (closed) at best: one answer late on a busy 2-core CI (0.6 s) costs one.
    assert report.requests >= (13 if rate else 8) and not report.errors, report.table()
    # Open loop: a last answer up to 0.15 s slower than the first (a busy CI) is no falling
    # behind; the window plus the last answer's latency (the bug) divides by 1.8.
    assert report.behind_s < 0.15 and "fell behind" not in report.table()
    assert report.requests / 1.65 <= report.requests_per_s <= report.requests / 1.5 * (1 + 1e-9)
    # The series counts the answers that came in each second of the window: those after
    # it (one latency's worth) read as a last half second at nearly twice the rate.
    assert sum(row["answered"] for row in report.series) < report.requests
    assert max(row["requests_per_s"] for row in report.series) < 1.4 * report.requests_per_s, report.series


def test_closed_loop_callers_pause_between_calls_to_no_server():
    """With no server, each caller's calls failed at once, one after another: thousands of
    UNAVAILABLE a second, counting the generator's speed and taking a core."""
    with socket.socket() as spare:  # a port nobody listens on
        spare.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{spare.getsockname()[1]}"
    report = run(LoadTestOptions(targets=(dead,), workload=TINY, duration_s=1.0, warmup_s=0.0, concurrency=2,
                                 timeout_s=1.0))  # fmt: skip
    assert 0 < report.errors.get("UNAVAILABLE", 0) <= 2 * (1.0 / 0.05 + 5), report.errors


def test_closed_loop_callers_pause_after_a_refusal():
    """A server that refuses every call at once (RESOURCE_EXHAUSTED, as a full queue does):
    callers that resent at once made thousands of refusals a second, taking the CPU of the
    server they load."""

    def refuse(request: bytes, context) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded")

    with fake_assigner(refuse, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=1.0, warmup_s=0.0,
                                     concurrency=2))  # fmt: skip
    assert 0 < report.errors.get("RESOURCE_EXHAUSTED", 0) <= 2 * (1.0 / 0.05 + 5), report.errors


def test_ctrl_c_while_verifying_keeps_the_report(monkeypatch):
    """The Ctrl-C handler was put back before the answers were verified (tens of seconds
    for hundreds): Ctrl-C then lost the whole report. Each request's targets are computed
    once however many of its answers are verified."""
    calls, computed = [], []
    verify, compute = loadtest.verify_response, loadtest.assign

    def verify_then_press(*args):
        calls.append(args[1])
        if len(calls) == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return verify(*args)

    monkeypatch.setattr(loadtest, "verify_response", verify_then_press)
    monkeypatch.setattr(loadtest, "assign", lambda *args, **kwargs: computed.append(1) or compute(*args, **kwargs))
    with fake_assigner(lambda raw, context: _response(TINY, int(pb.AssignRequest.FromString(raw).request_id
                                                                   .split("-")[1])).SerializeToString(),
                       None) as address:  # fmt: skip
        try:
            report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=0.5, warmup_s=0.0,
                                         concurrency=1, verify=50))  # fmt: skip
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C while verifying escaped the load test")
    assert report.verify_interrupted and report.interrupted
    assert report.verified == 3 and report.unverified == 47 and not report.mismatches
    assert len(computed) == len(set(calls)) <= 2  # TINY has 2 variants
    assert "only 3 verified before the interruption" in report.table()


@pytest.mark.parametrize(
    "flags",
    [["--rate", "nan"], ["--rate", "inf"], ["--rate", "0"], ["--duration", "nan"], ["--warmup", "inf"],
     ["--warmup", "-1"], ["--timeout", "nan"], ["--timeout", "inf"], ["--timeout", "0"], ["--timeout", "-1"],
     ["--canvas", "0", "0"], ["--canvas", "-5", "5"], ["--target", ""], ["--concurrency", "0"],
     # A stream's deadline (timeout + duration + warmup) overflowed: every stream DEADLINE_EXCEEDED at once.
     ["--duration", "1e10"], ["--warmup", "1e10"], ["--target", "grpc://127.0.0.1:1"],
     # 3 million callers took a 1-second run 61 s and 3.2 GB before it measured anything.
     ["--concurrency", "16385"], ["--processes", "257"], ["--window", "1025"]],
)  # fmt: skip
def test_bad_values_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, error", [
    (["--window", "4"], "--window: only with --stream"),
    (["--stream", "--rate", "10", "--window", "2"], "--window: only with --stream"),
    (["--json", "{tmp}"], "--json {tmp}: is a folder; give a file name"),
    (["--csv", "{tmp}/afile/out.csv"], "--csv {tmp}/afile/out.csv: {tmp}/afile is not a folder"),
    (["--tls-ca", "{tmp}/afile"], "--tls-ca {tmp}/afile: not PEM certificates"),
    (["--tls-ca", "{tmp}/missing.pem"], "--tls-ca {tmp}/missing.pem: No such file or directory"),
    # The CSV replaced the JSON, and both were reported written.
    (["--json", "{tmp}/same.txt", "--csv", "{tmp}/./same.txt"], "--json and --csv name the same file, {tmp}/same.txt"),
    # The library's own names (concurrency, token) said nothing of which flag.
    (["--concurrency", "2", "--processes", "3"], "--concurrency 2 is shared by --processes 3: give at least that many"),
    (["--token", "a\tb"], "--token: a bearer token is printable ASCII without spaces"),
])  # fmt: skip
def test_bad_combinations_and_outputs_are_refused_before_the_run(flags, error, tmp_path, capsys):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    (tmp_path / "afile").write_text("")
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.2", "--warmup", "0", "--canvas", "64", "64",
                 "--no-progress", *flags])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tritarget loadtest: {error.format(tmp=tmp_path)}") and err.count("\n") == 1, err


def test_a_bad_token_from_the_environment_is_named_so(monkeypatch, capsys):
    monkeypatch.setenv("TRITARGET_TOKEN", "a\nb")
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.2", "--warmup", "0", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.startswith("tritarget loadtest: TRITARGET_TOKEN: a bearer token is printable ASCII")


def test_plot_without_matplotlib_is_refused_before_the_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec sees of a missing package
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.2", "--warmup", "0", "--no-progress",
                 "--plot", str(tmp_path / "out.png")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == "tritarget loadtest: --plot: needs matplotlib (pip install matplotlib)\n"


def test_a_plot_format_matplotlib_does_not_draw_is_refused_before_the_run(tmp_path, capsys):
    """After the whole run, the table and the JSON written, it failed with a traceback."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "out.txt"
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.2", "--warmup", "0", "--no-progress",
                 "--plot", str(plot)])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.startswith(f"tritarget loadtest: --plot {plot}: matplotlib draws no .txt files (")
    assert plot_format(tmp_path / "a.SVG") == "svg" and plot_format("/dev/stdout") == "png"


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": math.nan}, {"rate": math.inf}, {"duration_s": math.nan}, {"duration_s": math.inf},
     {"warmup_s": math.inf}, {"timeout_s": math.nan}, {"timeout_s": 0}, {"window": 4},
     {"window": 2, "stream": True, "rate": 10}, {"targets": ("",)}, {"targets": ()},
     {"targets": ("http://127.0.0.1:1",)}, {"targets": ("127.0.0.1:70000",)}, {"token": "a\nb"},
     {"rate": 1e308}, {"rate": 6e6},  # a run that counted its unsent requests for ever (or minutes)
     {"rate": 1e-309},  # 1 / rate inf, every start time NaN: calls sent at once, then a crash (review 48)
     {"concurrency": 16_385}, {"processes": 257, "concurrency": 300}, {"window": 1_025, "stream": True},
     {"warmup_s": -0.5}, {"processes": 0}, {"window": 0, "stream": True}, {"verify": -1}],
)  # fmt: skip
def test_library_options_refuse_what_cannot_run(kwargs):
    with pytest.raises(ValueError):
        LoadTestOptions(**{"targets": ("127.0.0.1:1",), **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "total"),
    [({"images": 10**6}, "(116,800,000 boxes)"), ({"boxes": 10**8, "variants": 1}, "(800,000,000 boxes)")],
)
def test_workload_refuses_one_too_large_to_build(kwargs, total):
    """Built before the run by every client process: a million images ran silent past any
    --duration."""
    with pytest.raises(ValueError, match=re.escape(total) + " are over 1,048,576 images or 50,000,000 boxes"):
        Workload(**kwargs)


@pytest.mark.parametrize("canvas", [(0, 0), (-5, 5), (64,)])
def test_workload_refuses_an_empty_canvas(canvas):
    with pytest.raises(ValueError, match="canvas"):
        Workload(canvas=canvas)


@pytest.mark.parametrize("kwargs", [{"images": 0}, {"variants": 0}, {"boxes": -1}, {"format": "DENSE"}])
def test_workload_refuses_what_it_cannot_build(kwargs):
    with pytest.raises(ValueError):
        Workload(**kwargs)


def test_workload_limits_are_the_largest_it_builds():
    """1,048,576 images and 50,000,000 boxes per client process are allowed; one more is not."""
    assert Workload(images=1 << 20, variants=1, boxes=0).images == 1 << 20
    assert Workload(images=1, variants=1, boxes=50_000_000).boxes == 50_000_000
    with pytest.raises(ValueError, match="are over 1,048,576 images"):
        Workload(images=(1 << 20) + 1, variants=1, boxes=0)
    with pytest.raises(ValueError, match=re.escape("(50,000,001 boxes) are over")):
        Workload(images=1, variants=1, boxes=50_000_001)


def test_an_output_that_fails_to_write_is_one_line_and_the_rest_is_written(monkeypatch, tmp_path, capsys):
    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "write_csv", full_disk)
    csv_path = tmp_path / "out.csv"
    with _echo_server() as (address, _, _):
        code = main(["loadtest", "--target", address, "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64",
                     "--images", "1", "--no-progress", "--csv", str(csv_path),
                     "--json", str(tmp_path / "out.json")])  # fmt: skip
    assert code == 1
    captured = capsys.readouterr()
    assert "requests" in captured.out and json.loads((tmp_path / "out.json").read_text())["ok"] is True
    assert captured.err == f"tritarget loadtest: could not write {csv_path}: No space left on device\n"


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("json_to", ["file", "stdout"])
def test_a_reader_that_stops_reading_ends_the_run_quietly_with_its_files_written(json_to, buffered, tmp_path):
    """`tritarget loadtest ... --csv out.csv | head -3`: the files written, then 141 (128 +
    SIGPIPE, as a shell reports it), nothing on stderr. Unbuffered, the table's line ended
    the command before its files (the run's measurements lost); `--json /dev/stdout` into
    the closed pipe was "could not write /dev/stdout" (exit 1)."""
    json_path = "/dev/stdout" if json_to == "stdout" else str(tmp_path / "out.json")
    csv_path = tmp_path / "out.csv"
    with _echo_server() as (address, _, _):
        result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "loadtest", "--target", address,
                                         "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64", "--images", "1",
                                         "--no-progress", "--json", json_path, "--csv", str(csv_path)],
                                        buffered)  # fmt: skip
    assert (result.returncode, result.stderr) == (141, "")
    assert "requests_per_s" in csv_path.read_text()
    if json_to == "file":
        assert json.loads(Path(json_path).read_text())["ok"] is True


@pytest.mark.parametrize("json_to", ["file", "stdout"])
def test_a_failed_run_whose_reader_has_gone_still_exits_1(json_to, tmp_path):
    """A run that fails (here its one verified response differs from the in-process
    targets) into a pipe whose reader has gone exits 1, as exit_status ends any command:
    the failure first. With `--json /dev/stdout` it exited 141, as if it had succeeded."""
    json_path = "/dev/stdout" if json_to == "stdout" else str(tmp_path / "out.json")
    with _echo_server() as (address, _, _):
        result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "loadtest", "--target", address,
                                         "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64", "--images", "1",
                                         "--no-progress", "--verify", "1", "--json", json_path],
                                        buffered=True)  # fmt: skip
    assert result.returncode == 1, result.stderr
    if json_to == "file":
        assert json.loads(Path(json_path).read_text())["ok"] is False


def test_a_run_with_no_stderr_at_all_writes_its_table_and_files(tmp_path):
    """`2>&-` (Python's sys.stderr is None): the progress bar goes nowhere, the run goes on."""
    json_path = tmp_path / "out.json"
    with _echo_server() as (address, _, _):
        result = run_without_stderr(["-m", "tritarget.service.cli", "loadtest", "--target", address, "--duration",
                                     "0.3", "--warmup", "0", "--canvas", "64", "64", "--images", "1", "--json",
                                     str(json_path)])  # fmt: skip
    assert result.returncode == 0
    assert f"wrote {json_path}" in result.stdout and json.loads(json_path.read_text())["ok"] is True


def test_a_file_into_a_pipe_whose_reader_has_gone_is_a_file_not_written(tmp_path):
    """`--json >(true)`: that pipe's reader gone is a file not written ("could not write",
    exit 1), the table and the other files kept; it was taken for stdout's reader gone
    (exit 141, the table lost)."""
    csv_path = tmp_path / "out.csv"
    with closed_pipe() as pipe, _echo_server() as (address, _, _):
        result = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "loadtest", "--target", address,
                                 "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64", "--images", "1",
                                 "--no-progress", "--json", f"/dev/fd/{pipe}", "--csv", str(csv_path)],
                                capture_output=True, text=True, pass_fds=(pipe,), timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"tritarget loadtest: could not write /dev/fd/{pipe}: Broken pipe\n"
    assert "latency (ms)" in result.stdout and f"wrote {csv_path}" in result.stdout
    assert "requests_per_s" in csv_path.read_text()


def test_the_progress_line_s_stream_is_stderr_to_tqdm():
    """tqdm reads its stream's encoding (a Unicode bar, or '#') and width (``dynamic_ncols``):
    without them, through ``WhileRead`` on a terminal, its bar turned ASCII and overran the line."""
    stream = WhileRead(sys.stderr)
    assert (stream.encoding, stream.fileno()) == (sys.stderr.encoding, sys.stderr.fileno())


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_of_the_progress_line_that_stops_ends_the_line_not_the_run(buffered, tmp_path):
    """`tritarget loadtest ... 2>&1 >/dev/null | head -c 40`: the progress line's reader
    gone ended the run (status 120 or 141) and its files were never written."""
    json_path = tmp_path / "out.json"
    with _echo_server() as (address, _, _):
        result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "loadtest", "--target", address,
                                         "--duration", "1", "--warmup", "0", "--canvas", "64", "64", "--images", "1",
                                         "--json", str(json_path)], buffered, closed="stderr")  # fmt: skip
    assert result.returncode == 0
    assert "latency (ms)" in result.stdout and json.loads(json_path.read_text())["ok"] is True


def test_help_read_by_a_reader_that_stops_ends_quietly():
    """`tritarget loadtest --help | head -1`, stdout buffered: argparse's exit skipped the
    flush before the interpreter's (status 120 and "Exception ignored ... BrokenPipeError").
    Unbuffered, argparse itself ignores the failed write (status 0)."""
    result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "loadtest", "--help"], buffered=True)
    assert (result.returncode, result.stderr) == (141, "")


def test_the_series_has_every_second_and_rates_per_second(tmp_path):
    """A 2.1 s stall in closed loop: second 1 has no request, and shows as such; the last
    second is half of one (2.5 s), its rate counted over that half."""
    with _echo_server(stall=(5, 2.1)) as (address, _, _):
        report = run(LoadTestOptions(targets=(address,), workload=TINY, duration_s=2.5, warmup_s=0, concurrency=1))
    seconds = {row["second"]: row for row in report.series}
    assert list(seconds) == [0, 1, 2], report.series
    assert seconds[1] == {"second": 1, "ok": 0, "errors": 0, "answered": 0, "requests_per_s": 0.0,
                          "images_per_s": 0.0, "p50_ms": None, "p99_ms": None}  # fmt: skip
    # The stalled request, sent in second 0, is answered in second 2: a rate counts answers
    # (in the window: the last request's may come after it).
    assert (seconds[0]["ok"], seconds[0]["answered"]) == (5, 4)
    assert seconds[2]["answered"] - seconds[2]["ok"] in (0, 1)
    assert seconds[2]["requests_per_s"] == pytest.approx(seconds[2]["answered"] / 0.5)
    report.write_csv(tmp_path / "out.csv")
    assert [row["p50_ms"] for row in csv.DictReader(open(tmp_path / "out.csv"))][1] == ""
    report.plot(tmp_path / "out.png")
    assert (tmp_path / "out.png").stat().st_size > 0


def test_the_series_counts_the_warm_ups_answers_that_came_in_the_window():
    """The answers of a second are those that came in it: answers to warm-up requests were
    left out, and an overloaded open loop's first second read 67 answers where the server
    had sent 403 (a false dip in the plot; a helper's audit). They are not measured (no
    latency, no request of the window) but they are answers of that second."""
    recorder = loadtest._Recorder(100.0, keep=0, measure_until=102.0)
    recorder.record(99.5, 100.4, None, 0, None)  # a warm-up request answered in second 0
    recorder.record(99.5, 99.9, None, 1, None)  # answered before the window: in no second
    recorder.record(100.2, 101.5, None, 2, None)
    options = LoadTestOptions(targets=("127.0.0.1:1",), duration_s=2.0, rate=4.0, concurrency=1)
    report = loadtest._merge(options, [_result(recorder, 2.0, started=5.0)])
    assert [(row["second"], row["ok"], row["answered"]) for row in report.series] == [(0, 1, 1), (1, 0, 1)]
    assert report.requests == 1 and report.warmup_requests == 2


# --------------------------------------------------------------------------- benchmarks/bench_loadtest.py


class _NoServer:
    pid = 0

    def send_signal(self, signum: int) -> None:
        pass

    def wait(self, timeout: float) -> None:
        pass


def _bench(monkeypatch, tmp_path, reports: list):
    """``bench_loadtest`` without a server or in-process measurements: its runs return
    ``reports`` in turn (an exception is raised instead); ``--out tmp_path``."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import bench_loadtest

    def in_process(rates, cpu_ms, when, args) -> None:
        rates[when], cpu_ms[when] = 1000.0, 1.0

    def timed_run(options, pid):
        report = reports.pop(0)
        if isinstance(report, Exception):
            raise report
        return dataclasses.replace(report, options=options), {"server_cpu_ms": None, "client_cpu_ms": 0.5,
                                                              "cores_busy": None}  # fmt: skip

    monkeypatch.setattr(bench_loadtest, "_in_process", in_process)
    monkeypatch.setattr(bench_loadtest, "_serve", lambda backend, extra: (_NoServer(), "127.0.0.1:1"))
    monkeypatch.setattr(bench_loadtest, "_timed_run", timed_run)
    monkeypatch.setattr(sys, "argv", ["bench_loadtest.py", "--out", str(tmp_path)])
    return bench_loadtest


def _bench_report(answered: int) -> Report:
    latency = _histogram()
    for _ in range(answered):
        latency.record_value(5000)
    errors = {} if answered else {"UNAVAILABLE": 3}
    return Report(LoadTestOptions(targets=("127.0.0.1:1",)), answered, errors, 0, latency, [])


@pytest.mark.parametrize("skew, said", [(0.01, False), (0.3, True)])
def test_client_processes_that_began_apart_are_reported(skew, said):
    report = dataclasses.replace(_bench_report(10), start_skew_s=skew)
    assert ("began 0.30 s apart" in report.table()) is said


def test_the_load_generators_line_reads_a_window_of_milliseconds():
    """An open loop at --rate 0.5 whose one request was answered in 12 ms read "0.0 CPU s in
    0.0 s (0.22 cores busy)"."""
    report = dataclasses.replace(_bench_report(1), client_cpu_s=0.00262, window_s=0.0119)
    assert "load generator: 0.00262 CPU s in 0.0119 s (0.22 cores busy, 1 process(es))" in report.table()
    report = dataclasses.replace(_bench_report(1), client_cpu_s=4.56, window_s=12.04)
    assert "load generator: 4.56 CPU s in 12 s (0.38 cores busy, 1 process(es))" in report.table()


def test_bench_without_an_answered_request_skips_the_open_loop_and_writes_its_results(monkeypatch, tmp_path):
    reports = [_bench_report(0) for _ in range(5)]
    bench = _bench(monkeypatch, tmp_path, reports)
    assert bench.main() == 1
    assert len(reports) == 1  # four closed-loop runs, no open loop at 0 requests/s
    rows = list(csv.DictReader(open(tmp_path / "loadtest.csv")))
    assert len(rows) == 4 and {row["p99_ms"] for row in rows} == {""}
    assert len(json.loads((tmp_path / "loadtest.json").read_text())["runs"]) == 4


def test_bench_runs_an_open_loop_at_each_open_rate_given(monkeypatch, tmp_path):
    """The issue's p99 is at 80% of its 25k images/s goal (2,500 8-image requests/s),
    which the open loop at 80% of the best unary rate measured does not give."""
    reports = [*(_bench_report(10) for _ in range(5)), _bench_report(0)]  # the server could not keep up there
    bench = _bench(monkeypatch, tmp_path, reports)
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--open-rate", "2500"])
    assert bench.main() == 0  # its refusals are its row's errors, not a failed benchmark
    assert not reports  # four closed loops, the open loop at 80%, the one at 2500 requests/s
    runs = [row["run"] for row in csv.DictReader(open(tmp_path / "loadtest.csv"))]
    assert runs[-1] == "unary, open loop at 2500 requests/s (--open-rate: 20,000 images/s)", runs
    assert runs[-2].endswith("(80% of the best unary rate)")


def test_bench_keeps_the_runs_before_one_that_fails(monkeypatch, tmp_path):
    bench = _bench(monkeypatch, tmp_path, [_bench_report(10), _bench_report(0), RuntimeError("the server died")])
    with pytest.raises(RuntimeError, match="the server died"):
        bench.main()
    rows = list(csv.DictReader(open(tmp_path / "loadtest.csv")))
    assert [row["p99_ms"] for row in rows] == ["5.0", ""]  # a run with latencies, one without
    assert len(json.loads((tmp_path / "loadtest.json").read_text())["runs"]) == 2


def test_an_open_loop_the_server_cannot_keep_up_with_reports_what_was_served():
    """A server answering ~20 requests/s under an open loop of 100/s: the report counted each
    request in the second it was scheduled and divided by the window, so it read 100 req/s
    (the offered rate) however late the answers came."""
    serving = threading.Lock()

    def slow(raw: bytes, context) -> bytes:
        index = int(pb.AssignRequest.FromString(raw).request_id.split("-")[1])
        with serving:  # one at a time, 50 ms each
            time.sleep(0.05)
            return _response(WORKLOAD, index).SerializeToString()

    with fake_assigner(slow, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=1.0, warmup_s=0.0,
                                     concurrency=8, rate=100.0))  # fmt: skip
    assert report.requests == 100 and report.behind_s > 2.0
    assert report.requests_per_s < 30
    assert "the server fell behind" in report.table() and report.summary()["answered_s"] > 3.0


@pytest.mark.parametrize("call_s, warned", [(0.4, True), (0.02, False)])
def test_a_closed_loop_whose_calls_take_a_good_part_of_the_window_says_req_s_reads_low(call_s, warned):
    """Each caller sends its next request when answered: with calls of 0.4 s in a 1 s window
    each caller has two or three turns, and req/s measures the callers, not the server; the
    table says so (over a quarter of the window at the median), and not for short calls."""

    def slow(raw: bytes, context) -> bytes:
        time.sleep(call_s)
        return _response(WORKLOAD, int(pb.AssignRequest.FromString(raw).request_id.split("-")[1])).SerializeToString()

    with fake_assigner(slow, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=1.0, warmup_s=0.0,
                                     concurrency=2, verify=0))  # fmt: skip
    assert report.ok and report.requests > 0, report.table()
    assert ("half the calls took over" in report.table()) == warned, report.table()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_open_loop_faster_than_the_load_generator_ends_with_its_window(stream):
    """An open loop at a rate the generator cannot send (50,000 requests/s from one Python
    process): it went on sending every scheduled request, late, for as long as that took (a
    2 s run at 20,000/s lasted 20 s) and blamed the server. Now what is not sent when the
    window closes counts as NOT_SENT, the run ends within its window plus the deadline, and
    the table says the generator fell behind."""
    answer = _response(WORKLOAD, 0).SerializeToString()

    def assign_stream(requests, context):
        for _ in requests:
            yield answer

    with fake_assigner(lambda raw, context: answer, assign_stream) as address:
        report = run(LoadTestOptions(targets=(address,), workload=Workload(canvas=(256, 320), images=2, variants=1),
                                     duration_s=1.0, warmup_s=0.0, concurrency=2, rate=50_000.0, timeout_s=2.0,
                                     stream=stream))  # fmt: skip
    assert report.errors.get("NOT_SENT", 0) > 10_000 and not report.ok
    assert report.window_s < 1.0 + 2.0 + 1.0
    assert report.sends + report.errors["NOT_SENT"] >= 49_500  # every scheduled request is accounted for
    table = report.table()
    assert "the load generator could not keep its schedule" in table and "were not sent before the window" in table
    assert ": the server fell behind" not in table


def test_an_endpoint_that_never_answers_is_not_said_to_fall_behind():
    """Every request timed out: the table said the server "fell behind" its answers, of
    which there were none; the deadline errors say what happened."""

    def silent(raw: bytes, context) -> bytes:
        time.sleep(2.0)
        return b""

    with fake_assigner(silent, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=1.0, warmup_s=0.0,
                                     concurrency=2, rate=20.0, timeout_s=1.0))  # fmt: skip
    assert report.requests == 0 and report.errors.get("DEADLINE_EXCEEDED", 0) >= 18
    assert "fell behind" not in report.table() and "DEADLINE_EXCEEDED" in report.table()
    # Every request ended, in an error: the table said none had ended.
    assert "no request was measured" not in report.table()


def test_a_run_in_which_nothing_was_measured_says_why():
    """A request longer than the whole run: begun in the warm-up, answered after the
    window; the table read 0 requests, 0 errors and the run failed with no reason given."""

    def slow(raw: bytes, context) -> bytes:
        time.sleep(1.0)
        index = int(pb.AssignRequest.FromString(raw).request_id.split("-")[1])
        return _response(WORKLOAD, index).SerializeToString()

    with fake_assigner(slow, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=0.2, warmup_s=0.1,
                                     concurrency=1))  # fmt: skip
    assert (report.requests, report.errors, report.ok) == (0, {}, False)
    assert "no request was measured: none that started in the measured window ended" in report.table()
    # An open loop whose only request was due in the warm-up (answered at once): none was due.
    with fake_assigner(lambda raw, context: _response(WORKLOAD, 0).SerializeToString(), None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=0.5, warmup_s=0.2, rate=0.5,
                                     concurrency=1))  # fmt: skip
    assert (report.requests, report.errors, report.ok) == (0, {}, False)
    assert "no request was measured: none was due in the measured window (raise --rate or --duration)" in report.table()


def test_the_workload_reads_as_written():
    assert Workload(images=4, boxes=30).describe() == (
        "retinanet_torchvision 800x1344, 4 images per request, 30 boxes per image, SPARSE float32 deltas"
    )  # was "4 30 boxes per image, images per request"
    assert "8 COCO-like images per request, DENSE float16" in Workload(format="dense", fp16=True).describe()


@pytest.mark.parametrize(("kwargs", "who"), [
    ({"stream": True, "window": 2}, "stream, closed loop, 3 streams x 2 in flight,"),
    ({"stream": True, "rate": 5.0}, "stream, open loop at 5 requests/s, 3 streams,"),
    ({"rate": 5.0}, "unary, open loop at 5 requests/s, a call per scheduled request over 3 connections,"),
    ({}, "unary, closed loop, 3 callers,"),
])  # fmt: skip
def test_the_mode_reads_as_run(kwargs, who):
    """A window is a closed-loop stream's; an open loop's unary calls are one per scheduled request."""
    options = LoadTestOptions(targets=("127.0.0.1:1",), concurrency=3, duration_s=5, warmup_s=1, **kwargs)
    assert options.describe() == f"127.0.0.1:1: {who} 1 process(es), 5 s (+1 s warm-up)"


def test_verification_draws_its_responses_from_the_whole_run():
    """A server wrong only after its first 20 answers (as one wrong only once batches merge
    under load): the first K answers alone passed. 10 draws from 100 answers or more all
    land in the first 20 with odds of 1 in 10^8 (it asked for 300 in 1.5 s, and a CI
    machine loaded by other work made 287)."""
    answered = itertools.count(1)

    def wrong_later(raw: bytes, context) -> bytes:
        request = pb.AssignRequest.FromString(raw)
        response = _response(WORKLOAD, int(request.request_id.split("-")[1]))
        if next(answered) > 20:
            classes = torch.frombuffer(bytearray(response.sparse.positive_classes.data), dtype=torch.int32) + 1
            response.sparse.positive_classes.data = classes.numpy().tobytes()
        return response.SerializeToString()

    with fake_assigner(wrong_later, None) as address:
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=1.5, warmup_s=0.0,
                                     concurrency=2, verify=10))  # fmt: skip
    assert report.requests > 100 and report.verified == 10
    assert report.mismatches and all("classes differ" in m for m in report.mismatches) and not report.ok


def test_a_request_that_fails_late_does_not_stretch_the_requests_per_second():
    """req/s counts the time until the last answer: a request failing at its timeout,
    after every answer was in, stretched it (95 req/s against 200-259 in the series)."""
    recorder = loadtest._Recorder(measure_from=100.0, keep=0)
    recorder.record(100.1, 100.2, None, 0, None)
    answered = recorder.last_answer
    recorder.error(100.3, "DEADLINE_EXCEEDED")  # at perf_counter() now: long after 100.2
    assert recorder.last_answer == answered == 100.2 and recorder.errors["DEADLINE_EXCEEDED"] == 1


def test_an_error_code_keeps_its_first_message_cut_short():
    """The report quotes one message per code: the first that came, at most 300 characters."""
    recorder = loadtest._Recorder(measure_from=time.perf_counter() - 1.0, keep=0)  # measuring since a second ago
    recorder.explain("INVALID_ARGUMENT", "first " + "x" * 500)
    recorder.explain("INVALID_ARGUMENT", "second")
    recorder.explain("UNAVAILABLE", "")  # no message: nothing to keep
    assert recorder.details == {"INVALID_ARGUMENT": "first " + "x" * 294}


def test_the_table_passes_over_a_stray_held_send_or_a_small_lag():
    """Up to 1% of the sends held by their stream, or answers up to 0.5 s (5% of the window)
    behind it, say nothing (a garbage collection, one slow answer); beyond, the table says so."""
    options = LoadTestOptions(targets=("127.0.0.1:1",), rate=100.0, duration_s=10.0)
    quiet = dataclasses.replace(_bench_report(10), options=options, sends=1000, held_sends=10, answered_s=10.3)
    assert quiet.behind_s == pytest.approx(0.3)
    assert "for their stream" not in quiet.table() and "fell behind" not in quiet.table()
    loud = dataclasses.replace(quiet, held_sends=11, answered_s=10.6)
    assert "11 of 1,000 requests waited more than 10 ms for their stream" in loud.table()
    assert "the answers took 0.6 s longer to come than the 10 s window" in loud.table()


def test_the_summary_quotes_the_messages_of_the_measured_errors_only():
    """A warm-up request that failed once the window was open brings its message, not its
    count, into the measured window: the summary quotes only codes it counts."""
    report = dataclasses.replace(_bench_report(0), error_details={"UNAVAILABLE": "down", "INTERNAL": "late"})
    assert report.summary()["error_details"] == {"UNAVAILABLE": "down"}
    assert "INTERNAL" not in report.table()


def test_a_run_without_answers_has_no_first_answer():
    """No answer came: the time of the first is none (JSON null), not an infinity."""
    report = dataclasses.replace(_bench_report(0), first_answered_s=math.inf)
    assert report.summary()["first_answered_s"] is None


def _result(recorder: loadtest._Recorder, measured_s: float, started: float) -> dict:
    return {**recorder.result(), "cpu_s": 0.5, "window_s": 1.2, "measured_s": measured_s, "started": started}


def test_the_latency_table_says_failed_requests_are_not_in_it():
    """Calls whose deadline passed count as errors, not latencies: with 11% of them failed
    the table read p90 126 ms where the true p90 was over the 150 ms deadline, and did not
    say whose latency it was (a helper's audit)."""
    recorder = loadtest._Recorder(100.0, keep=0)
    recorder.record(100.1, 100.2, None, 0, None)
    recorder.error(100.3, "DEADLINE_EXCEEDED")
    options = LoadTestOptions(targets=("127.0.0.1:1",), duration_s=1.0, concurrency=2)
    table = loadtest._merge(options, [_result(recorder, 1.0, started=5.0)]).table()
    assert "of the 1 answered requests; the 1 that failed are not in them" in table
    recorder = loadtest._Recorder(100.0, keep=0)
    recorder.record(100.1, 100.2, None, 0, None)
    assert "that failed" not in loadtest._merge(options, [_result(recorder, 1.0, started=5.0)]).table()


@pytest.mark.parametrize("seconds, warned", [(0.2, False), (0.3, True)])
def test_a_closed_loop_whose_calls_take_much_of_the_window_says_req_s_reads_low(seconds, warned):
    """16,384 callers, p50 7.3 s in a 3 s window: 213 req/s where the server answered
    1,550 a second, and nothing said so (each caller sent few requests in the window)."""
    recorder = loadtest._Recorder(100.0, keep=0)
    recorder.record(100.1, 100.1 + seconds, None, 0, None)
    options = LoadTestOptions(targets=("127.0.0.1:1",), duration_s=1.0, concurrency=2)
    table = loadtest._merge(options, [_result(recorder, 1.0, started=5.0)]).table()
    assert ("each caller sent few requests in it, so req/s reads low" in table) is warned
    open_loop = dataclasses.replace(options, rate=4.0)
    assert "reads low" not in loadtest._merge(open_loop, [_result(recorder, 1.0, started=5.0)]).table()


def test_client_processes_results_merge_into_one_report():
    """Counts add up; answers span from the earliest first answer to the latest last one; the
    measured time is the longest process's (one stopped early measured less)."""
    first, second = loadtest._Recorder(100.0, keep=0), loadtest._Recorder(100.0, keep=0)
    first.record(100.1, 100.2, None, 0, None)
    second.record(100.5, 100.9, None, 1, None)
    second.error(100.6, "UNAVAILABLE")
    options = LoadTestOptions(targets=("127.0.0.1:1",), duration_s=1.0, rate=4.0, processes=2, concurrency=2)
    report = loadtest._merge(options, [_result(first, 0.8, started=5.0), _result(second, 1.0, started=5.05)])
    assert (report.requests, report.errors, report.client_cpu_s) == (2, {"UNAVAILABLE": 1}, 1.0)
    assert (report.first_answered_s, report.answered_s) == pytest.approx((0.2, 0.9))
    assert report.measured_s == 1.0 and report.start_skew_s == pytest.approx(0.05)


def test_client_processes_interleave_their_share_of_the_rate():
    """Two processes at 4 requests/s together: each sends every 0.5 s, the second 0.25 s after
    the first, so that 4 requests go out in a second, evenly spread."""
    options = LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=1.0, rate=4.0, processes=2,
                              concurrency=2)  # fmt: skip
    drivers = [_Driver(options, index, None, None, None) for index in (0, 1)]
    now = time.perf_counter()  # the window: their schedules start now and end a second later
    for driver in drivers:
        driver.load_from, driver.end = now, now + 1.0
    first, second = schedules = [list(driver._schedule()) for driver in drivers]
    assert len(first) == len(second) == 2 and first[0] < second[0] < first[1] < second[1], schedules


def test_an_open_loop_streams_schedules_are_the_process_schedule_shared_out():
    """Each stream stepped through the whole schedule past the other streams' times, and
    began it where the streams before it had left the clock: with 2,048 streams at 200/s
    the last began 0.16 s late and the run sent 593 of 600 requests, saying nothing (a
    helper's audit). Stream k's times are the process's k-th, k + share-th, ...: computed
    from the load's one start."""
    options = LoadTestOptions(targets=("127.0.0.1:1",), workload=TINY, duration_s=3.0, rate=200.0, concurrency=2048,
                              stream=True)  # fmt: skip
    driver = _Driver(options, 0, None, None, None)
    driver.load_from = time.perf_counter() - 5.0  # the clock has moved on since: times still come from the start
    driver.end = driver.load_from + 3.0
    process = list(driver._schedule())
    streams = [list(driver._schedule(k, driver.share)) for k in range(driver.share)]
    assert len(process) == 600 and process[0] == driver.load_from
    assert sorted(at for stream in streams for at in stream) == process
    assert streams[5] == process[5::2048] and streams[2047] == []


# --------------------------------------------------------------------------- the command line, flag by flag


def test_loadtest_flags_default_as_their_help_says():
    """Each default the help promises (duration 10, warm-up 2, 8 callers, one process, ...),
    and ``--boxes``: "coco" is the COCO-like default (None), a number is taken down to 0."""
    args = build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1"])
    assert (args.duration, args.warmup, args.concurrency, args.processes, args.timeout) == (10.0, 2.0, 8, 1, 60.0)
    assert (args.preset, args.images, args.boxes, args.format, args.variants) == ("retinanet_torchvision", 8, None,
                                                                                 "sparse", 16)  # fmt: skip
    assert (args.seed, args.verify, args.rate, args.window, args.stream, args.fp16) == (0, 0, None, None, False, False)
    parse = lambda *flags: build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", *flags])  # noqa: E731
    assert (parse("--boxes", "coco").boxes, parse("--boxes", "0").boxes, parse("--verify", "0").verify) == (None, 0, 0)


def test_loadtest_flags_take_their_bounds_exactly():
    """The largest --concurrency, --processes, --window, --warmup and --timeout are taken,
    and the smallest --warmup, --images, --variants, --verify; one past them is refused
    naming the flag."""
    args = build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--concurrency", "16384", "--processes",
                                      "256", "--window", "1024", "--warmup", "1e6", "--timeout", "1e6", "--images",
                                      "1", "--variants", "1", "--duration", "1e6"])  # fmt: skip
    assert (args.concurrency, args.processes, args.window, args.warmup, args.timeout, args.duration) == (
        16384, 256, 1024, 1e6, 1e6, 1e6)  # fmt: skip
    assert build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--warmup", "0"]).warmup == 0


def test_one_caller_per_client_process_is_enough():
    """``--concurrency`` is shared by ``--processes``: as many callers as processes (one
    each) is a run, not a usage problem; one fewer is refused."""
    from tritarget.clients.loadtest_cli import _usage_problem

    def problem(concurrency: int, processes: int) -> str | None:
        return _usage_problem(build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--concurrency",
                                                         str(concurrency), "--processes", str(processes)]))  # fmt: skip

    assert problem(3, 3) is None and problem(1, 1) is None
    assert problem(2, 3) == "--concurrency 2 is shared by --processes 3: give at least that many"


@pytest.mark.parametrize("flags", [["--images", "0"], ["--variants", "0"], ["--verify", "-1"], ["--boxes", "-1"],
                                   ["--processes", "0"], ["--window", "0"], ["--warmup", "1000001"],
                                   ["--boxes", "many"]])  # fmt: skip
def test_loadtest_flags_below_or_past_their_bounds_are_refused_naming_the_flag(flags, capsys):
    """Refused by the parser (exit 2, naming the flag), not later by the library with its
    own field names (``images``, ``verify``)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected",
    [(["--stream", "--window", "3", "--concurrency", "2", "--format", "dense", "--fp16", "--processes", "2"],
      {"stream": True, "window": 3, "concurrency": 2, "rate": None, "processes": 2}),
     (["--rate", "40", "--concurrency", "3"],
      {"stream": False, "window": 1, "rate": 40.0, "concurrency": 3, "processes": 1})],
    ids=["closed-stream", "open-unary"],
)  # fmt: skip
def test_loadtest_flags_reach_the_run_as_given(flags, expected, tmp_path):
    """Every flag the command line takes is the run's: the JSON's options (what was run)
    hold each value given, the workload's and the timing's alike."""
    out = tmp_path / "out.json"
    with _echo_server() as (address, _, _):
        code = main(["loadtest", "--target", address, "--duration", "0.4", "--warmup", "0.1", "--canvas", "64", "96",
                     "--images", "2", "--boxes", "5", "--variants", "3", "--seed", "7", "--timeout", "30",
                     "--preset", "yolov5", "--no-progress", "--json", str(out), *flags])  # fmt: skip
    assert code == 0
    options = json.loads(out.read_text())["options"]
    assert {key: options[key] for key in expected} == expected
    assert (options["duration_s"], options["warmup_s"], options["timeout_s"]) == (0.4, 0.1, 30)
    fp16 = "--fp16" in flags
    assert options["workload"] == {
        "preset": "yolov5",
        "canvas": [64, 96],
        "images": 2,
        "boxes": 5,
        "format": "dense" if fp16 else "sparse",
        "fp16": fp16,
        "variants": 3,
        "seed": 7,
    }


def test_a_run_with_errors_exits_1_with_its_table_and_files(tmp_path, capsys):
    """Nothing listens at the target: every request fails, the run still writes its JSON
    and table, and the exit status says it failed (1, not 0, not a usage error's 2)."""
    out = tmp_path / "out.json"
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64",
                 "--images", "1", "--variants", "2", "--concurrency", "1", "--no-progress",
                 "--json", str(out)])  # fmt: skip
    assert code == 1
    summary = json.loads(out.read_text())
    assert summary["ok"] is False and summary["errors"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_run_in_which_no_client_came_back_exits_1_in_one_line(monkeypatch, capsys):
    """No caller got a result (here: building the requests fails): one line, exit 1, as a
    failed run, not 2 (the flags were right)."""

    def fails(self, index):
        raise RuntimeError("cannot build the request")

    monkeypatch.setattr(Workload, "request", fails)
    with _echo_server() as (address, _, _):
        code = main(["loadtest", "--target", address, "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64",
                     "--images", "1", "--no-progress"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("tritarget loadtest: load test failed") and err.count("\n") == 1, err


def test_a_second_ctrl_c_while_the_clients_stop_exits_130_in_one_line(monkeypatch, capsys):
    """The run raises KeyboardInterrupt on a second Ctrl-C: the command ends with 130 (128 +
    SIGINT) and one line, as a shell expects of an interrupted command."""

    def second_ctrl_c(options, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(loadtest, "run", second_ctrl_c)
    code = main(["loadtest", "--target", _closed_port(), "--duration", "0.3", "--warmup", "0", "--no-progress"])
    assert code == 130
    assert capsys.readouterr().err == "tritarget loadtest: interrupted\n"


@pytest.mark.parametrize("csv_to", ["/dev/stdout", "out.txt"])
def test_two_outputs_into_the_same_regular_file_through_stdout_are_refused(csv_to, tmp_path):
    """`--json /dev/stdout --csv /dev/stdout > out.txt` (or `--csv out.txt`): both name one
    regular file, the second would replace the first; refused before the run. Into
    /dev/null (a device) both are taken."""
    with open(tmp_path / "out.txt", "w") as stdout:
        result = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "loadtest", "--target", _closed_port(),
                                 "--duration", "0.2", "--warmup", "0", "--no-progress", "--json", "/dev/stdout",
                                 "--csv", csv_to],
                                stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                                cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr == "tritarget loadtest: --json and --csv name the same file, /dev/stdout\n"
    args = build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--json", "/dev/null", "--csv",
                                      "/dev/null"])  # fmt: skip
    from tritarget.clients.loadtest_cli import _usage_problem

    assert _usage_problem(args) is None


def test_only_the_files_written_are_said_written(monkeypatch, tmp_path, capsys):
    """A CSV that failed to write (a full disk) is not in the "wrote" lines; the JSON is."""

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "write_csv", full_disk)
    csv_path, json_path = tmp_path / "out.csv", tmp_path / "out.json"
    with _echo_server() as (address, _, _):
        code = main(["loadtest", "--target", address, "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64",
                     "--images", "1", "--no-progress", "--csv", str(csv_path), "--json", str(json_path)])  # fmt: skip
    assert code == 1
    out = capsys.readouterr().out
    assert f"wrote {json_path}" in out and f"wrote {csv_path}" not in out
