"""The ``tritarget`` command.

``tritarget demo``: compute targets for a synthetic COCO-like batch in-process and
print a summary per image.

``tritarget serve``: run the gRPC service until SIGTERM / Ctrl-C / SIGHUP (``--port 0`` picks
a free port; the bound port is printed).

``tritarget up``: the main command. Serve on localhost (auto backend), send one
demo request through the client once the server is warm, print a summary of the
targets that came back, and keep serving until Ctrl-C.

``tritarget request``: send that demo request to a running server.

``tritarget loadtest``: drive a running server (``tritarget.clients.loadtest``).

``tritarget anchors``: fit and check anchors on a dataset (``tritarget.clients.anchor_design``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .arguments import Parser, batch_seed, integer, number, target_address, timeout_seconds
from .output import exit_status, while_read
from .stop_signals import STOP_SIGNALS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    try:
        return _run_demo(args)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. --backend triton without a GPU
        print(f"tritarget demo: {exc}", file=sys.stderr)
        return 2


def _check_demo_batch(batch: int, config, canvas: tuple[int, int]) -> int:
    """A demo batch's anchors per image; a batch over a request's bound in the service
    (images x anchors) refused before it is built: 20000 x 20000 took minutes and 9 GB,
    `request --batch 1000000` 3.5 minutes and 1.1 GB before the server refused it."""
    from tritarget.kernels import resolve_grid

    from .codec import Limits

    num_anchors = resolve_grid(config.anchors, canvas).num_anchors
    limit = Limits().max_anchor_rows
    if batch * num_anchors > limit:
        raise ValueError(f"{batch} images x {num_anchors:,} anchors is over {limit:,} (a request's bound in the "
                         "service); use a smaller --batch or --canvas")  # fmt: skip
    return num_anchors


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from tritarget.kernels import assign, presets
    from tritarget.kernels.api import resolve_backend
    from tritarget.kernels.workload import coco_like_batch, default_canvas

    config = presets.get(args.preset)
    canvas = tuple(args.canvas) if args.canvas else default_canvas(config)
    num_anchors = _check_demo_batch(args.batch, config, canvas)
    boxes, counts, classes = coco_like_batch(args.batch, seed=args.seed, canvas=canvas)
    device = torch.device("cuda" if args.backend in ("auto", "triton") and torch.cuda.is_available() else "cpu")
    backend = resolve_backend(args.backend, device)
    print(f"preset {args.preset}: {num_anchors:,} anchors on a {canvas[0]}x{canvas[1]} canvas")
    print(f"batch of {args.batch} COCO-like images, {sum(counts)} boxes; backend {backend} on {device}")
    boxes, classes = boxes.to(device), classes.to(device)
    assign(boxes, counts, canvas, config, gt_classes=classes, backend=backend)  # warm-up (caches, compile)
    start = time.perf_counter()
    targets = assign(boxes, counts, canvas, config, gt_classes=classes, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"{'image':>5} {'boxes':>5} {'positive':>9} {'negative':>9} {'ignored':>9}")
    for i, (count, row) in enumerate(zip(counts, targets.summary())):
        print(f"{i:>5} {count:>5} {row['positive']:>9,} {row['negative']:>9,} {row['ignored']:>9,}")
    print(f"assigned in {elapsed * 1000:.1f} ms ({elapsed * 1000 / args.batch:.1f} ms per image)")
    return 0


def _server_options(args: argparse.Namespace):
    from .backend import BatchOptions
    from .codec import Limits
    from .server import ServerOptions

    tls_cert, tls_key = _tls_files(args.tls_cert, args.tls_key)
    if args.metrics_host is not None and args.metrics_port is None:
        raise ValueError("--metrics-host needs --metrics-port (metrics are off without it)")
    if args.metrics_host is not None and not args.metrics_host.strip("[] "):  # was --host's, silently
        raise ValueError("--metrics-host: empty; give an address, or leave it out to use --host's")
    # Checked here, by their flags' names, not in each worker after forking.
    if args.max_batch_images is not None and args.max_batch_images > args.max_queue_images:
        raise ValueError(f"--max-batch-images {args.max_batch_images} is over --max-queue-images "
                         f"{args.max_queue_images}: requests queue in slices of up to --max-batch-images")  # fmt: skip
    if max(args.warmup_canvas) > Limits.max_canvas_side:
        raise ValueError(f"--warmup-canvas {args.warmup_canvas[0]} {args.warmup_canvas[1]}: over the server's "
                         f"canvas limit of {Limits.max_canvas_side} pixels a side")  # fmt: skip
    return ServerOptions(
        host=args.host,
        port=args.port,
        backend=args.backend,
        limits=Limits(
            max_message_bytes=args.max_message_mb << 20,
            max_images=args.max_request_images,
            max_boxes=args.max_request_boxes,
            max_unsent_bytes=args.max_unsent_mb << 20,
        ),
        batching=BatchOptions(
            max_batch_images=args.max_batch_images,
            max_queue_delay_s=args.max_queue_delay_ms / 1000,
            max_queue_images=args.max_queue_images,
            compute_workers=args.compute_workers,
            inline_max_images=args.inline_max_images,
        ),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        token=_server_token(args),
        tls_cert=tls_cert,
        tls_key=tls_key,
        warmup_preset=args.warmup_preset,
        warmup_canvas=tuple(args.warmup_canvas),
        grace_s=args.grace,
        max_streams_per_connection=args.max_streams_per_connection,
        connection_idle_s=args.connection_idle_s,
        connection_age_s=args.connection_age_s,
        access_log=not args.no_access_log,
        gpu_wait=args.gpu_wait,
    )


def _server_token(args: argparse.Namespace) -> str | None:
    """The bearer token to require: --token-file, --token or env TRITARGET_TOKEN (an empty
    one given on purpose is refused: ``command_line_token``)."""
    from tritarget.clients.client import bearer_token, command_line_token

    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read()
        except OSError as exc:
            raise ValueError(f"--token-file {args.token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--token-file {args.token_file}: not UTF-8 text; put the token in it") from None
        if not token.strip():
            raise ValueError(f"--token-file {args.token_file}: empty; put the token in it")
        return bearer_token(token, f"--token-file {args.token_file}")
    return command_line_token(args.token, "serve")


def _tls_files(cert_path: str | None, key_path: str | None) -> tuple[bytes | None, bytes | None]:
    """The PEM certificate chain and key, checked as a pair here: gRPC reports a bad one
    only as a failed bind, like a busy port."""
    if cert_path is None and key_path is None:
        return None, None
    if cert_path is None or key_path is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    import ssl

    files = []
    for flag, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        try:
            with open(path, "rb") as f:
                files.append(f.read())
        except OSError as exc:
            raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    try:  # a password-protected key is refused, not prompted for: gRPC cannot use one
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {cert_path} / --tls-key {key_path}: not a PEM certificate chain and its "
                         f"matching unencrypted key ({exc.reason or exc})") from None  # fmt: skip
    return files[0], files[1]


def _passive_openmp() -> None:
    """Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning.

    After each parallel torch op they otherwise spin for a while, and on a CPU server that
    steals the cores the compute worker's kernel threads, the event loop and gRPC need
    (measured on 2 cores: the server's CPU per image halved at one request in flight).
    An explicit ``OMP_WAIT_POLICY`` in the environment wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_LOG_FORMAT = "%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


def _check_metrics_ports(options, workers: int) -> None:
    """Worker i serves /metrics on --metrics-port + i: each a port, none the service's."""
    if options.metrics_port and options.metrics_port + workers - 1 > 65535:
        raise ValueError(f"--metrics-port {options.metrics_port} with {workers} workers: worker i serves "
                         "metrics on --metrics-port + i, which must be at most 65535")  # fmt: skip
    if options.metrics_port and options.metrics_port == options.port and workers == 1:
        raise ValueError(f"--metrics-port {options.metrics_port} is --port {options.port}: give each its own port")
    if options.metrics_port and options.metrics_port <= options.port < options.metrics_port + workers:
        raise ValueError(f"--metrics-port {options.metrics_port} with {workers} workers: worker i serves "
                         f"metrics on --metrics-port + i, and one would be --port {options.port}")  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    _passive_openmp()
    from .server import serve

    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT.format(who=""))
    try:
        options = _server_options(args)
        cores = _usable_cores()
        workers = front_ends(args.workers, options.port, cores)
        _check_metrics_ports(options, workers)
        _warn_of_a_token_in_the_clear("serve", options)
        how = "--workers" if args.workers else f"--workers auto: {cores} cores, port {options.port}"
        # Nobody reads the status lines, or none can be written: served all the same.
        while_read(_announce_as)("tritarget serve:", f"{workers} front-end process(es) ({how})")
        if workers > 1:
            return _serve_workers(options, workers, cores)
        _cap_torch_threads(cores)
        asyncio.run(serve(options))
    except (ValueError, OSError) as exc:
        print(f"tritarget serve: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"tritarget serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _cap_torch_threads(cores: int) -> None:
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), cores))  # torch counts a quota's node's cores


