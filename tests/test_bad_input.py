"""Every bad input gets a ValueError/TypeError naming what is wrong; drop_invalid drops and reports."""

import numpy as np
import pytest
import torch

from support import on_device, triton_runs_here
from tritarget.kernels import assign, assign_sparse, decode, encode, generate_anchors, level_slices, presets
from tritarget.kernels.anchors import check_canvas, feature_map_size, resolve_grid
from tritarget.kernels.api import resolve_backend

CANVAS = (64, 96)
CONFIG = presets.get("retinanet_torchvision")


def _assign(boxes, counts, **kwargs):
    kwargs.setdefault("backend", "reference")
    return assign(boxes, counts, CANVAS, CONFIG, **kwargs)


GOOD = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]])


@pytest.mark.parametrize(
    ("bad_box", "reason"),
    [
        ([10.0, 10.0, 10.0, 30.0], r"x2 <= x1"),
        ([10.0, 30.0, 20.0, 20.0], r"y2 <= y1"),
        ([float("nan"), 10.0, 20.0, 20.0], "not finite"),
        ([10.0, 10.0, float("inf"), 20.0], "not finite"),
        ([100.0, 10.0, 120.0, 20.0], "wholly outside the 64x96 canvas"),
        ([-30.0, 10.0, 0.0, 20.0], "wholly outside"),
        ([10.0, 10.0, 3e38, 10.5], "reaches beyond ±2147483648 pixels"),  # matched, its delta was inf
    ],
)
def test_invalid_box_is_named_by_image_and_box(bad_box, reason):
    boxes = torch.cat([GOOD, torch.tensor([bad_box])])
    with pytest.raises(ValueError, match=rf"gt_boxes: image 1, box 1: .*{reason}"):
        _assign(boxes, [2, 2])


def test_an_invalid_box_is_named_by_its_own_image():
    """The first box of the second image (row 1): not "image 0, box 1"."""
    boxes = torch.cat([GOOD[:1], torch.tensor([[30.0, 10.0, 20.0, 50.0]]), GOOD[:1]])
    with pytest.raises(ValueError, match=r"gt_boxes: image 1, box 0: degenerate box \(x2 <= x1\)"):
        _assign(boxes, [1, 2])


def test_numpy_flags_and_narrow_classes_are_taken():
    targets = _assign(GOOD, [3], drop_invalid=np.bool_(False), gt_classes=torch.tensor([3, 1, 2], dtype=torch.int16))
    assert (targets.labels == 1).any() and set(targets.classes[targets.labels == 1].tolist()) <= {1, 2, 3}


def test_drop_invalid_reports_and_keeps_original_indices():
    bad = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    boxes = torch.cat([GOOD[:1], bad, GOOD[1:]])  # image 0: good, bad, good; image 1: good
    dropped = _assign(boxes, [3, 1], drop_invalid=True)
    assert [d.tolist() for d in dropped.dropped] == [[1], []]
    clean = _assign(torch.cat([GOOD[:1], GOOD[1:]]), [2, 1])
    # matched_gt refers to the boxes as given: the second kept box of image 0 was box 2.
    expected = clean.matched_gt.clone()
    expected[0][expected[0] == 1] = 2
    assert torch.equal(dropped.labels, clean.labels)
    assert torch.equal(dropped.matched_gt, expected)
    assert torch.equal(dropped.deltas, clean.deltas)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])  # detectron2: every anchor keeps a box
def test_dropped_boxes_leave_the_other_images_and_indices_as_given(mode, backend):
    """Image 0 loses its box 1 of 3, image 1 (2 boxes) nothing, image 2 its only box:
    matched_gt equals that of the valid boxes alone, renumbered to the boxes as given."""
    config = CONFIG.replace(**{"match.low_quality": mode})
    bad = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    given = torch.cat([GOOD[:1], bad, GOOD[1:2], GOOD[1:3], bad])
    dropped = assign(given, [3, 2, 1], CANVAS, config, backend=backend, drop_invalid=True)
    clean = assign(torch.cat([GOOD[:2], GOOD[1:3]]), [2, 2, 0], CANVAS, config, backend=backend)
    assert [d.tolist() for d in dropped.dropped] == [[1], [], [0]]
    assert (clean.matched_gt[:2] == 1).any(dim=1).all()  # box 1 of images 0 and 1 matches anchors
    expected = clean.matched_gt.clone()
    expected[0] = torch.tensor([-1, 0, 2])[clean.matched_gt[0].long() + 1]  # kept box 1 was given as box 2
    assert torch.equal(dropped.matched_gt, expected)
    assert torch.equal(dropped.labels, clean.labels)


