"""Framework adapters and sparse losses.

Conventions are checked on hand-built targets (each expected value from the framework's
file named in ``tritarget.kernels.adapters``); the losses against a dense float64
evaluation of their definitions; and, where torchvision is installed (the ``parity``
extra), against torchvision's own ``Matcher``, ``RetinaNetHead.compute_loss`` and
``RegionProposalNetwork.compute_loss`` on the same batch. Losses agree to float32
rounding (sums run in another order): rtol 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support import random_batch
from tritarget.kernels import SparseTargets, Targets, assign, assign_sparse, generate_anchors, presets
from tritarget.kernels.adapters import detectron2_targets, mmdet_targets, torchvision_matched_idxs
from tritarget.kernels.losses import box_regression_loss, retinanet_loss, rpn_loss, sigmoid_focal_loss, ssd_loss

LOSS_RTOL = 1e-5


def _hand_targets() -> Targets:
    """Two images of four anchors: image 0 positive (box 1, class 3), negative, ignored,
    positive (box 0, class 7); image 1 has no boxes (all negative but one ignored)."""
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, -1, 0]], dtype=torch.int8)
    matched = torch.tensor([[1, -1, -1, 0], [-1, -1, -1, -1]], dtype=torch.int32)
    deltas = torch.zeros(2, 4, 4)
    deltas[0, 0] = torch.tensor([0.1, -0.2, 0.3, -0.4])
    deltas[0, 3] = torch.tensor([-0.5, 0.6, -0.7, 0.8])
    classes = torch.tensor([[3, 0, 0, 7], [0, 0, 0, 0]], dtype=torch.int32)
    return Targets(labels, matched, deltas, classes)


@pytest.mark.parametrize("sparse", [False, True])
def test_torchvision_matched_idxs_conventions(sparse):
    """torchvision Matcher: index for matches, BELOW_LOW_THRESHOLD -1, BETWEEN_THRESHOLDS -2."""
    targets = _hand_targets()
    idxs = torchvision_matched_idxs(targets.to_sparse() if sparse else targets)
    assert [t.tolist() for t in idxs] == [[1, -1, -2, 0], [-1, -1, -2, -1]]
    assert all(t.dtype == torch.int64 for t in idxs)


def test_detectron2_conventions():
    """RPN.label_and_sample_anchors: 1/0/-1; RetinaNet.label_anchors: class, background
    num_classes, -1 ignored."""
    targets = _hand_targets()
    objectness, deltas = detectron2_targets(targets)
    assert [t.tolist() for t in objectness] == [[1, 0, -1, 1], [0, 0, -1, 0]]
    labels, _ = detectron2_targets(targets, num_classes=80)
    assert [t.tolist() for t in labels] == [[3, 80, -1, 7], [80, 80, -1, 80]]
    assert torch.equal(torch.stack(deltas), targets.deltas)


def test_mmdet_conventions():
    """AnchorHead._get_targets_single: labels num_classes for background and ignored,
    label_weights 1 / 1 / 0 (pos_weight for positives), bbox weights 1 for positives."""
    targets = _hand_targets()
    out = mmdet_targets(targets, num_classes=80, pos_weight=2.0)
    assert out["labels"].tolist() == [[3, 80, 80, 7], [80, 80, 80, 80]]
    assert out["label_weights"].tolist() == [[2.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 1.0]]
    assert out["bbox_weights"][..., 0].tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0] * 4]
    assert torch.equal(out["bbox_targets"], targets.deltas)
    agnostic = Targets(targets.labels, targets.matched_gt, targets.deltas)  # RPN: no classes
    assert mmdet_targets(agnostic, num_classes=1)["labels"].tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert mmdet_targets(targets, num_classes=80, pos_weight=-1)["label_weights"][0, 0] == 1.0


def test_mmdet_pos_weight_zero_weighs_positives_one():
    """mmdet's ``pos_weight <= 0`` means weight 1: 0 weighs the positives 1, not 0 (which would drop them)."""
    weights = mmdet_targets(_hand_targets(), num_classes=80, pos_weight=0.0)["label_weights"]
    assert weights.tolist() == [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]]


def test_num_classes_may_be_a_numpy_integer():
    """A config read with numpy (or a dataset's class count from an array) holds np.int64:
    refused as not a positive int."""
    targets = _hand_targets()
    assert torch.equal(mmdet_targets(targets, np.int64(80))["labels"], mmdet_targets(targets, 80)["labels"])
    assert torch.equal(detectron2_targets(targets, np.int64(80))[0][0], detectron2_targets(targets, 80)[0][0])
    for bad in (True, 2.0, np.float64(80), "80", np.int64(0)):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            mmdet_targets(targets, bad)


def test_mmdet_label_weights_exclude_padding():
    """With pad_sizes, anchors on cells beyond an image's padded size get weight 0, as mmdet's
    unmap of the inside flags gives them (the issue's 416x640 image on a 512x640 canvas)."""
    config = presets.get("retinanet_mmdet").replace(background_class=80)
    out = mmdet_targets(
        assign(torch.zeros(0, 4), [0], (512, 640), config, gt_classes=torch.zeros(0, dtype=torch.int64),
               pad_sizes=[[416, 640]], backend="cpu"),
        num_classes=80,
    )  # fmt: skip
    assert int((out["label_weights"] == 0).sum()) == 11_430
    assert bool((out["labels"] == 80).all())


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: detectron2_targets(t, num_classes=5), ValueError, "image 0, anchor 3 is matched to class 7"),
        (lambda t: mmdet_targets(t, num_classes=0), ValueError, "num_classes must be a positive int"),
        (lambda t: torchvision_matched_idxs(t.labels), TypeError, "expected Targets or SparseTargets"),
        (lambda t: detectron2_targets(Targets(t.labels, t.matched_gt, t.deltas), 3), ValueError, "no classes"),
        (lambda t: detectron2_targets(t, num_classes=0), ValueError, "num_classes must be a positive int, got 0"),
        # A negative class: detectron2 would read -1 as ignored, mmdet index its logits from the end.
        (
            lambda t: detectron2_targets(Targets(t.labels, t.matched_gt, t.deltas, -t.classes), 80),
            ValueError,
            r"image 0, anchor 0 is matched to class -3, outside \[0, num_classes=80\)",
        ),
        (
            lambda t: mmdet_targets(Targets(t.labels, t.matched_gt, t.deltas, -t.classes), 80),
            ValueError,
            "image 0, anchor 0 is matched to class -3",
        ),
    ],
)
def test_adapters_refuse_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(_hand_targets())


