"""build_problem: generated anchors come from a cache, box values are looked at one by one
only when some box may be invalid (a few boxes on the CPU are checked with Python floats,
others with torch ops where they live: both are tested), and the small integer tensors
are right."""

import gc
import math
import weakref

import pytest
import torch

from tritarget.kernels import cpu, generate_anchors, presets
from tritarget.kernels import problem as problem_module
from tritarget.kernels.anchors import AnchorGrid, grid_and_anchors, resolve_grid
from tritarget.kernels.problem import build_problem

CANVAS = (64, 96)
CONFIG = presets.get("retinanet_torchvision")
GOOD = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]])
INVALID = torch.tensor([[10.0, 10.0, 5.0, 30.0]])


def test_anchors_are_not_regenerated_per_call(monkeypatch):
    first, _ = build_problem(GOOD, [3], CANVAS, CONFIG)

    def regenerate(self):
        raise AssertionError("anchors generated again for a cached (config, canvas, device)")

    monkeypatch.setattr(AnchorGrid, "materialize", regenerate)
    second, _ = build_problem(GOOD[:1], [1], CANVAS, CONFIG)
    assert second.anchors is first.anchors
    assert second.anchors.data_ptr() == first.anchors.data_ptr()
    assert second.grid is first.grid


def test_anchor_cache_is_per_canvas():
    small, _ = build_problem(GOOD, [3], CANVAS, CONFIG)
    large, _ = build_problem(GOOD, [3], (128, 160), CONFIG)
    assert large.anchors is not small.anchors
    assert torch.equal(small.anchors, generate_anchors(CONFIG.anchors, CANVAS))
    assert torch.equal(large.anchors, generate_anchors(CONFIG.anchors, (128, 160)))
    assert large.grid.num_anchors == large.num_anchors != small.num_anchors


def test_generate_anchors_copies_the_sets_assign_keeps():
    """generate_anchors kept sets in a cache of its own: on canvases assign was not given
    (a trainer's anchors beside a loader's targets) 16 sets beside assign's 16, twice what
    the caches are sized for (466 MB at ~2,000 x 2,500 in each loader worker). Now it
    copies from the sets assign keeps: 16 in all, and the copy is the caller's."""
    config = CONFIG.replace(**{"anchors.levels[0].sizes": (31.0, 39.0, 49.0)}).anchors  # kept by no other test
    canvases = [(64, 64 + 8 * i) for i in range(32)]
    host = torch.device("cpu")
    assigned = [weakref.ref(grid_and_anchors(config, canvas, host)[1]) for canvas in canvases[:16]]
    for canvas in canvases[16:]:
        given = generate_anchors(config, canvas)
        assert torch.equal(given, resolve_grid(config, canvas).materialize())
        given.add_(1.0)  # the caller's own
        assert torch.equal(generate_anchors(config, canvas), resolve_grid(config, canvas).materialize())
    gc.collect()
    assert [ref() for ref in assigned] == [None] * 16  # the 16 kept are the last 16 canvases of either


def test_generate_anchors_of_over_a_million_anchors_copies_the_set_assign_keeps(monkeypatch):
    """Sets past the million anchors of the 16-set caches were built on every call; now
    generate_anchors copies the one assign keeps by bytes (``anchors._LargeSets``)."""
    config = CONFIG.replace(**{"anchors.levels[0].sizes": (31.0, 39.0, 49.0)}).anchors
    canvas = (2304, 2560)  # 1.1M anchors
    _, kept = grid_and_anchors(config, canvas, torch.device("cpu"))
    built, materialize = [], AnchorGrid.materialize
    monkeypatch.setattr(AnchorGrid, "materialize", lambda grid: built.append(grid) or materialize(grid))
    given = generate_anchors(config, canvas)
    assert built == [] and torch.equal(given, kept) and given.data_ptr() != kept.data_ptr()


def test_anchors_are_copied_to_a_device_once():
    # "meta" stands in for a GPU: a device other than the host, where anchors are copied to.
    meta = torch.device("meta")
    grid, anchors = grid_and_anchors(CONFIG.anchors, CANVAS, meta)
    assert anchors.device == meta and anchors.shape == generate_anchors(CONFIG.anchors, CANVAS).shape
    again = grid_and_anchors(CONFIG.anchors, CANVAS, meta)
    assert again[0] is grid and again[1] is anchors
    assert grid_and_anchors(CONFIG.anchors, CANVAS, torch.device("cpu"))[1] is not anchors


