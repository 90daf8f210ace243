"""The triton backend against the reference (DESIGN §5).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), on small canvases; with a GPU the same tests run compiled, and
the ``gpu`` tests add full-size parity and out-of-memory checks.

Labels, matched indices, classes and max IoU must equal the reference exactly; deltas
within ``triton_support.TOL``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import (
    IOF_AT_THRESHOLD,
    assert_targets_equal,
    compile_keys,
    modes,
    random_batch,
    random_boxes,
    record_launches,
    with_ties,
)
from tritarget.kernels import SparseTargets, TargetConfig, Targets, assign, presets, reference
from tritarget.kernels.anchors import generate_anchors, resolve_grid
from tritarget.kernels.boxes import box_area, box_iou
from tritarget.kernels.config import AnchorConfig, AnchorLevel, MatchConfig
from tritarget.kernels.problem import CheckBoxesFirst, build_problem
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tritarget.kernels import triton_assign, triton_backend  # noqa: E402
from triton_support import DEVICE, HAS_CUDA, TOL, gpu  # noqa: E402

MODES = ("none", "torchvision", "detectron2", "mmdet", "ssd_forced")
# Small canvases, including odd sizes whose feature maps round up.
CANVASES = ((64, 96), (97, 131), (160, 224))


def _dense_config(name: str) -> TargetConfig:
    """A preset without sampling: the backends are compared before sampling."""
    return presets.get(name).replace(**{"match.sample_size": 0})


def assert_sparse_equal(ours: SparseTargets, ref: SparseTargets) -> None:
    assert ours.num_anchors == ref.num_anchors
    assert ours.background_class == ref.background_class
    for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "ignored_offsets", "ignored_anchors",
                 "positive_classes"):  # fmt: skip
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), f"{name}: present in only one result"
        if a is not None:
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a.tolist()[:16]} != {b.tolist()[:16]}"
    assert ours.positive_deltas.dtype == ref.positive_deltas.dtype
    # Compacted from the same dense deltas: exactly equal.
    assert torch.equal(ours.positive_deltas.cpu(), ref.positive_deltas.cpu())


def check(boxes, counts, canvas, config, *, sparse=False, **kwargs) -> Targets:
    """Solve one batch with both backends; compare dense (and sparse) targets.

    Snapping boxes to a grid for ties may push one off the canvas: it is dropped, the
    same for both backends.
    """
    extra = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, drop_invalid=True, **extra)
    ours = triton_backend.solve(problem)
    ref = reference.solve(problem)
    assert_targets_equal(ours, ref, rtol=TOL, atol=TOL)
    assert ours.labels.device == problem.device
    assert (ours.max_iou is not None) == problem.want_max_iou  # only when asked (B x A floats)
    if sparse:
        assert_sparse_equal(triton_backend.solve_sparse(problem), ours.to_sparse())
    return ours


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_matches_reference(name, generator):
    canvas = CANVASES[len(name) % len(CANVASES)]
    boxes, counts = random_batch(generator, [0, 1, 6, 13], canvas)
    boxes[7:] = with_ties(boxes[7:], generator)  # the 13-box image has exact duplicates
    classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    check(boxes, counts, canvas, _dense_config(name), gt_classes=classes, want_max_iou=True, sparse=True)


def test_int64_classes_give_the_int32_classes_targets(generator):
    """int64 classes (torchvision's labels) reach the kernels as int32: the same targets."""
    from tritarget.kernels import assign_sparse

    canvas = CANVASES[0]
    boxes, counts = random_batch(generator, [3, 0, 6], canvas)
    classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator).to(DEVICE)
    boxes, config = boxes.to(DEVICE), _dense_config("retinanet_torchvision")
    want = assign(boxes, counts, canvas, config, gt_classes=classes.int(), backend="triton")
    got = assign(boxes, counts, canvas, config, gt_classes=classes, backend="triton")
    assert got.classes.dtype == torch.int32 and torch.equal(got.classes, want.classes)
    sparse = assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="triton")
    assert torch.equal(sparse.positive_classes, want.to_sparse().positive_classes)
    assert sparse.positive_classes.numel() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strict_high, min_pos_iou", [(False, 0.0), (True, 0.3)])
def test_every_mode_with_ties_and_crowds(mode, strict_high, min_pos_iou, generator):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 0, 24, 70], canvas)
    boxes = with_ties(boxes, generator)  # a coarse grid: many equal IoUs, many duplicates
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.low_quality": mode, "match.strict_high": strict_high, "match.min_pos_iou": min_pos_iou,
           "match.high": 0.5, "match.low": 0.3}
    )  # fmt: skip
    check(boxes, counts, canvas, config, sparse=mode in ("detectron2", "mmdet"))


@pytest.mark.parametrize("mode", ("torchvision", "mmdet", "ssd_forced"))
def test_crowded_image(mode, generator):
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [200, 3], canvas, max_frac=0.3)
    boxes[:100] = with_ties(boxes[:100], generator)
    config = _dense_config("retinanet_mmdet").replace(**{"match.low_quality": mode})
    check(boxes, counts, canvas, config, want_max_iou=True)


@pytest.mark.parametrize("matching", ["gather", "walk"])
def test_a_config_of_thousands_of_anchor_shapes(matching, monkeypatch, generator):
    """ssd_forced finds each box's rectangle of cells per anchor shape in [rows, shapes]
    tiles: 4,224 shapes (2 levels of 64 sizes x 33 ratios, within a config's limits) in
    one tile was past Triton's largest block (interpreted: 'numel (2097152) exceeds triton
    maximum tensor numel'); now tiles of at most 1,024 shapes, in as many programs as the
    shapes take (the walk's pairs lie in every shape's rectangles). (Without the threshold
    pruning, whose loop over every shape takes the interpreter half a minute.)"""
    monkeypatch.setattr(triton_backend, "_INTERPRETED", dataclasses.replace(triton_backend._INTERPRETED,
                                                                            threshold_prune=False,
                                                                            matching=matching))  # fmt: skip
    levels = tuple(AnchorLevel(stride=8 * 2**i, sizes=tuple(16.0 + 4 * j for j in range(64)),
                               aspect_ratios=tuple(0.5 + 0.02 * j for j in range(33))) for i in range(2))  # fmt: skip
    config = _dense_config("retinanet_torchvision").replace(
        **{"anchors.levels": levels, "match.low_quality": "ssd_forced"}
    )
    boxes, counts = random_batch(generator, [3, 2], (16, 16), max_frac=0.6)
    assert check(boxes, counts, (16, 16), config).labels.eq(1).any()


def _recorded_launches(monkeypatch, kernel: str, option: str) -> list:
    """The triton backend's ``kernel`` wrapped: the list gets each launch's ``option``
    keyword as it is launched."""
    launched = []
    original = getattr(triton_backend, kernel)

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs.get(option))
                return original[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_backend, kernel, Recording())
    return launched


def _pair_launches(monkeypatch, option: str, **meta) -> list:
    """Solve by the pair walk with the GPU's launch parameters changed by ``meta``
    (interpreted or compiled); the list gets each pair-kernel launch's ``option`` as it
    is launched."""
    launched = _recorded_launches(monkeypatch, "pairs_kernel", option)
    changed = dataclasses.replace(triton_backend._COMPILED, **{"matching": "walk", **meta})
    monkeypatch.setattr(triton_backend, "_INTERPRETED", changed)
    monkeypatch.setattr(triton_backend, "_COMPILED", changed)
    return launched


def test_scatter_without_precheck(monkeypatch, generator):
    """``scatter_precheck=False`` (every overlapping pair sends its atomics, unread: what
    the H200 sweeps of run6-run10 timed against the walk's default) reaches the scatter launch and gives the
    same targets, ties to the lowest box and low-quality matches included, over chunks
    inside one rectangle and chunks across many (the GPU's 256-pair chunks)."""
    launched = _pair_launches(monkeypatch, "PRECHECK", scatter_precheck=False, pair_programs=3)
    canvas = (160, 192)
    boxes, counts = random_batch(generator, [40, 0, 6], canvas, max_frac=0.2)
    boxes[:20] = with_ties(boxes[:20], generator)
    boxes[-1] = torch.tensor([1.0, 2.0, 190.0, 158.0])  # ~480 pairs per stride-8 shape: whole chunks inside
    check(boxes, counts, canvas, _dense_config("retinanet_mmdet"), want_max_iou=True)
    assert launched == [False, None]  # scatter without the pre-check; the lift has none


@pytest.mark.parametrize("mode", MODES)
def test_gpu_block_sizes(mode, monkeypatch, generator):
    """The GPU's small blocks and many pair programs, under the interpreter: chunks of
    128 pairs span many small rectangles (lanes of several boxes and images in one
    chunk), long rectangles span many chunks and programs, and most anchors have no
    overlapping box at all -- all must give the same targets.

    Image 1's boxes sit in the left quarter (detectron2 still reports box 0 as the
    argmax of anchors far from them). Image 0's boxes sit in the right half, and an
    ignore region around its box 0 takes out every anchor that box touches: its best
    IoU is 0, so it lifts nothing, in any mode. Image 1 has five ignore regions in its
    right half (more than one tile of the finalize's ignore loop). The sparse form
    (finalize's blocks with nothing to list stop early) is checked in two modes.
    """
    monkeypatch.setattr(triton_backend, "_INTERPRETED", triton_backend._COMPILED)
    canvas = (64, 512)  # wide: a block of 128 anchors covers a short stretch of a row
    boxes, counts = random_batch(generator, [4, 13], canvas, max_frac=0.1)
    boxes[:4, 0::2] = boxes[:4, 0::2].clamp(min=0) / 2 + 256  # image 0: right half
    boxes[4:] = with_ties(boxes[4:], generator)
    boxes[4:, 0::2] = boxes[4:, 0::2].clamp(min=0) / 4  # image 1: left quarter, zero IoU elsewhere
    regions = torch.tensor([[256.0 + 48 * i, 4.0 * i, 300.0 + 48 * i, 40.0 + 4 * i] for i in range(5)])
    ignore = torch.cat([boxes[:1] + torch.tensor([-1.0, -1.0, 1.0, 1.0]), regions])
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.low_quality": mode, "match.ignore_iof_thr": 1e-6, "match.ignore_iof_wrt_anchor": False}
    )
    ours = check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=[1, 5], want_max_iou=True,
                 sparse=mode in ("torchvision", "ssd_forced"))  # fmt: skip
    assert not ((ours.labels[0] == 1) & (ours.matched_gt[0] == 0)).any()


@triton.jit(do_not_specialize=["num_segments"])
def _segment_searches(prefix_ptr, first_ptr, last_ptr, at_ptr, found_ptr, num_segments, BLOCK: tl.constexpr):
    """Program i: the segment holding pair first[i] (``_segment_at``), then from it the
    last segment starting at or before pair last[i] (``_last_segment``). ``num_segments``
    is a runtime value, as in ``pairs_kernel``: specialised to the constant 1, the kernel
    crashes Triton 3.6's coalesce pass (an assertion in LLVM; 3.9 compiles it)."""
    i = tl.program_id(0)
    seg = triton_assign._segment_at(prefix_ptr, tl.load(first_ptr + i), num_segments, BLOCK)
    tl.store(at_ptr + i, seg)
    last = triton_assign._last_segment(prefix_ptr, seg, tl.load(prefix_ptr + seg + 1), tl.load(last_ptr + i),
                                       num_segments)  # fmt: skip
    tl.store(found_ptr + i, last)


@pytest.mark.parametrize("block", [2, 16, 256])
def test_segment_searches(block):
    """The pair walk's two searches over the pairs' prefix sums equal torch's
    searchsorted (interpreted here, compiled on a GPU): across runs of empty segments
    (equal prefix entries), rectangles far longer than a chunk, chunks spanning more
    than one 32-segment window, and the start search over more segments than its
    fan-out (several steps)."""
    rng = torch.Generator().manual_seed(7)
    for num_segments in (1, 2, 31, 33, 100, 1000, 3000):
        pairs = torch.randint(1, 9, (num_segments,), generator=rng)
        pairs[torch.rand(num_segments, generator=rng) < 0.6] = 0  # many empty segments
        pairs[torch.randint(num_segments, (3,), generator=rng)] = 700  # long rectangles
        pairs[0] = max(int(pairs[0]), 1)
        prefix = torch.cat([torch.zeros(1, dtype=torch.int64), pairs.cumsum(0)])
        total = int(prefix[-1])
        first = torch.randint(total, (40,), generator=rng)
        span = torch.randint(0, 400, (40,), generator=rng)
        last = torch.minimum(first + span, torch.tensor(total - 1))
        at = torch.empty(40, dtype=torch.int64, device=DEVICE)
        found = torch.empty_like(at)
        _segment_searches[(40,)](prefix.to(DEVICE), first.to(DEVICE), last.to(DEVICE), at, found, num_segments,
                                 BLOCK=block)  # fmt: skip
        at, found, starts = at.cpu(), found.cpu(), prefix[:-1]
        assert torch.equal(at, torch.searchsorted(starts, first, right=True) - 1), num_segments
        assert torch.equal(found, torch.searchsorted(starts, last, right=True) - 1), num_segments
        assert (found - at).max() > 32 or num_segments < 100  # the window loop runs more than once


@triton.jit
def _start_order(block_ptr, image_ptr, HEAVY_FIRST: tl.constexpr):
    """Each program writes the block and image it takes (``_program_block``) at the place
    of its start: the GPU starts programs in the order of their index, axis 0 fastest."""
    block, image, num_blocks, batch = triton_assign._program_block(HEAVY_FIRST)
    start = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(block_ptr + start, block)
    tl.store(image_ptr + start, image)
    tl.store(block_ptr + num_blocks * batch, num_blocks)
    tl.store(image_ptr + num_blocks * batch, batch)


