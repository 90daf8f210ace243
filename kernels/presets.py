"""Named configurations that reproduce each peer's training targets.

Names are API: the service and clients refer to them. ``names()`` lists them,
``get(name)`` returns the ``TargetConfig``, ``describe(name)`` says what it mirrors.
Feature-map sizes follow the canvas (``ceil(canvas / stride)``) except for the
fixed-input SSD-style detectors, whose maps are part of the network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .config import AnchorConfig, AnchorLevel, EncodeConfig, MatchConfig, TargetConfig

__all__ = ["names", "get", "describe"]

_PRESETS: dict[str, Callable[[], TargetConfig]] = {}


def _preset(fn: Callable[[], TargetConfig]) -> Callable[[], TargetConfig]:
    _PRESETS[fn.__name__] = fn
    return fn


def names() -> list[str]:
    """All preset names, sorted."""
    return sorted(_PRESETS)


def get(name: str) -> TargetConfig:
    """The config of a preset; ``KeyError`` names the known presets. One shared instance
    per name (configs are frozen; ``replace`` derives others): building one takes ~0.13 ms,
    and the same object each time lets ``assign``'s caches find it by identity."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    return _built(name)


@functools.cache
def _built(name: str) -> TargetConfig:
    return _PRESETS[name]()


def describe(name: str) -> str:
    """One paragraph on what a preset mirrors (its docstring)."""
    get(name)
    return " ".join(_PRESETS[name].__doc__.split())


_FPN_STRIDES_P3_P7 = (8, 16, 32, 64, 128)
_FPN_STRIDES_P2_P6 = (4, 8, 16, 32, 64)
# DeltaXYWHBBoxCoder: means 0, stds 1; its decode clamps dw/dh both ways.
_MMDET_ENCODE = EncodeConfig(symmetric_clamp=True)
_RATIOS = (0.5, 1.0, 2.0)


@_preset
def retinanet_torchvision() -> TargetConfig:
    """torchvision 0.15+ RetinaNet (models/detection/retinanet.py: _default_anchorgen,
    Matcher(0.5, 0.4, allow_low_quality_matches=True), BoxCoder((1, 1, 1, 1))).
    Octave sizes are truncated to int as torchvision does: (32, 40, 50), (64, 80, 101), ...
    """
    sizes = [(x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512)]
    levels = tuple(AnchorLevel(stride=s, sizes=sz, aspect_ratios=_RATIOS) for s, sz in zip(_FPN_STRIDES_P3_P7, sizes))
    return TargetConfig(
        anchors=AnchorConfig(layout="torchvision", levels=levels),
        match=MatchConfig(high=0.5, low=0.4, low_quality="torchvision"),
    )


@_preset
def fasterrcnn_rpn_torchvision() -> TargetConfig:
    """torchvision 0.15+ Faster R-CNN RPN (models/detection/faster_rcnn.py: _default_anchorgen,
    rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3, allow_low_quality_matches=True,
    rpn_batch_size_per_image=256, rpn_positive_fraction=0.5, BoxCoder((1, 1, 1, 1))).
    """
    levels = tuple(AnchorLevel(stride=s, sizes=(size,), aspect_ratios=_RATIOS)
                   for s, size in zip(_FPN_STRIDES_P2_P6, (32, 64, 128, 256, 512)))  # fmt: skip
    return TargetConfig(
        anchors=AnchorConfig(layout="torchvision", levels=levels),
        match=MatchConfig(high=0.7, low=0.3, low_quality="torchvision", sample_size=256, positive_fraction=0.5),
    )


@_preset
def ssd300_torchvision() -> TargetConfig:
    """torchvision 0.15+ SSD300-VGG16 (models/detection/ssd.py: ssd300_vgg16's
    DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=[0.07, 0.15, 0.33,
    0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300]), feature maps 38, 19, 10, 5, 3, 1,
    SSDMatcher(0.5), BoxCoder((10, 10, 5, 5))). Canvas 300 x 300.
    """
    ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    scales = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
    steps = (8, 16, 32, 64, 100, 300)
    maps = (38, 19, 10, 5, 3, 1)
    levels = tuple(
        AnchorLevel(stride=steps[k], sizes=(scales[k], scales[k + 1]), aspect_ratios=ratios[k],
                    feature_size=(maps[k], maps[k]))
        for k in range(6)
    )  # fmt: skip
    return TargetConfig(
        anchors=AnchorConfig(layout="ssd", levels=levels, clip=True),
        match=MatchConfig(high=0.5, low=0.5, low_quality="ssd_forced"),
        encode=EncodeConfig(weights=(10.0, 10.0, 5.0, 5.0)),
    )


@_preset
def retinanet_detectron2() -> TargetConfig:
    """detectron2 v0.6 RetinaNet (configs/Base-RetinaNet.yaml, modeling/anchor_generator.py
    DefaultAnchorGenerator with OFFSET 0.0, modeling/matcher.py Matcher([0.4, 0.5],
    [0, -1, 1], allow_low_quality_matches=True), BBOX_REG_WEIGHTS (1, 1, 1, 1)).
    """
    sizes = [(x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)) for x in (32, 64, 128, 256, 512)]
    levels = tuple(AnchorLevel(stride=s, sizes=sz, aspect_ratios=_RATIOS) for s, sz in zip(_FPN_STRIDES_P3_P7, sizes))
    return TargetConfig(
        anchors=AnchorConfig(layout="detectron2", levels=levels, offset=0.0),
        match=MatchConfig(high=0.5, low=0.4, low_quality="detectron2"),
    )


