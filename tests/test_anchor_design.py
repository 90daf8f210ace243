"""Anchor design tools: dataset loading, check against a brute-force matcher, fit, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tritarget.anchor_design import (
    Resize,
    check,
    fit_anchors,
    from_tensors,
    kmeans_iou,
    load_coco,
    synthetic,
)
from tritarget.anchor_design.cli import main
from tritarget.kernels import TargetConfig, generate_anchors, presets


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------- dataset


def test_coco_boxes_are_resized_clipped_and_crowds_become_ignore_regions(tmp_path):
    data = {
        "images": [{"id": 7, "height": 480, "width": 640}, {"id": 9, "height": 300, "width": 200}],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 7, "bbox": [600, 400, 100, 100]},  # clipped to the image
            {"id": 3, "image_id": 7, "bbox": [650, 10, 5, 5]},  # outside: empty after clipping
            {"id": 4, "image_id": 7, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        ],
    }
    path = _write(tmp_path / "a.json", data)
    ds = load_coco(path, Resize(min_size=800, max_size=1333))
    # 480x640: scale 800/480; width floor(640 * 5/3) = 1066; canvas padded to /32.
    assert ds.image_ids.tolist() == [7, 9]
    assert ds.image_sizes.tolist() == [[800, 1066], [1200, 800]]  # 300x200: the short side sets the scale, 4
    assert ds.canvases.tolist() == [[800, 1088], [1216, 800]]
    assert ds.box_counts.tolist() == [2, 0] and ds.skipped == 1
    assert ds.annotation_ids.tolist() == [1, 2]
    sx, sy = 1066 / 640, 800 / 480
    expected = torch.tensor([[10 * sx, 20 * sy, 40 * sx, 60 * sy], [600 * sx, 400 * sy, 640 * sx, 480 * sy]])
    torch.testing.assert_close(ds.boxes, expected)
    assert ds.ignore_counts.tolist() == [1, 0]
    torch.testing.assert_close(ds.ignore_boxes, torch.tensor([[0.0, 0.0, 64 * sx, 48 * sy]]))

    fixed = load_coco(path, Resize(mode="fixed", canvas=(300, 300)))
    torch.testing.assert_close(
        fixed.boxes[0], torch.tensor([10 * 300 / 640, 20 * 300 / 480, 40 * 300 / 640, 60 * 300 / 480])
    )
    letter = load_coco(path, Resize(mode="letterbox", canvas=(640, 640)))
    assert letter.image_sizes.tolist() == [[480, 640], [640, 427]] and letter.canvases.tolist() == [[640, 640]] * 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"annotations": []}', "needs an 'images' list"),
        ('{"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}',
         "image_id 2 is not in 'images'"),
        ('{"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1]}]}',
         "bbox must be 4 finite numbers"),
    ],
)  # fmt: skip
def test_bad_annotation_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_coco(path)
    assert str(path) in str(info.value)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json")


# ---------------------------------------------------------------- check against brute force


def _iou_matrix(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[G, A] IoU over every pair, plain torch, float32."""
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    w = torch.minimum(boxes[:, None, 2], anchors[None, :, 2]) - torch.maximum(boxes[:, None, 0], anchors[None, :, 0])
    h = torch.minimum(boxes[:, None, 3], anchors[None, :, 3]) - torch.maximum(boxes[:, None, 1], anchors[None, :, 1])
    inter = w.clamp(min=0) * h.clamp(min=0)
    return inter / (area_b[:, None] + area_a[None, :] - inter)


def _brute_force(boxes, crowd, anchors, config, low_quality: bool):
    """Per box positives [G], per anchor labels [A] of one image, torchvision rules written out."""
    match = config.match
    count = boxes.shape[0]
    excluded = torch.zeros(anchors.shape[0], dtype=torch.bool)
    if crowd.shape[0] and match.ignore_iof_thr >= 0:
        area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
        w = torch.minimum(crowd[:, None, 2], anchors[None, :, 2]) - torch.maximum(
            crowd[:, None, 0], anchors[None, :, 0]
        )
        h = torch.minimum(crowd[:, None, 3], anchors[None, :, 3]) - torch.maximum(
            crowd[:, None, 1], anchors[None, :, 1]
        )
        iof = w.clamp(min=0) * h.clamp(min=0) / area_a[None, :]  # intersection over the anchor (mmdet)
        excluded = (iof > match.ignore_iof_thr).any(0)
    labels = torch.zeros(anchors.shape[0], dtype=torch.int64)
    matched = torch.full((anchors.shape[0],), -1)
    if count:
        iou = _iou_matrix(boxes, anchors)
        iou[:, excluded] = -1
        best, owner = iou.max(0)  # first box wins ties
        labels[(best >= match.low) & (best < match.high)] = -1
        positive = best >= match.high
        if low_quality:
            box_best = iou.max(1).values  # [G]
            for g in range(count):
                if box_best[g] > 0:
                    positive |= iou[g] == box_best[g]
        labels[positive] = 1
        matched[positive] = owner[positive]
    labels[excluded] = -1
    positives = torch.bincount(matched[matched >= 0], minlength=count)
    return positives, labels, matched


