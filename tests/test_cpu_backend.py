"""The CPU backend equals the reference: labels, matched indices, classes and max IoU
exactly, deltas within 1e-6, for every preset and matching mode; and it never builds a
[G, A] matrix."""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
import threading
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import assert_targets_equal, on_device, random_batch, triton_runs_here, with_ties
from tritarget.kernels import TargetConfig, assign, cpu, cpu_build, generate_anchors, presets, reference
from tritarget.kernels.api import assign_sparse
from tritarget.kernels.config import LOW_QUALITY_MODES, AnchorConfig, AnchorLevel, MatchConfig
from tritarget.kernels.cpu_build import CompileError, _compiler
from tritarget.kernels.problem import build_problem
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

SMALL_CANVASES = [(64, 96), (97, 131), (160, 224)]
# Few, small anchors on a small canvas: cheap for the reference, and every rule fires.
SMALL_ANCHORS = AnchorConfig(
    layout="torchvision",
    levels=(
        AnchorLevel(stride=8, sizes=(16, 24), aspect_ratios=(0.5, 1.0, 2.0)),
        AnchorLevel(stride=16, sizes=(40,), aspect_ratios=(0.5, 1.0, 2.0)),
    ),
)


def solve_both(boxes, counts, canvas, config, **kwargs):
    """Dense targets (before sampling) from the reference and from the CPU backend.

    Invalid boxes (``with_ties`` may snap a box off the canvas) are dropped."""
    problem, _ = build_problem(boxes, counts, canvas, config, drop_invalid=True, **kwargs)
    return cpu.solve(problem), reference.solve(problem)


def assert_both_forms_match(boxes, counts, canvas, config, threads: tuple[int, ...] = (1, 2), **kwargs):
    """The dense CPU solve equals the reference, and so does the sparse-first solve (see
    ``assert_sparse_solve_matches``); returns the dense CPU targets."""
    problem, _ = build_problem(boxes, counts, canvas, config, drop_invalid=True, **kwargs)
    ours = cpu.solve(problem)
    assert_targets_equal(ours, reference.solve(problem))
    assert_sparse_solve_matches(problem, threads)
    return ours


def classes_for(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1, 81, (boxes.shape[0],), generator=generator, dtype=torch.int32)


@pytest.mark.parametrize("canvas", SMALL_CANVASES)
@pytest.mark.parametrize("preset", presets.names())
def test_every_preset_on_small_canvases(preset, canvas, generator):
    boxes, counts = random_batch(generator, [0, 1, 3, 13], canvas)
    ours, ref = solve_both(
        boxes, counts, canvas, presets.get(preset), gt_classes=classes_for(boxes, generator), want_max_iou=True
    )
    assert_targets_equal(ours, ref)


@pytest.mark.parametrize("preset", presets.names())
def test_every_preset_with_ties_through_assign(preset, generator):
    """Through ``assign`` (sampling and dispatch included), with duplicate boxes."""
    canvas = (128, 160)
    boxes, counts = random_batch(generator, [5, 0, 8], canvas)
    boxes = with_ties(boxes, generator)
    config = presets.get(preset)
    ours = assign(boxes, counts, canvas, config, backend="cpu", seed=3, drop_invalid=True)
    ref = assign(boxes, counts, canvas, config, backend="reference", seed=3, drop_invalid=True)
    assert_targets_equal(ours, ref)


def test_auto_on_cpu_tensors_is_the_cpu_backend(generator, monkeypatch):
    boxes, counts = random_batch(generator, [4], (96, 96))
    config = presets.get("retinanet_torchvision")
    calls = []
    monkeypatch.setattr(cpu, "solve", lambda problem: calls.append(problem) or reference.solve(problem))
    assign(boxes, counts, (96, 96), config, backend="auto")
    assert len(calls) == 1


def tied_batch(generator, low_quality: str, min_pos_iou: float, strict_high: bool):
    """(boxes, counts, canvas, config): snapped boxes (ties) with thresholds on their exact
    IoU values (1/2, 1/3), so ">=" and ">" and the float32 rounding of the threshold all
    matter."""
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [0, 2, 7, 16], canvas)
    config = TargetConfig(
        anchors=SMALL_ANCHORS,
        match=MatchConfig(high=0.5, low=1 / 3, strict_high=strict_high, low_quality=low_quality,
                          min_pos_iou=min_pos_iou),
    )  # fmt: skip
    return with_ties(boxes, generator), counts, canvas, config


@pytest.mark.parametrize("strict_high", [False, True])
@pytest.mark.parametrize("min_pos_iou", [0.0, 0.3])
@pytest.mark.parametrize("low_quality", LOW_QUALITY_MODES)
def test_every_matching_mode_with_ties(low_quality, min_pos_iou, strict_high, generator):
    boxes, counts, canvas, config = tied_batch(generator, low_quality, min_pos_iou, strict_high)
    assert_both_forms_match(boxes, counts, canvas, config, gt_classes=classes_for(boxes, generator), want_max_iou=True)


@pytest.mark.parametrize("low_quality", LOW_QUALITY_MODES)
def test_boxes_sharing_best_anchors(low_quality):
    """Identical and nested boxes: the same best anchor, equal maxima, later-box-wins rules."""
    canvas = (64, 64)
    boxes = torch.tensor(
        [[8, 8, 24, 24], [8, 8, 24, 24], [10, 10, 22, 22], [40, 40, 56, 56], [8, 8, 24, 24], [1, 1, 3, 3]],
        dtype=torch.float32,
    )
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(high=0.7, low=0.3, low_quality=low_quality))
    assert_both_forms_match(boxes, [6], canvas, config, threads=(1, 3), want_max_iou=True)


@pytest.mark.parametrize("wrt_anchor", [True, False])
@pytest.mark.parametrize("threshold", [0.05, 0.5])
@pytest.mark.parametrize("low_quality", ["torchvision", "mmdet", "ssd_forced", "detectron2"])
def test_ignore_regions(low_quality, threshold, wrt_anchor, generator):
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [6, 0, 9], canvas)
    ignore, ignore_counts = random_batch(generator, [2, 3, 0], canvas, max_frac=0.4)
    config = TargetConfig(
        anchors=SMALL_ANCHORS,
        match=MatchConfig(low_quality=low_quality, ignore_iof_thr=threshold, ignore_iof_wrt_anchor=wrt_anchor),
    )
    assert_both_forms_match(
        boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=ignore_counts, want_max_iou=True
    )


def test_ignore_region_covering_the_canvas_excludes_every_anchor(generator):
    """Every anchor excluded: no box has an included anchor (its maximum is -1)."""
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3], canvas)
    ignore = torch.tensor([[-50.0, -50.0, 200.0, 200.0]])
    for mode in LOW_QUALITY_MODES:
        config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=mode, ignore_iof_thr=0.1))
        ours, ref = solve_both(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=[1])
        assert_targets_equal(ours, ref)
        assert (ours.labels == -1).all()