def test_detectron2_targets_refuse_a_class_equal_to_num_classes():
    """detectron2's class ``num_classes`` is the background: a positive of that class would
    read as a negative, so it is refused like any class outside [0, num_classes)."""
    with pytest.raises(ValueError, match=r"image 0, anchor 3 is matched to class 7, outside \[0, num_classes=7\)"):
        detectron2_targets(_hand_targets(), num_classes=7)
    labels, _ = detectron2_targets(_hand_targets(), num_classes=8)
    assert labels[0].tolist() == [3, 8, -1, 7]


# --- losses against their definitions ---------------------------------------------------


def _dense_focal(logits: torch.Tensor, targets: Targets, alpha: float, gamma: float) -> torch.Tensor:
    """Per-image focal sums in float64, straight from the paper's definition:
    -alpha_t (1 - p_t)^gamma log(p_t), one-hot targets, ignored anchors left out."""
    x = logits.double()
    one_hot = torch.zeros_like(x)
    positive = targets.labels == 1
    image, anchor = torch.nonzero(positive, as_tuple=True)
    one_hot[image, anchor, targets.classes[image, anchor].long()] = 1.0
    p = torch.sigmoid(x)
    p_t = torch.where(one_hot == 1, p, 1 - p)
    alpha_t = torch.where(one_hot == 1, alpha, 1 - alpha)
    loss = -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)
    loss = loss * (targets.labels != -1)[..., None]
    return loss.sum(dim=(1, 2))


