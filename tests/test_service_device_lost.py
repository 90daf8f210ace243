"""A GPU that fails for good while serving (a CUDA error that stays with the process: an
illegal address, a device-side assert, an uncorrectable ECC error): the server's callers
get UNAVAILABLE and retry elsewhere, its health turns NOT_SERVING and ``serve`` stops
(exit 1), rather than answering INTERNAL for good while its health says SERVING.

On this machine (no GPU) the fault is injected: the batch raises CUDA's words and the
device probe (``backend.device_fault``) reports the device broken. The last test makes
the fault real on a GPU, in a process of its own (its CUDA context stays broken)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service_harness import ServerThread, until

from tritarget.clients import TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.kernels import presets
from tritarget.protos import target_assigner_pb2_grpc as pb_grpc
from tritarget.service import backend
from tritarget.service.backend import AssignJob, Batcher, BatchOptions
from tritarget.service.server import ServerOptions, serve

CANVAS = (96, 128)  # the requests'; the warm-up's is 64 x 64 and computes as usual
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])
CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
CONFIG = presets.get("retinanet_torchvision")


@pytest.fixture
def broken_gpu(monkeypatch) -> list:
    """Batches on CANVAS raise CUDA's error and the device probe finds the device broken;
    returns the list of the batches that ran (their image counts)."""
    ran = []
    assign_batch = Batcher._assign

    def failing(self, jobs):
        if jobs[0].canvas != CANVAS:
            return assign_batch(self, jobs)
        ran.append(sum(job.images for job in jobs))
        raise torch.AcceleratorError(CUDA_FAULT)

    monkeypatch.setattr(Batcher, "_assign", failing)
    monkeypatch.setattr(backend, "device_fault", lambda device: RuntimeError(f"{CUDA_FAULT}\nmore lines"))
    return ran


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_lost_gpu_answers_unavailable_and_turns_health_not_serving(broken_gpu):
    gate = threading.Event()
    srv = ServerThread().start()
    try:
        assert _health(srv.address) == health_pb2.HealthCheckResponse.SERVING
        # Two requests merged into one batch behind a busy worker: the failed batch is not
        # run again request by request (each would fail the same on a broken context).
        srv.run(_occupy(srv, gate))
        errors = []

        def call() -> None:
            with TargetClient(srv.address, retries=0, timeout=30) as client:
                try:
                    client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
                except TargetServiceError as error:
                    errors.append(error)

        callers = [threading.Thread(target=call) for _ in range(2)]
        for caller in callers:
            caller.start()
        until(lambda: srv.metrics.value("tritarget_queued_images") == 2)
        gate.set()
        for caller in callers:
            caller.join(30)
        assert broken_gpu == [2]
        assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 2
        for error in errors:
            assert "the server's GPU (cpu) failed and cannot recover in this process" in error.details
            assert f"({CUDA_FAULT})" in error.details and "retry on another replica" in error.details
        assert srv.server.lost.is_set() and not srv.server.ready.is_set()
        until(lambda: _health(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert srv.metrics.value("tritarget_serving") == 0
        # Later requests are refused before any compute.
        with TargetClient(srv.address, retries=0, timeout=30) as client:
            with pytest.raises(TargetServiceError) as info:
                client.assign(BOXES, [2], (64, 64), preset="retinanet_torchvision")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "GPU" in info.value.details
        assert broken_gpu == [2]
    finally:
        gate.set()
        srv.stop()


def test_a_stream_ends_unavailable_where_its_request_met_the_lost_gpu(broken_gpu):
    """Not an in-band error (a client does not retry those): the stream ends UNAVAILABLE,
    and the client sends the unanswered requests to another replica."""
    with ServerThread() as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.TargetAssignerStub(channel)
        good = build_request(BOXES, [2], (64, 64), preset="retinanet_torchvision", request_id="before")
        lost = build_request(BOXES, [2], CANVAS, preset="retinanet_torchvision", request_id="lost")
        answers = []
        with pytest.raises(grpc.RpcError) as info:  # nothing after the lost one: its count would race the stream's end
            for response in stub.AssignStream(iter([good, lost]), timeout=30):
                answers.append(response)
        assert [(a.request_id, a.HasField("error")) for a in answers] == [("before", False)]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the server's GPU (cpu) failed" in info.value.details()
        assert srv.metrics.value("tritarget_errors_total", {"method": "AssignStream", "code": "UNAVAILABLE"}) == 1


def test_stream_requests_waiting_for_room_are_refused_once_the_gpu_is_lost(broken_gpu):
    """A stream's requests that wait for room in a full queue get DeviceLost at once; they
    waited (one of three) until the stop's grace had run out, 10 s by default."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=4, max_queue_images=4, inline_max_images=0))
        batcher.start()
        gate = threading.Event()
        try:
            busy = asyncio.ensure_future(batcher.run(gate.wait))  # the one compute worker held
            boxes = BOXES[:1].repeat(4, 1)
            first = asyncio.ensure_future(batcher.submit(AssignJob(CONFIG, CANVAS, boxes, [1] * 4)))  # the queue full
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(batcher.submit(AssignJob(CONFIG, CANVAS, boxes, [1] * 4), wait=True))
                       for _ in range(3)]  # fmt: skip
            await asyncio.sleep(0.05)
            parked = batcher.waiting_requests
            gate.set()
            await busy
            _, pending = await asyncio.wait([first, *waiting], timeout=5)
            return parked, len(pending), [type(job.exception()).__name__ for job in (first, *waiting) if job.done()]
        finally:
            gate.set()
            await batcher.close(finish=False)

    parked, pending, errors = asyncio.run(run())
    assert (parked, pending, errors) == (3, 0, ["DeviceLost"] * 4)


