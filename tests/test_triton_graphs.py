"""``solve`` and ``solve_sparse`` replayed as CUDA graphs (``kernels/triton_graphs.py``).

Without a GPU: the buffers a graph reads, loaded with one call's inputs after another's
and padded with NaN, give the reference's targets under the interpreter (the kernels
read only each call's own rows); what a replay returns is copied out of the graph's
memory; the kinds that share a graph; the tensors a capture keeps. With a GPU (``gpu``):
replays against the launches and the reference, dense and sparse, the targets of
earlier calls kept, the box check, streams, the caller's own capture, eviction, a
failed capture.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from support import assert_targets_equal, random_batch
from tritarget.kernels import assign, presets, reference
from tritarget.kernels.problem import CheckBoxesFirst, build_problem

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tritarget.kernels import triton_backend, triton_graphs  # noqa: E402
from tritarget.kernels.triton_launch import Launcher, keeping_arguments  # noqa: E402
from triton_support import DEVICE, TOL, gpu  # noqa: E402

CANVAS = (97, 131)


def _config(mode: str = "torchvision"):
    return presets.get("retinanet_torchvision").replace(**{"match.sample_size": 0, "match.low_quality": mode})


def _problem(generator, counts, config, *, ignore_counts=None, checked=False, canvas=CANVAS, classes=True, **kwargs):
    boxes, counts = random_batch(generator, counts, canvas)
    gt_classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator, dtype=torch.int32).to(DEVICE)
    extra = {}
    if ignore_counts is not None:
        ignore, _ = random_batch(generator, ignore_counts, canvas, max_frac=0.4)
        extra = dict(ignore_boxes=ignore.to(DEVICE), ignore_counts=ignore_counts)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, gt_classes=gt_classes if classes else None,
                               check_gt_boxes=checked, **extra, **kwargs)  # fmt: skip
    return problem


def test_capacity_rounds_rows_up_to_powers_of_two():
    assert [triton_graphs.capacity(rows, 16) for rows in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [triton_graphs.capacity(rows, 0) for rows in (0, 1, 3, 4, 5)] == [0, 1, 4, 4, 8]


def test_calls_whose_rows_round_alike_share_a_kind(generator):
    config = _config()
    kind = triton_graphs.Graphs.kind
    few, more = _problem(generator, [3, 2], config), _problem(generator, [9, 7], config)
    assert kind(few) == kind(more)  # 5 and 16 boxes: 16 rows each
    assert kind(few) != kind(_problem(generator, [9, 8], config))  # 17: 32 rows
    assert kind(few) != kind(_problem(generator, [3, 2, 0], config))  # another batch size
    assert kind(few) != kind(_problem(generator, [3, 2], config, ignore_counts=[1, 0]))
    assert kind(few) != kind(_problem(generator, [3, 2], config, want_max_iou=True))
    assert kind(few) != kind(_problem(generator, [3, 2], _config("mmdet")))
    assert kind(few) != kind(_problem(generator, [3, 2], config, canvas=(97, 130)))
    assert kind(few) != kind(_problem(generator, [3, 2], config, classes=False))
    for checked in ("gt_boxes_checked", "gt_classes_checked", "ignore_boxes_checked"):
        assert kind(few) != kind(dataclasses.replace(few, **{checked: not getattr(few, checked)})), checked
    # A graph of the kind holds either call's rows: NaN past the call's own.
    inputs = triton_graphs._Inputs(few)
    inputs.load(few)
    assert inputs.gt_boxes.shape[0] == 16 and inputs.gt_boxes[5:].isnan().all()
    inputs.load(more)
    assert torch.equal(inputs.gt_boxes, more.gt_boxes) and torch.equal(inputs.gt_classes, more.gt_classes)
    single = _problem(generator, [0, 1], config)
    inputs.load(single)
    assert torch.equal(inputs.gt_boxes[:1], single.gt_boxes) and torch.equal(inputs.gt_boxes[1:], more.gt_boxes[1:])


@pytest.mark.parametrize("mode", ("none", "torchvision", "mmdet"))
def test_the_kernels_read_only_each_calls_rows_of_a_graphs_buffers(mode, generator):
    """A graph's buffers hold the rows of the call that made them, of later calls, and NaN
    past them; loaded with a call of fewer boxes and crowd regions, the launches on them
    give that call's reference targets, and its unchecked boxes pass the kernels' check
    (a NaN row read would fail it)."""
    config = _config(mode).replace(**{"match.ignore_iof_thr": 0.5})
    first = _problem(generator, [9, 14], config, ignore_counts=[2, 3], want_max_iou=True)
    inputs = triton_graphs._Inputs(first)
    assert inputs.gt_boxes.shape[0] == 32 and inputs.ignore_boxes.shape[0] == 8
    inputs.load(first)
    assert inputs.gt_boxes[23:].isnan().all() and inputs.ignore_boxes[5:].isnan().all()
    for counts, ignore_counts in (([9, 14], [2, 3]), ([4, 0], [1, 1]), ([0, 2], [0, 0])):
        problem = _problem(generator, counts, config, ignore_counts=ignore_counts, want_max_iou=True)
        assert not problem.gt_boxes_checked
        inputs.load(problem)
        ours = triton_backend.solve(inputs.problem)
        assert ours.max_iou is not None  # asked for (assert_targets_equal compares it only where both have it)
        assert_targets_equal(ours, reference.solve(problem), rtol=TOL, atol=TOL)


def assert_sparse_equal(ours, want, tol: float = 0.0) -> None:
    """Every list and offset exactly, the deltas within ``tol`` (0: exactly)."""
    for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_classes", "ignored_offsets",
                 "ignored_anchors"):  # fmt: skip
        a, b = getattr(ours, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a.cpu(), b.cpu())), name
    torch.testing.assert_close(ours.positive_deltas.cpu(), want.positive_deltas.cpu(), rtol=tol, atol=tol)
    assert (ours.num_anchors, ours.background_class) == (want.num_anchors, want.background_class)


def _shares_memory(targets, launched) -> bool:
    ours = {t.untyped_storage().data_ptr() for t in targets if t is not None and t.numel()}
    return bool(ours & {t.untyped_storage().data_ptr() for t in launched if t is not None and t.numel()})


def test_a_graphs_buffers_are_float32_whatever_torchs_default_dtype(generator):
    """Under ``torch.set_default_dtype(torch.float64)`` the box buffers were float64, and
    every call a graph would replay failed its launch's check with a TypeError (review 49)."""
    problem = _problem(generator, [3, 5], _config())
    torch.set_default_dtype(torch.float64)
    try:
        inputs = triton_graphs._Inputs(problem)
    finally:
        torch.set_default_dtype(torch.float32)
    assert inputs.gt_boxes.dtype == inputs.ignore_boxes.dtype == torch.float32
    inputs.load(problem)
    launched = triton_backend.launch_dense(inputs.problem)
    assert_targets_equal(
        triton_backend._dense_finished(launched, [], True), reference.solve(problem), rtol=TOL, atol=TOL
    )