@pytest.mark.parametrize("function", [assign, assign_sparse])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_config_that_is_not_a_target_config_is_named(function, backend):
    named = r"config: expected TargetConfig, got str; .* presets.get\('retinanet_torchvision'\)"
    with pytest.raises(TypeError, match=named):
        function(GOOD, [3], CANVAS, "retinanet_torchvision", backend=backend)
    with pytest.raises(TypeError, match="config: expected TargetConfig, got dict$"):
        function(GOOD, [3], CANVAS, presets.get("retinanet_torchvision").to_dict(), backend=backend)


def test_drop_invalid_can_empty_an_image():
    boxes = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    targets = _assign(boxes, [1], drop_invalid=True)
    assert targets.dropped[0].tolist() == [0]
    assert (targets.labels == 0).all() and (targets.matched_gt == -1).all()


def test_zero_box_images_are_normal():
    targets = _assign(torch.zeros(0, 4), [0, 0])
    assert targets.labels.shape == (2, targets.num_anchors)
    assert (targets.labels == 0).all()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: _assign(GOOD, [2, 2]), ValueError, "gt_counts: counts sum to 4, but gt_boxes has 3 rows"),
        # A mutation review: no case held these (a sum below the rows, bools as counts, a 2-D count
        # tensor, counts for crowd regions that are not there).
        (lambda: _assign(GOOD, [2]), ValueError, "gt_counts: counts sum to 2, but gt_boxes has 3 rows"),
        (
            lambda: _assign(GOOD[:1], torch.tensor([True])),
            TypeError,
            "gt_counts: expected an integer tensor, got torch.bool",
        ),
        (lambda: _assign(GOOD[:1], [True]), TypeError, "gt_counts: expected integers"),
        (lambda: _assign(GOOD[:1], torch.tensor([[1]])), ValueError, r"gt_counts: expected shape \[B\], got \[1, 1\]"),
        (
            lambda: _assign(GOOD, [3], ignore_counts=[0]),
            ValueError,
            "ignore_boxes and ignore_counts must be given together",
        ),
        (lambda: _assign(GOOD, [4, -1]), ValueError, r"gt_counts\[1\]: negative count"),
        (lambda: _assign(GOOD, []), ValueError, "gt_counts: the batch is empty"),
        (lambda: _assign(torch.zeros(0, 4), []), ValueError, "batch is empty"),
        (lambda: _assign(GOOD, torch.tensor([1.0, 2.0])), TypeError, "gt_counts: expected an integer tensor"),
        (lambda: _assign(GOOD, [[3]]), TypeError, "gt_counts: expected integers"),
        (lambda: _assign(GOOD.long(), [3]), TypeError, "gt_boxes: expected a floating-point tensor"),
        (lambda: _assign(GOOD[:, :3], [3]), ValueError, r"gt_boxes: expected shape \[N, 4\]"),
        (lambda: _assign(GOOD.tolist(), [3]), TypeError, "gt_boxes: expected a torch.Tensor"),
        (lambda: _assign(GOOD, [3], gt_classes=torch.zeros(2, dtype=torch.int64)), ValueError, "gt_classes"),
        (lambda: _assign(GOOD, [3], gt_classes=torch.zeros(3)), TypeError, "gt_classes: expected an integer"),
        (
            lambda: _assign(GOOD, [3], gt_classes=torch.zeros(3, dtype=torch.complex64)),
            TypeError,
            "gt_classes: expected an integer tensor, got torch.complex64",
        ),
        (
            lambda: _assign(GOOD, [3], image_sizes=torch.ones(1, 2, dtype=torch.complex64)),
            TypeError,
            "image_sizes: expected integers",
        ),
        (lambda: _assign(GOOD, [3], ignore_boxes=GOOD), ValueError, "ignore_boxes and ignore_counts"),
        (lambda: _assign(GOOD, [3], ignore_boxes=GOOD, ignore_counts=[1, 2]), ValueError, "ignore_counts: has 2"),
        # fewer crowd counts than images (their sum right) would leave the last image without its offsets
        (lambda: _assign(GOOD, [2, 1], ignore_boxes=GOOD[:1], ignore_counts=[1]), ValueError, "ignore_counts: has 1"),
        (lambda: _assign(GOOD, [3], image_sizes=[[64, 200]]), ValueError, r"image_sizes\[0\]"),
        (lambda: _assign(GOOD, [3], image_sizes=[[64, 96], [1, 1]]), ValueError, r"image_sizes: expected shape"),
        (lambda: _assign(GOOD, [3], backend="gpu"), ValueError, "backend: must be one of"),
        (lambda: _assign(GOOD, [3], backend=["cpu"]), ValueError, "backend: must be one of"),
        (lambda: _assign(GOOD.to("meta"), [3], backend="cpu"), ValueError, "backend 'cpu' needs CPU tensors"),
        (lambda: _assign(GOOD, [3], anchors=torch.zeros(5, 3)), ValueError, r"anchors: expected shape"),
        (lambda: _assign(GOOD, [3], seed=[1, 2]), ValueError, "seed"),
        (lambda: assign(GOOD, [3], (64, 0), CONFIG, backend="reference"), ValueError, "canvas"),
        (lambda: assign(GOOD, [3], (0, 96), CONFIG, backend="cpu"), ValueError, r"must be positive, got \(0, 96\)"),
        (
            lambda: assign(GOOD, [3], (64, 96, 3), CONFIG, backend="reference"),
            TypeError,
            r"canvas: expected \(height, width\), got \(64, 96, 3\)",
        ),
        # The whole TargetConfig where its anchors go: "'TargetConfig' object has no attribute 'levels'".
        (
            lambda: level_slices(CONFIG, CANVAS),
            TypeError,
            r"expected AnchorConfig, got TargetConfig \(pass its .anchors\)",
        ),
        (
            lambda: resolve_grid(CONFIG, CANVAS),
            TypeError,
            r"expected AnchorConfig, got TargetConfig \(pass its .anchors\)",
        ),
        (lambda: generate_anchors(CONFIG, CANVAS), TypeError, r"got TargetConfig \(pass its .anchors\)"),
        # A count where one per image is wanted said "expected a torch.Tensor", though lists are taken.
        (lambda: _assign(GOOD, 3), TypeError, "gt_counts: expected a list, 1-D integer tensor or numpy array of per"),
        (lambda: _assign(GOOD, range(3, 4)), TypeError, "gt_counts: expected a list, .* got range"),
        (lambda: assign(GOOD, [3], (64.0, 96), CONFIG, backend="reference"), TypeError, "canvas"),
        (lambda: assign(GOOD, [3], (True, 96), CONFIG, backend="cpu"), TypeError, "canvas"),
        (lambda: assign(GOOD, [3], CANVAS, "retinanet", backend="reference"), TypeError, "config"),
        (lambda: _assign(GOOD, [3], image_sizes=[[60, 90], [64]]), TypeError, r"image_sizes: expected 1 \(height"),
        (lambda: _assign(GOOD, [3], image_sizes=["60x90"]), TypeError, "image_sizes: expected 1"),
        (lambda: _assign(GOOD, [3], pad_sizes=[torch.tensor([64, 96])]), TypeError, "pad_sizes: expected 1"),
        (lambda: _assign(GOOD, [np.float64(3)]), TypeError, "gt_counts: expected integers"),
        (lambda: assign(GOOD, [3], (np.float32(64), 96), CONFIG, backend="cpu"), TypeError, "canvas"),
        # Review 48: 2^63 overflowed the level tables (OverflowError), SSD's anchors turned inf.
        (
            lambda: assign(GOOD, [3], (300, 2**63), presets.get("ssd300_torchvision"), backend="cpu"),
            ValueError,
            r"canvas: a side is over 2,147,483,647 pixels, got \(300, 9223372036854775808\)",
        ),
        (
            lambda: generate_anchors(presets.get("ssd300_torchvision").anchors, (10**39, 10**39)),
            ValueError,
            "canvas: a side is over",
        ),
        # torch's own errors ("unsupported memory format option", "Cannot access data pointer").
        (
            lambda: _assign(GOOD.to_sparse(), [3], backend="cpu"),
            TypeError,
            r"gt_boxes: expected a dense \(strided\) tensor, got a sparse_coo one",
        ),
        (
            lambda: _assign(GOOD, torch.tensor([3]).to_sparse(), backend="reference"),
            TypeError,
            r"gt_counts: expected a dense \(strided\) tensor, got a sparse_coo one",
        ),
        # "iteration over a 0-d tensor", after the batch was solved.
        (
            lambda: _assign(GOOD, [3], seed=torch.tensor(1.5)),
            TypeError,
            r"seed: expected an int or 1 ints \(one per image\), got a 0-d torch.float32 Tensor",
        ),
        (lambda: encode(GOOD, GOOD, CONFIG), TypeError, r"config: expected EncodeConfig \(config.encode\)"),
        (lambda: decode(GOOD[None], GOOD, CONFIG.encode), ValueError, r"deltas: expected shape \[N, 4\]"),
        (lambda: encode(GOOD, GOOD[:2], CONFIG.encode), ValueError, "boxes and anchors: 3 rows against 2"),
        (lambda: _assign(GOOD, [3]).to(torch.float16), TypeError, "device: expected a torch.device"),
        # A "false" from a YAML or a CLI read as True (drop_invalid dropped boxes it should refuse).
        (lambda: _assign(GOOD, [3], drop_invalid="false"), TypeError, "drop_invalid: expected True or False"),
        (lambda: _assign(GOOD, [3], return_max_iou="no"), TypeError, "return_max_iou: expected True or False"),
        (
            lambda: assign_sparse(GOOD, [3], CANVAS, CONFIG, drop_invalid=1, backend="cpu"),
            TypeError,
            "drop_invalid: expected True or False, got 1",
        ),
    ],
)
def test_bad_argument_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("many", [False, True], ids=["few", "many"])  # listed / reduced on the host
@pytest.mark.parametrize("bad", [-1, 2**31, 2**32 + 7])  # 2^32 + 7 used to become class 7 (int32 output)
def test_a_class_outside_int32_is_named_not_wrapped(bad, many, device):
    boxes, counts = (GOOD.repeat(100, 1), [300]) if many else (GOOD, [3])
    classes = torch.ones(boxes.shape[0], dtype=torch.int64)
    classes[-2] = bad
    backends = ["reference", "cpu"] if device == "cpu" else ["reference", "triton"]
    for function in (assign, assign_sparse):
        for backend in backends:
            message = rf"gt_classes: image 0, box {boxes.shape[0] - 2}: class {bad} is outside"
            with pytest.raises(ValueError, match=message):
                function(boxes.to(device), counts, CANVAS, CONFIG, gt_classes=classes.to(device), backend=backend)
    edge = torch.full_like(classes, 2**31 - 1)  # the largest class passes unchanged
    targets = assign(boxes.to(device), counts, CANVAS, CONFIG, gt_classes=edge.to(device), backend=backends[1])
    assert targets.classes.max().item() == 2**31 - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["ignore_boxes", "anchors"])
