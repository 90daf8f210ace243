"""Client behaviour against real servers: retries, round-robin, deadlines, errors, forks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from test_service_harness import (
    ServerThread,
    batching,
    fake_assigner,
    free_port,
    peer_recording_server,
    serve_process,
    until,
)

from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.clients import client as client_module
from tritarget.clients.wire import build_request, decode_response
from tritarget.kernels import AnchorLevel, SparseTargets, Targets, assign, presets
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service.backend import BatchOptions

CANVAS = (96, 128)
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])
PRESET = "retinanet_torchvision"


_HELD: list[socket.socket] = []


def _dead_port() -> int:
    """A port that refuses connections for the rest of the run: bound, never listening (a
    port only free when drawn could be taken meanwhile, by a server of another test in
    another xdist worker, and answer)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    return held.getsockname()[1]


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
    dead = f"127.0.0.1:{_dead_port()}"
    with TargetClient([dead, a.address], retries=2, backoff=0.01) as client:
        for _ in range(4):
            assert (_assign(client).labels == 1).any()


class _Status(grpc.RpcError):
    """A call's outcome as gRPC raises it (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code, details, retried", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
    (grpc.StatusCode.INTERNAL, "Internal error from Core", True),  # a stream write cut by a dying server
    (grpc.StatusCode.INTERNAL, "Exception calling application", False),  # a server's own error: an answer
    (grpc.StatusCode.INVALID_ARGUMENT, "Internal error from Core", False),
])  # fmt: skip
def test_transport_failures_are_told_from_answers(code, details, retried):
    assert client_module._transport_failure(_Status(code, details)) is retried


@pytest.mark.parametrize("connections", [1, 4])
def test_an_endpoint_that_just_failed_is_skipped_by_the_next_calls(two_servers, connections):
    """After a call's first try fails on a dead endpoint, the calls that follow within the
    cool-down go to the live one at once: only the first call retries (with several
    connections per address, the dead address was tried once on each)."""
    a, _ = two_servers
    dead = f"127.0.0.1:{_dead_port()}"
    with TargetClient([dead, a.address], retries=2, backoff=0.01, connections=connections) as client:
        for _ in range(4):  # round-robin alone would send two of these to the dead endpoint first
            assert (_assign(client).labels == 1).any()
        assert client.stats.retries == 1


def test_an_overloaded_endpoint_is_skipped_by_the_next_calls(two_servers, monkeypatch):
    """A full queue's RESOURCE_EXHAUSTED (OVERLOADED) cools its endpoint down as a dead one
    does: the calls that follow go to the other replica at once (only the first call
    retries), rather than each trying the queue that refused the last first."""
    monkeypatch.setattr(client_module, "_COOLDOWN_S", 60.0)  # the whole test within it
    _, other = two_servers
    full = ServerThread(batching=batching(max_queue_images=1, max_batch_images=1, inline_max_images=0)).start()
    gate = threading.Event()

    def fill() -> None:
        with TargetClient(full.address, retries=0) as client:
            _assign(client)

    filler = threading.Thread(target=fill)
    try:

        async def hold_the_worker() -> None:
            asyncio.ensure_future(full.server.batcher.run(gate.wait))

        full.run(hold_the_worker())
        filler.start()  # its request fills the queue, behind the held worker
        until(lambda: full.metrics.value("tritarget_queued_images") == 1)
        with TargetClient([full.address, other.address], retries=2, backoff=0.01) as client:
            for _ in range(4):  # round-robin alone would send two of these to the full queue first
                assert (_assign(client).labels == 1).any()
            assert client.stats.retries == 1
        assert full.metrics.value("tritarget_errors_total", {"method": "Assign", "code": "RESOURCE_EXHAUSTED"}) == 1
    finally:
        gate.set()
        filler.join(30)
        full.stop()


class _Refusal(grpc.RpcError):
    """A call's failure as grpcio gives it, from a ``google.rpc.Status``."""

    def __init__(self, status) -> None:
        super().__init__(status.message)
        self.status = status

    def code(self) -> grpc.StatusCode:
        return next(code for code in grpc.StatusCode if code.value[0] == self.status.code)

    def details(self) -> str:
        return self.status.message

    def trailing_metadata(self):
        return (("grpc-status-details-bin", self.status.SerializeToString()),)


def test_only_our_servers_overloaded_reason_reads_as_a_full_queue():
    """An ErrorInfo says OVERLOADED in our domain: another service's (a proxy's, a
    gateway's) RESOURCE_EXHAUSTED of that reason is not our full queue to retry elsewhere."""
    from google.rpc import error_details_pb2

    from tritarget.service.errors import Overloaded
    from tritarget.service.status import status_of

    ours = status_of(Overloaded("server overloaded: 64 images queued"))
    foreign = type(ours)()
    foreign.CopyFrom(ours)
    for detail in foreign.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            info.domain = "gateway.example.com"
            detail.Pack(info)
    assert client_module._overloaded(_Refusal(ours)) and not client_module._overloaded(_Refusal(foreign))


def test_calls_go_round_the_endpoints_when_every_one_failed_of_late():
    with TargetClient(["127.0.0.1:1", "127.0.0.1:2"]) as client:
        client._endpoint(client._closes)  # its channels open
        for index in (0, 1):
            client._failed(index, client_module._Failure(grpc.StatusCode.UNAVAILABLE, "server draining"))
        assert {client._endpoint(client._closes)[0] for _ in range(4)} == {0, 1}


def test_the_backoff_doubles_per_attempt_up_to_its_cap(monkeypatch):
    """Full jitter: a wait drawn up to ``backoff * 2**attempt``, at most ``max_backoff``."""
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: high)  # the upper bound drawn
    with TargetClient("127.0.0.1:1", backoff=0.1, max_backoff=1.0) as client:
        assert [client._delay(attempt) for attempt in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_no_retry_is_waited_for_that_would_leave_the_last_try_no_time(monkeypatch):
    """The wait before a retry (or a health check) ends ``_LAST_TRY_S`` before the deadline
    at the latest, and none starts closer to it: a try sent as the deadline passes fails
    unanswered."""
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: high)  # the longest wait drawn: 1 s
    unavailable = client_module._Failure(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with TargetClient("127.0.0.1:1", backoff=10.0) as client:
        now = time.monotonic()
        wait = client._retry_wait(unavailable, 0, now + 1.0)
        assert 0 <= wait <= 1.0 - client_module._LAST_TRY_S
        assert client._retry_wait(unavailable, 0, time.monotonic() + client_module._LAST_TRY_S / 2) is None
        # wait_until_ready's waits between health checks alike: its timeout is not overrun by a backoff.
        assert 0 <= client._health_wait(0, time.monotonic() + 1.0) <= 1.0 - client_module._LAST_TRY_S
        assert client._health_wait(0, time.monotonic() + client_module._LAST_TRY_S / 2) is None


def test_a_try_ends_by_the_calls_deadline_whatever_its_try_timeout():
    with TargetClient("127.0.0.1:1", try_timeout=10.0) as client:
        assert client._try_limit(None) == 10.0
        assert 0 < client._try_limit(time.monotonic() + 1.0) <= 1.0


def test_a_streams_takeover_must_answer_before_the_search_for_a_server_ends():
    """After a break, the call that takes the stream over gets what is left of the search
    for its first answer, then ``try_timeout`` per answer; the first call gets the latter."""
    handles = []

    def schedule(seconds, callback):
        handles.append(seconds)
        return threading.Timer(seconds, callback)  # never started

    with TargetClient("127.0.0.1:1", try_timeout=10.0) as client:
        takeover = client._watchdog(1, None, time.monotonic() + 2.0, None, None, schedule)
        first = client._watchdog(0, None, time.monotonic() + 2.0, None, None, schedule)
    assert takeover.takeover and 0 < takeover.seconds <= 2.0 and takeover._steady == 10.0
    assert not first.takeover and first.seconds == 10.0 and handles == [takeover.seconds, 10.0]


def test_a_front_end_that_failed_is_skipped_on_its_own_connection_only():
    """With ``connections=N`` to one address of ``serve --workers`` front ends, each
    connection reaches its own front end: one draining, overloaded or silent is skipped
    on its connection, not on all (which skipped none, all having failed)."""
    with TargetClient("127.0.0.1:1", connections=4) as client:
        client._endpoint(client._closes)  # its channels open
        client._failed(0, client_module._Failure(grpc.StatusCode.UNAVAILABLE, "server draining"))
        picks = [client._endpoint(client._closes)[0] for _ in range(12)]
    assert sorted(set(picks)) == [1, 2, 3], picks


@pytest.mark.parametrize("wait", [False, True], ids=["call", "wait_until_ready"])
def test_a_client_started_before_the_server_succeeds_within_its_deadline(wait):
    """A trainer started together with ``tritarget serve``: the server is up 2 s later;
    with default options the call (or ``wait_until_ready``) waits for it."""
    port = free_port()
    srv = ServerThread(port=port)
    starter = threading.Timer(2.0, srv.start)
    starter.start()
    try:
        with TargetClient(f"127.0.0.1:{port}", timeout=30) as client:
            start = time.monotonic()
            if wait:
                client.wait_until_ready(timeout=30)
                assert time.monotonic() - start >= 1.9
            assert (_assign(client).labels == 1).any()
            assert time.monotonic() - start >= 1.9
    finally:
        starter.join()
        srv.stop()


def test_a_client_waiting_for_a_server_redials_at_its_own_backoff():
    """gRPC's own reconnect backoff (1 s, x1.6, up to 120 s) made every try in between fail
    at once without dialling: a server up 17 s after its client was found 10.7 s later, or
    not within the deadline. Redials now come at most ``max_backoff`` (1 s) apart. The
    port accepts and hangs up (no HTTP/2), so each dial is seen and fails."""
    listener = socket.create_server(("127.0.0.1", 0))
    dials = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                dials.append(time.monotonic())
                connection.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with TargetClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=4) as client:
            with pytest.raises(TargetServiceError, match="UNAVAILABLE"):
                _assign(client)
    finally:
        listener.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(dials)]
    assert len(dials) >= 6 and max(gaps) < 1.6, gaps  # gRPC's own: 3 dials, 1.2 and 1.8 s apart


def test_gives_up_at_the_deadline_and_says_what_was_tried():
    dead = [f"127.0.0.1:{_dead_port()}", f"127.0.0.1:{_dead_port()}"]
    start = time.monotonic()
    with TargetClient(dead, timeout=1.5) as client:
        with pytest.raises(TargetServiceError) as info:
            _assign(client)
    elapsed = time.monotonic() - start
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert 1.4 < elapsed < 5  # retried until the deadline, not a fixed number of tries
    assert f"no tritarget server answered at {dead[0]}, {dead[1]}" in info.value.details
    assert "tritarget serve" in info.value.details and "tries over" in info.value.details
    assert "reachable from here" in info.value.details  # a partition looks the same as no server


def test_wait_until_ready_times_out_naming_the_endpoint():
    dead = f"127.0.0.1:{_dead_port()}"
    with TargetClient(dead) as client:
        with pytest.raises(TargetServiceError) as info:
            client.wait_until_ready(timeout=1.0)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"no tritarget server at {dead} became SERVING within" in info.value.details


def test_gives_up_after_the_given_retries():
    start = time.monotonic()
    with TargetClient(f"127.0.0.1:{_dead_port()}", retries=2, backoff=0.01, timeout=10) as client:
        with pytest.raises(TargetServiceError) as info:
            _assign(client)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "3 tries" in info.value.details
    assert time.monotonic() - start < 5


@contextlib.contextmanager
def _hung_server():
    """A real server whose compute worker never comes back (until the test ends)."""
    gate = threading.Event()
    with ServerThread() as srv:

        async def occupy():
            asyncio.ensure_future(srv.server.batcher.run(gate.wait))

        srv.run(occupy())
        try:
            yield srv
        finally:
            gate.set()


