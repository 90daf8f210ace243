"""Configs: validation names the bad field; dict round trips; presets are complete."""

import dataclasses
import json
import math
import pickle
import re
import subprocess
import sys

import pytest
import torch

from tritarget.kernels import AnchorConfig, AnchorLevel, EncodeConfig, MatchConfig, TargetConfig, assign, presets

LEVEL = AnchorLevel(stride=8, sizes=(32.0,), aspect_ratios=(1.0,))
SSD_THREE_SIZES = AnchorLevel(stride=8, sizes=(0.1, 0.2, 0.3), feature_size=(4, 4))
EXPECTED_PRESETS = {
    "retinanet_torchvision",
    "fasterrcnn_rpn_torchvision",
    "ssd300_torchvision",
    "retinanet_detectron2",
    "rpn_detectron2",
    "retinanet_mmdet",
    "rpn_mmdet",
    "d2l_multibox",
    "yolov5",
}


def test_preset_names_are_the_documented_api():
    assert set(presets.names()) == EXPECTED_PRESETS


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_round_trips_through_json(name):
    config = presets.get(name)
    text = json.dumps(config.to_dict())
    assert TargetConfig.from_dict(json.loads(text)) == config
    assert hash(TargetConfig.from_dict(json.loads(text))) == hash(config)


def test_hash_is_computed_once_and_never_travels():
    """Configs cache their hash; a pickled one hashes afresh in the process that loads it
    (string hashes differ between processes), so equal configs always hash equal."""
    config = presets.get("retinanet_torchvision")
    hash(config)
    code = (
        "import pickle, sys; from tritarget.kernels import presets; "
        "loaded = pickle.loads(sys.stdin.buffer.read()); "
        "assert loaded == presets.get('retinanet_torchvision'); "
        "assert hash(loaded) == hash(presets.get('retinanet_torchvision')); "
        "assert hash(loaded.anchors) == hash(presets.get('retinanet_torchvision').anchors)"
    )
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(config), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    changed = config.replace(**{"match.high": 0.6})
    assert changed != config and hash(changed) != hash(config)


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_a_preset_is_one_shared_frozen_instance(name):
    """``get`` in a training loop costs nothing and lets the per-config caches find it by
    identity; sharing is safe because a config cannot be changed, only derived from."""
    config = presets.get(name)
    assert presets.get(name) is config
    with pytest.raises(AttributeError):
        config.match = MatchConfig()
    assert config.replace(**{"match.high": 0.61}) is not config and presets.get(name) is config


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_names_its_source(name):
    text = presets.describe(name)
    assert any(peer in text for peer in ("torchvision", "detectron2", "mmdetection", "Deep Learning", "YOLOv5"))
    assert any(source in text for source in (".py", ".yaml", "chapter"))
    assert re.search(r"\bv?\d+\.(\d+|x)", text), "names the version it mirrors"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="retinanet_torchvision"):
        presets.get("retinanet")


_TV_RATIOS = (0.5, 1.0, 2.0)
# The FPN RPN's levels, torchvision's and detectron2's alike: one size per stride, 32 at stride 4 to 512 at 64.
_FPN_RPN_LEVELS = [(4, (32,), _TV_RATIOS), (8, (64,), _TV_RATIOS), (16, (128,), _TV_RATIOS), (32, (256,), _TV_RATIOS),
                   (64, (512,), _TV_RATIOS)]  # fmt: skip
