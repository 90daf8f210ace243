"""Backends that read every gt box check them as they read them (``CHECKS_GT_BOXES``):
the cpu backend in the C call that solves them, the triton backend in ``gather_kernel``
(``segments_kernel`` with the pair walk: every test runs with both matchings), whose
flag comes back after the launches (with the lists' lengths, sparse). ``build_problem`` then
skips its own pass over the gt boxes (on a GPU, a read-back before the launches); a
backend that finds a box which may be invalid raises ``CheckBoxesFirst``, and ``assign``
builds the problem again with the full check, which raises or drops as it always did."""

import dataclasses
import importlib
import math

import pytest
import torch

from support import triton_runs_here
from tritarget.kernels import assign, assign_sparse, cpu, presets
from tritarget.kernels import problem as problem_module
from tritarget.kernels.problem import CheckBoxesFirst, build_problem

CANVAS = (64, 96)
CONFIG = presets.get("retinanet_torchvision")
GOOD = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]])
# x1 = 70 lies past the canvas height (64) but inside its width (96): valid, unless the
# check mixed up the canvas's sides (then it would flag this box and pass [0, 64, ...]).
BESIDE_THE_HEIGHT = torch.tensor([[70.0, 10.0, 90.0, 30.0]])
INVALID_KINDS = [
    [-math.inf, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, math.inf],
    [math.nan, math.nan, math.nan, math.nan],
    [5.0, 0.0, 5.0, 10.0],
    [0.0, 5.0, 10.0, 5.0],
    [-10.0, 0.0, 0.0, 10.0],
    [0.0, -10.0, 10.0, 0.0],
    [96.0, 0.0, 100.0, 10.0],
    [0.0, 64.0, 10.0, 70.0],
    [0.0, 0.0, 2.0**31, 10.0],  # x2 exactly at BOX_REACH: the reach is an open interval
]


TRITON = pytest.mark.skipif(not triton_runs_here(), reason="the triton backend needs a CUDA GPU or its interpreter")


@pytest.fixture(autouse=True, params=["gather", "walk"])
def matching(request, monkeypatch):
    """The triton backend's matching (``_Meta.matching``): each checks the boxes in its own kernel."""
    if importlib.util.find_spec("triton") is not None:
        from tritarget.kernels import triton_backend

        for meta in ("_INTERPRETED", "_COMPILED"):
            changed = dataclasses.replace(getattr(triton_backend, meta), matching=request.param)
            monkeypatch.setattr(triton_backend, meta, changed)
    return request.param


SOLVERS = [
    ("cpu", "solve"),
    ("cpu", "solve_sparse"),
    pytest.param("triton", "solve", marks=TRITON),
    pytest.param("triton", "solve_sparse", marks=TRITON),
]


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _solve(backend: str, function: str, boxes: torch.Tensor, counts: list[int], check: bool, **kwargs):
    module = importlib.import_module(f"tritarget.kernels.{'triton_backend' if backend == 'triton' else 'cpu'}")
    assert function in module.CHECKS_GT_BOXES
    device = _device(backend)
    problem, _ = build_problem(boxes.to(device), counts, kwargs.pop("canvas", CANVAS), CONFIG,
                               check_gt_boxes=check, **kwargs)  # fmt: skip
    return getattr(module, function)(problem)


@pytest.mark.parametrize(("backend", "function"), SOLVERS)
@pytest.mark.parametrize("box", INVALID_KINDS, ids=[str(box) for box in INVALID_KINDS])
def test_a_backend_refuses_an_invalid_box_it_was_left_to_check(backend, function, box):
    boxes = torch.cat([GOOD[:2], BESIDE_THE_HEIGHT, torch.tensor([box])])
    with pytest.raises(CheckBoxesFirst):
        _solve(backend, function, boxes, [2, 2], check=False)