@pytest.mark.parametrize("blocks, batch", [(1, 1), (7, 1), (1, 5), (13, 4)])
def test_programs_start_with_every_images_last_block(blocks, batch):
    """Heavy first, the programs take every image's last block (the coarsest anchors, the
    most boxes), then every image's last but one, down to the first blocks; in the grid's
    own order, an image's blocks in turn. Every (block, image) once either way."""
    for heavy_first, grid in ((True, (batch, blocks)), (False, (blocks, batch))):
        block = torch.full((blocks * batch + 1,), -1, dtype=torch.int32, device=DEVICE)
        image = torch.full((blocks * batch + 1,), -1, dtype=torch.int64, device=DEVICE)
        _start_order[grid](block, image, HEAVY_FIRST=heavy_first)
        assert (int(block[-1]), int(image[-1])) == (blocks, batch)  # the sizes it reads off the grid
        started = list(zip(block[:-1].tolist(), image[:-1].tolist()))
        if heavy_first:
            assert started == [(b, i) for b in reversed(range(blocks)) for i in range(batch)]
        else:
            assert started == [(b, i) for i in range(batch) for b in range(blocks)]


@pytest.mark.parametrize("asked", [True, False])
def test_an_image_of_more_blocks_than_a_grid_axis_holds_runs_in_grid_order(asked, monkeypatch):
    """Heavy first, the blocks lie on grid axis 1, which CUDA holds to 65,535 programs: an
    image of more blocks runs in the grid's own order, its blocks on axis 0; and so does
    every image where the grid's order is asked for (``heavy_first`` False)."""
    for name in ("_INTERPRETED", "_COMPILED"):
        changed = dataclasses.replace(getattr(triton_backend, name), block_a=1, heavy_first=asked)
        monkeypatch.setattr(triton_backend, name, changed)
    config = _dense_config("retinanet_torchvision")
    for anchors, heavy_first in ((65_535, asked), (65_536, False)):
        boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=DEVICE).expand(anchors, 4)  # compiled: CUDA tensors only
        problem, _ = build_problem(torch.zeros(0, 4, device=DEVICE), [0, 0], (64, 96), config, anchors=boxes)
        launch = triton_backend._Launch(problem)
        assert launch.heavy_first is heavy_first
        assert launch.block_grid == ((2, anchors) if heavy_first else (anchors, 2))


@pytest.mark.parametrize("batch", [1, 4, 9])
@pytest.mark.parametrize("flag", [0, 1])
def test_scan_lays_blocks_and_images_end_to_end(batch, flag, generator):
    """scan_kernel with 4-entry steps (7 blocks per image: two steps; up to 9 images:
    three): each block's first rows within its image, and each image's first rows and
    the invalid-box flag beside the totals, which the last program to finish writes
    into uninitialised offsets after counting every program done."""
    num_blocks = 7
    counts = torch.randint(0, 5, (batch * num_blocks, 2), generator=generator, dtype=torch.int32)
    counts[: num_blocks // 2] = 0  # a stretch of empty blocks
    starts = torch.full((batch * num_blocks, 2), -1, dtype=torch.int64, device=DEVICE)
    totals = torch.empty(2, batch, dtype=torch.int64, device=DEVICE)
    offsets = torch.full((3, batch + 1), -7, dtype=torch.int64, device=DEVICE)  # what torch.empty may hold
    flags = torch.tensor([flag, 0], dtype=torch.int64, device=DEVICE)
    triton_assign.scan_kernel[(batch,)](counts.to(DEVICE), starts, totals, offsets, flags, num_blocks, batch,
                                        BLOCK=4, IMAGES=4)  # fmt: skip
    per_image = counts.view(batch, num_blocks, 2).to(torch.int64)
    within = per_image.cumsum(1) - per_image
    assert torch.equal(starts.cpu(), within.reshape(-1, 2))
    image_totals = per_image.sum(1).T
    expected = torch.cat([torch.zeros(2, 1, dtype=torch.int64), image_totals.cumsum(1)], 1)
    assert torch.equal(offsets[:2].cpu(), expected)
    assert offsets[2, batch] == flag and (offsets[2, :batch] == -7).all()  # the rest of row 2 left alone
    assert flags.tolist() == [flag, batch]


def test_sparse_lists_sized_from_recent_batches(monkeypatch, generator):
    """``solve_sparse`` writes its lists before reading their lengths back, into lists
    sized from recent batches: the first batch of an anchor count is written after the
    read-back, the next one before it (once, lists of exactly its rows too), and one with
    more rows than guessed in either list is written again at its own size -- the same
    targets every time, cut to length."""
    writes = _recorded_launches(monkeypatch, "finalize_kernel", "OUTPUT")
    monkeypatch.setattr(triton_backend, "_ROWS_PER_IMAGE", {})
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [5, 0, 9], canvas)
    classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, _dense_config("retinanet_mmdet"),
                               gt_classes=classes.to(DEVICE), drop_invalid=True)  # fmt: skip
    expected = triton_backend.solve(problem).to_sparse()
    sparse = triton_backend.OUTPUT_SPARSE
    per_image = (expected.positive_anchors.numel() / 3, expected.ignored_anchors.numel() / 3)
    assert min(per_image) > 30  # the 64-row floor of a guess is not enough below
    exact = tuple((3 * rows - 64 + 0.5) / 6 for rows in per_image)  # lists of exactly the rows: no overflow

    guesses = [(None, 1), (per_image, 1), (exact, 1), ((1.0, 1.0), 2), ((per_image[0], 1.0), 2),
               ((1.0, per_image[1]), 2)]  # fmt: skip
    for guess, launches in guesses:
        if guess is None:
            triton_backend._ROWS_PER_IMAGE.clear()
        else:
            triton_backend._ROWS_PER_IMAGE[problem.num_anchors] = guess
        writes.clear()
        assert_sparse_equal(triton_backend.solve_sparse(problem), expected)
        assert writes.count(sparse) == launches, (guess, writes)
        assert triton_backend._ROWS_PER_IMAGE[problem.num_anchors] == pytest.approx(
            tuple(max(observed, 0.9 * (guess or (0, 0))[i]) for i, observed in enumerate(per_image))
        )


def test_row_estimates_keep_the_most_recent_anchor_counts(monkeypatch):
    """Explicit anchors (proposals) may bring a new anchor count on every call: the
    estimates stay bounded, the least recently used count leaves first."""
    monkeypatch.setattr(triton_backend, "_ROWS_PER_IMAGE", {})
    kept = triton_backend._ROWS_PER_IMAGE_KEPT
    for count in range(1, kept + 1):
        triton_backend._remember_rows(count, [2 * count, count], 2)
    triton_backend._remember_rows(1, [4, 2], 2)  # count 1 used again: now the most recent
    triton_backend._remember_rows(3, [6, 3], 2)  # another count used again: nothing leaves
    assert len(triton_backend._ROWS_PER_IMAGE) == kept and list(triton_backend._ROWS_PER_IMAGE)[-2:] == [1, 3]
    triton_backend._remember_rows(3, [0, 0], 2)  # a batch of no rows: the estimate decays
    assert triton_backend._ROWS_PER_IMAGE[3] == pytest.approx((0.9 * 3.0, 0.9 * 1.5))
    triton_backend._remember_rows(kept + 1, [0, 0], 1)
    assert len(triton_backend._ROWS_PER_IMAGE) == kept
    assert 2 not in triton_backend._ROWS_PER_IMAGE and 1 in triton_backend._ROWS_PER_IMAGE
    assert triton_backend._ROWS_PER_IMAGE[1] == (2.0, 1.0)  # max(4 / 2, 0.9 x 1)


def test_row_estimates_are_updated_by_threads_at_once(monkeypatch):
    """The service's compute workers (two on a GPU) update the estimates together: finding
    the least recent count while another thread added one raised "dictionary changed size
    during iteration" (in most runs of this test, with thread switches every microsecond)."""
    monkeypatch.setattr(triton_backend, "_ROWS_PER_IMAGE", {})
    failures = []

    def update(offset: int) -> None:
        try:
            for i in range(20_000):
                triton_backend._remember_rows(offset + i % 200, [5, 7], 2)
        except RuntimeError as exc:
            failures.append(exc)

    _at_once(update, 1e-6)
    assert failures == [] and len(triton_backend._ROWS_PER_IMAGE) == triton_backend._ROWS_PER_IMAGE_KEPT


def _at_once(work, switch_s: float, threads: int = 4) -> None:
    """``work(1000 * k)`` on ``threads`` threads at once, switching every ``switch_s``."""
    switching = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        running = [threading.Thread(target=work, args=(1000 * k,)) for k in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
    finally:
        sys.setswitchinterval(switching)


def test_threads_solving_at_once_get_the_reference_targets():
    """Data-loader threads and the service's compute workers call the backend at once.
    Triton's interpreter swaps triton.language's functions while it runs a kernel: two
    threads interpreting at once raised "Did you forget to add @triton.jit ?" or gave
    wrong targets, until interpreted launches went one at a time (``triton_launch``)."""
    canvas, config = (32, 48), presets.get("retinanet_torchvision")
    boxes, counts, classes = coco_like_batch(2, seed=3, canvas=canvas)
    expected = assign(boxes, counts, canvas, config, gt_classes=classes, backend="reference")
    results, failures = [], []

    def solve(_offset: int) -> None:
        try:
            for _ in range(3):
                results.append(assign(boxes.to(DEVICE), counts, canvas, config, gt_classes=classes.to(DEVICE),
                                      backend="triton"))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 -- any failure of a thread fails the test
            failures.append(exc)

    _at_once(solve, 1e-5)
    assert failures == []
    assert len(results) == 12
    for targets in results:
        assert_targets_equal(targets.to("cpu"), expected)


def test_register_cap_of_the_pair_kernels(monkeypatch, generator):
    """``pair_registers`` reaches the pair kernels' launches as Triton's ``maxnreg`` (what
    the H200 sweeps of run6-run10 varied): compiled on a GPU, the capped kernels still match the
    reference; the interpreter takes the option and ignores it."""
    launched = _pair_launches(monkeypatch, "maxnreg", pair_registers=48)
    boxes, counts = random_batch(generator, [6, 3], (64, 256), max_frac=0.2)
    check(boxes, counts, (64, 256), _dense_config("retinanet_torchvision"))
    assert launched == [48, 48]  # scatter, then lift


def test_register_cap_of_a_finalize_that_lifts(monkeypatch, generator):
    """``finalize_registers`` reaches the finalize's launches as ``maxnreg`` where it runs
    the gather's lift (dense, and the sparse count pass), and no other (``gpu_sweep.py``
    times it); the targets stay the reference's."""
    launched = _recorded_launches(monkeypatch, "finalize_kernel", "maxnreg")
    _matching(monkeypatch, "gather")
    for meta in ("_INTERPRETED", "_COMPILED"):
        monkeypatch.setattr(triton_backend, meta, dataclasses.replace(getattr(triton_backend, meta),
                                                                      finalize_registers=40))  # fmt: skip
    boxes, counts = random_batch(generator, [6, 3], (64, 256), max_frac=0.2)
    check(boxes, counts, (64, 256), _dense_config("retinanet_torchvision"), sparse=True)
    check(boxes, counts, (64, 256), _dense_config("retinanet_torchvision").replace(**{"match.low_quality": "none"}))
    assert launched == [40, 40, None, None]  # dense; sparse count, then its writing pass; no lift: no cap


def test_a_finalize_matching_inline_runs_under_the_gathers_register_cap(monkeypatch, generator):
    """It holds the gather's tile (``_block_keys``): ``gather_registers`` reaches its
    launches, lifting or not, dense and sparse; the targets stay the reference's."""
    launched = _recorded_launches(monkeypatch, "finalize_kernel", "maxnreg")
    _matching(monkeypatch, "gather")
    for meta in ("_INTERPRETED", "_COMPILED"):
        changed = dataclasses.replace(getattr(triton_backend, meta), inline_match=True, gather_registers=64,
                                      finalize_registers=40)  # fmt: skip
        monkeypatch.setattr(triton_backend, meta, changed)
    boxes, counts = random_batch(generator, [6, 3], (64, 256), max_frac=0.2)
    check(boxes, counts, (64, 256), _dense_config("retinanet_torchvision"), sparse=True)
    check(boxes, counts, (64, 256), _dense_config("retinanet_torchvision").replace(**{"match.low_quality": "none"}))
    assert launched == [64, 64, 64, 64]  # dense; sparse count, then its writing pass; without the lift


@pytest.mark.parametrize("wrt_anchor", [True, False])
@pytest.mark.parametrize("mode", ("torchvision", "mmdet", "none"))
def test_ignore_regions(wrt_anchor, mode, generator):
    canvas = (97, 131)
    boxes, counts = random_batch(generator, [4, 9, 0], canvas)
    ignore, ignore_counts = random_batch(generator, [2, 0, 70], canvas, max_frac=0.4)
    config = _dense_config("retinanet_mmdet").replace(
        **{"match.ignore_iof_thr": 0.5, "match.ignore_iof_wrt_anchor": wrt_anchor, "match.low_quality": mode}
    )
    ours = check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=ignore_counts, sparse=True)
    assert (ours.labels[1] == -1).any()


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_crowd_regions_ignore_nothing_without_a_positive_threshold(threshold):
    """mmdet's rule: only a positive ``ignore_iof_thr`` ignores; at 0 (or off, -1) a crowd
    region over an anchor leaves it in matching, negative here."""
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.ignore_iof_thr": threshold, "match.low_quality": "none"}
    )
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    ours = check(torch.tensor([[40.0, 40.0, 50.0, 50.0]]), [1], (64, 96), config, sparse=True, anchors=anchors,
                 ignore_boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0]]), ignore_counts=[1])  # fmt: skip
    assert ours.labels[0].tolist() == [0, 1]


