"""The batcher's data plane without grpc: merged batches, failing requests, finishers.

A merged batch is checked request by request only when it fails, so these pin down
that a bad request still fails alone with its own error, that requests whose counts
do not add up are never merged, and that ``finish`` runs per request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time

import pytest
import torch
from test_service_harness import sparse_view

from support import assert_targets_equal, compile_keys, random_batch, record_launches
from tritarget.kernels import Targets, assign, presets
from tritarget.service import backend
from tritarget.service.backend import AssignJob, Batcher, BatchOptions, _concat, _split
from tritarget.service.cli import _server_options, build_parser
from tritarget.service.codec import Limits
from tritarget.service.errors import InvalidInput, Overloaded, Unavailable

CANVAS = (96, 128)
PRESET = "retinanet_torchvision"


def test_batch_options_suit_the_device_unless_given():
    cpu = BatchOptions().resolved(torch.device("cpu"))
    assert (cpu.max_batch_images, cpu.compute_workers) == (128, 1)
    assert cpu.threads_per_worker == torch.get_num_threads()
    gpu = BatchOptions().resolved(torch.device("cuda"))  # a device name: no GPU needed
    assert (gpu.max_batch_images, gpu.compute_workers) == (64, 2)
    given = BatchOptions(max_batch_images=8, compute_workers=3, threads_per_worker=1).resolved(torch.device("cuda"))
    assert (given.max_batch_images, given.compute_workers, given.threads_per_worker) == (8, 3, 1)


def test_the_default_batching_is_what_serve_runs_and_bounds_a_batch_as_one_request():
    """The servers made in process (``ServerOptions``' default batching) batch as ``serve``
    does without flags, and a batch's anchor rows are bounded as one request's are (the
    request limit of the same name): a request within the limits is never sliced for them."""
    assert _server_options(build_parser().parse_args(["serve", "--port", "0"])).batching == BatchOptions()
    assert BatchOptions().max_anchor_rows == Limits().max_anchor_rows


@pytest.mark.parametrize("field, value", [("max_batch_images", 0), ("compute_workers", -1), ("max_queue_images", 0),
                                          ("threads_per_worker", 1.5), ("max_queue_delay_s", -0.001),
                                          ("max_queue_delay_s", float("nan")), ("max_queue_delay_s", math.inf),
                                          ("max_slice_boxes", True),
                                          ("max_anchor_rows", 0), ("inline_max_images", -1)])  # fmt: skip
def test_batch_options_refuse_what_cannot_work(field, value):
    with pytest.raises(ValueError, match=field):
        BatchOptions(**{field: value})


def _computed_on(backend_name: str, jobs: list[AssignJob], options: BatchOptions | None = None,
                 hold_the_worker: bool = False, pause_s: float = 0.01) -> tuple[list, list[bool]]:  # fmt: skip
    """The jobs submitted one by one to a started batcher, each ``pause_s`` after it
    started or the last one was answered, each with a finisher: their outcomes (finished
    results or errors), and for each batch whether it was computed on the event loop's
    thread. ``hold_the_worker``: a task holds the one compute worker while they queue."""

    async def run():
        batcher = Batcher(backend_name, options or BatchOptions())
        batcher.start()
        on_loop, compute = [], batcher._compute
        batcher._compute = lambda *args: on_loop.append(threading.get_ident() == loop_thread) or compute(*args)
        release = threading.Event()
        held = asyncio.ensure_future(batcher.run(release.wait)) if hold_the_worker else None
        try:
            submitted = []
            for job in jobs:
                await asyncio.sleep(pause_s)
                submitted.append(asyncio.ensure_future(batcher.submit(job, lambda t: ("finished", t))))
                if not hold_the_worker:
                    await asyncio.wait(submitted[-1:])
            await asyncio.sleep(0.02)
            release.set()
            return await asyncio.gather(*submitted, return_exceptions=True), on_loop
        finally:
            release.set()
            if held is not None:
                await held
            await batcher.close()

    loop_thread = threading.get_ident()
    return asyncio.run(run())


def test_a_small_sparse_request_at_an_idle_server_is_computed_on_the_event_loop(generator):
    """The cpu backend's small SPARSE batch that finds nothing queued or running skips the
    hand-over to a compute worker and back; its targets and finisher are the worker's."""
    jobs = [_job(*random_batch(generator, [3, 0, 5], CANVAS), sparse=True, seed=7)]
    jobs.append(_job(*random_batch(generator, [2], CANVAS), sparse=True))  # arrives 10 ms after the first is done
    results, on_loop = _computed_on("cpu", jobs)
    assert on_loop == [True, True]
    for job, (tag, got) in zip(jobs, results):
        assert tag == "finished"
        in_process = assign(job.gt_boxes, job.gt_counts, CANVAS, presets.get(PRESET), backend="cpu", seed=job.seed)
        assert_targets_equal(Targets.from_sparse(got), sparse_view(in_process), rtol=0, atol=0)


def test_a_failing_request_computed_on_the_event_loop_gets_its_own_error(generator):
    """An invalid box raises inside the inline compute: the caller gets its error, naming
    the image and box, as from a worker (the loop goes on)."""
    boxes, counts = random_batch(generator, [2], CANVAS)
    boxes[1, 2] = boxes[1, 0] - 1  # x2 < x1
    (outcome,), on_loop = _computed_on("cpu", [_job(boxes, counts, sparse=True)])
    assert on_loop == [True]
    assert isinstance(outcome, InvalidInput) and "image 0, box 1: degenerate box" in str(outcome)


def test_requests_that_follow_each_other_closely_go_to_a_compute_worker(generator, monkeypatch):
    """A call that comes right after the last one was answered is likely one that waited
    in gRPC while the loop computed: computed on the loop too, it would leave the workers
    idle and every batch unmerged. Only after a lull (``_INLINE_AFTER_IDLE_S``, here
    0.5 s so that a slow machine cannot blur the two cases) is a request computed on the
    loop again."""
    monkeypatch.setattr(backend, "_INLINE_AFTER_IDLE_S", 0.5)
    jobs = [_job(*random_batch(generator, [2], CANVAS), sparse=True) for _ in range(3)]
    _, on_loop = _computed_on("cpu", jobs, pause_s=0.05)
    assert on_loop == [False, False, False]
    _, on_loop = _computed_on("cpu", jobs, pause_s=0.55)
    assert on_loop == [True, True, True]


def _large_canvas_job(generator) -> AssignJob:
    """One image whose anchors are over the inline bound for a batch of one image."""
    canvas = (1024, 1600)
    assert backend.resolve_grid(presets.get(PRESET).anchors, canvas).num_anchors > backend._INLINE_ANCHORS_PER_IMAGE
    return AssignJob(presets.get(PRESET), canvas, *random_batch(generator, [1], canvas), sparse=True)


@pytest.mark.parametrize("case", ["at the bounds", "dense", "over the images", "over the boxes", "over the anchors",
                                  "one image over the anchors", "turned off", "reference backend",
                                  "worker busy", "one of two workers busy",
                                  "over the boxes with ignore regions", "one image at the bounds"])  # fmt: skip
def test_other_batches_are_computed_on_a_compute_worker(generator, case):
    """Inline only where nothing else waits on compute, and only bounded work: DENSE
    responses copy megabytes, other backends are slow or wait on a device, and a batch over
    the images, boxes or anchor rows would hold the event loop for long."""
    options, name, hold = BatchOptions(inline_max_images=2), "cpu", False
    job = _job(*random_batch(generator, [1, 2 * backend._INLINE_BOXES_PER_IMAGE - 1], CANVAS), sparse=True)
    if case == "dense":
        job = _job(job.gt_boxes, job.gt_counts)
    elif case == "over the images":
        job = _job(*random_batch(generator, [1, 1, 0], CANVAS), sparse=True)
    elif case == "over the boxes":
        job = _job(*random_batch(generator, [backend._INLINE_BOXES_PER_IMAGE * 2 + 1], CANVAS), sparse=True)
    elif case == "over the anchors":
        options, job = BatchOptions(inline_max_images=1), _large_canvas_job(generator)
    elif case == "one image over the anchors":  # under 8 images' bound: 1.7 M anchors held the loop 64-100 ms
        options, job = BatchOptions(inline_max_images=8), _large_canvas_job(generator)
    elif case == "turned off":
        options = BatchOptions(inline_max_images=0)
    elif case == "reference backend":
        name = "reference"
    elif case == "worker busy":
        hold = True
    elif case == "one of two workers busy":  # the other's batch would wait behind one on the loop
        options, hold = BatchOptions(inline_max_images=2, compute_workers=2), True
    elif case == "over the boxes with ignore regions":  # at the bound in boxes, one ignore region over it
        ignore = torch.tensor([[5.0, 5.0, 30.0, 30.0]])
        job = _job(job.gt_boxes, job.gt_counts, ignore_boxes=ignore, ignore_counts=[1, 0], sparse=True)
    elif case == "one image at the bounds":  # the boxes bound is per image of inline_max_images, not of the job
        job = _job(job.gt_boxes, [2 * backend._INLINE_BOXES_PER_IMAGE], sparse=True)
    (result,), on_loop = _computed_on(name, [job], options, hold_the_worker=hold)
    assert on_loop == [case in ("at the bounds", "one image at the bounds")]
    assert result[0] == "finished"


@pytest.mark.parametrize("case", ["merged", "another group queued"])
def test_only_a_lone_request_is_computed_on_the_event_loop(generator, case):
    """With a queue delay, the request that fills a batch of queued requests, or that fills
    its own while another group still fills up, leaves it to a compute worker: a merged
    batch is not one small request's bounded work, and a server with requests queued is
    not idle."""
    options = BatchOptions(max_batch_images=2, max_queue_delay_s=5.0, max_slice_boxes=3)
    if case == "merged":  # two 1-image requests: full at 2 images
        jobs = [_job(*random_batch(generator, [1], CANVAS), sparse=True) for _ in range(2)]
    else:  # a 1-box request of a group of its own, then one of 3 boxes: full at the box bound
        jobs = [_job(*random_batch(generator, [1], CANVAS), return_max_iou=True),
                _job(*random_batch(generator, [3], CANVAS), sparse=True)]  # fmt: skip

    async def run():
        batcher = Batcher("cpu", options)
        batcher.start()
        threads, compute = [], batcher._compute
        batcher._compute = lambda *args: threads.append(threading.get_ident()) or compute(*args)
        try:
            await asyncio.sleep(0.01)  # past the lull after the start
            submitted = [asyncio.ensure_future(batcher.submit(job)) for job in jobs]
            await asyncio.wait_for(submitted[-1], timeout=5)  # the full batch, without the delay
            computed = list(threads)
        finally:
            await batcher.close()
        return computed, await asyncio.gather(*submitted)

    computed, results = asyncio.run(run())
    assert computed and threading.get_ident() not in computed
    assert [got.batch_size for got in results] == [1, 1]


@pytest.fixture
def batcher():
    batcher = Batcher("reference", BatchOptions(max_batch_images=16))
    yield batcher
    batcher.stop_workers()


def _job(boxes, counts, **kwargs) -> AssignJob:
    return AssignJob(presets.get(PRESET), CANVAS, boxes, list(counts), **kwargs)


def _expected(job: AssignJob):
    return assign(job.gt_boxes, job.gt_counts, CANVAS, presets.get(PRESET), backend="reference", seed=job.seed)


def _good(generator, counts=(3, 1)) -> AssignJob:
    return _job(*random_batch(generator, list(counts), CANVAS))


def test_merged_batch_without_errors_is_not_checked_twice(batcher, generator, monkeypatch):
    jobs = [_good(generator), _good(generator, (0, 2, 5))]
    checked = []
    monkeypatch.setattr(AssignJob, "check", lambda self: checked.append(self))
    results = batcher._compute(jobs)
    assert checked == []
    for job, got in zip(jobs, results):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_bad_request_in_a_merged_batch_fails_alone_with_its_own_error(batcher, generator):
    good = _good(generator)
    bad = _job(torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 50.0, 60.0]]), [1, 1])  # image 1: x2 == x1
    results = batcher._compute([good, bad, good])
    assert isinstance(results[1], InvalidInput)
    assert "image 1, box 0" in str(results[1]) and "degenerate" in str(results[1])
    for got in (results[0], results[2]):
        assert_targets_equal(got, _expected(good), rtol=0, atol=0)


