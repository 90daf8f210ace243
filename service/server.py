"""The gRPC server: wiring, warm-up, health, reflection, metrics, shutdown.

``create_server(options) -> (server, port)`` binds (port 0 picks a free port, which
is what the tests do) without serving; ``await server.start()`` serves;
``serve(options)`` runs until SIGTERM, SIGINT or SIGHUP and shuts down gracefully: health answers
NOT_SERVING while calls in flight finish (up to ``grace_s``), new calls get UNAVAILABLE;
a second stop signal cuts the grace period short (the calls still in flight are cancelled).

``serve`` also tunes glibc's allocator for a long-running process
(``tritarget.kernels.keep_freed_memory``).

Health (``grpc.health.v1``) reports NOT_SERVING until the warm-up batch has run
(loading the backend, compiling its kernels, caching the anchors), then SERVING,
for both the overall server ("") and ``tritarget.v1.TargetAssigner``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tritarget.clients.client import bearer_token
from tritarget.kernels import keep_freed_memory, presets
from tritarget.protos import target_assigner_pb2 as pb

from .auth import BearerTokenInterceptor
from .backend import AssignJob, Batcher, BatchOptions, load_backend
from .codec import Limits
from .errors import DeviceLost
from .gpu_wait import GPU_WAITS, gpu_wait_in_effect
from .health import Health
from .metrics import Metrics
from .output import while_read
from .servicer import TargetAssignerServicer, add_to_server, add_unknown_method_handler
from .stop_signals import STOP_SIGNALS

__all__ = ["ServerOptions", "TargetServer", "create_server", "serve", "host_port", "hold_port", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TargetAssigner"].full_name


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC and its users write it: an IPv6 literal in brackets
    (``[::1]:50051``), whether or not ``host`` came with them."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_BIND_HINTS = {
    errno.EADDRINUSE: "in use?",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "ports below 1024 need privileges",
}


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, address) of every address of ``host`` (``localhost``: ::1 and 127.0.0.1),
    as gRPC binds them; ``socket.gaierror`` for a host without one."""
    found = []
    for family, _, _, _, address in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM):
        if (family, address) not in found:
            found.append((family, address))
    return found


# An address of a family or an address this machine has not (IPv6 switched off, where the
# hosts file still lists ::1 for localhost, as container runtimes write it): skipped while
# another of the host's addresses binds, as gRPC skips it.
_ABSENT = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)

# Time a connection past ServerOptions.connection_age_s gets for its calls in flight: a
# DENSE batch takes seconds; a caller that reads nothing is let go after it.
_CONNECTION_AGE_GRACE_S = 60.0


_INT32_MAX = 2**31 - 1  # gRPC's channel options are C ints


def _milliseconds(seconds: float) -> int:
    """gRPC's int32 milliseconds, at most ~24.8 days (its limit)."""
    return min(max(round(seconds * 1000), 1), _INT32_MAX)