@pytest.mark.parametrize("normalize", ["per_image", "positives", "sum"])
def test_focal_and_box_losses_match_their_definitions(normalize, generator):
    canvas = (96, 128)
    config = presets.get("retinanet_torchvision")
    boxes, counts = random_batch(generator, [4, 0, 6], canvas)
    classes = torch.randint(0, 5, (boxes.shape[0],), generator=generator)
    dense = assign(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    sparse = dense.to_sparse()
    logits = torch.randn(3, dense.num_anchors, 5, generator=generator)
    regression = torch.randn(3, dense.num_anchors, 4, generator=generator)
    positives = (dense.labels == 1).sum(dim=1).double()
    scale = {
        "per_image": lambda s: (s / positives.clamp(min=1)).mean(),
        "positives": lambda s: s.sum() / positives.clamp(min=1).sum(),  # mmdet: each image counts >= 1
        "sum": lambda s: s.sum(),
    }[normalize]
    focal = sigmoid_focal_loss(logits, sparse, alpha=0.25, gamma=2.0, normalize=normalize)
    assert math.isclose(focal.item(), scale(_dense_focal(logits, dense, 0.25, 2.0)).item(), rel_tol=LOSS_RTOL)
    l1 = ((regression.double() - dense.deltas.double()).abs().sum(-1) * (dense.labels == 1)).sum(1)
    ours = box_regression_loss(regression, sparse, loss="l1", normalize=normalize)
    assert math.isclose(ours.item(), scale(l1).item(), rel_tol=LOSS_RTOL)
    assert positives[1] == 0 and positives.sum() > 0  # an empty image and some positives


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy(generator):
    """gamma = 0, the bound itself, is taken (a mutation review: no test held it)."""
    targets = _hand_targets()
    logits = torch.randn(2, 4, 8, generator=generator)
    got = sigmoid_focal_loss(logits, targets.to_sparse(), alpha=0.25, gamma=0.0, normalize="sum")
    assert math.isclose(got.item(), _dense_focal(logits, targets, 0.25, 0.0).sum().item(), rel_tol=LOSS_RTOL)


def test_focal_loss_with_alpha_zero_weighs_the_positive_terms_zero(generator):
    """alpha = 0 is a weight like any other (alpha_t = 0 for each positive's one-hot
    class, 1 elsewhere); only a negative alpha means no weighting, as in torchvision."""
    targets = _hand_targets()
    logits = torch.randn(2, 4, 8, generator=generator)
    got = sigmoid_focal_loss(logits, targets.to_sparse(), alpha=0.0, gamma=2.0, normalize="sum")
    assert math.isclose(got.item(), _dense_focal(logits, targets, 0.0, 2.0).sum().item(), rel_tol=LOSS_RTOL)
    negatives_only = logits.clone()
    negatives_only[0, 0, 3] = negatives_only[0, 3, 7] = -30.0  # the positives' terms: any logit, weight 0
    again = sigmoid_focal_loss(negatives_only, targets.to_sparse(), alpha=0.0, gamma=2.0, normalize="sum")
    assert again.item() == pytest.approx(got.item(), rel=LOSS_RTOL)
    unweighted = sigmoid_focal_loss(logits, targets.to_sparse(), alpha=-1.0, gamma=2.0, normalize="sum")
    halved = _dense_focal(logits, targets, 0.5, 2.0).sum().item()  # alpha_t = 0.5 everywhere
    assert math.isclose(unweighted.item(), 2 * halved, rel_tol=LOSS_RTOL) and got.item() < unweighted.item()


def test_retinanet_loss_passes_its_settings_to_both_losses(generator):
    """alpha and gamma reach the focal loss, beta the box loss, normalize both: the two
    parts equal the losses called on their own with the same settings."""
    sparse = _hand_targets().to_sparse()
    outputs = {"cls_logits": torch.randn(2, 4, 8, generator=generator),
               "bbox_regression": torch.randn(2, 4, 4, generator=generator) / 4}  # fmt: skip
    settings = dict(alpha=0.5, gamma=1.0, beta=0.5, normalize="sum")
    got = retinanet_loss(outputs, sparse, box_loss="smooth_l1", **settings)
    focal = sigmoid_focal_loss(outputs["cls_logits"], sparse, alpha=0.5, gamma=1.0, normalize="sum")
    box = box_regression_loss(outputs["bbox_regression"], sparse, loss="smooth_l1", beta=0.5, normalize="sum")
    assert got["classification"] == focal and got["bbox_regression"] == box
    defaults = retinanet_loss(outputs, sparse, box_loss="smooth_l1")  # the settings matter here
    assert defaults["classification"] != focal and defaults["bbox_regression"] != box
    # A misspelt setting names the function called (it reached box_regression_loss's error).
    for typo in ("gama", "normalise"):
        with pytest.raises(TypeError, match=f"retinanet_loss\\(\\) got an unexpected keyword argument '{typo}'"):
            retinanet_loss(outputs, sparse, **{typo: 1.0})


def test_rpn_loss_known_answer_leaves_ignored_anchors_out_of_the_average():
    """The hand-built batch samples 6 of its 8 anchors (2 ignored): objectness is the
    binary cross-entropy summed over those 6, divided by 6; the box loss is smooth-L1
    (beta 1/9) over the 2 positives' deltas against zero predictions, divided by 6 too."""
    sparse = _hand_targets().to_sparse()
    objectness = torch.tensor([[1.0, -2.0, 5.0, 0.5], [0.25, -1.0, -7.0, 3.0]])

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    # Positives (image 0, anchors 0 and 3): -log sigmoid(x); negatives: -log(1 - sigmoid(x)).
    bce = softplus(-1.0) + softplus(-0.5) + softplus(-2.0) + softplus(0.25) + softplus(-1.0) + softplus(3.0)
    beta = 1 / 9
    deltas = [0.1, -0.2, 0.3, -0.4, -0.5, 0.6, -0.7, 0.8]
    smooth_l1 = sum(0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta for d in deltas)
    objectness_loss, box_loss = rpn_loss(objectness, torch.zeros(2, 4, 4), sparse)
    assert math.isclose(objectness_loss.item(), bce / 6, rel_tol=1e-6)
    assert math.isclose(box_loss.item(), smooth_l1 / 6, rel_tol=1e-6)


def test_rpn_loss_of_a_batch_with_every_anchor_ignored_is_zero():
    """No sampled anchor: both losses are 0 (torchvision's mean over nothing is NaN)."""
    labels = torch.full((2, 4), -1, dtype=torch.int8)
    sparse = Targets(labels, torch.full((2, 4), -1, dtype=torch.int32), torch.zeros(2, 4, 4)).to_sparse()
    objectness_loss, box_loss = rpn_loss(torch.ones(2, 4), torch.ones(2, 4, 4), sparse)
    assert objectness_loss.item() == 0.0 and box_loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rpn_loss_of_16_bit_logits_is_computed_in_float32(dtype):
    """As torchvision's (float32 labels promote the logits): the loss was computed and summed
    in the logits' type, 1.7e-4 off in float16 and 4e-3 in bfloat16, and infinite in
    float16 where 512 sampled anchors of loss ~200 passed 65504."""
    sparse = _hand_targets().to_sparse()
    objectness = torch.tensor([[1.0, -2.0, 5.0, 0.5], [0.25, -1.0, -7.0, 3.0]]).to(dtype)
    got = rpn_loss(objectness, torch.zeros(2, 4, 4, dtype=dtype), sparse)
    want = rpn_loss(objectness.float(), torch.zeros(2, 4, 4), sparse)
    # (torch evaluates the logits' terms in their type: as close as that allows; equal to
    # torchvision's in test_rpn_loss_equals_torchvisions_compute_loss)
    assert all(g.dtype == torch.float32 and math.isclose(g, w, rel_tol=1e-3) for g, w in zip(got, want))
    crowded = SparseTargets(num_anchors=512, positive_offsets=torch.tensor([0, 512]),
                            positive_anchors=torch.arange(512, dtype=torch.int32),
                            positive_matched_gt=torch.zeros(512, dtype=torch.int32),
                            positive_deltas=torch.zeros(512, 4), ignored_offsets=torch.tensor([0, 0]),
                            ignored_anchors=torch.zeros(0, dtype=torch.int32))  # fmt: skip
    objectness_loss, _ = rpn_loss(torch.full((1, 512), -200.0, dtype=dtype), torch.zeros(1, 512, 4), crowded)
    assert objectness_loss.item() == 200.0


def test_losses_refuse_bad_input(generator):
    targets = _hand_targets()
    sparse = targets.to_sparse()
    logits = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"cls_logits: expected shape \[2, 4, C\]"):
        sigmoid_focal_loss(torch.zeros(2, 5, 8), sparse)
    with pytest.raises(TypeError, match="expected SparseTargets"):
        sigmoid_focal_loss(logits, targets)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        sigmoid_focal_loss(torch.zeros(2, 4, 5), sparse)
    with pytest.raises(ValueError, match="normalize: must be one of"):
        sigmoid_focal_loss(logits, sparse, normalize="mean")
    with pytest.raises(ValueError, match="loss: must be one of"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, loss="iou")
    with pytest.raises(ValueError, match="loss='giou' needs anchors"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, loss="giou")
    giou = dict(loss="giou", anchors=torch.zeros(4, 4), gt_counts=[2, 0], encode=presets.get("yolov5").encode)
    with pytest.raises(TypeError, match="gt_boxes: expected a floating-point Tensor"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, gt_boxes=[[0.0, 0.0, 1.0, 1.0]] * 2, **giou)
    # A tensor of integers is named by its dtype ("got Tensor" read as if a tensor were wrong).
    with pytest.raises(TypeError, match=r"gt_boxes: expected a floating-point Tensor\[N, 4\], got torch.int64$"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, gt_boxes=torch.ones(2, 4, dtype=torch.int64), **giou)
    with pytest.raises(TypeError, match="cls_logits: expected a floating-point tensor, got torch.int32$"):
        sigmoid_focal_loss(torch.zeros(2, 4, 8, dtype=torch.int32), sparse)
    with pytest.raises(ValueError, match=r"gt_boxes: expected shape \[N, 4\], got \[8\]"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, gt_boxes=torch.zeros(8), **giou)
    # The boxes' counts in another order add up all the same: image 0's positives would
    # read image 1's boxes.
    with pytest.raises(ValueError, match="gt_counts: a positive's matched box is beyond its image's count"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, gt_boxes=torch.ones(2, 4), **{**giou, "gt_counts": [0, 2]})


def test_box_losses_refuse_predictions_of_other_than_four_deltas():
    """A head's regression of 5 values per anchor is named, not broadcast against the 4 deltas."""
    sparse = _hand_targets().to_sparse()
    with pytest.raises(ValueError, match=r"bbox_regression: expected shape \[2, 4, 4\] .* got \[2, 4, 5\]"):
        box_regression_loss(torch.zeros(2, 4, 5), sparse)
    with pytest.raises(ValueError, match=r"bbox_regression: expected shape \[2, 4, 4\]"):
        ssd_loss({"cls_logits": torch.zeros(2, 4, 8), "bbox_regression": torch.zeros(2, 4, 5)}, sparse)


def test_focal_loss_refuses_a_class_equal_to_the_number_of_logits():
    """Classes run from 0 to C - 1: class 7 of 7 logits is refused by name, not indexed past them."""
    with pytest.raises(ValueError, match=r"targets: a positive's class is outside \[0, 7\)"):
        sigmoid_focal_loss(torch.zeros(2, 4, 7), _hand_targets().to_sparse())