def test_deadline_exceeded_is_not_retried():
    with _hung_server() as srv, TargetClient(srv.address, retries=3) as client:
        start = time.monotonic()
        with pytest.raises(TargetServiceError) as info:
            _assign(client, timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
        # Named: gRPC's own "Deadline Exceeded" (what a DataLoader worker's TargetCollate
        # raised) named neither the server nor the wait.
        assert info.value.details.startswith(f"no answer from {srv.address} within the call's timeout (0.")
        assert "1 try)" in info.value.details


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_try_timeout_moves_a_call_off_a_hung_replica(two_servers, client_class):
    good, _ = two_servers
    with _hung_server() as hung:
        client = client_class([hung.address, good.address], timeout=20, try_timeout=0.3)
        start = time.monotonic()
        if client_class is TargetClient:
            with client:
                results = [_assign(client) for _ in range(2)]
        else:

            async def calls():
                async with client:
                    return [await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision") for _ in range(2)]

            results = asyncio.run(calls())
        assert all((targets.labels == 1).any() for targets in results)
        assert time.monotonic() - start < 10  # not the 20 s deadline
        assert client.stats.retries >= 1


def test_try_timeout_still_gives_up_at_the_calls_deadline():
    with _hung_server() as hung, TargetClient(hung.address, timeout=1.5, try_timeout=0.4) as client:
        start = time.monotonic()
        with pytest.raises(TargetServiceError) as info:
            _assign(client)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 1.4 < time.monotonic() - start < 5
        assert client.stats.retries >= 2  # tries of 0.4 s until the deadline


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_try_timeout_must_be_positive(bad):
    with pytest.raises(ValueError, match="try_timeout: must be > 0 seconds"):
        TargetClient("127.0.0.1:1", try_timeout=bad)


@pytest.mark.parametrize("setting, message", [
    ({"timeout": -1.0}, "timeout: must be > 0 seconds"), ({"timeout": float("nan")}, "timeout: must be > 0 seconds"),
    ({"backoff": -0.1}, "backoff: must be finite seconds >= 0"),
    ({"max_backoff": 0}, "max_backoff: must be finite seconds > 0"),
    ({"max_backoff": float("inf")}, "max_backoff: must be finite seconds > 0"),
    ({"retries": -1}, "retries: must be an integer >= 0"), ({"retries": 2.5}, "retries: must be an integer >= 0"),
    # A comparison's TypeError, naming nothing.
    ({"backoff": None}, "backoff: must be finite seconds >= 0, got None"),
    ({"max_backoff": "1"}, "max_backoff: must be finite seconds > 0, got '1'"),
])  # fmt: skip
def test_settings_that_cannot_work_are_refused_when_the_client_is_made(setting, message):
    """Not at the first call (a negative timeout made every call DEADLINE_EXCEEDED at once,
    a negative backoff failed the first retry with "sleep length must be non-negative")."""
    for client_class in (TargetClient, AsyncTargetClient):
        with pytest.raises(ValueError, match=message):
            client_class("127.0.0.1:1", **setting)


@pytest.mark.parametrize(("arguments", "message"), [({"timeout": -1.0}, "timeout: must be > 0 seconds"),
                                                     ({"densify": False, "format": "dense"}, "densify=False returns "
                                                      "SparseTargets: it needs format='sparse'"),
                                                     ({"return_exceptions": "no"},  # read as True
                                                      "return_exceptions: expected True or False"),
                                                     ({"densify": "no"},  # read as True: dense targets
                                                      "densify: expected True or False")])  # fmt: skip
def test_a_streams_bad_arguments_are_refused_when_it_is_called(arguments, message):
    """Not where it is first iterated (a data loader's first batch, far from the call)."""
    for client_class in (TargetClient, AsyncTargetClient):
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            client_class("127.0.0.1:1").stream([], **arguments)


def test_settings_of_numpy_types_are_taken():
    """Read from a config as numpy scalars: refused as "not an integer"."""
    for client_class in (TargetClient, AsyncTargetClient):
        client = client_class("127.0.0.1:1", timeout=np.int64(5), connections=np.int64(2), retries=np.int32(3),
                              backoff=np.float32(0.1), max_message_bytes=np.int64(2**20))  # fmt: skip
        assert (client.timeout, client.connections, client.retries) == (5.0, 2, 3)


def test_backoffs_of_weeks_still_make_a_client_that_calls():
    """gRPC's reconnect backoff follows the client's, and its channel arguments are C ints:
    a max_backoff of 10**7 s made every call fail with OverflowError."""
    with TargetClient("127.0.0.1:1", backoff=10**7, max_backoff=10**7, timeout=0.5) as client:
        with pytest.raises(TargetServiceError, match="UNAVAILABLE"):
            _assign(client)


def test_a_zero_backoff_is_taken_and_retries_at_once():
    """``backoff=0`` ("retry without waiting") is documented as allowed (>= 0): the client
    is made, its retries wait nothing, and gRPC's reconnect backoff, which must be a
    positive number of milliseconds, is its least (1 ms), not 0."""
    for client_class in (TargetClient, AsyncTargetClient):
        client = client_class("127.0.0.1:1", backoff=0, max_backoff=0.5)
        assert client.backoff == 0 and client._delay(10) == 0.0
        options = dict(client._options)
        assert options["grpc.initial_reconnect_backoff_ms"] == 1 and options["grpc.max_reconnect_backoff_ms"] == 500
    with TargetClient(f"127.0.0.1:{_dead_port()}", backoff=0, retries=3, timeout=10) as client:
        with pytest.raises(TargetServiceError, match="UNAVAILABLE"):
            _assign(client)
        assert client.stats.retries == 3


def test_the_clients_channel_options_and_a_callers_in_their_place():
    """What every channel gets: a keepalive ping every 30 s while a call waits (a server
    gone without a word is found), round_robin over what a ``dns:///`` name resolves to,
    gRPC's reconnect backoff bounded by the client's own (``backoff``, ``max_backoff``, in
    ms), the client's message limit both ways; a caller's option of one of those names
    replaces the client's (one of each name: gRPC takes the first), and only several
    connections per address keep a subchannel pool per channel."""
    options = dict(TargetClient("127.0.0.1:1", backoff=0.2, max_backoff=3.0, max_message_bytes=1 << 20)._options)
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert (options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]) == (200, 3000)
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1 << 20
    assert "grpc.use_local_subchannel_pool" not in options
    mine = TargetClient("127.0.0.1:1", options=[("grpc.keepalive_time_ms", 1000), ("grpc.primary_user_agent", "x")],
                        connections=2)  # fmt: skip
    names = [name for name, _ in mine._options]
    assert len(names) == len(set(names)), names
    given = dict(mine._options)
    assert given["grpc.keepalive_time_ms"] == 1000 and given["grpc.primary_user_agent"] == "x"
    assert given["grpc.use_local_subchannel_pool"] == 1


def test_backoff_stays_bounded_however_many_tries():
    """Without a deadline a call retries for as long as the outage lasts: past 1,024 tries
    the doubling overflowed a float and the call failed with OverflowError."""
    client = TargetClient("127.0.0.1:1", timeout=None, backoff=0.05, max_backoff=0.5)
    assert all(0 <= client._delay(attempt) <= 0.5 for attempt in (0, 10, 1023, 1024, 10**6))


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


def _child(client, queue) -> None:
    try:
        before = client.stats.calls
        positives = bool((_assign(client).labels == 1).any())
        queue.put((positives, before, client.stats.calls))
    except Exception as exc:  # reported to the parent
        queue.put(repr(exc))


def test_client_requests_before_a_fork_work_in_the_child(two_servers):
    """DataLoader workers fork: a client used in the parent opens fresh channels in the
    child, and its ``stats`` there are the child's own (they start at 0)."""
    a, _ = two_servers
    with TargetClient(a.address) as client:
        _assign(client)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child, args=(client, queue))
        child.start()
        child.join(60)
        assert queue.get(timeout=5) == (True, 0, 1)
        assert client.stats.calls == 1


def test_service_errors_pickle_with_every_field():
    """Pickled (a worker process's result, sent whole): still a TargetServiceError."""
    error = TargetServiceError(grpc.StatusCode.INVALID_ARGUMENT, "gt_boxes: bad", [("gt_boxes", "bad")], "r7")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TargetServiceError and str(copy) == str(error)
    assert (copy.code, copy.details, copy.field_violations, copy.request_id) == (
        error.code, error.details, error.field_violations, error.request_id)  # fmt: skip


ITEM = {"gt_boxes": BOXES, "gt_counts": [2]}


class _DatasetError(Exception):
    pass


def _failing_source(bad_item: bool):
    yield ITEM
    yield ITEM
    if bad_item:
        yield {"gt_boxes": torch.zeros(2, 5), "gt_counts": [2]}  # makes no request
    else:
        raise _DatasetError("corrupt JPEG 17")
    yield ITEM


@pytest.mark.parametrize("bad_item", [True, False])
def test_a_stream_whose_requests_fail_answers_those_before_and_raises_the_failure(two_servers, bad_item):
    """An item that makes no request, or the caller's iterable raising (a data loader's
    own error), ends the stream with that exception once the requests before it are
    answered, as in-process code would raise it (not gRPC's "Exception iterating
    requests!", with the answers in flight lost)."""
    a, _ = two_servers
    expected = (ValueError, r"gt_boxes: expected shape \[N, 4\]") if bad_item else (_DatasetError, "JPEG 17")
    got = []
    with TargetClient(a.address) as client:
        with pytest.raises(expected[0], match=expected[1]):
            for targets in client.stream(_failing_source(bad_item), preset="retinanet_torchvision", canvas=CANVAS):
                got.append(targets)
        stats = client.stats
    assert len(got) == 2
    assert (stats.calls, stats.errors, stats.responses) == (1, 1, 2)  # a stream that failed for good: one error

    async def main():
        answers = []
        async with AsyncTargetClient(a.address) as client:
            with pytest.raises(expected[0], match=expected[1]):
                async for targets in client.stream(_failing_source(bad_item), preset="retinanet_torchvision",
                                                   canvas=CANVAS):  # fmt: skip
                    answers.append(targets)
        return answers

    assert len(asyncio.run(main())) == 2


def test_a_stream_outlives_the_clients_timeout(two_servers):
    """A stream may last an epoch: the client's per-call timeout does not end it; a
    timeout given to ``stream`` bounds it."""
    a, _ = two_servers

    def slow(count: int):
        for _ in range(count):
            time.sleep(0.4)
            yield ITEM

    with TargetClient(a.address, timeout=1.0) as client:  # each answer has 1 s: room on a busy machine
        assert len(list(client.stream(slow(4), preset="retinanet_torchvision", canvas=CANVAS))) == 4  # 1.6 s
        with pytest.raises(TargetServiceError) as info:
            list(client.stream(slow(4), preset="retinanet_torchvision", canvas=CANVAS, timeout=1.0))
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_targets_from_the_service_know_their_pyramid_levels(two_servers):
    """``levels()`` works on what the client returns as on in-process targets: the wire
    carries no levels, the client knows them from the request's config and canvas."""
    a, _ = two_servers
    config = presets.get("retinanet_torchvision").replace(**{"anchors.levels[0].aspect_ratios": (1.0,)})
    expected = assign(BOXES, [2], CANVAS, config, backend="reference").level_starts
    assert expected is not None and expected != assign(BOXES, [2], CANVAS, presets.get("retinanet_torchvision"),
                                                       backend="reference").level_starts  # fmt: skip
    with TargetClient(a.address) as client:
        got = [client.assign(BOXES, [2], CANVAS, config=config), client.assign(BOXES, [2], CANVAS, config=config,
                                                                              densify=False, format="sparse"),
               client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision",
                             overrides={"anchors.levels[0].aspect_ratios": [1.0]}, format="dense"),
               *client.stream([ITEM], config=config, canvas=CANVAS)]  # fmt: skip
    for targets in got:
        assert targets.level_starts == expected
        assert len(targets.levels() if isinstance(targets, Targets) else targets.to_dense().levels()) == 5


def test_overrides_holding_config_objects_travel_as_in_process(two_servers):
    """``replace`` takes a config object as an override's value (a whole level): so does
    the client, which sent it to json.dumps as it was (TypeError: not JSON serializable)."""
    a, _ = two_servers
    level = AnchorLevel(stride=8, sizes=(24.0,), aspect_ratios=(1.0, 2.0))
    config = presets.get("retinanet_torchvision")
    expected = assign(BOXES, [2], CANVAS, config.replace(**{"anchors.levels[0]": level}), backend="reference")
    with TargetClient(a.address) as client:
        got = client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", overrides={"anchors.levels[0]": level})
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.matched_gt, expected.matched_gt)