def test_a_lone_request_that_fails_its_batch_is_not_run_again(batcher, generator, monkeypatch):
    """A request alone in its batch that passes its check and fails anyway (not its input's
    fault: a bug, out of memory) gets that error without running a second time."""
    calls = []

    def failing(jobs):
        calls.append(len(jobs))
        raise RuntimeError("a bug")

    monkeypatch.setattr(batcher, "_assign", failing)
    (result,) = batcher._compute([_good(generator)])
    assert isinstance(result, RuntimeError) and str(result) == "a bug" and calls == [1]


def test_counts_that_add_up_only_together_are_not_merged(batcher, generator):
    """Two wrong counts can add up in a merged batch: each request must fail on its own."""
    boxes, _ = random_batch(generator, [2], CANVAS)
    too_many = _job(boxes, [3])  # 3 boxes said, 2 given
    too_few = _job(torch.cat([boxes, boxes]), [1, 2])  # 3 boxes said, 4 given
    good = _good(generator)
    results = batcher._compute([too_many, too_few, good])
    assert isinstance(results[0], InvalidInput) and isinstance(results[1], InvalidInput)
    assert "gt_counts" in str(results[0]) and "gt_counts" in str(results[1])
    assert_targets_equal(results[2], _expected(good), rtol=0, atol=0)


def test_finish_runs_per_request_and_a_failing_one_fails_alone(batcher, generator):
    jobs = [_good(generator), _good(generator, (2,))]

    def broken(targets):
        raise RuntimeError("encoder bug")

    results = batcher._compute(jobs, [lambda targets: ("finished", targets.batch_size), broken])
    assert results[0] == ("finished", 2)
    assert isinstance(results[1], RuntimeError)


def test_submit_returns_what_finish_made_of_the_own_rows(generator):
    async def main():
        batcher = Batcher("reference", BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
        batcher.start()
        jobs = [_good(generator, (1 + i, i)) for i in range(4)]
        try:
            return jobs, await asyncio.gather(*[batcher.submit(job, lambda t: t.labels.clone()) for job in jobs])
        finally:
            await batcher.close()

    jobs, results = asyncio.run(main())
    for job, labels in zip(jobs, results):
        assert torch.equal(labels, _expected(job).labels)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("preset", ["retinanet_torchvision", "fasterrcnn_rpn_torchvision"])
def test_a_request_over_the_slice_bounds_equals_the_unsliced_one(generator, preset, sparse, monkeypatch):
    """Sliced by images and boxes (with ignore boxes, classes, sizes and sampling seeds per
    image), computed slice after slice, and put back together: the same targets."""
    counts = [4, 0, 9, 2, 3, 12, 1, 5]
    boxes, _ = random_batch(generator, counts, CANVAS)
    ignore_boxes, ignore_counts = random_batch(generator, [1, 0, 2, 0, 0, 1, 0, 1], CANVAS)
    classes = torch.randint(0, 80, (sum(counts),), generator=generator, dtype=torch.int32)
    sizes = torch.tensor([[96, 128], [90, 100]] * 4)
    job = AssignJob(presets.get(preset), CANVAS, boxes, counts, gt_classes=classes, ignore_boxes=ignore_boxes,
                    ignore_counts=ignore_counts, image_sizes=sizes, seed=11, sparse=sparse)  # fmt: skip
    expected = assign(boxes, counts, CANVAS, presets.get(preset), gt_classes=classes, ignore_boxes=ignore_boxes,
                      ignore_counts=ignore_counts, image_sizes=sizes, seed=11, backend="reference")  # fmt: skip

    joined_on = []
    real_concat = backend._concat
    monkeypatch.setattr(backend, "_concat", lambda parts: joined_on.append(threading.get_ident()) or real_concat(parts))

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=3, max_slice_boxes=10))
        batcher.start()
        batches = []
        batcher._on_batch = lambda images, requests, seconds: batches.append(images)
        try:
            return await batcher.submit(job), batches
        finally:
            await batcher.close()

    got, batches = asyncio.run(run())
    assert len(batches) > 3 and max(batches) <= 3  # it did run in slices
    # Put together on a compute worker: megabytes of dense targets held the event loop for
    # hundreds of milliseconds, and every other call with it.
    assert joined_on and threading.get_ident() not in joined_on
    if not isinstance(got, Targets):
        got = Targets.from_sparse(got)
        expected = sparse_view(expected)
    assert_targets_equal(got, expected, rtol=0, atol=0)


