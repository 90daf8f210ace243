"""Parity with mmdetection's own code: anchors, max-IoU assignment, box coding, head targets.

mmdet's pure-torch modules are run from its installed source (``tests/mmdet_modules.py``
loads them without mmdet's package ``__init__`` files and without ``mmcv.ops``):
``AnchorGenerator`` (prior_generators/anchor_generator.py), ``MaxIoUAssigner`` with its
``BboxOverlaps2D`` (assigners/max_iou_assigner.py, iou2d_calculator.py) and
``DeltaXYWHBBoxCoder`` (coders/delta_xywh_bbox_coder.py), configured as mmdet's configs
``configs/_base_/models/retinanet_r50_fpn.py`` and ``rpn_r50_fpn.py`` configure them.

What is compared, per preset (``retinanet_mmdet``, ``rpn_mmdet``) and canvas:

* anchors: equal to ``AnchorGenerator.grid_priors`` (values and order), bit for bit;
* labels, matched box and class of every anchor: equal to ``MaxIoUAssigner.assign``'s
  ``gt_inds`` / ``labels`` on the anchors ``valid_flags`` keeps for the image's
  ``pad_shape`` (the others are ours ignored, mmdet's not assigned), exactly;
* deltas of positives: ``DeltaXYWHBBoxCoder.encode`` of (anchor, matched box) within
  ``DELTA_RTOL`` / ``DELTA_ATOL`` (mmdet computes centres as ``(x1 + x2) * 0.5``, we as
  torchvision does, so the last bit may differ); zeros elsewhere;
* ``mmdet_targets``: ``labels``, ``label_weights``, ``bbox_targets``, ``bbox_weights`` as
  ``AnchorHead._get_targets_single`` builds them from those modules' outputs (with the
  ``PseudoSampler`` RetinaNet uses; ``unmap`` back to all anchors).

mmdet's RPN draws 256 anchors with its ``RandomSampler`` (torch's global RNG); our
sampling is seeded and different, so the RPN is compared without sampling
(``match.sample_size = 0``) and, with it, on what both samplers promise: the drawn
anchors keep their assignment, and as many positives / negatives are drawn.

Skipped where mmdet is not installed (the main venv and CI).
"""

from __future__ import annotations

import math
import runpy
import sys

import mmdet_modules
import pytest
import torch

from support import on_device, random_batch, with_ties
from tritarget.kernels import POSITIVE, AnchorConfig, AnchorLevel, assign, decode, generate_anchors, presets
from tritarget.kernels.adapters import mmdet_targets
from tritarget.kernels.anchors import feature_map_size

pytestmark = pytest.mark.parity
mmdet_modules.mmdet_root()  # skips this module where mmdet's source is not installed

# Float tolerance on deltas (mmdet's encode vs ours, float32).
DELTA_RTOL = 1e-5
DELTA_ATOL = 1e-5

# mmdet's configs, as written in configs/_base_/models/{retinanet,rpn}_r50_fpn.py (checked
# against the installed files by test_configs_are_mmdets where they are installed).
MMDET = {
    "retinanet_mmdet": dict(
        config="retinanet_r50_fpn.py",
        anchor_generator=dict(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                              strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0]),
        assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        train_cfg=dict(allowed_border=-1, pos_weight=-1),
        num_classes=80,
    ),
    "rpn_mmdet": dict(
        config="rpn_r50_fpn.py",
        anchor_generator=dict(scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0]),
        assigner=dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, ignore_iof_thr=-1),
        sampler=dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
        train_cfg=dict(allowed_border=-1, pos_weight=-1),
        num_classes=1,  # RPNHead: one class; two-stage detectors give every RPN box label 0
    ),
}  # fmt: skip
PRESETS = list(MMDET)
CANVASES = [(512, 640), (333, 517)]
# Triton runs under its interpreter on CPU (slow): on the odd canvas only.
ASSIGN_CASES = [(canvas, backend) for canvas in CANVASES for backend in ("reference", "cpu")]
ASSIGN_CASES.append((CANVASES[1], "triton"))


@pytest.fixture(scope="module")
def mm():
    return mmdet_modules.load()