@pytest.mark.parametrize(("wrt_anchor", "anchors", "region"), IOF_AT_THRESHOLD)
def test_an_iof_equal_to_the_threshold_leaves_the_anchor_in_matching(wrt_anchor, anchors, region):
    """An anchor is excluded by a crowd region only when its IoF *exceeds* the threshold
    (README): a0's is exactly 0.5 and stays negative, a1's is above and is ignored; a2 is
    the box, positive."""
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.ignore_iof_thr": 0.5, "match.ignore_iof_wrt_anchor": wrt_anchor, "match.low_quality": "none"}
    )
    anchors, region = torch.tensor(anchors, dtype=torch.float32), torch.tensor([region], dtype=torch.float32)
    ours = check(torch.tensor([[40.0, 40.0, 50.0, 50.0]]), [1], (64, 96), config, sparse=True, anchors=anchors,
                 ignore_boxes=region, ignore_counts=[1])  # fmt: skip
    assert ours.labels[0].tolist() == [0, -1, 1]
    assert ours.matched_gt[0].tolist() == [-1, -1, 0]


@pytest.mark.parametrize("border, order", [(0.0, "pre_match"), (0.0, "post_match"), (8.5, "pre_match"),
                                           (3.0, "post_match")])  # fmt: skip
@pytest.mark.parametrize("mode", ("torchvision", "detectron2", "ssd_forced"))
def test_border_rules(border, order, mode, generator):
    canvas = (160, 224)
    boxes, counts = random_batch(generator, [6, 2, 0], canvas)
    config = _dense_config("rpn_detectron2").replace(
        **{"match.allowed_border": border, "match.border_order": order, "match.low_quality": mode}
    )
    sizes = torch.tensor([[160, 224], [101, 77], [64, 200]])
    check(boxes, counts, canvas, config, image_sizes=sizes, sparse=order == "post_match")


@pytest.mark.parametrize("order", ["pre_match", "post_match"])
def test_the_border_limit_is_the_sum_rounded_once_to_float32(order):
    """``x2 < w + b`` as the reference compares it: the double sum rounded to float32. On a
    canvas 2^24 + 1 wide with a border of 1 that is 2^24 + 2, where adding 1 to the width
    in float32 (2^24) would leave 2^24 and put the anchor ending at 2^24 outside."""
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.allowed_border": 1.0, "match.border_order": order, "match.low_quality": "none"}
    )
    edge = 2.0**24
    anchors = torch.tensor([[edge - 16, 0.0, edge, 16.0], [0.0, 0.0, 16.0, 16.0]])
    ours = check(torch.tensor([[edge - 16, 0.0, edge, 16.0]]), [1], (64, 2**24 + 1), config, anchors=anchors,
                 sparse=True)  # fmt: skip
    assert ours.labels[0].tolist() == [1, 0]


def test_ignore_and_border_together(generator):
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [7, 7], canvas)
    ignore, ignore_counts = random_batch(generator, [3, 1], canvas)
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.ignore_iof_thr": 0.3, "match.allowed_border": 0.0, "match.border_order": "pre_match"}
    )
    check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=ignore_counts,
          image_sizes=[[64, 96], [40, 50]], want_max_iou=True)  # fmt: skip


@pytest.mark.parametrize(
    "name, canvas",
    [("retinanet_torchvision", COCO_CANVAS), ("retinanet_detectron2", (517, 611)), ("ssd300_torchvision", (300, 300)),
     ("yolov5", (320, 416)), ("d2l_multibox", (256, 256))],
)  # fmt: skip
def test_evaluated_pairs_are_exactly_the_overlapping_ones(name, canvas, generator):
    """The candidate rectangles hold every box-anchor pair with IoU > 0 and nothing
    else (DESIGN §9: at most 2x the overlapping pairs; the old chunk test evaluated
    ~9x at G = 200): mul and div centres, shape-major order, scaled layouts, ties."""
    boxes, counts, _ = coco_like_batch(2, seed=7, canvas=canvas, boxes_per_image=60)
    boxes[:30] = with_ties(boxes[:30], generator)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, _dense_config(name), drop_invalid=True)
    work = triton_backend.candidate_pairs(problem)
    offsets = problem.gt_offsets.tolist()
    overlapping = sum(
        int((box_iou(problem.gt_boxes[start:end].cpu(), problem.anchors.cpu()) > 0).sum())
        for start, end in zip(offsets[:-1], offsets[1:])
    )
    assert work["evaluated"] == overlapping > 0
    assert work["lanes"] - work["evaluated"] < triton_backend._meta().block_p  # chunks are packed
    # Chunks inside one rectangle, against the rectangle of every pair laid end to end.
    launch = triton_backend._Launch(problem)
    with triton_backend._on(launch.device):
        pairs = launch.segments()["pairs"].cpu()
    rectangle_of_pair = torch.repeat_interleave(torch.arange(pairs.numel()), pairs)
    uniform = sum(int(chunk.min() == chunk.max()) for chunk in rectangle_of_pair.split(64))
    assert triton_backend.candidate_pairs(problem, block_p=64)["uniform_chunks"] == uniform


def test_the_gather_evaluates_at_most_twice_the_overlapping_pairs():
    """DESIGN §9's bound for the gather at G = 200 (COCO canvas, RetinaNet, one image),
    both passes counted. The matching: a box visits every anchor of each GPU-sized block
    it is near by the backend's table (it crosses the bounding box of one of the block's
    two parts): 1.91x on this image, where one bounding box per block (the table before it
    had two parts) evaluates 2.33x. The lift (low-quality matching, in the finalize): every
    anchor of the blocks where a box may reach its best IoU, bounded by the block's areas
    and the box's intersection with its parts: 0.09x more, 0.23x with the areas alone."""
    boxes, counts, _ = coco_like_batch(1, seed=3, canvas=COCO_CANVAS, boxes_per_image=200)
    problem, _ = build_problem(boxes, counts, COCO_CANVAS, _dense_config("retinanet_torchvision"))
    block_a = triton_backend._COMPILED.block_a
    table = triton_backend._block_bounds(problem.grid, block_a, torch.device("cpu"), None)
    x1, y1, x2, y2 = (boxes[None, :, i] for i in range(4))

    def crossing(part: torch.Tensor) -> torch.Tensor:  # [blocks, G]
        return (x1 < part[:, None, 2]) & (y1 < part[:, None, 3]) & (x2 > part[:, None, 0]) & (y2 > part[:, None, 1])

    def overlap(part: torch.Tensor) -> torch.Tensor:  # [blocks, G]
        w = torch.minimum(x2, part[:, None, 2]) - torch.maximum(x1, part[:, None, 0])
        return w.clamp(min=0) * (torch.minimum(y2, part[:, None, 3]) - torch.maximum(y1, part[:, None, 1])).clamp(min=0)

    near = crossing(table[:, :4]) | crossing(table[:, 4:8])
    ious = [box_iou(boxes, chunk) for chunk in problem.anchors.split(50_000)]
    overlapping = sum(int((iou > 0).sum()) for iou in ious)
    best = torch.stack([iou.amax(1) for iou in ious]).amax(0)[None, :]
    area = (x2 - x1) * (y2 - y1)
    nearest = torch.minimum(torch.maximum(area, table[:, 8:9]), table[:, 9:10])
    bound = torch.minimum(torch.maximum(overlap(table[:, :4]), overlap(table[:, 4:8])), nearest)
    lifted = near & (best > 0) & (bound / torch.maximum(area, nearest) * 1.0001 >= best)
    evaluated = (int(near.sum()) + int(lifted.sum())) * block_a
    assert overlapping > 0 and evaluated <= 2 * overlapping


@pytest.mark.parametrize("num_anchors", [0, 1, 2, 37, 2049, 5000])
@pytest.mark.parametrize("mode", MODES)
def test_explicit_anchors(num_anchors, mode, generator):
    canvas = (97, 131)
    anchors = random_boxes(generator, num_anchors, canvas, min_size=1.0, max_frac=0.5)
    if num_anchors >= 3:
        anchors[: num_anchors // 3] = with_ties(anchors[: num_anchors // 3], generator)
    boxes, counts = random_batch(generator, [3, 0, 11], canvas)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    check(boxes, counts, canvas, config, anchors=anchors, want_max_iou=True, sparse=num_anchors in (0, 2049))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(presets.names()),
    counts=st.lists(st.sampled_from([0, 1, 2, 5, 9, 20]), min_size=1, max_size=3),
    mode=st.sampled_from(MODES),
    thresholds=st.tuples(st.sampled_from([0.25, 0.5, 0.7, 1.0]), st.sampled_from([0.0, 0.5, 1.0]), st.booleans()),
    border=st.tuples(st.sampled_from([-1.0, 0.0, 6.0]), st.sampled_from(["pre_match", "post_match"])),
    ignore=st.tuples(st.sampled_from([-1.0, 0.0, 0.3]), st.booleans()),
    extra=st.sampled_from(["ties", "image sizes", "pad sizes", "explicit anchors", "classes", "none"]),
)
def test_random_configurations(seed, name, counts, mode, thresholds, border, ignore, extra):
    """Any preset with any matching rule, border rule and ignore rule, on random batches
    (with ties, per-image sizes, pad sizes, explicit anchors or classes): dense and sparse
    targets equal the reference's."""
    generator = torch.Generator().manual_seed(seed)
    high, low_fraction, strict_high = thresholds
    config = _dense_config(name).replace(**{
        "match.low_quality": mode, "match.high": high, "match.low": high * low_fraction,
        "match.strict_high": strict_high, "match.allowed_border": border[0], "match.border_order": border[1],
        "match.ignore_iof_thr": ignore[0], "match.ignore_iof_wrt_anchor": ignore[1],
    })  # fmt: skip
    canvas = (40 + seed % 120, 40 + seed % 160)
    boxes, counts = random_batch(generator, counts, canvas)
    regions, region_counts = random_batch(generator, [seed % 3 for _ in counts], canvas, max_frac=0.4)
    kwargs = {"ignore_boxes": regions, "ignore_counts": region_counts}
    sizes = [[canvas[0] - (seed + i) % 25, canvas[1] - (seed * i) % 35] for i in range(len(counts))]
    if extra == "ties":
        boxes = with_ties(boxes, generator)
    elif extra in ("image sizes", "pad sizes"):
        kwargs["image_sizes"] = sizes
        if extra == "pad sizes":
            kwargs["pad_sizes"] = [[min(canvas[0], h + 9), min(canvas[1], w + 13)] for h, w in sizes]
    elif extra == "explicit anchors":
        kwargs["anchors"] = random_boxes(generator, 50 + seed % 300, canvas, min_size=2.0)
    elif extra == "classes":
        kwargs["gt_classes"] = torch.randint(0, 80, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    check(boxes, counts, canvas, config, want_max_iou=True, sparse=True, **kwargs)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_box_with_zero_best_iou_lifts_nothing(mode):
    """An ignore region takes out every anchor box 1 touches, so its best IoU is 0.

    torchvision's and mmdet's rules would then make every zero-IoU anchor positive;
    here such a box takes no part in low-quality matching (the reference's rule).
    """
    anchors = torch.tensor([[0, 0, 16, 16], [40, 40, 56, 56], [0, 0, 32, 32], [60, 0, 90, 30]], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 16, 16], [40, 40, 60, 60]], dtype=torch.float32)
    ignore = torch.tensor([[38, 38, 62, 62]], dtype=torch.float32)
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.ignore_iof_thr": 0.5, "match.low_quality": mode, "match.high": 0.9, "match.low": 0.1}
    )
    ours = check(boxes, [2], (64, 96), config, anchors=anchors, ignore_boxes=ignore, ignore_counts=[1],
                 want_max_iou=True, sparse=True)  # fmt: skip
    # a0: box 0 (IoU 1); a1: in the ignore region; a2: 0.25 with box 0, ignored; a3: 0, negative.
    assert ours.labels[0].tolist() == [1, -1, -1, 0]
    assert ours.matched_gt[0, 0] == 0


@pytest.mark.parametrize(
    "mode, labels, matched",
    [
        ("none", [-1, 0, 1], [-1, -1, 0]),
        ("torchvision", [-1, 0, 1], [-1, -1, 0]),  # a2 keeps its own argmax, box 0
        ("detectron2", [-1, 0, 1], [0, 0, 0]),  # every included anchor's argmax (a1: all 0, box 0)
        ("mmdet", [-1, 0, 1], [-1, -1, 1]),  # box 1's maximum is a2 too: the later box overwrites
        ("ssd_forced", [-1, 0, 1], [-1, -1, 1]),  # a2 is both boxes' best: the later box wins
    ],
)
def test_known_answers(mode, labels, matched):
    """Hand-computed IoUs (rows: boxes, columns: anchors a0 a1 a2):
    box 0 [0,0,25,10]: 100/250 = 0.4, 0, 250/260; box 1 [0,0,30,10]: 1/3, 0, 260/300.
    With high 0.9 and low 0.3: a0 is ignored, a1 negative, a2 positive (0.96)."""
    anchors = torch.tensor([[0, 0, 10, 10], [60, 40, 70, 50], [0, 0, 26, 10]], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 25, 10], [0, 0, 30, 10]], dtype=torch.float32)
    level = AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1,))
    config = TargetConfig(anchors=AnchorConfig(layout="torchvision", levels=(level,)),
                          match=MatchConfig(high=0.9, low=0.3, low_quality=mode))  # fmt: skip
    ours = check(boxes, [2], (64, 96), config, anchors=anchors)
    assert ours.labels[0].tolist() == labels
    assert ours.matched_gt[0].tolist() == matched