def test_max_iou_sizes_and_dropped_boxes_come_back_per_request_merged_or_sliced(generator):
    """Each request's own rows of the max IoU, merged with another request or computed in
    slices; its own image and pad sizes per slice (with a config where image sizes matter:
    an allowed border); and a SPARSE request's dropped boxes per image across its slices:
    the targets of the request computed alone."""
    bordered = presets.get(PRESET).replace(**{"match.allowed_border": 0.0})
    sizes = torch.tensor([[90, 100], [80, 112], [64, 96], [72, 80]])
    pads = torch.tensor([[96, 128], [80, 112], [64, 96], [96, 96]])
    boxes, counts = random_batch(generator, [1, 2, 1, 1], CANVAS)
    invalid = torch.cat([boxes, torch.tensor([[30.0, 30.0, 30.0, 50.0]])])  # the last image's 2nd box: x2 == x1
    jobs = [_job(*random_batch(generator, [2, 1], CANVAS), return_max_iou=True),
            _job(*random_batch(generator, [3], CANVAS), return_max_iou=True),
            _job(*random_batch(generator, [1, 2, 1, 1], CANVAS), return_max_iou=True),
            AssignJob(bordered, CANVAS, *random_batch(generator, [2, 0, 3, 1], CANVAS), image_sizes=sizes,
                      pad_sizes=pads),
            _job(invalid, [1, 2, 1, 2], drop_invalid=True, sparse=True)]  # fmt: skip
    results, batches = _merging_run(jobs, BatchOptions(max_batch_images=3, max_queue_delay_s=0.05))
    assert sorted(batches) == [1, 1, 1, 3, 3, 3, 3]  # the first two merged, the others in slices of 3 and 1
    for job, got in zip(jobs, results):
        expected = assign(job.gt_boxes, job.gt_counts, CANVAS, job.config, return_max_iou=job.return_max_iou,
                          image_sizes=job.image_sizes, pad_sizes=job.pad_sizes, drop_invalid=job.drop_invalid,
                          backend="reference")  # fmt: skip
        if job.sparse:
            assert [d.tolist() for d in got.dropped] == [d.tolist() for d in expected.dropped] == [[], [], [], [1]]
            got, expected = Targets.from_sparse(got), sparse_view(expected)
        assert (got.max_iou is not None) == job.return_max_iou
        assert_targets_equal(got, expected, rtol=0, atol=0)
    no_sizes = assign(jobs[3].gt_boxes, jobs[3].gt_counts, CANVAS, bordered, pad_sizes=pads, backend="reference")
    assert not torch.equal(no_sizes.labels[3:], results[3].labels[3:])  # the last slice's image size matters


def _merging_run(jobs: list[AssignJob], options: BatchOptions) -> tuple[list, list[int]]:
    """The jobs submitted together to a batcher that waits for them to merge: their
    results and the batches' image counts."""

    async def run():
        batcher = Batcher("reference", options)
        batcher.start()
        batches = []
        batcher._on_batch = lambda images, requests, seconds: batches.append(images)
        try:
            return await asyncio.gather(*[batcher.submit(job) for job in jobs]), batches
        finally:
            await batcher.close()

    return asyncio.run(run())


def test_a_batch_fills_up_to_its_bound_exactly(generator):
    jobs = [_good(generator, (1,)) for _ in range(4)]
    results, batches = _merging_run(jobs, BatchOptions(max_batch_images=4, max_queue_delay_s=5.0))
    assert batches == [4]  # full at 4 images: it starts at once, without waiting out the delay
    for job, got in zip(jobs, results):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_requests_that_drop_invalid_boxes_and_requests_that_refuse_them_do_not_merge(generator):
    """``drop_invalid`` is the request's own: merged with a request that drops, one that
    did not ask to would have its invalid box dropped silently instead of refused."""
    boxes, _ = random_batch(generator, [2], CANVAS)
    invalid = torch.cat([boxes, torch.tensor([[30.0, 30.0, 30.0, 50.0]])])  # the last box is degenerate
    dropping = _job(invalid, [3], drop_invalid=True)
    refusing = _job(invalid.clone(), [3])

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
        batcher.start()
        try:
            return await asyncio.gather(batcher.submit(dropping), batcher.submit(refusing), return_exceptions=True)
        finally:
            await batcher.close()

    dropped, refused = asyncio.run(run())
    assert isinstance(refused, InvalidInput) and "image 0, box 2: degenerate box" in str(refused)
    assert dropped.dropped[0].tolist() == [2]


def test_closing_starts_what_is_queued_without_waiting_out_the_delay(generator):
    job = _good(generator)

    async def run():
        batcher = Batcher("reference", BatchOptions(max_queue_delay_s=60.0))
        batcher.start()
        queued = asyncio.ensure_future(batcher.submit(job))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(batcher.close(), timeout=10)
        return await queued

    assert_targets_equal(asyncio.run(run()), _expected(job), rtol=0, atol=0)


def test_jobs_with_and_without_pad_sizes_do_not_merge(generator, caplog):
    """No pad size stands in for a job without them: SSD's feature maps are fixed, so a
    pad size of the canvas excludes cells a job without pad sizes keeps (thousands of
    labels differed), and the canvas as the image size of a job that gave pad sizes only
    is larger than them (the merged batch failed and ran again job by job). The canvas
    does stand in for image sizes where no job has pad sizes."""
    canvas, config = (200, 200), presets.get("ssd300_torchvision")
    boxes, _ = random_batch(generator, [3], canvas)
    pad, size = torch.tensor([[200, 200]]), torch.tensor([[180, 190]])
    variants = [{}, {"pad_sizes": pad}, {"image_sizes": size}, {"image_sizes": size, "pad_sizes": pad},
                {"pad_sizes": torch.tensor([[150, 160]])}]  # fmt: skip
    jobs = [AssignJob(config, canvas, boxes, [3], **kwargs) for kwargs in variants]
    results, batches = _merging_run(jobs, BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
    # Merged: the job without sizes with the one with image sizes, the two with pad sizes only.
    assert sorted(batches) == [1, 2, 2]
    for kwargs, got in zip(variants, results):
        assert_targets_equal(got, assign(boxes, [3], canvas, config, backend="reference", **kwargs), rtol=0, atol=0)
    assert "batched assign failed" not in caplog.text


@contextlib.asynccontextmanager
async def _worker_held(generator, options: BatchOptions):
    """A started batcher whose one compute worker is held by a job until ``release`` is
    set: yields (batcher, release, that job's future); closes the batcher on the way out."""
    batcher = Batcher("reference", options)
    batcher.start()
    release = threading.Event()
    try:
        busy = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), lambda targets: release.wait()))
        await asyncio.sleep(0.05)
        yield batcher, release, busy
    finally:
        release.set()
        await batcher.close()


def test_a_caller_that_has_gone_leaves_the_queue(generator):
    """A request cancelled (or past its deadline) while queued gives its place back at
    once: its images no longer count against the queue bound, and the next caller is
    served instead of refused as overloaded."""

    async def run():
        options = BatchOptions(max_batch_images=4, max_queue_images=4)
        async with _worker_held(generator, options) as (batcher, release, busy):
            gone = asyncio.ensure_future(batcher.submit(_good(generator, (1, 2, 1, 0))))
            await asyncio.sleep(0.05)
            assert batcher.queued_images == 4
            gone.cancel()
            await asyncio.sleep(0)
            queued = batcher.queued_images
            waiting = asyncio.ensure_future(batcher.submit(_good(generator, (2, 1))))  # refused were the 4 still queued
            await asyncio.sleep(0.05)
            release.set()
            await busy
            return queued, await waiting, gone.cancelled()

    queued, targets, cancelled = asyncio.run(run())
    assert (queued, cancelled, targets.batch_size) == (0, True, 2)