# Each preset's numbers as its peer publishes them (the file each comes from is named in
# the preset's docstring): per level (stride, sizes, aspect ratios, scales, shapes, fixed
# feature map), then the anchor, matcher and coder options. Fields left out are the defaults.
PUBLISHED = {
    "retinanet_torchvision": {  # retinanet.py: _default_anchorgen truncates the octave sizes to int
        "levels": [
            (8, (32, 40, 50), _TV_RATIOS),
            (16, (64, 80, 101), _TV_RATIOS),
            (32, (128, 161, 203), _TV_RATIOS),
            (64, (256, 322, 406), _TV_RATIOS),
            (128, (512, 645, 812), _TV_RATIOS),
        ],
        "anchors": {"layout": "torchvision"},
        "match": {"high": 0.5, "low": 0.4, "low_quality": "torchvision"},
    },
    "fasterrcnn_rpn_torchvision": {  # faster_rcnn.py: rpn_fg/bg_iou_thresh, rpn_batch_size_per_image, ...
        "levels": _FPN_RPN_LEVELS,
        "anchors": {"layout": "torchvision"},
        "match": {"high": 0.7, "low": 0.3, "low_quality": "torchvision", "sample_size": 256, "positive_fraction": 0.5},
    },
    "ssd300_torchvision": {  # ssd.py: ssd300_vgg16's DefaultBoxGenerator, SSDMatcher(0.5), BoxCoder((10, 10, 5, 5))
        "levels": [
            (8, (0.07, 0.15), (2,), (38, 38)),
            (16, (0.15, 0.33), (2, 3), (19, 19)),
            (32, (0.33, 0.51), (2, 3), (10, 10)),
            (64, (0.51, 0.69), (2, 3), (5, 5)),
            (100, (0.69, 0.87), (2,), (3, 3)),
            (300, (0.87, 1.05), (2,), (1, 1)),
        ],
        "anchors": {"layout": "ssd", "clip": True},
        "match": {"high": 0.5, "low": 0.5, "low_quality": "ssd_forced"},
        "encode": {"weights": (10.0, 10.0, 5.0, 5.0)},
    },
    "retinanet_detectron2": {  # Base-RetinaNet.yaml: SIZES [[x, x * 2**(1/3), x * 2**(2/3)] ...], OFFSET 0.0
        "levels": [
            (s, (x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)), _TV_RATIOS)
            for s, x in zip((8, 16, 32, 64, 128), (32, 64, 128, 256, 512))
        ],
        "anchors": {"layout": "detectron2", "offset": 0.0},
        "match": {"high": 0.5, "low": 0.4, "low_quality": "detectron2"},
    },
    "rpn_detectron2": {  # defaults.py + Base-RCNN-FPN.yaml: IOU_THRESHOLDS [0.3, 0.7], BATCH_SIZE_PER_IMAGE 256, ...
        "levels": _FPN_RPN_LEVELS,
        "anchors": {"layout": "detectron2", "offset": 0.0},
        "match": {
            "high": 0.7,
            "low": 0.3,
            "low_quality": "detectron2",
            "sample_size": 256,
            "positive_fraction": 0.5,
            "allowed_border": -1,
            "border_order": "post_match",
        },
    },
    "retinanet_mmdet": {  # retinanet_r50_fpn.py: octave_base_scale=4, scales_per_octave=3, MaxIoUAssigner(...)
        "levels": [
            (s, (), _TV_RATIOS, None, tuple(4.0 * 2 ** (i / 3) for i in range(3))) for s in (8, 16, 32, 64, 128)
        ],
        "anchors": {"layout": "mmdet", "center_offset": 0.0},
        "match": {"high": 0.5, "low": 0.4, "low_quality": "mmdet", "min_pos_iou": 0.0, "ignore_iof_thr": -1.0},
        "encode": {"means": (0.0,) * 4, "stds": (1.0,) * 4, "symmetric_clamp": True},
    },
    # faster_rcnn_r50_fpn.py: scales=[8], MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3), RandomSampler(256, 0.5)
    "rpn_mmdet": {
        "levels": [(s, (), _TV_RATIOS, None, (8.0,)) for s in (4, 8, 16, 32, 64)],
        "anchors": {"layout": "mmdet", "center_offset": 0.0},
        "match": {
            "high": 0.7,
            "low": 0.3,
            "low_quality": "mmdet",
            "min_pos_iou": 0.3,
            "sample_size": 256,
            "positive_fraction": 0.5,
            "allowed_border": -1,
        },
        "encode": {"means": (0.0,) * 4, "stds": (1.0,) * 4, "symmetric_clamp": True},
    },
    "d2l_multibox": {  # TinySSD: sizes, ratios [1, 2, 0.5], maps 32, 16, 8, 4, 1 of 256 x 256; offsets x (10, 10, 5, 5)
        "levels": [
            (8, (0.2, 0.272), (1, 2, 0.5), (32, 32)),
            (16, (0.37, 0.447), (1, 2, 0.5), (16, 16)),
            (32, (0.54, 0.619), (1, 2, 0.5), (8, 8)),
            (64, (0.71, 0.79), (1, 2, 0.5), (4, 4)),
            (256, (0.88, 0.961), (1, 2, 0.5), (1, 1)),
        ],
        "anchors": {"layout": "d2l"},
        "match": {"high": 0.5, "low": 0.5, "low_quality": "ssd_forced"},
        "encode": {"weights": (10.0, 10.0, 5.0, 5.0)},
    },
    # yolov5s.yaml: P3/8 [10,13, 16,30, 33,23], P4/16 [30,61, 62,45, 59,119], P5/32 [116,90, 156,198, 373,326]
    "yolov5": {
        "levels": [
            (8, (), (), None, (), ((10, 13), (16, 30), (33, 23))),
            (16, (), (), None, (), ((30, 61), (62, 45), (59, 119))),
            (32, (), (), None, (), ((116, 90), (156, 198), (373, 326))),
        ],
        "anchors": {"layout": "yolo"},
        "match": {"high": 0.5, "low": 0.4, "low_quality": "torchvision"},
    },
}


