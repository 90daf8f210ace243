"""Graceful shutdown (calls in flight finish) and the CLI: serve --port 0, SIGTERM, up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service_harness import (
    ServerThread,
    batching,
    free_port,
    read_until,
    spawn_cli,
    stalled_call,
    unread_call,
    until,
)

from support import closed_pipe, without_stdout
from tritarget.clients import TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.kernels import assign, presets
from tritarget.kernels.workload import coco_like_batch
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service.backend import Batcher, BatchOptions
from tritarget.service.cli import (
    _demo_address,
    _server_options,
    _server_token,
    _usable_cores,
    build_parser,
    front_ends,
    main,
)
from tritarget.service.server import ServerOptions, bind_refusal, hold_port, host_port

CANVAS = (96, 128)
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])


def test_graceful_shutdown_finishes_calls_in_flight():
    gate = threading.Event()
    srv = ServerThread().start()

    async def occupy():
        asyncio.ensure_future(srv.server.batcher.run(gate.wait))

    result = {}
    try:
        srv.run(occupy())
        client = TargetClient(srv.address, retries=0, timeout=30)

        def call():
            result["targets"] = client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")

        caller = threading.Thread(target=call)
        caller.start()
        until(lambda: srv.metrics.value("tritarget_queued_images") == 1)  # queued behind the busy worker
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=20), srv.loop)
        time.sleep(0.3)
        with TargetClient(srv.address, retries=0, timeout=5) as late:
            with pytest.raises(TargetServiceError) as info:
                late.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(srv.address) as channel:  # a fresh connection: load balancers probe so
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done()
        gate.set()
        caller.join(30)
        stopping.result(30)
        ref = assign(BOXES, [2], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
        assert torch.equal(result["targets"].labels, ref.labels)
        client.close()
    finally:
        gate.set()
        srv.server = None
        srv.stop()


def test_a_stop_that_cuts_calls_off_waits_for_no_batch():
    """Past the grace period the calls are cut off, and nobody waits for their targets: the
    stop returned only once the batch computing ended (with the reference backend and
    2,000 boxes a review measured 32 s after SIGTERM with --grace 2, a second signal
    changing nothing), and the batch queued behind it then ran too. The stop takes the
    grace period once (gRPC's own stop gets what is left of it, not a grace period of its
    own), and the compute workers end once their batch does instead of serving on for a
    server that is gone."""
    before = set(threading.enumerate())
    gate = threading.Event()
    srv = ServerThread().start()
    workers = {thread for thread in set(threading.enumerate()) - before if thread.name.startswith("tritarget-compute")}

    async def occupy():
        asyncio.ensure_future(srv.server.batcher.run(gate.wait))

    try:
        srv.run(occupy())
        computed = srv.metrics.value("tritarget_compute_seconds_count")
        failed = []

        def call() -> None:
            try:
                client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
            except TargetServiceError as exc:
                failed.append(exc.code)

        with TargetClient(srv.address, retries=0, timeout=30) as client:
            caller = threading.Thread(target=call)
            caller.start()
            until(lambda: srv.metrics.value("tritarget_queued_images") == 1)  # queued behind the busy worker
            started = time.monotonic()
            srv.run(srv.server.stop(grace=3.0), timeout=20)
            took = time.monotonic() - started
            assert 2.9 < took < 5.5 and not gate.is_set(), took  # not two grace periods (6 s), nor the batch
            caller.join(20)
            assert failed == [grpc.StatusCode.UNAVAILABLE], failed
        assert workers and any(thread.is_alive() for thread in workers)  # the batch still computes
        gate.set()
        until(lambda: not any(thread.is_alive() for thread in workers), timeout=5)
        assert srv.metrics.value("tritarget_compute_seconds_count") == computed  # the queued batch never ran
    finally:
        gate.set()
        srv.server = None
        srv.stop()


def test_an_open_reflection_stream_does_not_hold_a_graceful_stop():
    """A grpcurl session keeps its reflection stream open: with every call answered, the
    stop does not wait out the grace period for it."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = ServerThread().start()
    asks = threading.Event()

    def ask_once():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        asks.wait(30)  # the stream stays open

    try:
        with grpc.insecure_channel(srv.address) as channel:
            session = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask_once())
            assert next(session).list_services_response.service
            started = time.monotonic()
            srv.stop(grace=10.0)
            assert time.monotonic() - started < 3
    finally:
        asks.set()
        srv.stop()


@pytest.mark.parametrize("hurried", [False, True], ids=["grace", "second signal"])
def test_a_batch_whose_callers_went_away_holds_the_stop_no_longer_than_the_grace_period(hurried):
    """No call in flight (its caller's deadline passed), its batch still computing: the
    stop waited for the batch without bound (10 s past --grace 1 in a review's run), and
    a second signal changed nothing."""
    gate = threading.Event()
    srv = ServerThread().start()
    hurry = asyncio.Event()

    async def occupy():
        asyncio.ensure_future(srv.server.batcher.run(gate.wait))

    async def stop():
        if hurried:
            asyncio.get_running_loop().call_later(0.2, hurry.set)
        await srv.server.stop(grace=30.0 if hurried else 0.5, hurry=hurry)

    try:
        srv.run(occupy())
        started = time.monotonic()
        srv.run(stop(), timeout=20)
        assert time.monotonic() - started < 5 and not gate.is_set()
    finally:
        gate.set()
        srv.server = None
        srv.stop()