def test_a_waiting_job_gets_room_in_a_full_queue_before_new_ones(generator):
    """With ``wait`` (a stream's request) a full queue holds the job until there is room
    instead of refusing it; while it waits, a job that does not wait is refused (the
    waiting one goes first); both kinds of request, one image or in slices, are answered
    exactly once the worker is free, and nothing stays counted."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=2)
        async with _worker_held(generator, options) as (batcher, release, busy):
            queued = _good(generator, (1, 2))
            first = asyncio.ensure_future(batcher.submit(queued))
            jobs = [_good(generator, (2,)), _good(generator, (1, 0, 2))]  # the second in two slices
            waiting = [asyncio.ensure_future(batcher.submit(job, wait=True)) for job in jobs]
            await asyncio.sleep(0.05)
            seen = (batcher.queued_images, batcher.waiting_requests, any(w.done() for w in waiting))
            refused = asyncio.ensure_future(batcher.submit(_good(generator, (1,))))
            await asyncio.sleep(0)
            refused_while_waiting = refused.done() and isinstance(refused.exception(), Overloaded)
            release.set()
            await busy
            answers = await asyncio.gather(first, *waiting)
            return seen, refused_while_waiting, refused.exception(), [queued, *jobs], answers, batcher

    seen, refused_while_waiting, refusal, jobs, answers, batcher = asyncio.run(run())
    assert seen == (2, 2, False)
    assert jobs[1].enqueued_at < jobs[0].enqueued_at + 0.05  # its queue time counts its wait for room
    assert refused_while_waiting and "2 stream requests waiting for room" in str(refusal)
    for job, got in zip(jobs, answers):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)
    assert (batcher.queued_images, batcher.waiting_requests) == (0, 0)


def test_jobs_waiting_for_room_are_let_in_in_their_order(generator):
    """Woken all at once as room came, the waiting jobs raced for it: a later 1-image job
    took the place a 2-image job was waiting for (and could for ever, while small ones
    kept coming). Room is now kept for the oldest waiting job until it is queued."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=2)
        async with _worker_held(generator, options) as (batcher, release, busy):
            other_group = _job(*random_batch(generator, [1], CANVAS), return_max_iou=True)  # does not merge
            queued = [asyncio.ensure_future(batcher.submit(job)) for job in (_good(generator, (1,)), other_group)]
            await asyncio.sleep(0.05)
            big, small, computed = _good(generator, (1, 2)), _good(generator, (2,)), []

            def computing(name):  # on the worker, in the order the batches run
                return lambda targets: computed.append(name) or targets

            waiting = [asyncio.ensure_future(batcher.submit(big, computing("big"), wait=True))]
            await asyncio.sleep(0.01)
            waiting.append(asyncio.ensure_future(batcher.submit(small, computing("small"), wait=True)))
            await asyncio.sleep(0.05)
            release.set()
            await busy
            answers = await asyncio.gather(*waiting)
            await asyncio.gather(*queued)
            return big, small, computed, answers, batcher.queued_images

    big, small, computed, answers, queued_after = asyncio.run(run())
    assert computed == ["big", "small"] and queued_after == 0
    for job, got in zip((big, small), answers):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_a_job_waiting_for_room_leaves_when_cancelled_and_is_refused_on_close(generator):
    """A waiting job whose caller has gone no longer waits (nor holds back the others);
    closing the batcher refuses the jobs still waiting, one image or in slices (as it
    refuses new ones), and finishes the queued ones."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2, max_queue_images=2))
        batcher.start()
        release = threading.Event()
        busy = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), lambda targets: release.wait()))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))
        gone = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), wait=True))
        stays = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), wait=True))
        sliced = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1, 1)), wait=True))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.01)
        after_cancel = batcher.waiting_requests
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        refused_at_once = stays.done() and sliced.done()  # not once the running batch ends
        release.set()
        await closing
        outcomes = await asyncio.gather(busy, queued, stays, sliced, return_exceptions=True)
        return after_cancel, refused_at_once, outcomes, (batcher.waiting_requests, batcher.queued_images)

    after_cancel, refused_at_once, (busy, queued, stays, sliced), left = asyncio.run(run())
    assert (after_cancel, left) == (2, (0, 0))  # no room stays kept for the jobs refused
    assert refused_at_once and isinstance(stays, Unavailable) and isinstance(sliced, Unavailable)
    assert queued.batch_size == 2


def test_a_job_let_in_from_its_wait_and_then_cancelled_gives_its_room_back(generator):
    """Room frees and keeps a place for the stream job waiting for it, whose caller goes
    before the job resumes: the place is given back. Kept, it left the queue that much
    fuller for the life of the process, and enough of them refused every request."""

    async def run():
        async with _worker_held(generator, BatchOptions(max_batch_images=2, max_queue_images=2)) as (
            batcher, release, busy
        ):  # fmt: skip
            queued = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))  # the queue full
            waiter = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), wait=True))
            await asyncio.sleep(0.05)
            waiting = batcher.waiting_requests
            queued.cancel()
            await asyncio.sleep(0)  # its task withdraws it, which lets the waiter in ...
            waiter.cancel()  # ... whose caller goes before it resumes
            release.set()
            await busy
            await asyncio.gather(queued, waiter, return_exceptions=True)
            left = batcher.queued_images
            whole_queue = await batcher.submit(_good(generator, (1, 1)))  # refused as overloaded with a place kept
            return waiting, waiter.cancelled(), left, whole_queue.batch_size

    assert asyncio.run(run()) == (1, True, 0, 2)


def test_a_stream_request_that_fits_the_room_left_exactly_is_queued_at_once(generator):
    """A stream request fills the last places of the queue without waiting (nothing would
    let it in later but another batch taken or a caller gone)."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=2)
        async with _worker_held(generator, options) as (batcher, release, busy):
            job = _good(generator, (1, 1))
            waiting = asyncio.ensure_future(batcher.submit(job, wait=True))
            await asyncio.sleep(0.05)
            seen = (batcher.waiting_requests, batcher.queued_images)
            release.set()
            await busy
            return seen, job, await asyncio.wait_for(waiting, timeout=10)

    seen, job, got = asyncio.run(run())
    assert seen == (0, 2)
    assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_a_stream_request_after_an_abandoning_close_is_refused_not_held(generator):
    """After ``close(finish=False)`` nothing is computed any more: a stream request that
    comes then to a full queue is refused at once (Unavailable), not held for room that
    never frees."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2, max_queue_images=2))
        batcher.start()
        release = threading.Event()
        busy = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), lambda targets: release.wait()))
        queued = None
        try:
            await asyncio.sleep(0.05)
            queued = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))  # the queue full
            await asyncio.sleep(0.01)
            await batcher.close(finish=False)
            late = batcher.submit(_good(generator, (1,)), wait=True)
            (outcome,) = await asyncio.wait_for(asyncio.gather(late, return_exceptions=True), timeout=5)
            return outcome
        finally:
            release.set()
            for call in (busy, queued):
                if call is not None:
                    call.cancel()

    outcome = asyncio.run(run())
    assert isinstance(outcome, Unavailable) and "shutting down" in str(outcome)


def test_a_request_in_slices_is_refused_at_once_when_the_queue_is_full(generator):
    """A request of more images than a batch is checked whole on the compute worker
    before its slices queue. While that check waits behind a running batch, the request
    holds a place in the queue for its largest slice: a full queue refuses the next such request at once
    (it used to wait for the running batch, uncounted, and be refused or served after),
    and the requests admitted are answered whole once the worker is free."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=4)
        async with _worker_held(generator, options) as (batcher, release, busy):
            admitted = [_good(generator, (1, 2, 1)) for _ in range(2)]  # two slices each: 2 images, then 1
            waiting = [asyncio.ensure_future(batcher.submit(job)) for job in admitted]
            await asyncio.sleep(0.05)
            held = batcher.queued_images
            refused = asyncio.ensure_future(batcher.submit(_good(generator, (2, 0, 1))))
            await asyncio.sleep(0.05)
            refused_at_once = refused.done() and isinstance(refused.exception(), Overloaded)
            release.set()
            await busy
            return held, refused_at_once, admitted, await asyncio.gather(*waiting), batcher.queued_images

    held, refused_at_once, admitted, answers, queued_after = asyncio.run(run())
    assert (held, refused_at_once, queued_after) == (4, True, 0)
    for job, got in zip(admitted, answers):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_closing_finishes_a_request_in_slices(generator):
    """Between two slices nothing is queued or running: close() found the batcher idle
    and the request's next slice was refused, "the server is shutting down", after its
    first slices had been computed (close() promises to finish what is running)."""
    sliced = _good(generator, (1, 1, 2, 0, 1, 1))  # three slices of two images

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2))
        batcher.start()
        computing, release = threading.Event(), threading.Event()
        batcher._on_batch = lambda images, requests, seconds: computing.set() or release.wait()
        whole = asyncio.ensure_future(batcher.submit(sliced, lambda targets: ("finished", targets)))
        while not computing.is_set():  # its first slice computes, held there until the close has begun
            await asyncio.sleep(0.001)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(closing, timeout=30)
        return await asyncio.wait_for(whole, timeout=30)

    tag, targets = asyncio.run(run())
    assert tag == "finished"
    assert_targets_equal(targets, _expected(sliced), rtol=0, atol=0)


def test_a_request_in_slices_waits_once_in_the_queue_time(generator):
    """tritarget_queue_seconds is a request's wait: one computed in slices was observed once
    per slice (three small waits for one request, its percentiles understated), now once,
    its slices' waits together."""

    async def run():
        async with _worker_held(generator, BatchOptions(max_batch_images=2)) as (batcher, release, busy):
            observed = []
            batcher._on_queued = observed.append
            sliced = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1, 2, 0, 1, 1))))  # three slices
            whole = asyncio.ensure_future(batcher.submit(_good(generator, (2,))))
            await asyncio.sleep(0.2)  # the whole one waits for the held worker (the sliced one for its check)
            release.set()
            await asyncio.gather(busy, sliced, whole)
            return observed

    observed = asyncio.run(run())
    assert len(observed) == 2 and max(observed) >= 0.2, observed