@pytest.mark.parametrize(("backend", "function"), SOLVERS)
def test_valid_boxes_left_to_the_backend_give_the_checked_targets(backend, function):
    boxes = torch.cat([GOOD, BESIDE_THE_HEIGHT])
    unchecked = _solve(backend, function, boxes, [2, 2], check=False)
    checked = _solve(backend, function, boxes, [2, 2], check=True)
    names = ("labels", "matched_gt", "deltas") if function == "solve" else ("positive_anchors", "ignored_anchors")
    for name in names:
        assert torch.equal(getattr(unchecked, name), getattr(checked, name)), name


@TRITON
@pytest.mark.parametrize("function", ["solve", "solve_sparse"])
@pytest.mark.parametrize("bad_class", [-1, 2**31])
def test_classes_left_to_the_backend_are_checked_there(function, bad_class):
    """Classes given on a device go to the triton backend unchecked with the boxes
    (``Problem.gt_classes_checked``), which reads their extremes back with its flag:
    class 0 and the largest int32 class pass, one past it or below 0 does not."""
    from tritarget.kernels import triton_backend

    boxes = torch.cat([GOOD, BESIDE_THE_HEIGHT])
    classes = torch.tensor([0, 2, 2**31 - 1, 4])
    device = _device("triton")
    solve = getattr(triton_backend, function)
    problem, _ = build_problem(boxes.to(device), [2, 2], CANVAS, CONFIG, gt_classes=classes.to(device),
                               check_gt_boxes=False)  # fmt: skip
    assert problem.gt_classes_checked == (device.type == "cpu")  # on a GPU, left to the backend
    left = dataclasses.replace(problem, gt_classes_checked=False)
    checked, _ = build_problem(boxes.to(device), [2, 2], CANVAS, CONFIG, gt_classes=classes.to(device))
    got, expected = solve(left), solve(checked)
    names = ("labels", "matched_gt", "classes") if function == "solve" else ("positive_anchors", "positive_classes")
    for name in names:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    with pytest.raises(CheckBoxesFirst):
        solve(dataclasses.replace(left, gt_classes=classes.index_fill(0, torch.tensor([2]), bad_class).to(device)))
    # No box, no class: nothing to check, nothing matched.
    empty, _ = build_problem(GOOD[:0].to(device), [0, 0], CANVAS, CONFIG, gt_classes=classes[:0].to(device),
                             check_gt_boxes=False)  # fmt: skip
    got, expected = solve(dataclasses.replace(empty, gt_classes_checked=False)), solve(empty)
    for name in names:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@TRITON
@pytest.mark.parametrize("function", ["solve", "solve_sparse"])
@pytest.mark.parametrize("left", ["gt_classes_checked", "ignore_boxes_checked"])
def test_classes_or_ignore_boxes_left_alone_to_the_backend_are_checked_there(function, left):
    """Checked gt boxes do not make the rest checked: classes or ignore boxes left to the
    backend alone are still checked there, valid ones solved, an invalid one refused."""
    from tritarget.kernels import triton_backend

    device, solve = _device("triton"), getattr(triton_backend, function)
    problem, _ = build_problem(GOOD.to(device), [2, 1], CANVAS, CROWD_CONFIGS["IoF rule"],
                               gt_classes=torch.tensor([1, 2, 3]).to(device), ignore_boxes=GOOD[:1].to(device),
                               ignore_counts=[1, 0])  # fmt: skip
    assert problem.gt_boxes_checked
    bad = {"gt_classes_checked": {"gt_classes": torch.tensor([1, -1, 3]).to(device)},
           "ignore_boxes_checked": {"ignore_boxes": torch.tensor([INVALID_KINDS[3]]).to(device)}}[left]  # fmt: skip
    assert solve(dataclasses.replace(problem, **{left: False})) is not None
    with pytest.raises(CheckBoxesFirst):
        solve(dataclasses.replace(problem, **{left: False}, **bad))