@pytest.fixture(params=["python", "torch"])
def box_check(request, monkeypatch):
    """Which check decides whether boxes may be invalid: Python floats (few boxes on the CPU)
    or torch ops (many boxes, or another device)."""
    if request.param == "torch":
        monkeypatch.setattr(problem_module, "_HOST_CHECK_MAX_BOXES", 0)
    return request.param


@pytest.mark.usefixtures("box_check")
def test_valid_boxes_are_not_looked_at_on_the_host(monkeypatch):
    def examine(*args):
        raise AssertionError("valid boxes went to the host")

    monkeypatch.setattr(problem_module, "_examine", examine)
    build_problem(GOOD, [2, 1], CANVAS, CONFIG, ignore_boxes=GOOD[:1], ignore_counts=[0, 1], anchors=GOOD)
    build_problem(torch.zeros(0, 4), [0], CANVAS, CONFIG)


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ([-math.inf, 0.0, 10.0, 10.0], "not finite"),
        ([0.0, 0.0, 10.0, math.inf], "not finite"),
        ([math.nan, math.nan, math.nan, math.nan], "not finite"),
        ([5.0, 0.0, 5.0, 10.0], r"x2 <= x1"),
        ([0.0, 5.0, 10.0, 5.0], r"y2 <= y1"),
        ([-10.0, 0.0, 0.0, 10.0], "wholly outside"),
        ([0.0, -10.0, 10.0, 0.0], "wholly outside"),
        ([96.0, 0.0, 100.0, 10.0], "wholly outside"),
        ([0.0, 64.0, 10.0, 70.0], "wholly outside"),
    ],
)
@pytest.mark.usefixtures("box_check")
def test_every_kind_of_invalid_box_is_caught(box, reason):
    with pytest.raises(ValueError, match=rf"gt_boxes: image 0, box 3: .*{reason}"):
        build_problem(torch.cat([GOOD, torch.tensor([box])]), [4], CANVAS, CONFIG)


@pytest.mark.usefixtures("box_check")
def test_explicit_anchors_may_leave_the_canvas_but_not_be_infinite():
    outside = torch.tensor([[-40.0, -40.0, -20.0, -20.0], [200.0, 100.0, 300.0, 150.0]])
    problem, _ = build_problem(GOOD, [3], CANVAS, CONFIG, anchors=outside)
    assert problem.grid is None and torch.equal(problem.anchors, outside)
    with pytest.raises(ValueError, match="anchors: anchor 1: coordinates are not finite"):
        build_problem(GOOD, [3], CANVAS, CONFIG, anchors=torch.tensor([[0.0, 0.0, 8.0, 8.0], [-math.inf, 0, 8, 8]]))


@pytest.mark.parametrize("name", ["anchors", "gt_boxes", "ignore_boxes"])
def test_more_boxes_than_int32_indices_are_refused_before_any_copy(name):
    """Explicit anchors past int32 indices reached the cpu kernel (writes out of bounds
    there, wrapped sparse indices); an expanded tensor holds them in 16 bytes, so the
    refusal must come before the float32 contiguous copy (32 GiB)."""
    many = torch.zeros(1, 4, dtype=torch.float64).expand(2**31, 4)
    box = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    inputs = {"gt_boxes": box, "counts": [1], "anchors": box}
    inputs |= {name: many, **({"counts": [2**31]} if name == "gt_boxes" else {})}
    inputs |= {"ignore_counts": [2**31]} if name == "ignore_boxes" else {}
    message = rf"{name}: 2,147,483,648 boxes, more than 2,147,483,647 \(box and anchor indices are int32\)"
    with pytest.raises(ValueError, match=message):
        build_problem(inputs.pop("gt_boxes"), inputs.pop("counts"), (8, 8), presets.get("retinanet_torchvision"),
                      **inputs)  # fmt: skip