def _usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: those it may run on (a container's cpuset; all of
    them where the platform cannot say, as on macOS), at most its container's CPU quota
    rounded up (a Kubernetes CPU limit: threads for every core of the node would spend
    the quota early in each period and then stall until the next)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cpu_quota(cgroup: str) -> float | None:
    """Cores' worth of CPU time per period that the container's cgroup allows (v2
    ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None: no quota, or not in a container
    (the root cgroup has none)."""
    try:
        with open(os.path.join(cgroup, "cpu.max")) as f:
            quota, period = f.read().split()  # "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(cgroup, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(cgroup, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period  # -1: no quota
    except (OSError, ValueError):
        return None


def front_ends(workers: int | None, port: int, cores: int) -> int:
    """Server processes for ``serve``: ``workers`` when given, else one per 4 cores, at
    most 4, when the port is fixed (processes share a port only by its number).

    One Python front end decodes, batches and encodes ~1,000-1,800 8-image requests/s,
    whatever computes them: on a 16-core H200 machine 1 / 2 / 4 front ends served 9.1k /
    19.9k / 30.0k images/s to 64 unary callers (run7, run6, run9; README, "On a GPU",
    whose table has the streams' and later runs' figures); each costs a CUDA context or its share
    of the cores' torch threads. Eight served 10-43% more than four in the two runs that
    had both (run10, run12: 26.3k against 18.4k, 31.5k against 28.7k), with front ends
    whose workers spun while waiting for the GPU; the default stays 4 until a run with
    sleeping waits (``--gpu-wait``) compares them again (``gpu_service_ab.sh``,
    ``AB_WORKERS``)."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {workers}")
        if workers > 1 and port == 0:
            raise ValueError("--workers needs a fixed --port (the workers share it)")
        return workers
    return 1 if port == 0 else max(1, min(4, cores // 4))


def _warn_of_a_token_in_the_clear(command: str, options) -> None:
    """A bearer token sent over plaintext beyond this machine is readable on the way: served
    all the same (a private network, a proxy that ends TLS), but said."""
    if options.token and options.tls_cert is None and not _loopback_only(options.host):
        print(f"tritarget {command}: warning: a bearer token without TLS on {options.host}: callers send it "
              "across the network in the clear; give --tls-cert and --tls-key, or bind a loopback address",
              file=sys.stderr, flush=True)  # fmt: skip


def _demo_address(host: str, port: int, tls: bool) -> str:
    """Where ``up``'s demo request goes: with TLS to a loopback or any-address host, by the
    name a local certificate holds, localhost (``--host [::1]`` went to ``[::1]``)."""
    from .server import host_port

    local = tls and host.strip("[]") in ("127.0.0.1", "0.0.0.0", "::1", "::")
    return host_port("localhost" if local else host, port)


def _loopback_only(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except (socket.gaierror, UnicodeError, ValueError):
        return False
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _announce_as(prefix: str, text: str, file=None, flush: bool = True) -> None:
    # One write per line: the workers share one stdout, and print() writes the text and
    # the newline separately, so two workers' lines could interleave on one line. A
    # worker's server announces through it as through print (``flush`` included).
    stream = file if file is not None else sys.stdout
    if stream is None:  # stdout closed (`>&-`): nobody to tell
        return
    stream.write(f"{prefix} {text}\n")
    if flush:
        stream.flush()


def _serve_workers(options, workers: int, cores: int) -> int:
    """``workers`` server processes on one port (SO_REUSEPORT; the kernel spreads the
    connections), forked before any gRPC object or torch thread pool exists. SIGTERM /
    SIGINT to this parent drains every worker, and so does a worker's failure: the others
    stop too and this exits 1, for the supervisor to restart the whole server rather than
    have it serve on short of workers (2 where a worker found a usage error, as one
    process would). Worker i serves metrics on ``metrics_port + i`` (any free port each
    with 0); each gets an equal share of the cores for torch."""
    from .server import hold_port

    # The workers bind with SO_REUSEPORT, which would let them join another server's port
    # (sharing its traffic) instead of failing as a single process does: the port is
    # held from this check on, for the life of the workers.
    held = hold_port(options.host, options.port)
    try:
        return _run_workers(options, workers, cores, held)
    finally:
        for sock in held:
            sock.close()


def _run_workers(options, workers: int, cores: int, held) -> int:
    import dataclasses

    from .server import bind_refusal, host_port, serve

    for i in range(workers if options.metrics_port else 0):  # else one worker would serve, then all stop
        port = options.metrics_port + i
        host = options.metrics_host or options.host
        refusal = bind_refusal(host, port)
        if refusal is not None:
            raise OSError(f"metrics port {host_port(host, port)} (worker {i}) {refusal}")
    threads = max(1, cores // workers)
    parent = os.getpid()
    running: dict[int, int] = {}  # pid -> worker index, of the workers not yet reaped
    stopping = []  # set once the workers are told to stop: until then any worker's exit is a failure

    def forward(signum, frame) -> None:
        stopping.append(signum)
        # Only to the workers not yet reaped: a reaped one's PID may be another process's
        # by now (a second stop signal during the drain SIGTERMed one that had taken it).
        for child in list(running):  # as SIGTERM, the one stop signal a worker takes
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    # A stop signal that comes while the workers start is held (in the parent until every
    # worker exists, in each worker until its event loop handles it), not lost in logging's
    # after-fork hook nor taken by a worker's default action (killed: read as a failure).
    stops = set(STOP_SIGNALS)
    for stop_signal in stops:
        signal.signal(stop_signal, forward)
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    for i in range(workers):
        metrics_port = options.metrics_port and options.metrics_port + i  # None: none; 0: any free port
        worker = dataclasses.replace(options, reuse_port=True, metrics_port=metrics_port)
        pid = os.fork()
        if pid == 0:
            for sock in held:  # the parent's hold on the port; this worker binds its own
                sock.close()
            # Ctrl-C (and a closed terminal's SIGHUP) reaches every process of the terminal's
            # group: the parent forwards it, once, as SIGTERM (taken here too, it would
            # reach a worker twice).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _end_with(parent)
            for handler in logging.getLogger().handlers:  # the workers share stderr
                handler.setFormatter(logging.Formatter(_LOG_FORMAT.format(who=f"[worker {i}] ")))
            import torch

            torch.set_num_threads(threads)
            code = 0
            try:
                announce = functools.partial(_announce_as, f"[worker {i}]")
                asyncio.run(serve(worker, announce=announce, stop_signals=(signal.SIGTERM,)))
            except BaseException as exc:  # a worker reports and exits; the parent sees the code
                _announce_as(f"[worker {i}]", f"failed: {exc}", sys.stderr)
                code = 2 if isinstance(exc, (ValueError, OSError)) else 1  # as one process exits
            os._exit(code)
        running[pid] = i
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    status = 0
    while running:
        pid, index, code = _reap(running)
        if index is None:
            continue
        # A worker that failed, or stopped on its own (a signal sent to it alone drains it
        # and it exits 0): the others would serve on, short of it, with nothing said.
        if (code or not stopping) and not status:
            status = code if code > 0 else 1  # 2: a usage error (bad flag, port taken), as one process
            if running and not stopping:  # (once stopping, another SIGTERM would cut their grace short)
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                _announce_as("tritarget serve:", f"worker {index} (pid {pid}) stopped ({how}); stopping the others",
                             sys.stderr)  # fmt: skip
                forward(signal.SIGTERM, None)
    return status


def _reap(running: dict[int, int]) -> tuple[int, int | None, int]:
    """The next child to end: (pid, its worker index, exit code; negative: killed by that
    signal), taken out of ``running`` before it is reaped, so that no signal is sent to
    its PID once another process may have it (an unreaped child keeps its PID). The index
    is None for a child that is no worker."""
    pid = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid
    index = running.pop(pid, None)
    return pid, index, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _end_with(parent: int) -> None:
    """A worker drains and stops (SIGTERM) when its parent dies, even by SIGKILL, instead
    of serving on as an orphan that holds the port (Linux; elsewhere the parent's SIGTERM
    and SIGINT still reach every worker)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def send_demo_request(target: str, *, preset: str, batch: int, seed: int, token=None, root_certificates=None,
                      timeout: float = 120.0) -> None:  # fmt: skip
    """One COCO-like batch through ``TargetClient``; prints what came back per image."""
    from tritarget.clients import TargetClient
    from tritarget.clients.wire import build_request, decode_response
    from tritarget.kernels import presets
    from tritarget.kernels.workload import coco_like_batch, default_canvas

    from .codec import dense_response_bytes

    canvas = default_canvas(presets.get(preset))
    _check_demo_batch(batch, presets.get(preset), canvas)
    boxes, counts, classes = coco_like_batch(batch, seed=seed, canvas=canvas)
    request = build_request(boxes, counts, canvas, preset=preset, gt_classes=classes, format="sparse")
    with TargetClient(target, token=token, root_certificates=root_certificates, timeout=timeout) as client:
        start = time.perf_counter()
        response = client.assign_raw(request)
        elapsed = time.perf_counter() - start
    targets = decode_response(response, request)
    dense_bytes = dense_response_bytes(batch, targets.num_anchors, request, targets.background_class)
    print(f"demo request to {target}: {batch} COCO-like images ({sum(counts)} boxes), preset {preset}, "
          f"{targets.num_anchors:,} anchors per image on a {canvas[0]}x{canvas[1]} canvas")  # fmt: skip
    print(f"{'image':>5} {'boxes':>5} {'positive':>9} {'negative':>9} {'ignored':>9}")
    for i, (count, row) in enumerate(zip(counts, targets.summary())):
        print(f"{i:>5} {count:>5} {row['positive']:>9,} {row['negative']:>9,} {row['ignored']:>9,}")
    print(f"round trip {elapsed * 1000:.1f} ms; SPARSE response {response.ByteSize():,} bytes "
          f"(DENSE would be {dense_bytes:,}, {dense_bytes / max(response.ByteSize(), 1):.0f}x more)")  # fmt: skip


