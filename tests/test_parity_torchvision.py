"""Parity with torchvision itself: anchors, IoU, matching and box coding.

Every peer object comes from a real torchvision model built without weights
(``retinanet_resnet50_fpn``, ``fasterrcnn_resnet50_fpn``'s RPN, ``ssd300_vgg16``),
so these tests also check that each preset copies the model's numbers: anchor
generator, feature-map sizes of the real backbone, matcher thresholds, box-coder
weights. Labels and matched indices must be equal; deltas agree within 1e-5.

Skipped cleanly without torchvision. The README's test command installs torchvision
0.28.0 with ``--no-deps`` (its wheel pins a CUDA torch); the README's paragraph "Parity
with real torchvision" gives the command for another release, in a venv of its own.
"""

from __future__ import annotations

import pytest
import torch

from support import random_batch, with_ties
from tritarget.kernels import (
    AnchorConfig,
    AnchorLevel,
    assign,
    box_iof,
    box_iou,
    decode,
    encode,
    generate_anchors,
    presets,
)
from tritarget.kernels.anchors import feature_map_size

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import box_iou as tv_box_iou  # noqa: E402

pytestmark = pytest.mark.parity

DELTA_TOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Untrained torchvision detectors (no downloads), keyed by the preset they mirror."""
    detection = torchvision.models.detection
    torch.manual_seed(0)
    return {
        "retinanet_torchvision": detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3
        ).eval(),
        "fasterrcnn_rpn_torchvision": detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3
        ).eval(),
        "ssd300_torchvision": detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=3).eval(),
    }


def _anchor_generator(model: torch.nn.Module) -> torch.nn.Module:
    return model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator


def torchvision_anchors(model: torch.nn.Module, canvas: tuple[int, int]) -> torch.Tensor:
    """Anchors of a model on a padded canvas, from its real backbone's feature maps."""
    images = torch.zeros(1, 3, *canvas)
    with torch.no_grad():
        features = list(model.backbone(images).values())
    return _anchor_generator(model)(ImageList(images, [canvas]), features)[0]


# ---------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------


# Canvases: GeneralizedRCNNTransform pads to multiples of 32, but the anchor
# generator must also agree on any other size (odd, prime, tiny, portrait).
FPN_CANVASES = [(256, 256), (800, 1216), (333, 517), (97, 131), (31, 7), (1333, 800)]