@pytest.mark.usefixtures("box_check")
def test_a_box_reaching_past_2_31_pixels_is_invalid_an_anchor_is_not():
    """A box only has to touch the canvas, but one reaching ~1e37 pixels was matched and
    its delta overflowed to inf (ssd300's weights of 10). An explicit anchor may lie
    anywhere: one wider than float32 is kept (its width overflows float32, not Python's)."""
    below, at = 2.0**31 - 128, 2.0**31  # float32 neighbours
    for inside in ([-below, 0.0, 10.0, 10.0], [0.0, -below, 10.0, below]):
        build_problem(torch.tensor([inside]), [1], CANVAS, CONFIG)
    for far in ([-at, 0.0, 10.0, 10.0], [0.0, -at, 10.0, 10.0], [0.0, 0.0, at, 10.0], [0.0, 0.0, 10.0, 3e38]):
        with pytest.raises(ValueError, match=r"gt_boxes: image 0, box 0: reaches beyond ±2147483648 pixels"):
            build_problem(torch.tensor([far]), [1], CANVAS, CONFIG)
    huge = torch.tensor([[-3e38, 0.0, 3e38, 10.0]])
    problem, kept = build_problem(huge, [1], CANVAS, CONFIG, drop_invalid=True)
    assert kept.dropped[0].tolist() == [0]
    problem, _ = build_problem(GOOD, [2, 1], CANVAS, CONFIG, anchors=torch.cat([GOOD, huge]))
    assert torch.equal(problem.anchors[-1:], huge)


@pytest.mark.usefixtures("box_check")
def test_the_canvas_is_compared_in_float32():
    # torch compares x1 with the canvas width 2**24 + 1 in float32, where it is 2**24: this
    # box starts at the canvas's right edge. (Explicit anchors: none generated for it.)
    box = torch.tensor([[2.0**24, 0.0, 2.0**24 + 2, 10.0]])
    with pytest.raises(ValueError, match="gt_boxes: image 0, box 0: wholly outside"):
        build_problem(box, [1], (64, 2**24 + 1), CONFIG, anchors=GOOD)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # An invalid box is named before the arguments checked after its input...
        ({"image_sizes": [[64, 200]]}, "gt_boxes: image 0, box 3"),
        ({"ignore_boxes": GOOD}, "gt_boxes: image 0, box 3"),
        ({"ignore_boxes": INVALID, "ignore_counts": [1], "image_sizes": [[0, 1]]}, "gt_boxes: image 0, box 3"),
        # ... but not before those checked before it.
        ({"gt_classes": torch.zeros(2, dtype=torch.int64)}, r"gt_classes: expected shape \[4\]"),
        # Dropping is not an error: the bad argument is.
        ({"drop_invalid": True, "image_sizes": [[64, 200]]}, r"image_sizes\[0\]"),
    ],
)
def test_errors_come_in_the_documented_order(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_problem(torch.cat([GOOD, INVALID]), [4], CANVAS, CONFIG, **kwargs)


def test_an_image_without_width_is_refused():
    with pytest.raises(ValueError, match=r"image_sizes\[0\]: \(64, 0\) must be positive"):
        build_problem(GOOD, [3], CANVAS, CONFIG, image_sizes=[[64, 0]])


def test_a_pad_narrower_than_its_image_is_refused():
    """An image is padded to at least its own size, in width as in height."""
    with pytest.raises(ValueError, match=r"pad_sizes\[0\]: \(32, 40\) is smaller than image_sizes\[0\] \(32, 64\)"):
        build_problem(GOOD, [3], CANVAS, CONFIG, image_sizes=[[32, 64]], pad_sizes=[[32, 40]])


def test_invalid_anchor_is_named_before_gt_classes():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 5.0, 9.0]])
    with pytest.raises(ValueError, match="anchors: anchor 1"):
        build_problem(GOOD, [3], CANVAS, CONFIG, anchors=anchors, gt_classes=torch.zeros(2, dtype=torch.int64))


def test_invalid_ignore_box_is_named_before_image_sizes():
    with pytest.raises(ValueError, match="ignore_boxes: image 0, box 0"):
        build_problem(GOOD, [3], CANVAS, CONFIG, ignore_boxes=INVALID, ignore_counts=[1], image_sizes=[[0, 1]])


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_tensors(batch):
    counts = [3] + [0] * (batch - 1)
    sizes = [[64 - i, 96 - 2 * i] for i in range(batch)]
    ignore_counts = [0] * (batch - 1) + [1]
    for image_sizes, expected_sizes in ((None, [list(CANVAS)] * batch), (sizes, sizes)):
        problem, kept = build_problem(
            GOOD, torch.tensor(counts), CANVAS, CONFIG,
            ignore_boxes=GOOD[:1], ignore_counts=ignore_counts, image_sizes=image_sizes,
        )  # fmt: skip
        assert problem.gt_offsets.tolist() == [0] + [3] * batch
        assert problem.ignore_offsets.tolist() == [0] * batch + [1]
        assert problem.image_sizes.tolist() == expected_sizes
        for tensor in (problem.gt_offsets, problem.ignore_offsets, problem.image_sizes):
            assert tensor.dtype == torch.int64 and tensor.is_contiguous()
            assert tensor.data_ptr() % 16 == 0, "the Triton backend specialises on 16-byte alignment"
        assert kept.original_index is None and [d.tolist() for d in kept.dropped] == [[]] * batch