def test_a_request_in_slices_whose_caller_goes_is_still_in_the_queue_time(generator):
    """A request in slices whose caller goes away after a slice started (a deadline passing
    in a long queue) left no wait at all, the tail's longest waits among them; a request not
    sliced is observed once it starts, whatever comes after."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2))
        batcher.start()
        assign = batcher._assign
        batcher._assign = lambda jobs: (time.sleep(0.3), assign(jobs))[1]  # every batch 0.3 s
        observed = []
        batcher._on_queued = observed.append
        try:
            sliced = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1, 2, 0, 1, 1))))  # three slices
            await asyncio.sleep(0.1)  # its first slice computes
            other = asyncio.ensure_future(batcher.submit(_good(generator, (2, 2))))  # ahead of its second
            await asyncio.sleep(0.35)
            sliced.cancel()
            await other
            return observed
        finally:
            await batcher.close()

    observed = asyncio.run(run())
    assert len(observed) == 2, observed  # the other request's, and the sliced one's (its started slices)


def test_a_request_in_slices_once_admitted_is_never_refused_midway(generator):
    """Requests that arrive while a request's first slice computes cannot take the place
    its next slices need: they are refused instead, and the request is answered whole
    (it used to be refused for overload after its first slice was computed)."""
    sliced = _good(generator, (1, 1, 2, 0, 1, 1))  # three slices of two images

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2, max_queue_images=4))
        batcher.start()
        release, computing = threading.Event(), threading.Event()

        def hold_the_first_batch(images, requests, seconds):
            computing.set()
            release.wait()

        batcher._on_batch = hold_the_first_batch
        try:
            whole = asyncio.ensure_future(batcher.submit(sliced))
            while not computing.is_set():  # its first slice is in the worker
                await asyncio.sleep(0.01)
            admitted = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))
            refused = asyncio.ensure_future(batcher.submit(_good(generator, (2, 1))))
            await asyncio.sleep(0.05)
            batcher._on_batch = None
            release.set()
            outcomes = await asyncio.gather(whole, admitted, refused, return_exceptions=True)
            return outcomes, batcher.queued_images
        finally:
            release.set()
            await batcher.close()

    (whole, admitted, refused), queued_after = asyncio.run(run())
    assert isinstance(refused, Overloaded) and queued_after == 0
    assert admitted.batch_size == 2
    assert_targets_equal(whole, _expected(sliced), rtol=0, atol=0)


def test_a_full_batch_does_not_wait_for_an_older_one_still_filling(generator):
    """With a queue delay, a group of another canvas that is already full starts at once
    instead of waiting out the delay of an older group that is still filling."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2, max_queue_delay_s=10.0))
        batcher.start()
        filling = _good(generator, (2,))
        full = AssignJob(presets.get(PRESET), (64, 80), *random_batch(generator, [1, 3], (64, 80)))
        try:
            waiting = asyncio.ensure_future(batcher.submit(filling))
            await asyncio.sleep(0.01)
            done = await asyncio.wait_for(batcher.submit(full), timeout=5)
            return done, batcher.queued_images, waiting.done(), full
        finally:
            await batcher.close()  # starts what is queued, however young

    done, queued, filling_done, full = asyncio.run(run())
    assert (queued, filling_done) == (1, False)
    expected = assign(full.gt_boxes, full.gt_counts, full.canvas, full.config, backend="reference")
    assert_targets_equal(done, expected, rtol=0, atol=0)


def test_batches_are_never_larger_than_the_queue(generator):
    """A batch is taken from the queue: by default no larger than the queue bound, so a
    request of more images is queued in slices that fit; a larger batch bound is refused."""
    cpu = torch.device("cpu")
    assert BatchOptions(max_queue_images=3).resolved(cpu).max_batch_images == 3
    with pytest.raises(ValueError, match=r"max_batch_images \(16\) is over max_queue_images \(8\)"):
        BatchOptions(max_batch_images=16, max_queue_images=8).resolved(cpu)
    job = _good(generator, (2, 0, 1, 3, 1))
    (got,), batches = _merging_run([job], BatchOptions(max_queue_images=2))
    assert max(batches) <= 2
    assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_merged_batches_keep_within_the_anchor_rows_bound(generator):
    """Requests of a large canvas merge only up to ``max_anchor_rows`` images x anchors (a
    merged batch's [B, A] targets, ~330 MB per 8192 x 8192 image, are bounded like one
    request's), and a request of more is sliced to fit."""
    anchors = AssignJob(presets.get(PRESET), CANVAS, torch.zeros(0, 4), [0]).anchors_per_image
    assert anchors == 2_313  # 96 x 128: 12x16 + 6x8 + 3x4 + 2x2 + 1x1 = 257 cells, 9 shapes each
    jobs = [_good(generator, (1, 2)) for _ in range(3)] + [_good(generator, (1, 0, 2, 1, 1))]
    results, batches = _merging_run(jobs, BatchOptions(max_batch_images=16, max_anchor_rows=3 * anchors))
    assert max(batches) <= 3 and sum(batches) == 11
    for job, got in zip(jobs, results):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_merged_batches_keep_within_the_slices_box_bound(generator):
    """Requests (and slices of a request) merge only up to ``max_slice_boxes`` boxes:
    slices of 20,000 boxes merged again into batches of 10**5 (up to 128 images of 19,999
    boxes into one), holding a worker as the request they were cut from."""
    jobs = [_good(generator, (3,)) for _ in range(5)] + [_good(generator, (3, 3, 3))]  # the last in slices
    options = BatchOptions(max_batch_images=16, max_queue_delay_s=0.2, max_slice_boxes=6)
    results, batches = _merging_run(jobs, options)
    assert max(batches) == 2 and sum(batches) == 8  # at most 2 images of 3 boxes
    for job, got in zip(jobs, results):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_slices_that_came_back_dense_and_sparse_are_put_back_together(generator):
    """A SPARSE job's slices may merge with a DENSE job's (that batch runs dense) or run
    alone (sparse): the job still gets all its images back, in order."""
    counts = [2, 3, 1, 4]
    boxes, _ = random_batch(generator, counts, CANVAS)
    expected = _expected(_job(boxes, counts))
    first, second, third = _split(expected, [1, 2, 1])
    got = _concat([first, second.to_sparse(), third])
    assert isinstance(got, Targets)
    assert_targets_equal(got, sparse_view(expected), rtol=0, atol=0)
    assert_targets_equal(Targets.from_sparse(_concat([p.to_sparse() for p in (first, second, third)])),
                         sparse_view(expected), rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("with_classes", [True, False])
def test_a_sparse_batch_splits_into_each_jobs_lists(generator, with_classes):
    """A merged SPARSE batch is split into each job's lists, offsets from 0, as if each job
    had run alone (images without targets and jobs of several images included)."""
    counts = [2, 0, 3, 1, 4]
    boxes, _ = random_batch(generator, counts, CANVAS)
    classes = torch.arange(boxes.shape[0], dtype=torch.int32) if with_classes else None
    config = presets.get(PRESET).replace(background_class=80)  # not the default 0: each part keeps it
    dense = assign(boxes, counts, CANVAS, config, gt_classes=classes, backend="reference")
    images = [1, 2, 2]
    parts = _split(dense.to_sparse(), images)
    assert [part.batch_size for part in parts] == images
    for part, alone in zip(parts, _split(dense, images)):
        expected = alone.to_sparse()
        for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas",
                     "ignored_offsets", "ignored_anchors", "positive_classes"):  # fmt: skip
            got, want = getattr(part, name), getattr(expected, name)
            assert (got is None) == (want is None) == (name == "positive_classes" and not with_classes), name
            if want is not None:
                assert got.dtype == want.dtype and torch.equal(got, want), name
        assert part.num_anchors == expected.num_anchors and len(part.dropped) == part.batch_size
        assert part.background_class == expected.background_class == 80