def test_boxes_on_another_device_than_the_gt_boxes_are_named(name):
    # crowd regions or anchors left on the host beside CUDA gt boxes: named, not a device error inside a backend
    extra = {"ignore_boxes": GOOD[:1], "ignore_counts": [1]} if name == "ignore_boxes" else {"anchors": GOOD}
    with pytest.raises(ValueError, match=rf"{name}: on cpu, but gt_boxes are on cuda"):
        assign(GOOD.cuda(), [3], CANVAS, CONFIG, backend="reference", **extra)


@pytest.mark.parametrize("dtype", ["uint32", "uint64"])
def test_an_unsigned_class_outside_int32_is_named_not_wrapped(dtype):
    """Classes of an unsigned type were cast to int32 before the check: 2**32 + 7 became
    class 7, and 2**32 - 1 was named as class -1."""
    dtype = getattr(torch, dtype, None)
    if dtype is None:
        pytest.skip("this torch has no such dtype")
    bad = 2**32 - 1 if dtype == torch.uint32 else 2**32 + 7
    classes = torch.tensor([1, bad, 2], dtype=dtype)
    for function in (assign, assign_sparse):
        for backend in ("reference", "cpu"):
            with pytest.raises(ValueError, match=rf"gt_classes: image 0, box 1: class {bad} is outside \[0, 2147"):
                function(GOOD, [3], CANVAS, CONFIG, gt_classes=classes, backend=backend)
    fine = torch.tensor([1, 2**31 - 1, 0], dtype=dtype)
    got = assign(GOOD, [3], CANVAS, CONFIG, gt_classes=fine, backend="cpu", return_max_iou=True)
    want = assign(GOOD, [3], CANVAS, CONFIG, gt_classes=fine.to(torch.int64), backend="reference", return_max_iou=True)
    assert torch.equal(got.classes, want.classes) and got.classes.max().item() == 2**31 - 1