@pytest.mark.parametrize("wrt_anchor", [True, False])
def test_an_iof_equal_to_the_threshold_does_not_exclude(wrt_anchor):
    """mmdet ignores an anchor whose IoF *exceeds* ignore_iof_thr: at exactly 0.5 the anchor
    stays included (positive here); just above it, it is excluded (ignored)."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    # IoF exactly 0.5 with anchor 0; 0.52 (over the anchor) or 100 / 198 (over the region) with anchor 1.
    regions = [[0.0, 0.0, 10.0, 5.0], [20.0, 0.0, 30.0, 5.2]] if wrt_anchor else [[0, 0, 10, 20], [20, 0, 30, 19.8]]
    match = MatchConfig(high=0.5, low=0.4, ignore_iof_thr=0.5, ignore_iof_wrt_anchor=wrt_anchor)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=match)
    ours = assert_both_forms_match(
        anchors.clone(), [2], (48, 48), config, anchors=anchors, ignore_boxes=torch.tensor(regions), ignore_counts=[2]
    )
    assert ours.labels.tolist() == [[1, -1]]


@pytest.mark.parametrize("order", ["pre_match", "post_match"])
@pytest.mark.parametrize("border", [0.0, 4.5, 32.0])
@pytest.mark.parametrize("low_quality", ["torchvision", "detectron2", "mmdet", "ssd_forced"])
def test_border_rules(low_quality, border, order, generator):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 0, 11], canvas)
    config = TargetConfig(
        anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=low_quality, allowed_border=border, border_order=order)
    )
    sizes = [[97, 131], [60, 131], [80, 100]]
    assert_both_forms_match(boxes, counts, canvas, config, image_sizes=sizes, want_max_iou=True)


@pytest.mark.parametrize("low_quality", LOW_QUALITY_MODES)
def test_explicit_anchors(low_quality, generator):
    """Arbitrary anchors (proposals), tiny ones included (degenerate ones are refused)."""
    canvas = (120, 150)
    anchors, _ = random_batch(generator, [700], canvas, min_size=1.0)
    anchors[::97, 2] = anchors[::97, 0] + 0.01  # a hundredth of a pixel wide
    boxes, counts = random_batch(generator, [4, 0, 10], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=low_quality, allowed_border=2.0))
    classes = classes_for(boxes, generator)
    assert_both_forms_match(boxes, counts, canvas, config, anchors=anchors, gt_classes=classes, want_max_iou=True)


def test_encoding_weights_means_and_stds(generator):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [7, 3], canvas)
    # Each coordinate its own weight and std: the presets pair x with y and w with h.
    config = presets.get("retinanet_mmdet").replace(
        **{"encode.weights": (10.0, 9.0, 5.0, 4.0), "encode.means": (0.1, -0.2, 0.0, 0.3),
           "encode.stds": (0.1, 0.15, 0.2, 0.25), "background_class": 80}
    )  # fmt: skip
    ours, ref = solve_both(boxes, counts, canvas, config, gt_classes=classes_for(boxes, generator))
    assert_targets_equal(ours, ref)
    assert (ours.classes[ours.labels != 1] == 80).all()


def test_dropped_boxes_keep_their_given_indices(generator):
    canvas = (96, 128)
    boxes, counts = random_batch(generator, [4, 3], canvas)
    boxes[1] = torch.tensor([10.0, 10.0, 5.0, 20.0])  # degenerate
    boxes[5] = torch.tensor([float("nan"), 0.0, 5.0, 5.0])
    config = presets.get("retinanet_torchvision")
    ours = assign(boxes, counts, canvas, config, backend="cpu", drop_invalid=True)
    ref = assign(boxes, counts, canvas, config, backend="reference", drop_invalid=True)
    assert_targets_equal(ours, ref)
    assert [d.tolist() for d in ours.dropped] == [[1], [1]]


def test_strided_and_converted_inputs(generator):
    """The kernel reads the Problem's tensors in place: views and other dtypes reach it as
    build_problem's contiguous float32 / int32 copies."""
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 3], canvas)
    anchors, _ = random_batch(generator, [300], canvas)
    ignore, _ = random_batch(generator, [1, 2], canvas)
    problem, _ = build_problem(
        torch.cat([boxes, boxes], dim=1)[:, :4], counts, canvas, presets.get("retinanet_torchvision"),
        gt_classes=classes_for(torch.cat([boxes, boxes]), generator)[::2], ignore_boxes=ignore.double(),
        ignore_counts=[1, 2], anchors=anchors.t().contiguous().t(),
    )  # fmt: skip
    assert torch.equal(problem.gt_boxes, boxes) and torch.equal(problem.anchors, anchors)
    assert_targets_equal(cpu.solve(problem), reference.solve(problem))
    assert_sparse_solve_matches(problem)


@pytest.mark.parametrize("low_quality", ["torchvision", "mmdet", "ssd_forced", "detectron2"])
def test_crowded_images(low_quality, generator):
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [230, 0, 301], canvas, max_frac=0.3)
    boxes[:120] = with_ties(boxes[:120], generator)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=low_quality, min_pos_iou=0.1))
    classes = classes_for(boxes, generator)
    assert_both_forms_match(boxes, counts, canvas, config, threads=(1, 3), gt_classes=classes, want_max_iou=True)


def tall_crowd(generator: torch.Generator, count: int, canvas: tuple[int, int], tallest: float = 590.0) -> torch.Tensor:
    """count boxes of heights from 2 to ``tallest`` pixels (log-uniform: by default every
    height class of the box index from 2 to 10), 4 to 64 wide, spread over the canvas,
    some past its edges."""
    height, width = canvas
    h = 2.0 ** (1 + torch.rand(count, generator=generator) * (torch.tensor(tallest).log2() - 1))
    w = 4 + torch.rand(count, generator=generator) * 60
    cx, cy = torch.rand(count, generator=generator) * width, torch.rand(count, generator=generator) * height
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    return boxes.clamp(
        min=torch.tensor([-8.0, -8.0, 1.0, 1.0]), max=torch.tensor([width - 1, height - 1, width + 8, height + 8])
    )


@pytest.mark.parametrize("low_quality", LOW_QUALITY_MODES)
def test_crowded_tall_images_through_the_box_index(low_quality, generator):
    """An image of 64 boxes or more has them indexed by height and top, and a chunk of
    anchors (a strip a few cells high) tests only those that can reach it. On a tall canvas
    a strip's candidates are a small part of the boxes (an image of 63 boxes is not
    indexed); ties and duplicates among them, every low-quality rule."""
    canvas = (1024, 96)
    counts = [150, 0, 64, 63, 230]
    boxes = tall_crowd(generator, sum(counts), canvas)
    boxes[::3] = with_ties(boxes[::3], generator)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=low_quality, min_pos_iou=0.1))
    classes = classes_for(boxes, generator)
    assert_both_forms_match(boxes, counts, canvas, config, threads=(1, 3), gt_classes=classes, want_max_iou=True)


@pytest.mark.parametrize("wrt_anchor", [True, False])
@pytest.mark.parametrize("low_quality", ["mmdet", "ssd_forced"])
def test_crowded_ignore_regions_through_the_index(low_quality, wrt_anchor, generator):
    """Ignore regions are indexed like boxes (64 or more in an image): each chunk meets only
    the regions that touch it. Small regions (up to 48 pixels high) and few boxes: chunks
    that only a region touches, listed rather than all regions tested."""
    canvas = (1024, 96)
    counts, region_counts = [10, 3, 6], [120, 63, 64]
    boxes = tall_crowd(generator, sum(counts), canvas)
    regions = tall_crowd(generator, sum(region_counts), canvas, tallest=48.0)
    config = TargetConfig(
        anchors=SMALL_ANCHORS,
        match=MatchConfig(low_quality=low_quality, ignore_iof_thr=0.3, ignore_iof_wrt_anchor=wrt_anchor),
    )
    ours = assert_both_forms_match(
        boxes, counts, canvas, config, threads=(1, 3), ignore_boxes=regions, ignore_counts=region_counts
    )
    assert (ours.labels == -1).sum(1).gt(0).all()  # every image has anchors its regions ignore


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_ssd_forced_ties_across_threads_go_to_the_lowest_anchor(threads):
    """Each box's best anchor ties between two copies of one anchor, far apart (chunks k
    and k + 8 of 16), below the positive threshold: ``ssd_forced`` must force the lower
    index, whichever threads found the two (each thread keeps its own best per box, and
    the merge of those decides the tie)."""
    canvas, chunk = (400, 400), 512
    corners = torch.tensor([[x, y] for x in (20.0, 120.0, 220.0, 320.0) for y in (20.0, 120.0, 220.0, 320.0)])
    boxes = torch.cat([corners, corners + 40.0], dim=1)  # 16 boxes of 40 x 40, none overlapping another
    tied = torch.cat([corners, corners + torch.tensor([40.0, 16.0])], dim=1)  # IoU 0.4 with its box
    anchors = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(16 * chunk, 1)  # overlapping no box
    low = torch.arange(16) * chunk + 7
    high = (torch.arange(16) + 8) % 16 * chunk + 300
    anchors[low], anchors[high] = tied, tied
    config = presets.get("ssd300_torchvision")
    expected = assign(boxes, [16], canvas, config, anchors=anchors, backend="reference")
    first = torch.minimum(low, high)
    assert expected.labels[0, first].eq(1).all() and expected.labels[0, torch.maximum(low, high)].eq(0).all()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):  # which thread meets which chunk varies from call to call
            got = assign(boxes, [16], canvas, config, anchors=anchors, backend="cpu")
            assert torch.equal(got.labels, expected.labels) and torch.equal(got.matched_gt, expected.matched_gt)
    finally:
        torch.set_num_threads(before)


def test_ssd_forced_ties_in_consecutive_takes_go_to_the_lowest_anchor():
    """As above, with a tie between every two consecutive takes (a thread takes 8 chunks at
    a time, from the last), so that some lower copy is found by another thread than the
    upper one whichever thread takes what, and the merge (not the order of the threads)
    must pick the lower index. want_max_iou skips nothing, so both threads take part."""
    canvas, chunk, takes = (400, 400), 512, 17
    corners = torch.tensor([[x, y] for x in (20.0, 120.0, 220.0, 320.0) for y in (20.0, 120.0, 220.0, 320.0)])
    boxes = torch.cat([corners, corners + 40.0], dim=1)  # 16 boxes of 40 x 40
    # 40 boxes over the canvas, each overlapping every anchor: work in every chunk
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 400.0 - k, 400.0 - k] for k in range(1, 41)])])
    tied = torch.cat([corners, corners + torch.tensor([40.0, 16.0])], dim=1)  # IoU 0.4 with its box
    chunks = 8 * takes
    anchors = torch.tensor([[0.0, 0.0, 400.0, 400.0]]).repeat(chunks * chunk, 1)
    upper = (chunks - 1 - 8 * torch.arange(16)) * chunk + 100  # in take i (box i)
    lower = upper - 8 * chunk - 50  # in take i + 1
    anchors[upper], anchors[lower] = tied, tied
    problem, _ = build_problem(boxes, [56], canvas, presets.get("ssd300_torchvision"), anchors=anchors,
                               want_max_iou=True)  # fmt: skip
    expected = reference.solve(problem)
    assert expected.labels[0, lower].eq(1).all() and expected.labels[0, upper].eq(0).all()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(100):  # which thread meets which take varies from call to call
            got = cpu.solve(problem)
            assert torch.equal(got.labels, expected.labels) and torch.equal(got.matched_gt, expected.matched_gt)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_any_thread_count_gives_the_same_targets(threads, generator):
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [9, 40, 0, 3], canvas)
    boxes = with_ties(boxes, generator)
    config = presets.get("retinanet_detectron2")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, ref = solve_both(boxes, counts, canvas, config, want_max_iou=True)
    finally:
        torch.set_num_threads(before)
    assert_targets_equal(ours, ref)


