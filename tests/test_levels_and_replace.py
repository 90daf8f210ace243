"""Per-level access: ``TargetConfig.replace`` on one level's fields, ``level_slices`` and
``Targets.levels()``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from support import on_device, random_batch
from tritarget.kernels import AnchorLevel, Targets, assign, assign_sparse, generate_anchors, level_slices, presets
from tritarget.kernels.anchors import feature_map_size, resolve_grid
from tritarget.kernels.config import AnchorConfig, TargetConfig


def test_replace_addresses_one_level():
    config = presets.get("retinanet_mmdet")
    changed = config.replace(**{"anchors.levels[0].aspect_ratios": (1.0,), "match.high": 0.6})
    assert changed.anchors.levels[0].aspect_ratios == (1.0,)
    assert changed.anchors.levels[1:] == config.anchors.levels[1:]
    assert changed.match.high == 0.6 and config.match.high == 0.5
    assert changed.anchors.anchors_per_cell == (3, 9, 9, 9, 9)
    level = AnchorLevel(stride=128, scales=(2.0,), aspect_ratios=(1.0,))
    assert config.replace(**{"anchors.levels[4]": level}).anchors.levels[4] == level


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("anchors.levels[5].scales", r"'anchors.levels' has 5 entries, no \[5\]"),
        ("anchors.level[0].scales", "unknown config field 'anchors.level'"),
        ("match.high[0]", "'match.high' is not a list"),
        ("anchors.levels.0", "cannot address '0' after 'anchors.levels'"),
        ("anchors.levels[0].size", r"unknown config field 'anchors.levels\[0\].size'"),
        ("anchors.levels[0].stride", r"TargetConfig.anchors.levels\[0\].stride: must be in \[1, 1e\+06\], got -1"),
    ],
)
def test_replace_refuses_bad_paths_and_values(key, message):
    with pytest.raises(ValueError, match=message):
        presets.get("retinanet_mmdet").replace(**{key: -1})


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        # Which of two nested overrides applies last would depend on their order, which the
        # wire does not keep: in-process and over the wire gave different thresholds.
        ({"match.high": 0.7, "match": {"high": 0.3, "low": 0.2}}, ValueError,
         "overrides 'match' and 'match.high': one holds the other"),
        ({"anchors.levels[0]": {"stride": 8}, "anchors.levels[0].sizes": [32]}, ValueError,
         r"overrides 'anchors.levels\[0\]' and 'anchors.levels\[0\].sizes': one holds the other"),
        # Two spellings of one field were both applied, one silently lost: a trailing
        # newline, a leading zero, a digit of another script.
        ({"match.high": 0.5, "match.high\n": 0.9}, ValueError, r"override 'match.high\\n': cannot address 'high\\n'"),
        ({"anchors.levels[0]": {"stride": 8}, "anchors.levels[00].stride": 4}, ValueError,
         r"override 'anchors.levels\[00\].stride': cannot address 'levels\[00\]' after 'anchors'"),
        ({"anchors.levels[\u0663].stride": 4}, ValueError, r"cannot address 'levels\[\u0663\]' after 'anchors'"),
        # JSON integers have no bound: float() of one overflowed (OverflowError; INTERNAL on the server).
        ({"match.high": 10**400}, ValueError, "MatchConfig.high: must be finite, got an integer of 1329 bits"),
        ({"encode.weights": [1, 1, 10**400, 1]}, ValueError, "EncodeConfig.weights: must be finite"),
        # A stride past the anchor bound made infinite or NaN anchors (mmdet's base size is the stride).
        ({"anchors.levels[0].stride": 2**127}, ValueError,
         r"TargetConfig.anchors.levels\[0\].stride: must be in \[1, 1e\+06\]"),
        # A scalar where a sequence goes: "'int' object is not iterable", naming nothing.
        ({"anchors.levels[0].scales": 8}, TypeError,
         r"TargetConfig.anchors.levels\[0\].scales: expected a sequence, got 8"),
        ({"encode.stds": 1.0}, TypeError, "EncodeConfig.stds: expected a sequence, got 1.0"),
        ({"anchors.levels": 5}, TypeError, "TargetConfig.anchors.levels: expected a list of levels, got 5"),
    ],
)  # fmt: skip
def test_replace_refuses_what_has_no_single_meaning_naming_the_field(overrides, error, message):
    with pytest.raises(error, match=message):
        presets.get("retinanet_mmdet").replace(**overrides)


@pytest.mark.parametrize(
    ("levels", "error", "message"),
    [
        # A level's error named its field only ("AnchorLevel.sizes"), not which of five levels.
        ([{"stride": 8, "sizes": [32], "aspect_ratios": [1]}, {"stride": 16, "sizes": [-1], "aspect_ratios": [1]}],
         ValueError, r"AnchorConfig.levels\[1\].sizes: values must be in"),
        ([{"stride": 8, "sizes": [32], "aspect_ratios": [1]}, {"stride": 16, "size": [64], "aspect_ratios": [1]}],
         ValueError, r"AnchorConfig.levels\[1\]: unknown field\(s\) size"),
        # A YAML key read as an int: "sequence item 0: expected str instance, int found".
        ([{"stride": 8, "sizes": [32], "aspect_ratios": [1], 1: 2, "x": 0}],
         ValueError, r"AnchorConfig.levels\[0\]: unknown field\(s\) 1, x$"),
        ([5], TypeError, r"AnchorConfig.levels\[0\]: expected a dict, got int"),
    ],
)  # fmt: skip
def test_a_bad_level_is_named_by_its_place(levels, error, message):
    with pytest.raises(error, match=message):
        AnchorConfig(layout="torchvision", levels=levels)
    with pytest.raises(error, match=message.replace("AnchorConfig", "TargetConfig.anchors")):
        TargetConfig.from_dict({"anchors": {"layout": "torchvision", "levels": levels}})


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        # Each was accepted and changed nothing: the layout never reads the field.
        ("retinanet_torchvision", {"anchors.levels[0].scales": (1.0, 2.0)},
         r"levels\[0\].scales: the torchvision layout does not use it \(its levels take sizes, aspect_ratios\)"),
        ("retinanet_mmdet", {"anchors.levels[2].sizes": (32.0,)}, r"levels\[2\].sizes: the mmdet layout does not"),
        ("yolov5", {"anchors.levels[1].aspect_ratios": (1.0,)}, r"levels\[1\].aspect_ratios: the yolo layout"),
        ("retinanet_detectron2", {"anchors.levels[0].base_size": 16.0}, "base_size: the detectron2 layout"),
        ("retinanet_torchvision", {"anchors.offset": 0.5},
         "AnchorConfig.offset: only the detectron2 layout uses it, got 0.5 with the torchvision layout"),
        ("retinanet_detectron2", {"anchors.center_offset": 0.5}, "center_offset: only the mmdet layout uses it"),
        ("yolov5", {"anchors.scale_major": False}, "scale_major: only the mmdet layout uses it"),
        ("retinanet_torchvision", {"anchors.clip": False}, "clip: only the ssd layout uses it"),
    ],
)  # fmt: skip
def test_a_field_the_layout_does_not_read_is_refused(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        presets.get(preset).replace(**overrides)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("retinanet_detectron2", {"anchors.offset": 0.5}),
        ("retinanet_mmdet", {"anchors.center_offset": 0.5, "anchors.scale_major": False}),
        ("retinanet_mmdet", {"anchors.levels[0].base_size": 16.0}),
        ("ssd300_torchvision", {"anchors.clip": False, "anchors.levels[0].aspect_ratios": ()}),
    ],
)
def test_the_fields_a_layout_reads_are_accepted(preset, overrides):
    changed = presets.get(preset).replace(**overrides)
    assert changed != presets.get(preset)


def test_a_feature_size_past_the_bound_is_refused_not_overflowed():
    level = {"stride": 8, "sizes": [0.2], "aspect_ratios": [1.0], "feature_size": [2**64, 1]}
    with pytest.raises(ValueError, match=r"anchors.levels\[0\].feature_size: at most 1e\+06 cells a side"):
        presets.get("d2l_multibox").replace(**{"anchors.levels[0]": level})


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_torchvision_feature_map_larger_than_the_canvas_is_refused_by_every_backend(backend):
    """torchvision's stride is canvas // feature_size: 0 here, every anchor at the corner.
    The reference and cpu backends placed them so; the triton one refused it as "factors
    and scales must be positive", which the caller never set."""
    level = {"stride": 8, "sizes": [32], "aspect_ratios": [1.0], "feature_size": [20, 8]}
    config = presets.get("retinanet_torchvision").replace(**{"anchors.levels": [level], "match.sample_size": 0})
    boxes = torch.tensor([[1.0, 1.0, 10.0, 12.0]])
    message = (r"anchors.levels\[0\].feature_size: 20 x 8 is larger than the 16 x 64 canvas: torchvision's stride "
               r"\(canvas // feature_size\) would be 0")  # fmt: skip
    for solve in (assign, assign_sparse):
        with pytest.raises(ValueError, match=message):
            on_device(solve, boxes, [1], (16, 64), config, backend=backend)
    assert on_device(assign, boxes, [1], (20, 64), config, backend=backend).labels.shape == (1, 160)  # as large: fine


