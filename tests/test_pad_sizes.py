"""``pad_sizes``: mmdet's per-image valid flags (``AnchorGenerator.valid_flags`` fed with
each image's ``pad_shape``), in every backend.

An anchor whose feature-map cell lies beyond ``min(ceil(pad / stride), feature size)``
rows or columns of its level is excluded before matching: ignored, matched -1, and not
counted for any box's best anchor. The expectation is built here from mmdet's formula,
independently of the package; where mmdet's source is installed, its own
``AnchorGenerator`` is run too. The triton backend runs under the interpreter on CPU.
"""

from __future__ import annotations

import math
import threading

import mmdet_modules
import numpy as np
import pytest
import torch

from support import assert_targets_equal, on_device, random_batch, with_ties
from tritarget.kernels import (
    AnchorConfig,
    AnchorLevel,
    MatchConfig,
    TargetConfig,
    Targets,
    assign,
    assign_sparse,
    generate_anchors,
    presets,
)
from tritarget.kernels.anchors import feature_map_size

BACKENDS = ["reference", "cpu", "triton"]

# The issue's case: a 512x640 canvas holding an image padded to 416x640.
CANVAS = (512, 640)
PAD = (416, 640)


def _mmdet_valid_flags(config: TargetConfig, canvas: tuple[int, int], pad: tuple[int, int]) -> torch.Tensor:
    """Tensor[A] bool, written from mmdet's documented rule: per level, rows y < valid_h and
    columns x < valid_w with valid = min(ceil(pad / stride), feature size); every base
    anchor of a valid cell is valid (location-major order)."""
    flags = []
    for level, shapes in zip(config.anchors.levels, config.anchors.anchors_per_cell):
        feat_h, feat_w = feature_map_size(canvas, level)
        valid_h = min(math.ceil(pad[0] / level.stride), feat_h)
        valid_w = min(math.ceil(pad[1] / level.stride), feat_w)
        valid_y = torch.arange(feat_h) < valid_h
        valid_x = torch.arange(feat_w) < valid_w
        cell = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
        flags.append(cell[:, None].expand(-1, shapes).reshape(-1))
    return torch.cat(flags)


def _no_boxes_labels(backend: str, config: TargetConfig, pads: list[list[int]]) -> torch.Tensor:
    """Labels of images without boxes: negative where included, ignored where excluded."""
    boxes = torch.zeros(0, 4)
    return on_device(assign, boxes, [0] * len(pads), CANVAS, config, pad_sizes=pads, backend=backend).labels


def test_mmdet_formula_counts_the_issue_case():
    """61,380 RetinaNet anchors on 512x640; padded to 416x640, 1,270 cells (of 6,820) lie
    beyond the image's feature maps: 12 rows of P3, 6 of P4, 3 of P5, 1 of P6, none of P7."""
    config = presets.get("retinanet_mmdet")
    flags = _mmdet_valid_flags(config, CANVAS, PAD)
    assert flags.numel() == 61_380
    assert int((~flags).sum()) == 9 * (12 * 80 + 6 * 40 + 3 * 20 + 1 * 10) == 11_430


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_anchors_are_mmdets_invalid_ones(backend):
    config = presets.get("retinanet_mmdet")
    labels = _no_boxes_labels(backend, config, [list(PAD), list(CANVAS), [512, 330]])
    for image, pad in enumerate([PAD, CANVAS, (512, 330)]):
        expected = torch.where(_mmdet_valid_flags(config, CANVAS, pad), 0, -1).to(torch.int8)
        assert torch.equal(labels[image], expected), f"image {image} padded to {pad}"
    assert int((labels[0] == -1).sum()) == 11_430
    assert int((labels[1] == -1).sum()) == 0


def _load_mmdet_anchor_generator():
    """mmdet's own AnchorGenerator class, from its installed source, without running
    mmdet's package __init__ (which needs mmcv's compiled ops): see mmdet_modules."""
    return mmdet_modules.load().AnchorGenerator


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_mmdets_own_valid_flags(backend):
    """mmdet 3.x AnchorGenerator with the RetinaNet config (configs/_base_/models/
    retinanet_r50_fpn.py): its anchors are the preset's, and its valid flags for
    pad_shape 416x640 are what the backend leaves included."""
    generator_cls = _load_mmdet_anchor_generator()
    generator = generator_cls(strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], octave_base_scale=4,
                              scales_per_octave=3)  # fmt: skip
    config = presets.get("retinanet_mmdet")
    featmaps = [feature_map_size(CANVAS, level) for level in config.anchors.levels]
    flags = torch.cat(generator.valid_flags(featmaps, PAD, device="cpu"))
    anchors = torch.cat(generator.grid_priors(featmaps, device="cpu"))
    assert torch.equal(generate_anchors(config.anchors, CANVAS), anchors)
    labels = _no_boxes_labels(backend, config, [list(PAD)])[0]
    assert torch.equal(labels == 0, flags)
    assert int((~flags).sum()) == 11_430


