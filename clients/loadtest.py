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
* ``processes`` client processes share the work (one machine's cores) and begin their
  windows together, once all are ready; the targets are addresses, several of them
  (round robin) or a ``dns:///`` name. Each caller or stream has its own connection
  (open loop: ``concurrency`` connections), as separate data loaders would, so front
  ends sharing a port (``serve --workers N``) share the load; at most 64 per client
  process and target, which more callers share.
* The workload (``Workload``) is a cycle of distinct requests built once: COCO-like or
  ``boxes`` per image, ``images`` per request, SPARSE or DENSE, float16 deltas.
* The first ``warmup_s`` seconds are not measured. Latencies go into HDR histograms
  (microseconds, 3 significant digits), per second and overall; errors are counted by
  gRPC code (stream items by their in-band code).
* ``verify=K``: K answered requests, drawn at random from the whole window, are checked
  against their requests (id, format, delta dtype, what the client checks) and recomputed
  in-process (labels, classes and matched boxes exactly, deltas within float tolerance);
  any difference fails the run.
* Throughput: the requests sent in the window and answered, over the window; in an open
  loop whose answers took longer to come than the window (the server cannot keep up: the
  loop keeps sending at its rate), over the time from the first answer to the last, and
  the report says by how much.
* A stream that fails is reopened until the run ends; its unanswered requests count as
  errors (closed loop: at least one per failed stream; open loop: every scheduled request
  is answered or counted as an error), under the server's code, ``UNANSWERED`` (closed
  without error) or ``ENDED_WHILE_SENDING`` (gRPC's client lost the code: the stream ended
  while a request was being written).
* Ctrl-C (or SIGTERM) during ``run`` stops the clients, or, once the load is over, the
  verification; the report holds what was measured and verified until then, marked
  ``interrupted``; a client process that fails stops the others and is listed in
  ``worker_failures``.

No calls are retried: a load test reports what the service did.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import torch
from hdrh.histogram import HdrHistogram

from tritarget.kernels import Targets, assign, presets
from tritarget.kernels.workload import coco_like_batch, default_canvas
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service.output import WhileRead, write_atomically

from .client import _channel_options, bearer_token, check_target
from .wire import build_request, decode_response

__all__ = ["Workload", "LoadTestOptions", "Report", "run", "verify_response"]

# Connections per target and client process: callers beyond take turns on them (a
# thousand callers in one process would otherwise hold a thousand sockets).
_MAX_CONNECTIONS = 64
# Bounds of a run's callers (or streams), client processes and requests in flight per
# stream: 3 million callers took a 1-second run 61 s and 3.2 GB before it measured anything.
MAX_CONCURRENCY = 16_384
MAX_PROCESSES = 256  # as `serve --workers`
MAX_WINDOW = 1_024
_ASSIGN = "/tritarget.v1.TargetAssigner/Assign"
_STREAM = "/tritarget.v1.TargetAssigner/AssignStream"
# Latencies in microseconds, from 1 us to 1 hour, 3 significant digits (0.1% error).
_HISTOGRAM = (1, 3_600_000_000, 3)
_PROGRESS_S = 0.5
# How long past the run and its last call's timeout the workers may take to report.
_FINISH_SLACK_S = 60.0
_STOP_POLL_S = 0.1  # how soon a client notices that it is asked to stop
_REOPEN_PAUSE_S = 0.05  # between a failed stream and its replacement: a refusing server fails at once
# A stream stops sending after this long and another takes over: a server closes
# connections older than its --connection-age-s (1800 s by default, then 60 s of grace),
# which cut a stream held for a longer run and counted its requests in flight as errors.
_STREAM_ROTATE_S = 60.0
_ROTATED = object()  # what ``_one_stream`` returns for a stream that made way for the next
# Codes after which a closed-loop caller pauses as long before its next call.
_PAUSE_AFTER = (grpc.StatusCode.UNAVAILABLE.name, grpc.StatusCode.RESOURCE_EXHAUSTED.name)
_DETAILS_CHARS = 300  # of an error's message, kept per code for the report
# A stream that the server closed without error before answering every request (no gRPC
# code says so).
_UNANSWERED = "UNANSWERED"
# A stream that ended while a request was being written: gRPC's aio client then replaces the
# server's status (UNAVAILABLE, OK, ...) with a local INTERNAL, so the server's code is lost
# and INTERNAL would blame the server for a race in the client library.
_ENDED_WHILE_SENDING = "ENDED_WHILE_SENDING"
# Open loop: a scheduled request still unsent when the window has closed (plus a little
# slack for the event loop's own timing). Sending it anyway made a load generator short of
# CPU run on for as long as it took to catch up: a 2 s run at 20,000 requests/s lasted 20 s.
_NOT_SENT = "NOT_SENT"
_SEND_SLACK_S = 0.1
# Open loop: a request that goes out this much after its scheduled start counts as late.
_LATE_S = 0.01
# Client processes that began their windows further apart than this are reported.
_START_SKEW_S = 0.1


def _histogram() -> HdrHistogram:
    return HdrHistogram(*_HISTOGRAM)


def _value_at(histogram: HdrHistogram, percentile: float) -> int:
    """The value at ``percentile`` by nearest rank: the smallest recorded value (its bucket's
    highest) with that share of the values at or below it. hdrhistogram's own rounds the rank
    to the nearest count, not up (Java's HdrHistogram rounds up): the p99 of 160 answers was
    the 158th, below the two slowest, 1.25% of them (review 48)."""
    rank = max(1, math.ceil(Fraction(str(percentile)) * histogram.get_total_count() / 100))
    for item in histogram.get_recorded_iterator():
        if item.total_count_to_this_value >= rank:
            return histogram.get_highest_equivalent_value(item.value_iterated_to)
    return 0


_COCO_MEAN_BOXES = 7.3  # boxes per COCO-like image (``coco_like_batch``), on average
_MAX_WORKLOAD_IMAGES = 1 << 20
_MAX_WORKLOAD_BOXES = 50_000_000  # 800 MB of float32 boxes per client process