def test_a_stream_request_waiting_behind_a_filling_batch_is_refused_once_the_gpu_is_lost(broken_gpu):
    """Where no batch is taken after the failed one (the request left queued waits out its
    queue delay), the stream requests waiting for room still get DeviceLost at once, not
    once that delay or the stop's grace has run out."""

    async def run():
        options = BatchOptions(max_batch_images=4, max_queue_images=4, max_queue_delay_s=60.0, max_slice_boxes=2,
                               inline_max_images=0)  # fmt: skip
        batcher = Batcher("reference", options)
        batcher.start()
        gate = threading.Event()
        try:
            busy = asyncio.ensure_future(batcher.run(gate.wait))  # the one compute worker held
            filling = AssignJob(CONFIG, CANVAS, BOXES[:1], [1, 0, 0], drop_invalid=True)  # 3 places, 1 box
            queued = [asyncio.ensure_future(batcher.submit(filling))]
            queued.append(asyncio.ensure_future(batcher.submit(AssignJob(CONFIG, CANVAS, BOXES, [2]))))  # full: 2 boxes
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(batcher.submit(AssignJob(CONFIG, CANVAS, BOXES[:1], [1, 0]), wait=True))
            await asyncio.sleep(0.05)
            parked = batcher.waiting_requests
            gate.set()
            await busy
            done, _ = await asyncio.wait([queued[1], waiting], timeout=5)
            return parked, [type(job.exception()).__name__ for job in (queued[1], waiting) if job in done]
        finally:
            gate.set()
            await batcher.close(finish=False)

    assert asyncio.run(run()) == (1, ["DeviceLost", "DeviceLost"])


def test_a_lost_gpu_found_after_a_bad_request_is_set_apart_is_not_retried_request_by_request(broken_gpu):
    """A batch with a request whose rows do not add up runs its good requests merged
    again: where that batch finds the GPU lost, they get DeviceLost at once (each run
    alone would fail the same, and answer INTERNAL), the bad one its own error."""
    batcher = Batcher("reference", BatchOptions())  # not started: batches run by hand
    good = AssignJob(CONFIG, CANVAS, BOXES, [2])
    bad = AssignJob(CONFIG, CANVAS, BOXES, [3])  # two boxes counted as three
    results = batcher._compute([good, bad, good])
    assert [type(result).__name__ for result in results] == ["DeviceLost", "InvalidInput", "DeviceLost"]
    assert broken_gpu == [2]  # the two good images merged, not run again one by one
    assert batcher.lost is results[0]