def test_what_a_replay_returns_is_copied_out_of_the_graphs_memory(monkeypatch, generator):
    """Dense: the targets copied (the next replay writes the graph's). Sparse: the lists
    cut and copied, the offsets copied; lists that overflowed, or that no earlier batch
    sized, written afresh after the read-back (nothing to copy but the offsets)."""
    config = _config("mmdet").replace(**{"match.ignore_iof_thr": 0.5})
    first = _problem(generator, [9, 14], config, ignore_counts=[2, 3])
    inputs = triton_graphs._Inputs(first)
    problem = _problem(generator, [4, 6], config, ignore_counts=[1, 1])
    inputs.load(problem)
    want = reference.solve(problem)

    launched = triton_backend.launch_dense(inputs.problem)
    dense = triton_backend._dense_finished(launched, [], True)
    assert_targets_equal(dense, want, rtol=TOL, atol=TOL)
    assert not _shares_memory(dataclasses.astuple(dense)[:5], dataclasses.astuple(launched[0])[:5])

    num_anchors = problem.num_anchors
    monkeypatch.setattr(triton_backend, "_ROWS_PER_IMAGE", {})
    for guess in ((50.0, 500.0), (0.0, 0.0), None):  # lists sized, overflowing, unsized
        triton_backend._ROWS_PER_IMAGE.pop(num_anchors, None)
        if guess is not None:
            triton_backend._ROWS_PER_IMAGE[num_anchors] = guess
        launched = triton_backend.launch_sparse(inputs.problem, triton_backend._list_sizes(2, num_anchors, True))
        assert (launched.lists is None) == (guess is None)
        sparse = triton_backend._sparse_finished(launched, [], True)
        assert_sparse_equal(sparse, want.to_sparse(), TOL)
        if guess is not None:  # the first lists hold every row; the second overflow
            fits = sparse.positive_anchors.numel() <= launched.lists["positive_anchors"].numel()
            assert fits == (guess[0] > 0)
        graph_memory = [launched.rows["offsets"], *(launched.lists or {}).values()]
        assert not _shares_memory([sparse.positive_offsets, sparse.positive_anchors, sparse.positive_deltas,
                                   sparse.ignored_anchors], graph_memory)  # fmt: skip