@dataclass(frozen=True)
class Workload:
    """What every request carries; request ``i`` of the cycle is built from seed ``seed + i``."""

    preset: str = "retinanet_torchvision"
    canvas: tuple[int, int] | None = None  # None: the preset's own (``default_canvas``)
    images: int = 8  # per request
    boxes: int | None = None  # per image; None: COCO-like (log-normal, mean ~7)
    format: str = "sparse"
    fp16: bool = False
    variants: int = 16  # distinct requests, cycled through
    seed: int = 0

    def __post_init__(self) -> None:
        config = presets.get(self.preset)  # KeyError naming the known presets
        if self.canvas is None:
            object.__setattr__(self, "canvas", default_canvas(config))
        if len(self.canvas) != 2 or min(self.canvas) < 1:
            raise ValueError(f"canvas: must be (H, W), both >= 1, got {self.canvas}")
        if self.images < 1 or self.variants < 1:
            raise ValueError(f"images and variants must be >= 1, got {self.images} and {self.variants}")
        if self.boxes is not None and self.boxes < 0:
            raise ValueError(f"boxes: must be >= 0 per image, got {self.boxes}")
        if self.format not in ("sparse", "dense"):
            raise ValueError(f"format: must be 'sparse' or 'dense', got {self.format!r}")
        # Every client process builds every variant before the run: a million images ran
        # past any --duration, silent, and no server takes requests that large anyway.
        boxes = self.variants * self.images * (_COCO_MEAN_BOXES if self.boxes is None else self.boxes)
        if self.variants * self.images > _MAX_WORKLOAD_IMAGES or boxes > _MAX_WORKLOAD_BOXES:
            raise ValueError(
                f"the workload's {self.variants} variants x {self.images} images ({boxes:,.0f} boxes) are over "
                f"{_MAX_WORKLOAD_IMAGES:,} images or {_MAX_WORKLOAD_BOXES:,} boxes: fewer variants, images or boxes"
            )

    def batch(self, index: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        return coco_like_batch(self.images, seed=self.seed + index, canvas=self.canvas, boxes_per_image=self.boxes)

    def request(self, index: int) -> pb.AssignRequest:
        """Request ``index``; the same every time it is built (its sampling seed too: an RPN
        preset's targets are then the same each time, and ``verify_response`` recomputes them)."""
        boxes, counts, classes = self.batch(index)
        return build_request(
            boxes, counts, self.canvas, preset=self.preset, gt_classes=classes, format=self.format,
            delta_dtype="float16" if self.fp16 else "float32", request_id=f"loadtest-{index}",
            seed=self.seed + index,
        )  # fmt: skip

    def describe(self) -> str:
        images = (f"{self.images} COCO-like images per request" if self.boxes is None
                  else f"{self.images} images per request, {self.boxes} boxes per image")  # fmt: skip
        return (f"{self.preset} {self.canvas[0]}x{self.canvas[1]}, {images}, "
                f"{self.format.upper()} {'float16' if self.fp16 else 'float32'} deltas")  # fmt: skip


def _check_seconds(name: str, value: float, zero: bool) -> None:
    """A finite number > 0 (>= 0 if ``zero``): NaN passes every comparison, and a run or
    a schedule of infinite length never ends."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}: must be a finite number {'>=' if zero else '>'} 0, got {value}")


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

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give at least one address")
        for target in self.targets:  # as the client checks them: a URL ran the whole test, all UNAVAILABLE
            check_target(target)
        if self.token is not None:  # 33 lines of gRPC's "Illegal header value" and a traceback
            object.__setattr__(self, "token", bearer_token(self.token, "token"))
        _check_seconds("duration_s", self.duration_s, zero=False)
        _check_seconds("warmup_s", self.warmup_s, zero=True)
        _check_seconds("timeout_s", self.timeout_s, zero=False)
        if self.rate is not None:
            _check_seconds("rate", self.rate, zero=False)
            if not math.isfinite(self.processes / self.rate):  # 1e-309: an infinite interval, NaN start times
                raise ValueError(f"rate: {self.rate:g} requests/s is too small to schedule")
            scheduled = self.rate * (self.warmup_s + self.duration_s)
            if scheduled > _MAX_SCHEDULED:  # each costs the generator a step, sent or not
                raise ValueError(f"rate: {self.rate:g} requests/s over {self.warmup_s + self.duration_s:g} s schedules "
                                 f"{scheduled:.3g} requests; at most {_MAX_SCHEDULED:,} per run")  # fmt: skip
        bounded = (("concurrency", self.concurrency, MAX_CONCURRENCY), ("processes", self.processes, MAX_PROCESSES),
                   ("window", self.window, MAX_WINDOW))  # fmt: skip
        for name, value, most in bounded:
            if not 1 <= value <= most:
                raise ValueError(f"{name}: must be in 1 .. {most:,}, got {value}")
        if self.window != 1 and (not self.stream or self.rate is not None):
            raise ValueError(f"window: only for closed-loop streams (stream without rate), got {self.window}")
        if self.concurrency < self.processes:
            raise ValueError(f"concurrency ({self.concurrency}) is shared by the processes: give at least "
                             f"{self.processes}")  # fmt: skip
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

    def __init__(self, measure_from: float, keep: int, measure_until: float = math.inf) -> None:
        self.measure_from, self.measure_until = measure_from, measure_until
        self.overall = _histogram()
        self.interval = _histogram()  # since the last progress update
        self.seconds: dict[int, list] = {}  # second -> [ok, errors, histogram]
        self.errors: Counter[str] = Counter()
        self.interval_errors: Counter[str] = Counter()
        self.details: dict[str, str] = {}  # code -> the first message that came with it
        self.warmup_requests = 0
        # The warm-up's failures, not measured but reported (a server still starting up, a
        # wrong token): by code, and each code's first message.
        self.warmup_errors: Counter[str] = Counter()
        self.warmup_details: dict[str, str] = {}
        # When the first and the last measured request were answered: req/s counts the time
        # between them, at least the window (the answers to a window's requests come one
        # latency later: counting from the window's start, the last latency read as lost
        # time; a request that failed after its timeout would stretch it, the answers all in).
        self.first_answer, self.last_answer = math.inf, measure_from
        self.answered_in: Counter[int] = Counter()  # second of the window -> answers that came then
        # Open loop: requests sent, those sent more than _LATE_S after their scheduled start
        # by the load generator, and the latest start (seconds after its schedule); those
        # that waited longer for their stream (a write the server did not take, a stream
        # being reopened after a failure).
        self.sends = self.late_sends = self.held_sends = 0
        self.latest_send_s = 0.0
        # ``keep`` answers drawn uniformly from the whole window (reservoir sampling): the
        # first ones alone would miss what goes wrong under sustained load.
        self.kept: list[tuple[int, bytes]] = []
        self._keep = keep
        self._answered = 0
        self._draw = random.Random(0)

    def _bucket(self, scheduled: float) -> list | None:
        """The second ``scheduled`` falls in, None (and counted) in the warm-up."""
        if scheduled < self.measure_from:
            self.warmup_requests += 1
            return None
        second = int(scheduled - self.measure_from)
        bucket = self.seconds.get(second)
        if bucket is None:  # not setdefault: a histogram costs ~10% of a caller's CPU per response
            bucket = self.seconds[second] = [0, 0, _histogram()]
        return bucket

    def record(self, scheduled: float, done: float, code: str | None, index: int, response: Any) -> None:
        if code is not None:
            self.error(scheduled, code)
            return
        # The series' answers are those that came in each second, the warm-up's too: left
        # out, an open loop's first second read 67 answers where the server sent 403.
        if self.measure_from <= done < self.measure_until:
            self.answered_in[int(done - self.measure_from)] += 1
        bucket = self._bucket(scheduled)
        if bucket is None:
            return
        micros = max(1, int((done - scheduled) * 1e6))
        for histogram in (self.overall, self.interval, bucket[2]):
            histogram.record_value(micros)
        bucket[0] += 1
        self.first_answer = min(self.first_answer, done)
        self.last_answer = max(self.last_answer, done)
        self._answered += 1
        if len(self.kept) < self._keep:
            self.kept.append((index, response.SerializeToString()))
        elif self._keep and (slot := self._draw.randrange(self._answered)) < self._keep:
            self.kept[slot] = (index, response.SerializeToString())

    def sent(self, scheduled: float, stream_free: float = -math.inf) -> None:
        """An open-loop request going out now, ``scheduled`` being when it was due and
        ``stream_free`` when its stream could take it (the warm-up's are not measured:
        connections open and caches fill then)."""
        if scheduled < self.measure_from:
            return
        late = time.perf_counter() - scheduled
        self.sends += 1
        if stream_free - scheduled > _LATE_S:  # late for the server's or the network's sake, not the generator's
            self.held_sends += 1
        elif late > _LATE_S:
            self.late_sends += 1
            self.latest_send_s = max(self.latest_send_s, late)

    def error(self, scheduled: float, code: str) -> None:
        bucket = self._bucket(scheduled)
        if bucket is None:
            self.warmup_errors[code] += 1
            return
        self.errors[code] += 1
        self.interval_errors[code] += 1
        bucket[1] += 1

    def explain(self, code: str, details: str | None) -> None:
        """Keep the first message an error code came with: "INVALID_ARGUMENT 5,000" alone
        does not say what the server refused."""
        if details:
            # A message that comes before the window opens is the warm-up's: it must not
            # stand for the measured errors of its code.
            kept = self.warmup_details if time.perf_counter() < self.measure_from else self.details
            kept.setdefault(code, details[:_DETAILS_CHARS])

    def progress(self) -> dict:
        update = {"histogram": self.interval.encode(), "errors": dict(self.interval_errors)}
        self.interval = _histogram()
        self.interval_errors = Counter()
        return update

    def result(self) -> dict:
        return {
            "histogram": self.overall.encode(),
            "errors": dict(self.errors),
            "error_details": self.details,
            "warmup_requests": self.warmup_requests,
            "warmup_errors": dict(self.warmup_errors),
            "warmup_error_details": self.warmup_details,
            "seconds": {s: (ok, bad, h.encode()) for s, (ok, bad, h) in self.seconds.items()},
            "kept": self.kept,
            "answered_s": self.last_answer - self.measure_from,
            "first_answered_s": self.first_answer - self.measure_from,
            "answered_in": dict(self.answered_in),
            "sends": (self.sends, self.late_sends, self.latest_send_s, self.held_sends),
        }


def _code(error: grpc.RpcError) -> str:
    if error.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in (error.debug_error_string() or ""):
        return _ENDED_WHILE_SENDING  # the status the client library made up for a failed send
    return error.code().name


def _in_band_code(response: pb.AssignResponse) -> str | None:
    if not response.HasField("error"):
        return None
    return next((c.name for c in grpc.StatusCode if c.value[0] == response.error.code), "UNKNOWN")


# Requests an open-loop run may schedule, far beyond what one machine's clients can send
# (a few thousand per second per process): a rate past it only made the run last for
# ever, counting its unsent requests one by one.
_MAX_SCHEDULED = 10_000_000


# Closed loop: a median call longer than this share of the window leaves each caller few
# turns in it (req/s then measures the callers' turns, not the server).
_FEW_TURNS = 0.25


class _Schedule:
    """One stream's scheduled start times (open loop). The stream waits for ``next`` and
    takes it when it sends it: a stream that fails while waiting leaves it to the stream
    that replaces it."""

    def __init__(self, times: Iterator[float]) -> None:
        self._times = times
        self.next = next(times, None)  # None: no more

    def take(self) -> float:
        at, self.next = self.next, next(self._times, None)
        return at


class _StartLine:
    """Client processes begin their windows together. Each one's start-up differs (imports,
    building its requests: two processes began 0.9 s apart), and windows that do not line
    up leave their first and last seconds under-loaded while req/s counts them as loaded.
    Each process says when it is ready; once all are, the parent gives one wall-clock start."""

    _LEAD_S = 0.1  # from the parent's word to the start: every process sees it in time

    def __init__(self, context) -> None:
        self._at = context.RawValue("d", 0.0)  # the start (time.time()); 0 until given (no lock: _StopFlag)

    def open(self) -> None:
        self._at.value = time.time() + self._LEAD_S

    async def wait(self, stop) -> None:
        """Until the start, or until asked to stop (another process failed first)."""
        while not self._at.value:
            if stop.is_set() or _orphaned():  # then stopped at once by ``_Driver._watch``
                return
            await asyncio.sleep(self._LEAD_S / 10)
        await asyncio.sleep(max(0.0, self._at.value - time.time()))


class _StopFlag:
    """The parent's word to its client processes to stop, as a shared byte with no lock: a
    multiprocessing.Event takes a lock even to be read, and a process killed holding it
    (the OOM killer, SIGKILL) left the parent's ``set()`` and every other process waiting
    for good. The same methods as threading.Event's, which the one-process run uses."""

    def __init__(self, context) -> None:
        self._flag = context.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