@pytest.fixture
def small_dataset(generator):
    """Five images on a 96 x 128 canvas: random boxes, duplicates (ties), a crowd region, an empty image."""
    boxes, crowd = [], []
    for count in (3, 0, 6, 1, 4):
        wh = 6 + torch.rand(count, 2, generator=generator) * 60
        xy = torch.rand(count, 2, generator=generator) * (torch.tensor([128.0, 96.0]) - wh)
        image = torch.cat([xy, xy + wh], 1)
        if count >= 4:
            image[-1] = image[0]  # an exact duplicate: every IoU ties
        boxes.append(image)
        crowd.append(torch.tensor([[70.0, 40.0, 120.0, 90.0]]) if count == 6 else torch.zeros(0, 4))
    return from_tensors(boxes, [(96, 128)] * 5, ignore_boxes=crowd, image_ids=[11, 12, 13, 14, 15])


def _small_fpn() -> TargetConfig:
    cfg = presets.get("retinanet_torchvision")
    levels = cfg.to_dict()["anchors"]["levels"][:3]  # strides 8, 16, 32: enough for a 96 x 128 canvas
    return cfg.replace(**{"anchors.levels": levels, "match.ignore_iof_thr": 0.5})


@pytest.mark.parametrize("name", ["retinanet_torchvision", "yolov5"])  # location-major and shape-major layouts
def test_check_equals_brute_force(small_dataset, name):
    config = (
        _small_fpn() if name == "retinanet_torchvision" else presets.get(name).replace(**{"match.ignore_iof_thr": 0.5})
    )
    result = check(small_dataset, config, backend="cpu", batch_images=2)  # several calls: offsets across batches
    anchors = generate_anchors(config.anchors, (96, 128))
    per_cell = config.anchors.anchors_per_cell
    strides = [lv.stride for lv in config.anchors.levels]
    level_sizes = [math.ceil(96 / s) * math.ceil(128 / s) * k for s, k in zip(strides, per_cell)]
    level_of_anchor = torch.repeat_interleave(torch.arange(3), torch.tensor(level_sizes))
    offsets = small_dataset.box_offsets.tolist()
    ignore_offsets = small_dataset.ignore_offsets.tolist()
    want_pos, want_strict, want_level, want_best, ignored = [], [], [], [], 0
    for i in range(small_dataset.num_images):
        boxes = small_dataset.boxes[offsets[i] : offsets[i + 1]]
        crowd = small_dataset.ignore_boxes[ignore_offsets[i] : ignore_offsets[i + 1]]
        positives, labels, matched = _brute_force(boxes, crowd, anchors, config, low_quality=True)
        strict, _, _ = _brute_force(boxes, crowd, anchors, config, low_quality=False)
        want_pos.append(positives)
        want_strict.append(strict)
        by_level = torch.zeros(boxes.shape[0], 3, dtype=torch.int64)
        for a in torch.nonzero(labels == 1).flatten().tolist():
            by_level[matched[a], level_of_anchor[a]] += 1
        want_level.append(by_level)
        want_best.append(_iou_matrix(boxes, anchors).max(1).values if boxes.shape[0] else torch.zeros(0))
        ignored += int((labels == -1).sum())
    assert torch.equal(result.matched.positives, torch.cat(want_pos))
    assert torch.equal(result.strict.positives, torch.cat(want_strict))
    assert torch.equal(result.matched.by_level, torch.cat(want_level))
    torch.testing.assert_close(result.best_iou, torch.cat(want_best), rtol=0, atol=1e-6)
    assert result.matched.ignored_anchors == ignored > 0
    assert result.matched.total_anchors == anchors.shape[0] * small_dataset.num_images
    assert result.bpr == pytest.approx(float((torch.cat(want_strict) > 0).float().mean()))
    missing = result.missing.tolist()
    assert missing == torch.nonzero(torch.cat(want_pos) == 0).flatten().tolist()
    assert result.box_image_ids.tolist() == [11] * 3 + [13] * 6 + [14] + [15] * 4


# ---------------------------------------------------------------- fit