def test_sparse_lists_are_sized_in_powers_of_two_for_a_graph(monkeypatch):
    monkeypatch.setitem(triton_backend._ROWS_PER_IMAGE, 1000, (10.2, 3.0))
    assert triton_backend._list_sizes(2, 1000) == (104, 76)  # twice the rows per image, + 64
    assert triton_backend._list_sizes(2, 1000, bucketed=True) == (128, 128)
    assert triton_backend._list_sizes(1, 100, bucketed=True) is None  # no batch of 100 anchors yet
    monkeypatch.setitem(triton_backend._ROWS_PER_IMAGE, 100, (90.0, 0.0))
    assert triton_backend._list_sizes(1, 100, bucketed=True) == (100, 64)  # at most B x A


def test_a_kept_graphs_larger_lists_are_reused(monkeypatch, generator):
    """An estimate that falls below a power of two replays the kept graph with lists up to
    twice as long, rather than capturing another."""
    graphs = triton_graphs.Graphs()
    monkeypatch.setattr(triton_backend, "_GRAPHS", graphs)
    problem = _problem(generator, [3, 5], _config())
    kind = graphs.kind(problem)
    other = graphs.kind(_problem(generator, [3, 5, 1], _config()))  # another batch size
    monkeypatch.setitem(triton_backend._ROWS_PER_IMAGE, problem.num_anchors, (14.0, 0.0))
    assert triton_backend._graph_list_sizes(problem) == (128, 64)  # none kept
    for launches in [("sparse", (512, 64)), ("sparse", (256, 128)), ("sparse", (256, 64)), ("dense",)]:
        graphs._graphs[(kind, launches)] = None
    graphs._graphs[(other, ("sparse", (128, 64)))] = None
    assert graphs.launches_kept(problem) == [("sparse", (512, 64)), ("sparse", (256, 128)), ("sparse", (256, 64)),
                                             ("dense",)]  # fmt: skip
    assert triton_backend._graph_list_sizes(problem) == (256, 64)  # the smallest that holds 2x as much
    monkeypatch.setitem(triton_backend._ROWS_PER_IMAGE, problem.num_anchors, (40.0, 0.0))
    assert triton_backend._graph_list_sizes(problem) == (256, 64)  # its own size, kept
    monkeypatch.setitem(triton_backend._ROWS_PER_IMAGE, problem.num_anchors, (0.0, 0.0))
    assert triton_backend._graph_list_sizes(problem) == (64, 64)  # the kept ones are over twice as long
    # A kept graph found again is the most recently used (the last to be evicted).
    graphs._graphs[(kind, ("sparse", (512, 64)))] = found = object()
    assert graphs._kept((kind, ("sparse", (512, 64)))) is found
    assert graphs.launches_kept(problem) == [("sparse", (256, 128)), ("sparse", (256, 64)), ("dense",),
                                             ("sparse", (512, 64))]  # fmt: skip