def test_a_bad_class_is_named_by_its_image_and_box():
    """As a bad box is: it was named by its place in the batch's joined classes."""
    classes = torch.tensor([1, 2, 3, 4, -1])
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=r"^gt_classes: image 1, box 1: class -1 is outside"):
            assign(torch.cat([GOOD, GOOD[:2]]), [3, 2], CANVAS, CONFIG, gt_classes=classes, backend=backend)


@pytest.mark.parametrize("many", [False, True], ids=["few", "many"])  # listed / reduced on the host
@pytest.mark.parametrize("dtype", ["int8", "int16", "uint8", "uint16", "uint32", "uint64"])
def test_classes_of_a_narrow_type_are_checked_by_value(dtype, many):
    """int8 and int16 classes were compared with 2^31 - 1 in their own type, which wraps it
    to -1: past 128 boxes every class was refused, and below a valid one was named instead
    of the negative one; uint16-64 past 128 boxes stopped in torch's aminmax, which has no
    kernel for them."""
    dtype = getattr(torch, dtype, None)
    if dtype is None:
        pytest.skip("this torch has no such dtype")
    boxes, counts = (GOOD.repeat(100, 1), [300]) if many else (GOOD, [3])
    classes = torch.arange(boxes.shape[0]) % 7 + 1
    want = assign(boxes, counts, CANVAS, CONFIG, gt_classes=classes, backend="reference")
    for function in (assign, assign_sparse):
        for backend in ("reference", "cpu"):
            got = function(boxes, counts, CANVAS, CONFIG, gt_classes=classes.to(dtype), backend=backend)
            assert torch.equal(got.classes if function is assign else got.to_dense().classes, want.classes)
    if dtype.is_signed:
        classes[-2] = -1
        with pytest.raises(ValueError, match=rf"gt_classes: image 0, box {boxes.shape[0] - 2}: class -1 is outside"):
            assign(boxes, counts, CANVAS, CONFIG, gt_classes=classes.to(dtype), backend="cpu")