def test_requests_with_and_without_classes_do_not_merge(generator, caplog):
    """A merged batch has classes for all its images or none: a request without classes
    merged first would drop the classes of the one that gave them."""
    without = _good(generator, (2, 1))
    given = _good(generator, (3,))
    given.gt_classes = torch.arange(3, dtype=torch.int32)
    results, batches = _merging_run([without, given], BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
    assert sorted(batches) == [1, 2]
    assert_targets_equal(results[0], _expected(without), rtol=0, atol=0)
    expected = assign(given.gt_boxes, given.gt_counts, CANVAS, presets.get(PRESET), gt_classes=given.gt_classes,
                      backend="reference")  # fmt: skip
    assert results[1].classes is not None
    assert_targets_equal(results[1], expected, rtol=0, atol=0)
    assert "batched assign failed" not in caplog.text


def test_requests_with_and_without_max_iou_do_not_merge(generator):
    """``return_max_iou`` is the batch's: merged after a request that did not ask for it, a
    request that did would get no max IoU."""
    without = _good(generator, (2, 1))
    wanting = _job(*random_batch(generator, [3], CANVAS), return_max_iou=True)
    results, batches = _merging_run([without, wanting], BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
    assert sorted(batches) == [1, 2]
    assert results[0].max_iou is None
    expected = assign(wanting.gt_boxes, wanting.gt_counts, CANVAS, presets.get(PRESET), return_max_iou=True,
                      backend="reference")  # fmt: skip
    assert results[1].max_iou is not None
    assert_targets_equal(results[1], expected, rtol=0, atol=0)


def test_jobs_without_ignore_regions_or_image_sizes_merge_with_jobs_that_have_them(generator, caplog):
    """A job of several images without ignore regions (or image sizes) merged with one that
    has them stands in with none per image (and the canvas per image): one batch, which
    neither fails nor runs again job by job."""
    plain = _good(generator, (2, 0, 1))
    boxes, counts = random_batch(generator, [2], CANVAS)
    ignore = torch.tensor([[5.0, 5.0, 30.0, 30.0]])
    sized = _job(boxes, counts, ignore_boxes=ignore, ignore_counts=[1], image_sizes=torch.tensor([[90, 100]]))
    results, batches = _merging_run([plain, sized], BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
    assert batches == [4]
    assert_targets_equal(results[0], _expected(plain), rtol=0, atol=0)
    expected = assign(boxes, counts, CANVAS, presets.get(PRESET), ignore_boxes=ignore, ignore_counts=[1],
                      image_sizes=sized.image_sizes, backend="reference")  # fmt: skip
    assert_targets_equal(results[1], expected, rtol=0, atol=0)
    assert "batched assign failed" not in caplog.text


def test_a_request_merged_after_one_without_ignore_regions_or_image_sizes_keeps_its_own(generator, caplog):
    """Where the config uses them (an ignore IoF threshold, an allowed border), the ignore
    regions and image sizes of a request merged after one that gave none still apply: the
    merged batch has them if any of its requests does, not only if its first does."""
    config = presets.get(PRESET).replace(**{"match.ignore_iof_thr": 0.5, "match.allowed_border": 0.0})
    plain_boxes, plain_counts = random_batch(generator, [2, 0, 1], CANVAS)
    boxes, counts = random_batch(generator, [2], CANVAS)
    ignore, sizes = torch.tensor([[5.0, 5.0, 60.0, 50.0]]), torch.tensor([[90, 100]])
    plain = AssignJob(config, CANVAS, plain_boxes, plain_counts)
    given = AssignJob(config, CANVAS, boxes, counts, ignore_boxes=ignore, ignore_counts=[1], image_sizes=sizes)
    results, batches = _merging_run([plain, given], BatchOptions(max_batch_images=16, max_queue_delay_s=0.05))
    assert batches == [4]
    expected = assign(boxes, counts, CANVAS, config, ignore_boxes=ignore, ignore_counts=[1], image_sizes=sizes,
                      backend="reference")  # fmt: skip
    without_ignore = assign(boxes, counts, CANVAS, config, image_sizes=sizes, backend="reference")
    without_sizes = assign(boxes, counts, CANVAS, config, ignore_boxes=ignore, ignore_counts=[1], backend="reference")
    for without in (without_ignore, without_sizes):  # each of them matters here
        assert not torch.equal(without.labels, expected.labels)
    assert_targets_equal(results[1], expected, rtol=0, atol=0)
    assert_targets_equal(results[0], assign(plain_boxes, plain_counts, CANVAS, config, backend="reference"),
                         rtol=0, atol=0)  # fmt: skip
    assert "batched assign failed" not in caplog.text


@pytest.mark.parametrize("sparse", [False, True])
def test_each_request_gets_its_own_dropped_ignore_regions(generator, sparse):
    """Requests that drop invalid ignore regions, merged into one batch or computed in
    slices, each get the indices dropped from their own images, and the pyramid's level
    starts (``levels()``) as a request computed alone does."""
    degenerate, valid = [20.0, 20.0, 20.0, 40.0], [5.0, 5.0, 30.0, 30.0]
    specs = [([1, 2], [[valid], [degenerate]]), ([1], [[degenerate, valid]]),
             ([1, 1, 1, 1, 1], [[valid], [], [valid, degenerate], [], [degenerate]])]  # fmt: skip
    jobs = []
    for counts, regions in specs:
        boxes, _ = random_batch(generator, counts, CANVAS)
        ignore = torch.tensor([box for image in regions for box in image]).reshape(-1, 4)
        jobs.append(_job(boxes, counts, ignore_boxes=ignore, ignore_counts=[len(image) for image in regions],
                         drop_invalid=True, sparse=sparse))  # fmt: skip
    results, batches = _merging_run(jobs, BatchOptions(max_batch_images=4, max_queue_delay_s=0.05))
    assert sorted(batches) == [1, 3, 4]  # the first two merged, the last in slices
    for job, got in zip(jobs, results):
        expected = assign(job.gt_boxes, job.gt_counts, CANVAS, presets.get(PRESET), ignore_boxes=job.ignore_boxes,
                          ignore_counts=job.ignore_counts, drop_invalid=True, backend="reference")  # fmt: skip
        assert [d.tolist() for d in got.dropped_ignore] == [d.tolist() for d in expected.dropped_ignore]
        assert got.level_starts == expected.level_starts is not None


@pytest.mark.parametrize("field", ["ignore_counts", "image_sizes", "gt_classes", "ignore_boxes", "pad_sizes"])
def test_per_image_rows_that_add_up_only_together_are_not_merged(batcher, generator, field):
    """Classes, ignore regions, their counts, image or pad sizes with one row too few in one
    request and one too many in the next add up in a merged batch (which then ran, each
    request given its neighbour's rows): each request must fail on its own, naming the field."""
    boxes, _ = random_batch(generator, [1, 1, 1], CANVAS)
    good_kwargs = {}  # what the good request gives too, to share the batch's arguments
    if field == "ignore_counts":
        ignore = torch.tensor([[5.0, 5.0, 30.0, 30.0]] * 3)
        short = _job(boxes[:2], [1, 1], ignore_boxes=ignore[:1], ignore_counts=[1])
        long = _job(boxes[2:], [1], ignore_boxes=ignore[1:], ignore_counts=[1, 1])
    elif field == "ignore_boxes":  # one region short of its counts, one over them: 3 regions, 3 counted
        ignore = torch.tensor([[5.0, 5.0, 30.0, 30.0]] * 3)
        short = _job(boxes[:2], [1, 1], ignore_boxes=ignore[:1], ignore_counts=[1, 1])
        long = _job(boxes[2:], [1], ignore_boxes=ignore[1:], ignore_counts=[1])
    elif field == "gt_classes":  # a class short of the boxes, one over them
        classes = torch.tensor([3, 5, 7], dtype=torch.int32)
        short = _job(boxes[:2], [1, 1], gt_classes=classes[:1])
        long = _job(boxes[2:], [1], gt_classes=classes[1:])
        good_kwargs = {"gt_classes": torch.arange(4, dtype=torch.int32)}
    else:
        sizes = torch.tensor([[96, 128], [90, 100], [80, 120]])
        short = _job(boxes[:2], [1, 1], **{field: sizes[:1]})
        long = _job(boxes[2:], [1], **{field: sizes[1:]})
        if field == "pad_sizes":
            good_kwargs = {"pad_sizes": torch.tensor([[96, 128], [96, 128]])}
    good_boxes, good_counts = random_batch(generator, [3, 1], CANVAS)
    good = _job(good_boxes, good_counts, **good_kwargs)
    results = batcher._compute([short, long, good])
    for bad in results[:2]:
        assert isinstance(bad, InvalidInput) and field in str(bad), bad
    expected = assign(good_boxes, good_counts, CANVAS, presets.get(PRESET), backend="reference", **good_kwargs)
    assert_targets_equal(results[2], expected, rtol=0, atol=0)


def test_ignore_counts_without_ignore_regions_fail_alone(batcher, generator):
    """Ignore counts without ignore regions (or regions without counts) are that request's
    own error, InvalidInput, not the whole batch's: its batch mates are computed."""
    good = _good(generator)
    counts_only = _job(*random_batch(generator, [1], CANVAS), ignore_counts=[0])
    regions_only = _job(*random_batch(generator, [1], CANVAS), ignore_boxes=torch.zeros(0, 4))
    results = batcher._compute([good, counts_only, regions_only])
    for bad in results[1:]:
        assert isinstance(bad, InvalidInput) and "ignore_boxes and ignore_counts must be given together" in str(bad)
    assert_targets_equal(results[0], _expected(good), rtol=0, atol=0)


def test_a_seed_out_of_range_fails_alone_as_invalid_input(batcher, generator):
    """A seed a torch.Generator cannot take is the request's own error, as any bad input."""
    good, bad = _good(generator), _good(generator, (2,))
    bad.seed = 2**64
    for results in (batcher._compute([good, bad]), batcher._compute([bad])):
        error = results[-1]
        assert isinstance(error, InvalidInput) and "seed: 18446744073709551616 is outside" in str(error), error
    assert_targets_equal(batcher._compute([good, bad])[0], _expected(good), rtol=0, atol=0)


def test_an_input_of_the_wrong_type_fails_alone_as_invalid_input(batcher, generator):
    """A TypeError of the problem's checks (classes that are not integers) is the request's
    own InvalidInput, as a ValueError is, alone or in a merged batch."""
    boxes, counts = random_batch(generator, [2, 1], CANVAS)
    good = _job(boxes, counts, gt_classes=torch.arange(3, dtype=torch.int32))
    bad = _job(boxes.clone(), counts, gt_classes=torch.tensor([1.0, 2.0, 3.0]))
    for results in (batcher._compute([bad, good]), batcher._compute([bad])):
        error = results[0]
        assert isinstance(error, InvalidInput) and "gt_classes: expected an integer tensor" in str(error), error
    expected = assign(boxes, counts, CANVAS, presets.get(PRESET), gt_classes=good.gt_classes, backend="reference")
    assert_targets_equal(batcher._compute([bad, good])[1], expected, rtol=0, atol=0)


def test_a_batch_of_failed_requests_is_not_observed(batcher, generator):
    """``on_batch`` counts the images and requests computed: a batch whose every request
    failed its check computed nothing."""
    observed = []
    batcher._on_batch = lambda images, requests, seconds: observed.append((images, requests))
    bad = _job(torch.tensor([[50.0, 20.0, 50.0, 60.0]]), [1])  # x2 == x1
    good = _good(generator)
    batcher._compute([bad, bad])
    batcher._compute([bad, good, bad])
    assert observed == [(2, 1)]


def test_requests_that_pass_their_check_and_fail_all_the_same_are_not_observed(batcher, generator, monkeypatch):
    """``on_batch`` counts what was computed: a lone request whose batch failed anyway (a
    bug, out of memory) computed nothing, and of a merged batch run again one by one only
    the requests that came back with targets count. Both were counted as computed."""
    observed = []
    batcher._on_batch = lambda images, requests, seconds: observed.append((images, requests))
    assign_batch = batcher._assign

    def failing_with(culprit: AssignJob):
        def assigned(jobs):
            if culprit in jobs:
                raise RuntimeError("a bug")
            return assign_batch(jobs)

        return assigned

    lone = _good(generator)
    monkeypatch.setattr(batcher, "_assign", failing_with(lone))
    (result,) = batcher._compute([lone])
    assert isinstance(result, RuntimeError) and observed == []
    culprit, good = _good(generator, (1, 1, 1)), _good(generator, (2, 3))
    monkeypatch.setattr(batcher, "_assign", failing_with(culprit))
    results = batcher._compute([culprit, good])
    assert isinstance(results[0], RuntimeError) and not isinstance(results[1], BaseException)
    assert observed == [(2, 1)]


def test_the_cores_are_split_evenly_between_the_compute_workers():
    threads = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        cpu, gpu = (BatchOptions().resolved(torch.device(name)) for name in ("cpu", "cuda"))
        many = BatchOptions(compute_workers=8).resolved(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert (cpu.threads_per_worker, gpu.threads_per_worker, many.threads_per_worker) == (6, 3, 1)


def test_the_slices_of_a_request_are_computed_on_a_compute_worker(generator):
    """A request in slices is not an idle server's lone request: its small SPARSE slices
    are computed on a worker, not on the event loop."""
    job = _job(*random_batch(generator, [1, 2], CANVAS), sparse=True)
    (result,), on_loop = _computed_on("cpu", [job], BatchOptions(max_batch_images=1))
    assert on_loop == [False, False] and result[0] == "finished"


def test_an_abandoning_close_skips_the_tasks_queued_behind_the_running_one():
    """close(finish=False): nobody waits for the work still queued on the compute worker,
    so it never runs (the task running then ends on its own)."""
    ran = []

    async def run():
        batcher = Batcher("reference")
        batcher.start()
        gate = threading.Event()
        running = asyncio.ensure_future(batcher.run(gate.wait))
        queued = asyncio.ensure_future(batcher.run(ran.append, "queued"))
        await asyncio.sleep(0.05)
        await batcher.close(finish=False)
        gate.set()
        running.cancel()
        queued.cancel()
        return batcher

    batcher = asyncio.run(run())
    batcher.stop_workers()
    assert ran == []


def test_closing_waits_for_a_task_run_on_a_compute_worker_without_holding_the_loop():
    """``run`` (the warm-up, a sliced request's check) keeps the batcher busy: close() awaits
    it as it awaits a batch, instead of finding the batcher idle and joining the worker on
    the event loop (every other call held until the task ended)."""
    gate = threading.Event()
    safety = threading.Timer(2.0, gate.set)  # the loop held: the task still ends, and the test with it

    async def run():
        batcher = Batcher("reference")
        batcher.start()
        running = asyncio.ensure_future(batcher.run(gate.wait))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        closed_early = closing.done()
        gate.set()
        await asyncio.wait_for(closing, timeout=10)
        return closed_early, await running

    safety.start()
    try:
        assert asyncio.run(run()) == (False, True)
    finally:
        safety.cancel()


def test_a_waiting_job_that_would_fit_still_waits_behind_those_before_it(generator):
    """Room goes to the jobs waiting for it in their order: a later one that would fit in
    what is left waits behind an earlier one that does not fit yet."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=3)
        async with _worker_held(generator, options) as (batcher, release, busy):
            jobs = [_good(generator, (1, 1)), _good(generator, (2, 1)), _good(generator, (1,))]
            queued = asyncio.ensure_future(batcher.submit(jobs[0]))  # 2 of 3 places
            await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(batcher.submit(job, wait=True)) for job in jobs[1:]]
            await asyncio.sleep(0.05)
            seen = (batcher.waiting_requests, batcher.queued_images)
            release.set()
            await busy
            return seen, jobs, await asyncio.gather(queued, *waiting), batcher.queued_images

    seen, jobs, answers, queued_after = asyncio.run(run())
    assert seen == (2, 2) and queued_after == 0
    for job, got in zip(jobs, answers):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


@pytest.mark.parametrize("gone_waits", [False, True], ids=["gone from the queue", "gone from the wait"])
def test_a_caller_that_goes_lets_a_job_waiting_for_room_in_at_once(generator, gone_waits):
    """The room a gone caller gives back goes to the job waiting for it right away, not once
    a compute worker is free: a queued caller's places, or, where the one that goes was
    itself waiting ahead of it, the room it no longer waits for."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=3 if gone_waits else 2)
        async with _worker_held(generator, options) as (batcher, release, busy):
            queued = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))  # 2 places
            await asyncio.sleep(0.01)
            gone = queued
            if gone_waits:  # 2 images, 1 place left: waits
                gone = asyncio.ensure_future(batcher.submit(_good(generator, (2, 1)), wait=True))
                await asyncio.sleep(0.01)
            job = _good(generator, (1,) if gone_waits else (2, 1))  # waits: behind the one waiting, or for room
            waiting = asyncio.ensure_future(batcher.submit(job, wait=True))
            await asyncio.sleep(0.05)
            before = batcher.waiting_requests
            gone.cancel()
            await asyncio.sleep(0.01)
            after = (batcher.waiting_requests, batcher.queued_images)
            release.set()
            await asyncio.gather(busy, *([queued] if gone_waits else []))
            return before, after, job, await asyncio.wait_for(waiting, timeout=10)

    before, after, job, got = asyncio.run(run())
    assert (before, after) == ((2, (0, 3)) if gone_waits else (1, (0, 2)))
    assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_the_oldest_group_is_computed_first(generator):
    """When a worker frees, the group whose oldest request has waited longest goes first."""
    computed = []

    def computing(name):  # on the worker, in the order the batches run
        return lambda targets: computed.append(name) or targets

    async def run():
        async with _worker_held(generator, BatchOptions(max_batch_images=4)) as (batcher, release, busy):
            older = asyncio.ensure_future(batcher.submit(_good(generator, (1,)), computing("older")))
            await asyncio.sleep(0.01)
            other_group = _job(*random_batch(generator, [2], CANVAS), return_max_iou=True)
            newer = asyncio.ensure_future(batcher.submit(other_group, computing("newer")))
            await asyncio.sleep(0.01)
            release.set()
            await asyncio.gather(busy, older, newer)

    asyncio.run(run())
    assert computed == ["older", "newer"]


def test_a_batch_full_of_boxes_starts_without_waiting_out_the_delay(generator):
    """A group that holds ``max_slice_boxes`` boxes is full, as one that holds
    ``max_batch_images`` images: it starts at once."""
    jobs = [_good(generator, (3,)) for _ in range(2)]

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=16, max_queue_delay_s=60.0, max_slice_boxes=6))
        batcher.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*[batcher.submit(job) for job in jobs]), timeout=5)
        finally:
            await batcher.close()

    for job, got in zip(jobs, asyncio.run(run())):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_a_slice_holds_up_to_exactly_the_box_bound(generator):
    job = _good(generator, (3, 3, 3))
    (got,), batches = _merging_run([job], BatchOptions(max_batch_images=16, max_slice_boxes=6))
    assert batches == [2, 1]
    assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_a_batch_whose_callers_have_all_gone_is_not_computed(generator):
    """A caller that goes just as its batch is taken (here by the drain, before its task
    has left the queue) is not computed for."""

    async def run():
        batcher = Batcher("reference", BatchOptions(max_queue_delay_s=60.0))
        batcher.start()
        computed, compute = [], batcher._compute  # not even an empty batch goes to a worker
        batcher._compute = lambda *args: computed.append(args) or compute(*args)
        gone = asyncio.ensure_future(batcher.submit(_good(generator)))
        await asyncio.sleep(0.01)
        gone.cancel()
        batcher.drain()
        await asyncio.wait_for(batcher.close(), timeout=10)
        return computed, gone.cancelled()

    assert asyncio.run(run()) == ([], True)