def _published_level(stride, sizes=(), ratios=(), feature=None, scales=(), shapes=()) -> AnchorLevel:
    shapes = tuple((float(w), float(h)) for w, h in shapes)
    return AnchorLevel(
        stride=stride,
        sizes=tuple(map(float, sizes)),
        aspect_ratios=tuple(map(float, ratios)),
        scales=tuple(scales),
        shapes=shapes,
        feature_size=feature,
    )


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_each_preset_holds_its_peers_published_numbers(name):
    """Every number of a preset, against the peer's published value, whether or not the
    peer is installed (a mutation review: detectron2's octave sizes and RPN sample, mmdet's
    min_pos_iou, a d2l size or threshold, YOLOv5's low threshold changed with every test,
    parity tests included, still passing)."""
    config, published = presets.get(name), PUBLISHED[name]
    levels = [_published_level(*level) for level in published["levels"]]
    expected = TargetConfig(
        anchors=AnchorConfig(levels=tuple(levels), **{"clip": True, **published["anchors"]}),
        match=MatchConfig(**published["match"]),
        encode=EncodeConfig(**published.get("encode", {})),
    )
    assert len(config.anchors.levels) == len(expected.anchors.levels)
    for ours, theirs in zip(config.anchors.levels, expected.anchors.levels):
        assert (ours.stride, ours.aspect_ratios, ours.shapes, ours.feature_size, ours.base_size) == (
            theirs.stride,
            theirs.aspect_ratios,
            theirs.shapes,
            theirs.feature_size,
            theirs.base_size,
        )
        assert ours.sizes == pytest.approx(theirs.sizes, rel=1e-12) and len(ours.sizes) == len(theirs.sizes)
        assert ours.scales == pytest.approx(theirs.scales, rel=1e-12) and len(ours.scales) == len(theirs.scales)
    anchors = dataclasses.replace(config.anchors, levels=expected.anchors.levels)  # the levels compared above
    assert dataclasses.replace(config, anchors=anchors) == expected  # every other field, exactly


def test_replace_overrides_dotted_fields():
    config = presets.get("retinanet_torchvision").replace(**{"match.high": 0.6, "background_class": 80})
    assert config.match.high == 0.6 and config.background_class == 80
    with pytest.raises(ValueError, match="match.hgh"):
        config.replace(**{"match.hgh": 0.6})
    with pytest.raises(ValueError, match="MatchConfig.low"):
        config.replace(**{"match.low": 0.9})