def test_iou_box_losses_known_answers():
    """Zero predicted deltas decode to the anchors: anchor [0, 0, 4, 2] against box
    [0, 0, 2, 4] (IoU 1/3, centres sqrt(2) apart, enclosing diagonal sqrt(32), aspect angles
    atan(1/2) and atan(2)) and anchor [0, 0, 2, 2] against [1, 1, 3, 3] (IoU 1/7, centres
    sqrt(2) apart, diagonal sqrt(18), same aspect), averaged as torchvision does (per
    image over its 2 positives, then over the 2 images)."""
    sparse = _hand_targets().to_sparse()
    inputs = dict(anchors=torch.tensor([[0.0, 0.0, 4.0, 2.0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2]]),
                  gt_boxes=torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 4.0]]), gt_counts=[2, 0],
                  encode=presets.get("retinanet_torchvision").encode)  # fmt: skip
    wide_tall = 1 - 1 / 3 + 2 / 32
    aspect = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2
    squares = 1 - 1 / 7 + 2 / 18
    for loss, first in (("diou", wide_tall), ("ciou", wide_tall + aspect / (1 - 1 / 3 + aspect) * aspect)):
        got = box_regression_loss(torch.zeros(2, 4, 4), sparse, loss=loss, **inputs)
        assert math.isclose(got.item(), (first + squares) / 4, rel_tol=1e-5), loss
    with pytest.raises(ValueError, match="loss='ciou' needs anchors"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, loss="ciou")


def test_iou_box_losses_of_degenerate_boxes_are_finite():
    """Zero-area anchors (the decoded predictions) against zero-area boxes: a union of 0, so
    IoU is 0 (eps keeps it from 0 / 0), and each positive's GIoU and DIoU loss is 2 (hull of
    side 2, centres as far apart as its diagonal); per image (2 positives), over 2 images: 1."""
    sparse = _hand_targets().to_sparse()
    inputs = dict(anchors=torch.tensor([[1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]]),
                  gt_boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]), gt_counts=[2, 0],
                  encode=presets.get("retinanet_torchvision").encode)  # fmt: skip
    for loss in ("giou", "diou"):
        got = box_regression_loss(torch.zeros(2, 4, 4), sparse, loss=loss, **inputs)
        assert got.item() == pytest.approx(1.0, rel=1e-6), loss


def test_iou_box_losses_take_bounding_boxes_as_assign_sparse_takes_them():
    """torchvision's ``BoundingBoxes`` in XYXY give the plain tensor's loss; in another
    format they are refused by name, as ``assign_sparse`` refuses them (XYWH rows were read
    as xyxy: a wrong GIoU loss and gradient, no error)."""
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    sparse = _hand_targets().to_sparse()
    xyxy = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 4.0]])
    inputs = dict(anchors=torch.tensor([[0.0, 0.0, 4.0, 2.0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2]]),
                  gt_counts=[2, 0], encode=presets.get("retinanet_torchvision").encode, loss="giou")  # fmt: skip
    deltas = torch.full((2, 4, 4), 0.1)
    expected = box_regression_loss(deltas, sparse, gt_boxes=xyxy, **inputs)
    boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(8, 8))
    assert torch.equal(box_regression_loss(deltas, sparse, gt_boxes=boxes, **inputs), expected)
    for form in ("XYWH", "CXCYWH"):
        other = tv_tensors.BoundingBoxes(xyxy, format=form, canvas_size=(8, 8))
        with pytest.raises(ValueError, match=f"gt_boxes: torchvision BoundingBoxes in format {form}, but boxes are"):
            box_regression_loss(deltas, sparse, gt_boxes=other, **inputs)
        anchors = tv_tensors.BoundingBoxes(inputs["anchors"], format=form, canvas_size=(8, 8))
        with pytest.raises(ValueError, match=f"anchors: torchvision BoundingBoxes in format {form}, but boxes are"):
            box_regression_loss(deltas, sparse, gt_boxes=xyxy, **{**inputs, "anchors": anchors})


def test_ssd_loss_known_answers():
    """Image 0: a positive of class 2, four negatives whose background logits make anchors
    4 and 3 the hardest (at 2 negatives per positive those two count), and an ignored anchor
    whose logits are the hardest of all, which never counts (its outputs are read as 0).
    Image 1 has no positive: no quota, nothing counts."""
    labels = torch.tensor([[1, 0, 0, 0, 0, -1], [0, -1, 0, 0, 0, 0]], dtype=torch.int8)
    matched = torch.tensor([[0, -1, -1, -1, -1, -1], [-1] * 6], dtype=torch.int32)
    deltas = torch.zeros(2, 6, 4)
    deltas[0, 0] = torch.tensor([0.5, -2.0, 0.0, 0.0])
    classes = torch.tensor([[2, 0, 0, 0, 0, 0], [0] * 6], dtype=torch.int32)
    sparse = Targets(labels, matched, deltas, classes).to_sparse()
    logits = torch.zeros(2, 6, 3)
    logits[0, 1:, 0] = torch.tensor([0.0, -1.0, -2.0, -3.0, -5.0])
    background = [math.log(2 + math.exp(b)) - b for b in (0.0, -1.0, -2.0, -3.0)]
    got = ssd_loss({"cls_logits": logits, "bbox_regression": torch.zeros(2, 6, 4)}, sparse, neg_to_pos_ratio=2)
    assert math.isclose(got["classification"].item(), math.log(3) + background[3] + background[2], rel_tol=1e-6)
    assert math.isclose(got["bbox_regression"].item(), 0.5 * 0.5**2 + (2.0 - 0.5), rel_tol=1e-6)  # smooth-L1, beta 1
    with pytest.raises(ValueError, match="a class is outside"):
        ssd_loss({"cls_logits": logits[..., :2], "bbox_regression": torch.zeros(2, 6, 4)}, sparse)
    # A box labelled background: torchvision would regress it and count it in N, yet
    # classify its anchors as negatives (its foreground is class > 0).
    sparse.positive_classes = torch.zeros_like(sparse.positive_classes)
    with pytest.raises(ValueError, match="a positive anchor's box has the background class 0"):
        ssd_loss({"cls_logits": logits, "bbox_regression": torch.zeros(2, 6, 4)}, sparse)


def test_ssd_loss_never_counts_an_ignored_anchor_as_a_hard_negative():
    """The ignored anchor's loss (log 3, its outputs read as 0) is above every negative's
    (confident background logits 4 to 7): still the 2 hardest negatives count, not it."""
    labels = torch.tensor([[1, 0, 0, 0, 0, -1]], dtype=torch.int8)
    matched = torch.tensor([[0, -1, -1, -1, -1, -1]], dtype=torch.int32)
    classes = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.int32)
    sparse = Targets(labels, matched, torch.zeros(1, 6, 4), classes).to_sparse()
    logits = torch.zeros(1, 6, 3)
    logits[0, 1:, 0] = torch.tensor([4.0, 5.0, 6.0, 7.0, 9.0])
    background = [math.log(math.exp(b) + 2) - b for b in (4.0, 5.0)]
    got = ssd_loss({"cls_logits": logits, "bbox_regression": torch.zeros(1, 6, 4)}, sparse, neg_to_pos_ratio=2)
    assert math.isclose(got["classification"].item(), math.log(3) + sum(background), rel_tol=1e-6)