def crowded_problem(generator):
    """Many boxes over few anchors with the low-quality rule: every thread's share finds
    box maxima the others skip by (the shared per-box bound), and pass 2 runs."""
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [60, 0, 45, 7], canvas, max_frac=0.4)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality="torchvision", min_pos_iou=0.0))
    classes = classes_for(boxes, generator)
    problem, _ = build_problem(boxes, counts, canvas, config, drop_invalid=True, gt_classes=classes)
    return problem


def _single_threaded(solve, problem):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return solve(problem)
    finally:
        torch.set_num_threads(before)


def _concurrent_callers(callers: int, threads_each: int, calls: int, check) -> None:
    """``callers`` Python threads, each asking the kernel for ``threads_each`` threads (as
    the server's compute workers set theirs) and making ``check()`` ``calls`` times; fails
    the test with the first failure, or where a caller never returned."""
    failures = []

    def caller() -> None:
        torch.set_num_threads(threads_each)
        try:
            for _ in range(calls):
                check()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a caller never returned"
    assert not failures, failures[0]


def test_concurrent_callers_each_with_several_threads(generator):
    """The kernel's helper threads outlive a call and are shared by every caller: four
    Python threads, each solving with 3 threads at once, all get the single-threaded
    answer."""
    problem = crowded_problem(generator)
    dense, sparse = _single_threaded(cpu.solve, problem), _single_threaded(cpu.solve_sparse, problem)

    def check() -> None:
        assert_targets_equal(cpu.solve(problem), dense, rtol=0.0, atol=0.0)
        assert_sparse_equal(cpu.solve_sparse(problem), sparse)

    _concurrent_callers(4, 3, 15, check)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_the_helper_threads_are_at_most_one_per_cpu(generator):
    """Concurrent callers each asking for many threads started a helper per thread asked
    for, kept for the process's life (16 callers with 16 threads each: 2 -> 206 threads on
    the 2-core VM; a helper's audit). They are at most one per CPU now, and every caller
    still gets the single-threaded answer."""
    problem = crowded_problem(generator)
    sparse = _single_threaded(cpu.solve_sparse, problem)
    _concurrent_callers(12, 16, 5, lambda: assert_sparse_equal(cpu.solve_sparse(problem), sparse))
    helpers = [task for task in os.listdir("/proc/self/task")
               if Path(f"/proc/self/task/{task}/comm").read_text().strip() == "tritarget-cpu"]  # fmt: skip
    assert 1 <= len(helpers) <= os.cpu_count()


def _solve_in_child(problem, connection) -> None:
    torch.set_num_threads(3)
    sparse = cpu.solve_sparse(problem)
    connection.send([getattr(sparse, name).tolist() for name in ("positive_anchors", "ignored_anchors")])


def test_a_forked_child_solves_with_threads_after_its_parent_did(generator):
    """Data-loader workers are forked from a process that may have used the kernel with
    several threads: the child has none of those helper threads and must start its own
    (not wait forever for the parent's)."""
    problem = crowded_problem(generator)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        expected = cpu.solve_sparse(problem)  # the parent now has idle helpers
    finally:
        torch.set_num_threads(before)
    got, exitcode = _in_forked_child(_solve_in_child, problem)
    assert got is not None, "the forked child did not answer within 120 s"
    assert got == [expected.positive_anchors.tolist(), expected.ignored_anchors.tolist()]
    assert exitcode == 0


def _in_forked_child(function, problem, wait_s: float = 120.0):
    """(what ``function(problem, connection)`` sent from a forked child, or None after
    ``wait_s``; the child's exit code, the child killed if it still runs)."""
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=function, args=(problem, sending))
    child.start()
    got = receiving.recv() if receiving.poll(wait_s) else None
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()
    return got, child.exitcode


def _solve_fresh_config_in_child(problem, connection) -> None:
    fresh = replace(problem, config=TargetConfig.from_dict(problem.config.to_dict()))  # a template to cache
    connection.send(cpu.solve_sparse(fresh).positive_anchors.tolist())


def test_a_child_forked_while_a_parent_thread_caches_a_template_is_not_stuck():
    """Another thread of the parent holds the template cache's lock at the fork (held here
    by the test itself, as that thread would): the child must not wait for it forever."""
    problem = build_problem(torch.tensor([[10.0, 10.0, 60.0, 50.0]]), [1], (96, 128),
                            presets.get("retinanet_torchvision"))[0]  # fmt: skip
    expected = cpu.solve_sparse(problem).positive_anchors.tolist()
    with cpu._CACHE_LOCK:
        got, _ = _in_forked_child(_solve_fresh_config_in_child, problem, wait_s=60)
    assert got == expected, "the forked child did not answer within 60 s"


@pytest.mark.parametrize(
    ("preset", "counts"),
    [("retinanet_torchvision", [7, 0]), ("rpn_mmdet", [25]), ("ssd300_torchvision", [3, 12])],
)
def test_full_size(preset, counts, generator):
    config = presets.get(preset)
    canvas = (300, 300) if preset.startswith("ssd") else COCO_CANVAS
    boxes, counts = random_batch(generator, counts, canvas, max_frac=0.5)
    ours, ref = solve_both(boxes, counts, canvas, config, gt_classes=classes_for(boxes, generator), want_max_iou=True)
    assert_targets_equal(ours, ref)


def test_full_size_coco_like_crowd():
    boxes, counts, classes = coco_like_batch(1, seed=5, boxes_per_image=200)
    ours, ref = solve_both(boxes, counts, COCO_CANVAS, presets.get("retinanet_torchvision"), gt_classes=classes)
    assert_targets_equal(ours, ref)


def test_no_anchor_survives_an_empty_canvas():
    """Zero anchors (explicit) is a valid, empty problem, dense and sparse."""
    boxes = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    config = presets.get("retinanet_torchvision")
    ours, ref = solve_both(boxes, [1], (16, 16), config, anchors=torch.zeros(0, 4))
    assert ours.labels.shape == (1, 0)
    assert_targets_equal(ours, ref)
    sparse = assign_sparse(boxes.repeat(2, 1), [1, 1], (16, 16), config, anchors=torch.zeros(0, 4), backend="cpu")
    assert sparse.positive_offsets.tolist() == sparse.ignored_offsets.tolist() == [0, 0, 0]
    assert sparse.positive_anchors.numel() == sparse.ignored_anchors.numel() == 0


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    counts=st.lists(st.integers(0, 24), min_size=1, max_size=4),
    ties=st.booleans(),
    classes=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    mode=st.sampled_from(LOW_QUALITY_MODES),
    strict_high=st.booleans(),
    high=st.sampled_from([0.25, 1 / 3, 0.5, 0.7, 1.0]),
    low_fraction=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    min_pos_iou=st.sampled_from([0.0, 0.2, 0.5]),
    border=st.sampled_from([-1.0, 0.0, 6.0]),
    order=st.sampled_from(["pre_match", "post_match"]),
    ignore_thr=st.sampled_from([-1.0, 0.0, 0.3]),
    wrt_anchor=st.booleans(),
)
def test_random_configurations(
    seed, counts, ties, classes, threads, mode, strict_high, high, low_fraction, min_pos_iou, border, order,
    ignore_thr, wrt_anchor,
):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    canvas = (64 + seed % 37, 96 + seed % 53)
    boxes, counts = random_batch(generator, counts, canvas)
    if ties:
        boxes = with_ties(boxes, generator)
    ignore, ignore_counts = random_batch(generator, [seed % 3 for _ in counts], canvas, max_frac=0.3)
    sizes = [[canvas[0] - (seed + i) % 20, canvas[1] - (seed * i) % 30] for i in range(len(counts))]
    match = MatchConfig(
        high=high, low=high * low_fraction, strict_high=strict_high, low_quality=mode, min_pos_iou=min_pos_iou,
        allowed_border=border, border_order=order, ignore_iof_thr=ignore_thr, ignore_iof_wrt_anchor=wrt_anchor,
    )  # fmt: skip
    config = TargetConfig(anchors=SMALL_ANCHORS, match=match, background_class=91)  # no box has class 91
    gt_classes = classes_for(boxes, generator) if classes else None
    assert_both_forms_match(
        boxes, counts, canvas, config, threads=(threads,), gt_classes=gt_classes, ignore_boxes=ignore,
        ignore_counts=ignore_counts, image_sizes=sizes, want_max_iou=True,
    )  # fmt: skip


