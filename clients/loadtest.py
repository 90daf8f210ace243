"""``tritarget loadtest``: drive a tritarget service and report throughput and latency.

    report = run(LoadTestOptions(targets=("127.0.0.1:50051",), duration_s=10, concurrency=16, verify=20))
    print(report.table())

* Closed loop (default): ``concurrency`` callers, each sends its next request when the
  previous one is answered: the service's capacity at that concurrency.
* Open loop (``rate``): requests start on a fixed schedule whatever the answers do, and
  each latency counts from the request's *scheduled* start, so a stalled server shows in
  the latencies instead of silently slowing the senders (no coordinated omission).
* Unary ``Assign`` calls, or ``stream=True``: ``concurrency`` ``AssignStream`` calls with
  up to ``window`` requests in flight each (closed loop) or fed on the schedule (open).
* ``processes`` client processes share the work (one machine's cores); the targets are
  addresses, several of them (round robin) or a ``dns:///`` name. Each caller or stream
  has its own connection (open loop: ``concurrency`` connections), as separate data
  loaders would, so front ends sharing a port (``serve --workers N``) share the load.
* The workload (``Workload``) is a cycle of distinct requests built once: COCO-like or
  ``boxes`` per image, ``images`` per request, SPARSE or DENSE, float16 deltas.
* The first ``warmup_s`` seconds are not measured. Latencies go into HDR histograms
  (microseconds, 3 significant digits), per second and overall; errors are counted by
  gRPC code (stream items by their in-band code).
* ``verify=K``: K answered requests are recomputed in-process and compared (labels and
  matched boxes exactly, deltas within float tolerance); any difference fails the run.

No calls are retried: a load test reports what the service did.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import multiprocessing
import platform
import queue as queue_module
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from hdrh.histogram import HdrHistogram

from tritarget.kernels import Targets, assign, presets
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch
from tritarget.protos import target_assigner_pb2 as pb

from .client import _channel_options
from .wire import build_request, decode_response

__all__ = ["Workload", "LoadTestOptions", "Report", "run", "verify_response"]

# Connections per target and client process: callers beyond take turns on them (a
# thousand callers in one process would otherwise hold a thousand sockets).
_MAX_CONNECTIONS = 64
_ASSIGN = "/tritarget.v1.TargetAssigner/Assign"
_STREAM = "/tritarget.v1.TargetAssigner/AssignStream"
# Latencies in microseconds, from 1 us to 1 hour, 3 significant digits (0.1% error).
_HISTOGRAM = (1, 3_600_000_000, 3)
_PROGRESS_S = 0.5


def _histogram() -> HdrHistogram:
    return HdrHistogram(*_HISTOGRAM)


@dataclass(frozen=True)
class Workload:
    """What every request carries; request ``i`` of the cycle is built from seed ``seed + i``."""

    preset: str = "retinanet_torchvision"
    canvas: tuple[int, int] = COCO_CANVAS
    images: int = 8  # per request
    boxes: int | None = None  # per image; None: COCO-like (log-normal, mean ~7)
    format: str = "sparse"
    fp16: bool = False
    variants: int = 16  # distinct requests, cycled through
    seed: int = 0

    def __post_init__(self) -> None:
        presets.get(self.preset)  # KeyError naming the known presets
        if self.images < 1 or self.variants < 1:
            raise ValueError(f"images and variants must be >= 1, got {self.images} and {self.variants}")
        if self.boxes is not None and self.boxes < 0:
            raise ValueError(f"boxes: must be >= 0 per image, got {self.boxes}")
        if self.format not in ("sparse", "dense"):
            raise ValueError(f"format: must be 'sparse' or 'dense', got {self.format!r}")

    def batch(self, index: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        return coco_like_batch(self.images, seed=self.seed + index, canvas=self.canvas, boxes_per_image=self.boxes)

    def request(self, index: int) -> pb.AssignRequest:
        boxes, counts, classes = self.batch(index)
        return build_request(
            boxes, counts, self.canvas, preset=self.preset, gt_classes=classes, format=self.format,
            delta_dtype="float16" if self.fp16 else "float32", request_id=f"loadtest-{index}",
        )  # fmt: skip

    def describe(self) -> str:
        boxes = "COCO-like" if self.boxes is None else f"{self.boxes} boxes per image,"
        return (f"{self.preset} {self.canvas[0]}x{self.canvas[1]}, {self.images} {boxes} images per request, "
                f"{self.format.upper()} {'float16' if self.fp16 else 'float32'} deltas")  # fmt: skip


@dataclass(frozen=True)
class LoadTestOptions:
    targets: tuple[str, ...]
    workload: Workload = field(default_factory=Workload)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 8  # callers (unary) or streams, all processes together; open loop: connections
    rate: float | None = None  # open loop: requests per second, all processes together
    stream: bool = False
    window: int = 1  # closed-loop stream: requests in flight per stream
    processes: int = 1
    timeout_s: float = 60.0
    token: str | None = None
    tls_ca: bytes | None = None
    verify: int = 0
    verify_backend: str = "auto"

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give at least one address")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"duration must be > 0 and warm-up >= 0, got {self.duration_s}, {self.warmup_s}")
        if self.concurrency < 1 or self.processes < 1 or self.window < 1:
            raise ValueError("concurrency, processes and window must be >= 1")
        if self.concurrency < self.processes:
            raise ValueError(f"concurrency ({self.concurrency}) is shared by the processes: give at least "
                             f"{self.processes}")  # fmt: skip
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate: must be > 0 requests/s, got {self.rate}")
        if self.verify < 0:
            raise ValueError(f"verify: must be >= 0, got {self.verify}")

    def describe(self) -> str:
        kind = "stream" if self.stream else "unary"
        loop = f"open loop at {self.rate:g} requests/s" if self.rate else "closed loop"
        who = f"{self.concurrency} {'streams' if self.stream else 'callers'}"
        if self.stream and not self.rate:
            who += f" x {self.window} in flight"
        if self.rate and not self.stream:
            who = f"a call per scheduled request over {self.concurrency} connections"
        return (f"{', '.join(self.targets)}: {kind}, {loop}, {who}, {self.processes} process(es), "
                f"{self.duration_s:g} s (+{self.warmup_s:g} s warm-up)")  # fmt: skip


# --------------------------------------------------------------------------- one process


class _Recorder:
    """One process's measurements: overall and per-second histograms, errors by code,
    and answered responses kept for verification."""

    def __init__(self, measure_from: float, keep: int) -> None:
        self.measure_from = measure_from
        self.overall = _histogram()
        self.interval = _histogram()  # since the last progress update
        self.seconds: dict[int, list] = {}  # second -> [ok, errors, histogram]
        self.errors: Counter[str] = Counter()
        self.interval_errors: Counter[str] = Counter()
        self.warmup_requests = 0
        self.kept: list[tuple[int, bytes]] = []
        self._keep = keep

    def record(self, scheduled: float, done: float, code: str | None, index: int, response: Any) -> None:
        if scheduled < self.measure_from:
            self.warmup_requests += 1
            return
        second = int(scheduled - self.measure_from)
        bucket = self.seconds.get(second)
        if bucket is None:  # not setdefault: a histogram costs ~10% of a caller's CPU per response
            bucket = self.seconds[second] = [0, 0, _histogram()]
        if code is not None:
            self.errors[code] += 1
            self.interval_errors[code] += 1
            bucket[1] += 1
            return
        micros = max(1, int((done - scheduled) * 1e6))
        for histogram in (self.overall, self.interval, bucket[2]):
            histogram.record_value(micros)
        bucket[0] += 1
        if len(self.kept) < self._keep:
            self.kept.append((index, response.SerializeToString()))

    def progress(self) -> dict:
        update = {"histogram": self.interval.encode(), "errors": dict(self.interval_errors)}
        self.interval = _histogram()
        self.interval_errors = Counter()
        return update

    def result(self) -> dict:
        return {
            "histogram": self.overall.encode(),
            "errors": dict(self.errors),
            "warmup_requests": self.warmup_requests,
            "seconds": {s: (ok, bad, h.encode()) for s, (ok, bad, h) in self.seconds.items()},
            "kept": self.kept,
        }


def _code(error: grpc.RpcError) -> str:
    return error.code().name


def _in_band_code(response: pb.AssignResponse) -> str | None:
    if not response.HasField("error"):
        return None
    return next((c.name for c in grpc.StatusCode if c.value[0] == response.error.code), "UNKNOWN")


class _Driver:
    """The callers of one process, on one event loop."""

    def __init__(self, options: LoadTestOptions, index: int, updates) -> None:
        self.options = options
        self.index = index
        self.updates = updates
        self.requests = [options.workload.request(i) for i in range(options.workload.variants)]
        self.metadata = (("authorization", f"Bearer {options.token}"),) if options.token else ()
        # This process's callers or streams: its share of the concurrency.
        self.share = options.concurrency // options.processes + (index < options.concurrency % options.processes)
        self.turn = itertools.count()  # the next request of the cycle
        self.endpoint_turn = itertools.count()

    def _channels(self) -> list[grpc.aio.Channel]:
        """A connection per caller or stream of this process (at most 64), to each
        target. Front-end processes sharing a port (`serve --workers N`) are handed
        connections, not calls: over one connection per process, 8 processes reached 4
        such front ends 3/1/3/1, and the open loop overloaded the two with 3 (a training
        job's data-loader workers each hold their own)."""
        # Channels alike in target and options share one connection unless each keeps
        # its own subchannel pool.
        channel_options = [*_channel_options(1 << 30, ()), ("grpc.use_local_subchannel_pool", 1)]
        targets = [t for _ in range(min(self.share, _MAX_CONNECTIONS)) for t in self.options.targets]
        if self.options.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.options.tls_ca)
            return [grpc.aio.secure_channel(t, credentials, options=channel_options) for t in targets]
        return [grpc.aio.insecure_channel(t, options=channel_options) for t in targets]

    def _next_request(self) -> tuple[int, pb.AssignRequest]:
        i = next(self.turn) % len(self.requests)
        return i, self.requests[i]

    async def run(self) -> dict:
        options = self.options
        channels = self._channels()
        self.unary = [c.unary_unary(_ASSIGN, pb.AssignRequest.SerializeToString, pb.AssignResponse.FromString)
                      for c in channels]  # fmt: skip
        self.streams = [c.stream_stream(_STREAM, pb.AssignRequest.SerializeToString, pb.AssignResponse.FromString)
                        for c in channels]  # fmt: skip
        now = time.perf_counter()
        self.measure_from = now + options.warmup_s
        self.end = self.measure_from + options.duration_s
        self.recorder = _Recorder(self.measure_from, keep=options.verify)
        reporter = asyncio.ensure_future(self._report())
        # The load's own CPU, from here: a client process's start-up (Python, torch, gRPC:
        # seconds of CPU) is not the cost of its requests.
        cpu = time.process_time()
        try:
            if options.stream:
                await asyncio.gather(*[self._stream(k) for k in range(self.share)])
            elif options.rate:
                await self._open_loop_unary()
            else:
                await asyncio.gather(*[self._closed_caller() for _ in range(self.share)])
        finally:
            reporter.cancel()
            for channel in channels:
                await channel.close()
        return {**self.recorder.result(), "cpu_s": time.process_time() - cpu, "window_s": time.perf_counter() - now}

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_S)
            self.updates.put(("progress", self.index, self.recorder.progress()))

    async def _unary(self, scheduled: float) -> None:
        i, request = self._next_request()
        call = self.unary[next(self.endpoint_turn) % len(self.unary)]
        code, response = None, None
        try:
            response = await call(request, timeout=self.options.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            code = _code(error)
        self.recorder.record(scheduled, time.perf_counter(), code, i, response)

    async def _closed_caller(self) -> None:
        while (now := time.perf_counter()) < self.end:
            await self._unary(now)

    def _schedule(self):
        """This process's scheduled start times: its share of ``rate``, interleaved with
        the other processes'."""
        interval = self.options.processes / self.options.rate
        start = time.perf_counter() + self.index * interval / self.options.processes
        for k in itertools.count():
            at = start + k * interval
            if at >= self.end:
                return
            yield at

    async def _open_loop_unary(self) -> None:
        tasks = set()
        for at in self._schedule():
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            task = asyncio.ensure_future(self._unary(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _stream(self, k: int) -> None:
        """One stream, reopened after a failure (its unanswered requests count as errors)."""
        if self.options.rate:
            schedule = itertools.islice(self._schedule(), k, None, self.share)
        else:
            schedule = None
        while time.perf_counter() < self.end:
            if await self._one_stream(self.streams[next(self.endpoint_turn) % len(self.streams)], schedule):
                return

    async def _one_stream(self, open_stream, schedule) -> bool:
        """Whether every request this stream was to send has been sent and answered."""
        in_flight: deque[tuple[int, float]] = deque()
        slots = asyncio.Semaphore(self.options.window)
        finished = asyncio.Event()

        async def requests():
            try:
                while True:
                    if schedule is None:
                        await slots.acquire()
                        at = time.perf_counter()
                        if at >= self.end:
                            return
                    else:
                        at = next(schedule, None)
                        if at is None:
                            return
                        await asyncio.sleep(max(0.0, at - time.perf_counter()))
                    i, request = self._next_request()
                    in_flight.append((i, at))
                    yield request
            finally:
                finished.set()

        call = open_stream(requests(), timeout=self.options.timeout_s + self.options.duration_s + self.options.warmup_s,
                           metadata=self.metadata)  # fmt: skip
        try:
            async for response in call:
                i, at = in_flight.popleft()
                self.recorder.record(at, time.perf_counter(), _in_band_code(response), i, response)
                slots.release()
            return True
        except grpc.RpcError as error:
            now = time.perf_counter()
            while in_flight:
                i, at = in_flight.popleft()
                self.recorder.record(at, now, _code(error), i, None)
            await asyncio.sleep(0.05)  # a refusing server: do not spin
            return finished.is_set()
        finally:
            call.cancel()


def _drive_process(options: LoadTestOptions, index: int, updates) -> None:
    torch.set_num_threads(1)  # a client process builds messages; the cores are the server's
    _drive(options, index, updates)


def _drive(options: LoadTestOptions, index: int, updates) -> None:
    """One client process (or thread): run, then report the result on ``updates``."""
    try:
        result = asyncio.run(_Driver(options, index, updates).run())
        updates.put(("done", index, result))
    except BaseException as exc:  # the parent reports it
        updates.put(("failed", index, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    options: LoadTestOptions
    requests: int  # answered without error in the measured period
    errors: dict[str, int]
    warmup_requests: int
    latency: HdrHistogram  # microseconds
    series: list[dict]  # per second: second, ok, errors, requests_per_s, images_per_s, p50_ms, p99_ms
    verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    # CPU seconds the client processes spent sending and receiving (warm-up included, their
    # start-up not; with one process, this whole process's, its gRPC threads included), and
    # the longest of their warm-up + measured windows in seconds.
    client_cpu_s: float = 0.0
    window_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches and self.requests > 0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.options.duration_s

    def percentiles_ms(self) -> dict[str, float]:
        if not self.latency.get_total_count():
            return {}
        values = {f"p{p:g}": self.latency.get_value_at_percentile(p) / 1000 for p in (50, 90, 99, 99.9)}
        values["max"] = self.latency.get_max_value() / 1000
        values["mean"] = self.latency.get_mean_value() / 1000
        return values

    def summary(self) -> dict:
        images = self.options.workload.images
        return {
            "target": list(self.options.targets),
            "mode": self.options.describe(),
            "workload": self.options.workload.describe(),
            "options": {**asdict(self.options), "tls_ca": None, "token": None},
            "machine": f"{platform.node()} ({platform.machine()}, {multiprocessing.cpu_count()} cores)",
            "requests": self.requests,
            "errors": self.errors,
            "warmup_requests": self.warmup_requests,
            "requests_per_s": self.requests_per_s,
            "images_per_s": self.requests_per_s * images,
            "latency_ms": self.percentiles_ms(),
            "verified": self.verified,
            "mismatches": self.mismatches,
            "ok": self.ok,
            "client_cpu_s": self.client_cpu_s,
            "client_cores_busy": self.client_cpu_s / self.window_s if self.window_s else 0.0,
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"tritarget loadtest — {s['mode']}", f"workload: {s['workload']}", ""]
        lines.append(f"{'requests':>10} {'errors':>8} {'req/s':>9} {'images/s':>9}")
        lines.append(f"{self.requests:>10,} {sum(self.errors.values()):>8,} {s['requests_per_s']:>9.1f} "
                     f"{s['images_per_s']:>9.1f}")  # fmt: skip
        latency = s["latency_ms"]
        if latency:
            lines += ["", "latency (ms)   " + "  ".join(f"{k:>8}" for k in latency),
                      "               " + "  ".join(f"{v:>8.2f}" for v in latency.values())]  # fmt: skip
        if self.errors:
            lines += ["", "errors by code: " + ", ".join(f"{c} {n:,}" for c, n in sorted(self.errors.items()))]
        if self.window_s:  # near one core per client process: the load generator may be the limit
            busy, processes = s["client_cores_busy"], self.options.processes
            lines += ["", f"load generator: {self.client_cpu_s:.1f} CPU s in {self.window_s:.1f} s "
                          f"({busy:.2f} cores busy, {processes} process(es))"]  # fmt: skip
        if self.options.verify:
            if self.mismatches:
                lines += ["", f"verify: {len(self.mismatches)} of {self.verified} responses differ:"]
                lines += [f"  {m}" for m in self.mismatches[:10]]
            else:
                lines += ["", f"verify: {self.verified} responses recomputed in-process, all equal"]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({**self.summary(), "series": self.series}, indent=2) + "\n")

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(_SERIES_FIELDS))
            writer.writeheader()
            writer.writerows(self.series)

    def plot(self, path: str | Path) -> None:
        """Throughput and latency (p50, p99) per second (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seconds = [row["second"] for row in self.series]
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        top.plot(seconds, [row["images_per_s"] for row in self.series], marker="o")
        top.set_ylabel("images/s")
        top.set_ylim(bottom=0)
        top.set_title(f"tritarget loadtest: {self.options.workload.describe()}", fontsize=8)
        for key in ("p50_ms", "p99_ms"):
            bottom.plot(seconds, [row[key] for row in self.series], marker="o", label=key.replace("_ms", ""))
        bottom.set_ylabel("latency (ms)")
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel(f"second of the run ({self.options.describe()})", fontsize=7)
        bottom.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


_SERIES_FIELDS = ("second", "ok", "errors", "requests_per_s", "images_per_s", "p50_ms", "p99_ms")


def _merge(options: LoadTestOptions, results: list[dict]) -> Report:
    latency = _histogram()
    errors: Counter[str] = Counter()
    seconds: dict[int, list] = {}
    for result in results:
        latency.decode_and_add(result["histogram"])
        errors.update(result["errors"])
        for second, (ok, bad, encoded) in result["seconds"].items():
            bucket = seconds.setdefault(second, [0, 0, _histogram()])
            bucket[0] += ok
            bucket[1] += bad
            bucket[2].decode_and_add(encoded)
    series = []
    for second in sorted(s for s in seconds if s < options.duration_s):
        ok, bad, histogram = seconds[second]
        series.append({
            "second": second, "ok": ok, "errors": bad, "requests_per_s": ok,
            "images_per_s": ok * options.workload.images,
            "p50_ms": histogram.get_value_at_percentile(50) / 1000 if ok else None,
            "p99_ms": histogram.get_value_at_percentile(99) / 1000 if ok else None,
        })  # fmt: skip
    return Report(options, latency.get_total_count(), dict(errors), sum(r["warmup_requests"] for r in results),
                  latency, series, client_cpu_s=sum(r["cpu_s"] for r in results),
                  window_s=max(r["window_s"] for r in results))  # fmt: skip


# --------------------------------------------------------------------------- verification


def verify_response(workload: Workload, index: int, response: pb.AssignResponse, backend: str = "auto") -> str | None:
    """None if ``response`` holds the targets of request ``index`` of ``workload`` as
    computed in-process, else what differs."""
    boxes, counts, classes = workload.batch(index)
    config = presets.get(workload.preset)
    expected = assign(boxes, counts, workload.canvas, config, gt_classes=classes, backend=backend)
    try:
        got = decode_response(response)
    except Exception as exc:
        return f"request {index}: the response does not decode: {exc}"
    return _difference(index, got, expected, workload.fp16)


def _difference(index: int, got: Targets, expected: Targets, fp16: bool) -> str | None:
    where = f"request {index}"
    if got.labels.shape != expected.labels.shape:
        return f"{where}: labels shape {list(got.labels.shape)} != {list(expected.labels.shape)}"
    bad = got.labels != expected.labels
    if bad.any():
        image, anchor = (int(v) for v in torch.nonzero(bad)[0])
        return (f"{where}: {int(bad.sum())} labels differ, first image {image} anchor {anchor}: "
                f"{int(got.labels[image, anchor])} != {int(expected.labels[image, anchor])}")  # fmt: skip
    positive = expected.labels == 1
    if not torch.equal(got.matched_gt[positive], expected.matched_gt[positive]):
        return f"{where}: matched boxes of positives differ"
    if got.classes is not None and not torch.equal(got.classes[positive], expected.classes[positive]):
        return f"{where}: classes of positives differ"
    want = expected.deltas[positive]
    if fp16:
        want = want.to(torch.float16).float()
    tolerance = 1e-3 if fp16 else 1e-5
    if not torch.allclose(got.deltas[positive].float(), want, rtol=tolerance, atol=tolerance):
        worst = float((got.deltas[positive].float() - want).abs().max())
        return f"{where}: deltas of positives differ by up to {worst:.3g} (tolerance {tolerance:g})"
    return None


# --------------------------------------------------------------------------- running it


def run(options: LoadTestOptions, progress: bool = False) -> Report:
    """Run the load test and return its report (``progress``: a live line on stderr)."""
    if options.processes == 1:  # in this process, on a thread: no start-up cost
        updates: Any = queue_module.Queue()
        workers = [threading.Thread(target=_drive, args=(options, 0, updates), daemon=True)]
    else:
        context = multiprocessing.get_context("spawn")  # no inherited gRPC or torch state
        updates = context.Queue()
        workers = [context.Process(target=_drive_process, args=(options, i, updates), daemon=True)
                   for i in range(options.processes)]  # fmt: skip
    for worker in workers:
        worker.start()
    results = _collect(options, updates, len(workers), progress)
    for worker in workers:
        worker.join(options.timeout_s)
    report = _merge(options, results)
    if options.verify:
        kept = [item for result in results for item in result["kept"]][: options.verify]
        for index, raw in kept:
            mismatch = verify_response(options.workload, index, pb.AssignResponse.FromString(raw),
                                       options.verify_backend)  # fmt: skip
            if mismatch is not None:
                report.mismatches.append(mismatch)
        report.verified = len(kept)
        if len(kept) < options.verify:
            report.mismatches.append(f"only {len(kept)} answered requests to verify, {options.verify} asked")
    return report


def _collect(options: LoadTestOptions, updates, workers: int, progress: bool) -> list[dict]:
    """Every worker's result; meanwhile a live line: throughput, p50/p99, errors."""
    from tqdm import tqdm

    total = options.warmup_s + options.duration_s
    bar = tqdm(total=round(total, 1), file=sys.stderr, disable=not progress, dynamic_ncols=True, desc="loadtest",
               bar_format="{desc} {bar:20} {n:.0f}/{total:.0f} s{postfix}")  # fmt: skip
    start = time.monotonic()
    results: dict[int, dict] = {}
    interval, errors = _histogram(), Counter()
    last = time.monotonic()
    deadline = start + total + options.timeout_s + 60
    while len(results) < workers:
        try:
            kind, index, payload = updates.get(timeout=1.0)
        except queue_module.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError("load test workers did not finish") from None
            continue
        if kind == "failed":
            raise RuntimeError(f"load test worker {index} failed: {payload}")
        if kind == "done":
            results[index] = payload
            continue
        interval.decode_and_add(payload["histogram"])
        errors.update(payload["errors"])
        now = time.monotonic()
        if now - last >= _PROGRESS_S * 0.9:
            count = interval.get_total_count()
            if now - start < options.warmup_s:
                bar.set_postfix_str("warming up")
            else:
                bar.set_postfix_str(
                    f"{count / (now - last):.0f} req/s, p50 {interval.get_value_at_percentile(50) / 1000:.1f} ms, "
                    f"p99 {interval.get_value_at_percentile(99) / 1000:.1f} ms, "
                    f"errors {dict(errors) if errors else 0}"
                )  # fmt: skip
            bar.n = round(min(now - start, total), 1)
            bar.refresh()
            interval, last = _histogram(), now
    bar.n = bar.total
    bar.close()
    return [results[i] for i in sorted(results)]