@pytest.mark.parametrize("canvas", FPN_CANVASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("preset", ["retinanet_torchvision", "fasterrcnn_rpn_torchvision"])
def test_fpn_anchors_equal_anchor_generator(models, preset, canvas):
    model = models[preset]
    config = presets.get(preset)
    images = torch.zeros(1, 3, *canvas)
    with torch.no_grad():
        features = list(model.backbone(images).values())
    # Our feature-map rule (ceil(canvas / stride)) is what the real backbone produces.
    assert [tuple(f.shape[-2:]) for f in features] == [feature_map_size(canvas, lv) for lv in config.anchors.levels]
    theirs = _anchor_generator(model)(ImageList(images, [canvas]), features)[0]
    ours = generate_anchors(config.anchors, canvas)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_ssd300_anchors_equal_default_box_generator(models):
    model = models["ssd300_torchvision"]
    config = presets.get("ssd300_torchvision")
    theirs = torchvision_anchors(model, (300, 300))
    ours = generate_anchors(config.anchors, (300, 300))
    assert ours.shape == theirs.shape == (8732, 4)
    assert torch.equal(ours, theirs)


def test_ssd_anchors_on_a_non_square_canvas_equal_default_box_generator():
    """DefaultBoxGenerator with steps on a wide image: centres (j + 0.5) / (width / step) across,
    (i + 0.5) / (height / step) down, and the normalised boxes scaled by width and height."""
    canvas, maps = (60, 100), [(6, 10), (3, 5)]
    generator = DefaultBoxGenerator([[2], [2, 3]], scales=[0.2, 0.5, 0.8], steps=[10, 20])
    images = torch.zeros(1, 3, *canvas)
    theirs = generator(ImageList(images, [canvas]), [torch.zeros(1, 1, *m) for m in maps])[0]
    levels = (
        AnchorLevel(stride=10, sizes=(0.2, 0.5), aspect_ratios=(2,), feature_size=maps[0]),
        AnchorLevel(stride=20, sizes=(0.5, 0.8), aspect_ratios=(2, 3), feature_size=maps[1]),
    )
    ours = generate_anchors(AnchorConfig(layout="ssd", levels=levels), canvas)
    assert ours.shape == theirs.shape == (6 * 10 * 4 + 3 * 5 * 6, 4)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------
# Box arithmetic
# ---------------------------------------------------------------------------------------


def test_box_iou_equals_torchvision_bit_for_bit(generator):
    boxes1 = torch.cat([random_batch(generator, [300], (600, 900))[0], torch.tensor([[10.0, 10.0, 20.0, 20.0]])])
    boxes2 = torch.cat([with_ties(random_batch(generator, [200], (600, 900))[0], generator), boxes1[:7]])
    assert torch.equal(box_iou(boxes1, boxes2), tv_box_iou(boxes1, boxes2))


def test_decode_equals_box_coder_decode_single(models, generator):
    coder = models["ssd300_torchvision"].box_coder  # weights (10, 10, 5, 5)
    config = presets.get("ssd300_torchvision").encode
    anchors = generate_anchors(presets.get("ssd300_torchvision").anchors, (300, 300))
    deltas = torch.randn(anchors.shape[0], 4, generator=generator) * 8  # some dw/dh beyond the clamp
    theirs = coder.decode_single(deltas, anchors)
    ours = decode(deltas, anchors, config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Matching and encoding
# ---------------------------------------------------------------------------------------


def _labels_from_matches(matches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision Matcher output -> (labels int8, matched_gt int32).

    ``>= 0`` positive, ``BELOW_LOW_THRESHOLD`` (-1) negative, ``BETWEEN_THRESHOLDS``
    (-2) ignored.
    """
    labels = torch.zeros(matches.shape, dtype=torch.int8)
    labels[matches >= 0] = 1
    labels[matches == -2] = -1
    return labels, torch.where(matches >= 0, matches, torch.full_like(matches, -1)).to(torch.int32)


def torchvision_targets(preset: str, model, boxes: torch.Tensor, anchors: torch.Tensor):
    """One image's (labels, matched_gt, deltas) as the torchvision model computes them."""
    num_anchors = anchors.shape[0]
    deltas = torch.zeros(num_anchors, 4)
    if preset == "fasterrcnn_rpn_torchvision":
        rpn = model.rpn
        labels_f, matched_boxes = rpn.assign_targets_to_anchors([anchors], [{"boxes": boxes}])
        labels = labels_f[0].to(torch.int8)
        if boxes.shape[0]:
            _, matched = _labels_from_matches(rpn.proposal_matcher(tv_box_iou(boxes, anchors)))
        else:
            matched = torch.full((num_anchors,), -1, dtype=torch.int32)
        positive = labels == 1
        deltas[positive] = rpn.box_coder.encode_single(matched_boxes[0][positive], anchors[positive])
        return labels, matched, deltas
    if boxes.shape[0] == 0:  # RetinaNet and SSD: an image without boxes is all background
        return torch.zeros(num_anchors, dtype=torch.int8), torch.full((num_anchors,), -1, dtype=torch.int32), deltas
    labels, matched = _labels_from_matches(model.proposal_matcher(tv_box_iou(boxes, anchors)))
    positive = labels == 1
    deltas[positive] = model.box_coder.encode_single(boxes[matched[positive].long()], anchors[positive])
    return labels, matched, deltas


def _keep_valid(boxes: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Drop boxes that the API refuses (wholly outside the canvas after snapping)."""
    height, width = canvas
    inside = (boxes[:, 0] < width) & (boxes[:, 1] < height) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    return boxes[inside & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def make_batch(scenario: str, canvas: tuple[int, int], generator: torch.Generator) -> list[torch.Tensor]:
    """The boxes of each image of a scenario."""
    if scenario == "random":
        images = [random_batch(generator, [c], canvas)[0] for c in (1, 5, 17, 3)]
    elif scenario == "crowded":  # many small boxes: many anchors with several candidate boxes
        images = [random_batch(generator, [200], canvas, max_frac=0.15)[0]]
    elif scenario == "ties":  # duplicate boxes and grid-snapped boxes: exact IoU ties everywhere
        images = [with_ties(random_batch(generator, [c], canvas)[0], generator) for c in (2, 9, 40)]
    else:  # "empty": images without boxes between images with boxes
        images = [torch.zeros(0, 4), random_batch(generator, [4], canvas)[0], torch.zeros(0, 4)]
    return [_keep_valid(b, canvas) for b in images]


MATCH_CASES = [
    ("retinanet_torchvision", (333, 517)),
    ("fasterrcnn_rpn_torchvision", (320, 416)),
    ("ssd300_torchvision", (300, 300)),
]


@pytest.mark.parametrize("scenario", ["random", "crowded", "ties", "empty"])
@pytest.mark.parametrize("preset,canvas", MATCH_CASES, ids=[p for p, _ in MATCH_CASES])
def test_targets_equal_torchvision(models, generator, preset, canvas, scenario):
    config = presets.get(preset)
    if config.match.sample_size:
        # Matching only: torchvision samples with the global RNG; sampling is checked below.
        config = config.replace(**{"match.sample_size": 0})
    images = make_batch(scenario, canvas, generator)
    anchors = generate_anchors(config.anchors, canvas)
    ours = assign(torch.cat(images), [b.shape[0] for b in images], canvas, config, backend="reference")
    for i, boxes in enumerate(images):
        labels, matched, deltas = torchvision_targets(preset, models[preset], boxes, anchors)
        assert torch.equal(ours.labels[i], labels), f"image {i}: {(ours.labels[i] != labels).sum()} labels differ"
        assert torch.equal(ours.matched_gt[i], matched), f"image {i}: matched_gt differs"
        torch.testing.assert_close(ours.deltas[i], deltas, rtol=0, atol=DELTA_TOL)
    if scenario == "ties":  # the scenario must really exercise ties, or it proves nothing
        best = box_iou(images[-1], anchors).max(dim=1, keepdim=True).values
        assert ((box_iou(images[-1], anchors) == best).sum(dim=1) > 1).any()


def test_rpn_sampling_keeps_torchvisions_counts(models, generator):
    """256 anchors per image, at most half positive, drawn among the matcher's own labels."""
    preset = "fasterrcnn_rpn_torchvision"
    config, canvas = presets.get(preset), (320, 416)
    sampler = models[preset].rpn.fg_bg_sampler
    images = make_batch("random", canvas, generator) + make_batch("crowded", canvas, generator)
    anchors = generate_anchors(config.anchors, canvas)
    ours = assign(torch.cat(images), [b.shape[0] for b in images], canvas, config, backend="reference", seed=7)
    for i, boxes in enumerate(images):
        labels, _, _ = torchvision_targets(preset, models[preset], boxes, anchors)
        pos_idx, neg_idx = sampler([labels.to(torch.int64)])
        assert int((ours.labels[i] == 1).sum()) == int(pos_idx[0].sum())
        assert int((ours.labels[i] == 0).sum()) == int(neg_idx[0].sum())
        assert (labels[ours.labels[i] == 1] == 1).all()
        assert (labels[ours.labels[i] == 0] == 0).all()


def test_bounding_boxes_are_taken_in_xyxy_and_refused_in_another_format():
    """torchvision's ``BoundingBoxes`` carry their format: XYWH ones were read as xyxy
    (33 positives instead of 41 for one box, no error), the targets silently wrong."""
    from torchvision import tv_tensors

    canvas, config = (96, 128), presets.get("retinanet_torchvision")
    xyxy = torch.tensor([[10.0, 12.0, 60.0, 50.0]])
    expected = assign(xyxy, [1], canvas, config, backend="cpu")
    boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=canvas)
    for backend in ("reference", "cpu"):
        got = assign(boxes, [1], canvas, config, backend=backend)
        assert torch.equal(got.labels, expected.labels) and type(got.deltas) is torch.Tensor
        for form in ("XYWH", "CXCYWH"):
            other = tv_tensors.BoundingBoxes(xyxy, format=form, canvas_size=canvas)
            with pytest.raises(ValueError, match=f"gt_boxes: torchvision BoundingBoxes in format {form}"):
                assign(other, [1], canvas, config, backend=backend)
            with pytest.raises(ValueError, match=f"ignore_boxes: torchvision BoundingBoxes in format {form}"):
                assign(xyxy, [1], canvas, config, ignore_boxes=other, ignore_counts=[1], backend=backend)


def test_the_box_helpers_take_bounding_boxes_as_assign_takes_them():
    """box_iou, box_iof, encode and decode read XYWH ``BoundingBoxes`` as xyxy (IoU 0.375 of
    a box with itself, nonzero deltas for a box on its anchor) until they refused another
    format by name, as ``assign`` does; XYXY ones give the plain tensors' values."""
    from torchvision import tv_tensors

    config = presets.get("retinanet_torchvision").encode
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(64, 96))
    deltas = torch.tensor([[0.1, -0.2, 0.3, 0.0]])
    assert box_iou(boxes, xyxy).tolist() == [[1.0]] and box_iof(xyxy, boxes).tolist() == [[1.0]]
    assert torch.equal(encode(boxes, xyxy, config), torch.zeros(1, 4))
    assert torch.equal(decode(deltas, boxes, config), decode(deltas, xyxy, config))
    for form in ("XYWH", "CXCYWH"):
        other = tv_tensors.BoundingBoxes(xyxy, format=form, canvas_size=(64, 96))
        refused = {
            "boxes1": (box_iou, other, xyxy),
            "boxes2": (box_iof, xyxy, other),
            "boxes": (encode, other, xyxy, config),
            "anchors": (decode, deltas, other, config),
        }
        for name, (helper, *args) in refused.items():
            with pytest.raises(ValueError, match=f"^{name}: torchvision BoundingBoxes in format {form}, but boxes"):
                helper(*args)