def test_ssd_loss_counts_each_anchor_once_when_the_quota_exceeds_the_negatives():
    """2 positives, 1 negative, 1 ignored, a quota of 6: the negative counts, the positives
    once (torchvision's would count them again), the ignored anchor not. Every logit 0:
    each counted anchor costs log 3, over 2 positives."""
    labels = torch.tensor([[1, 1, 0, -1]], dtype=torch.int8)
    matched = torch.tensor([[0, 0, -1, -1]], dtype=torch.int32)
    classes = torch.tensor([[1, 2, 0, 0]], dtype=torch.int32)
    sparse = Targets(labels, matched, torch.zeros(1, 4, 4), classes).to_sparse()
    got = ssd_loss({"cls_logits": torch.zeros(1, 4, 3), "bbox_regression": torch.zeros(1, 4, 4)}, sparse)
    assert math.isclose(got["classification"].item(), 3 * math.log(3) / 2, rel_tol=1e-6)


def test_ssd_loss_of_a_batch_without_positives_is_zero():
    """No positive: no hard negatives either, and both losses are 0 over max(1, 0) (not 0 / 0)."""
    labels = torch.tensor([[0, 0, -1, 0], [0, 0, 0, 0]], dtype=torch.int8)
    sparse = Targets(labels, torch.full((2, 4), -1, dtype=torch.int32), torch.zeros(2, 4, 4),
                     torch.zeros(2, 4, dtype=torch.int32)).to_sparse()  # fmt: skip
    got = ssd_loss({"cls_logits": torch.ones(2, 4, 3), "bbox_regression": torch.ones(2, 4, 4)}, sparse)
    assert got["classification"].item() == 0.0 and got["bbox_regression"].item() == 0.0


def test_ssd_loss_box_term_uses_its_beta():
    """Deltas 0.5 and -2 against zero predictions, smooth-L1 with beta 0.5: both past beta,
    (0.5 - 0.25) + (2 - 0.25) = 2, over the one positive (beta 1 gives 1.625)."""
    labels = torch.tensor([[1, 0]], dtype=torch.int8)
    deltas = torch.zeros(1, 2, 4)
    deltas[0, 0] = torch.tensor([0.5, -2.0, 0.0, 0.0])
    targets = Targets(labels, torch.tensor([[0, -1]], dtype=torch.int32), deltas, torch.tensor([[1, 0]]))
    outputs = {"cls_logits": torch.zeros(1, 2, 3), "bbox_regression": torch.zeros(1, 2, 4)}
    assert ssd_loss(outputs, targets.to_sparse(), beta=0.5)["bbox_regression"].item() == pytest.approx(2.0, rel=1e-6)


def test_ssd_loss_refuses_a_background_class_beyond_the_logits():
    """The background class indexes the logits as the others do: 8 of 8 logits is refused."""
    sparse = _hand_targets().to_sparse()
    sparse.background_class = 8
    with pytest.raises(ValueError, match=r"targets: a class is outside \[0, 8\) \(cls_logits has 8\)"):
        ssd_loss({"cls_logits": torch.zeros(2, 4, 8), "bbox_regression": torch.zeros(2, 4, 4)}, sparse)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_ssd_loss_of_a_diverging_negative_is_nan_as_torchvisions(bad):
    """A negative whose loss is NaN or infinite ranked among the hardest, took a slot of
    the quota and was then dropped as "not finite": a finite loss (one negative short)
    where torchvision's is NaN, hiding a diverging network."""
    labels = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.int8)
    matched = torch.tensor([[0, -1, -1, -1, -1, -1]], dtype=torch.int32)
    classes = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.int32)
    sparse = Targets(labels, matched, torch.zeros(1, 6, 4), classes).to_sparse()
    logits = torch.zeros(1, 6, 3)
    logits[0, 3, 1] = bad
    got = ssd_loss({"cls_logits": logits, "bbox_regression": torch.zeros(1, 6, 4)}, sparse)
    assert math.isnan(got["classification"].item())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_diverging_output_at_an_ignored_anchor_reaches_neither_loss_nor_gradient(bad, generator):
    """torchvision's losses index the anchors they count, so an ignored anchor's output,
    NaN or infinite, changes neither the loss nor any gradient, and its own gradient is
    exactly 0. Ours zeroed the ignored anchors' element-wise losses after computing them:
    the values were right, but the gradient there was 0 x NaN."""
    sparse = _hand_targets().to_sparse()  # anchor 2 of each image ignored
    regression = torch.randn(2, 4, 4, generator=generator)
    losses = {
        "focal": lambda out: sigmoid_focal_loss(out, sparse),
        "rpn": lambda out: rpn_loss(out[..., 0], regression, sparse)[0],
        "ssd": lambda out: ssd_loss({"cls_logits": out, "bbox_regression": regression}, sparse)["classification"],
    }
    finite = torch.randn(2, 4, 8, generator=generator)
    diverged = finite.clone()
    diverged[0, 2, 1] = diverged[1, 2, 5] = bad
    for name, loss in losses.items():
        expected_input = finite.clone().requires_grad_()
        expected = loss(expected_input)
        (expected_grad,) = torch.autograd.grad(expected, expected_input)
        got_input = diverged.clone().requires_grad_()
        got = loss(got_input)
        (got_grad,) = torch.autograd.grad(got, got_input)
        assert got.item() == expected.item(), name
        assert torch.equal(got_grad, expected_grad), name
        assert not got_grad[:, 2].any() and got_grad.abs().sum() > 0, name


def _broken(field: str):
    sparse = _hand_targets().to_sparse()
    value = getattr(sparse, field)
    setattr(sparse, field, torch.tensor([0, 2]) if field == "ignored_offsets" else value[:1])
    return sparse


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("positive_deltas", r"targets: positive_deltas: shape \[1, 4\], expected \[2, 4\]"),
        ("positive_classes", r"targets: positive_classes: shape \[1\], expected \[2\]"),
        ("positive_matched_gt", r"targets: positive_matched_gt: shape \[1\], expected \[2\]"),
        ("ignored_offsets", r"targets: ignored_offsets: shape \[2\], expected \[batch_size \+ 1\] = \[3\]"),
    ],
)
def test_losses_refuse_lists_of_the_wrong_shape(field, message):
    """Lists edited by hand: one delta broadcast to every positive, or offsets of another
    batch, gave another loss (or an allocator's error) instead of naming the field."""
    for call in _all_losses():
        with pytest.raises(ValueError, match=message):
            call(_broken(field))