def _section(model: dict, name: str) -> dict:
    """mmdet config section ``name`` of a model dict (the RPN's is under rpn_head / train_cfg.rpn)."""
    head = model.get("bbox_head") or model["rpn_head"]
    train = model["train_cfg"].get("rpn", model["train_cfg"])
    if name == "train_cfg":
        return {k: train[k] for k in ("allowed_border", "pos_weight")}
    found = head[name] if name in head else train[name]
    return {k: v for k, v in found.items() if k != "type"}


@pytest.mark.parametrize("name", PRESETS)
def test_configs_are_mmdets(name, mm):
    """The numbers above are the installed mmdet's configs (shipped in mmdet/.mim)."""
    path = mm.root / ".mim/configs/_base_/models" / MMDET[name]["config"]
    if not path.exists():
        pytest.skip(f"mmdet's configs are not installed ({path})")
    model = runpy.run_path(str(path))["model"]
    for section in ("anchor_generator", "bbox_coder", "assigner", "sampler", "train_cfg"):
        if section in MMDET[name]:
            assert _section(model, section) == MMDET[name][section], section


def _generator(mm, name: str):
    return mm.AnchorGenerator(**MMDET[name]["anchor_generator"])


def _assigner(mm, name: str):
    return mm.MaxIoUAssigner(**MMDET[name]["assigner"])