@pytest.mark.parametrize(
    ("build", "error", "field"),
    [
        (lambda: MatchConfig(high=1.5), ValueError, "MatchConfig.high"),
        (lambda: MatchConfig(high=0.5, low=0.6), ValueError, "MatchConfig.low"),
        (lambda: MatchConfig(low_quality="best"), ValueError, "MatchConfig.low_quality"),
        (lambda: MatchConfig(border_order="before"), ValueError, "MatchConfig.border_order"),
        (lambda: MatchConfig(allowed_border=-2), ValueError, "MatchConfig.allowed_border"),
        (lambda: MatchConfig(sample_size=-1), ValueError, "MatchConfig.sample_size"),
        (lambda: MatchConfig(sample_size=2.5), TypeError, "MatchConfig.sample_size"),
        (lambda: MatchConfig(high=float("nan")), ValueError, "MatchConfig.high"),
        (lambda: MatchConfig(strict_high="yes"), TypeError, "MatchConfig.strict_high"),
        (lambda: EncodeConfig(weights=(1, 1, 1)), ValueError, "EncodeConfig.weights"),
        (lambda: EncodeConfig(stds=(1, 1, 0, 1)), ValueError, "EncodeConfig.stds"),
        (lambda: EncodeConfig(symmetric_clamp="false"), TypeError, "EncodeConfig.symmetric_clamp"),
        (lambda: AnchorLevel(stride=0, sizes=(32,)), ValueError, "AnchorLevel.stride"),
        (lambda: AnchorLevel(stride=8, sizes=(-1,)), ValueError, "AnchorLevel.sizes"),
        (lambda: AnchorLevel(stride=8, sizes=("a",)), TypeError, "AnchorLevel.sizes"),
        (lambda: AnchorLevel(stride=8, shapes=((3,),)), ValueError, "AnchorLevel.shapes"),
        (lambda: AnchorConfig(layout="caffe", levels=(AnchorLevel(stride=8, sizes=(32,)),)), ValueError, "layout"),
        (lambda: AnchorConfig(layout="torchvision", levels=()), ValueError, "AnchorConfig.levels"),
        (
            lambda: presets.get("retinanet_mmdet").replace(**{"anchors.scale_major": "false"}),
            TypeError,
            "AnchorConfig.scale_major: expected a bool",
        ),  # fmt: skip
        (lambda: presets.get("ssd300_torchvision").replace(**{"anchors.clip": 0}), TypeError, "AnchorConfig.clip"),
        # Bounds a config from the wire could break: millions of shapes per cell built before
        # any count is checked, or anchors that overflow float32.
        (lambda: AnchorLevel(stride=8, sizes=tuple(range(1, 66))), ValueError, "AnchorLevel.sizes: at most 64"),
        (lambda: AnchorLevel(stride=8, shapes=((4, 4),) * 65), ValueError, "AnchorLevel.shapes: at most 64"),
        (
            lambda: AnchorLevel(stride=8, sizes=(3e38,)),
            ValueError,
            r"AnchorLevel.sizes: values must be in \(1e-06, 1e\+06\]",
        ),
        # ... or of zero area in float32 (1e-300: no positive ever; explicit anchors are refused for it).
        (lambda: AnchorLevel(stride=8, sizes=(1e-300,)), ValueError, r"AnchorLevel.sizes: values must be in \(1e-06"),
        (lambda: AnchorLevel(stride=8, scales=(1e-7,)), ValueError, r"AnchorLevel.scales: values must be in \(1e-06"),
        (lambda: AnchorLevel(stride=8, shapes=((4, 1e-30),)), ValueError, r"AnchorLevel.shapes: each shape .*\(1e-06"),
        (
            lambda: AnchorLevel(stride=8, scales=(1,), base_size=1e-9),
            ValueError,
            r"AnchorLevel.base_size: must be in \(1e-06",
        ),
        (lambda: AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1e80,)), ValueError, "AnchorLevel.aspect_ratios"),
        (lambda: AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1e-80,)), ValueError, "AnchorLevel.aspect_ratios"),
        (lambda: AnchorLevel(stride=8, shapes=((4, 2e6),)), ValueError, "AnchorLevel.shapes"),
        (lambda: AnchorLevel(stride=8, scales=(1,), base_size=1e7), ValueError, "AnchorLevel.base_size"),
        (
            lambda: AnchorConfig(layout="torchvision", levels=(AnchorLevel(stride=8, sizes=(32,)),) * 17),
            ValueError,
            "AnchorConfig.levels: between 1 and 16",
        ),  # fmt: skip
        (
            lambda: AnchorConfig(layout="mmdet", levels=(AnchorLevel(stride=8, sizes=(32,), aspect_ratios=(1,)),)),
            ValueError,
            r"levels\[0\].scales",
        ),
        (
            lambda: AnchorConfig(layout="ssd", levels=(AnchorLevel(stride=8, sizes=(0.1, 0.2), aspect_ratios=(2,)),)),
            ValueError,
            "feature_size",
        ),
        (lambda: TargetConfig(anchors="retinanet"), TypeError, "TargetConfig.anchors"),
        # A mutation review: no case held these (the offset's had no valid level, and failed on that first).
        (lambda: AnchorConfig(layout="detectron2", levels=(LEVEL,), offset=1.0), ValueError,
         r"AnchorConfig.offset: must be in \[0, 1\)"),
        (lambda: AnchorConfig(layout="detectron2", levels=(LEVEL,), offset=-0.5), ValueError,
         r"AnchorConfig.offset: must be in \[0, 1\)"),
        (lambda: AnchorLevel(stride=8, sizes=b" "), TypeError, "AnchorLevel.sizes: expected a sequence, got b' '"),
        (lambda: MatchConfig(high=True), TypeError, "MatchConfig.high: expected a number, got True"),
        (lambda: MatchConfig(sample_size=True), TypeError, "MatchConfig.sample_size: expected an integer, got True"),
        (lambda: AnchorLevel(stride=8, sizes=(1e-6,)), ValueError, r"AnchorLevel.sizes: values must be in \(1e-06"),
        (lambda: AnchorLevel(stride=8, sizes=(32.0,), feature_size=(0, 5)), ValueError, "AnchorLevel.feature_size"),
        (lambda: AnchorLevel(stride=8, sizes=(32.0,), feature_size=(True, 5)), ValueError, "AnchorLevel.feature_size"),
        (lambda: AnchorConfig(layout="ssd", levels=(SSD_THREE_SIZES,)), ValueError,
         r"levels\[0\].sizes: the ssd layout takes \(s_k, s_k\+1\)"),
        (lambda: AnchorConfig(layout="d2l", levels=(AnchorLevel(stride=8, sizes=(0.1,), aspect_ratios=(1.0,)),)),
         ValueError, r"levels\[0\].feature_size: the d2l layout needs a fixed feature map size"),
        (lambda: MatchConfig(low=-0.1), ValueError, r"MatchConfig.low: must be in \[0, high=0.5\], got -0.1"),
        (lambda: MatchConfig(allowed_border=-0.5), ValueError, "MatchConfig.allowed_border: must be >= 0, or -1"),
        (lambda: MatchConfig(positive_fraction=1.5), ValueError, r"MatchConfig.positive_fraction: must be in \[0, 1\]"),
        (lambda: MatchConfig(ignore_iof_wrt_anchor="false"), TypeError,
         "MatchConfig.ignore_iof_wrt_anchor: expected a bool"),
        (lambda: EncodeConfig(weights=(1.0,) * 5), ValueError,
         r"EncodeConfig.weights: needs 4 values \(x, y, w, h\), got 5"),
        (lambda: EncodeConfig(scale_clamp=0.0), ValueError, "EncodeConfig.scale_clamp: must be positive, got 0.0"),
        (lambda: presets.get("retinanet_torchvision").replace(background_class=-1), ValueError,
         r"TargetConfig.background_class: must be in \[0, 2147483647\], got -1"),
        (lambda: presets.get("retinanet_torchvision").replace(background_class=1.5), TypeError,
         "TargetConfig.background_class: expected an integer, got 1.5"),
        (lambda: TargetConfig.from_dict({"background_class": 0}), ValueError, "TargetConfig.anchors: required"),
        (lambda: presets.get("retinanet_torchvision").replace(**{"": 1}), ValueError,
         "override '': expected a dotted field name"),
    ],
)  # fmt: skip
def test_bad_field_is_named(build, error, field):
    with pytest.raises(error, match=field):
        build()