def assert_sparse_equal(ours, ref, delta_tolerance=0.0):
    """Indices exactly; deltas exactly or within a relative/absolute tolerance."""
    assert ours.num_anchors == ref.num_anchors and ours.background_class == ref.background_class
    for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas",
                 "ignored_offsets", "ignored_anchors", "positive_classes"):  # fmt: skip
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "positive_deltas":
            assert torch.allclose(a, b, rtol=delta_tolerance, atol=delta_tolerance), name
        else:
            assert torch.equal(a, b), name


# The sparse solve never builds the dense targets: it keeps rows per chunk, skips blocks
# by IoU bounds, and has its own pass-2 and ssd_forced patching. Every rule is checked
# against the reference's dense result compacted, and against the dense CPU solve (the
# same encoding code: deltas bit for bit).


def assert_sparse_solve_matches(problem, threads: tuple[int, ...] = (1, 2)) -> None:
    ref = reference.solve(problem).to_sparse()
    before = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            ours = cpu.solve_sparse(problem)
            assert_sparse_equal(ours, ref, delta_tolerance=1e-6)
            assert_sparse_equal(ours, cpu.solve(problem).to_sparse())
    finally:
        torch.set_num_threads(before)


def sparse_problem(boxes, counts, canvas, config, **kwargs):
    """Invalid boxes (``with_ties`` may snap a box off the canvas) are dropped."""
    return build_problem(boxes, counts, canvas, config, drop_invalid=True, **kwargs)[0]


@pytest.mark.parametrize("with_classes", [True, False])
@pytest.mark.parametrize("preset", presets.names())
def test_sparse_solve_every_preset(preset, with_classes, generator):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [3, 0, 11, 1], canvas)
    classes = classes_for(boxes, generator) if with_classes else None
    config = presets.get(preset).replace(**{"match.sample_size": 0})  # sampling happens after the solve
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, gt_classes=classes))


@pytest.mark.parametrize("low_quality", LOW_QUALITY_MODES)
def test_sparse_solve_empty_images(low_quality, generator):
    """Images without boxes (every anchor negative, or ignored in a region) beside others."""
    canvas = (97, 131)
    config = TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(low_quality=low_quality, ignore_iof_thr=0.5))
    boxes, counts = random_batch(generator, [0, 0, 5, 0], canvas)
    ignore, ignore_counts = random_batch(generator, [0, 2, 1, 0], canvas, max_frac=0.4)
    problem = sparse_problem(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=ignore_counts)
    assert_sparse_solve_matches(problem)
    none = sparse_problem(torch.zeros(0, 4), [0, 0], canvas, config)
    sparse = cpu.solve_sparse(none)
    assert sparse.positive_offsets.tolist() == [0, 0, 0] and sparse.ignored_anchors.numel() == 0


def test_sparse_solve_sees_explicit_anchors_changed_in_place():
    """Block bounds are cached per anchor tensor: an in-place edit must not reuse them.

    Grid anchors lie in order, so the first blocks' bounds cover only the canvas's top-left;
    the boxes are in the bottom-right corner, where the edit then moves the first block's
    64 anchors (onto the boxes): stale bounds would skip that block."""
    canvas = (120, 150)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    anchors = generate_anchors(SMALL_ANCHORS, canvas).clone()
    boxes = torch.tensor([[110.0, 90.0, 146.0, 118.0], [120.0, 100.0, 140.0, 116.0]])
    first = cpu.solve_sparse(sparse_problem(boxes, [2], canvas, config, anchors=anchors))
    assert_sparse_solve_matches(sparse_problem(boxes, [2], canvas, config, anchors=anchors), threads=(1,))
    anchors[:64] = boxes[torch.arange(64) % 2] + torch.arange(64).div(16, rounding_mode="floor")[:, None]
    moved = sparse_problem(boxes, [2], canvas, config, anchors=anchors)
    assert_sparse_solve_matches(moved, threads=(1,))
    second = cpu.solve_sparse(moved)
    assert bool((second.positive_anchors < 64).any()) and not bool((first.positive_anchors < 64).any())


def test_sparse_solve_sees_explicit_anchors_replaced_in_place(generator):
    """The kernel arguments cached per anchor tensor hold its address and count: ``set_``
    (another storage, another count) must not reuse them."""
    canvas = (120, 150)
    anchors, _ = random_batch(generator, [700], canvas, min_size=4.0)
    boxes, counts = random_batch(generator, [6], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
    anchors.set_(random_batch(generator, [1300], canvas, min_size=4.0)[0])
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))


def test_explicit_anchors_moved_without_a_version_bump(generator):
    """``share_memory_()`` and ``.data =`` (what ``Module._apply`` does) give a tensor
    other data, even another count, and leave its version counter where it was: the
    cached kernel arguments must not keep the old address or count (the old block is
    refilled here, so a stale read would see other anchors)."""
    canvas = (120, 150)
    anchors, _ = random_batch(generator, [700], canvas, min_size=4.0)
    boxes, counts = random_batch(generator, [6], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
    version = anchors._version
    anchors.share_memory_()
    refill = torch.full((700, 4), 1000.0)
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
    anchors.data = random_batch(generator, [1300], canvas, min_size=4.0)[0]
    assert anchors._version == version
    assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
    del refill


def test_a_new_config_with_anchors_already_seen_reuses_their_bounds(generator, monkeypatch):
    """A config rebuilt on each call (``from_dict``, ``replace``) misses the per-config
    template but finds the anchors' bounds cached: computing them reads every anchor (~0.2
    ms for RetinaNet's) and would leave a fresh block in the heap on each call. The new
    config's own thresholds still apply."""
    canvas = (120, 150)
    boxes, counts = random_batch(generator, [9, 4], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    assign(boxes, counts, canvas, config, backend="cpu")
    computed, compute = [], cpu._compute_bounds
    monkeypatch.setattr(cpu, "_compute_bounds", lambda anchors: computed.append(anchors) or compute(anchors))
    for high in (0.5, 0.5, 0.3):
        rebuilt = TargetConfig.from_dict(config.replace(**{"match.high": high, "match.low": 0.2}).to_dict())
        got = assign(boxes, counts, canvas, rebuilt, backend="cpu")
        assert_targets_equal(got, assign(boxes, counts, canvas, rebuilt, backend="reference"))
    assert computed == []


def test_sparse_solve_under_inference_mode(generator):
    """Inference tensors have no version counter: explicit ones get fresh bounds each call."""
    canvas = (120, 150)
    boxes, counts = random_batch(generator, [6], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    with torch.inference_mode():
        anchors, _ = random_batch(generator, [700], canvas, min_size=4.0)
        assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
        anchors[:350] = anchors[:350].flip(0) + 3.0
        assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config, anchors=anchors), threads=(1,))
        assert_sparse_solve_matches(sparse_problem(boxes, counts, canvas, config), threads=(1,))


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_sparse_solve_full_size_coco_like(seed):
    """RetinaNet anchors on the COCO canvas: the block skipping at the scale it is for."""
    boxes, counts, classes = coco_like_batch(2, seed=seed)
    problem = sparse_problem(boxes, counts, COCO_CANVAS, presets.get("retinanet_torchvision"), gt_classes=classes)
    assert_sparse_solve_matches(problem)


def test_sparse_solve_full_size_crowd_and_many_rows():
    """G = 200 against the dense CPU solve (tested against the reference above), and an
    ignore region over the whole canvas: 201,600 ignored rows, emitted by several threads."""
    config = presets.get("retinanet_mmdet").replace(**{"match.ignore_iof_thr": 0.5})
    boxes, counts, classes = coco_like_batch(1, seed=5, boxes_per_image=200)
    whole = torch.tensor([[0.0, 0.0, float(COCO_CANVAS[1]), float(COCO_CANVAS[0])]])
    before = torch.get_num_threads()
    try:
        for ignore, ignore_counts in ((torch.zeros(0, 4), [0]), (whole, [1])):
            problem = sparse_problem(
                boxes, counts, COCO_CANVAS, config, gt_classes=classes, ignore_boxes=ignore, ignore_counts=ignore_counts
            )
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert_sparse_equal(cpu.solve_sparse(problem), cpu.solve(problem).to_sparse())
    finally:
        torch.set_num_threads(before)
    assert cpu.solve_sparse(problem).ignored_anchors.numel() > 100_000  # emitted by two threads


def test_sparse_solve_never_builds_dense_targets(generator, monkeypatch):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 2], canvas)
    config = presets.get("retinanet_torchvision")
    expected = assign(boxes, counts, canvas, config, backend="cpu").to_sparse()
    monkeypatch.setattr(cpu, "solve", lambda problem: pytest.fail("the sparse path built dense targets"))
    assert_sparse_equal(assign_sparse(boxes, counts, canvas, config, backend="cpu"), expected)