def test_lists_without_offsets_are_refused_naming_them():
    """No offsets read as a batch of -1 images: the shape check passed and every use failed
    with an IndexError."""
    none = torch.zeros(0, dtype=torch.int64)
    sparse = SparseTargets(num_anchors=4, positive_offsets=none, positive_anchors=none.int(),
                           positive_matched_gt=none.int(), positive_deltas=torch.zeros(0, 4), ignored_offsets=none,
                           ignored_anchors=none.int())  # fmt: skip
    message = r"positive_offsets: shape \[0\], expected \[batch_size \+ 1\] \(at least the one offset"
    for use in (sparse.check, sparse.to_dense, lambda: rpn_loss(torch.zeros(0, 4), torch.zeros(0, 4, 4), sparse)):
        with pytest.raises(ValueError, match=message):
            use()


def _all_losses() -> list:
    return [
        lambda t: sigmoid_focal_loss(torch.zeros(t.batch_size, 4, 8), t),
        lambda t: box_regression_loss(torch.zeros(t.batch_size, 4, 4), t),
        lambda t: rpn_loss(torch.zeros(t.batch_size, 4), torch.zeros(t.batch_size, 4, 4), t),
        lambda t: ssd_loss(
            {"cls_logits": torch.zeros(t.batch_size, 4, 8), "bbox_regression": torch.zeros(t.batch_size, 4, 4)}, t
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("field", ["positive_offsets", "ignored_offsets"])
def test_losses_refuse_offsets_that_decrease(field):
    """Offsets [0, 3, 2] gave a negative image count: torch wrote out of bounds and the
    process died ("double free or corruption"); offsets that do not add up raised an
    allocator's error."""
    for offsets in ([0, 3, 2], [0, 1, 1]):
        for loss in _all_losses():
            sparse = _hand_targets().to_sparse()
            setattr(sparse, field, torch.tensor(offsets))
            with pytest.raises(ValueError, match=f"targets: {field}: must start at 0, never decrease and end at"):
                loss(sparse)


def test_losses_refuse_a_batch_of_no_images():
    """``assign`` refuses it; a per-image mean over no images was NaN."""
    empty = _hand_targets().to_sparse()
    empty.positive_offsets = empty.ignored_offsets = torch.zeros(1, dtype=torch.int64)
    empty.positive_anchors = empty.positive_matched_gt = empty.ignored_anchors = torch.zeros(0, dtype=torch.int32)
    empty.positive_classes = torch.zeros(0, dtype=torch.int32)
    empty.positive_deltas = torch.zeros(0, 4)
    for loss in _all_losses():
        with pytest.raises(ValueError, match="targets: the batch is empty"):
            loss(empty)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t, x: sigmoid_focal_loss(x, t, alpha=2.0), r"alpha: expected a number <= 1 \(negative: no weighting\)"),
        (lambda t, x: sigmoid_focal_loss(x, t, alpha=float("nan")), "alpha: expected a number <= 1"),
        (lambda t, x: sigmoid_focal_loss(x, t, gamma=-1), "gamma: expected a number >= 0, got -1"),
        (
            lambda t, x: retinanet_loss({"cls_logits": x, "bbox_regression": torch.zeros(2, 4, 4)}, t, gamma="2"),
            "gamma: expected a number >= 0, got '2'",
        ),
        (
            lambda t, x: ssd_loss({"cls_logits": x, "bbox_regression": torch.zeros(2, 4, 4)}, t, neg_to_pos_ratio=-1),
            "neg_to_pos_ratio: expected a number >= 0, got -1",
        ),
        (
            lambda t, x: ssd_loss({"cls_logits": x, "bbox_regression": torch.zeros(2, 4, 4)}, t, neg_to_pos_ratio="3"),
            "neg_to_pos_ratio: expected a number >= 0, got '3'",
        ),
        (lambda t, x: mmdet_targets(t, 8, pos_weight="2"), r"pos_weight: expected a number .*, got '2'"),
        (
            lambda t, x: mmdet_targets(t, 8, pos_weight=float("nan")),
            r"pos_weight: expected a number <= 3.40282e\+38 \(a float32 weight\), got nan",
        ),
        (
            lambda t, x: mmdet_targets(t, 8, pos_weight=float("inf")),  # infinite weights: NaN losses, no error
            r"pos_weight: expected a number <= 3.40282e\+38 \(a float32 weight\), got inf",
        ),
        (lambda t, x: mmdet_targets(t, 8, pos_weight=1e39), r"pos_weight: .*, got 1e\+39"),
        # torch's own error (NaN called negative), or no box loss at all (inf), or True as 1.
        (
            lambda t, x: box_regression_loss(torch.zeros(2, 4, 4), t, loss="smooth_l1", beta=-1),
            "beta: expected a number >= 0, got -1",
        ),
        (
            lambda t, x: box_regression_loss(torch.zeros(2, 4, 4), t, loss="smooth_l1", beta=math.nan),
            "beta: expected a number >= 0, got nan",
        ),
        (
            lambda t, x: box_regression_loss(torch.zeros(2, 4, 4), t, loss="smooth_l1", beta=math.inf),
            "beta: expected a finite number >= 0, got inf",
        ),
        (
            lambda t, x: box_regression_loss(torch.zeros(2, 4, 4), t, loss="smooth_l1", beta=True),
            "beta: expected a number >= 0, got True",
        ),
        (lambda t, x: rpn_loss(x[..., 0], torch.zeros(2, 4, 4), t, beta=-1), "beta: expected a number >= 0"),
        (
            lambda t, x: ssd_loss({"cls_logits": x, "bbox_regression": torch.zeros(2, 4, 4)}, t, beta=-1),
            "beta: expected a number >= 0, got -1",
        ),
        (
            lambda t, x: box_regression_loss(torch.zeros(2, 4, 4), t, loss="giou", eps=-1),
            "eps: expected a number >= 0, got -1",
        ),
    ],
)
def test_loss_settings_out_of_range_are_refused(call, message):
    """alpha = 2 gave a negative focal loss, a negative ratio dropped every hard negative."""
    with pytest.raises(ValueError, match=message):
        call(_hand_targets().to_sparse(), torch.zeros(2, 4, 8))