def test_client_refuses_what_in_process_assign_refuses(two_servers):
    """A float class would be truncated to another class and a per-image seed list has no
    place on the wire: refused by name before sending, as in-process ``assign`` refuses
    the first."""
    a, _ = two_servers
    with TargetClient(a.address) as client:
        cases = [({"gt_classes": torch.tensor([1.9, 0.2])}, "gt_classes: expected integers, got torch.float32"),
                 ({"gt_classes": torch.tensor([True, False])}, "gt_classes: expected integers, got torch.bool"),
                 ({"image_sizes": torch.tensor([[90.5, 100.0]])}, "image_sizes: expected integers"),
                 ({"seed": [1, 2]}, "seed: the service takes one int per request")]  # fmt: skip
        for kwargs, message in cases:
            with pytest.raises(TypeError, match=message):
                _assign(client, **kwargs)
        with pytest.raises(TypeError, match="canvas: expected two ints"):
            client.assign(BOXES, [2], (96.5, 128), preset="retinanet_torchvision")
        with pytest.raises(TypeError, match="gt_boxes: expected real coordinates"):
            client.assign(BOXES.to(torch.complex64), [2], CANVAS, preset="retinanet_torchvision")
        # int64 values past int32 would wrap on the wire to other, valid ones (2**32 + 7: class 7).
        cases = [({"gt_classes": torch.tensor([2**32 + 7, 1])}, r"gt_classes\[0\] \(image 0, box 0\): 4294967303 does"),
                 ({"image_sizes": [[90, 2**32 + 60]]}, r"image_sizes\[0, 1\]: 4294967356 does"),
                 ({"pad_sizes": [[-(2**31) - 1, 128]]}, r"pad_sizes\[0, 0\]: -2147483649 does")]  # fmt: skip
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=rf"^{message} not fit the wire's int32$"):
                _assign(client, **kwargs)
        # Counts and the canvas too: protobuf's own refusal ("Value out of range") named none.
        for counts, canvas, message in [([2**31], CANVAS, r"gt_counts\[0\]: 2147483648"),
                                        ([2], (CANVAS[0], 2**31), r"canvas\[1\]: 2147483648")]:  # fmt: skip
            with pytest.raises(ValueError, match=rf"^{message} does not fit the wire's int32$"):
                client.assign(BOXES, counts, canvas, preset="retinanet_torchvision")
        with pytest.raises(ValueError, match=r"^ignore_counts\[1\]: 8589934592 does not fit the wire's int32$"):
            _assign(client, ignore_boxes=BOXES, ignore_counts=[2, 2**33])
        # Each named, where they failed deep in protobuf or torch, or a "false" read as True.
        cases = [({"drop_invalid": "false"}, "drop_invalid: expected True or False, got 'false'"),
                 ({"return_max_iou": None}, "return_max_iou: expected True or False, got None"),
                 ({"return_classes": "no"}, "return_classes: expected True or False, got 'no'"),
                 ({"densify": 1}, "densify: expected True or False, got 1"),
                 ({"request_id": 5}, "request_id: expected a str, got int"),
                 ({"overrides": [("match.high", 0.6)]}, "overrides: expected a mapping"),
                 ({"gt_counts": 2}, r"gt_counts: expected one int per image \(a list or a 1-D tensor\), got int"),
                 ({"gt_boxes": None}, r"gt_boxes: expected a Tensor\[N, 4\] of coordinates, got NoneType"),
                 ({"gt_boxes": BOXES > 5}, "gt_boxes: expected real coordinates, got torch.bool")]  # fmt: skip
        for kwargs, message in cases:
            arguments = {"gt_boxes": BOXES, "gt_counts": [2], **kwargs}
            with pytest.raises(TypeError, match=message):
                client.assign(arguments.pop("gt_boxes"), arguments.pop("gt_counts"), CANVAS,
                              preset="retinanet_torchvision", gt_classes=torch.tensor([1, 2]), **arguments)  # fmt: skip
        with pytest.raises(TypeError, match="preset: expected a str, got int"):
            client.assign(BOXES, [2], CANVAS, preset=5)
        with pytest.raises(ValueError, match=r"gt_counts: expected shape \[B\] \(one count per image\), got \[\]"):
            client.assign(BOXES, torch.tensor(2), CANVAS, preset="retinanet_torchvision")


def test_the_int32_bounds_themselves_go_on_the_wire():
    """Only values past int32 are refused on the client (the server judges the rest)."""
    request = build_request(BOXES, [2], (-(2**31), 2**31 - 1), preset="yolov5", ignore_boxes=BOXES[:1],
                            ignore_counts=[-(2**31)])  # fmt: skip
    assert (request.canvas_height, request.canvas_width, list(request.ignore_counts)) == (
        -(2**31),
        2**31 - 1,
        [-(2**31)],
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
def test_client_takes_every_integer_dtype_assign_takes(two_servers, dtype):
    """int8/int16 classes and sizes were refused as not fitting int32 (torch compared them
    with the bounds wrapped into their own type), unsigned ones raised NotImplementedError."""
    a, _ = two_servers
    kwargs = {"gt_classes": torch.tensor([3, 1], dtype=dtype), "image_sizes": torch.tensor([[90, 100]], dtype=dtype)}
    expected = assign(BOXES, [2], CANVAS, presets.get("retinanet_torchvision"), backend="cpu", **kwargs)
    with TargetClient(a.address) as client:
        got = client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", **kwargs)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.classes, expected.classes)
    if dtype in (torch.uint32, torch.uint64):
        message = r"^gt_classes\[1\] \(image 0, box 1\): 2147483648 does not fit the wire's int32$"
        with pytest.raises(ValueError, match=message):
            build_request(BOXES, [2], CANVAS, preset="yolov5", gt_classes=torch.tensor([1, 2**31], dtype=dtype))


def test_a_class_past_int32_is_named_by_its_image_and_box():
    """An image's first box is named in that image (the counts' running sum ends the image before)."""
    boxes = BOXES.repeat(2, 1)[:3]
    for index, place in ((1, "image 0, box 1"), (2, "image 1, box 0")):
        classes = torch.ones(3, dtype=torch.int64)
        classes[index] = 2**32 + 7
        with pytest.raises(ValueError, match=rf"^gt_classes\[{index}\] \({place}\): 4294967303 does not fit"):
            build_request(boxes, [2, 1], CANVAS, preset="retinanet_torchvision", gt_classes=classes)


def test_client_takes_numpy_flags_and_counts_as_assign_does(two_servers):
    a, _ = two_servers
    expected = assign(BOXES, np.array([2], dtype=np.uint8), CANVAS, presets.get("retinanet_torchvision"),
                      drop_invalid=np.True_, backend="cpu")  # fmt: skip
    with TargetClient(a.address) as client:
        got = client.assign(BOXES, np.array([2]), CANVAS, preset="retinanet_torchvision", drop_invalid=np.True_)
    assert torch.equal(got.labels, expected.labels) and len(got.dropped) == 1


def test_client_pickles_as_its_options():
    client = TargetClient(["127.0.0.1:1", "127.0.0.1:2"], token="t", timeout=7.5, retries=4, backoff=0.2,
                          connections=3, try_timeout=2.5)  # fmt: skip
    copy = pickle.loads(pickle.dumps(client))
    assert copy.targets == client.targets and copy.timeout == 7.5 and copy.retries == 4 and copy.backoff == 0.2
    assert copy.try_timeout == 2.5
    assert copy.connections == 3
    assert copy._metadata == client._metadata and copy._channels == []
    aclient = pickle.loads(pickle.dumps(AsyncTargetClient("127.0.0.1:1", tls=True)))
    assert aclient.targets == ["127.0.0.1:1"] and aclient._tls


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
@pytest.mark.parametrize("connections", [1, 2, 3])  # 2: the least that needs a subchannel pool per channel
def test_calls_spread_over_the_clients_connections(client_class, connections):
    """``connections=N``: N connections to an address, calls in turn over them, so that a
    server's front ends sharing a port (`serve --workers`) all get some."""
    request = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision")
    with peer_recording_server() as (address, peers):
        if client_class is TargetClient:
            with TargetClient(address, connections=connections) as client:
                for _ in range(3 * connections):
                    client.assign_raw(request)
        else:

            async def calls():
                async with AsyncTargetClient(address, connections=connections) as client:
                    for _ in range(3 * connections):
                        await client.assign_raw(request)

            asyncio.run(calls())
    assert len(peers) == connections, peers
    with pytest.raises(ValueError, match="connections: must be an integer >= 1, got 0"):
        client_class("127.0.0.1:1", connections=0)


class _TargetsDataset(torch.utils.data.Dataset):
    """What a data loader's dataset does: each item's targets from the service."""

    def __init__(self, client: TargetClient) -> None:
        self.client = client

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.client.assign(BOXES[index % 2 :], [2 - index % 2], CANVAS, preset="retinanet_torchvision").labels


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_client_in_data_loader_workers(two_servers, method):
    """The client travels to the workers (pickled for spawn and forkserver) and opens
    its channels there."""
    a, _ = two_servers
    client = TargetClient(a.address)
    _assign(client)  # channels open in the parent first: the workers must not reuse them
    loader = torch.utils.data.DataLoader(_TargetsDataset(client), batch_size=None, num_workers=2,
                                         multiprocessing_context=method)  # fmt: skip
    got = list(loader)
    config = presets.get("retinanet_torchvision")
    for index, labels in enumerate(got):
        expected = assign(BOXES[index % 2 :], [2 - index % 2], CANVAS, config, backend="reference").labels
        assert torch.equal(labels, expected)
    client.close()


def test_async_client_round_robin_and_retry(two_servers):
    a, b = two_servers
    dead = f"127.0.0.1:{_dead_port()}"

    async def main():
        async with AsyncTargetClient([a.address, dead, b.address], retries=3, backoff=0.01) as client:
            return await asyncio.gather(*[_assign(client) for _ in range(6)])

    results = asyncio.run(main())
    assert all((t.labels == 1).any() for t in results)


def test_config_and_preset_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of preset= or config="):
        build_request(BOXES, [2], CANVAS)
    with pytest.raises(ValueError, match="exactly one of preset= or config="):
        build_request(BOXES, [2], CANVAS, preset="yolov5", config=presets.get("yolov5"))
    with pytest.raises(ValueError, match="format"):
        build_request(BOXES, [2], CANVAS, preset="yolov5", format="csv")


def test_requests_hold_the_same_bytes_whatever_form_the_inputs_take():
    """Float32 xyxy boxes and int32 classes on the host go on the wire as they are; every
    other form (a view with strides, float64, lists, int64 classes) is converted first."""
    classes = torch.tensor([3, 7])
    expected = build_request(BOXES, [2], CANVAS, preset="yolov5", gt_classes=classes).SerializeToString()
    strided = BOXES.t().contiguous().t()  # the same values, not contiguous
    assert not strided.is_contiguous()
    for boxes, labels in ((BOXES, classes.int()), (strided, classes), (BOXES.double(), classes.tolist()),
                          (BOXES.tolist(), classes)):  # fmt: skip
        request = build_request(boxes, (2,), list(CANVAS), preset="yolov5", gt_classes=labels)
        assert request.SerializeToString() == expected
    # numpy arrays of the other byte order are converted (boxes were "expected a Tensor",
    # classes failed with numpy's own message).
    big_endian = build_request(BOXES.numpy().astype(">f4"), [2], CANVAS, preset="yolov5",
                               gt_classes=classes.numpy().astype(">i8"))  # fmt: skip
    assert big_endian.SerializeToString() == expected
    with pytest.raises(ValueError, match=r"gt_boxes: expected shape \[N, 4\], got \[2, 5\]"):
        build_request(torch.zeros(2, 5), [2], CANVAS, preset="yolov5")


@pytest.mark.parametrize("preset", ["retinanet_torchvision", "fasterrcnn_rpn_torchvision"])
def test_sparse_targets_from_the_service_without_densifying(two_servers, preset):
    """``densify=False``: the lists as sent (RPN sampling: the server lists the negatives
    and the ignored are found per image); densified anywhere, they equal the dense answer."""
    a, _ = two_servers
    classes = torch.tensor([4, 9])
    with TargetClient(a.address) as client:
        sparse = client.assign(BOXES, [2], CANVAS, preset=preset, gt_classes=classes, densify=False, seed=3)
        dense = client.assign(BOXES, [2], CANVAS, preset=preset, gt_classes=classes, seed=3)
        (streamed,) = client.stream([{"gt_boxes": BOXES, "gt_counts": [2], "gt_classes": classes, "seed": 3}],
                                    preset=preset, canvas=CANVAS, densify=False)  # fmt: skip
        with pytest.raises(ValueError, match="needs format='sparse'"):
            client.assign(BOXES, [2], CANVAS, preset=preset, format="dense", densify=False)
    assert isinstance(sparse, SparseTargets) and sparse.positive_anchors.numel() > 0
    for got in (sparse.to_dense(), streamed.to_dense(device="cpu")):
        for name in ("labels", "matched_gt", "deltas", "classes"):
            assert torch.equal(getattr(got, name), getattr(dense, name)), name


def test_errors_name_the_callers_image_ids(two_servers):
    a, _ = two_servers
    bad = torch.tensor([[10.0, 10.0, 60.0, 50.0], [30.0, 30.0, 30.0, 80.0]])  # image 1, box 0: x2 == x1
    with TargetClient(a.address) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(bad, [1, 1], CANVAS, preset="retinanet_torchvision", image_ids=[5121, 9140])
    assert "image 1 (id 9140), box 0: degenerate box" in info.value.details
    assert "image 1 (id 9140)" in info.value.field_violations[0][1]


def test_a_value_the_client_refuses_names_the_callers_image_id():
    """Refused before the call (a class past int32), a value is named by its image's id
    too, as the server's refusals are."""
    classes = torch.tensor([1, 2**32 + 7])
    with TargetClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match=re.escape("gt_classes[1] (image 1 (id 9140), box 0): 4294967303 does")):
            client.assign(BOXES, [1, 1], CANVAS, preset=PRESET, gt_classes=classes, image_ids=[5121, 9140])
        assert client.stats.calls == 0


def test_an_image_index_past_the_callers_ids_is_left_unnamed():
    """``naming_images`` on a text that names an image the caller gave no id for (an index
    past its ids) leaves that one as it is and names the others: an IndexError there would
    replace the error being reported."""
    text = "image 1, box 0: degenerate box; gt_counts[2]: negative; image_sizes[0, 1]: too large"
    assert client_module.naming_images(text, ["a", "b"]) == (
        "image 1 (id b), box 0: degenerate box; gt_counts[2]: negative; image_sizes[0, 1] (id a): too large"
    )


def test_client_counts_calls_retries_and_bytes(two_servers):
    a, _ = two_servers
    dead = f"127.0.0.1:{_dead_port()}"
    with TargetClient([dead, a.address], backoff=0.01) as client:
        response = client.assign_raw(build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision"))
        list(client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}] * 3, preset="retinanet_torchvision",
                           canvas=CANVAS))  # fmt: skip
        with pytest.raises(TargetServiceError):
            client.assign(BOXES, [1], CANVAS, preset="retinanet_torchvision")
        stats = client.stats
    assert stats.calls == 3 and stats.errors == 1
    assert stats.retries >= 1  # the first try went to the dead endpoint
    assert stats.responses == 1 + 3 and stats.response_bytes >= response.ByteSize() * 4
    assert stats.request_bytes > 0 and 0 < stats.max_latency_seconds <= stats.latency_seconds