def test_solve_replays_only_on_a_gpu(monkeypatch, generator):
    """graph_batches on the CPU: the interpreter launches as before (no graph)."""
    for meta in ("_INTERPRETED", "_COMPILED"):
        monkeypatch.setattr(triton_backend, meta, dataclasses.replace(getattr(triton_backend, meta), graph_batches=8))
    problem = _problem(generator, [3, 5], _config())
    assert triton_backend._replayable(problem) == (DEVICE.type == "cuda")
    if DEVICE.type == "cpu":
        assert_targets_equal(triton_backend.solve(problem), reference.solve(problem), rtol=TOL, atol=TOL)


@triton.jit
def _copy(source_ptr, target_ptr, n):
    at = tl.arange(0, 16)
    tl.store(target_ptr + at, tl.load(source_ptr + at, mask=at < n), mask=at < n)


def test_a_capture_keeps_every_launched_tensor(generator):
    """Tensors only, passed by position or by name; the innermost open list collects, and
    the one around it again once it closes; closed, also by an error (a failed capture),
    none collects."""
    problem = _problem(generator, [3, 5], _config())
    source, target = torch.arange(4.0, device=DEVICE), torch.zeros(4, device=DEVICE)
    with keeping_arguments() as outer:
        with keeping_arguments() as kept:
            triton_backend.solve(problem)
        Launcher(_copy, triton_backend.interpreting())[(1,)](source, target_ptr=target, n=4)
    assert any(tensor is problem.gt_boxes for tensor in kept)
    assert any(tensor is problem.gt_offsets for tensor in kept)
    assert all(isinstance(tensor, torch.Tensor) for tensor in kept)
    assert torch.equal(target, source) and [id(tensor) for tensor in outer] == [id(source), id(target)]
    with keeping_arguments() as again:
        pass
    with pytest.raises(RuntimeError, match="capture"), keeping_arguments() as failed:
        raise RuntimeError("the capture failed")
    triton_backend.solve(problem)
    assert again == [] and failed == []  # closed: nothing collected


def test_a_graphs_buffers_check_the_boxes_of_each_call_they_are_loaded_with(generator):
    """Unchecked calls: the launches on the buffers flag an invalid box of the call loaded
    last (the backend then checks on the host), and not the boxes of a valid one."""
    config = _config()
    problem = _problem(generator, [3, 2], config)
    inputs = triton_graphs._Inputs(problem)
    inputs.load(problem)
    assert_targets_equal(triton_backend._dense_finished(triton_backend.launch_dense(inputs.problem), [], True),
                         reference.solve(problem), rtol=TOL, atol=TOL)  # fmt: skip
    invalid = _problem(generator, [3, 2], config)
    invalid.gt_boxes[1] = torch.tensor([50.0, 50.0, 40.0, 60.0], device=DEVICE)  # x2 < x1
    inputs.load(invalid)
    with pytest.raises(CheckBoxesFirst):
        triton_backend._dense_finished(triton_backend.launch_dense(inputs.problem), [], True)