def test_an_image_without_boxes_is_negative_whatever_the_low_threshold():
    """With ``low`` 0 an anchor of IoU 0 is not below it (ignored, image 0), but an
    image without boxes has nothing to match: every anchor negative (image 1), as in the
    reference (its best IoU is -1 in the kernels, not 0)."""
    config = _dense_config("retinanet_torchvision").replace(**{"match.low": 0.0, "match.low_quality": "none"})
    ours = check(torch.tensor([[10.0, 10.0, 40.0, 40.0]]), [1, 0], (64, 96), config, sparse=True)
    assert (ours.labels[0] == -1).any()
    assert bool((ours.labels[1] == 0).all())


# The rules that take anchors out of a box's maximum (the lift), in both matchings: the
# walk tests its pairs lane by lane (``_excluded_lanes`` and each pair's cell against
# its image's valid cells), the gather and the finalize a block at a time (``_excluded``).


# a0's IoF with the crowd region is exactly the threshold (50/100), so it stays in matching
# and, the box's best included anchor (IoU 100/120 < high), is lifted; a1's IoF is above it
# (50/80): ignored, out of the box's maximum; a2 negative. Taking a0 out too would leave the
# box no included anchor to lift.
_IOF_AT_THRESHOLD = dict(
    anchors=[[0, 0, 10, 10], [0, 0, 10, 8], [40, 40, 50, 50]], box=[0.0, 0.0, 10.0, 12.0],
    match={"match.ignore_iof_thr": 0.5, "match.ignore_iof_wrt_anchor": True, "match.high": 0.9},
    given={"ignore_boxes": torch.tensor([[0.0, 0.0, 10.0, 5.0]]), "ignore_counts": [1]}, labels=[1, -1, 0],
)  # fmt: skip
# detectron2's order: an anchor across the border takes part in matching and is ignored
# afterwards. a1 crosses the image's right edge (x2 70 >= 60) and is the box's best (IoU
# 180/200 < high): the box's maximum, so a2 (IoU 90/240, inside) is not lifted and stays in
# the band; a1 is ignored. Taking a1 out before matching (the pre-match rule) would lift a2.
_POST_MATCH_BORDER = dict(
    anchors=[[0, 0, 10, 10], [50, 0, 70, 10], [44, 0, 59, 10]], box=[50.0, 0.0, 68.0, 10.0],
    match={"match.allowed_border": 0.0, "match.border_order": "post_match", "match.high": 0.95},
    given={"image_sizes": [[64, 60]]}, labels=[0, -1, -1],
)  # fmt: skip


@pytest.mark.parametrize("matching", ["gather", "walk"])
@pytest.mark.parametrize("mode", ("torchvision", "mmdet", "ssd_forced"))
@pytest.mark.parametrize("case", [_IOF_AT_THRESHOLD, _POST_MATCH_BORDER], ids=["iof-at-threshold", "post-match-border"])
def test_an_anchor_a_rule_keeps_in_matching_counts_in_its_boxs_maximum(case, mode, matching, monkeypatch):
    """An anchor at a rule's edge (an IoF exactly the threshold; outside the border, which
    post_match applies after matching) counts in its box's maximum, which decides the lift."""
    _matching(monkeypatch, matching)
    config = _dense_config("retinanet_torchvision").replace(
        **{**case["match"], "match.low_quality": mode, "match.low": 0.3}
    )
    ours = check(torch.tensor([case["box"]]), [1], (64, 96), config,
                 anchors=torch.tensor(case["anchors"], dtype=torch.float32), sparse=True, **case["given"])  # fmt: skip
    assert ours.labels[0].tolist() == case["labels"]
    assert ours.matched_gt[0].tolist() == [0 if label == 1 else -1 for label in case["labels"]]


@pytest.mark.parametrize("matching", ["gather", "walk"])
@pytest.mark.parametrize("mode", ("torchvision", "mmdet"))
def test_padding_takes_the_first_row_past_it_out_of_the_boxs_maximum(mode, matching, monkeypatch):
    """The image is padded to 48 rows: the first level's rows 0-5 are valid, row 6 (centres
    at y 48) is not. The box lies inside an anchor of row 6 (IoU 896/1024 < high), which is
    excluded: the box's maximum is over the valid anchors, whose best the lift makes
    positive; the anchor of row 6 is ignored."""
    _matching(monkeypatch, matching)
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.low_quality": mode, "match.high": 0.9, "match.low": 0.3}
    )
    ours = check(torch.tensor([[20.0, 34.0, 52.0, 62.0]]), [1], (64, 96), config, pad_sizes=[[48, 96]], sparse=True)
    assert int((ours.labels == 1).sum()) > 0


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("mode", ("torchvision", "mmdet", "ssd_forced"))
def test_box_with_zero_best_iou_lifts_nothing_in_the_walk(mode, monkeypatch):
    """The walk's lift (``lift_segments_kernel``) and ssd_forced's marks skip a box whose
    best IoU over the included anchors is 0: explicit anchors make its rectangle every
    anchor of the image, IoU 0 included (the cases of the gather's test above)."""
    _matching(monkeypatch, "walk")
    test_box_with_zero_best_iou_lifts_nothing(mode)


@pytest.mark.parametrize("mode, order", [("torchvision", "pre_match"), ("mmdet", "pre_match"),
                                         ("ssd_forced", "pre_match"), ("torchvision", "post_match")])  # fmt: skip
def test_the_walk_with_crowd_regions_border_and_padding(mode, order, monkeypatch, generator):
    """The walk's scatter keeps each box's maximum over its included anchors only: crowd
    regions (IoF over the anchor), the pre-match border and padded sizes (cutting rows
    and columns) take anchors out of it, the post-match border does not; ties, an empty
    image, min_pos_iou (the gather's test of every mode, by the walk)."""
    _matching(monkeypatch, "walk")
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3, 0, 10, 25], canvas)
    boxes = with_ties(boxes, generator)
    ignore = torch.cat([boxes[:1] + torch.tensor([-2.0, -2.0, 2.0, 2.0]), boxes[20:22]])
    config = _dense_config("retinanet_mmdet").replace(
        **{"match.low_quality": mode, "match.min_pos_iou": 0.1, "match.ignore_iof_thr": 0.5,
           "match.ignore_iof_wrt_anchor": True, "match.allowed_border": 0.0, "match.border_order": order}
    )  # fmt: skip
    check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=[1, 0, 0, 2], want_max_iou=True,
          image_sizes=[[64, 96], [40, 60], [64, 70], [50, 70]], pad_sizes=[[64, 96]] * 2 + [[64, 80], [56, 80]],
          sparse=True)  # fmt: skip


@pytest.mark.parametrize("canvas", [(16, 520), (520, 16)])
def test_the_walk_on_a_canvas_far_wider_than_tall(canvas, monkeypatch, generator):
    """The walk's rectangles come from binary searches over a level's rows and columns,
    as many steps as its longer side needs: here 2 cells one way and 65 the other."""
    _matching(monkeypatch, "walk")
    boxes, counts = random_batch(generator, [6, 2], canvas, max_frac=0.3)
    check(boxes, counts, canvas, _dense_config("retinanet_torchvision"), sparse=True)


def test_empty_batch_and_all_empty_images():
    config = _dense_config("yolov5")
    boxes = torch.zeros(0, 4)
    ours = check(boxes, [0, 0, 0], (64, 96), config, want_max_iou=True, sparse=True)
    assert (ours.labels == 0).all() and (ours.matched_gt == -1).all() and (ours.max_iou == 0).all()


def test_assign_dispatches_to_triton_with_sampling(generator):
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3, 0, 5], canvas)
    config = presets.get("fasterrcnn_rpn_torchvision")
    ours = assign(boxes.to(DEVICE), counts, canvas, config, backend="triton", seed=7)
    ref = assign(boxes.to(DEVICE), counts, canvas, config, backend="reference", seed=7)
    assert_targets_equal(ours, ref, rtol=TOL, atol=TOL)


def test_assign_restores_dropped_indices(generator):
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [4, 3], canvas)
    boxes[1] = torch.tensor([10.0, 10.0, 5.0, 20.0])  # degenerate: dropped
    config = _dense_config("retinanet_torchvision")
    ours = assign(boxes.to(DEVICE), counts, canvas, config, backend="triton", drop_invalid=True)
    ref = assign(boxes.to(DEVICE), counts, canvas, config, backend="reference", drop_invalid=True)
    assert_targets_equal(ours, ref, rtol=TOL, atol=TOL)
    assert ours.dropped[0].tolist() == [1]


def test_refuses_what_it_cannot_run(monkeypatch, generator):
    with pytest.raises(TypeError, match="Problem"):
        triton_backend.solve("not a problem")
    boxes, counts = random_batch(generator, [2], (64, 96))
    problem, _ = build_problem(boxes.to(DEVICE), counts, (64, 96), _dense_config("retinanet_torchvision"))
    float_classes = dataclasses.replace(problem, gt_classes=torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="problem.gt_classes: expected torch.int32 or torch.int64, got torch.float32"):
        triton_backend.solve(float_classes)
    with pytest.raises(ValueError, match=rf"problem.grid has {problem.num_anchors} anchors but problem.anchors has 1$"):
        triton_backend.solve(dataclasses.replace(problem, anchors=problem.anchors[:1]))
    explicit, _ = build_problem(boxes.to(DEVICE), counts, (64, 96), _dense_config("retinanet_torchvision"),
                                anchors=boxes.to(DEVICE))  # fmt: skip
    with pytest.raises(TypeError, match="problem.anchors: expected torch.float32, got torch.float64"):
        triton_backend.solve_sparse(dataclasses.replace(explicit, anchors=explicit.anchors.double()))
    problem, _ = build_problem(boxes, counts, (64, 96), _dense_config("retinanet_torchvision"))
    monkeypatch.setattr(triton_backend, "_INTERPRETING", False)
    with pytest.raises(ValueError, match="CUDA"):
        triton_backend.solve(problem)


def test_refuses_more_images_anchors_or_boxes_than_it_indexes(monkeypatch):
    """Up to ``_MAX_IMAGES`` images (a CUDA grid axis) and ``_MAX_INDEX`` anchors per image
    and boxes per call (int32 indices): a problem at every limit runs, one past any of
    them is refused by name (the limits lowered here: the real ones take 2^31 anchors)."""
    monkeypatch.setattr(triton_backend, "_MAX_IMAGES", 2)
    monkeypatch.setattr(triton_backend, "_MAX_INDEX", 4)
    config = _dense_config("retinanet_torchvision")
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0], [5.0, 5.0, 21.0, 19.0], [30.0, 31.0, 50.0, 52.0],
                          [0.0, 0.0, 40.0, 44.0], [60.0, 30.0, 90.0, 61.0]])  # fmt: skip
    anchors = boxes + 1.0
    ours = check(boxes[:4], [2, 2], (64, 96), config, anchors=anchors[:4], sparse=True)
    assert (ours.labels == 1).any()
    refused = {"batch size 3: the triton backend takes 1 to 2 images per call": ([1, 1, 1], anchors[:4]),
               "5 anchors per image: the triton backend takes at most 4$": ([2, 2], anchors),
               "5 boxes: the triton backend takes at most 4 per call": ([2, 3], anchors[:4])}  # fmt: skip
    for message, (counts, explicit) in refused.items():
        problem, _ = build_problem(boxes[: sum(counts)].to(DEVICE), counts, (64, 96), config,
                                   anchors=explicit.to(DEVICE))  # fmt: skip
        for solve in (triton_backend.solve, triton_backend.solve_sparse):
            with pytest.raises(ValueError, match=message):
                solve(problem)


@pytest.mark.skipif(HAS_CUDA, reason="checks the interpreter path on CPU tensors")
def test_importing_the_package_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, tritarget.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# What the GPU will run, checked without one: compile for Hopper (sm_90) and read the PTX.
_COMPILE_FOR_HOPPER = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritarget.kernels import triton_backend as backend
from tritarget.kernels import triton_assign as k

INT64 = {"gt_offsets_ptr", "box_key_ptr", "level_int_ptr", "ignore_offsets_ptr", "block_starts_ptr", "prefix_ptr",
         "pairs_ptr", "offsets_ptr", "totals_ptr", "invalid_ptr", "flags_ptr"}
INT32 = {"gt_classes_ptr", "matched_ptr", "classes_ptr", "block_counts_ptr", "positive_anchors_ptr",
         "positive_matched_ptr", "positive_classes_ptr", "ignored_anchors_ptr", "shape_int_ptr", "rect_ptr",
         "row_image_ptr", "row_box_ptr", "seg_max_ptr", "pad_ptr"}
FLOATS = {"high", "low", "min_pos_iou", "ignore_iof_thr"}
FLOATS |= {f"{a}_{b}" for a in ("weight", "mean", "std") for b in "xywh"}
m = backend._COMPILED
lift = dict(LIFT=False, BOXES=m.gather_boxes, NEAR=m.lift_near, BUILD_ANCHORS=True, INLINE=False,
            MATCH_NEAR=m.gather_near, SKIP_EMPTY=False, LONE=False,
            HEAVY_FIRST=m.heavy_first)  # the walk's finalize unless changed