@TRITON
@pytest.mark.parametrize("function", ["solve", "solve_sparse"])
def test_what_no_launch_would_check_comes_back_unchecked(function, matching):
    """Without anchors no kernel runs, so none checks the boxes: a problem that left gt
    boxes or ignore boxes to the backend comes back (``CheckBoxesFirst``, for the full
    check on the host) whatever they hold, and one with nothing to check gets its empty
    targets. With anchors and nothing to check either matching solves it."""
    from tritarget.kernels import triton_backend

    device, solve = _device("triton"), getattr(triton_backend, function)
    none = GOOD[:0].to(device)
    boxes, _ = build_problem(GOOD.to(device), [2, 1], CANVAS, CONFIG, anchors=none, check_gt_boxes=False)
    crowd, _ = build_problem(none, [0, 0], CANVAS, CONFIG, anchors=none, ignore_boxes=GOOD[:1].to(device),
                             ignore_counts=[1, 0], check_gt_boxes=False)  # fmt: skip
    for left in (boxes, dataclasses.replace(crowd, gt_boxes_checked=True, ignore_boxes_checked=False)):
        with pytest.raises(CheckBoxesFirst):
            solve(left)
    for anchors in (none, None):
        nothing, _ = build_problem(none, [0, 0], CANVAS, CONFIG, anchors=anchors, check_gt_boxes=False)
        assert not nothing.gt_boxes_checked
        targets = solve(nothing).to("cpu")
        sparse = targets if function == "solve_sparse" else targets.to_sparse()
        assert sparse.num_anchors == nothing.num_anchors and sparse.positive_offsets.tolist() == [0, 0, 0]
        assert sparse.ignored_offsets.tolist() == [0, 0, 0]


# Every preset leaves crowd regions unused (ignore_iof_thr -1): mmdet's IoF rule is a setting.
CROWD_CONFIGS = {
    "IoF rule": presets.get("retinanet_mmdet").replace(**{"match.ignore_iof_thr": 0.5}),
    "no rule": CONFIG,
    "no low-quality stage": CONFIG.replace(**{"match.low_quality": "none"}),
    "ssd_forced": presets.get("ssd300_torchvision"),
}