@_preset
def rpn_detectron2() -> TargetConfig:
    """detectron2 v0.6 RPN (config/defaults.py + Base-RCNN-FPN.yaml: sizes [[32], [64], [128],
    [256], [512]], ratios [0.5, 1, 2], IOU_THRESHOLDS [0.3, 0.7], BATCH_SIZE_PER_IMAGE 256,
    POSITIVE_FRACTION 0.5, BOUNDARY_THRESH -1; modeling/proposal_generator/rpn.py).
    """
    levels = tuple(AnchorLevel(stride=s, sizes=(size,), aspect_ratios=_RATIOS)
                   for s, size in zip(_FPN_STRIDES_P2_P6, (32, 64, 128, 256, 512)))  # fmt: skip
    return TargetConfig(
        anchors=AnchorConfig(layout="detectron2", levels=levels, offset=0.0),
        match=MatchConfig(high=0.7, low=0.3, low_quality="detectron2", sample_size=256, positive_fraction=0.5,
                          allowed_border=-1, border_order="post_match"),
    )  # fmt: skip


@_preset
def retinanet_mmdet() -> TargetConfig:
    """mmdetection v2.x / v3.x RetinaNet (configs/_base_/models/retinanet_r50_fpn.py:
    AnchorGenerator(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
    strides=[8, 16, 32, 64, 128]), MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4,
    min_pos_iou=0, ignore_iof_thr=-1), DeltaXYWHBBoxCoder(means 0, stds 1)).
    """
    scales = tuple(4 * 2 ** (i / 3) for i in range(3))
    levels = tuple(AnchorLevel(stride=s, scales=scales, aspect_ratios=_RATIOS) for s in _FPN_STRIDES_P3_P7)
    return TargetConfig(
        anchors=AnchorConfig(layout="mmdet", levels=levels, center_offset=0.0),
        match=MatchConfig(high=0.5, low=0.4, low_quality="mmdet", min_pos_iou=0.0),
        encode=_MMDET_ENCODE,
    )


@_preset
def rpn_mmdet() -> TargetConfig:
    """mmdetection v2.x / v3.x Faster R-CNN RPN (configs/_base_/models/faster_rcnn_r50_fpn.py:
    AnchorGenerator(scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
    MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
    RandomSampler(num=256, pos_fraction=0.5), allowed_border=-1).
    """
    levels = tuple(AnchorLevel(stride=s, scales=(8.0,), aspect_ratios=_RATIOS) for s in _FPN_STRIDES_P2_P6)
    return TargetConfig(
        anchors=AnchorConfig(layout="mmdet", levels=levels),
        match=MatchConfig(high=0.7, low=0.3, low_quality="mmdet", min_pos_iou=0.3,
                          sample_size=256, positive_fraction=0.5),
        encode=_MMDET_ENCODE,
    )  # fmt: skip


@_preset
def d2l_multibox() -> TargetConfig:
    """Dive into Deep Learning v1.0 TinySSD (chapter "Single Shot Multibox Detection":
    multibox_prior with sizes [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79],
    [0.88, 0.961]] and ratios [1, 2, 0.5] on 32, 16, 8, 4, 1 feature maps of a 256 x 256
    input; multibox_target with iou_threshold 0.5 and offsets weighted (10, 10, 5, 5)).
    d2l's greedy best-pair assignment is ``ssd_forced`` whenever boxes have distinct best
    anchors; d2l adds 1e-6 inside the log of dw/dh, we do not.
    """
    sizes = ((0.2, 0.272), (0.37, 0.447), (0.54, 0.619), (0.71, 0.79), (0.88, 0.961))
    maps = (32, 16, 8, 4, 1)
    strides = (8, 16, 32, 64, 256)
    levels = tuple(
        AnchorLevel(stride=strides[k], sizes=sizes[k], aspect_ratios=(1.0, 2.0, 0.5), feature_size=(maps[k], maps[k]))
        for k in range(5)
    )
    return TargetConfig(
        anchors=AnchorConfig(layout="d2l", levels=levels),
        match=MatchConfig(high=0.5, low=0.5, low_quality="ssd_forced"),
        encode=EncodeConfig(weights=(10.0, 10.0, 5.0, 5.0)),
    )


@_preset
def yolov5() -> TargetConfig:
    """YOLOv5 v7.0 anchors (models/yolov5s.yaml: P3/8 (10,13, 16,30, 33,23), P4/16 (30,61,
    62,45, 59,119), P5/32 (116,90, 156,198, 373,326)), centred in each cell, in YOLOv5's
    anchor-major order, with max-IoU matching (0.5 / 0.4, torchvision low-quality rule).
    YOLOv5's own width/height-ratio assigner is not a max-IoU rule and is not reproduced.
    Canvases are multiples of 32, as YOLOv5's letterbox makes them: on others its stem
    rounds the feature maps down where this preset rounds them up (``feature_map_size``).
    """
    shapes = (
        ((10, 13), (16, 30), (33, 23)),
        ((30, 61), (62, 45), (59, 119)),
        ((116, 90), (156, 198), (373, 326)),
    )
    levels = tuple(AnchorLevel(stride=s, shapes=sh) for s, sh in zip((8, 16, 32), shapes))
    return TargetConfig(
        anchors=AnchorConfig(layout="yolo", levels=levels),
        match=MatchConfig(high=0.5, low=0.4, low_quality="torchvision"),
    )