ptx = {}
for name, fn, constexprs in [
    ("segments", k.segments_kernel, dict(GENERATE=True, ROWS=m.segment_rows, SHAPES=16)),
    ("scatter", k.pairs_kernel, dict(STAGE=k.STAGE_SCATTER, GENERATE=True, BLOCK_P=m.block_p)),
    ("lift", k.pairs_kernel, dict(STAGE=k.STAGE_LIFT, GENERATE=True, BLOCK_P=m.block_p)),
    ("scatter_explicit", k.pairs_kernel, dict(STAGE=k.STAGE_SCATTER, GENERATE=False, BLOCK_P=m.block_p)),
    ("forced", k.forced_kernel, dict(BLOCK=128)),
    ("lift_segments", k.lift_segments_kernel, dict(BLOCK=1024)),
    ("dense", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_DENSE, GENERATE=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                        **lift)),
    ("count", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_COUNT, GENERATE=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                        **lift)),
    ("sparse", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_SPARSE, GENERATE=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                        **dict(lift, SKIP_EMPTY=m.skip_empty))),  # the gather's
    ("scan", k.scan_kernel, dict(backend.SCAN_STEPS, num_warps=backend.SCAN_WARPS)),  # as launched
    ("gather", k.gather_kernel, dict(GENERATE=True, BUILD_ANCHORS=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                     BOXES=m.gather_boxes, NEAR=m.gather_near, RECORDS=True,
                                     SKIP_EMPTY=m.skip_empty, LONE=m.lone_visits, HEAVY_FIRST=m.heavy_first)),
    ("gather_lone", k.gather_kernel, dict(GENERATE=True, BUILD_ANCHORS=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                          BOXES=m.gather_boxes, NEAR=m.gather_near, RECORDS=True,
                                          SKIP_EMPTY=m.skip_empty, LONE=True, HEAVY_FIRST=m.heavy_first)),
    ("gather_keys", k.gather_kernel, dict(GENERATE=True, BUILD_ANCHORS=True, BLOCK_A=m.block_a, BLOCK_G=m.block_g,
                                          BOXES=m.gather_boxes, NEAR=m.gather_near, RECORDS=False,
                                          SKIP_EMPTY=False, LONE=m.lone_visits, HEAVY_FIRST=m.heavy_first)),
    ("dense_lift", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_DENSE, GENERATE=True, BLOCK_A=m.block_a,
                                           BLOCK_G=m.block_g, **dict(lift, LIFT=True, SKIP_EMPTY=m.skip_empty))),
    ("dense_inline", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_DENSE, GENERATE=True, BLOCK_A=m.block_a,
                                             BLOCK_G=m.block_g, **dict(lift, LIFT=True, INLINE=True))),
    ("sparse_inline_explicit", k.finalize_kernel, dict(OUTPUT=k.OUTPUT_SPARSE, GENERATE=False, BLOCK_A=m.block_a,
                                                       BLOCK_G=m.block_g, **dict(lift, LIFT=True, INLINE=True,
                                                                                 BUILD_ANCHORS=False,
                                                                                 LONE=True))),  # lone visits too
]:
    signature = {
        arg: "constexpr" if arg in constexprs else "*i64" if arg in INT64 else "*i32" if arg in INT32
        else "*i8" if arg == "labels_ptr" else "*u8" if arg == "near_ptr" else "*fp32" if arg.endswith("_ptr")
        else "fp32" if arg in FLOATS
        else "i32"
        for arg in fn.arg_names
    }
    # torch allocations are 16-byte aligned: the JIT gives pointers this hint too, except
    # those it is told not to specialise on.
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if arg.endswith("_ptr") and arg not in fn.do_not_specialize_on_alignment}  # fmt: skip
    warps = constexprs.pop("num_warps", m.num_warps)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "enable_fp_fusion": False})
    ptx[name] = kernel.asm["ptx"]