def test_with_graphs_off_a_call_is_launched_as_it_is(generator):
    """After a failed capture (``failed``: it needs a GPU) nothing is captured again: the
    launches' targets, not replayed, and the first failure kept."""
    cache = triton_graphs.Graphs()
    cache.failed = "RuntimeError: an earlier capture failed"
    problem = _problem(generator, [2, 3], _config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        targets, replayed = cache.run(problem, triton_backend.launch_dense, lambda launched, copy: (launched[0], copy),
                                      ("dense",))  # fmt: skip
    assert not replayed and len(cache) == 0 and cache.failed == "RuntimeError: an earlier capture failed"
    assert_targets_equal(targets, reference.solve(problem), rtol=TOL, atol=TOL)


@pytest.fixture
def graphs(monkeypatch):
    """Graphs for batches of up to 8 images, in a cache of this test's own; no capture
    may fail (the backend would launch without a graph, with a warning)."""
    monkeypatch.setattr(triton_backend, "_COMPILED", dataclasses.replace(triton_backend._COMPILED, graph_batches=8))
    cache = triton_graphs.Graphs()
    monkeypatch.setattr(triton_backend, "_GRAPHS", cache)
    yield cache
    assert cache.failed is None


def _launched(problem):
    """The targets of ``problem`` without a graph."""
    targets, flag = triton_backend.launch_dense(problem)
    assert flag is None or int(flag) == 0
    return targets


@gpu
@pytest.mark.parametrize("mode", ("none", "torchvision", "detectron2", "mmdet"))
@pytest.mark.parametrize("batch", (1, 3, 8))
def test_replays_give_the_launches_targets(mode, batch, graphs, generator):
    config = _config(mode)
    for round_ in range(4):  # the first call of each kind captures; the others replay
        counts = torch.randint(0, 16 // batch + 1, (batch,), generator=generator).tolist()
        problem = _problem(generator, counts, config, want_max_iou=round_ % 2 == 1)
        ours = triton_backend.solve(problem)
        assert_targets_equal(ours, _launched(problem), rtol=0, atol=0)
        assert_targets_equal(ours, reference.solve(problem), rtol=TOL, atol=TOL)
    assert len(graphs) == 2  # max IoU or not: up to 16 boxes, rows rounded alike


@gpu
def test_targets_of_earlier_calls_stay_as_they_were(graphs, generator):
    config = _config()
    problems = [_problem(generator, [5, 2], config) for _ in range(3)]
    results = [triton_backend.solve(p) for p in problems]
    assert len(graphs) == 1
    for problem, targets in zip(problems, results):
        assert_targets_equal(targets, _launched(problem), rtol=0, atol=0)


@gpu
def test_crowd_regions_classes_and_image_sizes_through_assign(graphs, generator):
    config = _config("mmdet").replace(**{"match.ignore_iof_thr": 0.5, "match.allowed_border": 0.0})
    for counts in ([4, 1], [0, 7]):
        boxes, _ = random_batch(generator, counts, CANVAS)
        ignore, _ = random_batch(generator, [1, 2], CANVAS, max_frac=0.4)
        classes = torch.randint(0, 80, (boxes.shape[0],), generator=generator)
        kwargs = dict(gt_classes=classes.to(DEVICE), ignore_boxes=ignore.to(DEVICE), ignore_counts=[1, 2],
                      image_sizes=[[90, 120], [97, 100]])  # fmt: skip
        ours = assign(boxes.to(DEVICE), counts, CANVAS, config, backend="triton", **kwargs)
        want = assign(boxes, counts, CANVAS, config, backend="reference",
                      **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})  # fmt: skip
        assert_targets_equal(ours, want, rtol=TOL, atol=TOL)
    assert len(graphs) == 1


@gpu
def test_invalid_boxes_are_refused_or_dropped_as_without_a_graph(graphs, generator):
    config = _config()
    boxes, counts = random_batch(generator, [3, 2], CANVAS)
    boxes[4] = torch.tensor([50.0, 50.0, 40.0, 60.0])  # x2 < x1
    with pytest.raises(ValueError, match="gt_boxes: image 1, box 1"):
        assign(boxes.to(DEVICE), counts, CANVAS, config, backend="triton")
    kept = assign(boxes.to(DEVICE), counts, CANVAS, config, backend="triton", drop_invalid=True)
    want = assign(boxes, counts, CANVAS, config, backend="reference", drop_invalid=True)
    assert_targets_equal(kept, want, rtol=TOL, atol=TOL)
    assert [d.tolist() for d in kept.dropped] == [[], [1]]
    # A replay that finds an invalid box says so (the backend then checks on the host).
    problem = _problem(generator, [3, 2], config)
    triton_backend.solve(problem)
    problem.gt_boxes[1] = torch.tensor([50.0, 50.0, 40.0, 60.0], device=DEVICE)
    with pytest.raises(CheckBoxesFirst):
        triton_backend.solve(problem)


@gpu
def test_each_stream_replays_its_own_graph(graphs, generator):
    config = _config()
    problem = _problem(generator, [4, 4], config)
    want = _launched(problem)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ours = triton_backend.solve(problem)
    torch.cuda.current_stream().wait_stream(side)
    assert_targets_equal(triton_backend.solve(problem), want, rtol=0, atol=0)
    assert_targets_equal(ours, want, rtol=0, atol=0)
    assert len(graphs) == 2


@gpu
def test_the_callers_own_capture_records_the_launches(graphs, generator):
    problem = _problem(generator, [4, 4], _config(), checked=True)
    want = _launched(problem)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: the stream's cached tables, the launches' variants
            triton_backend.launch_dense(problem)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = triton_backend.solve(problem)
    graph.replay()
    torch.cuda.synchronize()
    assert_targets_equal(captured, want, rtol=0, atol=0)
    assert len(graphs) == 0


@gpu
def test_graphs_beyond_the_kept_are_closed_and_captured_again(graphs, monkeypatch, generator):
    monkeypatch.setattr(triton_graphs, "GRAPHS_KEPT", 1)
    few, many = _problem(generator, [2, 3], _config()), _problem(generator, [20, 3], _config())
    triton_backend.solve(few)
    first = next(iter(graphs._graphs.values()))
    triton_backend.solve(many)  # a second kind: the first is closed and let go
    assert first.closed and len(graphs) == 1
    assert first.replay(few, lambda outputs, copy: outputs) is triton_graphs._CLOSED  # the caller launches
    assert_targets_equal(triton_backend.solve(few), _launched(few), rtol=0, atol=0)


@gpu
def test_a_failed_capture_turns_graphs_off_with_a_warning(generator):
    """A launch that reads back (not capturable) makes the capture fail: graphs are off for
    the process from then on, the call's stream is its own again, and the targets are the
    launches'."""

    def reading_back(problem):
        targets, flag = triton_backend.launch_dense(problem)
        targets.labels.sum().item()
        return targets, flag

    def finish(launched, copy):
        return launched[0], copy

    cache = triton_graphs.Graphs()
    problem = _problem(generator, [2, 3], _config())
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="capturing a CUDA graph for 2 images on canvas .* off for this process"):
        targets, replayed = cache.run(problem, reading_back, finish, ("dense",))
    assert torch.cuda.current_stream() == stream
    assert len(cache) == 0 and cache.failed is not None and not replayed
    assert_targets_equal(targets, _launched(problem), rtol=0, atol=0)
    other = _problem(generator, [20, 3], _config())
    targets, replayed = cache.run(other, triton_backend.launch_dense, finish, ("dense",))  # no capture now
    assert not replayed and len(cache) == 0
    assert_targets_equal(targets, _launched(other), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("mode", ("none", "torchvision", "mmdet"))
@pytest.mark.parametrize("batch", (1, 8))
def test_sparse_replays_give_the_launches_lists(mode, batch, graphs, monkeypatch, generator):
    """The first call of an anchor count sizes the lists (launched as it is); later calls
    replay, their lists cut from the graph's; a batch whose rows overflow them is written
    again after the read-back."""
    config = _config(mode).replace(**{"match.ignore_iof_thr": 0.5})
    monkeypatch.setattr(triton_backend, "_ROWS_PER_IMAGE", {})  # no batch of these anchors yet
    for _ in range(4):
        counts = torch.randint(0, 16 // batch + 1, (batch,), generator=generator).tolist()
        problem = _problem(generator, counts, config, ignore_counts=[1] * batch)
        ours = triton_backend.solve_sparse(problem)
        assert_sparse_equal(ours, _launched(problem).to_sparse())
        assert_sparse_equal(ours, reference.solve(problem).to_sparse(), TOL)
    assert len(graphs) >= 1
    crowded = _problem(generator, [16] + [0] * (batch - 1), config.replace(**{"match.low": 0.0, "match.high": 0.01}),
                       ignore_counts=[1] * batch)  # fmt: skip
    assert_sparse_equal(triton_backend.solve_sparse(crowded), reference.solve(crowded).to_sparse(), TOL)


@gpu
def test_a_problem_the_backend_refuses_is_refused_before_any_capture(graphs, generator):
    """The graph's buffers would convert float classes to int32: the caller's problem is
    checked as the launches check it."""
    problem = _problem(generator, [2, 3], _config())
    float_classes = dataclasses.replace(problem, gt_classes=problem.gt_classes.float())
    with pytest.raises(TypeError, match="problem.gt_classes: expected torch.int32 or torch.int64, got torch.float32"):
        triton_backend.solve(float_classes)
    assert len(graphs) == 0