def test_an_invalid_box_wins_over_an_invalid_class_on_every_backend():
    boxes = torch.cat([GOOD[:1], torch.tensor([[20.0, 20.0, 20.0, 30.0]])])
    backends = ["reference", "cpu", *(["triton"] if triton_runs_here() else [])]
    for function in (assign, assign_sparse):
        for backend in backends:
            with pytest.raises(ValueError, match="gt_boxes: image 0, box 1: degenerate box"):
                on_device(function, boxes, [2], CANVAS, CONFIG, backend=backend, gt_classes=torch.tensor([1, -1]))


def test_invalid_ignore_box_is_named():
    with pytest.raises(ValueError, match=r"ignore_boxes: image 0, box 0: degenerate"):
        _assign(GOOD, [3], ignore_boxes=torch.tensor([[5.0, 5.0, 5.0, 9.0]]), ignore_counts=[1])


def test_numpy_integers_are_integers():
    expected = _assign(GOOD, [3], backend="cpu")
    for backend in ("reference", "cpu"):
        got = assign(GOOD, [np.int64(3)], (np.int64(64), np.int32(96)), CONFIG, backend=backend)
        assert torch.equal(got.labels, expected.labels)


def test_a_canvas_side_of_exactly_int32_max_is_taken_one_more_is_refused():
    # the wire and the kernels' indices hold a side as int32: 2**31 - 1 is the largest canvas side, on either axis
    assert check_canvas((2**31 - 1, 2**31 - 1)) == (2**31 - 1, 2**31 - 1)
    for canvas in ((2**31, 8), (8, 2**31)):
        with pytest.raises(ValueError, match="canvas: a side is over 2,147,483,647 pixels"):
            check_canvas(canvas)