print(json.dumps(ptx))
"""


@pytest.mark.parametrize(
    "matching, inline, kernels",
    [("walk", False, {"segments_kernel", "pairs_kernel", "lift_segments_kernel", "finalize_kernel", "scan_kernel"}),
     # gather_kernel checks assign_sparse's boxes and scatters; finalize_kernel lifts;
     # floor_kernel gives each box its need (the threshold pruning; not matching inline).
     ("gather", False, {"floor_kernel", "gather_kernel", "finalize_kernel", "scan_kernel"}),
     ("gather", True, {"gather_kernel", "finalize_kernel", "scan_kernel"})],
)  # fmt: skip
def test_one_compilation_per_kernel_and_mode_whatever_the_batch(matching, inline, kernels, monkeypatch):
    """Triton compiles a kernel again for each new specialisation of its arguments: an int
    equal to 1 or divisible by 16, a pointer 16-byte aligned or not. Batches of 1-16 images,
    box counts of both parities and multiples of 16, canvases with anchor counts divisible
    by 16 or not, and a request's slice of a merged batch (classes starting anywhere) must
    all share one compilation per kernel and mode (stage, output), or a service would
    compile in the middle of its traffic; with the pair walk and with the gather (and the
    finalize matching inline)."""
    from tritarget.kernels import assign_sparse

    launches = record_launches(monkeypatch)
    changed = dataclasses.replace(triton_backend._meta(), matching=matching, inline_match=inline)
    monkeypatch.setattr(triton_backend, "_INTERPRETED", changed)
    monkeypatch.setattr(triton_backend, "_COMPILED", changed)
    config = _dense_config("retinanet_torchvision")
    # Anchor counts 4,608 (divisible by 16), 3,852, 2,529 and 1,161.
    for batch, per_image, canvas in ((1, None, (128, 192)), (2, 16, (128, 160)), (3, 5, (96, 136)), (16, 1, (64, 96))):
        boxes, counts, classes = coco_like_batch(batch, seed=batch, canvas=canvas, boxes_per_image=per_image)
        boxes, classes = boxes.to(DEVICE), classes.to(DEVICE)
        assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="triton")
        assign(boxes, counts, canvas, config, gt_classes=classes, backend="triton")
        shifted = torch.cat([classes[:1], classes])[1:]  # int32 elements: 4 bytes past an aligned start
        assign_sparse(boxes, counts, canvas, config, gt_classes=shifted, backend="triton")
        assign_sparse(boxes, counts, canvas, config, gt_classes=classes.long(), backend="triton")  # converted
    keys = compile_keys(launches)
    assert set(keys) == kernels
    for name, found in keys.items():
        assert len(found) == len(modes(found)), f"{name}: {len(found)} compilations for {len(modes(found))} modes"


def _matching(monkeypatch, matching: str) -> None:
    """Stages 2-3 by the pair walk or the gather (``_Meta.matching``), the block sizes as they are."""
    for meta in ("_COMPILED", "_INTERPRETED"):
        monkeypatch.setattr(triton_backend, meta, dataclasses.replace(getattr(triton_backend, meta), matching=matching))


@pytest.mark.parametrize("backend, matching", [("reference", None), ("cpu", None), ("triton", "gather"),
                                                ("triton", "walk")])  # fmt: skip
@pytest.mark.parametrize("low_quality", ["torchvision", "mmdet"])
def test_a_box_whose_best_iou_equals_min_pos_iou_lifts_its_best_anchor(backend, matching, low_quality, monkeypatch):
    """mmdet's ``max_overlaps >= min_pos_iou``: a box whose best IoU is exactly the bound
    qualifies, one a float32 step under it does not (both lift modes that read it). Only a random search reached the
    equality before (a mutant of the walk's lift, ``>``, passed every test)."""
    if matching is not None:
        _matching(monkeypatch, matching)
    canvas, box = (64, 64), torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    config = presets.get("retinanet_torchvision")
    ious = box_iou(box, generate_anchors(config.anchors, canvas))[0]
    best = ious.max().item()  # a float32 value, exact as a Python float
    above = torch.nextafter(torch.tensor(best), torch.tensor(1.0)).item()
    assert int((ious == best).sum()) == 2  # a tie: every lifted anchor counts
    for bound, lifted in ((best, True), (above, False)):
        match = {"match.high": 0.99, "match.low": 0.0, "match.low_quality": low_quality, "match.min_pos_iou": bound}
        got = assign(box.to(DEVICE) if backend == "triton" else box, [1], canvas, config.replace(**match),
                     backend=backend)  # fmt: skip
        expected = (ious == best) & lifted  # every anchor at the box's best (2 here), or none
        assert torch.equal(got.labels[0].cpu() == 1, expected), (bound, lifted)
        assert (got.matched_gt[0].cpu()[expected] == 0).all()


@pytest.mark.parametrize("backend, matching", [("reference", None), ("cpu", None), ("triton", "gather"),
                                                ("triton", "walk")])  # fmt: skip
def test_a_box_whose_best_iou_equals_min_pos_iou_forces_its_best_anchor(backend, matching, monkeypatch):
    """ssd_forced reads ``min_pos_iou`` as the lifts do (``>=``): at the box's best IoU
    its best anchor (the lower of the two tied) is forced, a float32 step above it none."""
    if matching is not None:
        _matching(monkeypatch, matching)
    canvas, box = (64, 64), torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    config = presets.get("retinanet_torchvision")
    ious = box_iou(box, generate_anchors(config.anchors, canvas))[0]
    best = ious.max().item()
    above = torch.nextafter(torch.tensor(best), torch.tensor(1.0)).item()
    first = int(torch.nonzero(ious == best)[0])
    for bound, forced in ((best, True), (above, False)):
        match = {"match.high": 0.99, "match.low": 0.0, "match.low_quality": "ssd_forced", "match.min_pos_iou": bound}
        got = assign(box.to(DEVICE) if backend == "triton" else box, [1], canvas, config.replace(**match),
                     backend=backend)  # fmt: skip
        positives = torch.nonzero(got.labels[0].cpu() == 1).flatten().tolist()
        assert positives == ([first] if forced else []), (bound, forced)
        assert (got.matched_gt[0].cpu()[positives] == 0).all()


@pytest.mark.parametrize("solve, matching, inline, mode, boxes_checked, operations",
                         [("solve_sparse", "walk", False, "torchvision", False, 12),
                          ("solve_sparse", "gather", False, "torchvision", False, 7),
                          ("solve", "walk", False, "torchvision", False, 10),
                          ("solve", "gather", False, "torchvision", False, 5),
                          ("solve", "gather", True, "torchvision", False, 4),
                          ("solve", "gather", True, "none", False, 4),
                          ("solve_sparse", "gather", True, "none", False, 6),
                          ("solve", "walk", False, "torchvision", True, 9),
                          ("solve", "gather", False, "torchvision", True, 4),
                          ("solve", "gather", True, "none", True, 1)])  # fmt: skip
def test_device_operations_of_a_call(solve, matching, inline, mode, boxes_checked, operations, monkeypatch,
                                     generator):  # fmt: skip
    """What a call costs the GPU in operations (each one a launch and host time), for a
    low-quality preset: kernels, memsets, prefix sums and read-backs. The walk: memsets
    of the work and candidate memory, segments, prefix, scatter, the lift's segments,
    prefix and pass, then the finalize (dense), or count, scan, write (sparse, list sizes
    known from an earlier batch), and the one read-back of the box check's flag (with the
    lists' lengths, sparse); the gather: one memset, the floor (what each box needs, for
    the threshold pruning), the gather, then the finalize with the lift, or count (with
    the lift), scan, write, and the read-back. Matching inline (``inline_match``; no
    pruning) without the low-quality rule, the unchecked boxes still take the gather,
    which checks them. A problem whose boxes were checked before (``boxes_checked``:
    on a GPU, after build_problem's five operations and read-back) reads nothing back:
    a dense call is then its launches alone, matching inline without the lift the
    finalize alone."""
    _matching(monkeypatch, matching)
    for meta in ("_COMPILED", "_INTERPRETED"):
        monkeypatch.setattr(triton_backend, meta, dataclasses.replace(getattr(triton_backend, meta),
                                                                      inline_match=inline))  # fmt: skip
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3, 5], canvas)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, check_gt_boxes=boxes_checked)
    checked, _ = build_problem(boxes.to(DEVICE), counts, canvas, config)
    expected = triton_backend.solve(checked).to_sparse()  # (labels as the reference's: the tests above)
    getattr(triton_backend, solve)(problem)  # sizes the lists of the next sparse call
    launches = record_launches(monkeypatch)
    other = []

    def counted(name, function):
        def call(*args, **kwargs):
            other.append(name)
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(torch, "zeros", counted("memset", torch.zeros))
    monkeypatch.setattr(torch, "cumsum", counted("prefix sum", torch.cumsum))
    monkeypatch.setattr(torch.Tensor, "zero_", counted("memset", torch.Tensor.zero_))
    monkeypatch.setattr(torch.Tensor, "tolist", counted("read-back", torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted("read-back", torch.Tensor.item))
    result = getattr(triton_backend, solve)(problem)
    monkeypatch.undo()
    assert other.count("read-back") == (solve == "solve_sparse" or not boxes_checked)
    assert len(launches) + len(other) == operations, ([launch[0] for launch in launches], other)
    assert_sparse_equal(result if solve == "solve_sparse" else result.to_sparse(), expected)


def test_kernels_compile_for_hopper_with_exact_arithmetic():
    """Both triton versions compile the kernels; the PTX keeps IoU exact: IEEE division
    (div.rn, never div.full/approx) and no mul+add contracted into fma.rn.f32 (the
    fma.rn.ftz.f32 in the finalize kernel are libdevice's logf, within 1 ulp); the pair
    kernels' and the gather's atomics are relaxed and unfenced, the scan's count acq_rel."""
    import json
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("triton's ptxas is not available here")
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = json.loads(run.stdout.strip().splitlines()[-1])
    for name, code in ptx.items():
        assert "div.full.f32" not in code and "div.approx" not in code, name
        assert "fma.rn.f32" not in code, f"{name}: a mul+add was contracted into an FMA"
    for name in ("scatter", "lift", "scatter_explicit", "dense", "sparse", "gather", "gather_lone", "dense_lift",
                 "dense_inline", "sparse_inline_explicit"):  # fmt: skip
        assert "div.rn.f32" in ptx[name], name
    for name in ("scatter", "lift", "forced", "gather", "gather_lone", "gather_keys"):
        # Relaxed atomics with no fence around them (acq_rel fenced each one:
        # triton_assign's docstring). Triton 3.9 writes them as reductions (red); 3.6 as
        # atom, whose unread result ptxas drops: fire-and-forget REDG in the SASS either
        # way (benchmarks/results/kernel_resources.md).
        atomics = set(re.findall(r"\b(?:red|atom)\.global\.[\w.]+", ptx[name]))
        assert atomics and all(".relaxed.max." in op for op in atomics), (name, atomics)
        assert "fence" not in ptx[name] and "membar" not in ptx[name], name
    for name in ("dense", "dense_lift", "dense_inline"):
        assert "st.global.v4.b32" in ptx[name], f"{name}: deltas should leave in 16-byte vector stores"

    # With records the gather writes each whole, in two 8-byte stores (the key, then the zero
    # mark with the unused word; no 4-byte store, which left sectors written in part), and
    # its block's flag in one byte; without records, none of these (its other stores: the
    # near lists' bytes and the box-check flag).
    def stores(name: str, bits: int) -> int:
        return len(re.findall(rf"st\.global\.b{bits}\b", ptx[name]))

    assert stores("gather", 64) == stores("gather_keys", 64) + 2 and stores("gather", 32) == 0
    assert stores("gather", 8) == stores("gather_keys", 8) + 1
    # The scan's last program reads what the others stored before they counted themselves
    # done: its count must release and acquire.
    atomics = set(re.findall(r"\b(?:red|atom)\.global\.[\w.]+", ptx["scan"]))
    assert atomics and all(".acq_rel." in op for op in atomics), atomics
    assert ".reqntid 512" in ptx["scan"] and ".reqntid 128" in ptx["gather"]  # the scan's 16 warps, as launched


# --- compiled, full size (skipped without a GPU) -------------------------------------


@gpu
def test_scan_under_concurrency():
    """scan_kernel as the backend launches it, with more programs than run at once (and
    more images than its images' step): the program that finishes last (which one varies
    from launch to launch) sees every image's totals, in 100 launches with fresh counts and a zeroed counter each, as in
    solve_sparse."""
    batch, num_blocks = 300, 1575
    generator = torch.Generator().manual_seed(0)
    starts = torch.empty(batch * num_blocks, 2, dtype=torch.int64, device=DEVICE)
    totals = torch.empty(2, batch, dtype=torch.int64, device=DEVICE)
    for _ in range(100):
        counts = torch.randint(0, 3, (batch * num_blocks, 2), generator=generator, dtype=torch.int32)
        offsets = torch.full((3, batch + 1), -7, dtype=torch.int64, device=DEVICE)
        flags = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        triton_backend.scan_kernel[(batch,)](counts.to(DEVICE), starts, totals, offsets, flags, num_blocks, batch,
                                             **triton_backend.SCAN_STEPS,
                                             **triton_backend._launch_kwargs(triton_backend.SCAN_WARPS))  # fmt: skip
        image_totals = counts.view(batch, num_blocks, 2).to(torch.int64).sum(1).T
        expected = torch.cat([torch.zeros(2, 1, dtype=torch.int64), image_totals.cumsum(1)], 1)
        assert torch.equal(offsets[:2].cpu(), expected)
        assert flags.tolist() == [0, batch] and offsets[2, batch] == 0


@gpu
@pytest.mark.parametrize("matching", ["walk", "gather"])
@pytest.mark.parametrize("name", presets.names())
def test_full_size_parity(name, matching, monkeypatch):
    _matching(monkeypatch, matching)
    config = _dense_config(name)
    canvas = (300, 300) if name.startswith("ssd") else (256, 256) if name.startswith("d2l") else COCO_CANVAS
    boxes, counts, classes = coco_like_batch(4, seed=1, canvas=canvas)
    boxes[: boxes.shape[0] // 4] = with_ties(boxes[: boxes.shape[0] // 4], torch.Generator().manual_seed(1))
    check(boxes, counts, canvas, config, gt_classes=classes, want_max_iou=True, sparse=True)


@gpu
@pytest.mark.parametrize("matching", ["walk", "gather"])
@pytest.mark.parametrize("mode", MODES)
def test_full_size_modes_with_crowd_and_ignore(mode, matching, monkeypatch):
    _matching(monkeypatch, matching)
    boxes, counts, _ = coco_like_batch(3, seed=2, boxes_per_image=150)
    ignore, ignore_counts, _ = coco_like_batch(3, seed=3, boxes_per_image=5)
    config = _dense_config("retinanet_mmdet").replace(
        **{"match.low_quality": mode, "match.ignore_iof_thr": 0.5, "match.allowed_border": 0.0}
    )
    check(boxes, counts, COCO_CANVAS, config, ignore_boxes=ignore, ignore_counts=ignore_counts, sparse=True)


@gpu
def test_auto_picks_triton_on_cuda():
    boxes, counts, _ = coco_like_batch(2, seed=4)
    config = _dense_config("retinanet_torchvision")
    ours = assign(boxes.cuda(), counts, COCO_CANVAS, config, backend="auto")
    ref = assign(boxes.cuda(), counts, COCO_CANVAS, config, backend="reference")
    assert_targets_equal(ours, ref, rtol=TOL, atol=TOL)


def _peak_extra_bytes(fn) -> tuple[object, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


@gpu
@pytest.mark.parametrize("batch, boxes_per_image", [(64, None), (8, 1000), (64, 1000)])
@pytest.mark.parametrize("matching", ["walk", "gather"])
def test_large_batches_stream_in_o_a_plus_g_memory(batch, boxes_per_image, matching, monkeypatch):
    """B = 64 and G = 1000 fit, with memory O(B * A + G) (the outputs), never O(A * G)."""
    _matching(monkeypatch, matching)
    boxes, counts, classes = coco_like_batch(batch, seed=5, boxes_per_image=boxes_per_image)
    config = _dense_config("retinanet_torchvision")
    problem, _ = build_problem(boxes.cuda(), counts, COCO_CANVAS, config, gt_classes=classes.cuda())
    # The per-device tables are built once per canvas, by the first call in a process: the
    # gather's block bounds take ~20 MB of temporaries at 800 x 1344 (run12, where this
    # test ran first in its worker). The bound is about what every call takes.
    triton_backend.solve(build_problem(boxes[: counts[0]].cuda(), counts[:1], COCO_CANVAS, config,
                                       gt_classes=classes[: counts[0]].cuda())[0])  # fmt: skip
    targets, extra = _peak_extra_bytes(lambda: triton_backend.solve(problem))
    outputs = sum(t.numel() * t.element_size() for t in (targets.labels, targets.matched_gt, targets.deltas,
                                                         targets.classes))  # fmt: skip
    iou_matrix = problem.num_anchors * max(counts) * 4  # one image's [G, A] float32, what peers allocate
    # Per box: its key, its image and, per (level, shape) row, a rectangle, a pair count,
    # a prefix entry and a best IoU (the work memory of the dense path lives in its
    # deltas); twice that covers the scan's scratch and the allocator's rounding.
    shape_rows = sum(level.cells.shape[0] for level in problem.grid.levels)
    per_box = 12 + 36 * shape_rows
    # The gather's near lists: a byte per anchor and image at the GPU's sizes (12.9 MB of
    # the 335 MB at B = 64, G ~ 7 on the H200, run11), and its blocks' flags, a byte each.
    meta = triton_backend._meta()
    blocks = -(-problem.num_anchors // meta.block_a)
    near_lists = batch * blocks * (meta.gather_boxes + int(meta.skip_empty)) if matching == "gather" else 0
    bound = outputs + near_lists + 2 * per_box * boxes.shape[0] + (2 << 20)
    assert extra <= bound, (extra, outputs, near_lists, iou_matrix)
    # Parity on the first two images (matching is per image).
    first = sum(counts[:2])
    sub, _ = build_problem(boxes[:first].cuda(), counts[:2], COCO_CANVAS, config, gt_classes=classes[:first].cuda())
    ref = reference.solve(sub)
    head = Targets(targets.labels[:2], targets.matched_gt[:2], targets.deltas[:2], targets.classes[:2])
    assert_targets_equal(head, ref, rtol=TOL, atol=TOL)


# --- matching="gather" (gather_kernel), against the reference ------------------------------


def _gather(monkeypatch, gpu_blocks: bool, **sizes: int) -> list:
    """Solve with stages 2-3 as the gather, at the GPU's block sizes (128 anchors per
    block: bounding boxes of a short stretch of a row, most boxes skipped) or the
    interpreter's, with other ``gather_boxes`` / ``gather_near`` / ``lift_near`` (or
    ``load_anchors``, ``inline_match``) if given; the list gets each finalize launch's
    (OUTPUT, LIFT, INLINE), and fails a launch of a generated grid whose BUILD_ANCHORS is
    not what ``load_anchors`` asks for (the GPU's default loads them, the interpreter's
    builds them)."""
    launched = []
    original = triton_backend.finalize_kernel
    base = triton_backend._COMPILED if gpu_blocks else triton_backend._meta()
    changed = dataclasses.replace(base, matching="gather", **sizes)
    build = not changed.load_anchors

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert kwargs["BUILD_ANCHORS"] is (build and kwargs["GENERATE"])  # explicit anchors: loaded
                assert kwargs["HEAVY_FIRST"] is changed.heavy_first  # the order asked for, and its grid
                images = args[1].shape[0] - 1  # gt_offsets
                assert (grid[0] == images) if changed.heavy_first else (grid[1] == images)
                launched.append((kwargs["OUTPUT"], kwargs["LIFT"], kwargs["INLINE"]))
                return original[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_backend, "finalize_kernel", Recording())
    monkeypatch.setattr(triton_backend, "_INTERPRETED", changed)
    monkeypatch.setattr(triton_backend, "_COMPILED", changed)
    return launched


@pytest.mark.parametrize(
    "mode, lift_near, block_a, load_anchors, inline_match, heavy_first, lone_visits",
    [(mode, 1, 128, False, False, True, False) for mode in MODES]
    + [("mmdet", 2, 128, False, False, True, False), ("mmdet", 1, 64, False, False, True, False)]
    + [(mode, 1, 128, True, False, True, False) for mode in MODES]
    + [(mode, 1, 128, True, True, True, False) for mode in MODES]
    + [("torchvision", 2, 64, False, True, True, False)]
    + [("torchvision", 1, 128, True, False, False, False), ("mmdet", 1, 128, True, True, False, False)]
    + [("ssd_forced", 1, 128, True, False, True, True), ("mmdet", 1, 128, True, True, True, True)],
)  # fmt: skip
def test_the_gather_in_every_mode_with_crowd_regions_border_and_padding(
    mode, lift_near, block_a, load_anchors, inline_match, heavy_first, lone_visits, monkeypatch, generator
):
    """The gather gives the reference's targets, dense and sparse, at the GPU's block
    sizes: ties, an empty image, a crowded one, crowd regions (IoF over the anchor), the
    pre-match border rule and padded sizes (both taking anchors out of each box's
    maximum), min_pos_iou; the modes that lift do so in the dense and counting finalize
    (the sparse pass reads the marks the count stored; ssd_forced marks with
    forced_kernel, whose marks every pass reads). Boxes are tested 8 at a time, so that an image's near boxes
    span several steps (and tied boxes straddle them), and the lift visits them 1 and 2
    at a time; also in blocks of 64 anchors, with the grid's anchors loaded instead of
    built in each block, and with the finalize matching each block itself, no record
    between the passes (``inline_match``), with the programs in the grid's own order
    rather than heavy first (``heavy_first``), and with a step's lone last near box
    visited alone (``lone_visits``; ``gpu_sweep.py`` times each)."""
    launched = _gather(monkeypatch, gpu_blocks=True, gather_boxes=8, lift_near=lift_near, block_a=block_a,
                       load_anchors=load_anchors, inline_match=inline_match, heavy_first=heavy_first,
                       lone_visits=lone_visits)  # fmt: skip
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [3, 0, 10, 25], canvas)
    boxes = with_ties(boxes, generator)
    ignore = torch.cat([boxes[:1] + torch.tensor([-2.0, -2.0, 2.0, 2.0]), boxes[20:22]])
    config = _dense_config("retinanet_mmdet").replace(
        **{"match.low_quality": mode, "match.min_pos_iou": 0.1, "match.ignore_iof_thr": 0.5,
           "match.ignore_iof_wrt_anchor": True, "match.allowed_border": 0.0, "match.border_order": "pre_match"}
    )  # fmt: skip
    check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=[1, 0, 0, 2], want_max_iou=True,
          image_sizes=[[64, 96], [40, 60], [64, 70], [50, 70]], pad_sizes=[[64, 96]] * 2 + [[64, 80]] * 2,
          sparse=True)  # fmt: skip
    dense, count, sparse = triton_assign.OUTPUT_DENSE, triton_assign.OUTPUT_COUNT, triton_assign.OUTPUT_SPARSE
    lifts = mode in ("torchvision", "detectron2", "mmdet")
    inline = inline_match and mode != "ssd_forced"  # forced_kernel's marks live in the records
    # (The sparse pass runs again when the lists sized from earlier batches overflow.) With
    # no records to keep the count pass's marks in, the sparse pass lifts again.
    assert launched[:2] == [(dense, lifts, inline), (count, lifts, inline)]
    assert set(launched[2:]) == {(sparse, lifts and inline, inline)}


def test_the_gather_tests_at_most_256_boxes_at_once():
    """Its near lists hold each box's place in the step in a byte: 256 boxes (places 0-255)
    fit, 257 do not."""
    assert dataclasses.replace(triton_backend._COMPILED, gather_boxes=256).gather_boxes == 256
    for boxes in (0, 257, 512):
        with pytest.raises(ValueError, match=f"gather_boxes: 1 to 256 boxes tested at once, got {boxes}"):
            dataclasses.replace(triton_backend._COMPILED, gather_boxes=boxes)


def test_a_finalize_block_holds_fewer_than_2_to_the_15_anchors():
    """Its count pass packs the ignored anchors in bits 16-30: a block of 2^15 ignored
    anchors would count negative (none of the shipped sizes, 128 and 2048, is near)."""
    with pytest.raises(ValueError, match=r"block_a: 1 to 2\^15 - 1 anchors per block, got 32768"):
        dataclasses.replace(triton_backend._INTERPRETED, block_a=2**15)


@pytest.mark.parametrize("inline_match", [False, True])
def test_the_gather_on_a_crowded_image(inline_match, monkeypatch, generator):
    """More boxes in one image than the GPU's gather tests at once (160 against 128),
    with exact duplicates in different steps: keys, box keys and lifted marks across
    steps and across the near boxes visited together (4, the GPU's), ties to the lowest
    box index; the keys found by the gather or by the finalize itself. (8 at a time: the
    tests at the interpreter's block sizes; ``gpu_sweep.py`` checks its other widths'
    labels against the default's.)"""
    _gather(monkeypatch, gpu_blocks=True, inline_match=inline_match)
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [160, 2], canvas)
    boxes[130:140] = boxes[5:15]  # the same boxes in the first and the second step
    check(boxes, counts, canvas, _dense_config("retinanet_mmdet"), want_max_iou=True, sparse=True)


@pytest.mark.parametrize("mode", ["torchvision", "none"])
def test_matching_inline_with_no_box_in_the_batch(mode, monkeypatch):
    """Every anchor negative, none matched, dense and sparse: the finalize's search and
    lift find nothing, and without the lift no gather runs at all."""
    _gather(monkeypatch, gpu_blocks=True, inline_match=True)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    targets = check(torch.zeros(0, 4), [0, 0], (64, 96), config, want_max_iou=True, sparse=True)
    assert bool((targets.labels == 0).all()) and bool((targets.matched_gt == -1).all())


@pytest.mark.parametrize("inline_match, lone_visits", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mode", ["mmdet", "ssd_forced", "none"])
def test_the_gather_breaks_ties_within_a_tile_column(mode, inline_match, lone_visits, monkeypatch):
    """Overlapping boxes, all near every block they touch, with box 4 a copy of box 0 (the
    same column of a 2- or 4-wide tile: the later visit must not take the tie) and box 5
    a copy of box 2 (another column: the columns' reduction must take the lower); and
    without box 5, box 4 is a step's lone last near box (``lone_visits``: visited alone,
    its tie with box 0's column resolved at the end, where box 0 must win, for the anchors'
    keys and for the box keys whose ties name the lowest anchor)."""
    _gather(monkeypatch, gpu_blocks=True, inline_match=inline_match, lone_visits=lone_visits)
    square = [[10.0, 10.0, 40.0, 40.0], [12.0, 8.0, 44.0, 36.0], [5.0, 15.0, 30.0, 45.0], [20.0, 20.0, 50.0, 50.0]]
    config = _dense_config("retinanet_mmdet").replace(**{"match.low_quality": mode})
    for boxes in (square + [square[0], square[2]], square + [square[0]]):
        matched = check(torch.tensor(boxes), [len(boxes)], (64, 96), config, sparse=True).matched_gt
        assert int((matched == 0).sum()) > 0 and int((matched == 2).sum()) > 0  # the ties were there to break
        if mode == "none":  # (the low-quality rules of mmdet and ssd_forced give a shared maximum to the later box)
            assert not bool((matched == 4).any())


def _bounding_box(anchors: torch.Tensor) -> torch.Tensor:
    return torch.cat([anchors[:, :2].min(0).values, anchors[:, 2:].max(0).values])


@pytest.mark.parametrize("name, block_a", [("retinanet_torchvision", 128), ("yolov5", 96)])
def test_block_bounds_are_two_parts_boxes_and_the_area_range(name, block_a):
    """The gather's per-block table (it tests boxes against it before generating a
    block's anchors): the bounding boxes of the block's anchors before and after a cut,
    and their area range, the last block short (filled up with copies of its last anchor,
    which change none of its bounds). Where the anchors are small against the width (the
    first level, cell-major: [H, W, K]), a block that runs from one row of cells into the
    next is cut where the row ends: a bounding box of both would span the whole width."""
    canvas = (97, 640)
    resolved = resolve_grid(presets.get(name).anchors, canvas)
    anchors = generate_anchors(presets.get(name).anchors, canvas)
    assert anchors.shape[0] % block_a != 0
    table = triton_backend._block_bounds(resolved, block_a, torch.device(DEVICE), None).cpu()
    assert table.shape == (-(-anchors.shape[0] // block_a), triton_assign.BLOCK_BOUNDS)
    first = resolved.levels[0]
    row_length = first.width * first.cells.shape[0]
    cut_at_row_end = 0
    for index, (block, expected) in enumerate(zip(table, anchors.split(block_a))):
        filled = torch.cat([expected, expected[-1:].expand(block_a - expected.shape[0], 4)])
        cuts = [c for c in range(1, block_a) if torch.equal(block[:4], _bounding_box(filled[:c]))
                and torch.equal(block[4:8], _bounding_box(filled[c:]))]  # fmt: skip
        assert cuts, f"block {index}: no cut gives its two parts {block[:8].tolist()}"
        area = box_area(expected)
        assert torch.equal(block[8:], torch.stack([area.min(), area.max()]))
        start, end = index * block_a, (index + 1) * block_a
        row_end = (start // row_length + 1) * row_length
        if not resolved.shape_major and end <= resolved.level_starts[1] and start < row_end < end:
            assert row_end - start in cuts, f"block {index}: cut at {cuts}, its row ends at {row_end - start}"
            cut_at_row_end += 1
    assert cut_at_row_end > 0 or resolved.shape_major


@pytest.mark.parametrize("mode", ["torchvision", "mmdet", "ssd_forced", "none"])
def test_the_floor_is_under_each_boxs_best_iou_and_the_threshold(mode, generator):
    """floor_kernel: what the gather's matching needs of each box, at most min(low, its
    best IoU) (a pair below it changes no target); for torchvision's lift, the image's
    lowest. On these images most boxes need low or their best exactly."""
    canvas = CANVASES[2]
    boxes, counts = random_batch(generator, [9, 0, 25], canvas)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config)
    need, prune = triton_backend._Launch(problem)._pruning()
    assert prune
    need = need.cpu()
    best = box_iou(boxes, generate_anchors(config.anchors, canvas)).amax(1).clamp(max=config.match.low)
    assert (need <= best).all() and (need > 0).all()
    images = [need[:9], need[9:]]
    if mode == "torchvision":
        assert all(torch.equal(image, image.min().expand_as(image)) for image in images)
        assert [float(image[0]) for image in images] == [float(image.min()) for image in (best[:9], best[9:])]
    else:
        assert int((need == best).sum()) >= 0.9 * need.numel()


@pytest.mark.parametrize(
    ("changes", "extra"),
    [({"match.low_quality": "detectron2"}, {}),  # a negative anchor's matched box is a target
     ({}, {"want_max_iou": True}),
     ({"match.ignore_iof_thr": 0.5}, {"ignore": True}),
     ({"match.allowed_border": 0.0, "match.border_order": "pre_match"}, {}),
     ({}, {"pad_sizes": torch.tensor([[100, 200]])}),
     ({}, {"explicit": True}),
     ({"match.low": 0.0}, {})],
)  # fmt: skip
def test_the_gather_prunes_only_where_no_target_depends_on_the_pairs_it_skips(changes, extra):
    """Where an IoU below the thresholds is a target, an excluded anchor could hold a box's
    floor, or nothing lies below the thresholds, the gather visits every near box."""
    canvas = CANVASES[2]
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 40.0, 150.0, 80.0]])
    config = _dense_config("retinanet_torchvision").replace(**changes)
    kwargs = {"want_max_iou": extra.get("want_max_iou", False)}
    if extra.get("ignore"):
        kwargs.update(ignore_boxes=torch.tensor([[0.0, 0.0, 30.0, 30.0]]).to(DEVICE), ignore_counts=[1])
    if "pad_sizes" in extra:
        kwargs["pad_sizes"] = extra["pad_sizes"]
    if extra.get("explicit"):
        kwargs["anchors"] = generate_anchors(config.anchors, canvas).to(DEVICE)
    problem, _ = build_problem(boxes.to(DEVICE), [2], canvas, config, **kwargs)
    assert triton_backend._Launch(problem)._pruning()[1] is False
    assert triton_backend._Launch(
        build_problem(boxes.to(DEVICE), [2], canvas, _dense_config("retinanet_torchvision"))[0]
    )._pruning()[1]


@pytest.mark.parametrize("mode", ["torchvision", "mmdet"])
def test_a_lifted_anchor_keeps_its_own_best_box_below_that_boxs_floor(mode, monkeypatch):
    """torchvision's lift keeps a lifted anchor's own best box. Here anchor 3840 is lifted
    and its best box, 23, overlaps it at IoU 0.16, where box 23 needs 0.4 and the block's
    bound for it is 0.394: pruning by each box's own need would skip that pair and
    match the anchor to another box; the image's lowest need keeps it (a seed found by
    search, GPU-sized blocks). mmdet's lift matches the lifting box: each box's own need."""
    _gather(monkeypatch, gpu_blocks=True)
    canvas = CANVASES[2]
    boxes, counts = random_batch(torch.Generator().manual_seed(10), [40], canvas)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    targets = check(boxes, counts, canvas, config, sparse=True)
    if mode == "torchvision":
        assert int(targets.labels[0, 3840]) == 1 and int(targets.matched_gt[0, 3840]) == 23


@pytest.mark.parametrize(
    ("name", "mode"),
    [("retinanet_torchvision", None), ("retinanet_mmdet", None), ("ssd300_torchvision", None), ("yolov5", None),
     ("retinanet_torchvision", "none")],
)  # fmt: skip
def test_the_pruned_gather_on_crowded_tied_and_tiny_boxes(name, mode, monkeypatch, generator):
    """The threshold pruning at the GPU's block sizes, with each lift it prunes under
    (torchvision's, mmdet's, the forced one, none; detectron2's it leaves alone), cell-
    and shape-major anchors, div centres (SSD): a crowded image
    with exact duplicates, boxes too small for any anchor to reach low (their best IoU
    sets what they and, for torchvision's lift, their image's boxes need), an empty image;
    dense and sparse targets equal the reference's."""
    _gather(monkeypatch, gpu_blocks=True)
    canvas = (300, 300) if name == "ssd300_torchvision" else (97, 131)
    boxes, counts = random_batch(generator, [1, 40, 0, 12], canvas)
    boxes[41:] = with_ties(boxes[41:], generator)
    boxes[30:36] = random_boxes(generator, 6, canvas, min_size=1.0, max_frac=0.02)  # best IoU far below low
    boxes[5:10] = boxes[20:25]  # duplicates in one image
    config = _dense_config(name)
    if mode is not None:
        config = config.replace(**{"match.low_quality": mode})
    classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config)
    assert triton_backend._Launch(problem)._pruning()[1]
    check(boxes, counts, canvas, config, gt_classes=classes, sparse=True)