def _featmaps(name: str, canvas: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map sizes of a ResNet-FPN on a padded canvas: ceil(canvas / stride)."""
    strides = MMDET[name]["anchor_generator"]["strides"]
    return [(math.ceil(canvas[0] / s), math.ceil(canvas[1] / s)) for s in strides]


# ---------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("canvas", [*CANVASES, (800, 1333), (97, 131)])
@pytest.mark.parametrize("name", PRESETS)
def test_anchors_equal_mmdets_anchor_generator(name, canvas, mm):
    config = presets.get(name)
    featmaps = _featmaps(name, canvas)
    assert [feature_map_size(canvas, level) for level in config.anchors.levels] == featmaps
    theirs = _generator(mm, name).grid_priors(featmaps, device="cpu")
    ours = generate_anchors(config.anchors, canvas)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.cat(theirs))
    assert _generator(mm, name).num_base_priors == list(config.anchors.anchors_per_cell)


def test_base_sizes_and_a_center_offset_equal_mmdets_anchor_generator(mm):
    """The AnchorGenerator options no preset sets: base sizes other than the strides, and
    base anchors centred at center_offset * base_size (both axes), on a non-square canvas."""
    strides, base_sizes, ratios, scales = [8, 16], [6.0, 20.0], [0.5, 1.0, 2.0], [1.0, 2.0]
    levels = tuple(AnchorLevel(stride=s, scales=tuple(scales), aspect_ratios=tuple(ratios), base_size=b)
                   for s, b in zip(strides, base_sizes))  # fmt: skip
    config = AnchorConfig(layout="mmdet", levels=levels, center_offset=0.5)
    theirs = mm.AnchorGenerator(strides=strides, ratios=ratios, scales=scales, base_sizes=base_sizes, center_offset=0.5)
    canvas = (40, 72)
    featmaps = [feature_map_size(canvas, lv) for lv in levels]
    assert torch.equal(generate_anchors(config, canvas), torch.cat(theirs.grid_priors(featmaps, device="cpu")))


def test_fitted_anchors_are_ones_mmdets_anchor_generator_builds(mm):
    """`tritarget anchors fit` on an mmdet config: the model decodes its predictions with
    mmdet's own generator, which takes one set of scales for every level."""
    from tritarget.clients.anchor_design import fit_anchors, from_tensors

    generator = torch.Generator().manual_seed(0)
    images = []
    for _ in range(12):  # tall and wide boxes (1:4 and 4:1), which the preset serves badly
        xy = torch.rand(6, 2, generator=generator) * 150
        side = torch.rand(6, 1, generator=generator) * 40 + 10
        wh = torch.cat([side, 4 * side], dim=1)[:, torch.randperm(2, generator=generator)]
        images.append(torch.cat([xy, xy + wh], dim=1))
    config = presets.get("retinanet_mmdet")
    fitted = fit_anchors(from_tensors(images, [(320, 320)] * 12), config, generations=8, backend="cpu").config
    assert fitted != config
    levels = fitted.anchors.levels
    theirs = mm.AnchorGenerator(strides=[lv.stride for lv in levels], ratios=list(levels[0].aspect_ratios),
                                scales=list(levels[0].scales))  # fmt: skip
    canvas = (320, 320)
    featmaps = [feature_map_size(canvas, lv) for lv in levels]
    assert torch.equal(generate_anchors(fitted.anchors, canvas), torch.cat(theirs.grid_priors(featmaps, device="cpu")))


# ---------------------------------------------------------------------------------------
# Random batches: several images, ties, an empty image, a crowded image, padded images
# ---------------------------------------------------------------------------------------


def _batch(generator: torch.Generator, canvas: tuple[int, int], name: str):
    """(boxes, counts, classes, pads): seven images. Boxes of a padded image lie inside its
    pad_shape (mmdet's images are never smaller than their boxes). Image 1 has no boxes,
    image 4 is crowded, image 2 repeats boxes exactly, image 5 holds copies of anchors
    (IoU 1 with an anchor, ties with its neighbours' images) and boxes straddling cells."""
    height, width = canvas
    pads = [canvas, canvas, canvas, (height - 37, width), canvas, canvas, (height // 2 + 3, width - 64)]
    counts = [6, 0, 9, 5, 60, 8, 4]
    parts = []
    for count, pad in zip(counts, pads):
        boxes, _ = random_batch(generator, [count], pad)
        parts.append(boxes)
    parts[2] = with_ties(parts[2], generator)
    parts[4] = with_ties(parts[4], generator)
    anchors = generate_anchors(presets.get(name).anchors, canvas)
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width) & (anchors[:, 3] <= height)
    inside = torch.nonzero(inside).squeeze(1)
    pick = inside[torch.randint(0, inside.numel(), (4,), generator=generator)]
    straddle = torch.tensor([[8.0, 8.0, 40.0, 24.0], [16.0, 16.0, 48.0, 48.0], [4.0, 4.0, 36.0, 36.0],
                             [100.0, 60.0, 164.0, 124.0]])  # fmt: skip
    parts[5] = torch.cat([anchors[pick], straddle])
    boxes = torch.cat(parts)
    classes = torch.randint(0, MMDET[name]["num_classes"], (boxes.shape[0],), generator=generator)
    return boxes, counts, classes, [list(p) for p in pads]


def _config(name: str, **overrides):
    config = presets.get(name)
    return config.replace(**{"match.sample_size": 0, **overrides})


def _mmdet_image(mm, name, canvas, anchors, gt, gt_labels, pad, assigner=None):
    """mmdet on one image: (valid flags, AssignResult over the valid anchors)."""
    flags = torch.cat(_generator(mm, name).valid_flags(_featmaps(name, canvas), tuple(pad), device="cpu"))
    assigner = assigner or _assigner(mm, name)
    result = assigner.assign(mm.InstanceData(priors=anchors[flags]), mm.InstanceData(bboxes=gt, labels=gt_labels))
    return flags, result


def _images(boxes, counts, classes):
    start = 0
    for count in counts:
        yield boxes[start : start + count], classes[start : start + count]
        start += count


def _ours(name, canvas, boxes, counts, classes, pads, backend, config=None):
    config = config or _config(name)
    gt_classes = classes if name == "retinanet_mmdet" else None
    # On the triton backend's device: a GPU machine runs it compiled, which takes CUDA tensors.
    return on_device(assign, boxes, counts, canvas, config, gt_classes=gt_classes, pad_sizes=pads, backend=backend)


def _unmapped(flags: torch.Tensor, values: torch.Tensor, fill) -> torch.Tensor:
    """mmdet's ``unmap``: values of the valid anchors, ``fill`` at the others."""
    out = values.new_full((flags.numel(), *values.shape[1:]), fill)
    out[flags] = values
    return out


@pytest.mark.parametrize("assign_all", [True, False])
@pytest.mark.parametrize(("canvas", "backend"), ASSIGN_CASES)
@pytest.mark.parametrize("name", PRESETS)
def test_assignment_equals_max_iou_assigner(name, canvas, backend, assign_all, mm, generator):
    """mmdet's ``gt_max_assign_all=False`` (each box lifts only its first best anchor,
    boxes in order) is ``low_quality="ssd_forced"`` with the same ``min_pos_iou``."""
    boxes, counts, classes, pads = _batch(generator, canvas, name)
    config = _config(name) if assign_all else _config(name, **{"match.low_quality": "ssd_forced"})
    assigner = mm.MaxIoUAssigner(**MMDET[name]["assigner"], gt_max_assign_all=assign_all)
    ours = _ours(name, canvas, boxes, counts, classes, pads, backend, config=config)
    anchors = generate_anchors(presets.get(name).anchors, canvas)
    if not assign_all and backend != "triton":  # the two rules disagree on this batch (hundreds of anchors)
        assert not torch.equal(ours.labels, _ours(name, canvas, boxes, counts, classes, pads, backend).labels)
    positives = 0
    for image, ((gt, gt_labels), pad) in enumerate(zip(_images(boxes, counts, classes), pads)):
        flags, result = _mmdet_image(mm, name, canvas, anchors, gt, gt_labels, pad, assigner)
        gt_inds = _unmapped(flags, result.gt_inds, -1)  # invalid anchors: never assigned
        # mmdet gt_inds: 0 negative, -1 not assigned, i + 1 the i-th box (0-based).
        labels = torch.where(gt_inds > 0, 1, torch.where(gt_inds == 0, 0, -1)).to(torch.int8)
        matched = torch.where(gt_inds > 0, gt_inds - 1, -1).to(torch.int32)
        where = f"{name} {canvas} image {image}"
        bad = torch.nonzero(ours.labels[image] != labels).squeeze(1)
        assert bad.numel() == 0, f"{where}: labels differ at anchors {bad[:8].tolist()}: " \
            f"ours {ours.labels[image][bad[:8]].tolist()}, mmdet {labels[bad[:8]].tolist()}"  # fmt: skip
        bad = torch.nonzero(ours.matched_gt[image] != matched).squeeze(1)
        assert bad.numel() == 0, f"{where}: matched box differs at anchors {bad[:8].tolist()}: " \
            f"ours {ours.matched_gt[image][bad[:8]].tolist()}, mmdet {matched[bad[:8]].tolist()}"  # fmt: skip
        if name == "retinanet_mmdet":
            mm_classes = _unmapped(flags, result.labels, -1)
            pos = labels == 1
            assert torch.equal(ours.classes[image][pos].long(), mm_classes[pos]), where
        positives += int((labels == 1).sum())
    assert positives > 0
    assert int((ours.labels[1] == 0).sum()) == anchors.shape[0]  # the empty image: all negative


@pytest.mark.parametrize(
    "encode",
    [None, {"encode.means": (0.0, 0.0, 0.0, 0.0), "encode.stds": (0.1, 0.1, 0.2, 0.2)},
     {"encode.means": (0.05, -0.1, 0.2, 0.0), "encode.stds": (0.5, 1.0, 2.0, 0.25)}],
    ids=["preset", "stds", "means_stds"],
)  # fmt: skip
@pytest.mark.parametrize("canvas", CANVASES)
@pytest.mark.parametrize("name", PRESETS)
def test_deltas_equal_delta_xywh_encode(name, canvas, encode, mm, generator):
    config = _config(name, **(encode or {}))
    coder_cfg = dict(MMDET[name]["bbox_coder"])
    if encode:
        coder_cfg = dict(target_means=list(encode["encode.means"]), target_stds=list(encode["encode.stds"]))
    else:
        assert list(config.encode.means) == coder_cfg["target_means"]
        assert list(config.encode.stds) == coder_cfg["target_stds"]
    coder = mm.DeltaXYWHBBoxCoder(**coder_cfg)
    boxes, counts, classes, pads = _batch(generator, canvas, name)
    ours = _ours(name, canvas, boxes, counts, classes, pads, "cpu", config=config)
    reference = _ours(name, canvas, boxes, counts, classes, pads, "reference", config=config)
    anchors = generate_anchors(config.anchors, canvas)
    for image, (gt, _) in enumerate(_images(boxes, counts, classes)):
        pos = ours.labels[image] == POSITIVE
        expected = torch.zeros_like(ours.deltas[image])
        if pos.any():
            expected[pos] = coder.encode(anchors[pos], gt[ours.matched_gt[image][pos].long()])
        for result in (ours, reference):
            torch.testing.assert_close(result.deltas[image], expected, rtol=DELTA_RTOL, atol=DELTA_ATOL)
            assert torch.all(result.deltas[image][~pos] == 0)


@pytest.mark.parametrize("name", PRESETS)
def test_decode_equals_delta_xywh_decode(name, mm, generator):
    """Predictions far past the clamp both ways (dw, dh in [-9, 9]) decode as mmdet's
    ``delta2bbox`` decodes them (no ``max_shape``: nothing clipped to the image)."""
    config = presets.get(name)
    coder = mm.DeltaXYWHBBoxCoder(**MMDET[name]["bbox_coder"])
    anchors = generate_anchors(config.anchors, CANVASES[0])[::97]
    deltas = torch.rand(anchors.shape[0], 4, generator=generator) * 18 - 9
    expected = coder.decode(anchors, deltas)
    torch.testing.assert_close(decode(deltas, anchors, config.encode), expected, rtol=DELTA_RTOL, atol=DELTA_ATOL)
    assert bool((deltas[:, 2:] < -config.encode.scale_clamp).any())  # the lower clamp was reached


def _expected_head_targets(mm, name, canvas, boxes, counts, classes, pads, num_classes, pos_weight):
    """``AnchorHead._get_targets_single`` (mmdet 3.x dense_heads/anchor_head.py), image by
    image, from mmdet's modules: inside flags = valid flags (allowed_border -1), assign,
    PseudoSampler (positives gt_inds > 0, negatives gt_inds == 0), encode the positives,
    then unmap to all anchors (labels filled with num_classes, the rest with 0)."""
    anchors = generate_anchors(presets.get(name).anchors, canvas)
    coder = mm.DeltaXYWHBBoxCoder(**MMDET[name]["bbox_coder"])
    rows = {"labels": [], "label_weights": [], "bbox_targets": [], "bbox_weights": []}
    for (gt, gt_labels), pad in zip(_images(boxes, counts, classes), pads):
        if name == "rpn_mmdet":
            gt_labels = torch.zeros_like(gt_labels)  # TwoStageDetector.loss: RPN labels are 0
        flags, result = _mmdet_image(mm, name, canvas, anchors, gt, gt_labels, pad)
        valid = anchors[flags]
        n = valid.shape[0]
        pos_inds = torch.nonzero(result.gt_inds > 0).squeeze(1).unique()
        neg_inds = torch.nonzero(result.gt_inds == 0).squeeze(1).unique()
        labels = torch.full((n,), num_classes, dtype=torch.long)
        label_weights = torch.zeros(n, dtype=torch.float32)
        bbox_targets = torch.zeros(n, 4)
        bbox_weights = torch.zeros(n, 4)
        if pos_inds.numel() > 0:
            pos_gt = gt[result.gt_inds[pos_inds] - 1]
            bbox_targets[pos_inds] = coder.encode(valid[pos_inds], pos_gt)
            bbox_weights[pos_inds] = 1.0
            labels[pos_inds] = result.labels[pos_inds]
            label_weights[pos_inds] = 1.0 if pos_weight <= 0 else pos_weight
        if neg_inds.numel() > 0:
            label_weights[neg_inds] = 1.0
        rows["labels"].append(_unmapped(flags, labels, num_classes))
        rows["label_weights"].append(_unmapped(flags, label_weights, 0.0))
        rows["bbox_targets"].append(_unmapped(flags, bbox_targets, 0.0))
        rows["bbox_weights"].append(_unmapped(flags, bbox_weights, 0.0))
    return {key: torch.stack(value) for key, value in rows.items()}


@pytest.mark.parametrize("pos_weight", [-1.0, 2.5])
@pytest.mark.parametrize("canvas", CANVASES)
@pytest.mark.parametrize("name", PRESETS)
def test_mmdet_targets_equal_anchor_head_targets(name, canvas, pos_weight, mm, generator):
    num_classes = MMDET[name]["num_classes"]
    if pos_weight == -1.0:
        pos_weight = MMDET[name]["train_cfg"]["pos_weight"]
    boxes, counts, classes, pads = _batch(generator, canvas, name)
    ours = mmdet_targets(_ours(name, canvas, boxes, counts, classes, pads, "cpu"), num_classes, pos_weight=pos_weight)
    expected = _expected_head_targets(mm, name, canvas, boxes, counts, classes, pads, num_classes, pos_weight)
    for key in ("labels", "label_weights", "bbox_weights"):
        assert ours[key].dtype == expected[key].dtype, key
        assert torch.equal(ours[key], expected[key]), key
    torch.testing.assert_close(ours["bbox_targets"], expected["bbox_targets"], rtol=DELTA_RTOL, atol=DELTA_ATOL)
    assert int((expected["labels"] < num_classes).sum()) > 0


@pytest.mark.parametrize("canvas", CANVASES)
def test_rpn_sampling_keeps_mmdets_assignment_and_counts(canvas, mm, generator):
    """rpn_mmdet with its sampling (256 anchors, half positive at most): every drawn anchor
    keeps mmdet's label and box, and as many positives and negatives are drawn as mmdet's
    RandomSampler draws (positives min(#pos, 128), negatives min(256 - drawn positives, #neg))."""
    name = "rpn_mmdet"
    sampler = MMDET[name]["sampler"]
    config = presets.get(name)
    assert (config.match.sample_size, config.match.positive_fraction) == (sampler["num"], sampler["pos_fraction"])
    boxes, counts, classes, pads = _batch(generator, canvas, name)
    unsampled = _ours(name, canvas, boxes, counts, classes, pads, "cpu")
    sampled = _ours(name, canvas, boxes, counts, classes, pads, "cpu", config=config)
    for image in range(len(counts)):
        labels, drawn = unsampled.labels[image], sampled.labels[image]
        kept = drawn != -1
        assert torch.equal(drawn[kept], labels[kept]), f"image {image}"
        assert torch.equal(sampled.matched_gt[image][kept], unsampled.matched_gt[image][kept])
        n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
        want_pos = min(n_pos, int(sampler["num"] * sampler["pos_fraction"]))
        want_neg = min(sampler["num"] - want_pos, n_neg)
        assert (int((drawn == 1).sum()), int((drawn == 0).sum())) == (want_pos, want_neg), f"image {image}"


@pytest.mark.parametrize("name", PRESETS)
def test_single_box_image_and_exact_anchor_copy(name, mm):
    """A box equal to an anchor (IoU 1 there) on the odd canvas; mmdet and ours agree on
    every anchor, and that anchor is positive, matched to the box."""
    canvas = CANVASES[1]
    anchors = generate_anchors(presets.get(name).anchors, canvas)
    index = int(torch.nonzero((anchors[:, 0] >= 100) & (anchors[:, 1] >= 100))[0])
    gt = anchors[index : index + 1].clone()
    ours = _ours(name, canvas, gt, [1], torch.zeros(1, dtype=torch.long), [list(canvas)], "reference")
    flags, result = _mmdet_image(mm, name, canvas, anchors, gt, torch.zeros(1, dtype=torch.long), canvas)
    assert bool(flags.all())
    expected = torch.where(result.gt_inds > 0, 1, torch.where(result.gt_inds == 0, 0, -1)).to(torch.int8)
    assert torch.equal(ours.labels[0], expected)
    assert int(ours.labels[0][index]) == 1 and int(ours.matched_gt[0][index]) == 0


def test_loader_leaves_no_mmdet_modules_behind(mm):
    """The stand-in packages are gone after loading: no other test sees a fake mmdet."""
    assert not [name for name in sys.modules if name.startswith(("mmdet.", "mmcv.ops"))]