def test_loss_settings_as_torchvision_passes_them_are_taken():
    """torchvision's SSD ratio is a float (3.0), and a setting may be a one-element tensor."""
    sparse, logits = _hand_targets().to_sparse(), torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    outputs = {"cls_logits": logits, "bbox_regression": torch.zeros(2, 4, 4)}
    assert ssd_loss(outputs, sparse, neg_to_pos_ratio=3.0) == ssd_loss(outputs, sparse, neg_to_pos_ratio=3)
    as_tensors = sigmoid_focal_loss(logits, sparse, alpha=torch.tensor(0.25), gamma=torch.tensor(2.0))
    torch.testing.assert_close(as_tensors, sigmoid_focal_loss(logits, sparse, alpha=0.25, gamma=2.0))
    weights = mmdet_targets(_hand_targets(), 8, pos_weight=torch.tensor([[2.0]]))["label_weights"]  # no broadcast
    assert torch.equal(weights, mmdet_targets(_hand_targets(), 8, pos_weight=2.0)["label_weights"])
    # A tensor is checked as its number is.
    with pytest.raises(ValueError, match="alpha: expected a number <= 1"):
        sigmoid_focal_loss(logits, sparse, alpha=torch.tensor(2.0))
    with pytest.raises(ValueError, match="neg_to_pos_ratio: expected a number >= 0, got nan"):
        ssd_loss(outputs, sparse, neg_to_pos_ratio=torch.tensor(math.nan))
    with pytest.raises(ValueError, match="pos_weight: expected a number .*, got tensor\\(True\\)"):
        mmdet_targets(_hand_targets(), 8, pos_weight=torch.tensor(True))


def test_iou_losses_refuse_a_negative_matched_box_or_count():
    sparse = _hand_targets().to_sparse()
    inputs = dict(loss="giou", anchors=torch.zeros(4, 4), gt_boxes=torch.ones(2, 4), gt_counts=[2, 0],
                  encode=presets.get("yolov5").encode)  # fmt: skip
    with pytest.raises(ValueError, match=r"gt_counts\[1\]: negative count -1"):  # was an IndexError
        box_regression_loss(torch.zeros(2, 4, 4), sparse, **{**inputs, "gt_counts": [3, -1]})
    with pytest.raises(ValueError, match=r"gt_counts: has 3 images, but the targets have 2"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, **{**inputs, "gt_counts": [2, 0, 0]})
    # Counts that are not integers were truncated into valid ones, as assign refuses them.
    for counts in ([1.9, 0.4], [True, True], torch.tensor([1.5, 0.5])):
        with pytest.raises(TypeError, match=r"gt_counts: expected (an )?integer"):
            box_regression_loss(torch.zeros(2, 4, 4), sparse, **{**inputs, "gt_counts": counts})
    sparse.positive_matched_gt = sparse.positive_matched_gt - 1  # image 0's first positive reads box -1
    with pytest.raises(ValueError, match="targets: a positive's matched box is negative"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, **inputs)


def test_iou_losses_refuse_anchors_of_another_count():
    """The anchors must be the targets' (one per anchor): extra rows are refused, not read past."""
    sparse = _hand_targets().to_sparse()
    inputs = dict(loss="giou", gt_boxes=torch.ones(2, 4), gt_counts=[2, 0], encode=presets.get("yolov5").encode)
    with pytest.raises(ValueError, match=r"anchors: expected shape \[4, 4\], got \[5, 4\]"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, anchors=torch.zeros(5, 4), **inputs)


def test_iou_losses_refuse_a_matched_box_equal_to_its_images_count():
    """Image 0's positives match its boxes 0 and 1: with counts [1, 1], box 1 is past its
    image's one box (it would read image 1's), though the total is right."""
    sparse = _hand_targets().to_sparse()
    inputs = dict(
        loss="giou", anchors=torch.zeros(4, 4), gt_boxes=torch.ones(2, 4), encode=presets.get("yolov5").encode
    )
    with pytest.raises(ValueError, match="gt_counts: a positive's matched box is beyond its image's count"):
        box_regression_loss(torch.zeros(2, 4, 4), sparse, gt_counts=[1, 1], **inputs)


@pytest.mark.parametrize("loss", ["l1", "smooth_l1"])
def test_float16_predictions_meet_float32_targets_unrounded(loss):
    """As torchvision's losses do (float16 against float32 promotes): the targets are not
    rounded to float16 first, and the loss comes back in float32."""
    sparse = _hand_targets().to_sparse()
    sparse.positive_deltas = sparse.positive_deltas + 1e-3 / 3  # not representable in float16
    predicted = torch.full((2, 4, 4), 0.25, dtype=torch.float16)
    got = box_regression_loss(predicted, sparse, loss=loss)
    assert got.dtype == torch.float32
    assert got == box_regression_loss(predicted.float(), sparse, loss=loss)


@pytest.mark.parametrize("normalize", ["per_image", "positives"])
def test_a_float16_focal_loss_divides_by_counts_past_float16s_range(normalize):
    """70,000 positives (one image, or 20 of 3,500: a batch of COCO images has that many):
    the count was converted to float16 before dividing, inf, and the loss came back 0.
    Each positive at logit 0 costs 0.25 * 0.5^2 * ln 2 (torchvision's formula), so the
    loss is that, in float16."""
    batch = 1 if normalize == "per_image" else 20
    per_image = 70_000 // batch
    sparse = SparseTargets(
        num_anchors=per_image,
        positive_offsets=torch.arange(batch + 1) * per_image,
        positive_anchors=torch.arange(per_image, dtype=torch.int32).repeat(batch),
        positive_matched_gt=torch.zeros(70_000, dtype=torch.int32),
        positive_deltas=torch.zeros(70_000, 4),
        ignored_offsets=torch.zeros(batch + 1, dtype=torch.int64),
        ignored_anchors=torch.zeros(0, dtype=torch.int32),
        positive_classes=torch.zeros(70_000, dtype=torch.int32),
    )
    got = sigmoid_focal_loss(torch.zeros(batch, per_image, 1, dtype=torch.float16), sparse, normalize=normalize)
    assert got.dtype == torch.float16
    assert got.item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-3)


# --- against torchvision itself ------------------------------------------------------------