@TRITON
@pytest.mark.parametrize("function", ["solve", "solve_sparse"])
@pytest.mark.parametrize("config", CROWD_CONFIGS)
@pytest.mark.parametrize("inline", [False, True], ids=["", "matching inline"])
def test_ignore_boxes_left_to_the_backend_are_checked_there(function, config, inline, matching, monkeypatch):
    """Ignore boxes on a device go to the triton backend unchecked with the gt boxes
    (``Problem.ignore_boxes_checked``; on a GPU, see the test below), whose kernels test
    them whether or not the config's rules read them: an invalid one in any image raises
    ``CheckBoxesFirst``, valid ones give the checked targets. Image 1 has more of them
    than one step of either kernel's loop takes (64 at a time in the gather, interpreted;
    128 in the walk's first program)."""
    from tritarget.kernels import triton_backend

    if inline and matching == "walk":
        pytest.skip("matching inline is the gather's variant")
    for meta in ("_INTERPRETED", "_COMPILED"):
        changed = dataclasses.replace(getattr(triton_backend, meta), inline_match=inline)
        monkeypatch.setattr(triton_backend, meta, changed)
    device, config = _device("triton"), CROWD_CONFIGS[config]
    solve = getattr(triton_backend, function)
    ignore = torch.cat([torch.tensor([[0.0, 0.0, 40.0, 40.0]]),
                        torch.tensor([[50.0, 10.0, 90.0, 60.0], [0.0, 0.0, 30.0, 30.0]]).repeat(150, 1)])  # fmt: skip
    last = ignore.shape[0] - 1

    def problem(gt_counts, checked, invalid=None):
        """Image 1's last ignore box replaced by ``invalid``, after build_problem's check."""
        built, _ = build_problem(GOOD[: sum(gt_counts)].to(device), gt_counts, CANVAS, config,
                                 ignore_boxes=ignore.to(device), ignore_counts=[1, last],
                                 check_gt_boxes=checked)  # fmt: skip
        if checked:
            return built
        boxes = ignore if invalid is None else ignore.index_copy(0, torch.tensor([last]), torch.tensor([invalid]))
        return dataclasses.replace(built, ignore_boxes=boxes.to(device), ignore_boxes_checked=False)

    names = ("labels", "matched_gt") if function == "solve" else ("positive_anchors", "ignored_anchors")
    for counts in ([2, 1], [0, 0]):
        if counts == [0, 0] and matching == "walk":  # segments_kernel runs per gt box: none runs
            with pytest.raises(CheckBoxesFirst):
                solve(problem(counts, checked=False))
            continue
        got, expected = solve(problem(counts, checked=False)), solve(problem(counts, checked=True))
        for name in names:
            assert torch.equal(getattr(got, name), getattr(expected, name)), (counts, name)
        # The rule is the gt boxes' (every kind in the test above): a NaN, a degenerate box
        # and one past the canvas's height here.
        for box in [INVALID_KINDS[2], INVALID_KINDS[3], INVALID_KINDS[8]][: 3 if counts == [2, 1] else 1]:
            with pytest.raises(CheckBoxesFirst):
                solve(problem(counts, checked=False, invalid=box))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_classes_and_crowd_regions_on_the_gpu_ride_on_a_read_back_made_anyway():
    """Explicit anchors on the GPU are read back before the launches: classes and crowd
    regions there join that read rather than the backend's after them. Without explicit
    anchors both go to the backend with the gt boxes."""
    classes, ignore, anchors = torch.tensor([1, 2, 3]).cuda(), GOOD[:1].cuda(), GOOD.cuda()
    crowd = dict(ignore_boxes=ignore, ignore_counts=[1], check_gt_boxes=False)
    alone, _ = build_problem(GOOD.cuda(), [3], CANVAS, CONFIG, gt_classes=classes, **crowd)
    assert not alone.gt_classes_checked and not alone.ignore_boxes_checked
    with_anchors, _ = build_problem(GOOD.cuda(), [3], CANVAS, CONFIG, gt_classes=classes, anchors=anchors, **crowd)
    assert with_anchors.gt_classes_checked and with_anchors.ignore_boxes_checked
    with pytest.raises(ValueError, match=r"gt_classes: image 0, box 1: class -1 is outside"):
        build_problem(GOOD.cuda(), [3], CANVAS, CONFIG, gt_classes=torch.tensor([1, -1, 3]).cuda(), anchors=anchors,
                      **crowd)  # fmt: skip
    with pytest.raises(ValueError, match="ignore_boxes: image 0, box 0: degenerate box"):
        build_problem(GOOD.cuda(), [3], CANVAS, CONFIG, anchors=anchors,
                      **{**crowd, "ignore_boxes": torch.tensor([INVALID_KINDS[3]]).cuda()})  # fmt: skip


@pytest.mark.parametrize("function", ["solve", "solve_sparse"])
@pytest.mark.parametrize("left", ["gt_classes_checked", "ignore_boxes_checked"])
def test_the_cpu_backend_refuses_classes_and_ignore_boxes_left_to_it(function, left):
    """It is given CPU tensors, whose classes and ignore boxes build_problem checks: its
    kernel does not."""
    problem, _ = build_problem(GOOD, [3], CANVAS, CONFIG, gt_classes=torch.tensor([1, 2, 3]), ignore_boxes=GOOD[:1],
                               ignore_counts=[1], check_gt_boxes=False)  # fmt: skip
    assert getattr(cpu, function)(problem) is not None
    with pytest.raises(CheckBoxesFirst):
        getattr(cpu, function)(dataclasses.replace(problem, **{left: False}))


@pytest.mark.parametrize(("backend", "function"), SOLVERS)
def test_the_backends_compare_with_the_canvas_in_float32(backend, function):
    # In float32 the canvas width 2**24 + 1 is 2**24, where this box starts: outside, as
    # build_problem finds it. (Explicit anchors: none generated for so wide a canvas.)
    box = torch.tensor([[2.0**24, 0.0, 2.0**24 + 2, 10.0]])
    anchors = GOOD.to(_device(backend))
    with pytest.raises(CheckBoxesFirst):
        _solve(backend, function, box, [1], check=False, canvas=(64, 2**24 + 1), anchors=anchors)