def test_stats_add_up_every_answered_call_and_are_a_snapshot():
    """``stats`` adds up the answered unary calls (their request bytes, their latencies, the
    longest apart), and is a snapshot: one read earlier does not change under later calls."""
    request = build_request(BOXES, [2], CANVAS, preset=PRESET)
    answered = []

    def answer(raw: bytes, context) -> bytes:
        answered.append(raw)
        if len(answered) == 1:
            time.sleep(0.3)  # the first call is the longest
        return b""

    with fake_assigner(answer, _slow_stream) as address, TargetClient(address) as client:
        client.assign_raw(request)
        before = client.stats
        client.assign_raw(request)
        client.assign_raw(request)
        stats = client.stats
    assert (before.calls, before.responses, before.request_bytes) == (1, 1, request.ByteSize())
    assert (stats.calls, stats.responses, stats.request_bytes) == (3, 3, 3 * request.ByteSize())
    assert stats.max_latency_seconds == before.max_latency_seconds == before.latency_seconds >= 0.3
    assert stats.latency_seconds > stats.max_latency_seconds


def test_a_stream_that_ends_with_an_error_is_counted_as_one(two_servers):
    """A stream ended by a bad item's error (no ``return_exceptions``) counted no error,
    where the same request through ``assign`` counted one."""
    a, _ = two_servers
    bad = {"gt_boxes": torch.tensor([[50.0, 10.0, 10.0, 50.0]]), "gt_counts": [1]}
    with TargetClient(a.address) as client:
        with pytest.raises(TargetServiceError, match="degenerate box"):
            list(client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}, bad], preset=PRESET, canvas=CANVAS))
        answers = list(client.stream([bad], preset=PRESET, canvas=CANVAS, return_exceptions=True))
        stats = client.stats
    assert isinstance(answers[0], TargetServiceError)
    assert (stats.calls, stats.errors, stats.responses) == (2, 1, 3)


def test_requests_without_a_seed_sample_anew_only_where_the_config_samples():
    """Drawn in the caller's process, so torch.manual_seed (and a DataLoader's per-worker
    seeding) governs it; a config without sampling leaves it unset (identical bytes), and
    a seed given, 0 included, is sent."""
    rpn = [build_request(BOXES, [2], CANVAS, preset="fasterrcnn_rpn_torchvision").seed for _ in range(2)]
    assert rpn[0] != rpn[1]
    torch.manual_seed(7)
    first = build_request(BOXES, [2], CANVAS, preset="fasterrcnn_rpn_torchvision").seed
    torch.manual_seed(7)
    assert build_request(BOXES, [2], CANVAS, preset="fasterrcnn_rpn_torchvision").seed == first
    assert not build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision").HasField("seed")
    assert build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision", seed=0).HasField("seed")
    assert build_request(BOXES, [2], CANVAS, preset="fasterrcnn_rpn_torchvision", seed=np.int64(5)).seed == 5


# ---------------------------------------------------------------- review 2026-12-02: faults and bad input


def _items(count: int, pause: float = 0.0):
    for i in range(count):
        time.sleep(pause)
        yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"i{i}"}


def _stream_stopping_its_server(client, server: ServerThread, after: int, wait_s: float) -> dict:
    """Streams 40 items through ``client`` (blocking or asyncio) on a thread of its own and
    stops ``server`` at the ``after``-th answer, items still being sent: when
    (``"broke"``), the TargetServiceError the stream ends with (``"error"``) and when
    (``"ended"``), which must be within ``wait_s``."""
    outcome: dict = {}

    def on_answer(count: int) -> None:
        if count == after:
            server.stop(grace=0)
            outcome["broke"] = time.monotonic()

    def consume() -> None:
        items = _items(40, 0.01)
        try:
            if isinstance(client, TargetClient):
                for count, _ in enumerate(client.stream(items, preset=PRESET, canvas=CANVAS), 1):
                    on_answer(count)
            else:

                async def run() -> None:
                    count = 0
                    async for _ in client.stream(items, preset=PRESET, canvas=CANVAS):
                        count += 1
                        on_answer(count)

                asyncio.run(run())
        except TargetServiceError as error:
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(wait_s)
    assert not thread.is_alive(), f"the stream has not ended {wait_s} s on"
    return outcome


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_stream_whose_next_server_hangs_gives_up_within_the_clients_timeout(client_class):
    """After its server went away a stream moved to a server that accepts the call and
    never answers: the client's timeout bounded only the search between tries, so the
    stream waited for ever (45 s and counting, timeout=1.5)."""
    with _hung_server() as hung:
        first = ServerThread().start()
        client = client_class([first.address, hung.address], timeout=1.5)
        outcome = _stream_stopping_its_server(client, first, 5, 20)  # then it waits on the hung server
    error = outcome["error"]
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Within what is left of the timeout once the backoff before the new call is over (1.4-1.5 s
    # here, less on a loaded machine, whose reconnection takes longer).
    assert re.search(rf"{hung.address} answered none of the stream's requests within [01]\.\d s", error.details)
    assert outcome["ended"] - outcome["broke"] < 6


def test_an_async_stream_whose_takeover_is_cancelled_loses_no_request_of_an_async_source():
    """grpc.aio cancels a call's request feed with the call: when the watchdog cancelled a
    hung replacement while its feed awaited the caller's async generator, the cancellation
    ended the generator, and the stream ended without error after 6 answers of 12."""
    count = 12

    async def source():
        for i in range(count):
            yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"r{i}"}
            await asyncio.sleep(0.3)

    async def run(addresses, first) -> list[str]:
        ids = []
        async with AsyncTargetClient(addresses, timeout=10, try_timeout=1.0) as client:
            async for targets in client.stream(source(), preset="retinanet_torchvision", canvas=CANVAS):
                ids.append(targets)
                if len(ids) == 3:  # the first server drains mid-stream; the stream moves on
                    threading.Thread(target=first.stop, kwargs={"grace": 0.5}).start()
        return ids

    first = ServerThread().start()
    with _hung_server() as hung, ServerThread() as last, TargetClient(last.address) as client:
        answers = asyncio.run(run([first.address, hung.address, last.address], first))
        expected = _assign(client)
    assert len(answers) == count
    assert all(torch.equal(targets.labels, expected.labels) for targets in answers)


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_stream_request_over_the_clients_message_limit_fails_at_once_after_the_earlier_answers(
    two_servers, client_class
):
    """gRPC's asyncio client reported the refused write as INTERNAL, read as a server gone:
    the request was sent again to every endpoint for the whole timeout, then "no tritarget
    server answered"."""
    good, _ = two_servers
    big = torch.tensor([[10.0, 10.0, 60.0, 50.0]]).repeat(2000, 1)
    items = [{"gt_boxes": BOXES, "gt_counts": [2]}, {"gt_boxes": big, "gt_counts": [2000], "request_id": "big"}]
    answers = []

    async def consume(client) -> None:
        async with client:
            async for targets in client.stream(items, preset="retinanet_torchvision", canvas=CANVAS):
                answers.append(targets)

    client = client_class(good.address, max_message_bytes=20_000, timeout=30)
    start = time.monotonic()
    with pytest.raises(TargetServiceError) as info:
        if client_class is TargetClient:
            with client:
                answers.extend(client.stream(items, preset="retinanet_torchvision", canvas=CANVAS))
        else:
            asyncio.run(consume(client))
    assert time.monotonic() - start < 5
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a request of 32058 bytes (request_id 'big') is over this client's max_message_bytes (20000)" in str(
        info.value
    )
    assert len(answers) == 1 and (answers[0].labels == 1).any()


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_request_over_the_message_limit_ends_a_stream_that_moves_to_another_server(client_class):
    """After the refused request the next call read on: the requests after it were answered
    in its place (answers for s0, s2, s3 to requests s0, BIG, s2), then the error came."""
    small = [[10.0, 10.0, 60.0, 50.0], [40.0, 30.0, 120.0, 90.0], [5.0, 50.0, 45.0, 95.0]]
    items = [{"gt_boxes": torch.tensor([small[0]]), "gt_counts": [1]},
             {"gt_boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]).repeat(2000, 1), "gt_counts": [2000]},
             *({"gt_boxes": torch.tensor([box]), "gt_counts": [1]} for box in small[1:])]  # fmt: skip
    answers = []

    async def consume(client) -> None:
        async with client:
            async for targets in client.stream(items, preset="retinanet_torchvision", canvas=CANVAS):
                answers.append(targets)

    with _hung_server() as hung, ServerThread() as good:  # the stream moves once the hung server's try is up
        client = client_class([hung.address, good.address], timeout=10, try_timeout=1.0, max_message_bytes=20_000)
        with pytest.raises(TargetServiceError, match="over this client's max_message_bytes"):
            if client_class is TargetClient:
                with client:
                    answers.extend(client.stream(items, preset="retinanet_torchvision", canvas=CANVAS))
            else:
                asyncio.run(consume(client))
    expected = assign(items[0]["gt_boxes"], [1], CANVAS, presets.get("retinanet_torchvision"), backend="cpu")
    assert len(answers) == 1 and torch.equal(answers[0].labels, expected.labels)


def test_a_streams_first_server_that_hangs_is_left_for_the_next_within_try_timeout():
    """Only a call that took a stream over had a watchdog: a hung first endpoint held the
    stream for good (15 s and counting), while unary calls moved on in 0.5 s."""
    with _hung_server() as hung, ServerThread() as good:
        with TargetClient([hung.address, good.address], timeout=2, try_timeout=0.5) as client:
            start = time.monotonic()
            answers = list(client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}] * 3, preset="retinanet_torchvision",
                                         canvas=CANVAS))  # fmt: skip
            assert time.monotonic() - start < 5
            assert len(answers) == 3 and client.stats.resent == 3


def test_requests_sent_again_are_counted_once_each():
    """``stats.resent`` counted the unanswered requests again on every try to reconnect:
    a stream of 3 requests whose server hung, then a dead endpoint, read 6. Each request is
    counted once, also one first sent to a server that then hung too."""
    dead = f"127.0.0.1:{_dead_port()}"
    with _hung_server() as hung, ServerThread() as good:
        with TargetClient([hung.address, dead, good.address], timeout=5, try_timeout=0.5, backoff=0.01) as client:
            answers = list(client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}] * 3, preset="retinanet_torchvision",
                                         canvas=CANVAS))  # fmt: skip
            stats = client.stats
    assert len(answers) == 3 and stats.retries == 2 and stats.resent == 3

    def paced():  # the second hung server takes the first 4 again and the last 4 first
        for _ in range(8):
            yield {"gt_boxes": BOXES, "gt_counts": [2]}
            time.sleep(0.25)

    with _hung_server() as first, _hung_server() as second, ServerThread() as good:
        with TargetClient([first.address, second.address, good.address], timeout=30, try_timeout=1.0,
                          backoff=0.01) as client:  # fmt: skip
            answers = list(client.stream(paced(), preset="retinanet_torchvision", canvas=CANVAS))
            stats = client.stats
        taken = second.metrics.value("tritarget_requests_total", {"method": "AssignStream"})
    # Every request the second server took was sent again (the first's, and its own after).
    assert len(answers) == 8 and stats.retries == 2 and taken > 4 and stats.resent == taken


def test_the_watchdog_gives_a_request_sent_late_its_own_time():
    """The watchdog fired whenever any request was outstanding when it looked: a healthy
    server sent a request shortly before that look (the source had paused) was declared
    silent, DEADLINE_EXCEEDED, though it answered well within the timeout of the request."""
    first = ServerThread().start()
    slow = ServerThread(batching=BatchOptions(max_queue_delay_s=1.0)).start()  # answers after 1 s
    go = threading.Event()

    def source():
        yield {"gt_boxes": BOXES, "gt_counts": [2]}
        yield {"gt_boxes": BOXES, "gt_counts": [2]}
        go.wait()
        yield {"gt_boxes": BOXES, "gt_counts": [2]}

    def break_then_send() -> None:
        first.stop(grace=0.2)  # nothing outstanding: the stream moves to the slow server
        time.sleep(1.5)  # the request goes ~0.5 s before the watchdog's look at 2 s
        go.set()

    try:
        with TargetClient([first.address, slow.address], timeout=2.0) as client:
            answers = []
            for targets in client.stream(source(), preset="retinanet_torchvision", canvas=CANVAS):
                answers.append(targets)
                if len(answers) == 2:
                    threading.Thread(target=break_then_send).start()
        assert len(answers) == 3
    finally:
        slow.stop()


_CORNERS = torch.rand(500, 2, generator=torch.Generator().manual_seed(0)) * 40
_BIG_ITEM = {"gt_boxes": torch.cat([_CORNERS, _CORNERS + 10], 1), "gt_counts": [500]}  # 8 kB