def test_dropping_renumbers_offsets_and_rows():
    boxes = torch.cat([GOOD[:1], INVALID, GOOD[1:]])
    classes = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    ignore = torch.cat([INVALID, GOOD[:1]])
    problem, kept = build_problem(
        boxes, [2, 2], CANVAS, CONFIG, gt_classes=classes, ignore_boxes=ignore, ignore_counts=[1, 1], drop_invalid=True
    )
    assert problem.gt_offsets.tolist() == [0, 1, 3]
    assert torch.equal(problem.gt_boxes, torch.cat([GOOD[:1], GOOD[1:]]))
    assert problem.gt_classes.tolist() == [1, 3, 4]
    assert [d.tolist() for d in kept.dropped] == [[1], []]
    assert kept.original_index.tolist() == [0, 0, 1]
    assert problem.ignore_offsets.tolist() == [0, 0, 1]
    assert torch.equal(problem.ignore_boxes, GOOD[:1])


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "cpu backend's compiled check"])
@pytest.mark.parametrize("anchors", [False, True])
def test_the_host_checks_agree_with_the_torch_rules(anchors, compiled):
    # Coordinates drawn from values on and around every rule's edge, box by box.
    edges = [-math.inf, -3e38, -(2.0**31), 128 - 2.0**31, -1.0, -0.0, 0.0, 1e-30, 5.0, 63.99, 64.0, 95.99, 96.0,
             100.0, 2.0**31 - 128, 2.0**31, 3e38, math.inf, math.nan]  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor(edges)[torch.randint(len(edges), (2000, 4), generator=generator)]
    counts = None if anchors else [1]
    host_check = cpu.boxes_valid if compiled else None
    for box in boxes:
        item = problem_module._Boxes("boxes", box[None], counts)
        rules = problem_module._invalid_reasons(box[None], None if anchors else CANVAS)
        assert problem_module._invalid_on_host(item, CANVAS, host_check) == bool(rules), box.tolist()
    # One call over many boxes finds the one invalid box wherever it is.
    valid = boxes[[not problem_module._invalid_reasons(b[None], None if anchors else CANVAS) for b in boxes]]
    assert problem_module._invalid_on_host(problem_module._Boxes("boxes", valid, counts), CANVAS, host_check) is False
    bad = valid.clone()
    bad[len(bad) // 2, 2] = math.nan
    assert problem_module._invalid_on_host(problem_module._Boxes("boxes", bad, counts), CANVAS, host_check) is True


def test_host_tensors_have_one_cached_copy():
    from tritarget.kernels.streams import stream_key

    assert stream_key(torch.device("cpu")) is None
    assert stream_key(torch.device("meta")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_cuda_stream_reads_cached_anchors_it_filled_itself():
    """The server's compute workers launch on streams of their own: a cached tensor
    shared between streams could be evicted and its memory reused by one stream while
    another's kernel still reads it. Each stream gets its own copy (same values), and
    the same stream gets the same copy again."""
    device = torch.device("cuda", torch.cuda.current_device())
    canvas = (224, 352)  # a canvas no other test caches
    copies = []
    for stream in (torch.cuda.Stream(device), torch.cuda.Stream(device)):
        with torch.cuda.stream(stream):
            grid, anchors = grid_and_anchors(CONFIG.anchors, canvas, device)
            assert grid_and_anchors(CONFIG.anchors, canvas, device)[1] is anchors
            copies.append(anchors)
        stream.synchronize()
    assert copies[0].data_ptr() != copies[1].data_ptr()
    assert torch.equal(copies[0], copies[1])
    assert torch.equal(copies[0].cpu(), generate_anchors(CONFIG.anchors, canvas))


def test_narrow_classes_are_widened_to_int32_once():
    """Problem.gt_classes is int32 (its documented type: what the kernels read) for int8/int16 classes."""
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    problem, _ = build_problem(boxes, [1], (96, 128), presets.get("retinanet_torchvision"),
                               gt_classes=torch.tensor([3], dtype=torch.int16))  # fmt: skip
    assert problem.gt_classes.dtype is torch.int32 and problem.gt_classes.tolist() == [3]