def test_a_response_is_not_finished_for_a_caller_that_went_away_while_its_batch_computed(generator):
    """``finish`` (the response's encoding: megabytes for DENSE) is skipped for a caller
    that went away while its batch computed."""
    finished = []

    async def run():
        batcher = Batcher("reference")
        batcher.start()
        release, computing = threading.Event(), threading.Event()
        batcher._on_batch = lambda images, requests, seconds: computing.set() or release.wait()
        call = asyncio.ensure_future(batcher.submit(_good(generator), finished.append))
        while not computing.is_set():
            await asyncio.sleep(0.001)
        call.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(batcher.close(), timeout=10)
        return call.cancelled()

    assert asyncio.run(run()) and finished == []


def test_a_request_in_slices_holds_the_place_of_its_largest_slice_not_its_first(generator):
    """Cut by boxes, a request's first slice can be its smallest: the place it holds from its
    admission is its largest slice's, so a queue that has room for the first slice but not
    the largest refuses it at once (admitted, its larger slice would overfill the queue)."""
    sliced = _good(generator, (3, 1, 1))  # slices of 1 image (3 boxes, the bound), then 2 images

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=2, max_slice_boxes=3)
        async with _worker_held(generator, options) as (batcher, release, busy):
            queued = asyncio.ensure_future(batcher.submit(_good(generator, (1,))))  # 1 of 2 places
            await asyncio.sleep(0.01)
            refused = asyncio.ensure_future(batcher.submit(sliced))
            await asyncio.sleep(0.01)
            refused_at_once = refused.done() and isinstance(refused.exception(), Overloaded)
            release.set()
            await asyncio.gather(busy, queued)
            whole = await asyncio.wait_for(batcher.submit(sliced), timeout=10)  # an empty queue takes it
            return refused_at_once, whole, batcher.queued_images

    refused_at_once, whole, queued_after = asyncio.run(run())
    assert refused_at_once and queued_after == 0
    assert_targets_equal(whole, _expected(sliced), rtol=0, atol=0)