def _async_stream_outcome(address: str, runs: int, timeout: float | None = None, **client_options):
    """(codes, retries) of ``runs`` async streams of 3,000 8-kB requests: the client still
    writes when the server's status comes."""

    async def once():
        async with AsyncTargetClient(address, **client_options) as client:
            try:
                async for _ in client.stream([_BIG_ITEM] * 3000, preset="retinanet_torchvision", canvas=(64, 64),
                                             timeout=timeout):  # fmt: skip
                    pass
            except TargetServiceError as error:
                return error, client.stats.retries
        return None, client.stats.retries

    return [asyncio.run(once()) for _ in range(runs)]


def test_an_async_stream_refused_while_it_writes_is_not_retried():
    """gRPC's asyncio client reports a stream that ended while it wrote as INTERNAL
    ("Internal error from Core"): a wrong token read as a server gone, and the requests
    were sent again, up to 85 times (8 runs of 10)."""
    with ServerThread(token="s3cret") as srv:
        outcomes = _async_stream_outcome(srv.address, runs=3, token="wrong")
    assert [(error.code, retries) for error, retries in outcomes] == [(grpc.StatusCode.UNAUTHENTICATED, 0)] * 3


def test_an_async_streams_deadline_passed_while_it_writes_is_deadline_exceeded():
    """... and a passed deadline as "INTERNAL: no tritarget server answered" (2 runs of 10)."""
    with ServerThread() as srv:
        outcomes = _async_stream_outcome(srv.address, runs=5, timeout=0.5)
    assert [error.code for error, _ in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5


def test_wait_until_ready_waits_through_not_serving():
    """A server that answers its health check NOT_SERVING (warming up, draining) is not
    ready: ``wait_until_ready`` waits on, says so when its timeout passes, and returns
    once the service turns SERVING."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set(client_module._SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with TargetClient(address) as client:
            with pytest.raises(TargetServiceError) as info:
                client.wait_until_ready(timeout=1.0)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "became SERVING within" in info.value.details and f"({address} is NOT_SERVING)" in info.value.details
            servicer.set(client_module._SERVICE, health_pb2.HealthCheckResponse.SERVING)
            client.wait_until_ready(timeout=10)
    finally:
        server.stop(0)


def test_wait_until_ready_moves_past_an_endpoint_that_never_answers():
    """Each health check had the whole timeout: a listener that never answers, first in
    turn, held the wait until it failed, with the second endpoint SERVING."""
    with socket.socket() as silent, ServerThread() as good:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections are accepted by the kernel, nothing ever answers
        with TargetClient([f"127.0.0.1:{silent.getsockname()[1]}", good.address]) as client:
            start = time.monotonic()
            client.wait_until_ready(timeout=5.0)
            assert time.monotonic() - start < 3


def test_an_endpoint_whose_health_check_failed_is_skipped_by_the_calls_after(two_servers, monkeypatch):
    """``wait_until_ready`` found the first endpoint dead: the calls that follow go to the
    one that answered, with no retry (as after a call's own failure)."""
    monkeypatch.setattr(client_module, "_COOLDOWN_S", 60.0)  # the whole test within it
    a, _ = two_servers
    with TargetClient([f"127.0.0.1:{_dead_port()}", a.address], retries=2, backoff=0.01) as client:
        client.wait_until_ready(timeout=10.0)
        for _ in range(4):  # round-robin alone would send two of these to the dead endpoint first
            assert (_assign(client).labels == 1).any()
        assert client.stats.retries == 0


def test_wait_until_ready_tries_until_its_timeout():
    """It gave up when the next backoff would pass the deadline: up to 0.6 s early."""
    with TargetClient(f"127.0.0.1:{_dead_port()}") as client:
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(TargetServiceError):
                client.wait_until_ready(timeout=2.0)
            assert time.monotonic() - start > 1.9


def test_a_refused_request_does_not_turn_calls_away_from_its_server(two_servers):
    """A bad request marked its endpoint failed: the next second of calls all went to the
    other server (10 of 10)."""
    a, b = two_servers
    with TargetClient([a.address, b.address]) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), [1], CANVAS, preset="retinanet_torchvision")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        before = _assigns(a), _assigns(b)
        for _ in range(10):
            _assign(client)
        assert (_assigns(a) - before[0], _assigns(b) - before[1]) == (5, 5)


def test_a_streams_fresh_sampling_seeds_repeat_with_torch_manual_seed(two_servers):
    """A stream built its requests on gRPC's thread, drawing seeds from torch's global
    generator there: runs differed, and so did the trainer's own draws in between."""
    a, _ = two_servers

    def run() -> tuple[list, list]:
        torch.manual_seed(0)
        labels, draws = [], []
        with TargetClient(a.address) as client:
            for targets in client.stream(_items(30), preset="fasterrcnn_rpn_torchvision", canvas=CANVAS):
                labels.append(targets.labels)
                draws.append(torch.rand(()).item())
        return labels, draws

    first, *others = (run() for _ in range(4))
    for other in others:
        assert other[1] == first[1]
        assert all(torch.equal(x, y) for x, y in zip(other[0], first[0]))


def test_an_async_client_serves_one_event_loop_after_another(two_servers):
    """Its channels belonged to the first loop: the second asyncio.run() failed with
    "RuntimeError: Event loop is closed"."""
    a, _ = two_servers
    client = AsyncTargetClient(a.address)

    async def call():
        return (await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")).labels

    assert torch.equal(asyncio.run(call()), asyncio.run(call()))


def _recording_channels(client: AsyncTargetClient, monkeypatch) -> tuple[list, list]:
    """The channels ``client`` opens, and those it closes, in order."""
    opened, closed = [], []
    open_channel = client._open

    def recorded(target):
        channel = open_channel(target)
        close = channel.close
        channel.close = lambda *args: closed.append(channel) or close(*args)
        opened.append(channel)
        return channel

    monkeypatch.setattr(client, "_open", recorded)
    return opened, closed


def _in_threads(*targets) -> list[BaseException]:
    """Runs each function in a thread of its own; what they raised."""
    failures = []

    def run(target) -> None:
        try:
            target()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return failures


@pytest.mark.parametrize("runs", ["asyncio.run", "run_until_complete"])
def test_an_async_client_shared_by_event_loops_in_threads_keeps_a_channel_for_each(two_servers, monkeypatch, runs):
    """Threads that each run an event loop, one client: each loop keeps its own channel
    and closes it. Swapped at every change of loop, a call on one loop let the other's
    channel go, unclosed, and opened a new connection: 59 for 60 alternating calls (and a
    loop run call by call, idle between them, lost its channel at each of the other's)."""
    a, _ = two_servers
    client = AsyncTargetClient(a.address)
    opened, closed = _recording_channels(client, monkeypatch)
    turns = [threading.Semaphore(1), threading.Semaphore(0)]  # the loops take turns, call by call
    labels = [[], []]

    async def call(me: int) -> None:
        labels[me].append((await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")).labels)

    def loop_of(me: int) -> None:
        if runs == "asyncio.run":  # the loop runs throughout, held while the other one calls

            async def calls() -> None:
                for _ in range(5):
                    turns[me].acquire()
                    await call(me)
                    turns[1 - me].release()
                await client.close()

            asyncio.run(calls())
            return
        loop = asyncio.new_event_loop()  # run call by call: idle while the other one calls
        try:
            for _ in range(5):
                turns[me].acquire()
                loop.run_until_complete(call(me))
                turns[1 - me].release()
            loop.run_until_complete(client.close())
        finally:
            loop.close()

    assert _in_threads(lambda: loop_of(0), lambda: loop_of(1)) == []
    assert [len(mine) for mine in labels] == [5, 5]
    assert all(torch.equal(label, labels[0][0]) for label in labels[0] + labels[1])
    assert len(opened) == 2 and closed == opened  # one per loop, each closed by its loop


def test_one_event_loops_close_leaves_another_loops_calls_alone():
    """A loop whose thread is done closes the shared client: another loop's call still
    waiting for a server that comes up goes on (a count of closes shared by the loops
    failed it CANCELLED, "the client was closed while this call waited")."""
    port = free_port()
    client = AsyncTargetClient(f"127.0.0.1:{port}", timeout=30)
    waiting, closed = threading.Event(), threading.Event()

    async def wait_for_the_server() -> None:
        waiting.set()
        await client.wait_until_ready()

    async def done_at_once() -> None:
        waiting.wait(10)
        async with client:
            pass
        closed.set()

    srv = ServerThread(port=port)
    starter = threading.Timer(1.5, srv.start)
    starter.start()
    try:
        failures = _in_threads(lambda: asyncio.run(wait_for_the_server()), lambda: asyncio.run(done_at_once()))
    finally:
        starter.join()
        srv.stop()
    assert closed.is_set() and failures == []


def test_an_endpoint_found_dead_is_skipped_by_the_later_calls_of_every_loop(two_servers, monkeypatch):
    """Each loop learns of a dead endpoint once: one retry per loop, however their calls
    interleave (failures marked in whichever loop's list was current were lost, and that
    loop's next call went to the dead endpoint again: 5 to 8 retries for 4 loops)."""
    monkeypatch.setattr(client_module, "_COOLDOWN_S", 60.0)  # the whole test within it
    a, _ = two_servers
    client = AsyncTargetClient([f"127.0.0.1:{_dead_port()}", a.address], retries=3, backoff=0.001)

    async def calls() -> None:
        async with client:
            for _ in range(30):
                await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")

    assert _in_threads(*[lambda: asyncio.run(calls())] * 4) == []
    assert client.stats.calls == 120 and client.stats.retries <= 4


def test_a_loop_that_ended_without_closing_lets_its_channels_go_at_anothers_close(two_servers):
    """Another loop's ``close()`` lets go of the channels of a loop that has closed: kept,
    they stayed open until a new loop came, and a fork meanwhile refused the child."""
    a, _ = two_servers
    client = AsyncTargetClient(a.address)

    async def call() -> None:
        await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")

    async def call_and_close() -> None:
        await call()
        first_done.wait(10)
        await call()
        await client.close()

    first_done = threading.Event()
    assert _in_threads(lambda: asyncio.run(call_and_close()), lambda: (asyncio.run(call()), first_done.set())) == []
    assert not any(here.channels for here in client._loops.values())  # what a fork checks


_LOOPS_KEPT = """
import asyncio, gc, sys, weakref
import torch
from tritarget.clients import AsyncTargetClient
client, loops = AsyncTargetClient(sys.argv[1]), []

async def call():
    loops.append(weakref.ref(asyncio.get_running_loop()))
    await client.assign(torch.tensor([[10.0, 10.0, 60.0, 50.0]]), [1], (96, 128), preset="retinanet_torchvision")

for _ in range(5):
    asyncio.run(call())
gc.collect()
print(sum(loop() is not None for loop in loops))
"""


def test_an_async_client_lets_each_finished_event_loop_go(two_servers):
    """Used by one asyncio.run() after another without close() (a trainer's step each),
    the client replaced the last loop's channels by new ones, and gRPC, which keeps every
    loop its calls ran on while any of its asyncio channels lives, kept each finished
    loop: 3 KB a run without end. In a process of its own: an asyncio server (this one's)
    keeps them too."""
    a, _ = two_servers
    kept = subprocess.run([sys.executable, "-c", _LOOPS_KEPT, a.address], capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split() == ["1"]  # the last run's loop, its channels still open


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 0, "5"])
def test_a_calls_timeout_is_checked(bad):
    """inf and NaN gave DEADLINE_EXCEEDED at once, "5" a TypeError from a sum, and
    wait_until_ready(inf) never returned from a server that is SERVING."""
    with TargetClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match=r"timeout: must be > 0 seconds \(or None: the client's\)"):
            _assign(client, timeout=bad)
        with pytest.raises(ValueError, match="timeout: must be > 0 seconds, got"):
            client.wait_until_ready(timeout=bad)
        with pytest.raises(ValueError, match=r"timeout: must be > 0 seconds \(or None: no deadline\)"):
            next(client.stream([], timeout=bad))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": ["127.0.0.1:1", None]}, "target: expected 'host:port' addresses, got None"),
        ({"target": []}, "target: give at least one address"),  # a ZeroDivisionError at the first call
        ({"target": "http://127.0.0.1:1"}, "target: 'http://127.0.0.1:1' is a URL; give 'host:port'"),
        # Addresses gRPC never dials: every call retried to its deadline, "is it running?".
        ({"target": "grpc://127.0.0.1:1"}, "target: 'grpc://127.0.0.1:1' is a URL; give 'host:port'"),
        ({"target": "a:1,b:2"}, "target: 'a:1,b:2' holds a space or a comma; give one 'host:port' per address"),
        ({"target": " a:1"}, "target: ' a:1' holds a space or a comma"),
        ({"target": "::1:50051"}, r"target: '::1:50051': an IPv6 address goes in brackets, '\[::1\]:50051'"),
        ({"target": "a:\uff15\uff10"}, "target: expected 'host:port' with a port in 1..65535"),  # fullwidth digits
        ({"target": "a:0"}, "target: expected 'host:port' with a port in 1..65535, got 'a:0'"),  # no server's port
        ({"target": "a:65536"}, "target: expected 'host:port' with a port in 1..65535, got 'a:65536'"),
        ({"target": "a:1", "tls": "false"}, "tls: expected True or False, got 'false'"),  # read as True
        ({"target": "a:1", "connections": 2.0}, "connections: must be an integer >= 1, got 2.0"),
        ({"target": "a:1", "options": {"grpc.lb_policy_name": "pick_first"}}, "options: expected a sequence of"),
        ({"target": "a:1", "root_certificates": "-----BEGIN"}, "root_certificates: expected the PEM file's bytes"),
        ({"target": "a:1", "timeout": "5"}, r"timeout: must be > 0 seconds \(or None: no deadline\), got '5'"),
        ({"target": "a:1", "backoff": float("inf")}, "backoff: must be finite seconds >= 0, got inf"),
        # gRPC's message limits are C ints: 2**31 is one past the largest.
        (
            {"target": "a:1", "max_message_bytes": 2**31},
            r"max_message_bytes: must be an integer in \[1, 2\*\*31\), got 2147483648",
        ),
        # A triple failed unpacking ("too many values to unpack"), naming no argument.
        (
            {"target": "a:1", "options": [("grpc.keepalive_time_ms", 1000, "x")]},
            r"options: expected a sequence of \(name, value\) pairs",
        ),
        # The client's own checks rely on its limits: a caller's would be taken over them.
        (
            {"target": "a:1", "options": [("grpc.max_receive_message_length", 1 << 30)]},
            "options: grpc.max_receive_message_length is set by the client's max_message_bytes= argument",
        ),
        # "Bearer" 1*SP token: a space inside the token is no part of a bearer token (RFC 6750).
        ({"target": "a:1", "token": "s3 cret"}, "token: a bearer token is printable ASCII without spaces"),
        # Empty once stripped: it sent no token, silently (None says that).
        ({"target": "a:1", "token": " \n"}, "token: the token is empty; give the token, or None for no token"),
    ],
)
def test_a_client_made_wrong_says_what_is_wrong(kwargs, message):
    """Each raised an AttributeError or TypeError naming no argument (some at the first call)."""
    for client_class in (TargetClient, AsyncTargetClient):
        with pytest.raises((ValueError, TypeError), match=message):
            client_class(**kwargs)
    for address in ("dns:///a:1", "[::1]:50051", "unix:/tmp/socket", "localhost:50051", "localhost:65535"):
        TargetClient(address).close()  # still taken