def test_a_batch_taken_after_the_gpu_was_lost_is_not_computed(broken_gpu):
    """A batch queued before the GPU was lost and taken after it gets DeviceLost without
    running (on a broken context every call fails the same, or hangs)."""
    batcher = Batcher("reference", BatchOptions())  # not started: batches run by hand
    first = batcher._compute([AssignJob(CONFIG, CANVAS, BOXES, [2])])
    later = batcher._compute([AssignJob(CONFIG, CANVAS, BOXES, [2]), AssignJob(CONFIG, CANVAS, BOXES, [2])])
    assert first == [batcher.lost] and later == [batcher.lost] * 2
    assert broken_gpu == [1]  # the later batch never ran


def test_a_gpu_lost_while_a_failed_batch_runs_request_by_request_fails_the_rest_unavailable(monkeypatch):
    """A batch that failed on a working GPU runs its requests one by one; where one of them
    finds the GPU lost, it and the ones after it get DeviceLost (not INTERNAL), and those
    are not run."""
    ran = []

    def failing(self, jobs):
        ran.append(len(jobs))
        if len(ran) == 1:
            raise RuntimeError("a bug in the merged batch")
        raise torch.AcceleratorError(CUDA_FAULT)

    monkeypatch.setattr(Batcher, "_assign", failing)
    monkeypatch.setattr(backend, "device_fault", lambda device: RuntimeError(CUDA_FAULT) if len(ran) > 1 else None)
    batcher = Batcher("reference", BatchOptions())  # not started: batches run by hand
    results = batcher._compute([AssignJob(CONFIG, CANVAS, BOXES, [2]) for _ in range(3)])
    assert [type(result).__name__ for result in results] == ["DeviceLost"] * 3
    assert ran == [3, 1] and batcher.lost is results[0]


def test_two_batches_that_find_the_gpu_lost_together_tell_the_server_once(monkeypatch):
    """Two compute workers' batches fail at once: one ``DeviceLost`` for every caller, and
    the server told once (not a second error in place of the first, nor a second stop)."""
    both_failing = threading.Barrier(2, timeout=10)

    def failing(self, jobs):
        both_failing.wait()
        raise torch.AcceleratorError(CUDA_FAULT)

    monkeypatch.setattr(Batcher, "_assign", failing)
    monkeypatch.setattr(backend, "device_fault", lambda device: RuntimeError(CUDA_FAULT))

    async def run():
        told = []
        batcher = Batcher("cpu", BatchOptions(compute_workers=2, inline_max_images=0), on_device_lost=told.append)
        batcher.start()
        try:
            jobs = [AssignJob(CONFIG, CANVAS, BOXES, [2], drop_invalid=drop) for drop in (False, True)]  # not merged
            errors = await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)
            await asyncio.sleep(0.05)  # the server is told on the loop
            return told, errors, batcher.lost
        finally:
            await batcher.close(finish=False)

    told, errors, lost = asyncio.run(run())
    assert told == [lost] and errors == [lost, lost]


def test_serve_stops_when_the_gpu_is_lost(broken_gpu):
    announced, codes, callers = [], [], []

    def request(port: int) -> None:  # a caller elsewhere: serve's own tasks end as it stops
        with TargetClient(f"127.0.0.1:{port}", retries=0, timeout=30) as client:
            try:
                client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
            except TargetServiceError as error:
                codes.append(error.code)

    def on_ready(server) -> None:
        callers.append(threading.Thread(target=request, args=(server.port,)))
        callers[0].start()

    options = ServerOptions(port=0, backend="reference", warmup_canvas=(64, 64), grace_s=5.0)
    with pytest.raises(RuntimeError, match=r"^the GPU failed: the server's GPU \(cpu\) failed"):
        asyncio.run(serve(options, on_ready=on_ready, announce=lambda *a, **k: announced.append(a[0]),
                          stop_signals=()))  # fmt: skip
    callers[0].join(30)
    assert codes == [grpc.StatusCode.UNAVAILABLE]
    assert any(line.startswith("stopping: the server's GPU (cpu) failed") for line in announced), announced