def _small_mmdet_config(low_quality: str = "mmdet") -> TargetConfig:
    """One level of stride 16 with one 16x16 anchor per cell, centred on x * 16: on a
    64x64 canvas, cell (y, x) holds anchor [16x - 8, 16y - 8, 16x + 8, 16y + 8]."""
    level = AnchorLevel(stride=16, scales=(1.0,), aspect_ratios=(1.0,))
    return TargetConfig(
        anchors=AnchorConfig(layout="mmdet", levels=(level,)),
        match=MatchConfig(high=0.5, low=0.4, low_quality=low_quality),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_anchor_does_not_count_for_a_boxs_best(backend):
    """Box [40, 20, 56, 36]: its best anchor is cell (2, 3) (IoU 0.6), which a 32x64 pad
    excludes (rows 2 and 3 are beyond ceil(32 / 16) = 2). Its best included anchor is
    cell (1, 3) (IoU 64 / 448 = 0.14), which mmdet's low-quality rule makes positive."""
    config = _small_mmdet_config()
    box = torch.tensor([[40.0, 20.0, 56.0, 36.0]])
    plain = on_device(assign, box, [1], (64, 64), config, backend=backend)
    padded = on_device(assign, box, [1], (64, 64), config, pad_sizes=[[32, 64]], backend=backend)
    cell = lambda y, x: 4 * y + x  # noqa: E731
    expected_plain = torch.zeros(16, dtype=torch.int8)
    expected_plain[cell(2, 3)] = 1
    expected_padded = torch.zeros(16, dtype=torch.int8)
    expected_padded[8:] = -1
    expected_padded[cell(1, 3)] = 1
    assert torch.equal(plain.labels[0], expected_plain)
    assert torch.equal(padded.labels[0], expected_padded)
    assert padded.matched_gt[0].tolist() == [0 if a == cell(1, 3) else -1 for a in range(16)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_major_anchors_padded_in_rows_only(backend):
    """YOLOv5's anchors come shape by shape ([K, H, W]), so 64 consecutive anchors may hold
    one shape's last rows and the next shape's first ones. An image padded in its rows
    alone excludes the last rows of every shape, and only those."""
    config = presets.get("yolov5").replace(**{"match.sample_size": 0})
    canvas, pad = (160, 224), (96, 224)  # P3: 20 x 28 cells, 560 per shape, not a multiple of 64
    labels = on_device(assign, torch.zeros(0, 4), [0], canvas, config, pad_sizes=[list(pad)], backend=backend).labels
    expected = []
    for level, shapes in zip(config.anchors.levels, config.anchors.anchors_per_cell):
        feat_h, feat_w = feature_map_size(canvas, level)
        valid_h = min(math.ceil(pad[0] / level.stride), feat_h)
        expected.append((torch.arange(feat_h) < valid_h).repeat_interleave(feat_w).repeat(shapes))
    assert torch.equal(labels[0], torch.where(torch.cat(expected), 0, -1).to(torch.int8))


_CASES = [
    ("retinanet_mmdet", "mmdet", -1, "pre_match"),
    # A border rule as tight as the padding would exclude the same anchors: 32 pixels.
    ("retinanet_mmdet", "torchvision", 32, "pre_match"),
    ("retinanet_mmdet", "detectron2", 32, "post_match"),
    ("rpn_mmdet", "ssd_forced", -1, "pre_match"),
    ("yolov5", "mmdet", 32, "pre_match"),  # shape-major anchors
    ("retinanet_torchvision", "none", -1, "pre_match"),
]


@pytest.mark.parametrize(("name", "low_quality", "border", "order"), _CASES)
def test_backends_equal_the_reference(name, low_quality, border, order, generator):
    """Random boxes (ties included) across padded and unpadded images; the padding must
    change some labels, or the comparison would not test it."""
    canvas = (160, 224)
    config = presets.get(name).replace(
        **{"match.low_quality": low_quality, "match.allowed_border": border, "match.border_order": order,
           "match.sample_size": 0}
    )  # fmt: skip
    boxes, counts = random_batch(generator, [6, 0, 9, 3], canvas)
    boxes = with_ties(boxes, generator)
    classes = torch.randint(0, 5, (boxes.shape[0],), generator=generator)
    pads = [[96, 224], [160, 224], [70, 50], [160, 100]]
    sizes = [[90, 200], [150, 224], [64, 50], [160, 99]]
    kwargs = dict(gt_classes=classes, image_sizes=sizes, pad_sizes=pads)
    ref = assign(boxes, counts, canvas, config, backend="reference", **kwargs)
    unpadded = assign(boxes, counts, canvas, config, backend="reference", gt_classes=classes, image_sizes=sizes)
    assert not torch.equal(ref.labels, unpadded.labels)
    for backend in ("cpu", "triton"):
        assert_targets_equal(on_device(assign, boxes, counts, canvas, config, backend=backend, **kwargs), ref)
        sparse = on_device(assign_sparse, boxes, counts, canvas, config, backend=backend, **kwargs)
        assert_targets_equal(Targets.from_sparse(sparse), Targets.from_sparse(ref.to_sparse()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_equal_to_the_canvas_changes_nothing(backend, generator):
    config = presets.get("retinanet_mmdet")
    canvas = (96, 128)
    boxes, counts = random_batch(generator, [4, 2], canvas)
    plain = on_device(assign, boxes, counts, canvas, config, backend=backend)
    padded = on_device(assign, boxes, counts, canvas, config, pad_sizes=[list(canvas)] * 2, backend=backend)
    assert_targets_equal(padded, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sizes_may_be_numpy_arrays_as_mmdets_shapes_are(backend, generator):
    """Counts took numpy arrays; image and pad sizes (mmdet's img_shape and pad_shape, often
    numpy) were refused: "expected a torch.Tensor, got ndarray"."""
    config = presets.get("retinanet_mmdet")
    canvas = (96, 128)
    boxes, counts = random_batch(generator, [4, 2], canvas)
    sizes = {"image_sizes": [[80, 100], [96, 120]], "pad_sizes": [[96, 128], [96, 120]]}
    as_lists = assign(boxes, counts, canvas, config, backend=backend, **sizes)
    as_numpy = assign(boxes, np.array(counts), canvas, config, backend=backend,
                      **{name: np.array(value) for name, value in sizes.items()})  # fmt: skip
    assert_targets_equal(as_numpy, as_lists, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(pad_sizes=[[32, 64]]), ValueError, r"pad_sizes: expected shape \[2, 2\]"),
        (dict(pad_sizes=[[32, 64], [0, 64]]), ValueError, r"pad_sizes\[1\]: \(0, 64\) must be positive"),
        (dict(pad_sizes=[[32, 64], [65, 64]]), ValueError, r"pad_sizes\[1\].*fit the 64x64 canvas"),
        (dict(pad_sizes=torch.ones(2, 2)), TypeError, "pad_sizes: expected integers"),
        (dict(pad_sizes=[[32, 64]] * 2, image_sizes=[[40, 64], [32, 64]]), ValueError,
         r"pad_sizes\[0\]: \(32, 64\) is smaller than image_sizes\[0\]"),
        (dict(pad_sizes=[[32, 64]] * 2, anchors=torch.tensor([[0.0, 0.0, 8.0, 8.0]])), ValueError,
         "pad_sizes: needs the config's generated anchors"),
    ],
)  # fmt: skip
def test_bad_pad_sizes_are_refused(kwargs, error, message):
    box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    with pytest.raises(error, match=message):
        assign(box.repeat(2, 1), [1, 1], (64, 64), _small_mmdet_config(), backend="reference", **kwargs)


def test_the_service_carries_pad_sizes(generator):
    """Over the wire (merged with a request without pad sizes, and sliced), the same
    targets as in-process; the issue's 416x640 image loses its 11,430 anchors."""
    from test_service_harness import ServerThread, batching

    from tritarget.clients import TargetClient

    config = presets.get("retinanet_mmdet")
    boxes, counts = random_batch(generator, [3, 0, 2], CANVAS)
    pads = [list(PAD), list(CANVAS), [480, 600]]
    expected = assign(boxes, counts, CANVAS, config, pad_sizes=pads, backend="reference")
    with ServerThread(backend="cpu", batching=batching(max_batch_images=2, max_queue_delay_s=0.05)) as srv:
        with TargetClient(srv.address) as client:
            plain, padded = [], []
            other = threading.Thread(target=lambda: plain.append(client.assign(boxes, counts, CANVAS, config=config)))
            other.start()
            padded.append(client.assign(boxes, counts, CANVAS, config=config, pad_sizes=pads, format="dense"))
            other.join(60)
            with pytest.raises(Exception, match="pad_sizes"):
                client.assign(boxes, counts, CANVAS, config=config, pad_sizes=[[600, 640]] * 3)
    assert_targets_equal(padded[0], expected)
    assert int((padded[0].labels[1] == -1).sum()) == int((expected.labels[1] == -1).sum())
    no_boxes = assign(torch.zeros(0, 4), [0], CANVAS, config, pad_sizes=[list(PAD)], backend="cpu")
    assert int((no_boxes.labels == -1).sum()) == 11_430
    unpadded = assign(boxes, counts, CANVAS, config, backend="reference")
    assert torch.equal(plain[0].labels, unpadded.labels)  # the request without pad sizes is unaffected