@pytest.mark.parametrize("function", [assign, assign_sparse])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=TRITON)])
def test_assign_raises_and_drops_as_before(function, backend):
    device = _device(backend)
    boxes = torch.cat([GOOD[:1], torch.tensor([INVALID_KINDS[3]]), GOOD[1:]]).to(device)
    with pytest.raises(ValueError, match=r"gt_boxes: image 0, box 1: degenerate box \(x2 <= x1\): \[[^]]*\]; pass"):
        function(boxes, [3, 1], CANVAS, CONFIG, backend=backend)  # the only invalid box: no "more" count
    twice = torch.cat([boxes, torch.tensor([INVALID_KINDS[3]] * 2).to(device)])
    with pytest.raises(ValueError, match=r"image 0, box 1: degenerate box .* \(2 more invalid boxes\); pass"):
        function(twice, [3, 3], CANVAS, CONFIG, backend=backend)
    ours = function(boxes, [3, 1], CANVAS, CONFIG, backend=backend, drop_invalid=True).to("cpu")
    reference = function(boxes.cpu(), [3, 1], CANVAS, CONFIG, backend="reference", drop_invalid=True)
    assert [d.tolist() for d in ours.dropped] == [[1], []]
    sparse = (ours, reference) if function is assign_sparse else (ours.to_sparse(), reference.to_sparse())
    for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "ignored_anchors"):
        assert torch.equal(getattr(sparse[0], name), getattr(sparse[1], name)), name


@TRITON
@pytest.mark.parametrize(("function", "solver"), [(assign, "solve"), (assign_sparse, "solve_sparse")])
def test_a_box_reaching_past_2_31_pixels_is_flagged_and_refused_by_the_full_check(function, solver):
    # Its width overflows float32 (it was a box only float32 doubted, solved as valid): the
    # kernel flags it, and the check on the host names it or drops it.
    huge = torch.tensor([[-3e38, 0.0, 3e38, 10.0]])
    boxes = torch.cat([GOOD, huge])
    with pytest.raises(CheckBoxesFirst):
        _solve("triton", solver, boxes, [2, 2], check=False)
    with pytest.raises(ValueError, match=r"gt_boxes: image 1, box 1: reaches beyond ±2147483648 pixels"):
        function(boxes.to(_device("triton")), [2, 2], CANVAS, CONFIG, backend="triton")
    ours = function(boxes.to(_device("triton")), [2, 2], CANVAS, CONFIG, backend="triton", drop_invalid=True)
    reference = function(boxes, [2, 2], CANVAS, CONFIG, backend="reference", drop_invalid=True)
    ours = ours.to("cpu")
    if function is assign:
        ours, reference = ours.to_sparse(), reference.to_sparse()
    assert ours.dropped[1].tolist() == [1]
    for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "ignored_anchors"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name


@pytest.mark.parametrize("function", [assign, assign_sparse])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=TRITON)])
def test_no_pass_over_the_gt_boxes_before_the_backend(function, backend, monkeypatch):
    """Only the inputs the backend does not check are examined before it (on a GPU such
    a pass is a read-back before the launches, which neither the sparse nor the dense
    path makes): crowd regions on the host, which cost little there; on a GPU the triton
    backend checks them with the gt boxes."""
    examined = []
    may_be_invalid = problem_module._may_be_invalid

    def record(items, *args):
        examined.append([item.name for item in items])
        return may_be_invalid(items, *args)

    monkeypatch.setattr(problem_module, "_may_be_invalid", record)
    device = _device(backend)
    boxes = GOOD.repeat(70, 1)[:200].to(device)
    function(boxes, [200], CANVAS, CONFIG, backend=backend, ignore_boxes=GOOD[:1].to(device), ignore_counts=[1])
    assert examined == ([] if device.type == "cuda" else [["ignore_boxes"]])
    function(boxes, [200], CANVAS, CONFIG, backend="reference")
    assert examined[-1] == ["gt_boxes"]
    # Classes given on the host (the service's, a loader's) are checked there, not in a
    # read-back from the device they were moved to (a second one, before any launch);
    # given on the boxes' device, by the backend with the boxes. Either way a bad class is
    # refused by name, as it always was.
    for classes in (torch.ones(200, dtype=torch.int64), torch.ones(200, dtype=torch.int64).to(device)):
        examined.clear()
        function(boxes, [200], CANVAS, CONFIG, backend=backend, gt_classes=classes)
        assert examined == []
        bad = classes.index_fill(0, torch.tensor([7], device=classes.device), -1)
        with pytest.raises(ValueError, match=r"gt_classes: image 0, box 7: class -1 is outside"):
            function(boxes, [200], CANVAS, CONFIG, backend=backend, gt_classes=bad)