def test_the_pruned_gather_keeps_boxes_inside_anchors_of_their_blocks_smallest_area(monkeypatch):
    """Tiny boxes inside square anchors (aspect ratio 1 only, so a block's smallest anchor
    area is the area a of the anchors that hold them): a box's best IoU is area / ((area +
    a) - area), which float32 may round an ulp above the bound area / a, and the box needs
    exactly that IoU (its floor is its best). Without the bound's slack (10^-4) the blocks
    of its best anchors are skipped and mmdet's lift marks lesser ones."""
    _gather(monkeypatch, gpu_blocks=True)
    canvas, count = (64, 96), 6
    generator = torch.Generator().manual_seed(7)
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([90.0, 60.0]) + 3
    size = 0.5 + torch.rand(count, 2, generator=generator) * 3
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    square = {f"anchors.levels[{i}].aspect_ratios": (1.0,) for i in range(5)}
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": "mmdet", **square})
    problem, _ = build_problem(boxes.to(DEVICE), [count], canvas, config)
    assert triton_backend._Launch(problem)._pruning()[1]
    check(boxes, [count], canvas, config, sparse=True)


def test_the_floor_of_a_box_past_the_last_cells_is_under_its_best_iou():
    """floor_kernel takes the cell nearest each box's centre, clamped to the grid: this box
    reaches past the canvas's bottom-right corner, its centre beyond the last cells', where
    an anchor of a cell past the grid would overlap it more (IoU 0.37) than any real one
    (0.18). The floor must stay under the box's best IoU, or the pruning may skip the pairs
    that hold it."""
    canvas, boxes = (64, 96), torch.tensor([[90.0, 58.0, 120.0, 90.0]])
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": "mmdet"})
    problem, _ = build_problem(boxes.to(DEVICE), [1], canvas, config)
    need, prune = triton_backend._Launch(problem)._pruning()
    best = box_iou(boxes, generate_anchors(config.anchors, canvas)).amax(1)
    assert prune and 0 < float(need[0]) <= float(best[0])


