"""A real tritarget server on 127.0.0.1, port 0, in a background event-loop thread.

Shared by the service and client tests (no tests here). Small warm-up canvas and
the reference backend keep start-up fast; pass ``backend=...`` to change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from tritarget.kernels import Targets
from tritarget.service.backend import BatchOptions
from tritarget.service.codec import Limits
from tritarget.service.server import ServerOptions, TargetServer, create_server, host_port


class ServerThread:
    """``with ServerThread(**options) as srv: TargetClient(srv.address)``."""

    def __init__(self, **options) -> None:
        defaults = {"port": 0, "backend": "reference", "warmup_canvas": (64, 64), "metrics_port": 0, "grace_s": 5.0}
        fields = {f.name for f in dataclasses.fields(ServerOptions)}
        unknown = set(options) - fields - {"batching", "limits"}
        assert not unknown, unknown
        self.options = ServerOptions(**{**defaults, **options})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: TargetServer | None = None
        self.port = 0

    def run(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True) -> ServerThread:
        self.thread.start()

        async def start() -> None:
            self.server, self.port = create_server(self.options)
            await self.server.start()
            if wait_ready:
                await self.server.wait_ready(60)

        self.run(start())
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def address(self) -> str:
        return host_port(self.options.host, self.port)

    @property
    def metrics(self):
        return self.server.metrics

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def batching(**kwargs) -> BatchOptions:
    return BatchOptions(**kwargs)


def limits(**kwargs) -> Limits:
    return Limits(**kwargs)


def sparse_view(targets: Targets) -> Targets:
    """What a SPARSE response can carry of ``targets``: matched_gt only on positives."""
    matched = torch.where(targets.labels == 1, targets.matched_gt, torch.full_like(targets.matched_gt, -1))
    return dataclasses.replace(targets, matched_gt=matched)


def spawn_cli(*args: str) -> subprocess.Popen:
    """``tritarget ARGS...`` in a child process, stdout and stderr merged, unbuffered."""
    return subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def read_until(process: subprocess.Popen, pattern: str, timeout: float = 120.0, count: int = 1) -> tuple[re.Match, str]:
    """Read the process's output until ``pattern`` has appeared ``count`` times.

    readline() blocks, so a watchdog kills the process at the timeout: its output then
    ends and the test fails instead of hanging.
    """
    seen = []
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            seen.append(line)
            matches = list(re.finditer(pattern, "".join(seen)))
            if len(matches) >= count:
                return matches[-1], "".join(seen)
    finally:
        watchdog.cancel()
    process.kill()
    raise AssertionError(f"{count} line(s) matching {pattern!r} expected in:\n{''.join(seen)}")


def serve_process(*args: str) -> tuple[subprocess.Popen, int]:
    """``tritarget serve --port 0 ARGS...`` once its health is SERVING, and its port. Its
    output is read on from then on (the access log would otherwise fill the pipe and
    block the server)."""
    process = spawn_cli("serve", "--port", "0", *args)
    try:
        match, _ = read_until(process, r"serving on 127\.0\.0\.1:(\d+)")
        read_until(process, r"health is SERVING")
    except BaseException:
        process.kill()
        raise
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, int(match.group(1))


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends first on a connection


def _own_ports() -> Iterator[int]:
    """Candidate ports below the kernel's ephemeral range (``bind`` to port 0 and outgoing
    connections take theirs from it), in a slice of their own per xdist worker, starting
    at an offset of this process's (runs side by side without xdist start apart). Where
    there is no such range to read, ports the kernel hands out, as before."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (first_ephemeral - _LOWEST_OWN_PORT) // workers
    if size < 100:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                yield s.getsockname()[1]
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start, offset = _LOWEST_OWN_PORT + worker * size, os.getpid() % size
    for i in range(size):
        yield start + (offset + i) % size


_LOWEST_OWN_PORT = 10_000
_ports = _own_ports()


def free_port() -> int:
    """A port free now, that no other test takes, for a server a test starts on it later
    (``serve --port N``) or for an address where nothing listens. A port merely free when
    drawn (bound to port 0, then closed) could meanwhile be taken by the other xdist
    worker's servers, or its clients' connections, and the server fail to bind or the
    call be answered."""
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use by something else on this machine
                continue
            return port
    raise RuntimeError("no free port left below the ephemeral range")


def until(predicate, timeout: float = 30.0) -> None:
    """Wait for ``predicate()`` to hold, failing the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def unread_call(port: int, method: str, *requests: bytes) -> socket.socket:
    """A call whose caller never reads: HTTP/2 spoken by hand over a real socket, with a
    receive window of 0 (gRPC's clients always read). The socket's close ends the call."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(HTTP2_PREFACE + http2_frame(4, 0, 0, (4).to_bytes(2, "big") + bytes(4)))
    return _call(connection, method, requests)


def stalled_call(port: int, method: str, request: bytes) -> socket.socket:
    """A call whose caller stopped reading its socket (a hung or SIGSTOPped process): the
    largest HTTP/2 windows and a small socket buffer, never read, so that the server's
    writes block in TCP, where a frame to end the call cannot pass either. The socket's
    close ends the call."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect(("127.0.0.1", port))
    largest = 2**31 - 1
    settings = http2_frame(4, 0, 0, (4).to_bytes(2, "big") + largest.to_bytes(4, "big"))
    window = http2_frame(8, 0, 0, (largest - 65535).to_bytes(4, "big"))  # the connection's, past its 65,535
    connection.sendall(HTTP2_PREFACE + settings + window)
    return _call(connection, method, (request,))


def _call(connection: socket.socket, method: str, requests: tuple[bytes, ...]) -> socket.socket:
    """Opens stream 1 for ``method`` and sends ``requests`` (HPACK literals, no compression)."""
    path = f"/tritarget.v1.TargetAssigner/{method}".encode()
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"127.0.0.1"),
               (b"content-type", b"application/grpc"), (b"te", b"trailers")]  # fmt: skip
    block = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in headers)  # HPACK literals
    connection.sendall(http2_frame(1, 0x4, 1, block))
    for i, request in enumerate(requests):
        last = method != "AssignStream" and i == len(requests) - 1
        connection.sendall(http2_frame(0, 0x1 if last else 0, 1, b"\x00" + len(request).to_bytes(4, "big") + request))
    return connection


def http2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


@contextlib.contextmanager
def peer_recording_server() -> Iterator[tuple[str, set[str]]]:
    """A real gRPC server on loopback that answers Assign and AssignStream with empty
    responses and records each call's peer (client address and port: one per
    connection). Yields its address and the set of peers seen."""
    peers, lock = set(), threading.Lock()

    def record(request: bytes, context) -> bytes:
        with lock:
            peers.add(context.peer())
        return b""  # an empty AssignResponse: answered, no error

    def record_stream(requests, context):
        for _ in requests:
            yield record(b"", context)

    with fake_assigner(record, record_stream) as address:
        yield address, peers


@contextlib.contextmanager
def fake_assigner(assign, assign_stream, get_anchors=None) -> Iterator[str]:
    """A real gRPC server on loopback whose Assign, AssignStream (and GetAnchors, when
    given) are the given handlers (raw bytes in and out); yields its address."""
    handlers = {"Assign": grpc.unary_unary_rpc_method_handler(assign),
                "AssignStream": grpc.stream_stream_rpc_method_handler(assign_stream)}  # fmt: skip
    if get_anchors is not None:
        handlers["GetAnchors"] = grpc.unary_unary_rpc_method_handler(get_anchors)
    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tritarget.v1.TargetAssigner", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