def test_a_stream_item_that_makes_no_request_is_named(two_servers):
    with TargetClient(two_servers[0].address) as client:
        for item, message in ((torch.zeros(1, 4), "stream item 0: expected a dict of assign arguments"),
                              ({"gt_boxes": BOXES}, "stream item 0: .*gt_counts"),
                              # torch's own "Could not infer dtype of NoneType", a RuntimeError
                              ({"gt_boxes": BOXES, "gt_counts": [2], "pad_sizes": [[96, None]]},
                               r"stream item 0: pad_sizes: expected integers \(a list or a tensor\)")):  # fmt: skip
            with pytest.raises(TypeError, match=message):
                list(client.stream([item], preset="retinanet_torchvision", canvas=CANVAS))


def test_arguments_that_build_no_request_are_named_as_the_caller_wrote_them(two_servers):
    """A stream item's ``timeout`` (the stream's own), ``image_ids`` or a misspelt key, a
    stream's or an assign's unknown keyword: each said ``build_request() got an unexpected
    keyword argument``, naming a function the caller never called (the stream's, at its
    first item, and after the call went out)."""
    good = {"gt_boxes": BOXES, "gt_counts": [2]}
    options = {"preset": "retinanet_torchvision", "canvas": CANVAS}
    items = (({"timeout": 5}, "stream item 1: unknown argument 'timeout' (one of stream()'s own arguments, "
                              "for all its items); a request's arguments are box_format, canvas, config, "),
             ({"densify": False}, "stream item 1: unknown argument 'densify' (one of stream()'s own arguments, "
                                  "for all its items); a request's arguments are "),
             ({"image_ids": [7]}, "stream item 1: unknown argument 'image_ids'; a request's arguments are "),
             ({"gt_clases": torch.tensor([1, 2])}, "stream item 1: unknown argument 'gt_clases'; "))  # fmt: skip

    async def async_calls(client: AsyncTargetClient) -> None:
        for extra, message in items:
            with pytest.raises(TypeError, match=re.escape(message)):
                [answer async for answer in client.stream([good, {**good, **extra}], **options)]
        with pytest.raises(TypeError, match=re.escape("stream: unknown argument 'sed'; a request's arguments")):
            client.stream([good], sed=3, **options)
        with pytest.raises(TypeError, match=re.escape("assign: unknown argument 'sed'; a request's arguments")):
            await client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", sed=3)

    with TargetClient(two_servers[0].address) as client:
        for extra, message in items:
            with pytest.raises(TypeError, match=re.escape(message)):
                list(client.stream([good, {**good, **extra}], **options))
        with pytest.raises(TypeError, match=re.escape("stream: unknown argument 'sed'; a request's arguments")):
            client.stream([good], sed=3, **options)  # when called, not at its first item
        with pytest.raises(TypeError, match=re.escape("assign: unknown argument 'sed'; a request's arguments")):
            client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", sed=3)
        assert client.stats.responses == len(items)  # item 0 of each stream, answered before item 1 raised

    async def run() -> None:
        async with AsyncTargetClient(two_servers[0].address) as client:
            await async_calls(client)

    asyncio.run(run())


def test_a_stream_item_densify_false_cannot_return_is_refused_before_it_is_sent(two_servers):
    """An item's own format='dense' (or return_max_iou) with densify=False was sent and
    computed, then its answer ended the stream, even with return_exceptions, unnamed."""
    good = {"gt_boxes": BOXES, "gt_counts": [2]}
    ready = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision", format="dense")
    dense = "stream item 1: densify=False returns SparseTargets: it needs format='sparse'"
    max_iou = "stream item 1: densify=False returns SparseTargets, which hold no max IoU"
    for item, message in (({**good, "format": "dense"}, dense), ({**good, "return_max_iou": True}, max_iou),
                          (ready, dense)):  # fmt: skip
        with TargetClient(two_servers[0].address) as client:
            answers = client.stream([good, item, good], preset="retinanet_torchvision", canvas=CANVAS,
                                    densify=False, return_exceptions=True)  # fmt: skip
            with pytest.raises(ValueError, match=re.escape(message)):
                list(answers)
            assert client.stats.request_bytes < 2 * ready.ByteSize()  # item 1 never sent


def test_image_ids_are_checked_before_the_call(two_servers):
    """Read only when the call failed: an int in place of a list replaced the server's
    error with "'int' object is not iterable", and a list of the wrong length was ignored."""
    with TargetClient(two_servers[0].address) as client:
        for ids, error, message in ((9140, TypeError, "image_ids: expected one id per image (a list), got int"),
                                    ([1, 2], ValueError, "image_ids: 2 ids for 1 images")):  # fmt: skip
            with pytest.raises(error, match=re.escape(message)):
                client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision", image_ids=ids)
        assert client.stats.calls == 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({1: 0.6}, "overrides: keys are dotted field names ('match.high'), got 1"),
    ({"match.high": np.float32(0.6)}, "overrides['match.high']: np.float32(0.6) cannot travel as JSON"),
    ({"match.high": {0.6}}, "overrides['match.high']: {0.6} cannot travel as JSON"),
])  # fmt: skip
def test_overrides_json_cannot_carry_are_named(overrides, message):
    """json.dumps's own errors named neither the argument nor the key."""
    with pytest.raises(TypeError, match=re.escape(message)):
        build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision", overrides=overrides)
    # Was protobuf's "Value out of range: 9223372036854775808", naming no field.
    with pytest.raises(ValueError, match=rf"seed: the service takes an int64, in \[-2\*\*63, 2\*\*63\), got {2**63}$"):
        build_request(BOXES, [2], CANVAS, preset="fasterrcnn_rpn_torchvision", seed=2**63)


def test_a_service_error_takes_its_codes_name():
    error = TargetServiceError("NOT_FOUND", "unknown preset")
    assert (error.code, error.details, str(error)) == (grpc.StatusCode.NOT_FOUND, "unknown preset",
                                                       "NOT_FOUND: unknown preset")  # fmt: skip
    with pytest.raises(ValueError, match="code: expected a grpc.StatusCode or its name, got 'NOPE'"):
        TargetServiceError("NOPE", "x")


@contextlib.contextmanager
def _server_that_hangs_after_one_batch():
    """A real server whose compute worker stops coming back after its first batch (a
    deadlocked worker): connections and calls are still taken."""
    gate = threading.Event()
    with ServerThread() as srv:
        batcher = srv.server.batcher
        assign_batch, batches = batcher._assign, itertools.count()

        def assign_then_hang(jobs):
            if next(batches):
                gate.wait()
            return assign_batch(jobs)

        batcher._assign = assign_then_hang
        try:
            yield srv
        finally:
            gate.set()


def _one_then_more(answered: threading.Event, more: int):
    """A stream's source: one request, then (once that is answered) ``more``."""
    yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": "first"}
    answered.wait(10)
    for i in range(more):
        yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"later-{i}"}


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_stream_whose_server_hangs_after_answering_moves_on_within_try_timeout(client_class):
    """The watchdog watched a call only until its first answer: a server that answered and
    then hung (its compute worker deadlocked) held the stream for good, whatever the
    timeouts. Now the requests it holds go to the next endpoint after try_timeout of silence."""
    answered = threading.Event()
    outcome: dict = {}
    with _server_that_hangs_after_one_batch() as hanging, ServerThread() as good:
        client = client_class([hanging.address, good.address], timeout=5, try_timeout=0.5)

        def consume() -> None:
            ids = []
            if client_class is TargetClient:
                for targets in client.stream(_one_then_more(answered, 3), preset="retinanet_torchvision",
                                             canvas=CANVAS):  # fmt: skip
                    ids.append(targets)
                    answered.set()
            else:

                async def run() -> None:
                    first = asyncio.Event()

                    async def source():  # the same, without blocking the event loop
                        yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": "first"}
                        await first.wait()
                        for i in range(3):
                            yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"later-{i}"}

                    async for targets in client.stream(source(), preset="retinanet_torchvision", canvas=CANVAS):
                        ids.append(targets)
                        first.set()

                asyncio.run(run())
            outcome["answers"], outcome["resent"] = len(ids), client.stats.resent

        start = time.monotonic()
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        thread.join(15)
        assert not thread.is_alive(), "the stream still waits on the server that hung"
    assert outcome == {"answers": 4, "resent": 3}
    assert time.monotonic() - start < 8


def test_a_stream_whose_only_server_hangs_after_answering_ends_deadline_exceeded():
    answered = threading.Event()
    with _server_that_hangs_after_one_batch() as hanging, TargetClient(hanging.address, timeout=1.0) as client:
        answers, start = 0, time.monotonic()
        with pytest.raises(TargetServiceError) as info:
            for _ in client.stream(_one_then_more(answered, 3), preset="retinanet_torchvision", canvas=CANVAS):
                answers += 1
                answered.set()
        assert time.monotonic() - start < 6
    assert answers == 1 and info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"{hanging.address} answered 1 of the stream's requests, then none for 1.0 s" in info.value.details


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_caller_that_holds_an_answer_longer_than_the_timeout_keeps_its_stream(client_class):
    """The watchdog watches a server that leaves requests unanswered while the stream is
    read, not a training loop that pauses (a checkpoint): the answers meanwhile wait
    unread, and the stream goes on, cut off by nothing."""
    items = [{"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"r{i}"} for i in range(4)]
    with ServerThread() as srv:  # each answer has 1 s (room on a busy machine); the caller holds each 2 s
        if client_class is TargetClient:
            with TargetClient(srv.address, timeout=1.0) as client:
                answers = []
                for targets in client.stream(items, preset="retinanet_torchvision", canvas=CANVAS):
                    answers.append(targets)
                    time.sleep(2.0)
                resent = client.stats.resent
        else:

            async def run():
                async with AsyncTargetClient(srv.address, timeout=1.0) as client:
                    answers = []
                    async for targets in client.stream(items, preset="retinanet_torchvision", canvas=CANVAS):
                        answers.append(targets)
                        await asyncio.sleep(2.0)
                    return answers, client.stats.resent

            answers, resent = asyncio.run(run())
    assert len(answers) == 4 and resent == 0


_STREAM_LEFT_OPEN = """
import sys, torch
from tritarget.clients import TargetClient
client = TargetClient(sys.argv[1], timeout=1.0)
item = {"gt_boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "gt_counts": [1]}
answers = client.stream([item] * 3, preset="retinanet_torchvision", canvas=(96, 128))
next(answers)  # one answer held: the stream, its call and its watchdog still open as the script ends
print("answered", flush=True)
"""


def test_a_script_that_leaves_a_stream_open_still_exits(two_servers):
    """A script that stops reading a stream and ends (a training run cut short) exits: the
    stream's watchdog, which looks again every ``timeout`` while the caller holds an
    answer, does not keep the process alive."""
    done = subprocess.run([sys.executable, "-c", _STREAM_LEFT_OPEN, two_servers[0].address], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "answered\n"), done.stderr


def test_a_stream_that_found_its_server_late_keeps_the_whole_timeout_once_answered():
    """After a break the first answer must come before the search for a server ends; the
    watchdog then kept that leftover (0.6 s of a 4 s timeout) for the rest of the call,
    and cut off a healthy server that paused 2 s: DEADLINE_EXCEEDED for the whole stream.
    Here the search has 5 s, the server starts after 1.6 and pauses 4 s."""
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    server = ServerThread(port=port, batching=BatchOptions(max_batch_images=1))  # a batch per request
    paused = threading.Event()

    def start_late() -> None:
        time.sleep(1.6)  # the stream searches for a server meanwhile
        server.start()
        compute = server.server.batcher._assign
        calls = itertools.count()

        def pause_once(jobs):
            if next(calls) == 2:
                paused.set()
                time.sleep(4.0)  # within the timeout, beyond what was left of the search
            return compute(jobs)

        server.server.batcher._assign = pause_once

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with TargetClient(f"127.0.0.1:{port}", timeout=5.0) as client:
            items = [{"gt_boxes": BOXES, "gt_counts": [2], "request_id": f"r{i}"} for i in range(4)]
            answers = list(client.stream(iter(items), preset="retinanet_torchvision", canvas=CANVAS))
        assert len(answers) == 4 and paused.is_set()
    finally:
        starter.join()
        server.stop()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 cannot tell a task's cancellation from a call's")
def test_a_callers_cancellation_as_the_watchdog_fires_is_not_lost():
    """The watchdog cancels a silent endpoint's call, and the stream moves on; the caller's
    own cancellation arriving within the milliseconds that takes (``wait_for`` with the
    same timeout) was taken for the watchdog's: the answer came back late instead. Here
    the caller cancels in the very moment the watchdog fires."""
    with _hung_server() as hung, ServerThread() as good:

        async def run():
            async with AsyncTargetClient([hung.address, good.address], timeout=30, try_timeout=0.5) as client:
                answers = client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}], preset=PRESET, canvas=CANVAS)
                waiting = asyncio.ensure_future(answers.__anext__())
                watchdog = client._watchdog

                def cancelled_as_it_fires(attempt, deadline, reconnect, unanswered, cancel, schedule):
                    def both():
                        cancel()
                        waiting.cancel()

                    return watchdog(attempt, deadline, reconnect, unanswered, both, schedule)

                client._watchdog = cancelled_as_it_fires
                try:
                    with pytest.raises(asyncio.CancelledError):
                        await waiting
                finally:
                    await answers.aclose()

        asyncio.run(run())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 does not count a task's cancellations")