def test_values_at_their_bounds_are_accepted():
    assert AnchorLevel(stride=8, sizes=(1e6,)).sizes == (1e6,)
    assert len(AnchorConfig(layout="torchvision", levels=(LEVEL,) * 16).levels) == 16
    assert MatchConfig(sample_size=256, positive_fraction=1.0).positive_fraction == 1.0
    # high == 1 is the closed end of [0, 1]: only a perfect overlap is positive (mmdet allows pos_iou_thr=1.0)
    assert (MatchConfig(high=1.0, low=1.0).high, MatchConfig(high=1.0, low=0.5).low) == (1.0, 0.5)
    assert presets.get("retinanet_torchvision").replace(background_class=2**31 - 1).background_class == 2**31 - 1


def test_numpy_numbers_are_taken_and_kept_as_pythons():
    """A threshold read from an array (np.float32), a size or stride from one (np.int64), a
    flag from a comparison (np.bool_) were refused ("expected a number, got np.float32(0.5)")
    while whole arrays were taken; they are kept as Python's own, which the configs' JSON
    and wire form need."""
    np = pytest.importorskip("numpy")
    match = MatchConfig(high=np.float32(0.5), low=np.float64(0.25), sample_size=np.int64(256), strict_high=np.True_)
    assert (match.high, match.low, match.sample_size, match.strict_high) == (0.5, 0.25, 256, True)
    level = AnchorLevel(stride=np.int64(8), sizes=tuple(np.float32([32, 64])), aspect_ratios=(np.float16(0.5),))
    ssd = AnchorLevel(stride=8, sizes=(0.1, 0.2), feature_size=(np.int32(4), np.int64(4)))
    encode = EncodeConfig(weights=tuple(np.float32([10, 10, 5, 5])), symmetric_clamp=np.False_)
    config = presets.get("retinanet_torchvision").replace(background_class=np.int64(80))
    values = [match.high, match.sample_size, match.strict_high, level.stride, *level.sizes, *ssd.feature_size,
              *encode.weights, encode.symmetric_clamp, config.background_class]  # fmt: skip
    assert [type(v) for v in values] == [float, int, bool, int, float, float, int, int] + [float] * 4 + [bool, int]
    json.dumps(config.to_dict())  # np.int64 is not JSON
    assert TargetConfig.from_dict(config.to_dict()) == config
    for build, message in (
        (lambda: MatchConfig(high=np.True_), "MatchConfig.high: expected a number"),
        (lambda: MatchConfig(sample_size=np.float64(256.0)), "MatchConfig.sample_size: expected an integer"),
        (lambda: MatchConfig(strict_high=np.int64(1)), "MatchConfig.strict_high: expected a bool"),
    ):
        with pytest.raises(TypeError, match=message):
            build()


