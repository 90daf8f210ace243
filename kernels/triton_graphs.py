"""The triton backend's launches replayed as CUDA graphs: small batches, whose launches
cost more host time than their kernels.

On the H200 machine a B = 1 ``solve`` ran 0.017 ms of kernels in a call of 0.09-0.24 ms
(run12, ``benchmarks/results/gpu_h200/run12/defaults/bench_gpu.json`` and
``sweep.txt``), and the same launches replayed from a CUDA graph cost 2 us of host time
(``sweep.txt``). A graph replays fixed launches on fixed memory, so each one is captured
for one kind of call -- device, stream, config, canvas, batch size, gt and ignore rows
rounded up to a power of two, classes or not, max IoU or not, which values the kernels
check, and what else the launches are specialised on (dense or sparse, the sparse lists'
sizes) -- with its inputs in buffers of that size (``_Inputs``). A call copies its
boxes, classes and offsets in, replays, and copies out what it returns, since the next
replay writes the same memory. The kernels read each image's rows through its offsets,
so rows past the call's own are never read (they start as NaN; tests run the kernels on
such buffers).

The backend replays where ``_Meta.graph_batches`` says (``triton_backend._replayable``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .problem import Problem
from .streams import stream_key
from .triton_launch import keeping_arguments

__all__ = ["Graphs", "capacity"]

# Graphs kept per CUDA stream, the least recently used evicted: each holds its batch's
# outputs and work memory (~5 MB per image for RetinaNet at 800x1344, dense).
GRAPHS_KEPT = 8


def capacity(rows: int, least: int) -> int:
    """Rows of a graph's buffer for ``rows`` (a power of two, at least ``least``; none
    for none where ``least`` is 0): calls whose counts round alike share a graph."""
    if rows == 0 and least == 0:
        return 0
    return max(least, 1 << max(rows - 1, 0).bit_length())


class _Inputs:
    """A problem like the callers' whose gt boxes, classes, ignore boxes and offsets live
    in buffers of fixed size (``problem``), and the copies that load a caller's problem
    into them (``load``)."""

    def __init__(self, problem: Problem) -> None:
        device = problem.device
        rows, ignore_rows = capacity(problem.gt_boxes.shape[0], 16), capacity(problem.ignore_boxes.shape[0], 0)
        # float32 named: under torch.set_default_dtype(torch.float64) the buffers were
        # float64, and every replayable call failed its launch's check (a TypeError).
        self.gt_boxes = torch.full((rows, 4), float("nan"), dtype=torch.float32, device=device)
        self.gt_classes = (
            None if problem.gt_classes is None else torch.full((rows,), -1, dtype=torch.int32, device=device)
        )
        self.ignore_boxes = torch.full((ignore_rows, 4), float("nan"), dtype=torch.float32, device=device)
        host_ints = problem.host_ints
        self.ints = torch.empty(len(host_ints.ints), dtype=torch.int64, device=device)
        self.problem = Problem(
            config=problem.config, canvas=problem.canvas, grid=problem.grid, anchors=problem.anchors,
            gt_boxes=self.gt_boxes, gt_classes=self.gt_classes, ignore_boxes=self.ignore_boxes,
            host_ints=host_ints, want_max_iou=problem.want_max_iou, valid_cells=problem.valid_cells,
            gt_boxes_checked=problem.gt_boxes_checked, gt_classes_checked=problem.gt_classes_checked,
            ignore_boxes_checked=problem.ignore_boxes_checked,
        )  # fmt: skip
        self.problem._on_device = host_ints.views(self.ints)

    def load(self, problem: Problem) -> None:
        """Copy ``problem``'s gt boxes, classes, ignore boxes and offsets in (on the current
        stream, before the replay that reads them)."""
        rows, ignore_rows = problem.gt_boxes.shape[0], problem.ignore_boxes.shape[0]
        if rows:
            self.gt_boxes[:rows].copy_(problem.gt_boxes, non_blocking=True)
            if self.gt_classes is not None:
                self.gt_classes[:rows].copy_(problem.gt_classes, non_blocking=True)
        if ignore_rows:
            self.ignore_boxes[:ignore_rows].copy_(problem.ignore_boxes, non_blocking=True)
        # Pageable memory: CUDA has copied it out when the call returns.
        self.ints.copy_(torch.frombuffer(problem.host_ints.ints, dtype=torch.int64), non_blocking=True)


# What a closed graph's replay gives: its caller launches instead.
_CLOSED = object()


def _release_pool(pool: tuple[int, int]) -> None:
    """Give back the memory pool of a capture whose end failed: torch ends a capture's
    allocations to its pool only when the capture ends, and frees the pool only for a
    graph that was captured, so the current device's allocator would go on routing to it
    and hold it for the life of the process (torch's private calls, as its own graph
    tools make them)."""
    device = torch.cuda.current_device()
    for release in (torch._C._cuda_endAllocateToPool, torch._C._cuda_releasePool):
        with contextlib.suppress(RuntimeError):
            release(device, pool)


class _Graph:
    """One captured ``launch``: its inputs' buffers, its outputs (the memory every replay
    writes), and every tensor its kernels read."""

    def __init__(self, problem: Problem, launch: Callable[[Problem], Any], capture_stream: torch.cuda.Stream) -> None:
        self.inputs = _Inputs(problem)
        self.inputs.load(problem)
        self.device = problem.device
        self.lock = threading.Lock()  # one replay at a time: the buffers are shared
        self.closed = False
        # Recorded after each replay and its copies out (one stream: the kind's): what close
        # waits for, instead of the whole device (cudaDeviceSynchronize from this thread
        # breaks a capture another compute worker may have under way).
        self.done = torch.cuda.Event()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):  # the capture's device, not only the current one
            current = torch.cuda.current_stream()
            capture_stream.wait_stream(current)
            try:
                with torch.cuda.stream(capture_stream):
                    # Compiles the kernels' variants and fills the caches the capture stream
                    # reads, through the JIT's launch and then the direct one the capture records.
                    for _ in range(2):
                        launch(self.inputs.problem)
            finally:  # also when a launch failed: the inputs go back to the caller's stream's pool
                current.wait_stream(capture_stream)
            # capture_begin/end rather than torch.cuda.graph, whose exit leaves the capture
            # stream current when the capture fails, and whose entry empties the allocator's
            # cache (every other stream's too). thread_local: the service's other compute
            # workers may launch meanwhile.
            pool = torch.cuda.graph_pool_handle()
            with torch.cuda.stream(capture_stream), keeping_arguments() as kept:
                self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self.outputs = launch(self.inputs.problem)
                finally:
                    try:
                        self.graph.capture_end()
                    except BaseException:
                        _release_pool(pool)
                        raise
        self.kept = kept

    def replay(self, problem: Problem, finish: Callable[[Any, bool], Any]) -> Any:
        """``finish(outputs, True)`` after a replay on ``problem``'s inputs (it copies out
        what it returns and reads back what it needs before the next replay may begin);
        ``_CLOSED`` once closed."""
        with self.lock:
            if self.closed:
                return _CLOSED
            self.inputs.load(problem)
            self.graph.replay()
            try:
                return finish(self.outputs, True)
            finally:
                self.done.record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        """No more replays, and none in flight: the memory its kernels read (its buffers,
        and tables that caches may since have evicted) is freed with it, for use by
        allocations that would not wait for a replay still running."""
        with self.lock:
            self.closed = True
            self.done.synchronize()  # at once for a graph never replayed (an event never recorded)


class Graphs:
    """Graphs of the backend's launches, captured on first use per kind of call, the
    ``GRAPHS_KEPT`` most recently used per CUDA stream kept. Replays of captured graphs
    never wait for a capture (captures take one at a time). A capture that fails (what is
    launched reads back, say) turns graphs off for the process, with a warning that names
    the error, since a failed capture may leave torch's allocator in an undefined state;
    running out of memory in one is raised as the launches would raise it."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._lock = threading.Lock()  # the graphs' table
        self._capturing = threading.Lock()  # one capture at a time, on one stream per device
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.failed: str | None = None  # why graphs are off

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def kind(problem: Problem) -> tuple:
        """What of a problem a graph is captured for: calls of the same kind (and launches)
        replay the same graph."""
        return (
            problem.device, stream_key(problem.device), problem.config, problem.canvas, problem.batch_size,
            capacity(problem.gt_boxes.shape[0], 16), capacity(problem.ignore_boxes.shape[0], 0),
            problem.gt_classes is not None, problem.want_max_iou, problem.gt_boxes_checked,
            problem.gt_classes_checked, problem.ignore_boxes_checked,
        )  # fmt: skip

    def launches_kept(self, problem: Problem) -> list[tuple]:
        """What the kept graphs of ``problem``'s kind were launched with (``run``'s
        ``launches``), least recently used first."""
        kind = self.kind(problem)
        with self._lock:
            return [launches for k, launches in self._graphs if k == kind]

    def run(self, problem: Problem, launch: Callable[[Problem], Any], finish: Callable[[Any, bool], Any],
            launches: tuple) -> Any:  # fmt: skip
        """``finish(launch(problem), replayed)``: ``launch`` (a problem -> its outputs,
        nothing read back) replayed from the graph of ``problem``'s kind and ``launches``
        (what else ``launch`` is specialised on), captured first where there is none;
        launched as it is where graphs are off, or the graph was let go meanwhile
        (``replayed`` False: nothing to copy out)."""
        graph = self._graph((self.kind(problem), launches), problem, launch)
        result = _CLOSED if graph is None else graph.replay(problem, finish)
        return finish(launch(problem), False) if result is _CLOSED else result

    def _kept(self, key: tuple) -> _Graph | None:
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
            return graph

    def _graph(self, key: tuple, problem: Problem, launch: Callable[[Problem], Any]) -> _Graph | None:
        graph = self._kept(key)
        if graph is not None or self.failed is not None:
            return graph
        with self._capturing:
            graph = self._kept(key)  # captured by another thread meanwhile
            if graph is not None or self.failed is not None:
                return graph
            stream = self._streams.get(problem.device)
            if stream is None:
                # From torch's pool of high-priority streams: the compute workers' come round
                # robin from its 32 of normal priority, so with 32 or more workers one would
                # share this one, and its launches during a capture would join the graph.
                stream = self._streams[problem.device] = torch.cuda.Stream(problem.device, priority=-1)
            try:
                graph = _Graph(problem, launch, stream)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                cause = error.__context__ or error  # what failed inside the capture, if anything did
                self.failed = f"{type(cause).__name__}: {cause}"
                warnings.warn(f"tritarget: capturing a CUDA graph for {problem.batch_size} images on canvas "
                              f"{problem.canvas} failed ({self.failed}); CUDA graphs are off for this process",
                              RuntimeWarning, stacklevel=4)  # fmt: skip
                return None
        with self._lock:
            self._graphs[key] = graph
            same_stream = [k for k in self._graphs if k[0][:2] == key[0][:2]]
            evicted = [self._graphs.pop(k) for k in same_stream[: max(len(same_stream) - GRAPHS_KEPT, 0)]]
        for old in evicted:
            old.close()
        return graph