def test_a_stream_fails_over_in_a_task_that_once_caught_a_cancellation():
    """A task that caught a cancellation without ``uncancel()`` counts it for good: read as
    the caller cancelling, a silent endpoint's call ended the stream (CancelledError)
    instead of moving on."""
    with _hung_server() as hung, ServerThread() as good:

        async def run():
            asyncio.current_task().cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)
            async with AsyncTargetClient([hung.address, good.address], timeout=30, try_timeout=0.5) as client:
                items = [{"gt_boxes": BOXES, "gt_counts": [2]}]
                return [t async for t in client.stream(items, preset=PRESET, canvas=CANVAS)]

        assert len(asyncio.run(run())) == 1


def _slow(request, context):
    time.sleep(1.0)
    return b""


def _slow_stream(requests, context):
    for _ in requests:
        time.sleep(1.0)
        yield b""


def test_closing_the_async_client_under_its_calls_fails_them_as_the_blocking_one_does():
    """grpc.aio cancels the calls of a channel being closed: they raised a bare
    CancelledError in tasks nobody cancelled (a TaskGroup reads that as its own
    cancellation); the blocking client raises TargetServiceError CANCELLED."""
    with fake_assigner(_slow, _slow_stream) as address:

        async def run(use):
            client = AsyncTargetClient(address, timeout=10)
            closing = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(client.close()))
            try:
                with pytest.raises(TargetServiceError, match="CANCELLED: the client was closed while this call waited"):
                    await use(client)
            finally:
                closing.cancel()
                await client.close()

        async def stream(client):
            return [t async for t in client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}], preset=PRESET,
                                                   canvas=CANVAS)]  # fmt: skip

        asyncio.run(run(lambda client: client.assign(BOXES, [2], CANVAS, preset=PRESET)))
        asyncio.run(run(stream))


def test_a_callers_cancellation_as_the_async_client_closes_stays_a_cancellation():
    """A task cancelled by its caller while the client is closed under it ends cancelled
    (``CancelledError``, which ``TaskGroup`` and ``wait_for`` read), not with the close's
    TargetServiceError CANCELLED: that one is for calls nobody cancelled. A call and a
    health check (``wait_until_ready``) alike."""
    from concurrent.futures import ThreadPoolExecutor

    request = build_request(BOXES, [2], CANVAS, preset=PRESET)

    def slow_check(raw: bytes, context) -> bytes:
        time.sleep(1.0)
        return b""

    health = grpc.server(ThreadPoolExecutor(4))
    health.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(slow_check)})])  # fmt: skip
    health_address = f"127.0.0.1:{health.add_insecure_port('127.0.0.1:0')}"
    health.start()

    async def run(address, use):
        client = AsyncTargetClient(address, timeout=10)
        call = asyncio.ensure_future(use(client))
        await asyncio.sleep(0.3)  # in flight, on a server that takes 1 s
        call.cancel()
        await client.close()  # before the task has seen its cancellation
        with pytest.raises(asyncio.CancelledError):
            await call

    try:
        with fake_assigner(_slow, _slow_stream) as address:
            asyncio.run(run(address, lambda client: client.assign_raw(request)))
        asyncio.run(run(health_address, lambda client: client.wait_until_ready(timeout=10)))
    finally:
        health.stop(0)


def test_an_async_stream_closed_early_stops_reading_its_async_source(two_servers):
    """A caller that stops reading an async stream (``aclose()``, a ``break`` out of ``async
    for``) while the stream waits on its async source for the next item: that read is
    cancelled there and then (the source's ``finally`` runs), not left pending until the
    event loop ends."""
    ended = []

    async def source():
        try:
            yield {"gt_boxes": BOXES, "gt_counts": [2]}
            await asyncio.sleep(60)  # a dataset slow to read its next item
            yield {"gt_boxes": BOXES, "gt_counts": [2]}
        finally:
            ended.append(True)

    async def run():
        async with AsyncTargetClient(two_servers[0].address, timeout=30) as client:
            stream = client.stream(source(), preset=PRESET, canvas=CANVAS)
            first = await anext(stream)
            await stream.aclose()
            for _ in range(50):  # the cancelled read's task runs the source's finally
                if ended:
                    break
                await asyncio.sleep(0.02)
            return first, list(ended)

    first, ended_before_the_loop_ended = asyncio.run(run())
    assert (first.labels == 1).any() and ended_before_the_loop_ended == [True]


# Calls that wait for a server, and what each must raise when the client is closed under it.
CALLS_THAT_WAIT = {
    "assign": lambda client: client.assign(BOXES, [2], CANVAS, preset=PRESET),
    "stream": lambda client: client.stream([{"gt_boxes": BOXES, "gt_counts": [2]}], preset=PRESET, canvas=CANVAS),
    "wait_until_ready": lambda client: client.wait_until_ready(timeout=20),
}
CLOSED_UNDER_IT = "CANCELLED: the client was closed while this call waited"


def _closed_while_waiting(address: str, name: str, after: float, **options) -> tuple[float, list]:
    """Seconds until the blocking call ``name`` ended CANCELLED, its client closed by another
    thread ``after`` seconds in, and the channels the client then held."""
    with TargetClient(address, **options) as client:
        threading.Timer(after, client.close).start()
        start = time.monotonic()
        with pytest.raises(TargetServiceError, match=CLOSED_UNDER_IT):
            result = CALLS_THAT_WAIT[name](client)
            if name == "stream":
                list(result)
        return time.monotonic() - start, list(client._channels)  # before the with's own close()


async def _closed_while_waiting_async(address: str, name: str, after: float, **options) -> tuple[float, list]:
    """The same with the asyncio client, closed by another task."""
    client = AsyncTargetClient(address, **options)
    asyncio.get_running_loop().call_later(after, lambda: asyncio.ensure_future(client.close()))
    start = time.monotonic()
    with pytest.raises(TargetServiceError, match=CLOSED_UNDER_IT):
        result = CALLS_THAT_WAIT[name](client)
        if name == "stream":
            [t async for t in result]
        else:
            await result
    took = time.monotonic() - start
    await asyncio.sleep(0.05)  # the close() task has finished
    return took, client._channels


def test_closing_a_client_stops_its_calls_that_look_for_a_server():
    """A call retrying a dead endpoint went on until its deadline after ``close()`` (4 s of
    a 4 s timeout) and opened channels again that nothing would close; unary calls,
    streams and health waits, blocking and asyncio, now end CANCELLED within a backoff."""
    dead = f"127.0.0.1:{_dead_port()}"
    options = dict(timeout=20, backoff=0.05, max_backoff=0.2)
    for name in CALLS_THAT_WAIT:
        took, channels = _closed_while_waiting(dead, name, 0.3, **options)
        assert took < 2 and channels == [], name
        took, channels = asyncio.run(_closed_while_waiting_async(dead, name, 0.3, **options))
        assert took < 2 and channels == [], name


def test_closing_a_client_during_a_call_in_flight_fails_it_cancelled():
    """close() while a call waited on the wire (a listener that never answers): the asyncio
    health wait raised asyncio.CancelledError, as if its task were cancelled (it was
    caught only when close() came between two checks: CI saw it once in ~10 runs), and
    the blocking client's calls and streams ended with gRPC's "Channel closed!"."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        for name in CALLS_THAT_WAIT:
            assert _closed_while_waiting(address, name, 0.5, timeout=20)[0] < 3, name
            assert asyncio.run(_closed_while_waiting_async(address, name, 0.5, timeout=20))[0] < 3, name


def test_a_client_closed_by_another_thread_fails_its_calls_cancelled(two_servers):
    """Threads sharing a client while another closes it got gRPC's ValueError ("Cannot
    invoke RPC on closed channel!") and IndexError among the CANCELLED errors."""
    a, _ = two_servers
    client = TargetClient(a.address, timeout=10)
    outcomes, stop = [], threading.Event()

    def call() -> None:
        while not stop.is_set():
            try:
                client.list_presets()
                outcomes.append("OK")
            except TargetServiceError as error:
                outcomes.append(error.code.name)
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        time.sleep(0.002)
        client.close()
    stop.set()
    for thread in threads:
        thread.join()
    client.close()
    assert set(outcomes) <= {"OK", "CANCELLED"} and "CANCELLED" in outcomes, sorted(set(outcomes))


# Run in a fresh interpreter: gRPC's state at a fork depends on what the process did
# before (servers in this one change it), and a deployment's trainer ran no server.
_FORK_WITH_AN_OPEN_CLIENT = """
import asyncio, os, sys, torch
from tritarget.clients import AsyncTargetClient

async def used(client):
    await client.assign(torch.tensor([[10.0, 10.0, 60.0, 50.0]]), [1], (96, 128), preset="retinanet_torchvision")

client = AsyncTargetClient(sys.argv[1])
asyncio.run(used(client))  # its channels stay open: never closed
pid = os.fork()
if pid == 0:
    try:
        asyncio.run(used(client))
        said = "no error"
    except BaseException as exc:
        said = f"{type(exc).__name__}: {exc}"
    print(f"child: {said}", flush=True)
    os._exit(0)
print(f"child status: {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)
os._exit(0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork()")
def test_an_async_client_open_at_a_fork_refuses_to_work_in_the_child():
    """gRPC's asyncio channels do not survive fork(): a child that used the parent's open
    client crashed (SIGSEGV, abort) or hung. It now refuses, naming what to do instead.
    The server is another process, as in a deployment."""
    server, port = serve_process("--backend", "cpu", "--warmup-canvas", "64", "64")
    try:
        done = subprocess.run([sys.executable, "-c", _FORK_WITH_AN_OPEN_CLIENT, f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        server.kill()
    assert "child status: 0" in done.stdout, (done.stdout, done.stderr)  # not killed by a signal
    assert ("child: RuntimeError: AsyncTargetClient: this process was forked while the client's channels were open"
            in done.stdout), done.stdout  # fmt: skip
    assert "spawn or forkserver" in done.stdout


# ---------------------------------------------------------------- review 2026-12-07: the stream's bookkeeping


class _Clock:
    """``time`` as the client module sees it, moved by hand (``monotonic`` only)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _numbered(count: int) -> list[pb.AssignRequest]:
    return [pb.AssignRequest(request_id=f"r{i}") for i in range(count)]


def _ids(requests) -> list[str]:
    return [request.request_id for request in requests]