@pytest.mark.parametrize(
    "canvas",
    [[61, 99], (np.uint16(61), np.uint8(99)), [np.uint64(61), np.uint32(99)]],
    ids=["list", "uint", "uint_list"],
)
def test_a_canvas_as_a_list_or_of_unsigned_numpy_ints_is_taken_as_its_ints(canvas):
    """As (61, 99), a tuple of plain ints (what keys the anchor caches): negating an unsigned
    side, as the feature maps' ceiling division does, wraps around (uint8 -99 is 157)."""
    checked = check_canvas(canvas)
    assert checked == (61, 99) and all(type(side) is int for side in checked)
    maps = [feature_map_size((61, 99), level) for level in CONFIG.anchors.levels]
    assert generate_anchors(CONFIG.anchors, canvas).shape == (9 * sum(h * w for h, w in maps), 4)
    for backend in ("reference", "cpu"):
        got = assign(GOOD, [3], canvas, CONFIG, backend=backend)
        expected = assign(GOOD, [3], (61, 99), CONFIG, backend=backend)
        assert torch.equal(got.labels, expected.labels) and torch.equal(got.matched_gt, expected.matched_gt)


def test_numpy_arrays_of_any_strides_are_taken_and_other_dtypes_named():
    """A reversed view ([::-1], negative strides) raised torch's "At least one stride in
    the given numpy array is negative"; an object array, "can't convert np.ndarray of
    type numpy.object_": neither named its argument."""
    sizes = np.array([[60, 90], [64, 80]])
    expected = _assign(GOOD, [1, 2], image_sizes=torch.tensor([[64, 80], [60, 90]]))
    got = _assign(GOOD, np.array([2, 1])[::-1], image_sizes=sizes[::-1])
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.matched_gt, expected.matched_gt)
    with pytest.raises(TypeError, match="gt_counts: expected integers, got a numpy array of object"):
        _assign(GOOD, np.array([1, 2], dtype=object))
    with pytest.raises(TypeError, match="image_sizes: expected integers, got a numpy array of <U2"):
        _assign(GOOD, [3], image_sizes=np.array([["64", "96"]]))


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_meta_tensors_are_refused_by_name(backend):
    """torch's "Cannot copy out of meta tensor; no data!" named no argument, and "auto"
    took a device it cannot run on for the cpu backend's."""
    meta = GOOD.to("meta")
    message = "backend 'cpu' needs CPU tensors" if backend == "cpu" else "(gt_boxes: a tensor on the meta device|auto)"
    with pytest.raises(ValueError, match=message):
        _assign(meta, [3], backend=backend)
    with pytest.raises(ValueError, match="gt_counts: a tensor on the meta device has no values"):
        _assign(GOOD, torch.tensor([3], device="meta"))


def test_backends_resolve_by_the_device_of_the_tensors():
    """``auto`` is triton on a CUDA device and cpu on the host, and names any other device;
    a named backend stays as named, except cpu for tensors that are not on the host (no GPU
    is needed to resolve a CUDA device)."""
    cuda, host, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    assert resolve_backend("auto", cuda) == "triton" and resolve_backend("auto", host) == "cpu"
    assert [resolve_backend(name, host) for name in ("reference", "cpu", "triton")] == ["reference", "cpu", "triton"]
    assert resolve_backend("reference", meta) == "reference" and resolve_backend("triton", cuda) == "triton"
    with pytest.raises(ValueError, match="backend 'auto': tensors on meta; move them to the CPU or a CUDA GPU"):
        resolve_backend("auto", meta)
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got tensors on cuda"):
        resolve_backend("cpu", cuda)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_targets_never_join_the_callers_graph(backend):
    """Boxes or anchors that require grad: the targets are data on every backend (the
    reference's deltas were a function of the boxes, numpy() on them raised)."""
    boxes = GOOD.clone().requires_grad_()
    anchors = generate_anchors(CONFIG.anchors, CANVAS).clone().requires_grad_()
    for targets in (_assign(boxes, [3], backend=backend, return_max_iou=True),
                    _assign(boxes, [3], backend=backend, anchors=anchors)):  # fmt: skip
        assert not any(t.requires_grad for t in (targets.deltas, targets.labels, targets.matched_gt))
        assert targets.max_iou is None or not targets.max_iou.requires_grad
        targets.deltas.numpy()
    sparse = assign_sparse(boxes, [3], CANVAS, CONFIG, backend=backend)
    assert not sparse.positive_deltas.requires_grad
    crowd = GOOD[:1].clone().requires_grad_()
    targets = _assign(boxes, [3], backend=backend, ignore_boxes=crowd, ignore_counts=[1], return_max_iou=True)
    assert not any(t.requires_grad for t in (targets.deltas, targets.max_iou))