CANVAS = (128, 160)
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def retinanet_batch():
    """torchvision's anchors and Matcher on a 3-image batch (one without boxes), and ours."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.retinanet import _default_anchorgen

    generator = torch.Generator().manual_seed(5)
    boxes, counts = random_batch(generator, [6, 0, 4], CANVAS)
    classes = torch.randint(0, NUM_CLASSES, (boxes.shape[0],), generator=generator)
    per_image = list(zip(boxes.split(counts), classes.split(counts)))
    features = [torch.zeros(3, 1, -(-CANVAS[0] // s), -(-CANVAS[1] // s)) for s in (8, 16, 32, 64, 128)]
    anchors = _default_anchorgen()(ImageList(torch.zeros(3, 3, *CANVAS), [CANVAS] * 3), features)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    matched = [
        matcher(torchvision.ops.box_iou(b, a)) if b.numel() else torch.full((a.shape[0],), -1, dtype=torch.int64)
        for (b, _), a in zip(per_image, anchors)
    ]
    config = presets.get("retinanet_torchvision")
    sparse = assign_sparse(boxes, counts, CANVAS, config, gt_classes=classes, backend="cpu")
    return dict(boxes=boxes, counts=counts, per_image=per_image, anchors=anchors, matched=matched, sparse=sparse,
                config=config)  # fmt: skip


def test_matched_idxs_equal_torchvisions_matcher(retinanet_batch):
    ours = torchvision_matched_idxs(retinanet_batch["sparse"])
    for image, (mine, theirs) in enumerate(zip(ours, retinanet_batch["matched"])):
        assert torch.equal(mine, theirs), f"image {image}"


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou", "diou", "ciou"])
def test_retinanet_loss_equals_torchvisions_compute_loss(retinanet_batch, box_loss):
    from torchvision.models.detection.retinanet import RetinaNetHead

    batch = retinanet_batch
    assert torch.equal(batch["anchors"][0], generate_anchors(batch["config"].anchors, CANVAS))
    torch.manual_seed(0)
    head = RetinaNetHead(in_channels=4, num_anchors=9, num_classes=NUM_CLASSES)
    head.regression_head._loss_type = box_loss
    num_anchors = batch["anchors"][0].shape[0]
    outputs = {
        "cls_logits": torch.randn(3, num_anchors, NUM_CLASSES, requires_grad=True),
        "bbox_regression": torch.randn(3, num_anchors, 4, requires_grad=True),
    }
    targets = [{"boxes": b, "labels": c} for b, c in batch["per_image"]]
    theirs = head.compute_loss(targets, outputs, batch["anchors"], batch["matched"])
    decoded = dict(anchors=batch["anchors"][0], gt_boxes=batch["boxes"], gt_counts=batch["counts"],
                   encode=batch["config"].encode)  # fmt: skip
    ours = retinanet_loss(outputs, batch["sparse"], box_loss=box_loss, **(decoded if "iou" in box_loss else {}))
    for name in ("classification", "bbox_regression"):
        assert math.isclose(ours[name].item(), theirs[name].item(), rel_tol=LOSS_RTOL), name
        (grad_ours,) = torch.autograd.grad(ours[name], outputs["cls_logits" if name == "classification" else
                                                               "bbox_regression"])  # fmt: skip
        (grad_theirs,) = torch.autograd.grad(theirs[name], outputs["cls_logits" if name == "classification" else
                                                                   "bbox_regression"])  # fmt: skip
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=LOSS_RTOL, atol=1e-7)


def test_rpn_loss_equals_torchvisions_compute_loss():
    """torchvision's RPN loss with its sampler replaced by ours (the sampled anchors are the
    non-ignored ones of a sampled assignment), regression targets from its own BoxCoder."""
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    generator = torch.Generator().manual_seed(7)
    config = presets.get("fasterrcnn_rpn_torchvision")
    boxes, counts = random_batch(generator, [5, 3], CANVAS)
    dense = assign(boxes, counts, CANVAS, config, backend="cpu", seed=3)
    sizes = tuple((lv.sizes[0],) for lv in config.anchors.levels)
    rpn = RegionProposalNetwork(
        AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5), RPNHead(4, 3), 0.7, 0.3, 256, 0.5,
        dict(training=10, testing=10), dict(training=10, testing=10), 0.7,
    )  # fmt: skip
    rpn.fg_bg_sampler = lambda labels: ([lb == 1 for lb in labels], [lb == 0 for lb in labels])
    anchors = generate_anchors(config.anchors, CANVAS)
    regression_targets = []
    for image, image_boxes in enumerate(boxes.split(counts)):
        matched = image_boxes[dense.matched_gt[image].clamp(min=0).long()]
        regression_targets.append(rpn.box_coder.encode_single(matched, anchors))
    labels = [row.to(torch.float32) for row in dense.labels]
    assert (dense.labels == 1).sum() > 0 and (dense.labels == -1).sum() > 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # a model.half()'s outputs
        objectness = torch.randn(2, anchors.shape[0], generator=generator).to(dtype)
        deltas = torch.randn(2, anchors.shape[0], 4, generator=generator).to(dtype)
        theirs = rpn.compute_loss(objectness.reshape(-1, 1), deltas.reshape(-1, 4), labels, regression_targets)
        ours = rpn_loss(objectness, deltas, dense.to_sparse())
        for mine, reference in zip(ours, theirs):
            assert mine.dtype == reference.dtype == torch.float32
            assert math.isclose(mine.item(), reference.item(), rel_tol=LOSS_RTOL), dtype


def test_ssd_loss_equals_torchvisions_compute_loss():
    """torchvision's own ``SSD.compute_loss`` (its box coder and ratio) on our assignment,
    in value and gradient."""
    pytest.importorskip("torchvision")
    from types import SimpleNamespace

    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssd import SSD

    generator = torch.Generator().manual_seed(11)
    canvas, config = (300, 300), presets.get("ssd300_torchvision")
    boxes, counts = random_batch(generator, [4, 0, 9], canvas)
    classes = torch.randint(1, NUM_CLASSES, (boxes.shape[0],), generator=generator)
    sparse = assign_sparse(boxes, counts, canvas, config, gt_classes=classes, backend="cpu")
    anchors = generate_anchors(config.anchors, canvas)
    outputs = {
        "cls_logits": torch.randn(3, anchors.shape[0], NUM_CLASSES, generator=generator).requires_grad_(),
        "bbox_regression": torch.randn(3, anchors.shape[0], 4, generator=generator).requires_grad_(),
    }
    ssd = SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3)
    per_image = [{"boxes": b, "labels": c} for b, c in zip(boxes.split(counts), classes.split(counts))]
    theirs = SSD.compute_loss(ssd, per_image, outputs, [anchors] * 3, torchvision_matched_idxs(sparse))
    ours = ssd_loss(outputs, sparse)
    for name, output in (("classification", "cls_logits"), ("bbox_regression", "bbox_regression")):
        assert math.isclose(ours[name].item(), theirs[name].item(), rel_tol=LOSS_RTOL), name
        (grad_ours,) = torch.autograd.grad(ours[name], outputs[output])
        (grad_theirs,) = torch.autograd.grad(theirs[name], outputs[output])
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=LOSS_RTOL, atol=1e-7)