def _bindable(host: str, port: int) -> tuple[list[tuple[int, tuple]], str | None]:
    """(the addresses of ``host`` a plain socket binds on ``port``, None), or ([], why not
    as ``(hint): reason``)."""
    try:
        addresses = _addresses(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        return [], f"(no address is known for host {host!r}): {getattr(exc, 'strerror', None) or exc}"
    bindable, absent = [], None
    for family, address in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            where = f" on {address[0]}" if len(addresses) > 1 else ""
            refusal = f"({_BIND_HINTS.get(exc.errno, 'cannot bind')}): {exc.strerror}{where}"
            if exc.errno not in _ABSENT:
                return [], refusal
            absent = absent or refusal
            continue
        bindable.append((family, address))
    return (bindable, None) if bindable else ([], absent)


def bind_refusal(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, as ``(hint): reason``, or None where a plain
    socket binds every address of the host this machine has (as gRPC binds: a port in
    TIME_WAIT is free). gRPC's own failure reads the same for a busy port, an unknown host,
    an address of another machine and a privileged port; and gRPC serves where one address
    of several binds (``localhost`` on ::1 alone, another process on 127.0.0.1)."""
    return _bindable(host, port)[1]


def hold_port(host: str, port: int) -> list[socket.socket]:
    """Sockets bound, not listening, to every address of ``host`` on ``port`` with
    SO_REUSEPORT alone, held while ``serve --workers`` runs: its workers, which bind with
    SO_REUSEPORT, join them, where another server's check (``bind_refusal``) and any bind
    without SO_REUSEPORT fail (Linux). Between a check and the workers' binds (each loads
    its backend first: seconds on a GPU) a second ``serve --workers`` passed the check and
    shared the port. Not listening, they take no connections. ``OSError`` naming the
    reason if one cannot bind."""
    addresses, refusal = _bindable(host, port)
    if refusal is not None:
        raise OSError(f"could not bind {host_port(host, port)} {refusal}")
    held = []
    try:
        for family, address in addresses:
            held.append(socket.socket(family, socket.SOCK_STREAM))
            held[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # no SO_REUSEADDR: a check with it fails
            held[-1].bind(address)
    except OSError as exc:  # taken since the check
        for sock in held:
            sock.close()
        raise OSError(f"could not bind {host_port(host, port)} ({_BIND_HINTS.get(exc.errno, 'cannot bind')}): "
                      f"{exc.strerror}") from None  # fmt: skip
    return held


@dataclass(frozen=True)
class ServerOptions:
    """The server's settings: what ``tritarget serve``'s flags set (reflection is always on,
    for grpcurl and other languages' clients).

    token: bearer token every call must carry (None: no auth).
    tls_cert, tls_key: PEM server certificate chain and key (None: plaintext).
    metrics_port: Prometheus /metrics HTTP port (None: off; 0: any free port).
    warmup_preset, warmup_canvas: the warm-up batch that runs before SERVING.
    reuse_port: let several processes bind the same port (SO_REUSEPORT; ``--workers``).
    access_log: one INFO line per call on the ``tritarget.access`` logger (method, request
        id, images, boxes, code, milliseconds, the caller's address, a failure's reason).
    gpu_wait: how threads wait for the GPU, "block" (asleep) or "spin" (``gpu_wait``): a
        setting of the whole process, made only where the server is its first CUDA user.
    max_streams_per_connection, connection_idle_s, connection_age_s: what one connection
        may hold, and for how long (``_CONNECTION_AGE_GRACE_S`` more for its calls in
        flight once it is too old). gRPC sets no limit: one connection opened 30,000
        streams (1.1 GB), 20,000 connections that sent the HTTP/2 preface and then nothing
        took every file descriptor, and a caller that never read its DENSE responses held
        ``max_unsent_bytes`` (every other DENSE call refused) for as long as it kept its
        connection. Clients reconnect and retry UNAVAILABLE, and streams send their
        unanswered requests again, so a closed connection costs them a handshake. Calls a
        connection opens past the stream limit wait in the caller's gRPC, which queues them
        once the server's settings have reached it, until a call of that connection ends
        or their deadline passes (a caller holding that many streams open waits its whole
        timeout), hence a limit well above one caller's concurrency; a burst sent before
        the settings arrive may be refused UNAVAILABLE, which our client retries.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "auto"
    limits: Limits = field(default_factory=Limits)
    batching: BatchOptions = field(default_factory=BatchOptions)
    metrics_port: int | None = None
    metrics_host: str | None = None
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    warmup_preset: str = "retinanet_torchvision"
    warmup_canvas: tuple[int, int] = (800, 1344)
    grace_s: float = 10.0
    access_log: bool = True
    reuse_port: bool = False
    gpu_wait: str = "block"
    max_streams_per_connection: int = 4096
    connection_idle_s: float = 300.0
    connection_age_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.token is not None:  # read as the clients read theirs; "" served every caller
            if not isinstance(self.token, str):
                raise ValueError(f"token: expected a str, got {type(self.token).__name__}")
            object.__setattr__(self, "token", bearer_token(self.token, "token"))
        streams = self.max_streams_per_connection
        if not (isinstance(streams, int) and 1 <= streams <= _INT32_MAX):  # gRPC's settings are int32
            raise ValueError(f"max_streams_per_connection: expected an integer in 1 .. {_INT32_MAX}, got {streams!r}")
        for name in ("connection_idle_s", "connection_age_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name}: expected a finite number of seconds > 0, got {value!r}")
        if self.gpu_wait not in GPU_WAITS:
            raise ValueError(f"gpu_wait: expected one of {', '.join(GPU_WAITS)}, got {self.gpu_wait!r}")
        if self.metrics_host is not None and not self.metrics_host.strip("[] "):  # was --host's, silently
            raise ValueError("metrics_host: empty; give an address, or none to use host's")
        # Checked here, not by the warm-up: an unknown preset there left the server
        # NOT_SERVING for good, a bad canvas failed it only after binding.
        if self.warmup_preset not in presets.names():
            raise ValueError(f"warmup_preset: unknown preset {self.warmup_preset!r}")
        if len(self.warmup_canvas) != 2 or not all(isinstance(side, int) and side >= 1 for side in self.warmup_canvas):
            raise ValueError(f"warmup_canvas: expected (height, width) of integers >= 1, got {self.warmup_canvas!r}")
        if max(self.warmup_canvas) > self.limits.max_canvas_side:  # no request could use it; it may not fit
            raise ValueError(f"warmup_canvas: {self.warmup_canvas[0]} x {self.warmup_canvas[1]} is over the "
                             f"server's canvas limit of {self.limits.max_canvas_side} pixels a side")  # fmt: skip


class TargetServer:
    """One bound server; see the module docstring."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.backend, self.device = load_backend(options.backend, options.gpu_wait)
        # What the process has (a context created before the server keeps its own); None on a CPU.
        self.gpu_wait = gpu_wait_in_effect(self.device) if self.device.type == "cuda" else None
        self.metrics = Metrics()
        self.batcher = Batcher(
            self.backend,
            options.batching,
            device=self.device,
            on_batch=self._observe_batch,
            on_queued=self.metrics.queue_seconds.observe,
            on_copied=self.metrics.device_to_host_bytes.inc,
            on_inline=self.metrics.inline_batches.inc,
            on_device_lost=self._device_lost,
        )
        # Read when /metrics is scraped, not set on every arrival and batch.
        self.metrics.queued_images.set_function(lambda: self.batcher.queued_images)
        self.servicer = TargetAssignerServicer(
            self.batcher, options.limits, self.metrics, access_log=options.access_log
        )
        self.metrics.waiting_requests.set_function(
            lambda: self.batcher.waiting_requests + self.servicer.waiting_requests
        )
        self.health = Health()
        limits = options.limits
        interceptors = (
            [BearerTokenInterceptor(options.token, self.metrics, access_log=options.access_log)]
            if options.token
            else []
        )
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                ("grpc.max_send_message_length", limits.max_message_bytes),
                # Share the port only on purpose (``workers`` > 1): a second server started
                # by mistake on a busy port must fail, not silently take half the traffic.
                ("grpc.so_reuseport", 1 if options.reuse_port else 0),
                # Clients ping every 30 s to find dead connections (ours do: keepalive_time_ms):
                # gRPC's default (a ping per 5 min without data, 2 strikes) ended an idle stream
                # with GOAWAY "too_many_pings" after 2-2.5 min (a trainer validating between epochs).
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # The same with no call open (grpc-js and grpc-go keep idle connections so;
                # gRPC allowed one ping per 2 h there: the 4th, 30 s apart, got GOAWAY).
                # Idle connections still close after connection_idle_s.
                ("grpc.keepalive_permit_without_calls", 1),
                # Calls gRPC has taken in but the event loop has not yet picked up: past 1,000
                # (gRPC's default, dropping at random up to 3,000) gRPC answered them CANCELLED,
                # which reads as the caller's own doing, before the queue bound could answer
                # RESOURCE_EXHAUSTED (a burst of 3,000 calls on 2 cores: 715 CANCELLED). A
                # backlog of 20,000 means the loop cannot keep up even to refuse: gRPC sheds then.
                ("grpc.server.max_pending_requests", 20_000),
                ("grpc.server.max_pending_requests_hard_limit", 40_000),
                ("grpc.max_concurrent_streams", options.max_streams_per_connection),
                ("grpc.max_connection_idle_ms", _milliseconds(options.connection_idle_s)),
                ("grpc.max_connection_age_ms", _milliseconds(options.connection_age_s)),
                ("grpc.max_connection_age_grace_ms", _milliseconds(_CONNECTION_AGE_GRACE_S)),
            ],
        )
        add_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        add_unknown_method_handler(self.grpc, names, self.metrics, access_log=options.access_log)
        address = host_port(options.host, options.port)
        reason = "no address bound"
        if options.port and not options.reuse_port:
            # gRPC serves where one of the host's addresses binds: on localhost's ::1 alone,
            # with 127.0.0.1's port another process's. (Workers bind beside their parent's
            # hold on the port, which checked it.)
            refusal = bind_refusal(options.host, options.port)
            if refusal is not None:
                raise OSError(f"could not bind {address} {refusal}")
        try:
            if options.tls_cert is not None or options.tls_key is not None:
                if options.tls_cert is None or options.tls_key is None:
                    raise ValueError("TLS needs both a certificate and a key")
                credentials = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
                self.port = self.grpc.add_secure_port(address, credentials)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as exc:
            self.port, reason = 0, str(exc).split(";")[0]
        if self.port == 0:
            refusal = bind_refusal(options.host, options.port)
            if refusal is None:  # the port is free: gRPC refused the certificate or key, or the host (its log says)
                hint = "the TLS certificate / key rejected?" if options.tls_cert else "gRPC cannot use it: check --host"
                refusal = f"({hint}): {reason}"
            raise OSError(f"could not bind {address} {refusal}")
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self.warmup_error: BaseException | None = None
        self.settled = asyncio.Event()  # warm-up finished, well or not
        self.lost = asyncio.Event()  # the GPU failed for good (``batcher.lost`` says how): serve() stops
        self._warmup: asyncio.Task | None = None

    def _observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.metrics.batch_images.observe(images)
        self.metrics.batch_requests.observe(requests)
        self.metrics.compute_seconds.observe(seconds)

    def _device_lost(self, error: DeviceLost) -> None:
        """Event loop: the batcher found the GPU broken for good. Health turns NOT_SERVING
        at once (load balancers and probes stop sending here); ``serve`` stops the server."""
        self.ready.clear()
        self._lost_health = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self.lost.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.serving.set(status == health_pb2.HealthCheckResponse.SERVING)

    async def start(self) -> None:
        """Serve now; health turns SERVING once the warm-up batch is done."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.batcher.start()
        if self.options.metrics_port is not None:
            host = (self.options.metrics_host or self.options.host).strip("[]")
            self.metrics_port = self.metrics.serve_http(host, self.options.metrics_port)
        await self.grpc.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        config = presets.get(self.options.warmup_preset)
        height, width = self.options.warmup_canvas
        boxes = _warmup_boxes(height, width)
        try:
            await self.batcher.warm_up(AssignJob(config, (height, width), boxes, [boxes.shape[0]]))
        except Exception as exc:
            log.exception("warm-up failed; the server stays NOT_SERVING")
            self.warmup_error = exc
            self.settled.set()
            return
        if self.lost.is_set():  # a request's batch found the GPU broken meanwhile
            self.settled.set()
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.lost.is_set():  # ... or while health was set (its NOT_SERVING came first: set it again)
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.settled.set()
            return
        self.ready.set()
        self.settled.set()
        log.info("warm-up done; serving")

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def stop(self, grace: float | None = None, hurry: asyncio.Event | None = None) -> None:
        """Graceful: health NOT_SERVING while calls in flight finish (up to ``grace``
        seconds, or until ``hurry`` is set; new calls get UNAVAILABLE, streams end
        UNAVAILABLE after answering what they read), then the port closes."""
        grace = self.options.grace_s if grace is None else grace
        hurry = hurry or asyncio.Event()
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        start = time.monotonic()
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        self.servicer.drain()
        self.batcher.drain()
        settling = asyncio.ensure_future(self.servicer.wait_settled(grace))
        settled = await _finished_unless(hurry, settling) and settling.result()
        await self.health.end_watches()
        if settled:
            # Every call of ours is answered: what gRPC still holds are reflection streams,
            # which never end by themselves and would hold the port for the rest of the
            # grace period.
            stopped = await self._grpc_stopped(0.0, hurry)
        else:
            if not hurry.is_set():
                log.warning("calls still in flight or arriving after the %.1f s grace period; cancelling them", grace)
            left = 0.0 if hurry.is_set() else max(0.0, grace - (time.monotonic() - start))
            stopped = await self._grpc_stopped(left, hurry)
        if stopped:  # else the call that holds gRPC's stop holds its task too
            await _calls_ended()
        if settled:
            # Every call is answered, but a batch whose callers went away (their deadline
            # passed) may still be computing: waited for only within what is left of the
            # grace period, or until a second signal (it held a stop 10 s past --grace 1).
            left = max(0.0, grace - (time.monotonic() - start))
            finishing = asyncio.ensure_future(asyncio.wait_for(self.batcher.close(finish=True), left))
            settled = await _finished_unless(hurry, finishing) and finishing.exception() is None
        if not settled:
            # Calls cut off (or let finish in what was left of the grace) wait for no batch:
            # one still computing does not hold the stop.
            await self.batcher.close(finish=False)
        self.servicer.close()
        self.metrics.stop_http()

    async def _grpc_stopped(self, grace: float, hurry: asyncio.Event) -> bool:
        """Whether gRPC's stop ended: calls may finish for ``grace`` seconds (until
        ``hurry``), then are cancelled, and the stop is waited for at most
        ``_GRPC_STOP_SLACK_S`` past that. A call whose peer reads nothing (a hung or
        cut-off client with a response gRPC cannot flush) holds gRPC's stop until its
        connection dies, ~20 s past any grace: the stop goes on without it. Its task is
        never cancelled: cancelling it cancels gRPC's own shutdown future, which its stop
        called again then raised (CancelledError out of ``stop``)."""
        stopping = asyncio.ensure_future(self.grpc.stop(grace))
        hurried = asyncio.ensure_future(hurry.wait())
        done, _ = await asyncio.wait((stopping, hurried), timeout=grace + _GRPC_STOP_SLACK_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        hurried.cancel()
        if hurried in done and not stopping.done():
            # gRPC's stop again, with no grace: it cancels the calls now and waits as the first does.
            cancelling = asyncio.ensure_future(self.grpc.stop(0))
            await asyncio.wait((stopping, cancelling), timeout=_GRPC_STOP_SLACK_S)
        if not stopping.done():
            log.warning("a call's connection still holds gRPC's stop (a client that reads nothing): not waited for")
        return stopping.done()


# A stop signal this soon after the first is the same stop reaching the process twice: a
# signal to the process group (systemd, `timeout`, `kill -TERM -PGID`) reaches a
# `serve --workers` worker both directly and forwarded by its parent.
_SAME_STOP_S = 1.0
# How long past its grace gRPC's stop is waited for: once calls are cancelled it returns in
# milliseconds, unless a connection's peer reads nothing (then ~20 s, until it dies).
_GRPC_STOP_SLACK_S = 1.0


async def _finished_unless(hurry: asyncio.Event, work: asyncio.Future) -> bool:
    """Whether ``work`` finished before ``hurry`` was set (if not, it is cancelled)."""
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait((work, hurried), return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if work.done():
        return True
    work.cancel()
    await asyncio.wait((work,))
    return False


def _warmup_boxes(height: int, width: int):
    import torch

    h, w = float(height), float(width)
    return torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]])


def create_server(options: ServerOptions = ServerOptions()) -> tuple[TargetServer, int]:
    """A bound, not yet started server and its port (the bound one when ``port`` is 0)."""
    server = TargetServer(options)
    return server, server.port


async def serve(
    options: ServerOptions,
    on_ready: Callable[[TargetServer], object] | None = None,
    announce=print,
    stop_signals: tuple[int, ...] | None = None,
) -> None:
    """Serve until one of ``stop_signals``, then shut down gracefully; a second one (a
    second or more after the first) cuts the grace period short.

    ``on_ready(server)`` (a coroutine function or a plain function) runs once health
    is SERVING; ``tritarget up`` sends its demo request from there. If the warm-up
    batch fails, or the GPU fails for good while serving (``DeviceLost``), the server
    stops and ``RuntimeError`` says why: its supervisor restarts it on a fresh context.
    """
    if not keep_freed_memory():
        log.info("not glibc: the allocator keeps its defaults")
    announce = while_read(announce)
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    first_signal = []

    def stop_signalled() -> None:
        if not stop.is_set():
            first_signal.append(loop.time())
            stop.set()
        elif not hurry.is_set() and loop.time() - first_signal[0] >= _SAME_STOP_S:
            announce("second stop signal: cancelling the calls still in flight", flush=True)
            hurry.set()

    stop_signals = STOP_SIGNALS if stop_signals is None else stop_signals
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop_signalled)
    if hasattr(signal, "pthread_sigmask"):  # a `serve --workers` worker starts with them held
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
    # After the handlers: a stop signal while the backend loads (seconds on a GPU) is a
    # stop once the server has started, where asyncio's own Ctrl-C handling cancelled
    # this coroutine inside gRPC's start (its "invalid state" error in the log).
    server, port = create_server(options)
    await server.start()
    scheme = "TLS" if options.tls_cert else "plaintext"
    address = host_port(options.host, port)
    waits = f", GPU waits: {server.gpu_wait}" if server.gpu_wait else ""
    announce(f"tritarget serving on {address} ({scheme}, backend {server.backend} on {server.device}{waits})",
             flush=True)  # fmt: skip
    batching, limits = server.batcher.options, options.limits
    inline = server.batcher.inline_images
    announce(f"batching: up to {batching.max_batch_images} images per batch, {batching.max_queue_delay_s * 1000:g} ms "
             f"queue delay, {batching.compute_workers} compute worker(s) x {batching.threads_per_worker} torch "
             f"thread(s), {f'inline up to {inline} images at an idle server' if inline else 'no inline compute'}, "
             f"queue bound {batching.max_queue_images} images; limits: {limits.max_images} images, "
             f"{limits.max_boxes} boxes, {limits.max_request_bytes / (1 << 20):.1f} MiB per request, "
             f"{limits.max_message_bytes >> 20} MiB per response", flush=True)  # fmt: skip
    if server.metrics_port is not None:
        metrics_at = host_port(options.metrics_host or options.host, server.metrics_port)
        announce(f"metrics on http://{metrics_at}/metrics", flush=True)
    follow_up = loop.create_task(_when_ready(server, on_ready, announce))
    failed = loop.create_task(_warmup_failed(server))
    stopping = loop.create_task(stop.wait())
    lost = loop.create_task(server.lost.wait())
    await asyncio.wait((stopping, failed, lost), return_when=asyncio.FIRST_COMPLETED)
    follow_up.cancel()
    stopping.cancel()
    if lost.done():
        # Calls in flight end at once (each gets DeviceLost, UNAVAILABLE, and retries
        # elsewhere); the grace lets their answers and the streams' ends be sent.
        announce(f"stopping: {server.batcher.lost}", flush=True)
        failed.cancel()
        await server.stop(hurry=hurry)
        raise RuntimeError(f"the GPU failed: {server.batcher.lost}")
    lost.cancel()
    if failed.done():
        announce(f"warm-up failed, stopping: {server.warmup_error}", flush=True)
        await server.stop(grace=0)
        raise RuntimeError(f"warm-up failed: {server.warmup_error}")
    failed.cancel()
    announce("shutting down: finishing calls in flight (a second stop signal cancels them)", flush=True)
    await server.stop(hurry=hurry)
    announce("stopped", flush=True)


async def _calls_ended(timeout: float = 1.0) -> None:
    """Waits for the tasks of the calls gRPC's stop ended (gRPC names them "rpc_task"):
    its stop returns before they have run their last step, and the event loop's end
    would cancel them again, which gRPC logs as an ERROR with two tracebacks (every stop
    with a health Watch or reflection stream open did)."""
    calls = [task for task in asyncio.all_tasks() if task.get_name() == "rpc_task"]
    if calls:
        await asyncio.wait(calls, timeout=timeout)


async def _warmup_failed(server: TargetServer) -> None:
    """Returns only if the warm-up batch failed (a server that cannot compute should not linger)."""
    await server.settled.wait()
    if server.warmup_error is None:
        await asyncio.Event().wait()


async def _when_ready(server: TargetServer, on_ready, announce) -> None:
    await server.ready.wait()
    announce("warm-up done: health is SERVING", flush=True)
    if on_ready is not None:
        result = on_ready(server)
        if asyncio.iscoroutine(result):
            await result