def _request(args: argparse.Namespace) -> int:
    from tritarget.clients import TargetServiceError
    from tritarget.clients.client import command_line_token, read_root_certificates

    try:
        token = command_line_token(args.token, "call")
    except ValueError as exc:
        print(f"tritarget request: {exc}", file=sys.stderr)
        return 2
    try:
        root = read_root_certificates(args.tls_ca) if args.tls_ca else None
    except ValueError as exc:
        print(f"tritarget request: --tls-ca {exc}", file=sys.stderr)
        return 2
    try:
        send_demo_request(args.target, preset=args.preset, batch=args.batch, seed=args.seed, token=token,
                          root_certificates=root, timeout=args.timeout)  # fmt: skip
    except TargetServiceError as exc:  # a hung server or a listener that is none: named by the client
        print(f"tritarget request: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an address, token or option the client refuses before sending
        print(f"tritarget request: {exc}", file=sys.stderr)
        return 2
    return 0


def _up(args: argparse.Namespace) -> int:
    _passive_openmp()
    from tritarget.kernels import presets
    from tritarget.kernels.workload import default_canvas

    from .server import serve

    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT.format(who=""))
    if not args.no_access_log:  # the calls `tritarget request` makes show up here, as with serve
        logging.getLogger("tritarget.access").setLevel(logging.INFO)
    try:
        options = _server_options(args)
        _check_metrics_ports(options, 1)
        if args.batch > options.limits.max_images:  # the demo request this server would refuse
            raise ValueError(f"--batch {args.batch} is over --max-request-images {options.limits.max_images}")
        _check_demo_batch(args.batch, presets.get(args.preset), default_canvas(presets.get(args.preset)))
    except (ValueError, OSError) as exc:
        print(f"tritarget up: {exc}", file=sys.stderr)
        return 2
    _warn_of_a_token_in_the_clear("up", options)
    _cap_torch_threads(_usable_cores())

    failed = []

    async def demo(server) -> None:
        address = _demo_address(options.host, server.port, tls=options.tls_cert is not None)
        try:
            await _on_a_daemon_thread(functools.partial(
                send_demo_request, address, preset=args.preset, batch=args.batch, seed=args.seed,
                token=options.token, root_certificates=options.tls_cert, timeout=30.0,
            ))  # fmt: skip
        except Exception as exc:  # `up` is there to show targets coming back: it stops instead
            print(f"tritarget up: the demo request failed: {exc}", file=sys.stderr, flush=True)
            failed.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop
            return
        needs = (f" --tls-ca {args.tls_cert}" if options.tls_cert else "") + (" --token TOKEN" if options.token else "")
        print(f"service running on {address} (Ctrl-C to stop); try: tritarget request --target {address}{needs}",
              flush=True)  # fmt: skip

    try:
        asyncio.run(serve(options, on_ready=demo))
    except OSError as exc:
        flag = "--metrics-port" if str(exc).startswith("metrics port") else "--port"
        # Another port helps where the port is taken, not where the host is wrong.
        hint = f" (another port: {flag} N, or {flag} 0 for any free one)" if "in use" in str(exc) else ""
        print(f"tritarget up: {exc}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:  # options the server refuses as it starts: a usage error, as for serve
        print(f"tritarget up: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the warm-up failed
        print(f"tritarget up: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


async def _on_a_daemon_thread(function: Callable[[], Any]) -> Any:
    """``function()`` on a thread of its own that nothing waits for: ``asyncio.to_thread``'s
    are joined when the loop closes, so Ctrl-C during a demo request that was retrying
    waited for its whole timeout (30 s)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not done.done():  # cancelled: the server stopped meanwhile
            done.set_result(result) if exc is None else done.set_exception(exc)

    def run() -> None:
        try:
            result, exc = function(), None
        except BaseException as failure:  # handed to the awaiting coroutine
            result, exc = None, failure
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="tritarget-up-demo", daemon=True).start()
    return await done


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    from tritarget.kernels import BACKENDS, presets

    from .gpu_wait import GPU_WAITS

    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    port = integer(0, 65535)
    parser.add_argument("--port", type=port, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: triton on a GPU, else cpu")
    parser.add_argument("--metrics-port", type=port,
                        help="Prometheus /metrics HTTP port (default: off; 0 = any; worker i of --workers: "
                             "port + i)")  # fmt: skip
    parser.add_argument("--metrics-host", help="address for /metrics (default: --host)")
    parser.add_argument(
        "--max-message-mb",
        type=integer(1, 2047),
        default=256,  # gRPC's limits are int32 bytes
        help="max response size (default 256; at most 2047); requests are bounded by "
        "--max-request-boxes and --max-request-images",
    )
    parser.add_argument("--max-unsent-mb", type=integer(1, 1 << 30), default=4096,
                        help="responses built and not yet read by their callers, all calls together, in "
                             "bytes on the wire (memory: up to 2.5x that); past it a unary call is refused "
                             "RESOURCE_EXHAUSTED, a stream's request waits (default 4096)")  # fmt: skip
    parser.add_argument("--max-request-images", type=integer(1), default=256, help="images per request (default 256)")
    parser.add_argument(
        "--max-request-boxes", type=integer(1), default=100_000, help="boxes per request (default 100000)"
    )
    # At most what one triton launch takes (CUDA's grid limit on the image axis).
    parser.add_argument("--max-batch-images", type=integer(1, 65_535),
                        help="images per merged batch (default: 128 on a CPU, 64 on a GPU)")  # fmt: skip
    parser.add_argument("--max-queue-delay-ms", type=number(0, high=10_000), default=0.0,
                        help="extra wait to fill a batch (default 0: merge what queues while busy)")  # fmt: skip
    parser.add_argument("--max-queue-images", type=integer(1), default=1024, help="queue bound (default 1024 images)")
    # A thread (and on a GPU a CUDA stream and buffers) each: thousands only cost memory.
    parser.add_argument("--compute-workers", type=integer(1, 256),
                        help="concurrent batches (default: 1 on a CPU; 2 on a GPU, one CUDA stream each; "
                             "at most 256)")  # fmt: skip
    parser.add_argument("--gpu-wait", choices=GPU_WAITS, default="block",
                        help="how compute threads wait for the GPU: block (asleep until it signals; default) or "
                             "spin (a core busy per waiting thread, a wake-up sooner)")  # fmt: skip
    parser.add_argument("--inline-max-images", type=integer(0), default=8,
                        help="cpu backend: a SPARSE request of up to this many images, 16 boxes and crowd "
                             "regions times as many in all and 2^18 anchors per image, that finds the server idle "
                             "(for 0.5 ms) is computed on the event loop, without the hand-over to a compute worker "
                             "and back (default 8; 0: never)")  # fmt: skip
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="require 'authorization: Bearer TOKEN' (or env TRITARGET_TOKEN)")
    token.add_argument("--token-file", help="read the bearer token from a file")
    parser.add_argument("--tls-cert", help="PEM certificate chain (TLS on with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--warmup-preset", default="retinanet_torchvision", choices=presets.names(),
                        help="preset of the warm-up batch run before health is SERVING; your traffic's has its "
                             "anchors built before the first request (default retinanet_torchvision)")  # fmt: skip
    parser.add_argument("--warmup-canvas", type=integer(1), nargs=2, default=(800, 1344), metavar=("H", "W"),
                        help="canvas of the warm-up batch run before health is SERVING (default 800 1344)")  # fmt: skip
    parser.add_argument("--grace", type=number(0), default=10.0,
                        help="seconds for calls in flight at shutdown (default 10)")  # fmt: skip
    parser.add_argument("--max-streams-per-connection", type=integer(1, 2**31 - 1), default=4096,
                        help="calls one connection may have open at once; more wait in the caller until one "
                             "ends (default 4096)")  # fmt: skip
    parser.add_argument("--connection-idle-s", type=number(0, above=True), default=300.0,
                        help="a connection with no call open for this long is closed (default 300; at most "
                             "~24.8 days, gRPC's limit)")  # fmt: skip
    parser.add_argument("--connection-age-s", type=number(0, above=True), default=1800.0,
                        help="a connection this old is asked to reconnect, its calls given 60 s more: a caller "
                             "that never reads holds no memory for longer (default 1800; at most ~24.8 "
                             "days)")  # fmt: skip
    parser.add_argument("--no-access-log", action="store_true",
                        help="no INFO line per call (method, id, images, boxes, code, ms, peer, reason)")  # fmt: skip


def _add_workers_flag(parser: argparse.ArgumentParser) -> None:
    # A process each, with torch and on a GPU its own CUDA context: 10,000 would start
    # 10,000 of them before the first failed.
    parser.add_argument("--workers", type=integer(1, 256),
                        help="server processes sharing --port via SO_REUSEPORT (default: one per 4 cores, at most "
                             "4, with a fixed --port; 1 with --port 0; at most 256); worker i serves metrics on "
                             "--metrics-port + i")  # fmt: skip


def _add_demo_request_flags(parser: argparse.ArgumentParser) -> None:
    from tritarget.kernels import presets

    parser.add_argument("--preset", default="retinanet_torchvision", choices=presets.names(),
                        help="the demo request's preset (default retinanet_torchvision)")  # fmt: skip
    parser.add_argument("--batch", type=integer(1), default=4, help="images in the demo request (default 4)")
    parser.add_argument("--seed", type=batch_seed, default=0, help="seed of the COCO-like images (default 0)")


def versions() -> str:
    """This package's version and those of the stack under it, as a bug report needs them
    (a package missing says so: triton on a CPU machine, tritarget itself run from a source
    tree that was never installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{package} {of(package)}" for package in ("torch", "triton", "grpcio", "protobuf"))
    return f"tritarget {of('tritarget')} ({stack}, Python {platform.python_version()})"


class _PrintVersions(argparse.Action):
    """``--version``: one line, unwrapped (argparse's own version action wraps it to the
    terminal), read only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions of tritarget and its stack, and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from tritarget.kernels import BACKENDS, presets

    parser = Parser(prog="tritarget", description="Object-detection training targets.")
    parser.add_argument("--version", action=_PrintVersions)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compute targets for a synthetic COCO-like batch in-process")
    demo.add_argument("--preset", default="retinanet_torchvision", choices=presets.names(),
                      help="default retinanet_torchvision")  # fmt: skip
    demo.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: triton on a GPU, else cpu")
    demo.add_argument("--batch", type=integer(1), default=4, help="images in the batch (default 4)")
    demo.add_argument("--canvas", type=integer(1), nargs=2, metavar=("H", "W"),
                      help="canvas size (default: the preset's: 800 1344; SSD300 300 300, d2l 256 256, "
                           "yolov5 640 640)")  # fmt: skip
    demo.add_argument("--seed", type=batch_seed, default=0, help="seed of the COCO-like images (default 0)")
    demo.set_defaults(handler=_demo)

    up = commands.add_parser("up", help="serve on localhost, send a demo request, keep serving until Ctrl-C")
    _add_server_flags(up)
    _add_demo_request_flags(up)
    up.set_defaults(handler=_up)

    serve = commands.add_parser("serve", help="run the gRPC service until SIGTERM, Ctrl-C or SIGHUP")
    _add_server_flags(serve)
    _add_workers_flag(serve)
    serve.set_defaults(handler=_serve)

    request = commands.add_parser("request", help="send a demo request to a running service")
    request.add_argument(
        "--target", type=target_address, default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)"
    )
    request.add_argument("--token", help="bearer token (or env TRITARGET_TOKEN)")
    request.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server")
    request.add_argument("--timeout", type=timeout_seconds, default=120.0,
                         help="seconds to wait for the answer, retrying while none answers (default 120)")  # fmt: skip
    _add_demo_request_flags(request)
    request.set_defaults(handler=_request)

    from tritarget.clients.anchor_design.cli import add_parser as add_anchors_parser
    from tritarget.clients.loadtest_cli import add_parser as add_loadtest_parser

    add_anchors_parser(commands)  # tritarget anchors {check,fit,show}
    add_loadtest_parser(commands)  # tritarget loadtest
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stderr is None:  # no stderr at all (`2>&-`): print(file=None) would put errors into stdout's report
        sys.stderr = open(os.devnull, "w")  # the process's stderr from now on, open until it exits

    def run() -> int:
        try:
            args = build_parser().parse_args(argv)  # imports torch: seconds a Ctrl-C may land in
            return args.handler(args)
        except KeyboardInterrupt:  # Ctrl-C where a command has no handler of its own (importing, demo, request)
            print("tritarget: interrupted", file=sys.stderr)
            return 130

    return exit_status("tritarget", run)


def entry() -> None:
    """The ``tritarget`` command: ``main``'s exit status, kept. In the interpreter's
    teardown (half a second with torch imported) the stop signals' default action was
    back, and a SIGTERM then (a supervisor's, a Ctrl-C's second press) replaced a failed
    server's 1 with death by that signal, which a supervisor reads as a clean stop and
    does not restart. Once the status is decided, a stop signal ends the process at once
    with it while exit handlers run (one may wait: multiprocessing's for client processes
    still alive), and is ignored after them, when Python would have put the default action
    back. (Ignored, not blocked: a process's signal goes to any of its threads that does
    not block it, torch's and gRPC's included.)"""
    atexit.register(_ignore_stop_signals)  # registered first, it runs after every exit handler registered later
    try:
        status = main()
    except SystemExit as done:  # --help, a usage error: argparse's status
        status = done.code
    code = status if isinstance(status, int) else int(status is not None)

    def exit_now(signum, frame) -> None:
        with contextlib.suppress(Exception):  # a reader gone: what is unflushed is lost either way
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, exit_now)
    sys.exit(status)


def _ignore_stop_signals() -> None:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


if __name__ == "__main__":
    entry()
