"""The data plane: a dynamic batcher in front of ``tritarget.kernels.assign`` (no grpc here).

Requests that share a config, canvas and options are merged into one ``assign``
call, which is one kernel launch on a GPU and one pass of the thread pool on a CPU:

* a batch whose every job wants sparse targets (and no max IoU, no sampling) calls
  ``assign_sparse`` instead: dense targets never exist (on a GPU they would be ~5 MB
  per image to copy to the host; the sparse lists are a few KB, copied in one go),
  and each job gets its images' CSR rows; a batch with any dense job stays dense;

* a batch closes when it holds ``max_batch_images`` images (fewer where images x
  anchors would pass ``max_anchor_rows``) or ``max_slice_boxes`` boxes, or its oldest
  request has waited ``max_queue_delay_s``; while every compute worker is busy, requests
  keep accumulating, so batches grow with load and stay small when idle. The
  default delay is 0 (this "natural" batching alone): a lone request never waits,
  and a busy server still merges; a few milliseconds buy fuller batches on a GPU;
* the queue is bounded (``max_queue_images``): beyond it ``submit`` raises
  ``Overloaded`` at once instead of queueing work that would miss its deadline; a
  request computed in slices holds the place of its largest slice from its admission
  to its last slice, so it is refused at once or not at all;
* compute runs on worker threads, not on the event loop, except a small sparse batch
  on the cpu backend that reaches a server idle for a while (``inline_max_images``,
  ``Batcher._inline``): computed where it arrives, it skips the two thread hand-overs,
  about half of a small request's time in the server outside compute, and holds the
  loop ~0.2-2 ms;
* a bad request fails alone: a merged batch whose ``assign`` raises is checked
  request by request, each bad one gets its own error (naming its own images and
  boxes), and the good ones run again without it; a batch that succeeds is not
  checked twice (the check builds the whole problem again: ~10% of the compute
  thread under load). Each caller gets exactly its own images back (row slices of
  the batch), and sampling seeds stay per request (image i of a request uses
  ``seed + i`` whatever batch it lands in);
* a batch that fails on a GPU is followed by a probe of the device (``device_fault``):
  where the GPU no longer works (a CUDA error that stays for the life of the process),
  every job then gets ``DeviceLost`` (UNAVAILABLE: callers retry on another replica)
  and ``on_device_lost`` tells the server to stop for its supervisor to restart it,
  instead of serving INTERNAL errors for good while its health says SERVING;
* ``submit(job, finish)`` runs ``finish(targets)`` (the response encoder) right after
  the batch where the batch ran (the compute worker, or the event loop for a batch
  computed there), so a request costs one thread hop, not two (on a loaded machine
  every hop is a GIL hand-over and a futex wake-up), or none.
  ``targets`` is ``SparseTargets`` when the batch ran sparse, else ``Targets``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tritarget.kernels import SparseTargets, TargetConfig, Targets, assign, assign_sparse, presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.kernels.api import resolve_backend
from tritarget.kernels.problem import build_problem
from tritarget.kernels.sampling import image_seeds

from .errors import DeviceLost, Overloaded, Unavailable, invalid_from_exception
from .gpu_wait import set_gpu_wait

__all__ = ["AssignJob", "BatchOptions", "Batcher", "load_backend"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AssignJob:
    """One request's batch, decoded and within limits (see ``tritarget.kernels.assign``)."""

    config: TargetConfig
    canvas: tuple[int, int]
    gt_boxes: torch.Tensor  # [N, 4] float32
    gt_counts: list[int]
    gt_classes: torch.Tensor | None = None  # [N] int32
    ignore_boxes: torch.Tensor | None = None  # [M, 4] float32
    ignore_counts: list[int] | None = None
    image_sizes: torch.Tensor | None = None  # [B, 2] int64
    pad_sizes: torch.Tensor | None = None  # [B, 2] int64
    drop_invalid: bool = False
    return_max_iou: bool = False
    seed: int = 0
    # The response lists positives and ignored anchors (SPARSE): the batch may skip dense targets.
    sparse: bool = False
    enqueued_at: float = field(default=0.0, repr=False)
    queued_s: float | None = field(default=None, repr=False)  # from enqueued_at to its batch's start

    @property
    def images(self) -> int:
        return len(self.gt_counts)

    @property
    def boxes(self) -> int:
        return sum(self.gt_counts)

    @property
    def anchors_per_image(self) -> int:
        return resolve_grid(self.config.anchors, self.canvas).num_anchors  # cached per config and canvas

    @property
    def merge_key(self) -> tuple:
        """Jobs merge only when this matches: the batch must be one ``assign`` call. A job
        without image sizes has the canvas as theirs, but one without pad sizes has no
        stand-in (a pad size of the canvas excludes the cells of a fixed-size feature map
        beyond it: SSD), and with pad sizes the canvas as an image size could be larger
        than them: such jobs merge only with jobs that give the same sizes."""
        sizes = None if self.pad_sizes is None else self.image_sizes is not None
        return (self.config, self.canvas, self.drop_invalid, self.return_max_iou, self.gt_classes is not None,
                sizes)  # fmt: skip

    def rows_agree(self) -> bool:
        """Whether every per-box and per-image tensor has the rows its counts say: the one
        thing a merged batch cannot check for its parts (two wrong counts can add up)."""
        boxes = sum(self.gt_counts)
        return (
            self.gt_boxes.dim() == 2 and self.gt_boxes.shape[0] == boxes
            and (self.gt_classes is None or (self.gt_classes.dim() == 1 and self.gt_classes.shape[0] == boxes))
            and (self.ignore_boxes is None) == (self.ignore_counts is None)
            and (self.ignore_counts is None
                 or (len(self.ignore_counts) == self.images and self.ignore_boxes.dim() == 2
                     and self.ignore_boxes.shape[0] == sum(self.ignore_counts)))
            and all(sizes is None or (sizes.dim() == 2 and sizes.shape[0] == self.images)
                    for sizes in (self.image_sizes, self.pad_sizes))
        )  # fmt: skip

    def check(self) -> None:
        """Raise ``InvalidInput`` naming the field, image and box if the batch is bad."""
        try:
            build_problem(
                self.gt_boxes, self.gt_counts, self.canvas, self.config,
                gt_classes=self.gt_classes, ignore_boxes=self.ignore_boxes, ignore_counts=self.ignore_counts,
                image_sizes=self.image_sizes, pad_sizes=self.pad_sizes, drop_invalid=self.drop_invalid,
            )  # fmt: skip
            image_seeds(self.seed, self.images)
        except (ValueError, TypeError) as exc:
            raise invalid_from_exception(exc) from None