def test_a_failed_batch_on_a_cpu_leaves_the_server_serving(monkeypatch):
    """The probe finds a CPU always working: a batch that fails there is a bug of that
    batch (INTERNAL), and the server serves on."""
    assert backend.device_fault(torch.device("cpu")) is None
    assign_batch = Batcher._assign

    def failing(self, jobs):
        if jobs[0].canvas == CANVAS:
            raise RuntimeError("a bug")
        return assign_batch(self, jobs)

    monkeypatch.setattr(Batcher, "_assign", failing)
    with ServerThread() as srv, TargetClient(srv.address, retries=0, timeout=30) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert not srv.server.lost.is_set()
        assert _health(srv.address) == health_pb2.HealthCheckResponse.SERVING
        assert client.assign(BOXES, [2], (64, 64), preset="retinanet_torchvision").labels.numel() > 0


def test_a_batch_out_of_memory_is_not_taken_for_a_lost_gpu(monkeypatch):
    """Out of memory is the batch's own failure (RESOURCE_EXHAUSTED, the server serves on):
    the device is not probed, where a full GPU could fail the probe's allocation too."""
    probed = []
    assign_batch = Batcher._assign

    def out_of_memory(self, jobs):
        if jobs[0].canvas == CANVAS:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return assign_batch(self, jobs)

    monkeypatch.setattr(Batcher, "_assign", out_of_memory)
    monkeypatch.setattr(backend, "device_fault", lambda device: probed.append(device) or RuntimeError(CUDA_FAULT))
    with ServerThread() as srv, TargetClient(srv.address, retries=0, timeout=30) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(BOXES, [2], CANVAS, preset="retinanet_torchvision")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert probed == [] and not srv.server.lost.is_set()
        assert _health(srv.address) == health_pb2.HealthCheckResponse.SERVING


async def _occupy(srv: ServerThread, gate: threading.Event) -> None:
    asyncio.ensure_future(srv.server.batcher.run(gate.wait))


# A real fault: a device-side assert (an index out of bounds) breaks the process's CUDA
# context, then a request comes. Run apart: the broken context stays with its process.
_REAL_FAULT = textwrap.dedent(
    """
    import asyncio, sys, threading
    import grpc, torch
    from tritarget.clients import TargetClient, TargetServiceError
    from tritarget.service.server import ServerOptions, serve

    def request(port):  # a caller elsewhere: serve's own tasks end as it stops
        boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
        with TargetClient(f"127.0.0.1:{port}", retries=0, timeout=60) as client:
            try:
                client.assign(boxes, [1], (96, 128), preset="retinanet_torchvision")
                print("answered", flush=True)
            except TargetServiceError as error:
                print("code:", error.code.name, error.details, flush=True)

    callers = []

    def break_then_request(server):
        try:
            torch.zeros(1, device="cuda")[torch.tensor([5], device="cuda")].sum().item()
        except Exception as exc:
            print("context broken:", str(exc).splitlines()[0], flush=True)
        callers.append(threading.Thread(target=request, args=(server.port,)))
        callers[0].start()

    try:
        asyncio.run(serve(ServerOptions(port=0, backend="triton", warmup_canvas=(64, 64)),
                          on_ready=break_then_request, stop_signals=()))
    except RuntimeError as exc:
        callers[0].join(60)
        print("serve:", exc, flush=True)
        sys.exit(1)
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_device_side_assert_stops_the_server():
    done = subprocess.run([sys.executable, "-c", _REAL_FAULT], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "context broken:" in out, out
    assert "code: UNAVAILABLE the server's GPU (cuda:0)" in out, out  # named with its index
    assert "serve: the GPU failed:" in out, out