class _ThreadInbox:
    """What the one client thread (``processes`` 1) reports: in this process, neither
    pickled nor ever blocking (through a pipe, a result over its 64 KiB buffer waited for
    a reader, and the answers kept for ``verify`` took three times their memory)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def sender(self, index: int) -> _ThreadInbox:
        return self

    def send(self, message: tuple) -> None:
        self._queue.put(message)

    def started(self) -> None:
        pass

    def receive(self, timeout: float) -> list[tuple]:
        try:
            return [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []

    def close(self) -> None:
        pass


class _ProcessInbox:
    """What the client processes report, each on a pipe of its own (a queue they share has
    a writers' lock, which a process killed while writing kept: _StopFlag). A pipe that
    ends, or is cut in the middle of a message, says ("ended", index, None): its process
    has exited, and without its result, was killed (the OOM killer)."""

    def __init__(self, count: int) -> None:
        self._pipes = [multiprocessing.Pipe(duplex=False) for _ in range(count)]
        self._open = {receiving: index for index, (receiving, _) in enumerate(self._pipes)}

    def sender(self, index: int):
        return self._pipes[index][1]

    def started(self) -> None:
        """The clients' ends are theirs now: once a client exits, its pipe ends."""
        for _, sending in self._pipes:
            sending.close()

    def receive(self, timeout: float) -> list[tuple]:
        messages = []
        for pipe in multiprocessing.connection.wait(list(self._open), timeout=timeout):
            try:
                messages.append(pipe.recv())
            except (EOFError, OSError):  # OSError: ended in the middle of a message
                messages.append(("ended", self._open.pop(pipe), None))
        return messages

    def close(self) -> None:
        """No more reading: a client still sending (the run cut short) fails at once
        instead of waiting for a reader."""
        for receiving in self._open:
            receiving.close()


class _Driver:
    """The callers of one process, on one event loop."""

    def __init__(self, options: LoadTestOptions, index: int, updates, stop, start_line: _StartLine | None) -> None:
        self.options = options
        self.index = index
        self.updates = updates
        self.stop = stop  # set by the parent: stop now (Ctrl-C, or another client process failed)
        self.start_line = start_line  # None: the only client, it starts at once
        # Once set, a cancellation is ours; before, asyncio.CancelledError from a call is
        # gRPC's: it raises that for any call cancelled on this side, not only by us.
        self.stopping = False
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
        channel_options = [*_channel_options(1 << 30, _REOPEN_PAUSE_S, 1.0, ()), ("grpc.use_local_subchannel_pool", 1)]
        targets = [t for _ in range(min(self.share, _MAX_CONNECTIONS)) for t in self.options.targets]
        if self.options.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.options.tls_ca)
            return [grpc.aio.secure_channel(t, credentials, options=channel_options) for t in targets]
        return [grpc.aio.insecure_channel(t, options=channel_options) for t in targets]

    def _next_request(self) -> tuple[int, pb.AssignRequest]:
        i = next(self.turn) % len(self.requests)
        return i, self.requests[i]

    def _next_stream(self):
        return self.streams[next(self.endpoint_turn) % len(self.streams)]

    async def run(self) -> dict:
        options = self.options
        channels = self._channels()
        self.unary = [c.unary_unary(_ASSIGN, pb.AssignRequest.SerializeToString, pb.AssignResponse.FromString)
                      for c in channels]  # fmt: skip
        self.streams = [c.stream_stream(_STREAM, pb.AssignRequest.SerializeToString, pb.AssignResponse.FromString)
                        for c in channels]  # fmt: skip
        self.updates.send(("ready", self.index, None))  # the collector's deadline counts from here
        if self.start_line is not None:
            await self.start_line.wait(self.stop)
        now = self.load_from = time.perf_counter()
        started = time.time()
        self.measure_from = now + options.warmup_s
        self.end = self.measure_from + options.duration_s
        self.recorder = _Recorder(self.measure_from, keep=options.verify, measure_until=self.end)
        # The load's own CPU, from here: a client process's start-up (Python, torch, gRPC:
        # seconds of CPU) is not the cost of its requests.
        cpu = time.process_time()
        load = asyncio.ensure_future(self._load())
        helpers = [asyncio.ensure_future(self._report()), asyncio.ensure_future(self._watch(load))]
        measured_s = options.duration_s
        try:
            await load
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            measured_s = min(max(0.0, time.perf_counter() - self.measure_from), options.duration_s)
        finally:
            for helper in helpers:
                helper.cancel()
            for channel in channels:
                await channel.close()
        return {**self.recorder.result(), "cpu_s": time.process_time() - cpu, "window_s": time.perf_counter() - now,
                "measured_s": measured_s, "started": started}  # fmt: skip

    async def _load(self) -> None:
        if self.options.stream:
            await asyncio.gather(*[self._stream(k) for k in range(self.share)])
        elif self.options.rate:
            await self._open_loop_unary()
        else:
            await asyncio.gather(*[self._closed_caller() for _ in range(self.share)])

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_S)
            try:
                self.updates.send(("progress", self.index, self.recorder.progress()))
            except OSError:  # the parent stopped reading (its run was cut short) or is gone
                return

    async def _watch(self, load: asyncio.Future) -> None:
        """Stop the load when the parent asks (a process's event can only be polled), or
        has gone."""
        while not self.stop.is_set() and not _orphaned():
            await asyncio.sleep(_STOP_POLL_S)
        self.stopping = True
        load.cancel()

    async def _unary(self, scheduled: float) -> str | None:
        """One call, recorded; its error code (None: answered)."""
        i, request = self._next_request()
        call = self.unary[next(self.endpoint_turn) % len(self.unary)]
        code, response = None, None
        try:
            response = await call(request, timeout=self.options.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            code = _code(error)
            self.recorder.explain(code, error.details())
        except asyncio.CancelledError:
            if self.stopping:
                raise
            code = grpc.StatusCode.CANCELLED.name
        self.recorder.record(scheduled, time.perf_counter(), code, i, response)
        return code

    async def _closed_caller(self) -> None:
        while (now := time.perf_counter()) < self.end:
            if await self._unary(now) in _PAUSE_AFTER:
                # No server, or one that refuses (a full queue): calls fail at once, and a
                # caller that went on would count its own speed in errors, taking the CPU of
                # the server on the same machine (a client library backs off there too).
                await asyncio.sleep(min(_REOPEN_PAUSE_S, max(0.0, self.end - time.perf_counter())))

    def _schedule(self, first: int = 0, step: int = 1):
        """This process's scheduled start times from the load's start: its share of
        ``rate``, interleaved with the other processes'; every ``step``-th of them from the
        ``first`` (one stream's of ``step``), computed rather than stepped through: each of
        2,048 streams stepped past the others' times per request and began where the streams
        before it had left the clock, 0.16 s late for the last (10.5 s at 16,384 streams),
        so the run sent fewer than it scheduled and did not say so."""
        interval = self.options.processes / self.options.rate
        start = self.load_from + self.index * interval / self.options.processes
        for k in itertools.count(first, step):
            at = start + k * interval
            if at >= self.end:
                return
            yield at

    def _window_closed(self) -> bool:
        """Open loop: too late to send what is still scheduled (the generator fell behind)."""
        return time.perf_counter() >= self.end + _SEND_SLACK_S

    async def _open_loop_unary(self) -> None:
        tasks = set()
        try:
            for at in self._schedule():
                if self._window_closed():  # what is left is not sent: counted without a wait each
                    self.recorder.error(at, _NOT_SENT)
                    continue
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                if self._window_closed():
                    self.recorder.error(at, _NOT_SENT)
                    continue
                self.recorder.sent(at)
                task = asyncio.ensure_future(self._unary(at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:  # stopped (or a call failed unexpectedly): no call outlives the run
            for task in tasks:
                task.cancel()

    async def _stream(self, k: int) -> None:
        """One stream, reopened after a failure until the run ends (its unanswered
        requests count as errors; open loop: so do those it had no time left to send)."""
        schedule = _Schedule(self._schedule(k, self.share)) if self.options.rate else None
        streams: list[asyncio.Future] = []  # this caller's, the last one sending
        try:
            code = await self._turn(schedule, streams)
            while code is _ROTATED or (code is not None and (left := self.end - time.perf_counter()) > 0):
                if code is not _ROTATED:
                    await asyncio.sleep(min(_REOPEN_PAUSE_S, left))
                code = await self._turn(schedule, streams)
            while schedule is not None and schedule.next is not None:  # the last stream failed
                self.recorder.error(schedule.take(), code)
            await asyncio.gather(*streams)  # those that made way, reading their last answers
        finally:  # stopped, or a stream failed unexpectedly: none outlives its caller
            for stream in streams:
                stream.cancel()
            if streams:
                await asyncio.wait(streams)

    async def _turn(self, schedule: _Schedule | None, streams: list[asyncio.Future]) -> str | object | None:
        """A new stream (added to ``streams``): its code once it ends (see ``_one_stream``).
        Open loop: ``_ROTATED`` as soon as it stops sending to make way, while it goes on
        reading its answers; a successor opened only after them left the requests due
        meanwhile waiting a round trip. Closed loop: its successor waits (two open at once
        would double the caller's window)."""
        made_way = asyncio.get_running_loop().create_future() if schedule is not None else None
        stream = asyncio.ensure_future(self._one_stream(self._next_stream(), schedule, made_way))
        streams.append(stream)
        await asyncio.wait([stream] + ([made_way] if made_way is not None else []), return_when=asyncio.FIRST_COMPLETED)
        return stream.result() if stream.done() else _ROTATED

    async def _one_stream(
        self, open_stream, schedule: _Schedule | None, made_way: asyncio.Future | None
    ) -> str | object | None:
        """One AssignStream call: None once every request it was to send is answered,
        ``_ROTATED`` once those it sent in its ``_STREAM_ROTATE_S`` are (``made_way`` is
        done when it stops sending them), else the code it failed with (its unanswered
        requests are counted as errors)."""
        in_flight: deque[tuple[int, float]] = deque()  # sent (or being sent), not answered
        slots = asyncio.Semaphore(self.options.window)
        sent_all = rotated = False
        opened = time.perf_counter()
        call = open_stream(timeout=self.options.timeout_s + self.options.duration_s + self.options.warmup_s,
                           metadata=self.metadata)  # fmt: skip

        async def send() -> None:
            # Our own writer, not a request iterator handed to gRPC: gRPC's consumer of one
            # cancels the call on any failure (the reader then gets asyncio.CancelledError)
            # and leaves it suspended, to be closed mid-await at loop shutdown.
            nonlocal sent_all, rotated
            # Since when the stream could take the next request: its opening (a request due
            # before waited for a reopen), then the end of a write that blocked (the server
            # had not taken the last), else never in the way (lateness is the generator's).
            free = opened
            try:
                while True:
                    if time.perf_counter() - opened >= _STREAM_ROTATE_S:
                        rotated = True
                        if made_way is not None:
                            made_way.set_result(None)
                        break
                    if schedule is None:
                        await slots.acquire()
                        at = time.perf_counter()
                        if at >= self.end:
                            break
                    else:
                        if schedule.next is None:
                            break
                        if not self._window_closed():  # else counted at once below, one by one
                            await asyncio.sleep(max(0.0, schedule.next - time.perf_counter()))
                        at = schedule.take()
                        if self._window_closed():
                            self.recorder.error(at, _NOT_SENT)
                            continue
                        self.recorder.sent(at, free)
                    i, request = self._next_request()
                    in_flight.append((i, at))
                    writing = time.perf_counter()
                    await call.write(request)
                    written = time.perf_counter()
                    free = written if written - writing > _LATE_S else -math.inf
                sent_all = True
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass  # the call is over: reading it tells how

        writer = asyncio.ensure_future(send())
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                i, at = in_flight.popleft()
                if (in_band := _in_band_code(response)) is not None:
                    self.recorder.explain(in_band, response.error.message)
                self.recorder.record(at, time.perf_counter(), in_band, i, response)
                slots.release()
            if sent_all and not in_flight:
                return _ROTATED if rotated else None
            code = _UNANSWERED
        except grpc.RpcError as error:
            code = _code(error)
            self.recorder.explain(code, error.details())
        except asyncio.CancelledError:
            if self.stopping:
                raise
            code = grpc.StatusCode.CANCELLED.name
        finally:
            writer.cancel()
            call.cancel()
            await asyncio.wait([writer])
        if not in_flight and schedule is None and opened < self.end:
            self.recorder.error(opened, code)  # closed loop: a stream that failed to open is an error too
        while in_flight:
            self.recorder.error(in_flight.popleft()[1], code)
        return code


def _drive_process(options: LoadTestOptions, index: int, updates, stop, start_line: _StartLine) -> None:
    torch.set_num_threads(1)  # a client process builds messages; the cores are the server's
    _drive(options, index, updates, stop, start_line)


def _orphaned() -> bool:
    """A client process whose parent has gone (killed): it stops loading the server."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _drive(options: LoadTestOptions, index: int, updates, stop, start_line: _StartLine | None = None) -> None:
    """One client process (or thread): run, then report the result on ``updates`` (its
    inbox's sender)."""
    try:
        message = ("done", index, asyncio.run(_Driver(options, index, updates, stop, start_line).run()))
    except BaseException as exc:  # the parent reports it
        message = ("failed", index, f"{type(exc).__name__}: {exc}")
    try:
        updates.send(message)
    except OSError:  # the parent stopped reading (its run was cut short) or is gone: nobody wants it
        if not (stop.is_set() or _orphaned()):
            raise


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    options: LoadTestOptions
    requests: int  # answered without error in the measured period
    errors: dict[str, int]
    warmup_requests: int
    latency: HdrHistogram  # microseconds
    # Every second of the measured window (the last may be a part of one): second; ok, errors,
    # p50_ms and p99_ms of the requests sent (scheduled) in it (None where none was answered);
    # answered, requests_per_s and images_per_s: the answers that came in it (an open loop the
    # server cannot keep up with sends at its rate, but is answered at the server's).
    series: list[dict]
    verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    unverified: int = 0  # responses asked to be verified (``verify``) beyond those answered
    # CPU seconds the client processes spent sending and receiving (warm-up included, their
    # start-up not; with one process, this whole process's, its gRPC threads included), and
    # the longest of their warm-up + measured windows in seconds.
    client_cpu_s: float = 0.0
    window_s: float = 0.0
    # Seconds measured: the duration, or less when the run was stopped early (Ctrl-C, a
    # client process failed); None: the duration.
    measured_s: float | None = None
    # Seconds from the measured window's start to its first and its last request's answer:
    # apart by more than the window when the server fell behind (an open loop keeps
    # sending at its rate).
    answered_s: float = 0.0
    first_answered_s: float = 0.0
    # Open loop, measured window: requests sent, how many went out more than 10 ms after
    # their scheduled start (the load generator could not keep its schedule), and the
    # latest of those.
    sends: int = 0
    late_sends: int = 0
    latest_send_s: float = 0.0
    # Open-loop streams: requests that went out more than 10 ms late because their stream
    # could not take them sooner (a write the server had not taken, the stream reopening).
    held_sends: int = 0
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM (the load, or its verification)
    verify_interrupted: bool = False  # the verification was stopped
    worker_failures: list[str] = field(default_factory=list)  # client processes that failed, and why
    error_details: dict[str, str] = field(default_factory=dict)  # code -> the first message it came with
    # The warm-up's failures (not measured, not in ``errors``) and their first messages.
    warmup_errors: dict[str, int] = field(default_factory=dict)
    warmup_error_details: dict[str, str] = field(default_factory=dict)
    start_skew_s: float = 0.0  # between the first and the last client process's start

    @property
    def ok(self) -> bool:
        return (not self.errors and not self.mismatches and not self.unverified and self.requests > 0
                and not self.interrupted and not self.worker_failures)  # fmt: skip

    @property
    def requests_per_s(self) -> float:
        """Requests answered over the time they took. Closed loop: the requests sent in the
        window over the window (each caller sends its next when answered). Open loop: over
        the time from the first answer to the last, where that is longer than the window
        (the server fell behind: else an open loop reads as its own rate)."""
        seconds = self.options.duration_s if self.measured_s is None else self.measured_s
        if self.options.rate:
            seconds += self.behind_s
        return self.requests / seconds if seconds else 0.0

    @property
    def behind_s(self) -> float:
        """Open loop: how much longer than the measured window its answers took to come."""
        if not self.options.rate or not self.requests:
            return 0.0
        measured = self.options.duration_s if self.measured_s is None else self.measured_s
        return max(0.0, self.answered_s - self.first_answered_s - measured)

    def percentiles_ms(self) -> dict[str, float]:
        if not self.latency.get_total_count():
            return {}
        values = {f"p{p:g}": _value_at(self.latency, p) / 1000 for p in (50, 90, 99, 99.9)}
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
            "error_details": {code: self.error_details[code] for code in self.errors if code in self.error_details},
            "warmup_requests": self.warmup_requests,
            "warmup_errors": self.warmup_errors,
            "warmup_error_details": self.warmup_error_details,
            "requests_per_s": self.requests_per_s,
            "images_per_s": self.requests_per_s * images,
            "latency_ms": self.percentiles_ms(),
            "verified": self.verified,
            "mismatches": self.mismatches,
            "unverified": self.unverified,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "verify_interrupted": self.verify_interrupted,
            "measured_s": self.options.duration_s if self.measured_s is None else self.measured_s,
            "answered_s": self.answered_s,
            "first_answered_s": self.first_answered_s if self.requests else None,
            "sends": self.sends,
            "late_sends": self.late_sends,
            "latest_send_s": self.latest_send_s,
            "held_sends": self.held_sends,
            "worker_failures": self.worker_failures,
            "client_cpu_s": self.client_cpu_s,
            "client_cores_busy": self.client_cpu_s / self.window_s if self.window_s else 0.0,
            "client_start_skew_s": self.start_skew_s,
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"tritarget loadtest — {s['mode']}", f"workload: {s['workload']}", ""]
        if self.interrupted:
            lines[-1:-1] = [f"INTERRUPTED: {s['measured_s']:.1f} of {self.options.duration_s:g} s measured"]
        elif s["measured_s"] < self.options.duration_s:  # a client process failed: the others stopped
            lines[-1:-1] = [f"{s['measured_s']:.1f} of {self.options.duration_s:g} s measured"]
        if self.worker_failures:
            lines[-1:-1] = [f"client process failed: {failure}" for failure in self.worker_failures]
        lines.append(f"{'requests':>10} {'errors':>8} {'req/s':>9} {'images/s':>9}")
        lines.append(f"{self.requests:>10,} {sum(self.errors.values()):>8,} {s['requests_per_s']:>9.1f} "
                     f"{s['images_per_s']:>9.1f}")  # fmt: skip
        # A stray late send (a garbage collection) says nothing; 1% of them do.
        generator_behind = self.late_sends > max(2, 0.01 * self.sends) or _NOT_SENT in self.errors
        if generator_behind:
            lines.append(f"the load generator could not keep its schedule: {self.late_sends:,} of {self.sends:,} "
                         f"requests went out more than {_LATE_S * 1000:g} ms late (up to {self.latest_send_s:.2f} s; "
                         "latencies count from the schedule, so they include that wait)")  # fmt: skip
            if _NOT_SENT in self.errors:
                lines.append(f"{self.errors[_NOT_SENT]:,} scheduled requests were not sent before the window "
                             f"closed (errors {_NOT_SENT}): lower --rate, or more --processes")  # fmt: skip
        if self.held_sends > max(2, 0.01 * self.sends):
            lines.append(f"{self.held_sends:,} of {self.sends:,} requests waited more than {_LATE_S * 1000:g} ms for "
                         "their stream (a write the server had not taken, or the stream reopening after a failure); "
                         "latencies count from the schedule, so they include that wait")  # fmt: skip
        if self.requests and self.behind_s > max(0.5, 0.05 * s["measured_s"]):
            who = "the load generator or the server" if generator_behind else "the server"
            lines.append(f"the answers took {self.behind_s:.1f} s longer to come than the {s['measured_s']:g} s "
                         f"window: {who} fell behind (req/s counts from the first answer to the last)")  # fmt: skip
        if self.start_skew_s > _START_SKEW_S:  # each process's start is late by its event loop's lag
            lines.append(f"the client processes began {self.start_skew_s:.2f} s apart (a busy machine): the first "
                         "and last seconds carry less load")  # fmt: skip
        latency = s["latency_ms"]
        if latency and not self.options.rate and latency["p50"] / 1000 > _FEW_TURNS * s["measured_s"]:
            # Each caller sends its next when answered: a caller whose calls take a good part
            # of the window (or whose warm-up call was still waiting when it opened) sends few
            # in it, and req/s counted 213 where the server answered 1,550 a second.
            lines.append(f"half the calls took over {latency['p50'] / 1000:.2f} s of the {s['measured_s']:g} s "
                         "window: each caller sent few requests in it, so req/s reads low; a longer --duration "
                         "and --warmup, or fewer callers (--concurrency), measure the server")  # fmt: skip
        if latency:
            lines += ["", "latency (ms)   " + "  ".join(f"{k:>8}" for k in latency),
                      "               " + "  ".join(f"{v:>8.2f}" for v in latency.values())]  # fmt: skip
            if self.errors:  # a deadline passed is an error, not a latency: the percentiles leave it out
                lines.append(f"               of the {self.requests:,} answered requests; the "
                             f"{sum(self.errors.values()):,} that failed are not in them")  # fmt: skip
        if self.errors:
            lines += ["", "errors by code: " + ", ".join(f"{c} {n:,}" for c, n in sorted(self.errors.items()))]
            lines += [f"  {code}: {details}" for code, details in sorted(s["error_details"].items())]
        if self.warmup_errors:
            failed = sum(self.warmup_errors.values())
            lines += ["", f"warm-up (not measured): {failed:,} of {self.warmup_requests:,} requests failed: "
                          + ", ".join(f"{c} {n:,}" for c, n in sorted(self.warmup_errors.items()))]  # fmt: skip
            lines += [f"  {code}: {details}" for code, details in sorted(self.warmup_error_details.items())]
        elif not self.requests and not self.interrupted and not self.worker_failures and self.options.rate \
                and not self.sends:  # fmt: skip
            lines += ["", "no request was measured: none was due in the measured window (raise --rate or --duration)"]
        elif not self.requests and not self.errors and not self.interrupted and not self.worker_failures:
            lines += ["", "no request was measured: none that started in the measured window ended in the run "
                          "(a request may take longer than --warmup + --duration)"]  # fmt: skip
        if self.window_s:  # near one core per client process: the load generator may be the limit
            busy, processes = s["client_cores_busy"], self.options.processes
            # Three digits: an open loop whose few requests were answered early ends in
            # milliseconds ("0.0 CPU s in 0.0 s (0.35 cores busy)" at --rate 0.5).
            lines += ["", f"load generator: {self.client_cpu_s:.3g} CPU s in {self.window_s:.3g} s "
                          f"({busy:.2f} cores busy, {processes} process(es))"]  # fmt: skip
        if self.options.verify:
            if self.mismatches:
                lines += ["", f"verify: {len(self.mismatches)} of {self.verified} responses differ:"]
                lines += [f"  {m}" for m in self.mismatches[:10]]
            elif self.verified:
                lines += ["", f"verify: {self.verified} responses recomputed in-process, all equal"]
            if self.unverified:
                why = "before the interruption" if self.verify_interrupted else "(no more were answered while measured)"
                lines += [f"verify: {self.options.verify:,} asked, only {self.verified:,} verified {why}"]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        text = json.dumps({**self.summary(), "series": self.series}, indent=2) + "\n"
        write_atomically(path, lambda temporary: Path(temporary).write_text(text))

    def write_csv(self, path: str | Path) -> None:
        def write(temporary: str) -> None:
            with open(temporary, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(_SERIES_FIELDS))
                writer.writeheader()
                writer.writerows(self.series)

        write_atomically(path, write)

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
        # The format named, not left to the temporary file's name (/dev/stdout has no extension).
        write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, format=plot_format(path)))
        plt.close(figure)


_SERIES_FIELDS = ("second", "ok", "errors", "answered", "requests_per_s", "images_per_s", "p50_ms", "p99_ms")


def plot_format(path: str | os.PathLike) -> str:
    """The picture format ``--plot`` writes: the file's extension (PNG without one)."""
    return os.path.splitext(os.fspath(path))[1][1:].lower() or "png"


def _merge(options: LoadTestOptions, results: list[dict]) -> Report:
    """One report of the client processes' results: every second of the measured window
    in the series, those in which nothing started too (an outage shows as zeros)."""
    measured_s = max(r["measured_s"] for r in results)
    started = [r["started"] for r in results]
    latency = _histogram()
    errors: Counter[str] = Counter()
    details: dict[str, str] = {}
    warmup_errors: Counter[str] = Counter()
    warmup_details: dict[str, str] = {}
    seconds: dict[int, list] = {}
    answered_in: Counter[int] = Counter()
    for result in results:
        latency.decode_and_add(result["histogram"])
        errors.update(result["errors"])
        answered_in.update(result["answered_in"])
        for code, message in result["error_details"].items():
            details.setdefault(code, message)
        warmup_errors.update(result["warmup_errors"])
        for code, message in result["warmup_error_details"].items():
            warmup_details.setdefault(code, message)
        for second, (ok, bad, encoded) in result["seconds"].items():
            bucket = seconds.setdefault(second, [0, 0, _histogram()])
            bucket[0] += ok
            bucket[1] += bad
            bucket[2].decode_and_add(encoded)
    series = []
    for second in range(math.ceil(measured_s)):
        ok, bad, histogram = seconds.get(second, (0, 0, None))
        rate = answered_in[second] / min(1.0, measured_s - second)  # the last second may be a part of one
        series.append({
            "second": second, "ok": ok, "errors": bad, "answered": answered_in[second], "requests_per_s": rate,
            "images_per_s": rate * options.workload.images,
            "p50_ms": _value_at(histogram, 50) / 1000 if ok else None,
            "p99_ms": _value_at(histogram, 99) / 1000 if ok else None,
        })  # fmt: skip
    return Report(options, latency.get_total_count(), dict(errors), sum(r["warmup_requests"] for r in results),
                  latency, series, client_cpu_s=sum(r["cpu_s"] for r in results),
                  window_s=max(r["window_s"] for r in results), measured_s=measured_s,
                  answered_s=max(r["answered_s"] for r in results),
                  first_answered_s=min(r["first_answered_s"] for r in results), error_details=details,
                  sends=sum(r["sends"][0] for r in results), late_sends=sum(r["sends"][1] for r in results),
                  latest_send_s=max(r["sends"][2] for r in results), held_sends=sum(r["sends"][3] for r in results),
                  start_skew_s=max(started) - min(started), warmup_errors=dict(warmup_errors),
                  warmup_error_details=warmup_details)  # fmt: skip


# --------------------------------------------------------------------------- verification


def verify_response(
    workload: Workload, index: int, response: pb.AssignResponse, expected: dict[int, Targets] | None = None
) -> str | None:
    """None if ``response`` answers request ``index`` of ``workload`` (its id, format and
    delta dtype, what the client checks of a response against its request) with the targets
    computed in-process, else what differs. ``expected``: targets already computed, by
    request index (filled as they are)."""
    request = workload.request(index)
    where = f"request {index}"
    if response.request_id != request.request_id:
        return f"{where}: request_id {response.request_id!r}, expected {request.request_id!r}"
    if response.WhichOneof("targets") != workload.format:
        return f"{where}: {str(response.WhichOneof('targets')).upper()} targets, asked {workload.format.upper()}"
    deltas = response.dense.deltas if workload.format == "dense" else response.sparse.positive_deltas
    if deltas.dtype != request.delta_dtype:
        return f"{where}: deltas {pb.DType.Name(deltas.dtype)}, asked {pb.DType.Name(request.delta_dtype)}"
    if expected is None or index not in expected:
        boxes, counts, classes = workload.batch(index)
        config = presets.get(workload.preset)
        targets = assign(boxes, counts, workload.canvas, config, gt_classes=classes, seed=request.seed)
        if expected is None:
            expected = {}
        expected[index] = targets
    try:
        got = decode_response(response, request)
    except Exception as exc:
        return f"{where}: the response does not decode: {exc}"
    return _difference(index, got, expected[index], workload.fp16, every_anchor=workload.format == "dense")


def _difference(index: int, got: Targets, expected: Targets, fp16: bool, every_anchor: bool) -> str | None:
    """What differs between the targets a response holds and the in-process ones: labels
    and classes everywhere; matched boxes and deltas of the positives, or of every anchor
    (``every_anchor``: DENSE carries them all; SPARSE none but the positives')."""
    where = f"request {index}"
    if got.labels.shape != expected.labels.shape:
        return f"{where}: labels shape {list(got.labels.shape)} != {list(expected.labels.shape)}"
    bad = got.labels != expected.labels
    if bad.any():
        image, anchor = (int(v) for v in torch.nonzero(bad)[0])
        return (f"{where}: {int(bad.sum())} labels differ, first image {image} anchor {anchor}: "
                f"{int(got.labels[image, anchor])} != {int(expected.labels[image, anchor])}")  # fmt: skip
    positive = torch.ones_like(expected.labels, dtype=torch.bool) if every_anchor else expected.labels == 1
    anchors = "anchors" if every_anchor else "positives"
    if not torch.equal(got.matched_gt[positive], expected.matched_gt[positive]):
        return f"{where}: matched boxes of {anchors} differ"
    if not torch.equal(got.classes, expected.classes):  # background too: SSD's loss reads every anchor's
        return f"{where}: classes differ"
    want = expected.deltas[positive]
    if fp16:
        want = want.to(torch.float16).float()
    tolerance = 1e-3 if fp16 else 1e-5
    if not torch.allclose(got.deltas[positive].float(), want, rtol=tolerance, atol=tolerance):
        worst = float((got.deltas[positive].float() - want).abs().max())
        return f"{where}: deltas of {anchors} differ by up to {worst:.3g} (tolerance {tolerance:g})"
    return None


# --------------------------------------------------------------------------- running it


def run(options: LoadTestOptions, progress: bool = False) -> Report:
    """Run the load test and return its report (``progress``: a live line on stderr).

    Called on the main thread, ``run`` handles Ctrl-C (and SIGTERM: a ``timeout`` or a CI
    job cancelled) while the load runs and while its answers are verified: the first stops
    the clients, or the verification, and the report holds what was measured and verified
    until then, ``interrupted`` set; a second raises ``KeyboardInterrupt``. A client
    process that fails stops the others and the report lists it; ``RuntimeError`` when no
    client has a result."""
    inbox: _ThreadInbox | _ProcessInbox
    if options.processes == 1:  # in this process, on a thread: no start-up cost
        stop: Any = threading.Event()
        start_line, inbox = None, _ThreadInbox()
        workers = [threading.Thread(target=_drive, args=(options, 0, inbox, stop), daemon=True)]
    else:
        context = multiprocessing.get_context("spawn")  # no inherited gRPC or torch state
        stop, start_line, inbox = _StopFlag(context), _StartLine(context), _ProcessInbox(options.processes)
        workers = [context.Process(target=_drive_process, args=(options, i, inbox.sender(i), stop, start_line),
                                   daemon=True) for i in range(options.processes)]  # fmt: skip
    # Set by the first Ctrl-C: during the load it stops the clients (what they kept is
    # still verified), once verifying it stops the verification; the second raises.
    interrupted, verifying, verify_interrupted = threading.Event(), threading.Event(), threading.Event()

    def on_ctrl_c(signum, frame) -> None:
        if verifying.is_set():
            if verify_interrupted.is_set():
                raise KeyboardInterrupt
            verify_interrupted.set()
            return
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        stop.set()  # the clients stop and send what they measured

    # Only the main thread may handle signals (and only it gets Ctrl-C); a handler set
    # outside Python cannot be put back.
    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in _STOPPING_SIGNALS} if main else {}
    if None in previous.values():
        previous = {}
    try:
        for signum in previous:
            # Client processes start ignoring Ctrl-C and SIGTERM, before their seconds of
            # imports: a terminal, `timeout` and a service manager send them to the whole
            # process group, and stopping them is ours.
            signal.signal(signum, signal.SIG_IGN if options.processes > 1 else on_ctrl_c)
        for worker in workers:
            worker.start()
        inbox.started()
        for signum in previous:
            signal.signal(signum, on_ctrl_c)
        try:
            results, failures = _collect(options, inbox, stop, start_line, workers, progress)
        finally:
            stop.set()  # whatever ended the collection, no client goes on loading the server
            inbox.close()
            _end(workers, options.timeout_s)
        if not results:
            raise RuntimeError("load test failed: " + "; ".join(failures))
        report = _merge(options, results)
        report.worker_failures = failures
        if options.verify:
            verifying.set()
            _verify(report, results, verify_interrupted)
        report.verify_interrupted = verify_interrupted.is_set()
        report.interrupted = interrupted.is_set() or report.verify_interrupted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return report


_STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _end(workers: list, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` in all for the clients to end; kill a client process still
    running then (stopped, stuck in a call): it ignores SIGTERM, so multiprocessing's exit,
    which terminates and joins every child, would wait for it for ever. A thread cannot be
    killed; it is a daemon and ends with the process."""
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
            worker.kill()
            worker.join()


def _verify(report: Report, results: list[dict], interrupted: threading.Event) -> None:
    """Recompute ``options.verify`` of the kept answers, drawn from every process's, until
    done or interrupted. Answers repeat the workload's variants: each request's targets
    are computed once, for all its answers, then let go (tens of MB each)."""
    options = report.options
    kept = [item for result in results for item in result["kept"]]  # each process's draw
    by_request: dict[int, list[bytes]] = {}
    for index, raw in random.Random(0).sample(kept, min(options.verify, len(kept))):
        by_request.setdefault(index, []).append(raw)
    for index, answers in by_request.items():
        expected: dict[int, Targets] = {}
        for raw in answers:
            if interrupted.is_set():
                break
            mismatch = verify_response(options.workload, index, pb.AssignResponse.FromString(raw), expected)
            report.verified += 1
            if mismatch is not None:
                report.mismatches.append(mismatch)
    report.unverified = options.verify - report.verified


def _collect(options: LoadTestOptions, inbox: _ThreadInbox | _ProcessInbox, stop, start_line: _StartLine | None,
             workers: list, progress: bool):  # fmt: skip
    """Every worker's result, in worker order, and the failures (each stops the others),
    as the workers report them to ``inbox``; the workers started together once all are
    ready; meanwhile a live line: throughput, p50/p99, errors."""
    from tqdm import tqdm

    total = options.warmup_s + options.duration_s
    # Through WhileRead: a reader of stderr gone (`2>&1 | head -1`) ends the line, not the run.
    bar = tqdm(total=round(total, 1), file=WhileRead(sys.stderr), disable=not progress, dynamic_ncols=True,
               desc="loadtest", bar_format="{desc} {bar:20} {n:.0f}/{total:.0f} s{postfix}")  # fmt: skip
    start = time.monotonic()
    results: dict[int, dict] = {}
    failures: list[str] = []
    interval, errors = _histogram(), Counter()
    last = time.monotonic()
    # From the start line on, once every worker has built its requests (the largest
    # workload takes two minutes to build: the deadline ran out before the load began).
    deadline = math.inf
    reported: set[int] = set()  # the workers whose result or failure is in
    ready: set[int] = set()
    updates: deque = deque()
    while len(reported) < len(workers):
        if not updates:
            updates.extend(inbox.receive(timeout=1.0))
            if not updates:
                if time.monotonic() > deadline:
                    raise RuntimeError("load test workers did not finish") from None
                continue
        kind, index, payload = updates.popleft()
        if kind == "ended":
            if index not in reported:  # killed (the OOM killer): it said nothing
                workers[index].join(1.0)
                failures.append(f"worker {index}: exited with code {workers[index].exitcode}")
                reported.add(index)
                stop.set()
            continue
        if kind == "failed":
            failures.append(f"worker {index}: {payload}")
            reported.add(index)
            stop.set()
            continue
        if kind == "done":
            results[index] = payload
            reported.add(index)
            continue
        if kind == "ready":
            ready.add(index)
            if len(ready) == len(workers):  # the progress and the deadline count from the start
                if start_line is not None:
                    start_line.open()
                start = last = time.monotonic()
                deadline = start + total + options.timeout_s + _FINISH_SLACK_S
            continue
        interval.decode_and_add(payload["histogram"])
        errors.update(payload["errors"])
        now = time.monotonic()
        if now - last >= _PROGRESS_S * 0.9 and not stop.is_set():
            count = interval.get_total_count()
            if now - start < options.warmup_s:
                bar.set_postfix_str("warming up")
            else:
                bar.set_postfix_str(
                    f"{count / (now - last):.0f} req/s, p50 {_value_at(interval, 50) / 1000:.1f} ms, "
                    f"p99 {_value_at(interval, 99) / 1000:.1f} ms, "
                    f"errors {', '.join(f'{code} {n:,}' for code, n in errors.items()) if errors else 0}"
                )  # fmt: skip
            bar.n = round(min(now - start, total), 1)
            bar.refresh()
            interval, last = _histogram(), now
    if not stop.is_set():
        bar.n = bar.total
    bar.close()
    return [results[i] for i in sorted(results)], failures