def test_kmeans_iou_finds_separated_shapes(generator):
    shapes = torch.tensor([[10.0, 40.0], [40.0, 10.0], [100.0, 100.0]])
    wh = shapes.repeat_interleave(50, 0) * (1 + 0.05 * torch.randn(150, 2, generator=generator))
    centres = kmeans_iou(wh, 3, seed=1)
    torch.testing.assert_close(centres.float().sort(0).values, shapes.sort(0).values, rtol=0.05, atol=0)
    assert torch.equal(centres, kmeans_iou(wh, 3, seed=1))
    with pytest.raises(ValueError, match="k <= 150"):
        kmeans_iou(wh, 151)


@pytest.fixture(scope="module")
def skewed_path(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("anchors") / "skewed.json", synthetic.skewed(60, seed=0))


def test_fit_lifts_a_preset_below_half_bpr_above_90_percent(skewed_path):
    dataset = load_coco(skewed_path, Resize(mode="none"))
    preset = presets.get("yolov5")
    before = check(dataset, preset, backend="cpu")
    assert before.bpr < 0.5
    result = fit_anchors(dataset, preset, seed=0, generations=40, backend="cpu")
    after = check(dataset, result.config, backend="cpu")
    assert after.bpr > 0.9
    assert result.fitness >= result.fitness_kmeans > result.fitness_start
    assert TargetConfig.from_dict(json.loads(json.dumps(result.config.to_dict()))) == result.config
    assert preset.replace(**result.overrides) == result.config
    assert result.config.anchors.anchors_per_cell == preset.anchors.anchors_per_cell  # same head


def test_fit_is_deterministic_and_keeps_fpn_structure(skewed_path):
    dataset = load_coco(skewed_path, Resize(mode="none")).subset(torch.arange(20))
    preset = _small_fpn()
    first = fit_anchors(dataset, preset, seed=3, generations=6, backend="cpu")
    again = fit_anchors(dataset, preset, seed=3, generations=6, backend="cpu")
    assert first.config == again.config and first.history == again.history
    ratios = {lv.aspect_ratios for lv in first.config.anchors.levels}
    assert len(ratios) == 1 and len(ratios.pop()) == 3  # shared ratios, as many as before
    assert [len(lv.sizes) for lv in first.config.anchors.levels] == [3, 3, 3]
    assert check(dataset, first.config, backend="cpu").bpr > check(dataset, preset, backend="cpu").bpr


def test_fit_refuses_fixed_canvas_layouts(skewed_path):
    dataset = load_coco(skewed_path, Resize(mode="none")).subset(torch.arange(2))
    with pytest.raises(ValueError, match="ssd"):
        fit_anchors(dataset, presets.get("ssd300_torchvision"), generations=1)


# ---------------------------------------------------------------- CLI


def test_cli_fit_writes_a_config_and_prints_before_after(skewed_path, tmp_path, capsys):
    out = tmp_path / "fitted.json"
    argv = ["anchors", "fit", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--out", str(out),
            "--generations", "10", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    fitted = TargetConfig.from_dict(json.loads(out.read_text()))
    text = capsys.readouterr().out
    assert "before: yolov5" in text and "after: fitted" in text and "BPR, IoU >= high alone" in text

    json_path = tmp_path / "check.json"
    argv = ["anchors", "check", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--config", str(out),
            "--backend", "cpu", "--quiet", "--json", str(json_path)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "yolov5" in text and "fitted" in text and "boxes without a positive" in text
    summaries = json.loads(json_path.read_text())
    dataset = load_coco(skewed_path, Resize(mode="none"))
    assert [s["bpr"] for s in summaries] == [
        pytest.approx(check(dataset, c, backend="cpu").bpr) for c in (presets.get("yolov5"), fitted)
    ]


def test_cli_show_writes_pictures(skewed_path, tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["anchors", "show", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--image-id", "2",
            "--out-dir", str(tmp_path), "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    for name in ("anchors_yolov5.png", "assignment_yolov5_image2.png", "check.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--config", "missing.json"], "config file not found: missing.json"),
        (["--preset", "ssd300_torchvision"], "--canvas H W"),
        ([], "choose a config"),
    ],
)
def test_cli_errors_name_the_problem(skewed_path, extra, message, capsys):
    assert main(["anchors", "check", "--annotations", skewed_path, *extra]) == 2
    assert message in capsys.readouterr().err


def test_tritarget_command_has_anchors(skewed_path):
    result = subprocess.run(
        [sys.executable, "-m", "tritarget.service.cli", "anchors", "check", "--annotations", skewed_path,
         "--no-resize", "--preset", "yolov5", "--backend", "cpu", "--missing", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "BPR, IoU >= high alone" in result.stdout