@pytest.mark.parametrize("function", [assign, assign_sparse])
@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=TRITON)])
def test_dropped_ignore_regions_are_reported(function, backend):
    """Invalid ignore regions were dropped under drop_invalid without a word: a crowd
    region malformed in the data left its anchors negative, and nothing said so."""
    device = _device(backend)
    config = CROWD_CONFIGS["IoF rule"]
    ignore = torch.tensor([[0.0, 0.0, 40.0, 40.0], INVALID_KINDS[3], [0.0, 0.0, 30.0, 30.0], INVALID_KINDS[2]])
    kwargs = dict(gt_classes=torch.tensor([1, 2, 3]).to(device), backend=backend)
    got = function(GOOD.to(device), [2, 1], CANVAS, config, ignore_boxes=ignore.to(device), ignore_counts=[2, 2],
                   drop_invalid=True, **kwargs).to("cpu")  # fmt: skip
    assert [d.tolist() for d in got.dropped_ignore] == [[1], [1]] and [d.tolist() for d in got.dropped] == [[], []]
    valid = function(GOOD.to(device), [2, 1], CANVAS, config, ignore_boxes=ignore[[0, 2]].to(device),
                     ignore_counts=[1, 1], **kwargs).to("cpu")  # fmt: skip
    dense = [t.to_dense() if function is assign_sparse else t for t in (got, valid)]
    assert torch.equal(dense[0].labels, dense[1].labels) and (dense[0].labels == -1).any()
    # Carried by every conversion: to_dense, to_sparse, levels.
    converted = [dense[0], dense[0].to_sparse(), *dense[0].levels()]
    assert all([d.tolist() for d in t.dropped_ignore] == [[1], [1]] for t in converted)


@pytest.mark.parametrize(("function", "solver"), [(assign, "solve"), (assign_sparse, "solve_sparse")])
def test_under_drop_invalid_the_boxes_are_checked_before_the_only_solve(function, solver, monkeypatch):
    """A caller passing drop_invalid expects invalid boxes: they are checked and dropped on
    the host first, not found by the backend after a solve of the whole batch for nothing."""
    checked, solve = [], getattr(cpu, solver)
    monkeypatch.setattr(cpu, solver, lambda problem: checked.append(problem.gt_boxes_checked) or solve(problem))
    boxes = torch.cat([GOOD, torch.tensor([INVALID_KINDS[3]])])
    got = function(boxes, [2, 2], CANVAS, CONFIG, backend="cpu", drop_invalid=True)
    assert checked == [True] and [d.tolist() for d in got.dropped] == [[], [1]]
    checked.clear()
    function(GOOD, [3], CANVAS, CONFIG, backend="cpu")  # valid boxes, no drop_invalid: left to the backend
    assert checked == [False]


def test_ignore_boxes_still_go_through_the_cpu_backends_compiled_check(monkeypatch):
    calls = []
    compiled = cpu.boxes_valid
    monkeypatch.setattr(cpu, "boxes_valid", lambda *args: calls.append(args[0].shape[0]) or compiled(*args))
    ignore = GOOD.repeat(70, 1)[:200]
    assign_sparse(GOOD, [3], CANVAS, CONFIG, backend="cpu", ignore_boxes=ignore, ignore_counts=[200])
    assert calls == [200]
    with pytest.raises(ValueError, match="ignore_boxes: image 0, box 150: degenerate box"):
        bad = torch.cat([ignore[:150], torch.tensor([INVALID_KINDS[3]]), ignore[150:]])
        assign_sparse(GOOD, [3], CANVAS, CONFIG, backend="cpu", ignore_boxes=bad, ignore_counts=[201])


