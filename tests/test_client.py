"""Client behaviour against real servers: retries, round-robin, deadlines, errors, forks."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
import time

import grpc
import pytest
import torch
from test_service_harness import ServerThread

from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.clients.wire import build_request, decode_response

CANVAS = (96, 128)
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assign(client, **kwargs):
    return client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", **kwargs)


@pytest.fixture(scope="module")
def two_servers():
    with ServerThread() as a, ServerThread() as b:
        yield a, b


def _assigns(srv) -> float:
    return srv.metrics.value("tritarget_requests_total", {"method": "Assign"})


def test_round_robin_over_endpoints(two_servers):
    a, b = two_servers
    before = _assigns(a), _assigns(b)
    with TargetClient([a.address, b.address]) as client:
        for _ in range(6):
            _assign(client)
    assert (_assigns(a) - before[0], _assigns(b) - before[1]) == (3, 3)


def test_unavailable_endpoint_is_retried_on_the_next(two_servers):
    a, _ = two_servers
    dead = f"127.0.0.1:{_free_port()}"
    with TargetClient([dead, a.address], retries=2, backoff=0.01) as client:
        for _ in range(4):
            assert (_assign(client).labels == 1).any()


def test_retries_until_the_server_comes_up():
    port = _free_port()
    srv = ServerThread(port=port)
    starter = threading.Timer(0.5, srv.start)
    starter.start()
    try:
        with TargetClient(f"127.0.0.1:{port}", retries=40, backoff=0.05, max_backoff=0.3, timeout=60) as client:
            assert (_assign(client).labels == 1).any()
    finally:
        starter.join()
        srv.stop()


def test_gives_up_after_retries_with_unavailable():
    start = time.monotonic()
    with TargetClient(f"127.0.0.1:{_free_port()}", retries=2, backoff=0.01, timeout=10) as client:
        with pytest.raises(TargetServiceError) as info:
            _assign(client)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10


def test_deadline_exceeded_is_not_retried():
    gate = threading.Event()
    with ServerThread() as srv:

        async def occupy():
            asyncio.ensure_future(srv.server.batcher.run(gate.wait))

        srv.run(occupy())
        try:
            with TargetClient(srv.address, retries=3) as client:
                start = time.monotonic()
                with pytest.raises(TargetServiceError) as info:
                    _assign(client, timeout=0.3)
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - start < 5
        finally:
            gate.set()


def test_error_carries_code_details_and_field_violations(two_servers):
    a, _ = two_servers
    with TargetClient(a.address) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(BOXES, [3], CANVAS, preset="retinanet_torchvision")
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field_violations == [("gt_counts", "counts sum to 3, but gt_boxes has 2 rows")]
    assert str(error).startswith("INVALID_ARGUMENT: gt_counts:")


def test_dense_decode_is_zero_copy(two_servers):
    a, _ = two_servers
    request = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision", format="dense")
    with TargetClient(a.address) as client:
        response = client.assign_raw(request)
    data = response.dense.labels.data
    targets = decode_response(response)
    assert targets.labels.untyped_storage().nbytes() == len(data)
    assert targets.labels.shape == (1, response.num_anchors)


def test_client_requests_before_a_fork_work_in_the_child(two_servers):
    """DataLoader workers fork: a client used in the parent opens fresh channels in the child."""
    a, _ = two_servers
    client = TargetClient(a.address)
    _assign(client)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(client, queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) is True
    client.close()


def _child(client, queue) -> None:
    try:
        queue.put(bool((_assign(client).labels == 1).any()))
    except Exception as exc:  # reported to the parent
        queue.put(repr(exc))


def test_async_client_round_robin_and_retry(two_servers):
    a, b = two_servers
    dead = f"127.0.0.1:{_free_port()}"

    async def main():
        async with AsyncTargetClient([a.address, dead, b.address], retries=3, backoff=0.01) as client:
            return await asyncio.gather(*[_assign(client) for _ in range(6)])

    results = asyncio.run(main())
    assert all((t.labels == 1).any() for t in results)


def test_config_and_preset_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of preset= or config="):
        build_request(BOXES, [2], CANVAS)
    with pytest.raises(ValueError, match="format"):
        build_request(BOXES, [2], CANVAS, preset="yolov5", format="csv")