def test_the_gather_lifts_boxes_whose_maximum_is_their_area_ratio(monkeypatch, generator):
    """Boxes inside anchors (image 0) or around them (image 1) reach their maximum IoU at
    the area ratio, the lift's bound; the anchors' areas are all one value but for float
    rounding (fractional corners), so each block's area range is that value: rounding
    must not drop the anchor that reaches the maximum. Each box overlaps only the anchor
    it was made from, often at IoU < 0.5, where only the low-quality lift makes it
    positive."""
    _gather(monkeypatch, gpu_blocks=True)
    canvas, count = (512, 512), 200
    grid = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(20), indexing="ij"), -1).reshape(-1, 2)
    corner = grid.flip(-1).float() * torch.tensor([25.0, 50.0]) + 4.0 + torch.rand(count, 2, generator=generator)
    anchors = torch.cat([corner, corner + 12.3], 1)
    scale = 0.5 + 0.4 * torch.rand(count, 2, generator=generator)
    inside = torch.cat([corner + 12.3 * (1 - scale) / 2, corner + 12.3 * (1 + scale) / 2], 1)
    around = torch.cat([corner - 12.3 * (1 / scale - 1) / 2, corner + 12.3 * (1 + 1 / scale) / 2], 1)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": "torchvision"})
    targets = check(torch.cat([inside, around]), [count, count], canvas, config, anchors=anchors, sparse=True)
    assert int((targets.labels == 1).sum()) == 2 * count


@pytest.mark.parametrize("matching", ["gather", "walk"])
@pytest.mark.parametrize("name", ["retinanet_detectron2", "ssd300_torchvision", "yolov5", "d2l_multibox"])
def test_the_gather_in_every_anchor_layout(name, matching, monkeypatch, generator):
    """Cell-major and shape-major anchors, mul and div centres, scaled layouts (the
    interpreter's 2048-anchor blocks: bounding boxes across many rows); and by the walk,
    whose pairs find their anchors through the shape rows' tables."""
    canvas = (300, 300) if name == "ssd300_torchvision" else (97, 131)
    boxes, counts = random_batch(generator, [1, 9, 0, 30], canvas)
    boxes[10:] = with_ties(boxes[10:], generator)
    classes = torch.randint(1, 91, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    if matching == "gather":
        _gather(monkeypatch, gpu_blocks=False)
    else:
        _matching(monkeypatch, "walk")
    check(boxes, counts, canvas, _dense_config(name), gt_classes=classes, want_max_iou=True, sparse=True)


@pytest.mark.parametrize("num_anchors, mode, inline_match",
                         [(0, "torchvision", False), (37, "mmdet", False), (2049, "ssd_forced", False),
                          (0, "torchvision", True), (37, "mmdet", True), (300, "none", True)])  # fmt: skip
def test_the_gather_with_explicit_anchors(num_anchors, mode, inline_match, monkeypatch, generator):
    _gather(monkeypatch, gpu_blocks=True, inline_match=inline_match)
    canvas = (97, 131)
    anchors = random_boxes(generator, num_anchors, canvas, min_size=1.0, max_frac=0.5)
    boxes, counts = random_batch(generator, [3, 0, 11], canvas)
    config = _dense_config("retinanet_torchvision").replace(**{"match.low_quality": mode})
    check(boxes, counts, canvas, config, anchors=anchors, want_max_iou=True, sparse=True)


@pytest.mark.parametrize("preset, mode, inline_match",
                         [("retinanet_torchvision", None, False), ("ssd300_torchvision", None, False),
                          ("retinanet_torchvision", None, True), ("retinanet_torchvision", "none", True)])  # fmt: skip
def test_the_gather_checks_unchecked_boxes_and_writes_unzeroed_work(preset, mode, inline_match, monkeypatch,
                                                                    generator):  # fmt: skip
    """The sparse path's boxes unchecked: the gather checks them itself (each image's
    first block, 4 boxes per step here): an invalid box of either image, in any step, of
    each kind is reported, valid boxes are not; ssd_forced (segments_kernel for its box
    rows) alike. Its work memory is not zeroed (each record of a block near a box written
    whole, the same 16 bytes as the walk leaves in zeroed memory, the lift's marks once the
    count pass stored them; the other blocks' left as they were, where the walk's are 0);
    matching inline, nothing is written there, and without the lift the gather runs for
    the check alone."""
    _gather(monkeypatch, gpu_blocks=False, gather_boxes=4, inline_match=inline_match)
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [4, 6], canvas)
    config = _dense_config(preset)
    if mode is not None:  # without the lift, matching inline, the gather runs for the check alone
        config = config.replace(**{"match.low_quality": mode})
    checked, _ = build_problem(boxes.to(DEVICE), counts, canvas, config)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, check_gt_boxes=False)
    assert_sparse_equal(triton_backend.solve_sparse(problem), triton_backend.solve(checked).to_sparse())
    invalid = {"x2 < x1": [50.0, 30.0, 40.0, 60.0], "NaN": [float("nan"), 1.0, 5.0, 5.0],
               "right of the canvas": [96.0, 10.0, 120.0, 20.0], "infinite": [1.0, 1.0, float("inf"), 5.0]}  # fmt: skip
    for row, (kind, box) in zip([3, 9, 4, 7], invalid.items()):
        bad = boxes.clone()
        bad[row] = torch.tensor(box)
        unchecked, _ = build_problem(bad.to(DEVICE), counts, canvas, config, check_gt_boxes=False)
        with pytest.raises(CheckBoxesFirst):
            triton_backend.solve_sparse(unchecked)
            pytest.fail(f"{kind} at row {row} not reported")
    gather = triton_backend._Launch(problem)
    # Every near pair visited: the records equal the walk's (pruned, an anchor below the
    # thresholds keeps a lower IoU, which changes none of its targets).
    monkeypatch.setattr(gather, "meta", dataclasses.replace(gather.meta, threshold_prune=False))
    work = gather.work().fill_(float("nan"))  # whatever the memory held before
    walk = triton_backend._Launch(problem)
    monkeypatch.setattr(walk, "meta", dataclasses.replace(walk.meta, matching="walk"))
    zeroed = walk.work()
    block_counts = torch.empty(gather.batch * gather.num_blocks, 2, dtype=torch.int32, device=gather.device)
    with triton_backend._on(gather.device):
        gather.match_pairs(work)
        walk.match_pairs(zeroed)
        # The lift's marks come with the finalize, whose count pass stores them.
        gather.finalize(triton_assign.OUTPUT_COUNT, work, block_counts=block_counts)
    if gather.inline:  # no records: the finalize matches each block itself
        assert work.isnan().all()
    else:
        # Whole records, their unused word too (a sector written in part is filled from
        # memory), in the blocks near a box; the others' left as they were, where the walk's are 0.
        written = _written_records(gather)
        assert work.cpu()[~written].isnan().all() and not zeroed.cpu()[~written].any()
        assert torch.equal(work.view(torch.int32).cpu()[written], zeroed.view(torch.int32).cpu()[written])


def _written_records(launch) -> torch.Tensor:
    """[B, A] bool: the anchors whose records the gather wrote, by its blocks' flags
    (every anchor where it does not skip empty blocks)."""
    if not launch.skip_empty:
        return torch.ones(launch.batch, launch.num_anchors, dtype=torch.bool)
    flags = launch.lift[1][-launch.batch * launch.num_blocks :].view(launch.batch, launch.num_blocks).cpu()
    assert set(flags.unique().tolist()) <= {0, 1}
    return flags.bool().repeat_interleave(launch.meta.block_a, dim=1)[:, : launch.num_anchors]


@pytest.mark.parametrize("mode", ["torchvision", "ssd_forced", "none"])
def test_the_gather_leaves_the_records_of_blocks_near_no_box(mode, monkeypatch):
    """Skipping empty blocks (``_Meta.skip_empty``): a block near no box writes only its
    flag, and its records keep whatever the memory held, which no pass may read (here
    a stale record: IoU 0.45 with box 0, which would make its anchor ignored where it is
    negative). The boxes sit in one corner, crowd regions in another (blocks with ignored
    anchors and no box near, which the sparse pass lists), the middle image has no box;
    dense and sparse targets equal the reference in each mode (ssd_forced's marks live
    in the records, the lift's come from the count pass). Every block with an
    overlapping pair is flagged, its records written whole; a third or more are not."""
    _gather(monkeypatch, gpu_blocks=True)
    iou_bits = torch.tensor([0.45]).view(torch.int32).item()
    stale = torch.tensor([2**31 - 1, iou_bits, 0, 0], dtype=torch.int32)  # key (box 0), mark, unused word

    def allocate(launch, dense=True):
        work = original(launch, dense)
        work.view(torch.int32)[:] = stale.to(work.device)
        return work

    original = triton_backend._Launch.work
    monkeypatch.setattr(triton_backend._Launch, "work", allocate)
    canvas = (128, 192)  # 36 blocks of 128 anchors per image
    boxes = torch.tensor([[2.0, 3.0, 30.0, 41.0], [10.0, 5.0, 22.0, 17.0], [4.0, 8.0, 9.0, 20.0],
                          [0.0, 0.0, 60.0, 50.0]])  # fmt: skip
    counts = [3, 0, 1]
    ignore = torch.tensor([[150.0, 90.0, 190.0, 126.0], [120.0, 70.0, 180.0, 120.0]])
    config = _dense_config("retinanet_torchvision").replace(
        **{"match.low_quality": mode, "match.ignore_iof_thr": 0.5, "match.ignore_iof_wrt_anchor": True}
    )
    ours = check(boxes, counts, canvas, config, ignore_boxes=ignore, ignore_counts=[1, 0, 1], want_max_iou=True,
                 sparse=True)  # fmt: skip
    assert (ours.labels == -1).any() and (ours.labels == 1).any()
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, ignore_boxes=ignore.to(DEVICE),
                               ignore_counts=[1, 0, 1])  # fmt: skip
    launch = triton_backend._Launch(problem)
    assert launch.skip_empty
    work = launch.work()
    with triton_backend._on(launch.device):
        launch.match_pairs(work)
    written = _written_records(launch)
    assert not (ours.max_iou.cpu() > 0)[~written].any()
    assert (~written).float().mean() >= 1 / 3
    records = work.view(torch.int32).cpu()
    assert torch.equal(records[~written], stale.expand(int((~written).sum()), 4))
    assert not records[written][:, 3].any()  # the unused word, zeroed


def test_the_host_helpers_round_up_to_a_power_of_2_and_to_whole_blocks():
    """``_next_power_of_2``: the least power of 2 at or above the value (1 for 0 and 1),
    the segments tile's and every tl.arange's size; ``_cdiv``: the blocks that hold a count;
    ``_even``: a count of int64 words rounded up to keep the next part 16-byte aligned."""
    values = (0, 1, 2, 3, 4, 5, 63, 64, 65, 1000, 1024, 1025)
    assert [triton_backend._next_power_of_2(v) for v in values] == [1, 1, 2, 4, 4, 8, 64, 64, 128, 1024, 1024, 2048]
    assert [triton_backend._cdiv(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    assert [triton_backend._even(n) for n in (0, 1, 2, 7)] == [0, 2, 2, 8]


@pytest.mark.parametrize("sizes, ratios, tile", [(3, 3, 64), (10, 10, 128), (25, 28, 1024), (34, 33, 1024)])
def test_the_segments_tile_is_the_shapes_power_of_2_within_64_and_1024(sizes, ratios, tile, monkeypatch, generator):
    """segments_kernel's SHAPES: at least 64 (one compilation for every preset), the next
    power of 2 of the shape rows (a tl.arange's size) and at most 1,024 (more shapes in
    more programs); the candidate pairs are the overlapping ones whatever the tile."""
    level = AnchorLevel(stride=8, sizes=tuple(4.0 + j for j in range(sizes)),
                        aspect_ratios=tuple(0.5 + 0.05 * j for j in range(ratios)))  # fmt: skip
    config = _dense_config("retinanet_torchvision").replace(**{"anchors.levels": (level,)})
    boxes, counts = random_batch(generator, [3, 2], (16, 16), max_frac=0.6)
    problem, _ = build_problem(boxes.to(DEVICE), counts, (16, 16), config)
    tiles = _recorded_launches(monkeypatch, "segments_kernel", "SHAPES")
    work = triton_backend.candidate_pairs(problem)
    assert tiles == [tile]
    overlapping = sum(int((box_iou(image.cpu(), problem.anchors.cpu()) > 0).sum()) for image in boxes.split(counts))
    assert work["evaluated"] == overlapping > 0


def test_candidate_pairs_are_whole_chunks_of_lanes_and_none_without_a_box_or_an_anchor():
    """``candidate_pairs``: ``chunks`` the evaluated pairs in steps of ``block_p`` rounded
    up, ``lanes`` chunks x block_p (one pair a chunk: every chunk inside one rectangle);
    no box, or no anchor: no work."""
    canvas = (64, 96)
    config = _dense_config("retinanet_torchvision")
    boxes, counts, _ = coco_like_batch(2, seed=5, canvas=canvas, boxes_per_image=9)
    problem, _ = build_problem(boxes.to(DEVICE), counts, canvas, config)
    evaluated = triton_backend.candidate_pairs(problem)["evaluated"]
    for block_p in (1, 64, evaluated, evaluated + 1, None):
        work = triton_backend.candidate_pairs(problem, block_p=block_p)
        step = block_p or triton_backend._meta().block_p
        assert work["evaluated"] == evaluated > 0
        assert work["chunks"] == -(-evaluated // step) and work["lanes"] == work["chunks"] * step
        assert work["uniform_chunks"] <= work["chunks"]
        if step == 1:
            assert work["uniform_chunks"] == evaluated  # a chunk of one pair lies in one rectangle
    none = {"evaluated": 0, "chunks": 0, "lanes": 0, "uniform_chunks": 0}
    empty, _ = build_problem(torch.zeros(0, 4, device=DEVICE), [0, 0], canvas, config)
    assert triton_backend.candidate_pairs(empty) == none
    no_anchors, _ = build_problem(boxes.to(DEVICE), counts, canvas, config, anchors=torch.zeros(0, 4, device=DEVICE))
    assert triton_backend.candidate_pairs(no_anchors) == none