def test_a_broken_streams_unanswered_requests_are_sent_again_once_each_in_order(monkeypatch):
    """What a stream sends again after a break: exactly the requests sent and not answered,
    oldest first, then the source where it stopped; ``stats.resent`` counts each once,
    however many servers it goes through, and the watchdog times the oldest unanswered
    one. One request more or less sent again gives every later answer to the wrong
    request (or no answer at all)."""
    clock = _Clock()
    monkeypatch.setattr(client_module, "time", clock)
    requests = _numbered(6)
    unanswered = client_module._Unanswered(iter(requests), lambda **counts: None, 1 << 20)
    first = unanswered.feed(0, [])
    for sent in range(4):  # r0..r3 handed to the first call, at t = 0..3
        clock.now = float(sent)
        assert next(first) is requests[sent]
    assert unanswered.oldest_sent() == 0.0
    assert _ids([unanswered.answered(), unanswered.answered()]) == ["r0", "r1"]
    assert unanswered.oldest_sent() == 2.0  # r2's, the oldest unanswered
    generation, resend, fresh = unanswered.restart()  # the first call broke
    assert (generation, _ids(resend), fresh) == (1, ["r2", "r3"], 2)
    assert next(first, None) is None  # the broken call's feed sends nothing more
    second = unanswered.feed(generation, resend)
    assert _ids(next(second) for _ in range(3)) == ["r2", "r3", "r4"]
    generation, resend, fresh = unanswered.restart()  # the second broke before answering: r4 is new to it
    assert (generation, _ids(resend), fresh) == (2, ["r2", "r3", "r4"], 1)
    assert _ids(unanswered.feed(generation, resend)) == ["r2", "r3", "r4", "r5"]
    assert _ids(unanswered.answered() for _ in range(4)) == ["r2", "r3", "r4", "r5"]
    assert unanswered.complete() and unanswered.oldest_sent() is None
    assert unanswered._resent == 0  # answered requests are forgotten


def test_one_request_object_streamed_several_times_is_counted_once_each_time_it_is_sent_again():
    """``client.stream([request] * 3)``: the three sends are three requests. Counted by
    object (``id``), the first break counted 3 sent again, a second break after one answer
    2 more: 5 for 3 requests."""
    same = pb.AssignRequest(request_id="same")
    unanswered = client_module._Unanswered(iter([same] * 3), lambda **counts: None, 1 << 20)
    assert list(unanswered.feed(0, [])) == [same] * 3
    generation, resend, fresh = unanswered.restart()
    assert (len(resend), fresh) == (3, 3)
    unanswered.answered()
    generation, resend, fresh = unanswered.restart()
    assert (len(resend), fresh) == (2, 0)


@pytest.mark.parametrize("again", [False, True], ids=["next-call", "call-after-next"])
def test_a_request_read_as_its_call_broke_goes_on_the_next_call_exactly_once(again):
    """A call's feed may be reading the source when the call breaks: that request belongs
    to no live call, and is sent first by the next feed, once; if that call too breaks
    before sending anything, it is among the ones the call after sends again, once.
    Dropped, its answer went to the request after it; sent twice, there was one answer
    more than requests."""
    requests = _numbered(3)
    restarted = []

    def source():
        yield requests[0]
        restarted.append(unanswered.restart())  # the call broke while its feed read the next request
        yield from requests[1:]

    unanswered = client_module._Unanswered(source(), lambda **counts: None, 1 << 20)
    old = unanswered.feed(0, [])
    assert next(old) is requests[0]
    assert next(old, None) is None  # read for a broken call: not sent on it
    generation, resend, _ = restarted[0]
    assert (generation, _ids(resend)) == (1, ["r0"])
    if again:
        generation, resend, _ = unanswered.restart()
        assert (generation, _ids(resend)) == (2, ["r0", "r1"])
    assert _ids(unanswered.feed(generation, resend)) == ["r0", "r1", "r2"]
    assert unanswered.outstanding() == 3


def test_a_stream_request_of_exactly_the_message_limit_is_sent_and_counted():
    """gRPC refuses a message *larger* than its limit: a stream's request of exactly
    ``max_message_bytes`` is sent, its bytes counted (``stats.request_bytes``); one byte
    over ends the feed before it is sent, the stream's failure RESOURCE_EXHAUSTED naming
    both sizes, and counts nothing."""
    request = pb.AssignRequest(request_id="r0", gt_counts=[1, 2])
    size, counted = request.ByteSize(), []
    fits = client_module._Unanswered(iter([request]), lambda **counts: counted.append(counts), size)
    assert list(fits.feed(0, [])) == [request]
    assert fits.failure is None and fits.outstanding() == 1 and counted == [{"request_bytes": size}]
    over = client_module._Unanswered(iter([request]), lambda **counts: counted.append(counts), size - 1)
    assert list(over.feed(0, [])) == [] and over.outstanding() == 0 and len(counted) == 1
    assert isinstance(over.failure, TargetServiceError) and over.failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (f"a request of {size} bytes (request_id 'r0') is over this client's max_message_bytes ({size - 1})"
            in over.failure.details)  # fmt: skip


class _Outstanding:
    """The watchdog's view of a stream's requests: when the oldest unanswered was sent."""

    oldest: float | None = None

    def oldest_sent(self) -> float | None:
        return self.oldest


class _Look:
    """A look the watchdog scheduled (never run by itself: the test calls ``_check``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.cancelled = seconds, False

    def cancel(self) -> None:
        self.cancelled = True


def _watched(clock: _Clock, first: float, steady: float, **kwargs):
    """A watchdog on a hand-moved clock: (watchdog, outstanding, its looks, when it cancelled the call)."""
    outstanding, looks, cancels = _Outstanding(), [], []

    def schedule(seconds, callback):
        looks.append(_Look(seconds))
        return looks[-1]

    watchdog = client_module._Watchdog(first, steady, outstanding, lambda: cancels.append(clock.now), schedule,
                                       takeover=kwargs.get("takeover", False))  # fmt: skip
    return watchdog, outstanding, looks, cancels


def test_the_watchdog_fires_when_the_oldest_request_has_waited_its_time_and_not_before(monkeypatch):
    """A takeover's first answer is due within what is left of the search (``first``), each
    later one within ``steady``, counted from the later of the request's sending and the
    caller's return for it; the clock rests while the caller holds an answer. A look
    that comes early is followed by one when the request is due, not a whole period
    later; a watchdog stopped with its call looks no more."""
    clock = _Clock()
    monkeypatch.setattr(client_module, "time", clock)
    watchdog, outstanding, looks, cancels = _watched(clock, 1.0, 4.0, takeover=True)
    assert [look.seconds for look in looks] == [1.0]
    outstanding.oldest = 0.25  # the source's first request came a little after the call opened
    clock.now = 1.0
    watchdog._check()
    assert not watchdog.fired and looks[-1].seconds == pytest.approx(0.25)  # due at 1.25
    clock.now = 1.5
    watchdog._check()
    assert watchdog.fired and cancels == [1.5]

    clock.now = 10.0
    watchdog, outstanding, looks, cancels = _watched(clock, 1.0, 4.0)
    outstanding.oldest = 10.0
    clock.now = 10.5
    watchdog.answered()  # the caller holds the answer (a checkpoint) until 20.0; the next request waits
    assert watchdog.seconds == 4.0 and watchdog.answers == 1
    outstanding.oldest = 10.1
    clock.now = 20.0
    watchdog._check()
    assert not watchdog.fired and looks[-1].seconds == 4.0
    watchdog.reading()
    clock.now = 23.0
    watchdog._check()
    assert not watchdog.fired and looks[-1].seconds == pytest.approx(1.0)  # due 4 s after the caller came back
    clock.now = 24.0
    watchdog._check()
    assert watchdog.fired and cancels == [24.0]

    watchdog, outstanding, looks, cancels = _watched(clock, 1.0, 4.0)
    outstanding.oldest, clock.now = 24.0, 30.0
    watchdog.stop()
    assert looks[-1].cancelled
    watchdog._check()  # a look already under way as the call ended
    assert not watchdog.fired and not cancels and len(looks) == 1


def test_a_silent_servers_error_says_whether_it_had_answered_or_took_the_stream_over():
    def silent(answers: int, takeover: bool) -> str:
        watchdog = client_module._Watchdog(1.0, 2.0, _Outstanding(), None, lambda seconds, callback: _Look(seconds),
                                           takeover=takeover)  # fmt: skip
        for _ in range(answers):
            watchdog.answered()
        return client._silent(0, watchdog).details()

    with TargetClient("127.0.0.1:1") as client:
        assert silent(0, False) == "127.0.0.1:1 answered none of the stream's requests within 1.0 s"
        assert silent(0, True) == ("127.0.0.1:1 answered none of the stream's requests within 1.0 s of taking over "
                                   "from the server that went away")  # fmt: skip
        assert silent(2, True) == "127.0.0.1:1 answered 2 of the stream's requests, then none for 2.0 s"


def test_a_streams_takeover_must_answer_before_the_streams_own_deadline():
    with TargetClient("127.0.0.1:1", try_timeout=10.0) as client:
        now = time.monotonic()
        watchdog = client._watchdog(1, now + 0.5, now + 5.0, None, None, lambda seconds, callback: _Look(seconds))
    assert 0 < watchdog.seconds <= 0.5


@contextlib.contextmanager
def _answers_then_goes_away(per_call: int, pause: float):
    """A server whose every stream answers ``per_call`` requests, ``pause`` s apart (true
    answers, from a real server), then ends UNAVAILABLE on reading one more, as a replica
    restarted under it; yields its address and the request_ids each call read."""
    calls: list[list[str]] = []
    with ServerThread() as real, TargetClient(real.address) as helper:

        def answer(raw, context):
            return helper.assign_raw(pb.AssignRequest.FromString(raw)).SerializeToString()

        def answer_then_go_away(raws, context):
            read = []
            calls.append(read)
            for raw in raws:
                request = pb.AssignRequest.FromString(raw)
                read.append(request.request_id)
                if len(read) > per_call:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
                time.sleep(pause)
                yield helper.assign_raw(request).SerializeToString()

        with fake_assigner(answer, answer_then_go_away) as address:
            yield address, calls


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_stream_that_breaks_again_after_answering_for_a_while_searches_afresh(client_class):
    """Answers reset a stream's attempts: each break searches for a server for the client's
    timeout from that break, and waits the first backoff. Counted from the first break,
    the second (its search long over) gave up at once, though the server was back. Each
    request is answered once, in order, and every call's watchdog stops with it."""
    items = [{"gt_boxes": BOXES + i, "gt_counts": [2], "request_id": f"r{i}"} for i in range(7)]
    expected = [assign(item["gt_boxes"], [2], CANVAS, presets.get(PRESET), backend="cpu") for item in items]
    watchdogs = []
    with _answers_then_goes_away(per_call=3, pause=0.35) as (address, calls):  # each call lasts > the timeout
        client = client_class(address, timeout=0.8, backoff=0.01)
        make_watchdog = client._watchdog

        def recorded(*args):
            watchdogs.append(make_watchdog(*args))
            return watchdogs[-1]

        client._watchdog = recorded
        if client_class is TargetClient:
            with client:
                answers = list(client.stream(items, preset=PRESET, canvas=CANVAS))
        else:

            async def run():
                async with client:
                    return [targets async for targets in client.stream(items, preset=PRESET, canvas=CANVAS)]

            answers = asyncio.run(run())
    assert calls == [["r0", "r1", "r2", "r3"], ["r3", "r4", "r5", "r6"], ["r6"]]
    assert len(answers) == 7
    assert all(torch.equal(got.labels, want.labels) and torch.allclose(got.deltas, want.deltas, atol=1e-5)
               for got, want in zip(answers, expected, strict=True))  # fmt: skip
    assert (client.stats.retries, client.stats.resent, client.stats.errors) == (2, 4, 0)
    assert len(watchdogs) == 3 and all(watchdog._handle is None for watchdog in watchdogs)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 does not count a task's cancellations")
def test_an_async_stream_read_on_from_another_task_still_fails_over():
    """The caller's cancellations are counted on the task that reads the stream now: a
    stream whose first answer was read in a task of its own (``asyncio.wait_for`` runs
    each read in one on 3.11) and the rest in a task that had once caught a cancellation
    took the watchdog's cancellation of its silent server for the caller's, and ended
    with CancelledError instead of moving to the next endpoint."""
    with _server_that_hangs_after_one_batch() as hanging, ServerThread() as good:

        async def run():
            answered = asyncio.Event()

            async def source():
                yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": "first"}
                await answered.wait()
                yield {"gt_boxes": BOXES, "gt_counts": [2], "request_id": "later"}

            async with AsyncTargetClient([hanging.address, good.address], timeout=30, try_timeout=0.5) as client:
                stream = client.stream(source(), preset=PRESET, canvas=CANVAS)
                answers = [await asyncio.ensure_future(stream.__anext__())]
                answered.set()
                asyncio.current_task().cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(1)
                answers += [targets async for targets in stream]
                return len(answers), client.stats.resent

        assert asyncio.run(run()) == (2, 1)


@pytest.mark.parametrize("client_class", [TargetClient, AsyncTargetClient])
def test_a_stream_whose_server_goes_away_for_good_gives_up_within_the_clients_timeout(client_class):
    """After a break the search for a server lasts the client's timeout from the break,
    over every try: counted afresh at each failed try (or each try counted as the
    first), a stream whose only server was gone for good tried to reconnect for ever."""
    server = ServerThread().start()
    client = client_class(server.address, timeout=1.0, backoff=0.01)
    outcome = _stream_stopping_its_server(client, server, 2, 10)  # then it looks for a server
    error = outcome["error"]
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"no tritarget server answered at {server.address}" in error.details
    assert outcome["ended"] - outcome["broke"] < 4