def test_targets_compare_by_identity_and_move_without_changing_dtypes():
    targets = _assign(GOOD, [3])
    assert targets == targets and targets != _assign(GOOD, [3])  # no "truth value of a tensor" error
    assert targets.to_sparse() != targets.to_sparse()
    moved = targets.to("cpu", non_blocking=True)
    assert moved.labels.dtype == torch.int8 and torch.equal(moved.labels, targets.labels)
    assert targets.to_sparse().to(torch.device("cpu"), non_blocking=True).positive_anchors.dtype == torch.int32


def test_targets_saved_with_torch_save_load_with_weights_only(tmp_path):
    for function in (assign, assign_sparse):
        targets = function(GOOD, [2, 1], CANVAS, CONFIG, gt_classes=torch.tensor([3, 1, 2]), backend="cpu")
        torch.save(targets, tmp_path / "targets.pt")
        loaded = torch.load(tmp_path / "targets.pt")  # weights_only=True, torch's default
        assert type(loaded) is type(targets)
        for name, value in vars(targets).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(loaded, name), value), name
            elif name in ("dropped", "dropped_ignore"):
                assert [d.tolist() for d in getattr(loaded, name)] == [d.tolist() for d in value], name
            else:
                assert getattr(loaded, name) == value, name


def test_float64_boxes_are_accepted_as_float32():
    assert torch.equal(_assign(GOOD.double(), [3]).labels, _assign(GOOD, [3]).labels)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    ("name", "bad_box", "reason"),
    [
        ("gt_boxes", [10.0, 10.0, 1e39, 50.0], "not finite"),  # finite in float64
        ("gt_boxes", [10.0, 10.0, 10.000000001, 50.0], r"x2 <= x1"),  # not degenerate in float64
        ("ignore_boxes", [10.0, 10.0, 1e39, 50.0], "not finite"),
        ("anchors", [10.0, 10.0, 10.000000001, 50.0], r"x2 <= x1"),
    ],
)
def test_a_float64_box_invalid_once_rounded_says_so(name, bad_box, reason, backend):
    """Its values are shown as checked, rounded: the error says why they differ from the caller's."""
    boxes = {"gt_boxes": GOOD, "ignore_boxes": GOOD[:1], "anchors": GOOD}
    boxes[name] = torch.cat([boxes[name], torch.tensor([bad_box], dtype=torch.float64)])
    counts = {"gt_boxes": [3], "ignore_boxes": [1]}
    counts[name] = [counts.get(name, [0])[0] + 1]
    rounded = r"\(given as torch.float64, checked rounded to float32\)"
    with pytest.raises(ValueError, match=rf"{name}: .*{reason}.*{rounded}"):
        _assign(boxes["gt_boxes"], counts["gt_boxes"], ignore_boxes=boxes["ignore_boxes"],
                ignore_counts=counts["ignore_boxes"], anchors=boxes["anchors"], backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match=r"^(?!.*given as)"):  # float32 boxes: shown as given
        _assign(GOOD, [3], anchors=torch.tensor([[10.0, 10.0, 10.0, 50.0]]), backend=backend)


@pytest.mark.parametrize(
    ("bad_anchor", "reason"),
    [
        ([10.0, 10.0, 10.0, 20.0], r"x2 <= x1"),
        ([10.0, 10.0, 20.0, 5.0], r"y2 <= y1"),
        ([float("nan"), 10.0, 20.0, 20.0], "not finite"),
    ],
)
def test_degenerate_explicit_anchor_is_named(bad_anchor, reason):
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], bad_anchor])
    with pytest.raises(ValueError, match=rf"anchors: anchor 1: .*{reason}"):
        _assign(GOOD, [3], anchors=anchors)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("function", [assign, assign_sparse])
def test_the_empty_dropped_lists_of_a_result_are_its_own(function, backend):
    """One tensor shared by every image that lost no box, resized and filled through one
    result (``resize_``), showed in every later result."""
    config = presets.get("retinanet_torchvision")
    boxes = torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 8.0, 50.0, 40.0]])
    first = function(boxes, [1, 1], (64, 96), config, backend=backend)
    first.dropped[0].resize_(3).fill_(5)
    first.dropped_ignore[1].resize_(2).fill_(7)
    later = function(boxes, [1, 1], (64, 96), config, backend=backend)
    assert [d.tolist() for d in later.dropped + later.dropped_ignore] == [[]] * 4
    assert [d.tolist() for d in first.dropped] == [[5, 5, 5], []]