def test_assign_sparse_on_cpu_equals_the_reference(generator):
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [6, 0, 17], canvas)
    classes = classes_for(boxes, generator)
    config = presets.get("retinanet_mmdet")
    ours = assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    ref = assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="reference")
    assert_sparse_equal(ours, ref, delta_tolerance=1e-6)


def _one_cpu_call(cache: Path | str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A fresh process's CPU assign call, with ``cache`` as its kernel cache."""
    code = (
        "import torch; from tritarget.kernels import assign, presets; "
        "assign(torch.tensor([[4.0, 4.0, 30.0, 40.0]]), [1], (64, 64), presets.get('retinanet_torchvision'), "
        "backend='cpu')"
    )
    env = {**os.environ, "TRITARGET_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("cache", [".", "./"])
def test_the_working_folder_as_the_cache(tmp_path, cache):
    """``TRITARGET_CACHE_DIR=.``: the library's path had no slash, so dlopen searched the
    system's folders for it, not this one; it was built, and never loaded."""
    done = _one_cpu_call(cache, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.glob("cpu_kernel-*.so"))) == 1


def test_kernel_is_built_once_into_the_cache(tmp_path):
    """A fresh cache gets one library on first use; a second process reuses it."""
    stamps = []
    for _ in range(2):
        done = _one_cpu_call(tmp_path)
        assert done.returncode == 0, done.stderr
        (library,) = tmp_path.glob("cpu_kernel-*.so")
        stamps.append(library.stat().st_mtime_ns)
    assert stamps[0] == stamps[1]


_FIRST_CALLS_AT_ONCE = """
import threading, torch
from tritarget.kernels import assign_sparse, presets
start = threading.Barrier(4)

def first_call():
    start.wait()
    assign_sparse(torch.tensor([[4.0, 4.0, 30.0, 40.0]]), [1], (64, 64), presets.get("retinanet_torchvision"),
                  backend="cpu")

threads = [threading.Thread(target=first_call) for _ in range(4)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
"""


def test_first_calls_at_once_on_a_fresh_cache_build_the_kernel_once(tmp_path):
    """Processes and threads making their first calls together (a loader's workers on a
    fresh machine) each compiled the kernel: 24 compilers for 3 processes of 8 threads (a
    helper's audit). They take turns on a lock file now: one build, every call answered."""
    log, cache = tmp_path / "builds", tmp_path / "cache"
    counting = tmp_path / "cc"
    counting.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo built >> "{log}";; esac\nexec {_compiler()} "$@"\n')
    counting.chmod(0o755)
    env = {**os.environ, "TRITARGET_CACHE_DIR": str(cache), "CC": str(counting)}
    processes = [subprocess.Popen([sys.executable, "-c", _FIRST_CALLS_AT_ONCE], env=env, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]  # fmt: skip
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    assert log.read_text().split() == ["built"]
    assert [path.name.split(".", 1)[1] for path in sorted(cache.iterdir())] == ["so", "so.lock"]


def test_a_compiler_that_refuses_march_native_builds_the_portable_kernel(tmp_path):
    """A compiler that does not take -march=native (some targets' clang and gcc): the
    kernel is built again without it, and computes what the reference does."""
    log = tmp_path / "compiler.log"
    compiler = tmp_path / "cc-without-native"
    compiler.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do [ "$arg" = -march=native ] && { echo "unsupported: $arg" >&2; exit 1; }; done\n'
        f'echo "$@" >> {log}\n'
        f'exec {_compiler()} "$@"\n'
    )
    compiler.chmod(0o755)
    code = (
        "import torch; from tritarget.kernels import assign, presets; "
        "args = (torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 8.0, 60.0, 30.0]]), [2], (64, 64), "
        "presets.get('retinanet_torchvision')); "
        "ours, ref = assign(*args, backend='cpu'), assign(*args, backend='reference'); "
        "assert torch.equal(ours.labels, ref.labels) and torch.equal(ours.matched_gt, ref.matched_gt)"
    )
    env = {**os.environ, "TRITARGET_CACHE_DIR": str(tmp_path / "cache"), "CC": str(compiler)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    builds = [line for line in log.read_text().splitlines() if "cpu_kernel.c" in line]
    assert len(builds) == 1 and "-O3" in builds[0].split() and "-march=native" not in builds[0]
    assert len(list((tmp_path / "cache").glob("cpu_kernel-*.so"))) == 1


def test_a_cached_file_that_is_not_the_kernel_is_built_again(tmp_path):
    """A loadable library without the kernel's functions under the cached name (a cache
    synced from elsewhere, a partial restore) failed every call with AttributeError."""
    assert _one_cpu_call(tmp_path).returncode == 0
    (library,) = tmp_path.glob("cpu_kernel-*.so")
    other = tmp_path / "other.c"
    other.write_text("int other(void) { return 1; }\n")
    subprocess.run([_compiler(), "-shared", "-fPIC", str(other), "-o", str(library)], check=True, timeout=120)
    foreign = library.read_bytes()
    done = _one_cpu_call(tmp_path)
    assert done.returncode == 0, done.stderr
    assert library.read_bytes() != foreign


@pytest.mark.parametrize("kept", [1000, 20000, 40])
def test_a_cached_kernel_cut_short_is_built_again(tmp_path, kept):
    """A cached library cut short (an interrupted copy into a shared cache) killed the
    process with SIGBUS in dlopen instead of being built again."""
    assert _one_cpu_call(tmp_path).returncode == 0
    (library,) = tmp_path.glob("cpu_kernel-*.so")
    whole = library.read_bytes()
    library.write_bytes(whole[:kept])
    done = _one_cpu_call(tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert len(library.read_bytes()) == len(whole)


def test_a_cached_kernel_damaged_inside_is_built_again(tmp_path):
    """Its length and ELF headers intact, its code zeroed (bit rot, a bad restore): dlopen
    ran the broken initialisers, and every process that loaded it died of SIGSEGV."""
    assert _one_cpu_call(tmp_path).returncode == 0
    (library,) = tmp_path.glob("cpu_kernel-*.so")
    whole = library.read_bytes()
    damaged = whole[:0x1000] + bytes(0x2000) + whole[0x3000:]
    library.write_bytes(damaged)
    done = _one_cpu_call(tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert library.read_bytes() != damaged and cpu_build._sealed(library)


def test_a_kernel_that_does_not_load_where_it_was_built_is_named(tmp_path, monkeypatch):
    """A cache folder mounted noexec: the library is built and fails to load; that ended
    in a bare OSError naming neither cause nor remedy."""
    monkeypatch.setenv("TRITARGET_CACHE_DIR", str(tmp_path))

    def refused(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(cpu_build, "CDLL", refused)  # what dlopen says on a noexec mount (root only here)
    cpu_build.load_library.cache_clear()
    try:
        with pytest.raises(CompileError, match=f"the CPU kernel built in {tmp_path} does not load .*noexec"):
            cpu_build.load_library()
    finally:
        cpu_build.load_library.cache_clear()


def test_a_read_only_cache_with_the_kernel_built_serves_it(tmp_path, monkeypatch):
    """A cache folder this process may not write (an image's, made for its users) but
    holding the kernel's build was passed over: the kernel was compiled again into the
    per-user temporary folder (a helper's audit). Its build is loaded as it is now."""
    cache, fallback = tmp_path / "cache", tmp_path / "fallback"
    assert _one_cpu_call(cache).returncode == 0
    fallback.mkdir()
    monkeypatch.setenv("TRITARGET_CACHE_DIR", str(cache))
    monkeypatch.setattr(cpu_build, "_writable_cache", lambda: fallback)  # what a read-only cache finds
    cpu_build.load_library.cache_clear()
    try:
        (built,) = cache.glob("cpu_kernel-*.so")
        assert cpu_build.load_library()._name == str(built)
    finally:
        cpu_build.load_library.cache_clear()
    assert list(fallback.iterdir()) == []


def test_the_temporary_cache_folder_must_be_this_users_own(tmp_path, monkeypatch):
    """With no writable cache folder the kernel goes to $TMPDIR/tritarget-<uid>, a name
    anyone can predict: on a shared /tmp another user could make it first and plant a
    library there, which was loaded and run. A folder others may write to, or a link,
    is refused."""
    monkeypatch.delenv("TRITARGET_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")  # no folder can be made there
    monkeypatch.setattr(cpu_build.tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"tritarget-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(CompileError, match="is another user's or writable by others"):
        cpu_build._writable_cache()
    folder.chmod(0o700)
    assert cpu_build._writable_cache() == folder
    folder.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CompileError, match=r"is not a folder of its own \(a link\?\)"):
        cpu_build._writable_cache()


def test_missing_compiler_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(CompileError, match="C compiler"):
        _compiler()


def test_the_default_cache_folder_is_tritarget_under_the_xdg_cache_or_dot_cache(tmp_path, monkeypatch):
    """Without ``$TRITARGET_CACHE_DIR``: ``$XDG_CACHE_HOME/tritarget``, else ``~/.cache/tritarget``,
    an empty variable counting as unset (the module docstring's promise; a mutation review:
    no test pinned either default)."""
    monkeypatch.setenv("TRITARGET_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_build.cache_dir() == tmp_path / "xdg" / "tritarget"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_build.cache_dir() == tmp_path / "home" / ".cache" / "tritarget"


def test_a_cache_folder_that_does_not_exist_yet_is_made_with_its_parents(tmp_path, monkeypatch):
    """``TRITARGET_CACHE_DIR`` naming a folder several levels below any that exists (a fresh
    home, a new volume): it is made and used, not passed over for the temporary folder."""
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("TRITARGET_CACHE_DIR", str(cache))
    assert cpu_build._writable_cache() == cache and cache.is_dir()


def _without_a_cache_folder(tmp_path, monkeypatch) -> Path:
    """No cache folder can be made (the tests above): the kernel goes to the temporary folder."""
    monkeypatch.delenv("TRITARGET_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")  # no folder can be made there
    monkeypatch.setattr(cpu_build.tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"tritarget-{os.getuid()}"


def test_the_temporary_cache_folder_is_made_private_whatever_the_umask(tmp_path, monkeypatch):
    """Made by this process, the temporary folder is its user's alone (0700) even under a
    umask of 0, and is then accepted."""
    folder = _without_a_cache_folder(tmp_path, monkeypatch)
    umask = os.umask(0)
    try:
        assert cpu_build._writable_cache() == folder
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_temporary_cache_folder_its_group_may_write_to_is_refused(tmp_path, monkeypatch):
    """Group-writable is writable by others too (a shared group on a shared /tmp)."""
    folder = _without_a_cache_folder(tmp_path, monkeypatch)
    folder.mkdir(mode=0o700)
    folder.chmod(0o770)
    with pytest.raises(CompileError, match="is another user's or writable by others"):
        cpu_build._writable_cache()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away takes root")
def test_a_temporary_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    """Another user's folder under the predictable name, private as it may be, is theirs:
    the library they could have put there would run as this user."""
    folder = _without_a_cache_folder(tmp_path, monkeypatch)
    folder.mkdir(mode=0o700)
    os.chown(folder, os.getuid() + 1, -1)
    with pytest.raises(CompileError, match="is another user's or writable by others"):
        cpu_build._writable_cache()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux's /proc/cpuinfo")
def test_the_cpu_signature_is_the_cpus_feature_flags():
    """-march=native code is keyed by the CPU's feature flags (x86's "flags", ARM's
    "Features" line), which tell another CPU sharing the cache (an NFS home) apart."""
    with open("/proc/cpuinfo") as info:
        lines = [line for line in info if line.startswith(("flags", "Features"))]
    if not lines:
        pytest.skip("no feature flags in /proc/cpuinfo here")
    assert cpu_build._cpu_signature() == lines[0]


def _loaded_name(monkeypatch, cache: Path, compiler: Path | None = None) -> str:
    """The library ``load_library`` loads from ``cache`` in this process (CC=``compiler``)."""
    monkeypatch.setenv("TRITARGET_CACHE_DIR", str(cache))
    if compiler is not None:
        monkeypatch.setenv("CC", str(compiler))
    cpu_build.load_library.cache_clear()
    try:
        return cpu_build.load_library()._name
    finally:
        cpu_build.load_library.cache_clear()


def test_another_cpu_sharing_the_cache_gets_a_build_of_its_own(tmp_path, monkeypatch):
    """The cache key holds the CPU's signature: a machine with other CPU features (what
    ``_cpu_signature`` reads on it) builds its own kernel beside this one's, never loads it."""
    here = _loaded_name(monkeypatch, tmp_path)
    monkeypatch.setattr(cpu_build, "_cpu_signature", lambda: "flags\t\t: fpu sse sse2 (another machine)\n")
    there = _loaded_name(monkeypatch, tmp_path)
    assert here != there and len(list(tmp_path.glob("cpu_kernel-*.so"))) == 2


def test_a_new_compiler_version_builds_the_kernel_again(tmp_path, monkeypatch):
    """The cache key holds the first line of ``$CC --version`` (name and release; the lines
    after it are the same copyright text from release to release): an upgraded compiler
    builds a kernel of its own."""
    names = []
    for version in ("1.0", "2.0"):
        compiler = tmp_path / f"cc-{version}"
        compiler.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = --version ] && {{ echo "cc (tritarget test) {version}"; echo "Copyright: the same"; exit 0; }}\n'
            f'exec {_compiler()} "$@"\n'
        )
        compiler.chmod(0o755)
        names.append(_loaded_name(monkeypatch, tmp_path / "cache", compiler))
    assert names[0] != names[1] and len(list((tmp_path / "cache").glob("cpu_kernel-*.so"))) == 2


def test_the_kernel_is_built_for_this_cpu_where_the_compiler_takes_it(tmp_path, monkeypatch):
    """-march=native first (AVX2 makes crowded images 3-5x faster); the portable build is
    only the second try, for a compiler that refuses it."""
    log, compiler = tmp_path / "compiler.log", tmp_path / "cc-logging"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {_compiler()} "$@"\n')
    compiler.chmod(0o755)
    _loaded_name(monkeypatch, tmp_path / "cache", compiler)
    builds = [line.split() for line in log.read_text().splitlines() if "cpu_kernel.c" in line]
    assert len(builds) == 1 and "-march=native" in builds[0] and "-O3" in builds[0]


def test_a_failed_build_names_its_command_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """A compiler that fails after writing part of its output: the error names the command
    and the compiler's message, and the cache keeps no half-written file."""
    compiler = tmp_path / "cc-failing"
    compiler.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "cc (failing) 1.0"; exit 0; }\n'
        'while [ $# -gt 0 ]; do [ "$1" = -o ] && echo half > "$2"; shift; done\n'
        'echo "cc: internal compiler error" >&2; exit 1\n'
    )
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    with pytest.raises(
        CompileError, match=r"building the CPU kernel failed: .*cpu_kernel\.c(.|\n)*internal compiler error"
    ):
        _loaded_name(monkeypatch, cache, compiler)
    assert [path.name.split(".", 1)[1] for path in cache.iterdir()] == ["so.lock"]


def test_a_file_of_only_a_seal_is_no_build(tmp_path):
    """The seal of an empty body alone (60 bytes: a file cut down to its last bytes) is no
    library: it is not taken for a sealed build, which a body of any length would be."""
    path = tmp_path / "cpu_kernel-0.so"
    path.write_bytes(cpu_build._SEAL + hashlib.sha256(b"").digest())
    assert not cpu_build._sealed(path)
    path.write_bytes(b"\x7fELF" + cpu_build._SEAL + hashlib.sha256(b"\x7fELF").digest())
    assert cpu_build._sealed(path)


# Peak resident memory of one call, measured in a fresh process so that nothing else
# this test session allocated hides it.
_PEAK_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from tritarget.kernels import assign, assign_sparse, presets
    from tritarget.kernels.workload import coco_like_batch

    backend, height, width, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    call = assign_sparse if sys.argv[5] == "sparse" else assign
    config = presets.get("retinanet_torchvision")
    boxes, counts, classes = coco_like_batch(1, seed=0, canvas=(height, width), boxes_per_image=count)
    small, small_counts, small_classes = coco_like_batch(1, seed=1, canvas=(height, width), boxes_per_image=2)
    # Warm up: anchors, the compiled kernel, torch's allocator.
    call(small, small_counts, (height, width), config, gt_classes=small_classes, backend=backend)

    def peak_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak to the current resident size
    except OSError:
        print(json.dumps({"growth": None, "anchors": 0}))
        sys.exit(0)
    before = peak_kib()
    targets = call(boxes, counts, (height, width), config, gt_classes=classes, backend=backend)
    print(json.dumps({"growth": (peak_kib() - before) * 1024, "anchors": targets.num_anchors}))
    """
)


def peak_growth(backend: str, canvas: tuple[int, int], count: int, form: str = "dense") -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, backend, str(canvas[0]), str(canvas[1]), str(count), form],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["growth"] is None:
        pytest.skip("cannot reset the peak resident size here (/proc/self/clear_refs)")
    return result["growth"], result["anchors"]


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")


@needs_proc
def test_memory_is_flat_in_the_number_of_boxes():
    """G = 1000 at full RetinaNet size: a [G, A] float32 matrix alone would be 806 MB."""
    growth, anchors = peak_growth("cpu", COCO_CANVAS, 1000)
    matrix = 1000 * anchors * 4
    outputs = anchors * (1 + 4 + 16 + 4 + 4)  # labels, matched, deltas, classes, max IoU
    assert growth < outputs + 32 * 2**20, f"peak grew by {growth / 2**20:.0f} MiB ([G, A] is {matrix / 2**20:.0f} MiB)"


@needs_proc
def test_sparse_call_never_touches_dense_sized_memory():
    """assign_sparse at full RetinaNet size, G = 1000: its scratch and rows grow the peak far
    less than the dense outputs alone (25 bytes per anchor: 5 MB) would."""
    growth, anchors = peak_growth("cpu", COCO_CANVAS, 1000, form="sparse")
    assert growth < anchors * 25 / 4, f"peak grew by {growth / 2**20:.1f} MiB"


@needs_proc
def test_memory_probe_catches_a_g_by_a_matrix():
    """The same probe on the reference (quarter canvas, to stay quick) sees its matrix."""
    growth, anchors = peak_growth("reference", (400, 672), 1000)
    assert growth > 1000 * anchors * 4


_FAULTS_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from tritarget.kernels import TargetConfig, assign, keep_freed_memory, presets
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.set_num_threads(1)
    boxes, counts = torch.tensor([[10.0, 10.0, 200.0, 150.0]] * 16), [1] * 16
    preset = presets.get("retinanet_torchvision").to_dict()
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assign(boxes, counts, (800, 1344), TargetConfig.from_dict(preset), backend="cpu")
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_serves_dense_batches_without_page_faults():
    """16 dense images are 80 MB of outputs, one tensor of 51 MB: above glibc's mmap
    threshold, so by default every call maps them anew and faults every page in. With
    freed memory kept, the heap reaches its steady size within the first 4 calls and then
    faults nothing, even with a new config object on each call (nothing the call caches
    may be left in the middle of the freed outputs). The outputs allocated smallest first,
    it grew for up to ~10 calls (3 runs in 8 here; in CI once past the 12th)."""
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _FAULTS_PROBE, mode], capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        faults[mode] = sorted(json.loads(done.stdout.strip().splitlines()[-1])[6:])  # the last 6 calls
    assert faults["keep"][3] <= 5, faults  # the median call
    assert faults["default"][3] > 20, faults  # even in 2 MB pages, 80 MB is 40 faults


_ARENAS_PROBE = textwrap.dedent(
    """
    import ctypes, os, sys, threading
    from tritarget.kernels import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory() is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    start = threading.Barrier(8)

    def allocate():  # threads allocating at once: by default glibc gives them arenas of their own
        start.wait()
        blocks = [libc.malloc(4096) for _ in range(200)]
        start.wait()
        for block in blocks:
            libc.free(block)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
    stream = libc.fopen(sys.argv[2].encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_keeps_one_arena_for_every_thread(tmp_path):
    """One arena: memory a thread frees is reused by whichever thread allocates next (a
    pool's threads, the server's), where glibc's default gives threads allocating at once
    arenas of their own, each keeping its own peak (a mutation review: 2 arenas, or the
    option number of M_ARENA_TEST instead of M_ARENA_MAX, passed every test)."""
    heaps = {}
    for mode in ("default", "keep"):
        report = tmp_path / f"{mode}.xml"
        done = subprocess.run([sys.executable, "-c", _ARENAS_PROBE, mode, str(report)], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        heaps[mode] = report.read_text().count("<heap nr=")  # malloc_info: one <heap> per arena
    assert heaps["keep"] == 1 and heaps["default"] > 1, heaps


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8])
def test_classes_of_any_integer_dtype(generator, dtype):
    """Classes come back int32 whatever integer dtype they came in: int64 (torchvision's,
    detectron2's and mmdet's labels) is read as given, without a conversion per call (a
    class beyond int32 is refused first: ``test_bad_input``); the others are converted.
    Dense and sparse equal the int32 classes' targets on both backends."""
    canvas = (120, 150)
    boxes, counts = random_batch(generator, [5, 0, 7], canvas)
    classes = torch.randint(0, 200, (boxes.shape[0],), generator=generator)
    given = classes.to(dtype)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    for backend in ("reference", "cpu"):
        want = assign(boxes, counts, canvas, config, gt_classes=classes.to(torch.int32), backend=backend)
        got = assign(boxes, counts, canvas, config, gt_classes=given, backend=backend)
        assert got.classes.dtype == torch.int32 and torch.equal(got.classes, want.classes), backend
        sparse = assign_sparse(boxes, counts, canvas, config, gt_classes=given, backend=backend)
        assert torch.equal(sparse.positive_classes, want.to_sparse().positive_classes), backend
    assert (want.labels == 1).sum() > 0  # some anchor took a class


def test_large_anchor_sets_are_kept_by_their_bytes(monkeypatch, generator):
    """The anchor caches keep 16 sets each: above a million anchors (a server's 8192 x 8192
    canvas: 200 MB per set) they would let a few small requests pin gigabytes, so such sets
    are kept apart while together they take at most ``_LARGE_SETS_BYTES``, the least
    recently used out first, and a set larger than that is built per call (every one was,
    which cost a one-image call on 1.1M anchors 13 ms instead of 0.23). The targets do not
    change."""
    from tritarget.kernels import anchors as anchor_module

    config, cpu = presets.get("retinanet_torchvision"), torch.device("cpu")
    canvases = [(96, 128), (96, 136), (104, 128)]
    size = {c: anchor_module.resolve_grid(config.anchors, c).num_anchors * 16 for c in canvases}
    monkeypatch.setattr(anchor_module, "_CACHED_ANCHORS_MAX", 0)  # every set is a large one
    monkeypatch.setattr(anchor_module, "_BY_IDENTITY", {})
    monkeypatch.setattr(anchor_module, "_LARGE_SETS", anchor_module._LargeSets())
    monkeypatch.setattr(anchor_module, "_LARGE_SETS_BYTES", sum(size.values()) - 1)  # not all three

    def anchors_of(canvas):
        return anchor_module.grid_and_anchors(config.anchors, canvas, cpu)[1]

    first, second = anchors_of(canvases[0]), anchors_of(canvases[1])
    assert anchors_of(canvases[0]) is first and anchors_of(canvases[1]) is second
    assert anchors_of(canvases[0]) is first  # now the most recently used
    anchors_of(canvases[2])  # the second one, least recently used, makes room
    assert anchors_of(canvases[0]) is first
    again = anchors_of(canvases[1])
    assert again is not second and torch.equal(again, second)

    monkeypatch.setattr(anchor_module, "_LARGE_SETS", anchor_module._LargeSets())
    monkeypatch.setattr(anchor_module, "_LARGE_SETS_BYTES", size[canvases[0]] - 1)  # too large to keep
    built = anchors_of(canvases[0])
    assert anchors_of(canvases[0]) is not built and torch.equal(anchors_of(canvases[0]), first)
    boxes, counts = random_batch(generator, [4, 0, 7], canvases[0])
    expected = assign(boxes, counts, canvases[0], config, backend="reference")
    assert_targets_equal(assign(boxes, counts, canvases[0], config, backend="cpu"), expected)


def _large_set_in_child(canvas, connection) -> None:
    from tritarget.kernels import anchors as anchor_module

    connection.send(anchor_module.grid_and_anchors(presets.get("retinanet_torchvision").anchors, canvas,
                                                   torch.device("cpu"))[1].shape[0])  # fmt: skip


def test_a_child_forked_while_a_parent_thread_keeps_a_large_anchor_set_is_not_stuck(monkeypatch):
    """Another thread of the parent holds the large anchor sets' lock at the fork (held
    here by the test itself): the child must not wait for it forever."""
    from tritarget.kernels import anchors as anchor_module

    monkeypatch.setattr(anchor_module, "_CACHED_ANCHORS_MAX", 0)  # every set is a large one
    monkeypatch.setattr(anchor_module, "_BY_IDENTITY", {})
    canvas = (96, 128)
    count = anchor_module.resolve_grid(presets.get("retinanet_torchvision").anchors, canvas).num_anchors
    with anchor_module._LARGE_SETS._lock:
        got, _ = _in_forked_child(_large_set_in_child, canvas, wait_s=30)
    assert got == count, "the forked child did not answer within 30 s"


@pytest.mark.parametrize(("preset", "positives"), [("retinanet_torchvision", [0, 512]), ("ssd300_torchvision", [0])])
def test_explicit_anchors_of_subnormal_area_keep_their_ties(preset, positives):
    """A box of area 2^-149 inside two equal anchors of area 2^-125: its IoU with them
    (~6e-8) is its best, so torchvision's low-quality rule lifts both and ssd_forced
    picks the lower. The kernel's skip bound multiplied its 1.001 slack into an intersection
    a few subnormal ulps small, where it rounded away: the bound fell an ulp short of the
    IoU, and the blocks holding the box's best were skipped."""
    tiny = [0.0, 0.0, 2.0**-62, 2.0**-63]
    anchors = torch.tensor([tiny] + [[100.0, 100.0, 101.0, 101.0]] * 511 + [tiny])
    box = torch.tensor([[0.0, 0.0, 2.0**-75, 2.0**-74]])
    config, canvas = presets.get(preset), (300, 300)
    want = assign(box, [1], canvas, config, anchors=anchors, backend="reference")
    assert torch.nonzero(want.labels[0] == 1).flatten().tolist() == positives
    assert_targets_equal(assign(box, [1], canvas, config, anchors=anchors, backend="cpu"), want, rtol=1e-6, atol=1e-6)
    sparse = assign_sparse(box, [1], canvas, config, anchors=anchors, backend="cpu")
    assert sparse.positive_anchors.tolist() == positives


def test_an_anchor_past_float32_inside_a_crowd_region_is_ignored_and_a_region_that_far_refused():
    """An anchor and a region of areas past float32's range had IoF inf / inf = NaN (the
    reference's max over the regions spread it and kept the anchor; every backend asks
    whether any region holds it). Crowd regions now stay within 2**31 pixels, so only the
    anchor's area may overflow: the region's IoF is finite, and the anchor is ignored."""
    match = replace(presets.get("retinanet_mmdet").match, ignore_iof_thr=0.5, ignore_iof_wrt_anchor=False,
                    low_quality="none")  # fmt: skip
    config = replace(presets.get("retinanet_mmdet"), match=match)
    anchors = torch.tensor([[0.0, 0.0, 3e38, 3e38]])
    reach = 2.0**31 - 128  # the farthest float32 inside the bound
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    for backend in ("reference", "cpu", *(["triton"] if triton_runs_here() else [])):
        for ignore in ([[0.0, 0.0, reach, reach], [0.0, 0.0, 20.0, 20.0]], [[0.0, 0.0, reach, reach]]):
            got = on_device(assign, box, [1], (64, 64), config, anchors=anchors, ignore_boxes=torch.tensor(ignore),
                            ignore_counts=[len(ignore)], backend=backend)  # fmt: skip
            assert got.labels.tolist() == [[-1]], (backend, ignore)
        with pytest.raises(ValueError, match=r"ignore_boxes: image 0, box 0: reaches beyond ±2147483648 pixels"):
            on_device(assign, box, [1], (64, 64), config, anchors=anchors, ignore_boxes=anchors, ignore_counts=[1],
                      backend=backend)  # fmt: skip


def test_anchors_a_caller_edits_in_place_change_no_later_call():
    """generate_anchors handed out the tensor assign caches: shifting or clipping it in
    place changed every later call, and the cpu backend (its block bounds cached) then
    disagreed with the reference."""
    config, canvas = presets.get("retinanet_torchvision"), (128, 128)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 60.0, 120.0, 127.0]])
    before = assign(boxes, [2], canvas, config, backend="reference")
    anchors = generate_anchors(config.anchors, canvas)
    anchors[:, [0, 2]] += 40.0
    anchors.clamp_(0, 100)
    assert not torch.equal(anchors, generate_anchors(config.anchors, canvas))
    for backend in ("reference", "cpu"):
        after = assign(boxes, [2], canvas, config, backend=backend)
        assert torch.equal(after.labels, before.labels) and torch.equal(after.matched_gt, before.matched_gt), backend