def test_a_stream_request_in_slices_let_in_from_its_wait_is_not_refused_for_those_behind_it(generator):
    """A stream request in slices that waited for room is let in (and answered whole) while
    a later stream request still waits behind it: the jobs still waiting hold back only new
    jobs, not one that waited before them. And once the request in slices is answered, its
    held place goes to the one waiting behind it at once (nothing else would free room)."""

    async def run():
        options = BatchOptions(max_batch_images=2, max_queue_images=2)
        async with _worker_held(generator, options) as (batcher, release, busy):
            first = asyncio.ensure_future(batcher.submit(_good(generator, (1, 1))))  # the queue full
            await asyncio.sleep(0.01)
            sliced, later = _good(generator, (1, 1, 1)), _good(generator, (1,))  # sliced: holds 2 places
            waiting = [asyncio.ensure_future(batcher.submit(sliced, wait=True))]
            await asyncio.sleep(0.01)
            waiting.append(asyncio.ensure_future(batcher.submit(later, wait=True)))
            await asyncio.sleep(0.05)
            seen = batcher.waiting_requests
            release.set()
            await asyncio.gather(busy, first)
            answers = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout=10)
            return seen, [sliced, later], answers, (batcher.waiting_requests, batcher.queued_images)

    seen, jobs, answers, left = asyncio.run(run())
    assert seen == 2 and left == (0, 0)
    for job, got in zip(jobs, answers):
        assert_targets_equal(got, _expected(job), rtol=0, atol=0)


def test_a_request_in_slices_refused_by_its_check_has_no_queue_time(generator):
    """A request in slices whose check fails never queued a slice: no queue time is observed
    for it (a wait of 0 s per such request would pull tritarget_queue_seconds down)."""
    bad = _job(torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 50.0, 60.0], [1.0, 1.0, 9.0, 9.0]]),
               [1, 1, 1])  # image 1: x2 == x1  # fmt: skip

    async def run():
        batcher = Batcher("reference", BatchOptions(max_batch_images=2))
        batcher.start()
        observed = []
        batcher._on_queued = observed.append
        try:
            (outcome,) = await asyncio.gather(batcher.submit(bad), return_exceptions=True)
            return outcome, observed
        finally:
            await batcher.close()

    error, observed = asyncio.run(run())
    assert isinstance(error, InvalidInput) and "image 1, box 0" in str(error), error
    assert observed == []


def test_a_caller_that_goes_while_its_batch_computes_leaves_the_requests_queued_behind_it(generator):
    """Its batch taken, a gone caller is no longer in its group: the request queued behind it
    in that group stays queued and is answered, and the caller's task ends cancelled."""

    async def run():
        batcher = Batcher("reference")
        batcher.start()
        release, computing = threading.Event(), threading.Event()
        batcher._on_batch = lambda images, requests, seconds: computing.set() or release.wait()
        try:
            call = asyncio.ensure_future(batcher.submit(_good(generator)))
            while not computing.is_set():
                await asyncio.sleep(0.001)
            job = _good(generator, (2,))
            behind = asyncio.ensure_future(batcher.submit(job))  # same group, queued behind the busy worker
            await asyncio.sleep(0.01)
            call.cancel()
            (outcome,) = await asyncio.gather(call, return_exceptions=True)
            queued = batcher.queued_images
            batcher._on_batch = None
            release.set()
            return outcome, queued, job, await asyncio.wait_for(behind, timeout=10)
        finally:
            release.set()
            await batcher.close()

    outcome, queued, job, got = asyncio.run(run())
    assert isinstance(outcome, asyncio.CancelledError) and queued == 1
    assert_targets_equal(got, _expected(job), rtol=0, atol=0)


@pytest.mark.parametrize("matching", ["gather", "walk"])
def test_after_the_warm_up_no_request_compiles_a_kernel(matching, generator, monkeypatch):
    """The warm-up runs every kernel variant a request can need: requests of every preset
    family (lift, ssd_forced's marking, sampling, shape-major anchors), dense and sparse,
    at other batch sizes and canvases, launch only kernels with the compile keys the
    warm-up's launches had (as Triton's binder keys them: tests/test_triton_backend.py),
    by either matching (``_Meta.matching``)."""
    pytest.importorskip("triton")
    import dataclasses

    from tritarget.kernels import triton_backend

    if not (torch.cuda.is_available() or triton_backend.interpreting()):
        pytest.skip("the triton backend needs a CUDA GPU or its interpreter")
    for meta in ("_INTERPRETED", "_COMPILED"):
        monkeypatch.setattr(triton_backend, meta, dataclasses.replace(getattr(triton_backend, meta), matching=matching))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launches = record_launches(monkeypatch)
    requests = [("ssd300_torchvision", (96, 128), [3, 1]), ("retinanet_mmdet", (128, 192), [0, 5, 16]),
                ("yolov5", (96, 136), [1]), ("fasterrcnn_rpn_torchvision", (64, 96), [2, 2])]  # fmt: skip

    async def run() -> int:
        batcher = Batcher("triton", BatchOptions(max_batch_images=16), device=device)
        batcher.start()
        try:
            boxes, counts = random_batch(generator, [2], (64, 64))
            await batcher.warm_up(AssignJob(presets.get(PRESET), (64, 64), boxes, counts))
            warmed = len(launches)
            for preset, canvas, counts in requests:
                boxes, counts = random_batch(generator, counts, canvas)
                classes = torch.arange(boxes.shape[0], dtype=torch.int32)
                for sparse in (False, True):
                    job = AssignJob(presets.get(preset), canvas, boxes, counts, gt_classes=classes, sparse=sparse)
                    await batcher.submit(job)
        finally:
            await batcher.close()
        return warmed

    warmed = asyncio.run(run())
    warm_keys, request_keys = compile_keys(launches[:warmed]), compile_keys(launches[warmed:])
    # ssd_forced's marking, and the lift: the walk's own launch, or the gather's finalize.
    lifts = ("lift_segments_kernel" in request_keys if matching == "walk"
             else any('["LIFT", true]' in key for key in request_keys["finalize_kernel"]))  # fmt: skip
    assert "forced_kernel" in request_keys and lifts
    for name, keys in request_keys.items():
        new = keys - warm_keys.get(name, set())
        assert not new, f"{name}: requests compiled {len(new)} more variants: {sorted(new)}"