def test_a_torchvision_feature_map_wider_than_the_canvas_is_refused():
    """As a taller one is: the stride across (canvas width // feature map width) would be 0."""
    level = AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1.0,), feature_size=(8, 80))
    config = AnchorConfig(layout="torchvision", levels=(level,))
    with pytest.raises(ValueError, match=r"anchors.levels\[0\].feature_size: 8 x 80 is larger than the 16 x 64 canvas"):
        generate_anchors(config, (16, 64))
    assert generate_anchors(config, (16, 80)).shape == (640, 4)  # as wide: fine


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(
    ("sizes", "ratios", "shape"), [([0.5], [1.0], "0 x 0"), ([32], [10000.0], "0 x 3200"), ([32], [0.0001], "3200 x 0")]
)
def test_generated_anchor_shapes_of_zero_width_or_height_are_refused(backend, sizes, ratios, shape):
    """torchvision's layout rounds half sides to whole pixels: these levels made anchors of
    zero area, which explicit anchors are refused for. No box matched them (default
    thresholds), or every box did with infinite deltas (match.high 0)."""
    level = {"stride": 8, "sizes": sizes, "aspect_ratios": ratios}
    config = presets.get("retinanet_torchvision").replace(**{"anchors.levels": [level], "match.sample_size": 0})
    message = rf"anchors.levels\[0\]: the torchvision layout makes the level's anchor shape 0 {shape} \(a size"
    for solve in (assign, assign_sparse):
        with pytest.raises(ValueError, match=message):
            solve(torch.tensor([[2.0, 2.0, 10.0, 10.0]]), [1], (16, 16), config, backend=backend)
    with pytest.raises(ValueError, match=message):
        generate_anchors(config.anchors, (16, 16))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_generated_anchors_that_float32_rounds_flat_where_placed_are_refused(backend):
    """A 1-pixel yolo shape with a 1e6 stride on a 2^25-pixel-wide canvas: from column 8
    (x = 8.5e6, where float32 steps by 1) its edges round to one value. Such anchors were
    made and, with match.high 0, encoded to NaN and infinite deltas; the same anchor
    given explicitly is refused as degenerate."""
    level = {"stride": 1_000_000, "shapes": [[1, 1]]}
    config = presets.get("yolov5").replace(**{"anchors.levels": [level], "match.high": 0.0, "match.low": 0.0})
    message = (r"anchors.levels\[0\]: on the 1 x 33554432 canvas, anchor shape 0 at column 8 of the feature map "
               r"has zero width in float32 \(its edges round to 8.5e\+06\)")  # fmt: skip
    boxes = torch.tensor([[8_499_990.0, 0.0, 8_500_010.0, 1.0]])
    for solve in (assign, assign_sparse):
        with pytest.raises(ValueError, match=message):
            solve(boxes, [1], (1, 2**25), config, backend=backend)
    with pytest.raises(ValueError, match=message):
        generate_anchors(config.anchors, (1, 2**25))
    fine = generate_anchors(config.anchors, (1, 8_000_000))  # up to x = 7.5e6: every anchor 1 pixel wide
    assert ((fine[:, 2] - fine[:, 0]) == 1).all()