AT_THE_REACH = [[-(2.0**31), 0.0, 10.0, 10.0], [0.0, -(2.0**31), 10.0, 10.0], [0.0, 0.0, 10.0, 2.0**31]]


@pytest.mark.parametrize("box", AT_THE_REACH)
def test_a_coordinate_exactly_at_the_reach_is_refused_by_the_compiled_check(box):
    """BOX_REACH is open on both sides and for both axes (x2 = 2^31 is in INVALID_KINDS)."""
    assert not cpu.boxes_valid(torch.tensor([box]), 0.0, CANVAS[1], CANVAS[0], 2.0**31)
    with pytest.raises(ValueError, match=r"reaches beyond ±2147483648 pixels"):
        assign(torch.tensor([box]), [1], CANVAS, CONFIG, backend="cpu")


@pytest.mark.parametrize("bad", [0, 1023, 1024, 2047, 2499])
def test_the_compiled_check_tests_the_last_box_of_each_run(bad):
    """The compiled check tests runs of 1024 boxes without a branch: a bad box anywhere,
    the last of a run included, makes the whole check fail."""
    boxes = GOOD[:1].repeat(2500, 1)
    assert cpu.boxes_valid(boxes, 0.0, CANVAS[1], CANVAS[0], 2.0**31)
    boxes[bad] = torch.tensor(INVALID_KINDS[3])  # degenerate
    assert not cpu.boxes_valid(boxes, 0.0, CANVAS[1], CANVAS[0], 2.0**31)


@TRITON
def test_an_invalid_box_is_named_before_the_backends_own_refusal(monkeypatch):
    """The triton backend refuses CPU tensors when it runs compiled: an invalid box among
    them is still the error named, as when build_problem checked the boxes first."""
    from tritarget.kernels import triton_backend

    monkeypatch.setattr(triton_backend, "_INTERPRETING", False)
    boxes = torch.cat([GOOD[:1], torch.tensor([INVALID_KINDS[3]])])
    with pytest.raises(ValueError, match="gt_boxes: image 0, box 1: degenerate box"):
        assign_sparse(boxes, [2], CANVAS, CONFIG, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        assign_sparse(GOOD, [3], CANVAS, CONFIG, backend="triton")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("where", ["gt_boxes after explicit anchors", "ignore_boxes after gt_boxes"])
def test_a_nan_box_among_many_is_refused_whatever_input_comes_first(backend, where):
    """Over 128 boxes per input, each input's extremes are read back together: a NaN in an
    input listed after another slipped through Python's min() and max(), which skip a NaN
    they do not meet first (129 boxes with explicit anchors were solved, NaN and all)."""
    many = GOOD[:1].repeat(129, 1)
    bad = many.clone()
    bad[5, 0] = math.nan
    if where.startswith("gt_boxes"):
        kwargs, boxes, name = {"anchors": many.clone()}, bad, "gt_boxes"
    else:
        kwargs, boxes, name = {"ignore_boxes": bad, "ignore_counts": [129]}, many, "ignore_boxes"
    device = _device(backend)
    kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=f"{name}: image 0, box 5: coordinates are not finite"):
        assign(boxes.to(device), [129], CANVAS, CONFIG, backend=backend, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("function", [assign, assign_sparse])
def test_classes_on_a_gpu_for_boxes_on_the_host_are_checked_there(function):
    """Moved to the CPU boxes, the classes are checked on the host. They were taken for
    classes on a device, whose check rides on a read-back of device values that CPU
    classes never joined: a class past int32 reached the cpu backend and wrapped."""
    classes = torch.tensor([1, 2**31, 3]).cuda()
    with pytest.raises(ValueError, match=r"gt_classes: image 0, box 1: class 2147483648 is outside"):
        function(GOOD, [3], CANVAS, CONFIG, backend="cpu", gt_classes=classes)