@dataclass(frozen=True)
class BatchOptions:
    """Batcher limits; see the module docstring. ``None`` fields take the defaults that
    suit the device (``resolved``)."""

    max_batch_images: int | None = None
    max_queue_delay_s: float = 0.0
    max_queue_images: int = 1024
    compute_workers: int | None = None
    # torch threads of each compute worker; None: the cores split evenly between workers.
    threads_per_worker: int | None = None
    # A request of more images than a batch holds (``max_batch_images``, fewer where
    # ``max_anchor_rows`` bounds them) or more boxes than this runs in slices within both
    # bounds, queued one after another like separate requests: it cannot hold a compute
    # worker for seconds while small requests wait, and the slices of a caller that has
    # gone are never computed.
    max_slice_boxes: int = 20_000
    # Images x anchors per batch: bounds the [B, A] targets a batch holds, as the request
    # limit of the same name bounds one request's (merged requests of a large canvas
    # would otherwise hold ~330 MB per image: max_batch_images x that).
    max_anchor_rows: int = 1 << 25
    # On the cpu backend, a SPARSE batch of at most this many images (and few boxes and
    # anchors: ``Batcher._inline``) that reaches an idle server is computed on the event
    # loop; 0: never.
    inline_max_images: int = 8

    def __post_init__(self) -> None:
        for name in ("max_batch_images", "max_queue_images", "compute_workers", "threads_per_worker",
                     "max_slice_boxes", "max_anchor_rows", "inline_max_images"):  # fmt: skip
            value, low = getattr(self, name), 0 if name == "inline_max_images" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"batching: {name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.max_queue_delay_s < math.inf:  # NaN too; an infinite wait fills no batch for ever
            raise ValueError(f"batching: max_queue_delay_s must be finite and >= 0, got {self.max_queue_delay_s!r}")

    def resolved(self, device: torch.device) -> BatchOptions:
        """The unset fields filled for ``device``. On a CPU one compute worker with every
        core: a second one (the cores split between them) served 10-20% more images/s under
        closed-loop load on 2 cores, but 3% less for a lone caller and with a worse p99 in
        open loop at 80% of its peak (121.6 ms at 290 requests/s, against 40 ms at 214 for
        one worker; ``bench_loadtest.py``; measured with batches of up to 32). On a GPU two
        workers, each launching on its own CUDA stream, so that one batch computes while the
        previous one is copied and encoded. Batches of up to 128 images on a CPU: a batch only grows that large when the
        server is saturated, and there a call's fixed cost matters (the worker's compute per
        image fell from 0.40 to 0.31 ms; 16 streams x 2 served 28-68% more than with 32 in
        8 of 8 paired runs, with a lower p99; no systematic change with few requests in
        flight: ``benchmarks/results/service/batch_cap.md``); a batch of DENSE requests then
        holds up to ~640 MB of dense targets. 64 on a GPU (a launch costs the same for 1 or
        64 images; 64 COCO images of dense targets are ~320 MB)."""
        gpu = device.type == "cuda"
        batch = self.max_batch_images
        if batch is None:  # a batch is taken from the queue: never more than it holds
            batch = min(64 if gpu else 128, self.max_queue_images)
        elif batch > self.max_queue_images:  # requests are sliced to batches: a larger slice could never queue
            raise ValueError(
                f"batching: max_batch_images ({batch}) is over max_queue_images ({self.max_queue_images}); "
                "a request is queued in slices of up to max_batch_images"
            )
        workers = self.compute_workers
        if workers is None:
            workers = 2 if gpu else 1
        threads = self.threads_per_worker
        if threads is None:  # the cores split evenly between the workers
            threads = max(1, torch.get_num_threads() // workers)
        return replace(
            self,
            max_batch_images=batch,
            compute_workers=workers,
            threads_per_worker=threads,
        )


def load_backend(name: str, gpu_wait: str | None = None) -> tuple[str, torch.device]:
    """The concrete backend for ``name`` (``auto`` -> triton with CUDA, else cpu), imported
    now, and the device its inputs must be on. On a GPU, ``gpu_wait`` ("block" or "spin";
    None: CUDA's choice) sets how the process's threads wait for it, before the first CUDA
    work (``gpu_wait``).

    Raises ``ValueError`` when the backend does not exist or cannot load here.
    """
    device = torch.device("cuda" if torch.cuda.is_available() and name in ("auto", "triton") else "cpu")
    if device.type == "cuda" and gpu_wait is not None:
        set_gpu_wait(gpu_wait, ordinal=0)  # "cuda": the current device, 0 in a process that has not used CUDA
    concrete = resolve_backend(name, device)
    try:  # the smallest batch there is: loads the backend's module (and its compiler)
        assign(torch.zeros(0, 4, device=device), [0], (32, 32), presets.get("retinanet_torchvision"), backend=concrete)
    except Exception as exc:  # missing module, compiler, driver: say which backend and why
        raise ValueError(f"backend {concrete!r} (from {name!r}) cannot run here: {exc}") from exc
    if device.type == "cuda":  # named with its index in what the server prints and logs (a machine has several)
        device = torch.device("cuda", torch.cuda.current_device())
    return concrete, device


# Called with (images, requests, compute seconds) after each batch; and (seconds) per job queued.
BatchObserver = Callable[[int, int, float], None]

# An inline batch's bounds beyond its images, per image of ``inline_max_images`` (the C
# kernel's time grows with boxes and anchors): boxes (ignore regions included) and anchor
# rows. At the default, ``assign_sparse`` of 8 COCO-like images of 16 boxes, 201,600
# anchors each, took 1.2-1.5 ms on 2 cores, of one image of 128 boxes 1.1-1.2 ms
# (medians of 30 calls, 2026-12-04).
_INLINE_BOXES_PER_IMAGE = 16
_INLINE_ANCHORS_PER_IMAGE = 1 << 18
# And the server idle that long before it arrives. While the loop computes, the calls that
# arrive wait in gRPC, undecoded; once it is done they reach an idle batcher one by one, and
# each would run alone on the loop while the workers idle: batches stopped merging and a
# 2-image load at 32 in flight lost 20-25% (2026-11-30). Between a lone caller's requests
# the server idled 0.71-1.2 ms (1st-90th percentile, 2-image requests, 2026-12-04); under
# load, between calls computed on the loop, 0.16-0.7 ms, and the first call that goes to a
# worker ends the run: the calls behind it queue while it computes and merge.
_INLINE_AFTER_IDLE_S = 0.5e-3


class _Pending:
    __slots__ = ("job", "future", "finish", "counted", "held")

    def __init__(
        self,
        job: AssignJob,
        future: asyncio.Future,
        finish: Callable[[Targets | SparseTargets], Any] | None,
        counted: int,
        held: bool,
    ) -> None:
        self.job = job
        self.future = future
        self.finish = finish
        self.counted = counted  # the images it adds to the queue's count (0 in a held place)
        self.held = held  # a slice of a request, queued in its request's held place


def device_fault(device: torch.device) -> BaseException | None:
    """After a failed batch: the error a trivial computation on ``device`` raises now, or
    None where the device works (always on a CPU). A CUDA context that met an illegal
    address, a device-side assert or an uncorrectable ECC error fails every later call
    of the process, this one included; a batch that failed for its own reasons (out of
    memory, a bug in one call) leaves it working."""
    if device.type != "cuda":
        return None
    try:  # this thread's stream only: a sticky error shows on any call (another worker's batch runs on)
        with torch.cuda.device(device):
            torch.cuda.current_stream(device).synchronize()
            torch.ones(1, device=device).add_(1).item()
    except torch.cuda.OutOfMemoryError:  # full (other batches' memory), not broken
        return None
    except Exception as exc:
        return exc
    return None


def _unless_gone(item: _Pending) -> Callable[[Targets | SparseTargets], Any] | None:
    """``item.finish``, skipped where the caller went away while its batch computed: its
    response (megabytes for DENSE) would be encoded for nobody. Read from the worker
    thread, a future's state is one attribute: at worst a response is encoded in vain."""
    if item.finish is None:
        return None
    return lambda targets: None if item.future.done() else item.finish(targets)


class Batcher:
    """Merges concurrent ``AssignJob``s into batched ``assign`` calls.

    ``await batcher.submit(job) -> Targets | SparseTargets`` (the job's own images; or
    ``finish``'s result). Start it with
    ``start()`` inside the event loop and stop it with ``await close()``.
    """

    def __init__(
        self,
        backend: str,
        options: BatchOptions = BatchOptions(),
        *,
        device: torch.device | str = "cpu",
        on_batch: BatchObserver | None = None,
        on_queued: Callable[[float], None] | None = None,
        on_copied: Callable[[int], None] | None = None,
        on_inline: Callable[[], None] | None = None,
        on_device_lost: Callable[[DeviceLost], None] | None = None,
    ) -> None:
        self.backend = backend
        self.device = torch.device(device)
        self.options = options = options.resolved(self.device)
        self._on_batch = on_batch
        self._on_queued = on_queued
        self._on_copied = on_copied
        self._on_inline = on_inline
        self._on_device_lost = on_device_lost  # called on the event loop, once
        self.lost: DeviceLost | None = None  # set once the device failed for good: every job gets it
        self._lost_lock = threading.Lock()  # two workers' batches may fail together
        self._groups: dict[tuple, list[_Pending]] = {}
        self._queued_images = 0  # in the groups, except the slices of held places
        self._held_images = 0  # places held by requests in slices (``submit``)
        self._in_slices = 0  # requests in slices, from their admission to their answer
        self._waiting = 0  # stream requests waiting for room in a full queue (``submit(wait=True)``)
        # Theirs in arrival order: (images, future set once room is kept for them), and the
        # images of the room kept for those let in and not yet queued (they resume later).
        self._room: deque[tuple[int, asyncio.Future]] = deque()
        self._reserved = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free = options.compute_workers  # workers without a batch
        self._inline_images = options.inline_max_images if backend == "cpu" else 0
        self._timer: asyncio.TimerHandle | None = None  # the next look at a batch still filling up
        self._idle: asyncio.Event | None = None  # nothing queued, nothing running, no request in slices
        self._idle_since = 0.0  # when it last became so
        # Compute workers: plain threads fed by one queue. A ThreadPoolExecutor's submit and
        # futures cost up to ~20% of a small request's time outside compute (measured in
        # process: 780 -> 610-750 us per 1-image request on 2 cores).
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(
                target=self._serve, args=(options.threads_per_worker,), name=f"tritarget-compute_{i}", daemon=True
            )
            for i in range(options.compute_workers)
        ]
        for worker in self._workers:
            worker.start()
        self._closed = False
        self._draining = False  # shutting down: batches no longer wait to fill
        self._abandoned = False  # closed without finishing: the workers skip what is queued

    def _serve(self, threads: int) -> None:
        """A compute worker: its set-up, then tasks until told to stop (None)."""
        try:
            _start_worker(threads, self.device)
        except Exception:  # its tasks still run (and fail with their own errors): nobody waits forever
            log.exception("compute worker set-up failed")
        while (task := self._tasks.get()) is not None:
            if not self._abandoned:
                task()

    def stop_workers(self) -> None:
        """Let the compute workers finish the tasks queued so far, then end them."""
        self._end_workers()
        for worker in self._workers:
            worker.join()

    def _end_workers(self) -> None:
        for _ in self._workers:
            self._tasks.put(None)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._idle_since = time.perf_counter()

    def drain(self) -> None:
        """The server is shutting down: no new request will fill a batch, so none waits
        out the queue delay any more (with a delay longer than the grace period, the calls
        in flight would otherwise be cut off while they waited)."""
        self._draining = True
        if self._loop is not None:
            self._dispatch()

    async def close(self, finish: bool = True) -> None:
        """Finish every queued and running batch, then stop. With ``finish`` False (the
        calls were cut off: the grace period ran out, or a second stop signal came, and
        nobody waits for their targets) nothing more starts and this returns at once: a
        batch still running ends on its worker, a daemon thread the process does not
        wait for (a 40 s batch of the reference backend held the process that long)."""
        self._closed = True
        self._room_freed()  # the jobs waiting for room are refused
        if not finish:
            self._abandoned = True
            self._end_workers()
            return
        if self._loop is not None:
            self._dispatch()  # whatever is queued goes now, however young
            await self._idle.wait()
        self.stop_workers()

    async def run(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a compute worker, which counts as busy meanwhile:
        requests queue up behind it and merge into the next batch (instead of each taking
        a place behind it on the worker)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def task() -> None:
            try:
                outcome = (fn(*args, **kwargs), None)
            except BaseException as exc:
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(self._ran, future, *outcome)
            except RuntimeError:  # the loop has closed: nobody waits for this any more
                pass

        self._free -= 1  # below 0 while every worker is busy: the task waits its turn
        self._idle.clear()
        self._tasks.put(task)
        return await future

    def _ran(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        self._free += 1
        _settle(future, result, error)
        self._dispatch()

    async def warm_up(self, job: AssignJob) -> None:
        """Run ``job`` alone, now, on a compute worker, dense and sparse, and again with the
        other kind of low-quality stage (the lift of torchvision's, detectron2's and mmdet's
        rules, or ssd_forced's marking): loads, compiles and caches every kernel a request
        can need (the sparse path has kernels of its own), so that none compiles while
        requests wait (kernels compile once whatever the batch: ``triton_assign``)."""
        other = "torchvision" if job.config.match.low_quality == "ssd_forced" else "ssd_forced"
        for config in (job.config, job.config.replace(**{"match.low_quality": other})):
            for sparse in (False, True):
                await self.run(self._assign, [replace(job, config=config, sparse=sparse)])

    async def submit(
        self, job: AssignJob, finish: Callable[[Targets | SparseTargets], Any] | None = None, *, wait: bool = False
    ) -> Any:
        """The job's own targets (``SparseTargets`` when its batch ran sparse), or
        ``finish(targets)`` computed on the compute worker.

        A full queue refuses the job (``Overloaded``: its caller retries, another replica
        first), or with ``wait`` holds it until there is room: a stream's request, which its
        stream's window already bounds and which has no other replica to go to. Jobs that
        wait go before any new job that does not."""
        slices = _slices(job, self._batch_cap(job), self.options.max_slice_boxes)
        if len(slices) == 1:
            return await self._enqueue(job, finish, wait=wait)
        # From its admission to its last slice the request holds a place in the queue for its
        # largest slice, and its slices queue in that place: a full queue refuses the request
        # at once, as it refuses any, and never one whose first slices were computed. The
        # whole request is checked first (its errors name its own images, not a slice's), on
        # a compute worker, behind the batch running there.
        held = max(part.images for part in slices)
        if wait:
            await self._room_for(held)
        self._admit(held, waited=wait)
        self._held_images += held
        self._in_slices += 1  # close() waits for it to the end
        self._idle.clear()
        try:
            try:
                await self.run(job.check)
                parts = []
                for part in slices:  # each queued anew: requests that arrived meanwhile go first
                    parts.append(await self._enqueue(part, None, held=True))
            finally:
                self._held_images -= held
                self._room_freed()
                # One request, one wait: its slices' together, those that started (its caller
                # gone or a slice failed, as a request that is not sliced once it started).
                waits = [part.queued_s for part in slices if part.queued_s is not None]
                if self._on_queued is not None and waits:
                    self._on_queued(sum(waits))
            # Joined on the compute worker (megabytes of dense targets: hundreds of ms that
            # held the event loop, and every other call with it), and finished in the same hop.
            return await self.run(_joined, parts, finish)
        finally:
            self._in_slices -= 1
            self._set_if_idle()

    def _admit(self, images: int, *, held: bool = False, waited: bool = False) -> None:
        """Raise unless ``images`` more images may queue now (``held``: a slice of a request
        admitted before, which a close lets finish; ``waited``: a job that waited for room,
        which the jobs still waiting do not hold back)."""
        if self.lost is not None:
            raise self.lost
        if (self._closed and not held) or self._loop is None:
            raise Unavailable("the server is shutting down")
        ahead = 0 if held or waited else self._waiting
        if self.queued_images + images > self.options.max_queue_images or ahead:
            waiting = f", {ahead} stream requests waiting for room" if ahead else ""
            raise Overloaded(
                f"server overloaded: {self.queued_images} images queued{waiting}, limit "
                f"{self.options.max_queue_images}; retry with backoff or use another replica"
            )

    async def _room_for(self, images: int) -> None:
        """Return once ``images`` more images fit in the queue, after every job that began
        waiting before, or once the batcher closes (then ``_admit`` refuses them as it
        refuses any job). They fit in an empty queue: a job is queued in slices of at most a
        batch, and a batch is at most the queue. The caller queues them at once (no await
        in between): the room kept for them is theirs until then."""
        if self._closed or (not self._room and self.queued_images + images <= self.options.max_queue_images):
            return
        waiter = self._loop.create_future()
        self._room.append((images, waiter))
        self._waiting += 1
        try:
            kept = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():  # let in, then gone
                self._reserved -= images
            self._room_freed()  # the next in line may fit now
            raise
        finally:
            self._waiting -= 1
        if kept:
            self._reserved -= images

    def _room_freed(self) -> None:
        """Images left the queue: let in the jobs waiting for room that fit, in their
        order, keeping the room for each (all of them, without room, once closing or once
        the device is lost: ``_admit`` refuses them then)."""
        room, limit, ending = self._room, self.options.max_queue_images, self._closed or self.lost is not None
        while room:
            images, waiter = room[0]
            if not waiter.done() and not ending and self.queued_images + images > limit:
                return
            room.popleft()
            if not waiter.done():  # else cancelled meanwhile
                if not ending:
                    self._reserved += images
                waiter.set_result(not ending)

    @property
    def inline_images(self) -> int:
        """The most images of a batch computed on the event loop at an idle server (0: never)."""
        return self._inline_images

    @property
    def waiting_requests(self) -> int:
        """Stream requests waiting for room in a full queue."""
        return self._waiting

    async def _enqueue(
        self,
        job: AssignJob,
        finish: Callable[[Targets | SparseTargets], Any] | None,
        *,
        held: bool = False,
        wait: bool = False,
    ) -> Any:
        """``held``: a slice queued in its request's held place (admitted, already counted);
        ``wait``: wait for room in a full queue (``submit``)."""
        counted, arrived = 0 if held else job.images, time.perf_counter()
        if wait:
            await self._room_for(counted)
        self._admit(counted, held=held, waited=wait)
        job.enqueued_at = arrived  # a wait for room is time spent queueing (tritarget_queue_seconds)
        item = _Pending(job, self._loop.create_future(), finish, counted, held)
        self._groups.setdefault(job.merge_key, []).append(item)
        self._queued_images += counted
        self._idle.clear()
        self._dispatch(arrival=item)
        try:
            return await item.future  # done already where it was computed inline
        except asyncio.CancelledError:  # the caller has gone (cancelled, past its deadline)
            self._withdraw(item)
            raise

    def _withdraw(self, item: _Pending) -> None:
        """A gone caller's job leaves the queue if it is still there, so that its images no
        longer count against the queue bound (once taken, its batch runs and its result is
        dropped)."""
        key = item.job.merge_key
        pending = self._groups.get(key)
        if pending is None or item not in pending:
            return
        pending.remove(item)
        self._queued_images -= item.counted
        if not pending:
            del self._groups[key]
        self._room_freed()
        self._set_if_idle()

    def _set_if_idle(self) -> None:
        if not self._groups and self._free == self.options.compute_workers and not self._in_slices:
            if not self._idle.is_set():
                self._idle_since = time.perf_counter()
            self._idle.set()

    @property
    def queued_images(self) -> int:
        """Images waiting for a compute worker, the places held by requests in slices, and
        the room kept for stream requests let in from their wait (``_room_for``)."""
        return self._queued_images + self._held_images + self._reserved

    def _dispatch(self, arrival: _Pending | None = None) -> None:
        """Event loop, on every arrival and every finished batch: while a worker is free,
        start the oldest group's next batch once it is full or old enough, else any full
        group's (a group still filling does not hold up another config's or canvas's).
        Requests that arrive while every worker is busy queue up and merge into the next
        batches.

        No task sits between the caller and the worker: a request costs one hand-over to
        a worker thread and one back (each a futex wake-up, ~0.1 ms on a loaded machine),
        or none when ``arrival``, the job that just came, is computed inline (``_inline``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._free > 0 and self._groups:
            key, pending = min(self._groups.items(), key=lambda kv: kv[1][0].job.enqueued_at)
            wait = pending[0].job.enqueued_at + self.options.max_queue_delay_s - time.perf_counter()
            if wait > 0 and not (self._closed or self._draining) and not self._full(pending):
                key, pending = next(((k, p) for k, p in self._groups.items() if self._full(p)), (None, None))
                if key is None:
                    self._timer = self._loop.call_later(wait, self._dispatch)
                    break
            self._start(self._take(key, pending), arrival)
        self._set_if_idle()

    def _batch_cap(self, job: AssignJob) -> int:
        """Images per batch for jobs like ``job`` (one group shares its config and canvas):
        ``max_batch_images``, fewer where the anchor rows would pass ``max_anchor_rows``."""
        rows = self.options.max_anchor_rows // job.anchors_per_image
        return max(1, min(self.options.max_batch_images, rows))

    def _full(self, pending: list[_Pending]) -> bool:
        return (sum(item.job.images for item in pending) >= self._batch_cap(pending[0].job)
                or sum(item.job.boxes for item in pending) >= self.options.max_slice_boxes)  # fmt: skip

    def _take(self, key: tuple, pending: list[_Pending]) -> list[_Pending]:
        """The group's next batch, oldest first, within the batch's images and the slices'
        boxes (merged slices would otherwise hold a worker as the request they came from)."""
        batch, images, boxes, cap = [], 0, 0, self._batch_cap(pending[0].job)
        while pending:
            job = pending[0].job
            if batch and (images + job.images > cap or boxes + job.boxes > self.options.max_slice_boxes):
                break
            item = pending.pop(0)
            batch.append(item)
            images += item.job.images
            boxes += item.job.boxes
            self._queued_images -= item.counted
        if not pending:
            del self._groups[key]
        self._room_freed()
        return batch

    def _start(self, batch: list[_Pending], arrival: _Pending | None = None) -> None:
        now = time.perf_counter()
        for item in batch:
            item.job.queued_s = now - item.job.enqueued_at
            if self._on_queued is not None and not item.held:  # a sliced request's is its slices' sum (submit)
                self._on_queued(item.job.queued_s)
        live = [item for item in batch if not item.future.cancelled()]  # callers gone: not computed
        if live == [arrival] and self._inline(arrival.job):
            if self._on_inline is not None:
                self._on_inline()
            _settle_all(live, self._results(live))
        elif live:
            self._free -= 1
            self._tasks.put(functools.partial(self._work, live))

    def _inline(self, job: AssignJob) -> bool:
        """Whether ``job``, alone in its batch, is computed here on the event loop: at an
        idle server (no batch running or queued, no request in slices, and none for a
        while), a SPARSE batch of the cpu backend's C kernel within ``inline_max_images``
        images and the boxes and anchor rows above for as many. That skips the hand-over
        to a worker and back (two thread wake-ups and the loop's turn to resume the
        caller), ~0.15 ms of a 1-image request's ~0.33 ms in the server outside compute
        on 2 cores (2026-12-04). The loop, and with it every other call's progress, waits
        meanwhile: hence only where nothing else waits on compute, and only bounded work
        (a DENSE response's encoding copies megabytes; other backends are slow or wait
        on a device)."""
        most = self._inline_images
        return (
            job.images <= most
            and self._free == self.options.compute_workers and not self._groups and not self._in_slices
            and job.enqueued_at - self._idle_since >= _INLINE_AFTER_IDLE_S
            and _runs_sparse([job])
            and job.boxes + sum(job.ignore_counts or ()) <= _INLINE_BOXES_PER_IMAGE * most
            # per image, not per batch: the C kernel's time grows with an image's anchors, and
            # one image of 1.7 M anchors (3000 x 3000) held the loop 64-100 ms
            and job.anchors_per_image <= _INLINE_ANCHORS_PER_IMAGE
        )  # fmt: skip

    def _work(self, batch: list[_Pending]) -> None:
        """Worker thread: the batch, then its results handed to the event loop."""
        results = self._results(batch)
        try:
            self._loop.call_soon_threadsafe(self._finished, batch, results)
        except RuntimeError:  # the loop has closed: nobody waits for these any more
            pass

    def _results(self, batch: list[_Pending]) -> list[Any]:
        """The batch's targets, each finished (encoded), or each job's error."""
        try:
            return self._compute([item.job for item in batch], [_unless_gone(item) for item in batch])
        except BaseException as exc:  # never leave a caller waiting
            return [exc] * len(batch)

    def _finished(self, batch: list[_Pending], results: list[Any]) -> None:
        self._free += 1
        _settle_all(batch, results)
        self._dispatch()

    def _compute(
        self, jobs: list[AssignJob], finishers: list[Callable[[Targets | SparseTargets], Any] | None] | None = None
    ) -> list[Any]:
        """Worker thread: the jobs as one batch, split; a failed batch is checked job by job,
        and the good jobs run again without the bad ones. Then each job's ``finish``."""
        start = time.perf_counter()
        if self.lost is not None:  # queued before the device failed
            return [self.lost] * len(jobs)
        if len(jobs) > 1 and not all(job.rows_agree() for job in jobs):
            results = self._recover(jobs, None)
        else:
            try:
                results = _split(self._assign(jobs), [job.images for job in jobs])
            except Exception as exc:
                if self._device_lost(exc):  # no retry of each job alone: each would fail the same
                    return [self.lost] * len(jobs)
                results = self._recover(jobs, exc)
        # What was computed: a job that passed its check and failed all the same is not.
        computed = [job for job, result in zip(jobs, results) if not isinstance(result, BaseException)]
        if self._on_batch is not None and computed:
            self._on_batch(sum(job.images for job in computed), len(computed), time.perf_counter() - start)
        for i, finish in enumerate(finishers or ()):
            if finish is not None and not isinstance(results[i], BaseException):
                try:
                    results[i] = finish(results[i])
                except Exception as exc:  # a request's encoding fails alone
                    results[i] = exc
        return results

    def _device_lost(self, error: Exception) -> bool:
        """Whether the device failed for good under ``error`` (a compute worker, or the loop
        for a batch computed inline): then ``lost`` is set and the server told, once. Out of
        memory is not probed: it is the batch's own failure (``status_of`` answers it)."""
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return False
        fault = device_fault(self.device)
        if fault is None:
            return False
        with self._lost_lock:
            if self.lost is not None:
                return True
            first_line = (str(fault).strip().splitlines() or [type(fault).__name__])[0]
            message = (f"the server's GPU ({self.device}) failed and cannot recover in this process ({first_line}); "
                       "the server is stopping to be restarted: retry on another replica")  # fmt: skip
            self.lost = DeviceLost(message)
        log.critical("the GPU %s no longer works (%s): every request fails from now on; stopping", self.device,
                     first_line, exc_info=error)  # fmt: skip
        if self._loop is None:  # never started (batches run by hand): nobody to tell
            return True
        try:
            # The stream requests waiting for room in a full queue are refused now, not
            # once the stop's grace has run out (their streams end with the others').
            self._loop.call_soon_threadsafe(self._room_freed)
            if self._on_device_lost is not None:
                self._loop.call_soon_threadsafe(self._on_device_lost, self.lost)
        except RuntimeError:  # the loop has closed: the server is gone already
            pass
        return True

    def _recover(self, jobs: list[AssignJob], error: Exception | None) -> list[Any]:
        """Each job's targets or its own error: after the batch raised ``error``, or before
        running it (None) when some job's rows do not add up."""
        results: list[Any] = [None] * len(jobs)
        good = []
        for i, job in enumerate(jobs):
            try:
                job.check()
                good.append(i)
            except Exception as exc:
                results[i] = exc
        if len(good) == len(jobs) and error is not None:
            if len(jobs) == 1:  # checked fine, failed anyway: not the input's fault
                return [error]
            # Should not happen after the checks; still, isolate the culprit.
            log.exception("batched assign failed; running its %d requests one by one", len(jobs))
            parts = [self._assign_or_error(jobs[i]) for i in good]
        elif good:
            try:  # the good jobs, merged again
                parts = _split(self._assign([jobs[i] for i in good]), [jobs[i].images for i in good])
            except Exception as exc:
                if self._device_lost(exc):  # every job would fail alone the same way
                    return [self.lost if i in good else results[i] for i in range(len(jobs))]
                log.exception("batched assign failed; running its %d requests one by one", len(good))
                parts = [self._assign_or_error(jobs[i]) for i in good]
        else:
            parts = []
        for i, part in zip(good, parts):
            results[i] = part
        return results

    def _assign_or_error(self, job: AssignJob) -> Targets | SparseTargets | Exception:
        """One job of a failed batch run alone: its targets, or its error (``DeviceLost``
        once a job finds the GPU lost, and for every job after it, which is not run)."""
        if self.lost is not None:
            return self.lost
        try:
            return self._assign([job])
        except Exception as exc:
            return self.lost if self._device_lost(exc) else exc

    def _assign(self, jobs: list[AssignJob]) -> Targets | SparseTargets:
        """The merged batch's targets on the host: sparse when every job lists its targets
        sparse, none wants the (dense only) max IoU and the config does not sample, else
        dense. Sampling leaves most anchors ignored, so the responses list the negatives,
        which takes the dense labels: ``assign_sparse`` would build them, compact them, and
        the encoder densify them again (RPN, 2 COCO images: 20% slower than dense).

        On a GPU only the sparse lists come back to the host (one copy into pinned memory,
        a few KB per image); dense targets (~5 MB per image) only for the batches that
        need them."""
        args = _merge(jobs)
        host = self.device.type == "cpu"
        if not host:  # requests arrive and responses leave on the host (sizes are read there)
            for name in ("gt_boxes", "gt_classes", "ignore_boxes"):
                if args.get(name) is not None:
                    args[name] = args[name].to(self.device, non_blocking=True)
        if _runs_sparse(jobs):
            del args["return_max_iou"]
            sparse = assign_sparse(**args, backend=self.backend)
            if host:
                return sparse
            result, copied = _sparse_to_host(sparse)
        else:
            targets = assign(**args, backend=self.backend)
            if host:
                return targets
            result, copied = targets.to("cpu"), _bytes(targets)
        if self._on_copied is not None:
            self._on_copied(copied)
        return result


def _runs_sparse(jobs: list[AssignJob]) -> bool:
    """Whether the batch of ``jobs`` calls ``assign_sparse`` (see ``Batcher._assign``);
    they share their config and ``return_max_iou`` (``merge_key``)."""
    first = jobs[0]
    return all(job.sparse for job in jobs) and not first.return_max_iou and first.config.match.sample_size == 0


def _settle_all(batch: list[_Pending], results: list[Any]) -> None:
    for item, result in zip(batch, results):
        error = result if isinstance(result, BaseException) else None
        _settle(item.future, None if error else result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _start_worker(threads: int, device: torch.device) -> None:
    """A compute worker thread: its share of the cores for torch, and on a GPU a CUDA
    stream of its own (the current stream is per thread), so that one worker's kernels
    run while another's results are copied to the host and encoded. Cached anchors and
    kernel tables are then one copy per worker (``tritarget.kernels.streams``)."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_stream(torch.cuda.Stream(device))


def _bytes(targets: Targets) -> int:
    tensors = (targets.labels, targets.matched_gt, targets.deltas, targets.classes, targets.max_iou)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _merge(jobs: list[AssignJob]) -> dict:
    """``assign`` arguments of several jobs that share a merge key, image after image."""
    first = jobs[0]
    merged = {
        "gt_boxes": torch.cat([j.gt_boxes for j in jobs]),
        "gt_counts": [c for j in jobs for c in j.gt_counts],
        "canvas": first.canvas,
        "config": first.config,
        "gt_classes": None if first.gt_classes is None else torch.cat([j.gt_classes for j in jobs]),
        "drop_invalid": first.drop_invalid,
        "return_max_iou": first.return_max_iou,
        "seed": [s for j in jobs for s in image_seeds(j.seed, j.images)],
    }
    if any(j.ignore_boxes is not None for j in jobs):
        empty = torch.zeros(0, 4, dtype=torch.float32)
        merged["ignore_boxes"] = torch.cat([empty if j.ignore_boxes is None else j.ignore_boxes for j in jobs])
        merged["ignore_counts"] = [
            c for j in jobs for c in (j.ignore_counts if j.ignore_counts is not None else [0] * j.images)
        ]
    if any(j.image_sizes is not None for j in jobs):  # a job without them: its images fill the canvas
        merged["image_sizes"] = torch.cat([
            j.image_sizes if j.image_sizes is not None else torch.tensor([list(j.canvas)] * j.images) for j in jobs
        ]).to(torch.int64)  # fmt: skip
    if first.pad_sizes is not None:  # every job has them (merge_key)
        merged["pad_sizes"] = torch.cat([j.pad_sizes for j in jobs]).to(torch.int64)
    return merged


# SparseTargets' list tensors; the offsets are int64, the others 4-byte (deltas maybe 2).
_SPARSE_LISTS = (
    "positive_offsets", "ignored_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas",
    "positive_classes", "ignored_anchors",
)  # fmt: skip


def _sparse_to_host(sparse: SparseTargets) -> tuple[SparseTargets, int]:
    """``sparse`` on the host, and the bytes copied: one device-to-host copy instead of one
    per list (each copy is a stream synchronisation). The lists' bytes are packed into one
    buffer on the device and copied into pinned host memory (a DMA, from torch's cache of
    pinned blocks), then viewed back. Widest elements first, so every list starts at an
    offset its element size divides."""
    lists = {name: getattr(sparse, name) for name in _SPARSE_LISTS if getattr(sparse, name) is not None}
    order = sorted(lists, key=lambda name: -lists[name].element_size())
    packed = torch.cat([lists[name].contiguous().view(-1).view(torch.uint8) for name in order])
    if packed.is_cuda:
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()
        packed = host
    start = 0
    for name in order:
        tensor = lists[name]
        size = tensor.numel() * tensor.element_size()
        lists[name] = packed[start : start + size].view(tensor.dtype).view(tensor.shape)
        start += size
    return replace(sparse, **lists), packed.numel()


def _slices(job: AssignJob, max_images: int, max_boxes: int) -> list[AssignJob]:
    """``job`` cut into runs of whole images, each within ``max_images`` images and
    ``max_boxes`` boxes (an image with more boxes than that is a slice of its own)."""
    if job.images <= max_images and sum(job.gt_counts) <= max_boxes:
        return [job]
    ignore_counts = job.ignore_counts or [0] * job.images
    slices, start, box, ignore = [], 0, 0, 0
    while start < job.images:
        end, boxes = start + 1, job.gt_counts[start]
        while end < job.images and end - start < max_images and boxes + job.gt_counts[end] <= max_boxes:
            boxes += job.gt_counts[end]
            end += 1
        ignored = sum(ignore_counts[start:end])
        slices.append(replace(
            job,
            gt_boxes=job.gt_boxes[box : box + boxes],
            gt_counts=job.gt_counts[start:end],
            gt_classes=None if job.gt_classes is None else job.gt_classes[box : box + boxes],
            ignore_boxes=None if job.ignore_boxes is None else job.ignore_boxes[ignore : ignore + ignored],
            ignore_counts=None if job.ignore_counts is None else job.ignore_counts[start:end],
            image_sizes=None if job.image_sizes is None else job.image_sizes[start:end],
            pad_sizes=None if job.pad_sizes is None else job.pad_sizes[start:end],
            seed=job.seed + start,  # image i of a request samples with seed + i, sliced or not
        ))  # fmt: skip
        start, box, ignore = end, box + boxes, ignore + ignored
    return slices


def _joined(parts: list[Targets | SparseTargets], finish: Callable[[Targets | SparseTargets], Any] | None) -> Any:
    """A sliced request's targets, from its slices' (or ``finish`` of them)."""
    targets = _concat(parts)
    return targets if finish is None else finish(targets)


def _concat(parts: list[Targets] | list[SparseTargets]) -> Targets | SparseTargets:
    """The targets of consecutive slices of one job, as one batch (``_slices`` reversed).
    Slices that landed in batches of different kinds (one merged with a DENSE request,
    one alone) come back dense and sparse: then all are made dense."""
    if len({type(part) for part in parts}) > 1:
        parts = [Targets.from_sparse(p, check=False) if isinstance(p, SparseTargets) else p for p in parts]
    first = parts[0]
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    dropped = [d for p in parts for d in p.dropped]
    dropped_ignore = [d for p in parts for d in p.dropped_ignore]
    if isinstance(first, Targets):
        return Targets(cat("labels"), cat("matched_gt"), cat("deltas"), cat("classes"), cat("max_iou"), dropped,
                       first.background_class, level_starts=first.level_starts,
                       dropped_ignore=dropped_ignore)  # fmt: skip

    def offsets(name: str) -> torch.Tensor:
        shifted, base = [getattr(first, name)[:1]], 0
        for part in parts:
            shifted.append(getattr(part, name)[1:] + base)
            base += int(getattr(part, name)[-1])
        return torch.cat(shifted)

    return SparseTargets(
        num_anchors=first.num_anchors,
        positive_offsets=offsets("positive_offsets"),
        positive_anchors=cat("positive_anchors"),
        positive_matched_gt=cat("positive_matched_gt"),
        positive_deltas=cat("positive_deltas"),
        ignored_offsets=offsets("ignored_offsets"),
        ignored_anchors=cat("ignored_anchors"),
        positive_classes=cat("positive_classes"),
        background_class=first.background_class,
        dropped=dropped,
        level_starts=first.level_starts,
        dropped_ignore=dropped_ignore,
    )


def _split(targets: Targets | SparseTargets, images: list[int]) -> list[Targets] | list[SparseTargets]:
    """One part per job: row slices (views) of dense targets, or each job's images'
    rows of the sparse lists with offsets from 0."""
    if len(images) == 1:  # the batch is the job (slicing costs a few microseconds a tensor)
        return [targets]
    if isinstance(targets, SparseTargets):
        return _split_sparse(targets, images)
    parts, start = [], 0
    rows = lambda t: None if t is None else t[start : start + count]  # noqa: E731
    for count in images:
        parts.append(
            Targets(
                rows(targets.labels), rows(targets.matched_gt), rows(targets.deltas), rows(targets.classes),
                rows(targets.max_iou), list(targets.dropped[start : start + count]), targets.background_class,
                level_starts=targets.level_starts, dropped_ignore=list(targets.dropped_ignore[start : start + count]),
            )
        )  # fmt: skip
        start += count
    return parts


def _split_sparse(sparse: SparseTargets, images: list[int]) -> list[SparseTargets]:
    # Sliced in numpy and wrapped with torch.from_numpy (each part views the batch's lists):
    # a torch slice or subtraction costs ~4-5 us here (dispatch, a view's autograd
    # bookkeeping), a numpy one ~0.3 us and from_numpy ~2, and a job has 7 lists.
    lists = {name: None if (t := getattr(sparse, name)) is None else t.numpy() for name in _SPARSE_LISTS}
    positive_offsets, ignored_offsets = lists["positive_offsets"], lists["ignored_offsets"]
    positive, ignored = positive_offsets.tolist(), ignored_offsets.tolist()
    classes = lists["positive_classes"]
    wrap = torch.from_numpy
    parts, start = [], 0
    for count in images:
        end = start + count
        rows = slice(positive[start], positive[end])
        parts.append(
            SparseTargets(
                num_anchors=sparse.num_anchors,
                positive_offsets=wrap(positive_offsets[start : end + 1] - positive[start]),
                positive_anchors=wrap(lists["positive_anchors"][rows]),
                positive_matched_gt=wrap(lists["positive_matched_gt"][rows]),
                positive_deltas=wrap(lists["positive_deltas"][rows]),
                ignored_offsets=wrap(ignored_offsets[start : end + 1] - ignored[start]),
                ignored_anchors=wrap(lists["ignored_anchors"][ignored[start] : ignored[end]]),
                positive_classes=None if classes is None else wrap(classes[rows]),
                background_class=sparse.background_class,
                dropped=list(sparse.dropped[start:end]),
                level_starts=sparse.level_starts,
                dropped_ignore=list(sparse.dropped_ignore[start:end]),
            )
        )
        start = end
    return parts