def test_rows_of_every_level_are_checked_for_float32_rounding():
    """The placement check covers each level's rows, spaced by their own stride: here
    2^25 // 34 = 986,895 pixels down, against 64 across. Level 1's 2-pixel shape has its edges
    rounded together from row 19 (y = 18,751,005, where float32 steps by 2); level 0's 64-pixel
    one does not."""
    levels = [{"stride": 1_000_000, "sizes": [size], "aspect_ratios": [1.0]} for size in (64, 2)]
    config = presets.get("retinanet_torchvision").replace(**{"anchors.levels": levels}).anchors
    message = (r"anchors.levels\[1\]: on the 33554432 x 64 canvas, anchor shape 0 at row 19 of the feature map has "
               r"zero height in float32")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        generate_anchors(config, (2**25, 64))
    assert generate_anchors(config, (2**24, 64)).shape == (34, 4)  # rows up to y = 16,283,784: fine


# Counts one level of 10^6 x 1 cells and 256 shapes, with at most 512 MB of address space
# more than the process has after its imports.
_COUNT_WITHIN_AN_ALLOWANCE = """
import resource
from tritarget.kernels import presets, resolve_grid

level = {"stride": 8, "sizes": [8.0 + i for i in range(64)], "aspect_ratios": [0.5, 1.0, 2.0, 4.0],
         "feature_size": [1, 1_000_000]}
config = presets.get("retinanet_detectron2").replace(**{"anchors.levels": [level]})
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
print(resolve_grid(config.anchors, (64, 64)).num_anchors)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_counting_anchors_computes_nothing_per_cell():
    """The service counts a request's anchors (``resolve_grid``) before its limits refuse
    it, on its event loop: the float32 placement check ran there too, and a 1 KB config of
    one level 10^6 cells wide with 256 shapes took 1.7-2.8 s and 2.4 GB to count. That
    check now runs only where anchors are built (``generate_anchors``, ``assign``)."""
    counted = subprocess.run([sys.executable, "-c", _COUNT_WITHIN_AN_ALLOWANCE], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert counted.returncode == 0, counted.stderr[-2000:]
    assert counted.stdout.split() == [str(256 * 10**6)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_canvas_of_more_anchors_than_int32_indices_is_refused_by_name(backend):
    """2**17 x 2**17 makes 3.2 billion RetinaNet anchors: the allocator failed for 38 GB
    (on a larger machine, anchor indices past int32 would have wrapped)."""
    message = r"anchors: 3,218,079,744 per image on the 131072 x 131072 canvas, more than 2,147,483,647 \(anchor"
    config = presets.get("retinanet_torchvision")
    for solve in (assign, assign_sparse):
        with pytest.raises(ValueError, match=message):
            solve(torch.tensor([[2.0, 2.0, 10.0, 10.0]]), [1], (2**17, 2**17), config, backend=backend)
    with pytest.raises(ValueError, match=message):
        generate_anchors(config.anchors, (2**17, 2**17))
    assert resolve_grid(config.anchors, (2**17, 2**17)).num_anchors == 3_218_079_744  # counted, not built


# d2l's n + m - 1 shapes per cell and mmdet's scales x ratios: every layout's anchors_per_cell counts its anchors
@pytest.mark.parametrize("name", ["retinanet_torchvision", "yolov5", "ssd300_torchvision", "d2l_multibox",
                                  "retinanet_mmdet"])  # fmt: skip
def test_level_slices_split_the_anchors_by_feature_map(name):
    config = presets.get(name)
    canvas = {"ssd300_torchvision": (300, 300), "d2l_multibox": (256, 256)}.get(name, (128, 160))
    slices = level_slices(config.anchors, canvas)
    anchors = generate_anchors(config.anchors, canvas)
    assert slices[0].start == 0 and slices[-1].stop == anchors.shape[0]
    for cut, level, shapes in zip(slices, config.anchors.levels, config.anchors.anchors_per_cell):
        height, width = feature_map_size(canvas, level)
        assert cut.stop - cut.start == height * width * shapes


def test_targets_levels_are_views_in_anchor_order(generator):
    config = presets.get("retinanet_torchvision").replace(background_class=91)
    canvas = (128, 160)
    boxes, counts = random_batch(generator, [3, 0], canvas)
    classes = torch.zeros(boxes.shape[0], dtype=torch.int64)
    targets = assign(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    levels = targets.levels()
    assert len(levels) == 5 and all(level.background_class == 91 for level in levels)
    for cut, level in zip(level_slices(config.anchors, canvas), levels):
        assert torch.equal(level.labels, targets.labels[:, cut])
        assert torch.equal(level.deltas, targets.deltas[:, cut])
        assert torch.equal(level.classes, targets.classes[:, cut])
        assert level.labels.data_ptr() == targets.labels[:, cut].data_ptr()  # a view
    sparse = assign_sparse(boxes, counts, canvas, config, backend="cpu")
    assert Targets.from_sparse(sparse).level_starts == targets.level_starts
    explicit = assign(boxes, counts, canvas, config, anchors=torch.tensor([[0.0, 0.0, 16.0, 16.0]]), backend="cpu")
    with pytest.raises(ValueError, match="carry no pyramid levels"):
        explicit.levels()