# SIGHUP (a closed terminal or ssh session) killed the server without a drain (exit 129).
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_serve_port_zero_and_stop_on_signal(sig):
    process = spawn_cli("serve", "--port", "0", "--backend", "reference", "--warmup-canvas", "64", "64")
    try:
        read_until(process, r"1 front-end process\(es\) \(--workers auto: \d+ cores, port 0\)")
        match, _ = read_until(process, r"serving on 127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        # The reference backend never computes on the event loop.
        settings, _ = read_until(
            process,
            r"batching: up to (\d+) images per batch, 0 ms queue delay, (\d+) compute "
            r"worker\(s\) x \d+ torch thread\(s\), no inline compute",
        )
        defaults = BatchOptions().resolved(torch.device("cpu"))  # the defaults it runs with are printed
        assert settings.groups() == (str(defaults.max_batch_images), str(defaults.compute_workers))
        read_until(process, r"health is SERVING")
        with TargetClient(f"127.0.0.1:{port}") as client:
            assert (client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision").labels == 1).any()
        process.send_signal(sig)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert "stopped" in out
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(("files", "cores"), [
    ({}, 64),  # not in a container: every core it may run on
    ({"cpu.max": "max 100000\n"}, 64),  # cgroup v2, no limit
    ({"cpu.max": "250000 100000\n"}, 3),  # a Kubernetes limit of 2.5 CPUs: 3 threads, not 64
    ({"cpu.max": "20000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 64),  # cgroup v1, no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({"cpu.max": "garbled"}, 64),
])  # fmt: skip
def test_usable_cores_follow_a_containers_cpu_quota(files, cores, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _usable_cores(str(tmp_path)) == cores


@pytest.mark.parametrize("command", ["serve", "up"])
def test_serve_and_up_give_torch_no_more_threads_than_the_usable_cores(command, monkeypatch):
    """Under a container's CPU quota torch counts the node's cores: threads for all of them
    spend the quota early in each period and then stall (``up`` gave torch them all)."""
    from tritarget.service import cli, server

    seen = []

    async def serve(options, **kwargs):  # stands in for the server: what matters is before it
        seen.append(torch.get_num_threads())

    threads = torch.get_num_threads()
    monkeypatch.setattr(cli, "_usable_cores", lambda: 1)
    monkeypatch.setattr(server, "serve", serve)
    try:
        assert main([command, "--port", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]


def test_an_openmp_wait_policy_given_in_the_environment_wins(monkeypatch):
    """serve and up make idle OpenMP threads sleep, unless OMP_WAIT_POLICY says otherwise."""
    from tritarget.service import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_up_takes_a_demo_batch_as_large_as_the_request_bound(monkeypatch, capsys):
    """``up --batch N`` with ``--max-request-images N``: a demo request the server takes; one
    image more is refused before the server starts."""
    from tritarget.service import server

    async def serve(options, **kwargs):  # stands in for the server: the check is before it
        pass

    threads = torch.get_num_threads()
    monkeypatch.setattr(server, "serve", serve)
    try:
        assert main(["up", "--port", "0", "--batch", "4", "--max-request-images", "4"]) == 0
        assert main(["up", "--port", "0", "--batch", "5", "--max-request-images", "4"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().err == "tritarget up: --batch 5 is over --max-request-images 4\n"


def test_front_ends_follow_the_cores_on_a_fixed_port():
    assert [front_ends(None, 50051, cores) for cores in (1, 2, 4, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    assert front_ends(None, 0, 16) == 1  # port 0: each process would get a port of its own
    assert front_ends(3, 50051, 2) == 3  # asked for: as given
    assert front_ends(1, 0, 16) == 1  # one process may take any free port
    with pytest.raises(ValueError, match="--workers: must be >= 1, got 0"):
        front_ends(0, 50051, 16)


def test_cli_up_prints_a_summary_and_keeps_serving():
    process = spawn_cli("up", "--port", "0", "--backend", "reference", "--warmup-canvas", "64", "64", "--batch", "3")
    try:
        match, out = read_until(process, r"service running on 127\.0\.0\.1:(\d+)", timeout=180)
        rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", out, flags=re.M)
        assert len(rows) == 3
        for _, _, pos, neg, ign in rows:
            assert sum(int(v.replace(",", "")) for v in (pos, neg, ign)) == 201_600
        sparse_bytes, dense_bytes = re.search(
            r"SPARSE response ([\d,]+) bytes \(DENSE would be ([\d,]+),", out
        ).groups()
        port = int(match.group(1))
        assert process.poll() is None
        assert re.search(r"tritarget\.access.*Assign id='.*' images=3 boxes=\d+ OK", out), out  # the demo's call
        with TargetClient(f"127.0.0.1:{port}") as client:
            assert len(client.list_presets()) == len(presets.names())
            # The demo's sizes are those of its batch's responses on the wire, SPARSE and DENSE.
            boxes, counts, classes = coco_like_batch(3, seed=0, canvas=(800, 1344))
            for form, size in (("sparse", sparse_bytes), ("dense", dense_bytes)):
                request = build_request(boxes, counts, (800, 1344), preset="retinanet_torchvision",
                                        gt_classes=classes, format=form)  # fmt: skip
                assert client.assign_raw(request).ByteSize() == int(size.replace(",", ""))
        read_until(process, r"ListPresets id='' images=0 boxes=0 OK", timeout=30)  # `--no-access-log` turns it off
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_up_stops_with_an_error_when_its_demo_request_fails():
    """`up` is there to show targets coming back: a demo request the server refuses (more
    boxes than its limit; more images is refused before the server starts) is printed and
    ends it with exit code 1, not a silent server."""
    process = spawn_cli("up", "--port", "0", "--backend", "reference", "--warmup-canvas", "64", "64", "--batch", "3",
                        "--max-request-boxes", "2")  # fmt: skip
    try:
        out, _ = process.communicate(timeout=180)  # stderr merged
        assert process.returncode == 1, out
        assert "the demo request failed" in out and "boxes is over the server's limit of 2" in out
    finally:
        if process.poll() is None:
            process.kill()


def test_shutdown_does_not_wait_out_the_queue_delay(caplog):
    """A request waiting for its batch to fill (a 60 s queue delay) is computed at once when
    the server starts shutting down: nothing can arrive to fill it, and waiting would
    outlast the grace period, after which the call would be cut off."""
    srv = ServerThread(batching=batching(max_queue_delay_s=60.0), grace_s=5.0).start()
    result = {}
    with TargetClient(srv.address, retries=0, timeout=30) as client:

        def call():
            result["targets"] = client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")

        caller = threading.Thread(target=call)
        caller.start()
        until(lambda: srv.server.batcher.queued_images == 1)
        start = time.monotonic()
        srv.stop()
        caller.join(30)
    assert time.monotonic() - start < 4 and "grace period" not in caplog.text
    ref = assign(BOXES, [2], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
    assert torch.equal(result["targets"].labels, ref.labels)


def test_an_idle_server_stops_without_a_grace_period_warning():
    """Nothing in flight: waiting a zero grace period succeeds at once (asyncio.wait_for
    with a zero timeout would time out even on a set event)."""
    with ServerThread() as srv:
        assert srv.run(srv.server.servicer.wait_settled(0.0)) is True


def test_a_response_its_caller_does_not_have_yet_holds_the_shutdown():
    """A unary handler returns before gRPC has sent its response; stopping gRPC as soon as
    the handlers were done dropped DENSE answers of tens of MB already logged OK (6 of
    16 in a reviewer's SIGTERM run). Shutdown waits for the bytes held for them too."""
    with ServerThread() as srv:
        servicer = srv.server.servicer
        srv.run(_call_soon(servicer._hold, 40 << 20))  # a response not yet taken by its caller
        assert srv.run(servicer.wait_settled(0.3)) is False
        srv.run(_call_soon(servicer._let_go, 40 << 20))  # its call ended
        assert srv.run(servicer.wait_settled(0.3)) is True


def test_an_open_stream_keeps_the_server_unsettled_after_other_calls_end():
    """Calls in flight are counted: another call that begins and ends while a stream is
    open (idle, like a data loader's between epochs) leaves the server unsettled."""
    more = threading.Event()
    request = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision")

    def requests():
        yield request
        more.wait(30)

    with ServerThread() as srv, grpc.insecure_channel(srv.address) as channel:
        servicer = srv.server.servicer
        stream = channel.stream_stream("/tritarget.v1.TargetAssigner/AssignStream",
                                       request_serializer=pb.AssignRequest.SerializeToString,
                                       response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
        try:
            call = stream(requests(), timeout=30)
            assert not next(call).HasField("error")
            with TargetClient(srv.address, retries=0) as client:
                client.list_presets()
            assert srv.run(servicer.wait_settled(0.3)) is False
        finally:
            more.set()
        assert list(call) == []
        assert srv.run(servicer.wait_settled(5.0)) is True


def test_a_server_whose_calls_keep_arriving_is_not_settled():
    """Calls that keep arriving, each over at once, leave the server idle between them but
    never quiet: it is not settled (stopping gRPC then would cancel the calls it took in
    that the event loop has not reached yet)."""
    stop = threading.Event()
    with ServerThread() as srv, TargetClient(srv.address, retries=0) as client:

        def keep_calling() -> None:
            while not stop.is_set():
                client.list_presets()

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            until(lambda: srv.metrics.value("tritarget_requests_total", {"method": "ListPresets"}) >= 3)
            assert srv.run(srv.server.servicer.wait_settled(2.0, quiet=0.5)) is False  # calls are ms apart
        finally:
            stop.set()
            caller.join(10)
        assert srv.run(srv.server.servicer.wait_settled(5.0, quiet=0.25)) is True


async def _call_soon(function, *args):
    """``function(*args)`` on the server's event loop, as gRPC's callbacks run."""
    function(*args)


def test_calls_waiting_for_a_busy_event_loop_at_shutdown_are_refused_unavailable_not_cancelled():
    """Calls gRPC accepted while the event loop was busy reach their handlers only when it
    frees: stopping gRPC as soon as the calls in flight were done cancelled them
    (CANCELLED, which clients do not retry); they are refused UNAVAILABLE (retried on
    another replica), well within the grace period."""
    srv = ServerThread(grace_s=5.0).start()
    request = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision")

    async def busy_then_stop() -> float:
        time.sleep(1.0)  # the loop is busy (decoding, encoding) while the calls arrive
        start = time.monotonic()
        await srv.server.stop()
        return time.monotonic() - start

    async def calls() -> tuple[list, float]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            assign_call = channel.unary_unary("/tritarget.v1.TargetAssigner/Assign",
                                              request_serializer=pb.AssignRequest.SerializeToString,
                                              response_deserializer=pb.AssignResponse.FromString)  # fmt: skip
            await assign_call(request, timeout=30)  # connected
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(busy_then_stop(), srv.loop))
            await asyncio.sleep(0.2)

            async def one():
                try:
                    await assign_call(request, timeout=30)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    return error.code()

            return await asyncio.gather(*(one() for _ in range(20))), await stopping

    try:
        codes, stop_seconds = asyncio.run(calls())
    finally:
        srv.server = None
        srv.stop()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 20
    assert stop_seconds < 4


def test_cli_refuses_an_empty_token_file_and_values_that_cannot_work(tmp_path, capsys):
    """An empty token file would have been read as "no token": a server open to all. (The
    process exits 2 without a traceback; the other refusals go through ``main`` in this
    process, a second each less.)"""
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", "--token-file",
                           str(empty)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and f"--token-file {empty}: empty" in done.stderr and "Traceback" not in done.stderr
    for args, message in ((["serve", "--max-message-mb", "0"], "--max-message-mb: must be in 1 .. 2047, got 0"),
                          (["serve", "--grace", "-1"], "--grace: must be a finite number >= 0"),
                          (["demo", "--batch", "0"], "--batch: must be >= 1"),
                          (["request", "--tls-ca", str(tmp_path / "missing.pem")],
                           f"--tls-ca {tmp_path / 'missing.pem'}: No such file or directory"),
                          (["request", "--tls-ca", str(empty)], f"--tls-ca {empty}: not PEM certificates"),
                          (["serve", "--port", "70000"], "--port: must be in 0 .. 65535, got 70000"),
                          (["serve", "--max-batch-images", "70000"],
                           "--max-batch-images: must be in 1 .. 65535, got 70000"),
                          (["up", "--metrics-port", "-1"], "--metrics-port: must be in 0 .. 65535, got -1"),
                          (["serve", "--port", "0", "--workers", "2"], "--workers needs a fixed --port"),
                          (["serve", "--warmup-canvas", "0", "64"], "--warmup-canvas: must be >= 1, got 0"),
                          (["serve", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(empty)],
                           f"--tls-cert {tmp_path / 'missing.pem'}: No such file or directory"),
                          (["serve", "--port", "50051", "--workers", "2", "--metrics-port", "65535"],
                           "--metrics-port 65535 with 2 workers: worker i serves metrics on"),
                          (["serve", "--port", "50051", "--workers", "2", "--metrics-port", "50050"],
                           "on --metrics-port + i, and one would be --port 50051"),
                          # up went on to fail binding, its hint naming --port
                          (["up", "--port", "50340", "--metrics-port", "50340"],
                           "--metrics-port 50340 is --port 50340: give each its own port"),
                          # up started a server whose limit then refused its own demo request
                          (["up", "--port", "0", "--batch", "300"], "--batch 300 is over --max-request-images 256"),
                          # metrics quietly bound to --host
                          (["serve", "--port", "0", "--metrics-port", "0", "--metrics-host", ""],
                           "--metrics-host: empty; give an address, or leave it out to use --host's"),
                          # built a million images (3.5 minutes, 1.1 GB) for the server to refuse at once
                          (["request", "--batch", "1000000", "--target", "127.0.0.1:1"],
                           "1000000 images x 201,600 anchors is over 33,554,432")):  # fmt: skip
        try:
            status = main(args)
        except SystemExit as usage:  # argparse's refusal
            status = usage.code
        out, err = capsys.readouterr()
        assert status == 2 and message in err, (args, err)
        assert "front-end process" not in out  # refused before it said what it would start


@pytest.mark.parametrize("command", ["serve", "up"])
def test_cli_names_a_busy_metrics_port(command):
    """up's hint named --port, not the flag at fault."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", command, "--port", "0", "--metrics-port",
                               str(port), "--warmup-canvas", "64", "64"], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{command}: metrics port 127.0.0.1:{port}: Address already in use" in done.stderr, done.stderr
    assert "--port N" not in done.stderr, done.stderr
    assert ("(another port: --metrics-port N" in done.stderr) == (command == "up"), done.stderr


@pytest.mark.parametrize("workers", [[], ["--port", "50998", "--workers", "2"]])
def test_cli_names_a_host_without_an_address(workers):
    """Not "in use?", as for a busy port (gRPC says the same for both), with workers too."""
    done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--host", "no-such-host.invalid",
                           "--port", "0", *workers], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    port = workers[1] if workers else "0"
    assert f"could not bind no-such-host.invalid:{port} (no address is known for host 'no-such-host.invalid')" in (
        done.stderr
    )
    if not workers:  # up's hint is for a port in use, not for a host
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "up", "--host", "no-such-host.invalid",
                               "--port", "0"], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and "(no address is known for host" in done.stderr, done.stderr
        assert "another port" not in done.stderr, done.stderr


def test_cli_refuses_an_empty_token_given_on_purpose():
    """``--token ""`` or ``TRITARGET_TOKEN="$UNSET_VARIABLE"`` would serve every caller."""
    cases = ((["serve", "--token", ""], {}, "--token is empty"),
             (["up"], {"TRITARGET_TOKEN": ""}, "TRITARGET_TOKEN is set but empty"),
             (["serve", "--token", " "], {"TRITARGET_TOKEN": "secret"}, "--token is empty"))  # fmt: skip
    for args, env, message in cases:
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", *args, "--port", "0"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **env})  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


@pytest.mark.parametrize("command", ["request", "loadtest"])
@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--token", " "], {}, "--token is empty; give the token, or leave --token out to call without one"),
    ([], {"TRITARGET_TOKEN": ""}, "TRITARGET_TOKEN is set but empty; unset it to call without a token"),
    # Blank (a secret file holding only a newline): stripped, it is empty too, not "no token".
    ([], {"TRITARGET_TOKEN": " \n"}, "TRITARGET_TOKEN is set but empty; unset it to call without a token"),
])  # fmt: skip
def test_client_commands_refuse_an_empty_token_given_on_purpose(command, flags, env, message, monkeypatch, capsys):
    """As ``serve`` refuses it: sent as no token, the calls failed UNAUTHENTICATED
    ("missing credentials"), far from the cause."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([command, "--target", "127.0.0.1:9", *flags]) == 2
    assert capsys.readouterr().err == f"tritarget {command}: {message}\n"


def test_cli_ctrl_c_in_a_command_without_its_own_handler_is_one_line():
    """``request`` to a server that never answers: once it has connected (its imports are
    done), Ctrl-C ends it with exit 130 and one line, not a traceback."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(120)
        process = spawn_cli("request", "--target", f"127.0.0.1:{silent.getsockname()[1]}")
        try:
            connection, _ = silent.accept()
            connection.close()
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 130 and "tritarget: interrupted" in out and "Traceback" not in out, out


def test_host_port_brackets_ipv6_literals():
    assert host_port("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert host_port("::1", 50051) == host_port("[::1]", 50051) == "[::1]:50051"
    assert host_port("localhost", 0) == "localhost:0"


def test_serves_on_an_ipv6_loopback_given_without_brackets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with ServerThread(host="::1") as srv:
        assert srv.address.startswith("[::1]:")
        with TargetClient(srv.address) as client:
            assert client.assign(BOXES, [2], CANVAS, preset="yolov5").labels.shape[0] == 1


# `tritarget` whose backend takes 2 s to load, as CUDA's start or a compilation does on a GPU.
_SLOW_START = """
import sys, time
import tritarget.service.server as server
load = server.load_backend
def slow(*args, **kwargs):
    print("loading the backend", flush=True)
    time.sleep(2)
    return load(*args, **kwargs)
server.load_backend = slow
from tritarget.service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_the_backend_loads_stops_the_server_cleanly(stop_signal):
    """Before serve() set its handlers, asyncio's own Ctrl-C handling cancelled it inside
    gRPC's start: an "invalid state" error in the log and, at worst, a never-awaited
    coroutine and an event loop's traceback."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_START, "serve", "--port", "0", "--backend", "cpu", "--warmup-canvas", "64", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    read_until(process, "loading the backend")
    time.sleep(0.5)
    process.send_signal(stop_signal)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert "stopped" in output and "invalid state" not in output and "Traceback" not in output, output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT's rules are Linux's")
def test_a_port_held_for_workers_lets_them_in_and_keeps_other_servers_out():
    """The check and the workers' binds were apart (each worker loads its backend first:
    seconds on a GPU), and a second `serve --workers` that checked in between joined the
    port. Held from the check on: the workers' binds (SO_REUSEPORT) succeed, another
    server's check and a second hold fail."""
    port = free_port()
    (held,) = hold_port("127.0.0.1", port)
    try:
        assert bind_refusal("127.0.0.1", port) == "(in use?): Address already in use"
        with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{port} \\(in use\\?\\)"):
            hold_port("127.0.0.1", port)
        with socket.socket() as worker:  # as gRPC binds a worker's port
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        held.close()


def test_cli_serve_workers_refuse_a_port_another_server_holds():
    """Workers bind with SO_REUSEPORT: without a check they would join a listening
    server's port (one that set it too) and take part of its traffic."""
    import socket

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--port", str(port),
                               "--workers", "2"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and f"could not bind 127.0.0.1:{port} (in use?)" in done.stderr, done.stderr


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cli_serve_workers_share_one_port(backend):
    """Worker processes share the port, each with its own backend state (on a GPU each
    its own CUDA context and compiled kernels; here triton runs in its interpreter),
    and every answer equals the in-process one."""
    port = free_port()
    process = spawn_cli("serve", "--port", str(port), "--workers", "2", "--backend", backend,
                        "--warmup-canvas", "64", "64")  # fmt: skip
    try:
        _, started = read_until(process, r"health is SERVING", count=2)  # one per worker
        assert started.count(f"backend {backend} on") == 2, started
        expected = assign(BOXES, [2], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
        for _ in range(4):
            with TargetClient(f"127.0.0.1:{port}") as client:  # a new connection each time
                targets = client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
            assert torch.equal(targets.labels, expected.labels)
            assert torch.equal(targets.matched_gt, expected.matched_gt)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert out.count("stopped") == 2, out
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_cli_serve_workers_stop_when_their_parent_is_killed():
    """SIGKILL to `serve --workers 2` (an OOM kill, `kill -9`): its workers must not serve on
    as orphans holding the port; they drain and exit."""
    port = free_port()
    process = spawn_cli("serve", "--port", str(port), "--workers", "2", "--backend", "cpu", "--warmup-canvas", "64",
                        "64", "--grace", "1")  # fmt: skip
    workers = []
    try:
        read_until(process, r"health is SERVING", count=2)
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            workers += [int(pid) for pid in f.read().split()]
        assert len(workers) == 2
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers), "orphaned workers"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in workers:  # a failed run leaves no server behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend loads where there is a GPU")
def test_cli_serve_workers_exit_2_for_a_usage_error_found_in_a_worker():
    """A worker that finds a usage error (here: the triton backend without a GPU or its
    interpreter) fails as one process would: exit 2 (not a crash to restart), each
    worker's error on a line of its own."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--port", str(port), "--workers",
                           "2", "--backend", "triton", "--warmup-canvas", "64", "64"], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    failed = [line for line in done.stderr.splitlines() if "failed:" in line]
    assert failed and all(re.fullmatch(r"\[worker \d\] failed: backend 'triton' .*cannot run here.*", line)
                          for line in failed), done.stderr  # fmt: skip


def test_cli_serve_workers_refuse_a_busy_metrics_port_before_any_starts():
    """Worker 1's metrics port (--metrics-port + 1) taken: worker 0 served, worker 1
    failed, and then all stopped. Now every worker's port is checked before any starts."""
    port = free_port()
    with contextlib.ExitStack() as held:
        for _ in range(50):  # a busy port whose predecessor is free
            busy = held.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            metrics_port = busy.getsockname()[1] - 1
            with socket.socket() as probe:
                if port not in (metrics_port, metrics_port + 1) and probe.connect_ex(("127.0.0.1", metrics_port)) != 0:
                    break
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--port", str(port), "--workers",
                               "2", "--backend", "cpu", "--warmup-canvas", "64", "64", "--metrics-port",
                               str(metrics_port)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (f"tritarget serve: metrics port 127.0.0.1:{metrics_port + 1} (worker 1) (in use?): Address already in use"
            in done.stderr), done.stderr  # fmt: skip
    assert "[worker" not in done.stdout + done.stderr  # none started


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_serve_on_localhost_refuses_a_port_another_process_holds_on_one_of_its_addresses(workers):
    """gRPC binds localhost's ::1 and 127.0.0.1 and serves where one binds: with 127.0.0.1's
    port another process's, `serve --host localhost` served on ::1 alone, and callers of
    127.0.0.1 reached the other process."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        argv = ["serve", "--host", "localhost", "--port", str(port), "--workers", workers]
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", *argv], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"could not bind localhost:{port} (in use?): Address already in use" in done.stderr, done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_serve_names_an_address_of_another_machine(workers):
    """Not "in use?": gRPC's failure reads the same for a busy port and for an address
    this machine does not have (192.0.2.1: TEST-NET-1, assigned to no machine)."""
    done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--host", "192.0.2.1", "--port",
                           "50999", "--workers", workers], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "could not bind 192.0.2.1:50999 (not an address of this machine)" in done.stderr, done.stderr


def test_an_address_this_machine_has_not_among_the_hosts_is_skipped_as_grpc_skips_it(monkeypatch):
    """A hosts file listing ``::1 localhost`` (container runtimes write it) on a machine with
    IPv6 switched off: the check refused the whole host ("not an address of this machine"
    on ::1) where gRPC serves on 127.0.0.1. Another machine's address stands in for the
    absent one (192.0.2.1: TEST-NET-1); the host's other address is checked as before."""
    from tritarget.service import server as server_module

    port = free_port()
    resolved = [(socket.AF_INET, ("192.0.2.1", port)), (socket.AF_INET, ("127.0.0.1", port))]
    monkeypatch.setattr(server_module, "_addresses", lambda host, port: resolved)
    assert bind_refusal("localhost", port) is None
    (held,) = hold_port("localhost", port)  # the address there is
    try:
        assert held.getsockname() == ("127.0.0.1", port)
        assert bind_refusal("localhost", port) == "(in use?): Address already in use on 127.0.0.1"
    finally:
        held.close()
    resolved.pop()  # only the absent one: refused, naming it
    assert bind_refusal("localhost", port) == "(not an address of this machine): Cannot assign requested address"


def test_a_host_name_that_cannot_be_encoded_is_named_not_raised():
    """A label over 63 characters fails IDNA encoding (UnicodeError, not socket.gaierror): it
    is a host without an address, refused with the others' reason rather than a traceback."""
    host = "a" * 64 + ".example"
    assert bind_refusal(host, 50051).startswith(f"(no address is known for host {host!r}): ")
    with pytest.raises(OSError, match=re.escape(f"could not bind {host}:50051 (no address is known for host")):
        hold_port(host, 50051)


def test_a_port_whose_old_connections_are_in_time_wait_is_free():
    """A restarted server's port still has the old server's connections in TIME_WAIT; gRPC
    binds it (SO_REUSEADDR), so the check must not refuse it as "in use?"."""
    with socket.socket() as listener:  # as gRPC's listener, SO_REUSEADDR
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            accepted.close()  # the server's end closes first: its port's connection waits in TIME_WAIT
    with socket.socket() as plain, pytest.raises(OSError):  # the port is not free to a bind without SO_REUSEADDR
        plain.bind(("127.0.0.1", port))
    assert bind_refusal("127.0.0.1", port) is None
    with ServerThread(port=port) as srv, TargetClient(srv.address) as client:
        assert len(client.list_presets()) == len(presets.names())


def test_a_bracketed_ipv6_host_is_checked_as_its_address():
    """``[::1]``, as users write an IPv6 literal beside a port, names the address ::1."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert bind_refusal("[::1]", port) is None
    (held,) = hold_port("[::1]", port)
    try:
        assert held.getsockname()[:2] == ("::1", port)
        assert bind_refusal("[::1]", port) == "(in use?): Address already in use"
    finally:
        held.close()


def test_cli_serve_names_a_host_grpc_cannot_use_not_a_busy_port():
    """``--host 0``: Python reads it as 0.0.0.0, gRPC's resolver refuses it, and the free
    port was blamed ("in use?")."""
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--host", "0", "--port", str(port),
                           "--backend", "cpu"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"could not bind 0:{port} (gRPC cannot use it: check --host)" in done.stderr, done.stderr
    assert "in use?" not in done.stderr


_REAP = """
import os, signal
from tritarget.service import cli
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        signal.pause()
    pids.append(pid)
running = {pids[0]: 0, pids[1]: 1}
seen, waitpid = [], os.waitpid
os.waitpid = lambda pid, options: seen.append((pid, pid in running)) or waitpid(pid, options)
os.kill(pids[1], signal.SIGKILL)
assert cli._reap(running) == (pids[1], 1, -9) and running == {pids[0]: 0}
os.kill(pids[0], signal.SIGTERM)
assert cli._reap(running) == (pids[0], 0, -15) and running == {}
assert seen == [(pids[1], False), (pids[0], False)], seen
print("reaped")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux")
def test_a_worker_leaves_the_running_set_before_it_is_reaped():
    """The workers' parent forwards a stop signal to the workers in its running set: a
    worker was taken out of it after it was reaped, so a signal in between, or a second
    stop signal during the drain, went to a PID another process may have by then (one
    such SIGTERMed an unrelated process). Reaped only once out of the set, a worker
    keeps its PID (a zombie) for as long as it could be signalled. In a process of its
    own: the test's other children are not to be reaped here."""
    done = subprocess.run([sys.executable, "-c", _REAP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "reaped\n", done.stderr


@pytest.mark.parametrize(("stop", "how"), [(signal.SIGKILL, "killed by signal 9"), (signal.SIGTERM, "exit code 0")])
def test_cli_serve_workers_stop_together_when_one_stops(stop, how):
    """A worker killed (an OOM kill) or failing stops the others, and the parent exits 1:
    a supervisor then restarts the whole server instead of it serving on short of
    workers. So does one sent SIGTERM alone, which drains and exits 0: the parent served
    on with a worker fewer and said nothing. With --metrics-port 0 each worker serves
    metrics on a free port of its own; their log lines say which worker wrote them."""
    import urllib.request

    port = free_port()
    process = spawn_cli("serve", "--port", str(port), "--workers", "2", "--backend", "cpu", "--warmup-canvas", "64",
                        "64", "--grace", "1", "--metrics-port", "0")  # fmt: skip
    workers = []
    try:
        _, started = read_until(process, r"health is SERVING", count=2)
        assert "INFO [worker 0] tritarget." in started and "INFO [worker 1] tritarget." in started, started
        metrics_ports = {int(p) for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", started)}
        assert len(metrics_ports) == 2 and min(metrics_ports) > 1024, started
        for metrics_port in metrics_ports:
            assert b"tritarget_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                                         timeout=10).read()  # fmt: skip
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            workers += [int(pid) for pid in f.read().split()]
        assert len(workers) == 2
        os.kill(workers[0], stop)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 1, out
        # Which worker: an OOM killer's log names the PID.
        stopped = rf"worker [01] \(pid {workers[0]}\) stopped \({re.escape(how)}\); stopping the others"
        assert re.search(stopped, out), out
        assert not os.path.exists(f"/proc/{workers[1]}")  # stopped, and its exit collected by the parent
    finally:
        if process.poll() is None:
            process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Not a zombie (an orphan's exit is collected by init, maybe later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cli_serve_exits_when_warm_up_fails(monkeypatch, capsys):
    """A server whose warm-up batch fails (a GPU lost, a kernel that does not compile:
    faults this machine cannot produce, so one is injected) exits 1 instead of lingering
    NOT_SERVING."""
    from tritarget.service.backend import Batcher
    from tritarget.service.cli import main

    async def lost(self, job):
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr(Batcher, "warm_up", lost)
    root = logging.getLogger()  # serve's logging.basicConfig would outlive the test
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    assert main(["serve", "--port", "0", "--backend", "reference", "--warmup-canvas", "64", "64"]) == 1
    out = capsys.readouterr()
    assert "warm-up failed, stopping: CUDA error: device lost" in out.out
    assert "tritarget serve: warm-up failed: CUDA error: device lost" in out.err


@pytest.mark.parametrize("options, message", [
    ({"warmup_preset": "retinanet"}, "warmup_preset: unknown preset 'retinanet'"),
    ({"warmup_canvas": (0, 64)}, r"warmup_canvas: expected \(height, width\) of integers >= 1"),
    ({"metrics_host": "", "metrics_port": 0}, "metrics_host: empty; give an address, or none to use host's"),
    ({"max_streams_per_connection": 0}, r"max_streams_per_connection: expected an integer in 1 \.\. 2147483647, got 0"),
    ({"max_streams_per_connection": 2**31}, r"expected an integer in 1 \.\. 2147483647, got 2147483648"),
    ({"connection_idle_s": float("inf")}, "connection_idle_s: expected a finite number of seconds > 0, got inf"),
    ({"connection_age_s": 0}, "connection_age_s: expected a finite number of seconds > 0, got 0"),
    ({"max_streams_per_connection": 2.5}, r"max_streams_per_connection: expected an integer in 1 \.\. \d+, got 2.5"),
    ({"metrics_host": " ", "metrics_port": 0}, "metrics_host: empty; give an address, or none to use host's"),
    ({"warmup_canvas": (64, 64, 64)}, r"warmup_canvas: expected \(height, width\) of integers >= 1"),
    ({"warmup_canvas": (64, 8193)}, "warmup_canvas: 64 x 8193 is over the server's canvas limit of 8192 pixels a side"),
])  # fmt: skip
def test_server_options_refuse_a_warm_up_that_cannot_run(options, message):
    """An unknown preset raised inside the warm-up task, which then never settled: the
    server stayed NOT_SERVING for good. (An empty metrics host was the host, silently.)"""
    with pytest.raises(ValueError, match=message):
        ServerOptions(**options)


def test_a_warm_up_canvas_at_the_canvas_limit_is_accepted():
    """The limit is a side no request may exceed: a warm-up canvas of exactly that side is one a request may use."""
    assert ServerOptions(warmup_canvas=(8192, 8192)).warmup_canvas == (8192, 8192)


def test_draining_ends_an_open_stream_unavailable_after_answering_what_it_read():
    srv = ServerThread().start()
    more = threading.Event()
    try:
        request = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision")

        def requests():
            yield request
            yield request
            more.wait(30)  # the stream stays open, idle, like a data loader's between epochs

        with grpc.insecure_channel(srv.address) as channel:
            stream = channel.stream_stream(
                "/tritarget.v1.TargetAssigner/AssignStream",
                request_serializer=pb.AssignRequest.SerializeToString,
                response_deserializer=pb.AssignResponse.FromString,
            )
            call = stream(requests(), timeout=30)
            answered = [next(call), next(call)]
            metrics = srv.server.metrics
            assert metrics.value("tritarget_calls_in_flight") == 1 and metrics.value("tritarget_serving") == 1
            start = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=20), srv.loop)
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resend the unanswered requests" in info.value.details()
            assert metrics.value("tritarget_serving") == 0  # draining
            stopping.result(10)
            assert time.monotonic() - start < 5  # not the whole grace period
        assert all(a.batch_size == 1 and not a.HasField("error") for a in answered)
    finally:
        more.set()
        srv.server = None
        srv.stop()


# ---------------------------------------------------------------- review 2026-12-02: flags an operator gets wrong


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # 2048 MiB overflowed gRPC's int32 option: a traceback, exit 1.
        (["--max-message-mb", "2048"], "--max-message-mb: must be in 1 .. 2047, got 2048"),
        # An infinite delay: every request waited for a full batch, health SERVING.
        (["--max-queue-delay-ms", "inf"], "--max-queue-delay-ms: must be a finite number >= 0 and <= 10000, got inf"),
        (["--max-queue-delay-ms", "-1"], "--max-queue-delay-ms: must be a finite number >= 0 and <= 10000, got -1"),
        # Every lone request then waited out its deadline.
        (["--max-queue-delay-ms", "1e12"], "--max-queue-delay-ms: must be a finite number >= 0 and <= 10000, got 1e12"),
        # These named an internal field ("batching: max_batch_images must be ...").
        (["--max-batch-images", "0"], "--max-batch-images: must be in 1 .. 65535, got 0"),
        (["--max-queue-images", "0"], "--max-queue-images: must be >= 1, got 0"),
        (["--compute-workers", "0"], "--compute-workers: must be in 1 .. 256, got 0"),
        # A thread each, with no bound: 10**6 of them started before the first failed.
        (["--compute-workers", "1000000"], "--compute-workers: must be in 1 .. 256, got 1000000"),
        (["--inline-max-images", "-1"], "--inline-max-images: must be >= 0, got -1"),
        (["--gpu-wait", "yield"], "argument --gpu-wait: invalid choice: 'yield'"),  # the choices' quoting varies
        (["--max-unsent-mb", "0"], "--max-unsent-mb: must be in 1 .. 1073741824, got 0"),
        (["--workers", "0"], "--workers: must be in 1 .. 256, got 0"),
        (["--workers", "10000"], "--workers: must be in 1 .. 256, got 10000"),  # a process each
        # gRPC's settings are int32: a traceback (OverflowError), exit 1.
        (
            ["--max-streams-per-connection", "3000000000"],
            "--max-streams-per-connection: must be in 1 .. 2147483647, got 3000000000",
        ),  # fmt: skip
        # Both: the file won, the flag silently ignored.
        (["--token", "a", "--token-file", "t"], "argument --token-file: not allowed with argument --token"),
    ],
)
def test_cli_refuses_server_flags_when_parsed(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--port", "0", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # gRPC takes a port modulo 65536: port 102505 reached a server on 36969.
        (["request", "--target", "127.0.0.1:102505"], "expected 'host:port' with a port in 1..65535"),
        (["loadtest", "--target", "127.0.0.1:102505"], "expected 'host:port' with a port in 1..65535"),
        (["loadtest", "--target", "127.0.0.1"], "got '127.0.0.1'"),  # gRPC's default port, 443
        (["loadtest", "--target", "http://127.0.0.1:1"], "is a URL"),  # it ran the whole test, all UNAVAILABLE
        # "Overflow when unpacking long long", or a traceback.
        (["demo", "--seed", "99999999999999999999999"], "--seed: must be an integer in 0 .. 2**62"),
        (["up", "--seed", "99999999999999999999999"], "--seed: must be an integer in 0 .. 2**62"),
        (["loadtest", "--target", "h:1", "--seed", "-1"], "--seed: must be an integer in 0 .. 2**62"),
        # gRPC's deadline overflowed (DEADLINE_EXCEEDED at once), a thread's join raised OverflowError.
        (["request", "--timeout", "1e10"], "--timeout: must be a finite number > 0 and <= 1e+06"),
        (["loadtest", "--target", "h:1", "--timeout", "1e10"], "--timeout: must be a finite number > 0 and <= 1e+06"),
    ],
)
def test_cli_refuses_client_flags_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_up_sends_its_tls_demo_to_localhost_for_any_loopback_or_any_address_host():
    """``up --host [::1]`` with TLS sent its demo to [::1], which a localhost certificate
    does not name (the bracketed form was not recognised)."""
    for host in ("127.0.0.1", "0.0.0.0", "::1", "[::1]", "::", "[::]"):
        assert _demo_address(host, 5, tls=True) == "localhost:5"
    assert _demo_address("[::1]", 5, tls=False) == "[::1]:5"
    assert _demo_address("10.0.0.7", 5, tls=True) == "10.0.0.7:5"


def test_cli_request_names_a_bad_token_in_one_line(capsys):
    """A ValueError from the client was a traceback with exit 1."""
    assert main(["request", "--target", "127.0.0.1:1", "--token", "a\nb"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tritarget request: --token: a bearer token is printable ASCII without spaces; this one is not"
    )


def test_cli_request_to_a_listener_that_never_answers_names_it(capsys):
    """A hung server (or a port held by something else): the one line read
    "DEADLINE_EXCEEDED: Deadline Exceeded", naming neither the address nor the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        assert main(["request", "--target", target, "--timeout", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"tritarget request: DEADLINE_EXCEEDED: no answer from {target} within the call's timeout")


def test_cli_serve_goes_on_serving_when_its_stdout_closes():
    """`serve | head -2`: the status line written after the reader had gone raised
    BrokenPipeError, the started gRPC server was never stopped, and the interpreter
    aborted at exit ("terminate called without an active exception", status 134)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", "--backend", "reference",
         "--warmup-canvas", "64", "64", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", process.stdout.readline() + process.stdout.readline())
        process.stdout.close()  # the reader goes; the server has more to say (its settings, its metrics port)
        with TargetClient(f"127.0.0.1:{match.group(1)}") as client:
            client.wait_until_ready(60)
            assert (client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision").labels == 1).any()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        errors = process.stderr.read()
        assert "terminate called" not in errors and "Broken pipe" not in errors, errors
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_serve_whose_reader_went_exits_0_with_a_block_buffered_stdout():
    """Without PYTHONUNBUFFERED a pipe's stdout is block-buffered: the status lines the
    closed pipe refused stayed in the buffer, and the final flush failed again, so that a
    clean stop exited as a pipe writer stopped by its reader (141) instead of 0."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", "--backend", "reference",
         "--warmup-canvas", "64", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", process.stdout.readline() + process.stdout.readline())
        process.stdout.close()  # the reader goes; "shutting down" and "stopped" are still to be said
        with TargetClient(f"127.0.0.1:{match.group(1)}") as client:
            client.wait_until_ready(60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("stdout", ["closed pipe", "none", "full disk"])
def test_cli_serve_serves_when_nobody_reads_even_its_first_line(stdout):
    """`serve | true`: the reader gone before the first status line, which raised
    BrokenPipeError into the settings' error handler: "tritarget serve: [Errno 32] Broken
    pipe" and exit 2 (141 buffered), the server never started. `serve >&-` (no stdout:
    Python's sys.stdout is None) failed on the same line (AttributeError, exit 1). Stdout on
    a full disk refused to start ("tritarget serve: [Errno 28] No space left on device",
    exit 2, as a usage error), or, filled later, skipped the drain at the stop and aborted
    (exit 134): the status lines stop, said once on stderr, and the server serves."""
    if stdout == "full disk" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    port = free_port()
    argv = ["-m", "tritarget.service.cli", "serve", "--port", str(port), "--backend", "reference",
            "--warmup-canvas", "64", "64"]  # fmt: skip
    with contextlib.ExitStack() as streams:
        if stdout == "none":
            command, out = without_stdout(argv), None
        else:
            command = [sys.executable, *argv]
            out = streams.enter_context(closed_pipe()) if stdout == "closed pipe" else open("/dev/full", "w")
            if stdout == "full disk":
                streams.callback(out.close)
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        with TargetClient(f"127.0.0.1:{port}") as client:
            client.wait_until_ready(60)
            assert (client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision").labels == 1).any()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        errors = process.stderr.read()
        assert "Broken pipe" not in errors and "Traceback" not in errors, errors
        full = "status lines stopped: cannot write standard output: No space left on device"
        assert errors.count(full) == (stdout == "full disk"), errors
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--token-file", "/no/such/token"], {}, "--token-file /no/such/token: No such file or directory"),
        # A canvas no request may use, allocated before the port answered (22.5 GB here).
        (["--warmup-canvas", "100000", "100000"], {}, "--warmup-canvas 100000 100000: over the server's canvas"),
        (["--warmup-canvas", "64", "100000"], {}, "--warmup-canvas 64 100000: over the server's canvas"),  # either side
        (["--metrics-port", "0", "--metrics-host", "[ ]"], {}, "--metrics-host: empty"),  # brackets around nothing
        (["--metrics-host", "127.0.0.1"], {}, "--metrics-host needs --metrics-port"),
        # Refused by their flags' names, before any worker starts (not as max_batch_images in each).
        (["--max-batch-images", "2000"], {}, "--max-batch-images 2000 is over --max-queue-images 1024"),
        ([], {"TRITARGET_TOKEN": "s3\x01cret"}, "TRITARGET_TOKEN: a bearer token is printable ASCII without spaces"),
    ],
)
def test_cli_refuses_server_settings_that_cannot_work(flags, env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):  # `serve` prints it and exits 2
        _server_options(build_parser().parse_args(["serve", "--port", "0", *flags]))


def test_cli_takes_server_settings_at_their_bounds():
    """Each bound is inclusive: a merged batch as large as the queue, a warm-up canvas of the
    server's largest side, worker metrics ports up to 65535 and right beside --port."""
    from tritarget.service.cli import _check_metrics_ports

    parse = build_parser().parse_args
    options = _server_options(parse(["serve", "--max-batch-images", "1024", "--warmup-canvas", "8192", "64"]))
    assert (options.batching.max_batch_images, options.warmup_canvas) == (1024, (8192, 64))
    for metrics_port in ("65534", "50049", "50052"):  # 2 workers: ports 65534-65535, 50049-50050, 50052-50053
        _check_metrics_ports(_server_options(parse(["serve", "--port", "50051", "--metrics-port", metrics_port])), 2)
    with pytest.raises(ValueError, match=r"with 2 workers: .* and one would be --port 50051"):
        _check_metrics_ports(_server_options(parse(["serve", "--port", "50051", "--metrics-port", "50051"])), 2)


def test_the_server_options_are_the_flags():
    """Each server flag reaches the server's options, in the server's units (MiB as bytes,
    milliseconds as seconds); without flags the server is on 127.0.0.1:50051."""
    argv = ["serve", "--port", "0", "--max-message-mb", "3", "--max-request-images", "7", "--max-request-boxes", "9",
            "--max-queue-delay-ms", "250", "--compute-workers", "3", "--warmup-preset", "yolov5", "--warmup-canvas",
            "64", "96", "--grace", "2.5",
            "--connection-idle-s", "30", "--connection-age-s", "60", "--no-access-log", "--metrics-port", "0",
            "--metrics-host", "::1"]  # fmt: skip
    options = _server_options(build_parser().parse_args(argv))
    assert (options.limits.max_message_bytes, options.limits.max_images, options.limits.max_boxes) == (3 << 20, 7, 9)
    assert (options.batching.max_queue_delay_s, options.batching.compute_workers) == (0.25, 3)
    assert (options.warmup_preset, options.warmup_canvas, options.grace_s, options.access_log) == (
        "yolov5",
        (64, 96),
        2.5,
        False,
    )
    assert (options.connection_idle_s, options.connection_age_s) == (30.0, 60.0)
    assert (options.metrics_port, options.metrics_host) == (0, "::1")
    defaults = _server_options(build_parser().parse_args(["serve"]))
    assert (defaults.host, defaults.port, defaults.metrics_port) == ("127.0.0.1", 50051, None) and defaults.access_log
    assert (defaults.warmup_preset, defaults.warmup_canvas) == ("retinanet_torchvision", (800, 1344))


def test_the_warm_up_batch_is_the_options_preset_on_their_canvas(monkeypatch):
    warmed = []
    warm_up = Batcher.warm_up

    async def recorded(self, job):
        warmed.append((job.config, job.canvas))
        return await warm_up(self, job)

    monkeypatch.setattr(Batcher, "warm_up", recorded)
    with ServerThread(warmup_preset="yolov5", warmup_canvas=(64, 96)):
        pass
    assert warmed == [(presets.get("yolov5"), (64, 96))]


def test_a_token_file_s_trailing_newline_is_no_part_of_the_token(tmp_path):
    """``echo s3cret > token``: the token is s3cret, as from --token or TRITARGET_TOKEN."""
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert _server_token(build_parser().parse_args(["serve", "--token-file", str(path)])) == "s3cret"


def test_cli_names_a_token_file_that_is_not_text(tmp_path):
    binary = tmp_path / "token"
    binary.write_bytes(b"abc\xff\n")
    with pytest.raises(ValueError, match=re.escape(f"--token-file {binary}: not UTF-8 text")):
        _server_options(build_parser().parse_args(["serve", "--port", "0", "--token-file", str(binary)]))


def test_a_token_with_a_trailing_newline_is_the_token(monkeypatch):
    """A secret made from a file ends with a newline: --token-file stripped it, --token and
    TRITARGET_TOKEN kept it, and no client could authenticate ("Invalid metadata")."""
    monkeypatch.setenv("TRITARGET_TOKEN", "s3cret\n")
    args = build_parser().parse_args(["serve"])
    assert _server_token(args) == "s3cret"
    with ServerThread(token="s3cret") as srv, TargetClient(srv.address, token="s3cret\n") as client:
        assert (client.assign(torch.tensor([[8.0, 8.0, 40.0, 40.0]]), [1], (64, 64), preset="retinanet_torchvision")
                .labels == 1).any()  # fmt: skip
    with pytest.raises(ValueError, match="token: a bearer token is printable ASCII without spaces; this one is not"):
        TargetClient("127.0.0.1:1", token="s3\ncret")
    with pytest.raises(ValueError, match=r"max_message_bytes: must be an integer in \[1, 2\*\*31\)"):
        TargetClient("127.0.0.1:1", max_message_bytes=-1)
    with pytest.raises(ValueError, match="max_queue_delay_s must be finite and >= 0, got inf"):
        BatchOptions(max_queue_delay_s=float("inf"))


def test_metrics_count_refused_and_failed_requests():
    """A call refused for its token was an error of no request (errors outnumbered requests:
    an error ratio of 137%); tritarget_request_seconds timed successful Assign calls only
    (and never ListPresets / GetAnchors): it times every request counted, refused or not."""
    with ServerThread(token="s3cret") as srv:
        with TargetClient(srv.address, token="wrong", retries=0) as wrong:
            for _ in range(3):
                with pytest.raises(TargetServiceError):
                    wrong.list_presets()
        with TargetClient(srv.address, token="s3cret", retries=0) as client:
            with pytest.raises(TargetServiceError):
                client.assign(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), [1], (64, 64), preset="retinanet_torchvision")
            client.list_presets()
        value = srv.metrics.value
        assert value("tritarget_requests_total", {"method": "ListPresets"}) == 4
        assert value("tritarget_errors_total", {"method": "ListPresets", "code": "UNAUTHENTICATED"}) == 3
        assert value("tritarget_request_seconds_count", {"method": "ListPresets"}) == 4
        assert value("tritarget_request_seconds_count", {"method": "Assign"}) == 1  # the refused box


def test_an_open_health_watch_does_not_hold_a_graceful_stop():
    """Clients with health checking keep a Watch stream per connection, which never ends
    by itself: with every call answered, the port stayed open for the whole grace period.
    It is ended UNAVAILABLE with a reason after NOT_SERVING (gRPC's stop cut it: grpc-js
    read the reset stream as INTERNAL)."""
    srv = ServerThread().start()
    channel = grpc.insecure_channel(srv.address)
    statuses, ends = [], []

    def watch() -> None:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                statuses.append(reply.status)
        except grpc.RpcError as exc:
            ends.append((exc.code(), exc.details()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 10
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    srv.stop(grace=10.0)
    assert time.monotonic() - start < 3
    watcher.join(5)
    channel.close()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert ends == [(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; watch another replica")]


def test_a_health_watch_opened_once_the_watches_ended_is_refused_at_once():
    """Once ``end_watches`` has run (a stop, after its drain), a new Watch waited for
    changes that never come until gRPC's stop cut it: it is answered UNAVAILABLE with the
    reason at once, before any status."""
    with ServerThread() as srv, grpc.insecure_channel(srv.address) as channel:
        srv.run(srv.server.health.end_watches())
        with pytest.raises(grpc.RpcError) as info:
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.UNAVAILABLE, "the server is shutting down; watch another replica")  # fmt: skip


def test_a_health_watch_whose_caller_went_is_let_go():
    """A Watch is held for ``end_watches`` while it is open, and let go once its caller
    goes: clients that reconnect all day left one entry each, for good."""
    with ServerThread() as srv, grpc.insecure_channel(srv.address) as channel:
        for _ in range(3):
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert len(srv.server.health._watches) == 1
            watch.cancel()
            until(lambda: not srv.server.health._watches, timeout=10)


def test_cli_takes_server_flags_at_the_ends_of_their_ranges():
    """The ranges are inclusive: a flag's highest (and lowest) value is taken, not refused,
    and the next one up is."""
    top = build_parser().parse_args(["serve", "--port", "65535", "--max-batch-images", "65535", "--max-queue-delay-ms",
                                     "10000", "--compute-workers", "256", "--grace", "0"])  # fmt: skip
    assert (top.port, top.max_batch_images, top.max_queue_delay_ms, top.compute_workers, top.grace) == (
        65535, 65535, 10000.0, 256, 0.0)  # fmt: skip
    assert build_parser().parse_args(["request", "--timeout", "1e6"]).timeout == 1e6
    assert build_parser().parse_args(["demo", "--seed", str(2**62)]).seed == 2**62
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--seed", str(2**62 + 1)])


def test_cli_names_a_bad_target_once(capsys):
    """The client's "target: " prefix is the flag's own name: argparse's line says the flag
    and then the problem, not "target: " a second time."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["request", "--target", "127.0.0.1"])
    expected = "error: argument --target: expected 'host:port' with a port in 1..65535, got '127.0.0.1'\n"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "signalled_after", "status"),
    [
        (("serve", "--port", "0", "--backend", "cpu", "--warmup-canvas", "64", "64"),
         (r"health is SERVING", r"\nstopped\n"), 0),
        (("serve", "--port", "99999"), (r"error: argument --port",), 2),  # argparse's: SystemExit out of main
    ],
    ids=["stopped", "usage-error"],
)  # fmt: skip
def test_cli_keeps_its_exit_status_through_a_stop_signal_while_it_exits(args, signalled_after, status):
    """A stop signal in the half second the interpreter takes to exit (torch imported), once
    the status is decided: the default action was back, and the process died of it, its
    exit status lost (a failed server's 1 read as a clean stop by a supervisor)."""
    process = spawn_cli(*args)
    try:
        for line in signalled_after:  # a SIGTERM after each: the last one while it exits
            read_until(process, line)
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status


_EXIT_WAITS = """
import atexit, sys, time
from tritarget.service import cli
def main():
    atexit.register(time.sleep, 60)  # an exit handler that waits (multiprocessing's join of a hung client)
    print("decided", flush=True)
    return 3
cli.main = main
cli.entry()
"""


def test_a_stop_signal_while_an_exit_handler_waits_ends_the_process_with_its_status():
    """Ignored from the moment the status was decided, a stop signal could no longer end a
    command whose exit waited (a load test's client process that ignores SIGTERM, joined
    at exit): only SIGKILL did. It ends the process at once, with the status."""
    process = subprocess.Popen([sys.executable, "-c", _EXIT_WAITS], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "decided\n"
        time.sleep(0.5)  # in the exit handler
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.monotonic() - start < 5
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3


def test_cli_serve_stops_without_tracebacks_with_watch_and_reflection_streams_open():
    """gRPC's stop ends open streams (a health Watch, a grpcurl reflection session) and
    returned before their tasks finished; the event loop's end cancelled them again and
    gRPC logged an ERROR with two tracebacks for each, at every stop."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    process = spawn_cli("serve", "--port", "0", "--backend", "cpu", "--warmup-canvas", "64", "64", "--grace", "5")
    channel = None
    try:
        match, _ = read_until(process, r"serving on 127\.0\.0\.1:(\d+)")
        read_until(process, r"health is SERVING")
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        asks = threading.Event()

        def ask_once():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            asks.wait(60)  # the stream stays open until the test ends

        session = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask_once())
        assert next(session).list_services_response.service
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        asks.set()
    finally:
        if channel is not None:
            channel.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "stopped" in out, out
    assert "Traceback" not in out and "ERROR" not in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and a process group: Linux")
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_serve_workers_stopped_while_starting_stop_cleanly(stop_signal):
    """A stop signal while `serve --workers 2` forked its workers: SIGTERM killed a worker
    before its handler existed (the parent read a failure: "a worker stopped (killed by
    signal 15)", exit 1); SIGINT became a KeyboardInterrupt in a worker's start-up
    ("[worker 0] failed:", exit 1) or was swallowed and the server served on."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", str(port), "--workers", "2",
         "--backend", "cpu", "--warmup-canvas", "64", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        seen = [process.stdout.readline()]
        while "front-end process" not in seen[-1] and seen[-1]:
            seen.append(process.stdout.readline())
        time.sleep(0.03)  # the parent is forking, its workers importing
        process.send_signal(stop_signal)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(seen) + out
    assert process.returncode == 0, output
    assert "failed" not in output and "killed by" not in output and "Exception ignored" not in output, output


_ANCHORS_12MB = pb.GetAnchorsRequest(canvas_height=2048, canvas_width=2048)
_ANCHORS_12MB.config.preset = "retinanet_torchvision"  # 12.6 MB of anchors: a response that takes a while to read


def _unsent_bytes(metrics_ports) -> float:
    """The servers' responses not yet sent, from their /metrics pages."""
    import urllib.request

    pages = [urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode() for p in metrics_ports]
    return sum(float(m) for page in pages for m in re.findall(r"^tritarget_unsent_response_bytes (\S+)$", page, re.M))


@contextlib.contextmanager
def _cli_serving_a_held_call(hold, *flags: str):
    """``tritarget serve FLAGS`` on the cpu backend with /metrics, once a 12 MB response to
    a call that ``hold`` (``stalled_call`` or ``unread_call``) keeps unread waits unsent."""
    process = spawn_cli("serve", "--port", "0", "--backend", "cpu", "--warmup-canvas", "64", "64", "--metrics-port",
                        "0", *flags)  # fmt: skip
    held = None
    try:
        _, started = read_until(process, r"health is SERVING")
        port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", started).group(1))
        metrics_port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", started).group(1)
        held = hold(port, "GetAnchors", _ANCHORS_12MB.SerializeToString())
        until(lambda: _unsent_bytes([metrics_port]) > 12e6)
        yield process
    finally:
        if held is not None:
            held.close()
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("hurried", [False, True], ids=["grace", "second signal"])
def test_a_client_that_stopped_reading_holds_the_stop_no_longer_than_its_grace(hurried):
    """A call whose client stopped reading its socket (a hung process: the response fills
    TCP's buffers) held gRPC's stop ~18 s past any grace, until the connection died; and a
    second stop signal then (during gRPC's stop) made ``stop`` raise CancelledError, so
    that the batcher and the servicer were never closed and ``serve`` exited 1 with a
    traceback (review 49). The stop goes on without that connection's end."""
    srv = ServerThread(backend="cpu").start()
    held = stalled_call(srv.port, "GetAnchors", _ANCHORS_12MB.SerializeToString())
    try:
        until(lambda: _unsent_bytes([srv.server.metrics_port]) > 12e6)

        async def stop() -> float:
            hurry = asyncio.Event()
            if hurried:  # after the grace: while gRPC's stop waits for the call's end
                asyncio.get_running_loop().call_later(1.0, hurry.set)
            started = time.monotonic()
            await srv.server.stop(grace=0.5, hurry=hurry)
            return time.monotonic() - started

        assert srv.run(stop()) < 4.0  # the grace, then at most 1 s for gRPC's stop (twice when hurried)
        srv.server = None
    finally:
        srv.stop()
        held.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process group: Linux")
@pytest.mark.parametrize("signals", [1, 2])
def test_cli_serve_stops_within_its_grace_while_a_client_reads_nothing(signals):
    """``serve --grace 1`` with a call whose client stopped reading its socket: one stop
    signal exits 0 in about the grace (it took ~19 s); a second one while gRPC's stop waits
    exits 0 too, without a traceback (it raised CancelledError, exit 1; review 49)."""
    with _cli_serving_a_held_call(stalled_call, "--grace", "1", "--no-access-log") as process:
        begun = time.monotonic()
        process.send_signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(1.5)  # past the grace: gRPC's stop is waiting for the call
            process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        took = time.monotonic() - begun
    assert process.returncode == 0 and "stopped" in out, out
    assert "Traceback" not in out and "still holds gRPC's stop" in out, out
    assert took < 8.0, (took, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process group: Linux")
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("workers", [1, 2])
def test_cli_serve_a_second_stop_signal_cuts_the_grace_period_short(workers, stop_signal):
    """Ctrl-C (SIGINT to the terminal's process group; SIGTERM to it from systemd or
    `timeout`; SIGHUP when the terminal closes: it killed every process at once, exit 129)
    drains; a second one cancels the calls still in flight instead of waiting
    out --grace, as operators expect. With --workers the group holds the workers too:
    each signal counts once, though a worker gets it directly and from its parent."""

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", str(port), "--workers", str(workers),
         "--backend", "cpu", "--warmup-canvas", "64", "64", "--grace", "120", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    held = None
    try:
        _, started = read_until(process, r"health is SERVING", count=workers)
        metrics_ports = re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", started)

        held = unread_call(port, "GetAnchors", _ANCHORS_12MB.SerializeToString())
        until(lambda: _unsent_bytes(metrics_ports) > 12e6)
        os.killpg(process.pid, stop_signal)
        read_until(process, r"shutting down: finishing calls in flight", count=workers)
        time.sleep(1.5)
        assert process.poll() is None  # waiting for the held call, up to --grace
        started = time.monotonic()
        os.killpg(process.pid, stop_signal)
        out, _ = process.communicate(timeout=60)
        assert time.monotonic() - started < 30, out
    finally:
        if held is not None:
            held.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out
    assert "second stop signal: cancelling the calls still in flight" in out and "stopped" in out, out
    assert "Traceback" not in out, out


def test_cli_serve_takes_two_stop_signals_a_moment_apart_as_one():
    """One stop reaching the process twice within a second (a signal to the process group
    and its forward) is one stop: the calls in flight keep their grace period."""
    with _cli_serving_a_held_call(unread_call, "--grace", "2") as process:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopped" in out, out
    assert "second stop signal: cancelling" not in out and "grace period; cancelling them" in out, out


def test_inline_compute_is_the_flags():
    options = _server_options(build_parser().parse_args(["serve", "--port", "0", "--inline-max-images", "0"]))
    assert options.batching.inline_max_images == 0
    assert _server_options(build_parser().parse_args(["serve", "--port", "0"])).batching.inline_max_images == 8


def test_the_gpu_wait_is_the_flag():
    options = _server_options(build_parser().parse_args(["serve", "--port", "0", "--gpu-wait", "spin"]))
    assert options.gpu_wait == "spin"
    assert _server_options(build_parser().parse_args(["serve", "--port", "0"])).gpu_wait == "block"
    with pytest.raises(ValueError, match="gpu_wait: expected one of block, spin, got 'yield'"):
        ServerOptions(gpu_wait="yield")


def test_the_unsent_response_bound_is_the_flags():
    options = _server_options(build_parser().parse_args(["serve", "--port", "0", "--max-unsent-mb", "512"]))
    assert options.limits.max_unsent_bytes == 512 << 20
    assert _server_options(build_parser().parse_args(["serve", "--port", "0"])).limits.max_unsent_bytes == 4 << 30