def test_max_iou_comes_back_only_when_asked(generator):
    """Without ``return_max_iou`` the targets hold no best IoU (None, as the reference's); with it,
    each anchor's best IoU equals the reference's."""
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [4, 0, 6], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    assert assign(boxes, counts, canvas, config, backend="cpu").max_iou is None
    got = assign(boxes, counts, canvas, config, backend="cpu", return_max_iou=True)
    want = assign(boxes, counts, canvas, config, backend="reference", return_max_iou=True)
    assert torch.equal(got.max_iou, want.max_iou)


def test_dense_and_sparse_targets_carry_the_configs_background_class(generator):
    """A background class other than 0 (mmdet's is the number of classes) is written to the
    negatives' classes and carried by both forms, so that densifying the sparse form fills it in."""
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 0, 3], canvas)
    classes = classes_for(boxes, generator)
    config = TargetConfig(anchors=SMALL_ANCHORS, background_class=80)
    dense = assign(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    sparse = assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    assert dense.background_class == sparse.background_class == 80
    assert bool((dense.classes[dense.labels == 0] == 80).all())
    assert torch.equal(sparse.to_dense().classes, dense.classes)


def test_explicit_anchors_given_other_data_of_the_same_count_are_read_anew(generator):
    """``.data =`` with as many anchors leaves the version counter and the count as they were,
    and the old data may still be alive elsewhere: the cached kernel arguments must follow the
    new address, not read the old anchors."""
    canvas = (120, 150)
    boxes, counts = random_batch(generator, [6], canvas)
    config = TargetConfig(anchors=SMALL_ANCHORS)
    anchors, _ = random_batch(generator, [700], canvas, min_size=4.0)
    old = anchors.data  # keeps the old data alive and unchanged
    assign_sparse(boxes, counts, canvas, config, anchors=anchors, backend="cpu")
    version = anchors._version
    anchors.data = boxes[torch.arange(700) % boxes.shape[0]] + torch.rand(700, 1, generator=generator)
    assert anchors._version == version and not torch.equal(anchors, old)
    for function in (assign, assign_sparse):
        got = function(boxes, counts, canvas, config, anchors=anchors, backend="cpu")
        want = function(boxes, counts, canvas, config, anchors=anchors, backend="reference")
        assert_sparse_equal(*(t if function is assign_sparse else t.to_sparse() for t in (got, want)),
                            delta_tolerance=1e-6)  # fmt: skip


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_explicit_anchors_written_where_no_counter_sees_it_are_read_anew(write):
    """A write through ``.data`` or a numpy view moves neither the version counter, the
    address nor the count: bounds cached by those skipped the block the anchors had moved
    into (0 positives where the reference found 10, no error; a helper's audit). Explicit
    anchors' bounds are computed on each call now."""
    config = presets.get("retinanet_torchvision")
    corners = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0)) * 200
    anchors, boxes = torch.cat([corners, corners + 20], 1), torch.tensor([[300.0, 300.0, 330.0, 330.0]])
    assert int((assign(boxes, [1], (400, 400), config, anchors=anchors, backend="cpu").labels == 1).sum()) == 0
    if write == "data":
        anchors.data.add_(300.0)
    else:
        anchors.numpy()[:] += 300.0
    got = assign(boxes, [1], (400, 400), config, anchors=anchors, backend="cpu")
    want = assign(boxes, [1], (400, 400), config, anchors=anchors, backend="reference")
    assert int((want.labels == 1).sum()) == 10
    assert_targets_equal(got, want)