def test_defaults_are_the_peers():
    """torchvision's RetinaNet thresholds; detectron2's (and torchvision's) delta clamp."""
    assert (MatchConfig().high, MatchConfig().low) == (0.5, 0.4)
    assert EncodeConfig().scale_clamp == math.log(1000.0 / 16)


@pytest.mark.parametrize(
    "name, values",
    [
        ("weights", (1e39,) * 4),  # infinite in float32: NaN and infinite deltas
        ("weights", (1.0, 1.0, 1.0, 1e-46)),  # zero in float32: decoding divides by it
        ("stds", (1e-46,) * 4),  # zero in float32: encoding divides by it
        ("stds", (1e39,) * 4),
        ("means", (1e39, 0.0, 0.0, 0.0)),
        ("weights", (1e7,) * 4),  # finite in float32, but deltas of a large canvas overflow
    ],
)
def test_encode_values_that_would_break_float32_deltas_are_refused(name, values):
    with pytest.raises(ValueError, match=rf"EncodeConfig\.{name}: values must be in \["):
        EncodeConfig(**{name: values})


def test_encode_values_at_their_bounds_keep_deltas_finite_and_peers_values_are_accepted():
    for weights, stds in [((10.0, 10.0, 5.0, 5.0), (1.0,) * 4), ((1.0,) * 4, (0.1, 0.1, 0.2, 0.2)),
                          ((30.0, 30.0, 15.0, 15.0), (0.033, 0.033, 0.067, 0.067))]:  # fmt: skip
        EncodeConfig(weights=weights, stds=stds)
    extreme = {"encode.weights": (1e6,) * 4, "encode.means": (-1e6,) * 4, "encode.stds": (1e-6,) * 4}
    config = presets.get("retinanet_torchvision").replace(**extreme)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.5, 0.5, 127.5, 95.5]])
    for backend in ("reference", "cpu"):
        targets = assign(boxes, [2], (96, 128), config, backend=backend)
        assert (targets.labels == 1).any() and torch.isfinite(targets.deltas).all(), backend


def test_from_dict_rejects_unknown_fields():
    data = presets.get("rpn_mmdet").to_dict()
    data["match"]["pos_iou_thr"] = 0.7
    with pytest.raises(ValueError, match="pos_iou_thr"):
        TargetConfig.from_dict(data)
