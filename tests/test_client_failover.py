"""Faults that lose nothing: one of two real server processes is killed (SIGKILL) in the
middle of a client stream; every request still gets exactly one correct answer (D7), and
calls and streams made afterwards skip the dead endpoint instead of failing at once."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
import torch
from test_service_harness import ServerThread, fake_assigner, serve_process, sparse_view

from support import assert_targets_equal
from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.kernels import assign, presets
from tritarget.protos import target_assigner_pb2 as pb

CANVAS = (128, 160)
PRESET = "retinanet_torchvision"
REQUESTS = 300
KILL_AFTER = 50


def _requests(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    items = []
    for i in range(count):
        boxes = torch.rand(3, 2, generator=generator) * 100
        boxes = torch.cat([boxes, boxes + 12 + 40 * torch.rand(3, 2, generator=generator)], dim=1)
        items.append({"gt_boxes": boxes, "gt_counts": [2, 1], "request_id": f"r{i}"})
    return items


def _expected(item: dict):
    config = presets.get(PRESET)
    return sparse_view(assign(item["gt_boxes"], item["gt_counts"], CANVAS, config, backend="reference"))


@pytest.fixture
def two_processes():
    processes = [serve_process("--backend", "cpu", "--warmup-canvas", "64", "64") for _ in range(2)]
    yield processes
    for process, _ in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _check_all(results, items) -> None:
    assert len(results) == len(items)  # exactly one answer per request, none lost or repeated
    for got, item in zip(results, items):
        assert_targets_equal(got, _expected(item))  # labels, matches exact; deltas within 1e-6 (cpu backend)


def test_stream_survives_a_killed_replica_and_loses_nothing(two_processes):
    (a, port_a), (_, port_b) = two_processes
    items = _requests(REQUESTS)
    results = []
    with TargetClient([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"], timeout=120) as client:
        for targets in client.stream(items, preset=PRESET, canvas=CANVAS):  # starts on the first endpoint: A
            results.append(targets)
            if len(results) == KILL_AFTER:
                a.send_signal(signal.SIGKILL)
                a.wait(30)
        _check_all(results, items)
        # New calls and streams skip the dead endpoint instead of failing at once.
        start = time.monotonic()
        for _ in range(3):
            _check_all(list(client.stream(items[:5], preset=PRESET, canvas=CANVAS)), items[:5])
            got = client.assign(items[0]["gt_boxes"], [2, 1], CANVAS, preset=PRESET)
            _check_all([got], items[:1])
        assert time.monotonic() - start < 30


def test_async_stream_survives_a_killed_replica(two_processes):
    (a, port_a), (_, port_b) = two_processes
    items = _requests(120)

    async def run():
        results = []
        async with AsyncTargetClient([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"], timeout=120) as client:
            async for targets in client.stream(items, preset=PRESET, canvas=CANVAS):
                results.append(targets)
                if len(results) == 20:
                    a.send_signal(signal.SIGKILL)
        return results

    _check_all(asyncio.run(run()), items)


@pytest.fixture
def answers_then_drains():
    """A server whose streams answer every request they read, through a real server, and
    then end UNAVAILABLE, as tritarget's own server does when it drains: yields its address."""
    with ServerThread() as real, TargetClient(real.address) as helper:

        def answer(request, context):
            return helper.assign_raw(pb.AssignRequest.FromString(request)).SerializeToString()

        def answer_then_drain(requests, context):
            for request in requests:
                yield answer(request, context)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

        with fake_assigner(answer, answer_then_drain) as address:
            yield address


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
@pytest.mark.parametrize("last_item", ["good", "bad"])
def test_a_stream_whose_server_drains_after_the_last_answer_ends_there(answers_then_drains, api, last_item):
    """Every request answered, and the source read to its end (or to an item that builds no
    request): the stream's end UNAVAILABLE loses nothing, so the stream ends as complete
    (or raises the item's error). It went looking for another server until its deadline,
    then raised UNAVAILABLE, though the caller held every answer."""
    items = _requests(3)
    if last_item == "bad":
        items.append({"gt_boxes": "not boxes", "gt_counts": [1]})
    error = (TypeError, "stream item 3: gt_boxes: expected a Tensor") if last_item == "bad" else None
    results = []

    async def read_async():
        async with AsyncTargetClient(answers_then_drains, timeout=60) as client:
            async for targets in client.stream(items, preset=PRESET, canvas=CANVAS):
                results.append(targets)
            return client.stats

    def read() -> object:
        if api == "asyncio":
            return asyncio.run(read_async())
        with TargetClient(answers_then_drains, timeout=60) as client:
            for targets in client.stream(items, preset=PRESET, canvas=CANVAS):
                results.append(targets)
            return client.stats

    start = time.monotonic()
    if error is None:
        stats = read()
        assert (stats.retries, stats.errors, stats.responses) == (0, 0, 3)
    else:
        with pytest.raises(error[0], match=error[1]):
            read()
    assert time.monotonic() - start < 30  # not the stream's 60 s deadline
    _check_all(results, items[:3])


def _never_answers(requests, context):
    for _ in requests:
        pass
    while context.is_active():
        time.sleep(0.05)
    return iter(())


def test_the_callers_channel_options_take_effect_and_a_ping_policy_goaway_is_named():
    """gRPC takes the first of two options of one name, and a caller's came after the
    client's own: a keepalive time given in ``options=`` was ignored. A server whose ping
    policy (gRPC's default: one ping per 5 min without data) ended the connection with
    GOAWAY "too_many_pings" was reported as "no tritarget server answered ... Is it running?"."""
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.http2.max_pings_without_data", 0)]
    with fake_assigner(lambda request, context: b"", _never_answers) as address:
        with TargetClient(address, retries=0, timeout=60, options=options) as client:
            start = time.monotonic()
            with pytest.raises(TargetServiceError) as info:
                list(client.stream(_requests(1), preset=PRESET, canvas=CANVAS))
    assert time.monotonic() - start < 30  # pinged every second, not every 30
    assert info.value.code.name == "UNAVAILABLE"
    assert f"the server at {address} closed the connection (GOAWAY: too many pings)" in info.value.details
    assert "this client pings every 1000 ms" in info.value.details  # what options= set
    assert "Is it running" not in info.value.details
    for name in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        with pytest.raises(ValueError, match=f"options: {name} is set by the client's max_message_bytes= argument"):
            TargetClient(address, options=[(name, 1 << 20)])