def test_configs_of_past_calls_are_not_kept_alive(generator):
    """The kernel arguments are cached for a few recent (config, anchors) pairs only: a config
    made per call (``presets.get``, ``from_dict``) is released once later calls pushed it out."""
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3], canvas)
    first = TargetConfig(anchors=SMALL_ANCHORS)
    assign(boxes, counts, canvas, first, backend="cpu")
    released = weakref.ref(first)
    del first
    for step in range(20):
        assign(boxes, counts, canvas, TargetConfig(anchors=SMALL_ANCHORS, match=MatchConfig(high=0.5 + step / 100)),
               backend="cpu")  # fmt: skip
    gc.collect()
    assert released() is None


def test_alternating_canvases_compute_each_ones_bounds_once(generator, monkeypatch):
    """Multi-scale training alternates among a few canvases (one generated anchor set each):
    their blocks' bounds stay cached side by side, not recomputed on every switch."""
    config = TargetConfig(anchors=SMALL_ANCHORS)
    canvases = [(64, 96), (97, 131), (120, 150)]
    batches = {canvas: random_batch(generator, [4, 2], canvas) for canvas in canvases}
    for canvas in canvases:
        assign(*batches[canvas], canvas, config, backend="cpu")
    computed, compute = [], cpu._compute_bounds
    monkeypatch.setattr(cpu, "_compute_bounds", lambda anchors: computed.append(anchors) or compute(anchors))
    for _ in range(2):
        for canvas in canvases:
            got = assign(*batches[canvas], canvas, config, backend="cpu")
            assert_targets_equal(got, assign(*batches[canvas], canvas, config, backend="reference"))
    assert computed == []


def test_a_problem_whose_tensors_are_not_on_the_cpu_is_refused_by_name():
    """The kernel reads host pointers: boxes on another device are named, never read."""
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0]])
    problem, _ = build_problem(boxes, [2], (64, 96), TargetConfig(anchors=SMALL_ANCHORS))
    elsewhere = replace(problem, gt_boxes=problem.gt_boxes.to("meta"))
    for function in (cpu.solve, cpu.solve_sparse):
        with pytest.raises(ValueError, match="the cpu backend needs CPU tensors, got tensors on meta"):
            function(elsewhere)
