"""Anchor design tools: dataset loading, check against a brute-force matcher, fit, CLI."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from support import closed_pipe, run_into_a_closed_pipe, run_without_stderr
from tritarget.clients.anchor_design import (
    Resize,
    check,
    fit_anchors,
    from_tensors,
    kmeans_iou,
    load_coco,
    synthetic,
)
from tritarget.clients.anchor_design.check import (
    best_anchor_iou,
    format_check_table,
    format_missing,
    scan_config,
    strict_config,
)
from tritarget.clients.anchor_design.cli import _check_anchor_counts, _describe_resize, _UsageError, main
from tritarget.clients.anchor_design.dataset import BoxDataset
from tritarget.clients.anchor_design.fit import _Parameters, _wh_iou, fitness
from tritarget.kernels import TargetConfig, generate_anchors, presets, resolve_grid
from tritarget.service import output
from tritarget.service.output import output_file_problem, output_folder_problem, write_atomically


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

    assert torch.equal(load_coco(path).boxes, ds.boxes)  # the default: torchvision's 800 / 1333
    no_annotations = _write(tmp_path / "images.json", {"images": data["images"]})  # image info only: no boxes
    assert load_coco(no_annotations).box_counts.tolist() == [0, 0]

    # A file some Windows tools wrote, with a UTF-8 byte-order mark: the same dataset.
    with_mark = tmp_path / "bom.json"
    with_mark.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert torch.equal(load_coco(str(with_mark), Resize(min_size=800, max_size=1333)).boxes, ds.boxes)


@pytest.mark.parametrize("field", ["min_size", "max_size", "size_divisible"])
def test_a_resize_in_fractions_of_a_pixel_is_refused_by_name(field):
    # size_divisible=0.5 gave float canvases, (800.0, 808.0), where a fractional canvas is refused
    with pytest.raises(TypeError, match=rf"Resize.{field}: expected an integer, got 0.5"):
        Resize(**{"min_size": 1, "max_size": 1, field: 0.5})


@pytest.mark.parametrize(("height", "width", "resized"), [(480, 641, (480, 640)), (333, 500, (427, 640)),
                                                      (1000, 1333, (481, 640)), (640, 640, (640, 640)),
                                                      (73, 147, (318, 640))])  # fmt: skip
def test_letterbox_rounds_up_as_yolov5_loads_its_images(height, width, resized):
    # YOLOv5's and ultralytics' load_image: math.ceil(side * 640 / max(h, w)); rounding gave (479, 640),
    # (426, 640), (480, 640): boxes a pixel's share smaller than in training. 147 * (640 / 147) is 640.0000000000001:
    # capped at the canvas, as ultralytics caps it, not 641.
    scale_y, scale_x, size, canvas = Resize(mode="letterbox", canvas=(640, 640)).apply(height, width)
    assert size == resized and canvas == (640, 640)
    assert (scale_y, scale_x) == (resized[0] / height, resized[1] / width)


def test_the_resize_the_cli_reports_names_height_then_width():
    """As every canvas in the tools (``--canvas H W``, ``--letterbox H W``) is written."""
    assert _describe_resize(Resize(mode="letterbox", canvas=(320, 640))) == "letterboxed into 320x640"
    assert _describe_resize(Resize(mode="fixed", canvas=(320, 640))) == "stretched to 320x640"


def test_letterbox_on_a_non_square_canvas_is_limited_by_its_height_or_width():
    # 480 x 640 into a 320 x 640 (h x w) canvas: the height limits it, scale 2/3: 320 x 427 (ceil of 426.7).
    assert Resize(mode="letterbox", canvas=(320, 640)).apply(480, 640) == (320 / 480, 427 / 640, (320, 427), (320, 640))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # a RecursionError's traceback before
        ('{"images": [{"width": ' + "9" * 5000 + "}]}", "not valid JSON"),  # the file was not named
        ('{"annotations": []}', "needs an 'images' list"),
        ('{"images": [], "annotations": {}}', "'annotations' must be a list"),  # an object read as no annotations
        ('{"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}',
         "image_id 2 is not in 'images'"),
        ('{"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1]}]}',
         "bbox must be 4 finite numbers"),
        ('{"images": [{"id": 1, "width": 10}]}', r"images\[0\]: 'height' must be an integer, got nothing"),
        ('{"images": [{"id": 1, "height": 10, "width": 10}, {"id": 1, "height": 5, "width": 5}]}',
         r"images\[1\]: duplicate image id 1"),
        ('{"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [{"image_id": 1}]}',
         r"annotations\[0\]: needs 'image_id' and 'bbox'"),
    ],
)  # fmt: skip
def test_bad_annotation_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_coco(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("image", "annotation", "message"),
    [
        ({}, {"image_id": [1]}, "annotations[0]: image_id must be an integer, got [1]"),
        ({}, {"id": "abc"}, "annotations[0]: id must be an integer, got 'abc'"),
        ({}, {"id": 1.7}, "annotations[0]: id must be an integer, got 1.7"),
        ({}, {"iscrowd": "yes"}, "annotations[0]: iscrowd must be 0 or 1, got 'yes'"),
        ({}, {"bbox": [0, 0, True, 1]}, "annotations[0]: bbox must be 4 finite numbers"),
        ({}, {"bbox": [0, 0, 10**400, 1]}, "annotations[0]: bbox must be 4 finite numbers"),  # OverflowError before
        ({"height": 100.9}, {}, "images[0]: 'height' must be an integer, got 100.9"),
        ({"width": "100"}, {}, "images[0]: 'width' must be an integer, got '100'"),
        ({"id": True}, {}, "images[0]: 'id' must be an integer, got True"),
        ({"height": 0}, {}, "images[0]: size must be positive, got height 0, width 100"),  # the file was not named
        # torch's "Overflow when unpacking long long", naming nothing.
        ({"height": 2**63 - 1}, {}, f"images[0]: height {2**63 - 1}, width 100: a side is over 2,147,483,647 px"),
        ({"width": 2**31}, {}, f"images[0]: height 100, width {2**31}: a side is over 2,147,483,647 px"),
        ({"id": 2**63}, {}, f"images[0]: 'id' must be an integer in the int64 range, got {2**63}"),
        ({}, {"id": 2**63}, f"annotations[0]: id must be an integer in the int64 range, got {2**63}"),
        ({}, {"iscrowd": 1.0}, "annotations[0]: iscrowd must be 0 or 1, got 1.0"),
    ],
)
def test_coco_types_are_checked_not_converted(tmp_path, image, annotation, message):
    data = {
        "images": [{"id": 1, "height": 100, "width": 100, **image}],
        "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 10, 10], **annotation}],
    }
    path = _write(tmp_path / "typed.json", data)
    with pytest.raises(ValueError) as info:
        load_coco(path)
    assert str(info.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("image, annotation", [({}, {"bbox": list(range(100_000))}), ({"id": "x" * 100_000}, {})])
def test_a_huge_bad_value_is_shown_cut_short(tmp_path, image, annotation):
    """The whole value went into the error: a bbox of a million numbers, one line of 8 MB
    (review 48)."""
    data = {
        "images": [{"id": 1, "height": 100, "width": 100, **image}],
        "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 10, 10], **annotation}],
    }
    with pytest.raises(ValueError, match=r"\.\.\. \([\d,]+ more characters\)$") as info:
        load_coco(_write(tmp_path / "huge.json", data))
    assert len(str(info.value)) < 400


def test_a_bbox_of_huge_json_integers_is_read_as_floats(tmp_path):
    """Each value fits a float, their exact integer sum does not: OverflowError, a traceback.
    Read as floats, the box lies outside its image, as a float bbox of the same size does."""
    data = {"images": [{"id": 1, "height": 100, "width": 100}],
            "annotations": [{"id": 5, "image_id": 1, "bbox": [10**308, 0, 10**308, 50]},
                            {"id": 6, "image_id": 1, "bbox": [0, 0, 10, 10]}]}  # fmt: skip
    dataset = load_coco(_write(tmp_path / "huge.json", data))
    assert dataset.num_boxes == 1


def test_a_resize_to_sides_past_any_canvas_is_named(tmp_path):
    """--min-size / --max-size of 2**63 - 1 overflowed torch's int64 with an error naming nothing."""
    path = _write(tmp_path / "one.json", {"images": [{"id": 7, "height": 100, "width": 100}], "annotations": []})
    with pytest.raises(ValueError, match=r"image 7: resized to \(\d+, \d+\).*a side is over 2,147,483,647 px"):
        load_coco(path, Resize(min_size=2**63 - 1, max_size=2**63 - 1))
    # The widest image there is: padded up to /32, its canvas is a pixel past it.
    path = _write(tmp_path / "wide.json", {"images": [{"id": 8, "height": 100, "width": 2**31 - 1}], "annotations": []})
    with pytest.raises(ValueError, match=r"image 8: resized to \(100, \d+\), on a canvas of \(128, 2147483648\)"):
        load_coco(path, Resize(mode="none"))


def test_a_box_the_resize_closes_is_skipped_not_kept(tmp_path):
    """1 float32 ulp wide at x = 1.20724: scaled by 1066 / 640 and cast to float32, its
    sides meet. It was kept (a 0-px box: `check` listed it without a positive, `show`
    failed naming assign's drop_invalid)."""
    x1 = float(np.float32(1.20724))
    x2 = float(np.nextafter(np.float32(x1), np.float32(10)))
    assert np.float32(x1 * 1066 / 640) == np.float32(x2 * 1066 / 640)  # the case: it closes
    data = {"images": [{"id": 1, "height": 480, "width": 640}],
            "annotations": [{"id": 7, "image_id": 1, "bbox": [x1, 100, x2 - x1, 50]},
                            {"id": 8, "image_id": 1, "bbox": [200, 100, 50, 50]}]}  # fmt: skip
    ds = load_coco(_write(tmp_path / "sliver.json", data), Resize(min_size=800, max_size=1333))
    assert ds.annotation_ids.tolist() == [8] and ds.skipped == 1
    assert bool(((ds.boxes[:, 2:] - ds.boxes[:, :2]) > 0).all())


def test_boxes_are_clipped_to_the_image_on_every_side_and_dropped_when_empty():
    # A 60 x 100 (h x w) image: boxes over the left / top and the right / bottom edges are cut to it; one below the
    # image (empty in height only, after clipping), one of zero height and a crowd region past the image are dropped.
    boxes = torch.tensor([[-10.0, -5.0, 20.0, 30.0], [50.0, 40.0, 120.0, 90.0], [10.0, 70.0, 20.0, 80.0],
                          [10.0, 10.0, 20.0, 10.0]])  # fmt: skip
    crowd = torch.tensor([[200.0, 0.0, 300.0, 50.0], [90.0, 50.0, 110.0, 70.0]])  # past the right edge, over a corner
    ds = from_tensors([boxes], [(60, 100)], ignore_boxes=[crowd])
    assert ds.boxes.tolist() == [[0.0, 0.0, 20.0, 30.0], [50.0, 40.0, 100.0, 60.0]] and ds.skipped == 3
    assert ds.ignore_boxes.tolist() == [[90.0, 50.0, 100.0, 60.0]] and ds.ignore_counts.tolist() == [1]


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json")


def test_from_tensors_takes_stacked_tensors():
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]], [[1.0, 1.0, 5.0, 6.0]]])  # [B, G, 4], as a collate stacks them
    ignore = torch.tensor([[[2.0, 2.0, 3.0, 3.0]], [[0.0, 0.0, 1.0, 1.0]]])
    ds = from_tensors(boxes, [(8, 8), (8, 8)], ignore_boxes=ignore)
    assert ds.box_counts.tolist() == [1, 1] and ds.ignore_counts.tolist() == [1, 1]
    torch.testing.assert_close(ds.ignore_boxes, ignore.reshape(-1, 4))


def test_from_tensors_refuses_fractional_sizes_and_repeated_ids():
    one = [torch.tensor([[1.0, 1.0, 5.0, 6.0]])]
    assert from_tensors(one, [(100.0, torch.tensor(120))]).canvases.tolist() == [[128, 128]]  # whole, any type
    with pytest.raises(ValueError, match=r"image_sizes\[0\]: expected \(height, width\) in whole pixels"):
        from_tensors(one, [(99.9, 100.7)])  # was cut to (99, 100)
    with pytest.raises(ValueError, match="image_ids: duplicate id 1"):
        from_tensors(one * 2, [(8, 8)] * 2, image_ids=[1, 1])
    with pytest.raises(ValueError, match=r"image_ids\[0\]: expected an integer, got 7.9"):  # was cut to 7
        from_tensors(one, [(8, 8)], image_ids=[7.9])
    assert from_tensors(one, [(8, 8)], image_ids=[torch.tensor(7)]).image_ids.tolist() == [7]
    with pytest.raises(ValueError, match=r"image_sizes\[0\]: expected \(height, width\) in whole pixels"):
        from_tensors(one, [(True, True)])  # was a 1 x 1 image
    with pytest.raises(ValueError, match=r"image_sizes\[0\]: expected \(height, width\) in whole pixels"):
        from_tensors(one, [(np.True_, 8)])
    with pytest.raises(ValueError, match=r"^image 0: size must be positive, got height 0, width 8"):
        from_tensors(one, [(0, 8)])
    with pytest.raises(ValueError, match=r"^image_sizes: expected 1 \(height, width\) pairs, one per image, got 2"):
        from_tensors(one, [(8, 8), (8, 8)])
    with pytest.raises(ValueError, match=r"^ignore_boxes: expected 1 tensors, one per image, got 0"):
        from_tensors(one, [(8, 8)], ignore_boxes=[])
    with pytest.raises(ValueError, match=r"^boxes\[0\]: expected a \[G, 4\] tensor of xyxy boxes, got shape \(1, 5\)"):
        from_tensors([torch.zeros(1, 5)], [(8, 8)])
    with pytest.raises(ValueError, match=r"^boxes\[0\]: boxes must be finite"):
        from_tensors([torch.tensor([[0.0, 0.0, float("inf"), 4.0]])], [(8, 8)])
    wide = from_tensors([torch.tensor([[0.0, 0.0, 1e39, 10.0]], dtype=torch.float64)], [(80, 800)])
    assert wide.boxes.tolist() == [[0.0, 0.0, 800.0, 10.0]]  # clipped as load_coco does, not "not finite"
    with pytest.raises(ValueError, match="finite positive widths and heights"):
        kmeans_iou(torch.tensor([[1.0, float("inf")], [2.0, 3.0], [4.0, 5.0]]), 2)


def test_fixed_feature_maps_give_the_canvas_they_were_made_for():
    """The largest canvas whose ``ceil(canvas / stride)`` is every level's feature map:
    SSD300's 38 x 38 at stride 8 would allow 304, its 3 x 3 at stride 100 only 300."""
    from tritarget.kernels.anchors import fixed_canvas

    assert fixed_canvas(presets.get("ssd300_torchvision").anchors) == (300, 300)


@pytest.mark.parametrize("canvas", [(0.5, 300), (300.7, 300), (True, 300), (300,), None, (0, 300), (300, -1)])
def test_a_fixed_canvas_is_whole_positive_pixels(canvas):
    """(0.5, 300) passed the check and was cut to (0, 300), refused later by the kernels
    without naming Resize."""
    with pytest.raises(ValueError, match=r"^Resize.canvas: the letterbox mode needs a \(height, width\) of positive"):
        Resize(mode="letterbox", canvas=canvas)


def test_a_resize_of_zero_pixels_is_refused_and_a_canvas_is_a_tuple_of_ints():
    with pytest.raises(ValueError, match=r"^Resize.size_divisible: must be positive, got 0"):  # padding to /0
        Resize(size_divisible=0)
    with pytest.raises(ValueError, match=r"^Resize: need 0 < min_size <= max_size, got 0, 1333"):
        Resize(min_size=0)
    assert Resize(mode="fixed", canvas=[np.int64(300), 320]).canvas == (300, 320)  # hashable, compares as a tuple


def test_coco_like_keeps_aspect_ratios_around_one():
    data = synthetic.coco_like(200, seed=0)
    bbox = torch.tensor([a["bbox"] for a in data["annotations"]])
    assert 0.9 < float((bbox[:, 3] / bbox[:, 2]).median()) < 1.1  # the workload draws h / w = exp(0.5 N(0, 1))
    height, width = data["images"][0]["height"], data["images"][0]["width"]
    assert float((bbox[:, 0] + bbox[:, 2]).max()) <= width and float((bbox[:, 1] + bbox[:, 3]).max()) <= height


def test_min_max_resize_caps_the_long_side_at_max_size():
    # A 100 x 1000 panorama: 800 / 100 would make it 8000 wide; torchvision takes min(800 / 100, 1333 / 1000).
    scale_y, scale_x, size, canvas = Resize(min_size=800, max_size=1333).apply(100, 1000)
    assert size == (133, 1333) and canvas == (160, 1344)  # floor(100 * 1.333), floor(1000 * 1.333); padded to /32
    assert scale_y == 133 / 100 and scale_x == 1333 / 1000
    # A 1 x 10000 strip: 1 x 0.1333 floors to 0 rows; the image keeps one.
    assert Resize(min_size=800, max_size=1333).apply(1, 10000)[2:] == ((1, 1333), (32, 1344))


def test_coco_boxes_keep_file_order_within_each_image_when_images_interleave(tmp_path):
    # 120 annotations cycling over 3 images: grouped image after image, each image's in file order (as pycocotools'
    # imgToAnns lists them); an unstable sort of 100+ ties shuffles them.
    images = [{"id": i, "height": 100, "width": 100} for i in range(3)]
    anns = [{"id": n, "image_id": n % 3, "bbox": [1, 1, 10 + n % 50, 10]} for n in range(120)]
    ds = load_coco(_write(tmp_path / "a.json", {"images": images, "annotations": anns}), Resize(mode="none"))
    assert ds.box_counts.tolist() == [40, 40, 40]
    assert ds.annotation_ids.tolist() == [n for i in range(3) for n in range(i, 120, 3)]
    assert ds.boxes[:, 2].tolist() == [1 + 10 + n % 50 for i in range(3) for n in range(i, 120, 3)]
    part = ds.subset(torch.tensor([2, 0]))  # images in the order given, each with its own boxes and annotation ids
    assert part.image_ids.tolist() == [2, 0] and part.box_counts.tolist() == [40, 40]
    assert part.annotation_ids.tolist() == [*range(2, 120, 3), *range(0, 120, 3)]
    assert part.boxes[:, 2].tolist() == [1 + 10 + n % 50 for i in (2, 0) for n in range(i, 120, 3)]


def test_an_annotation_without_an_id_is_minus_one_and_a_subset_keeps_the_skipped_count(tmp_path):
    # -1 is "unknown" (format_missing lists it); 0 is a real COCO annotation id.
    images = [{"id": 5, "height": 50, "width": 50}, {"id": 6, "height": 50, "width": 50}]
    anns = [{"image_id": 5, "bbox": [1, 1, 5, 5]}, {"id": 0, "image_id": 6, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 6, "bbox": [60, 60, 5, 5]}]  # fmt: skip
    ds = load_coco(_write(tmp_path / "a.json", {"images": images, "annotations": anns}), Resize(mode="none"))
    assert ds.annotation_ids.tolist() == [-1, 0] and ds.skipped == 1
    assert ds.subset(torch.tensor([1, 0])).skipped == 1


@pytest.mark.parametrize(
    ("length", "shown"), [(198, "'" + "x" * 198 + "'"), (199, "'" + "x" * 199 + "... (1 more characters)")]
)
def test_a_bad_value_is_shown_whole_up_to_200_characters(tmp_path, length, shown):
    # An id string whose repr is 200 characters is shown whole; 201 are cut after 200.
    data = {"images": [{"id": "x" * length, "height": 100, "width": 100}], "annotations": []}
    with pytest.raises(ValueError) as info:
        load_coco(_write(tmp_path / "a.json", data))
    assert str(info.value).endswith(f"'id' must be an integer, got {shown}")


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
    if crowd.shape[0] and match.ignore_iof_thr > 0:
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
    want_pos, want_strict, want_level, want_best, want_best_level, ignored = [], [], [], [], [], 0
    # The shape of a positive anchor: the cell anchor of its level with its width and height, counted levels in
    # order, shapes in the config's order within a level.
    cell_sides = [lv.cells[:, 2:] - lv.cells[:, :2] for lv in resolve_grid(config.anchors, (96, 128)).levels]
    shape_starts = [sum(per_cell[:i]) for i in range(len(per_cell))]
    want_shape = torch.zeros(sum(per_cell), dtype=torch.int64)
    best_none = torch.zeros(0, dtype=torch.int64)
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
            level = int(level_of_anchor[a])
            sides = anchors[a, 2:] - anchors[a, :2]
            want_shape[shape_starts[level] + int((cell_sides[level] - sides).abs().sum(1).argmin())] += 1
        want_level.append(by_level)
        want_best.append(_iou_matrix(boxes, anchors).max(1).values if boxes.shape[0] else torch.zeros(0))
        want_best_level.append(level_of_anchor[_iou_matrix(boxes, anchors).argmax(1)] if boxes.shape[0] else best_none)
        ignored += int((labels == -1).sum())
    assert torch.equal(result.matched.positives, torch.cat(want_pos))
    assert torch.equal(result.strict.positives, torch.cat(want_strict))
    assert torch.equal(result.matched.by_level, torch.cat(want_level))
    torch.testing.assert_close(result.best_iou, torch.cat(want_best), rtol=0, atol=1e-6)
    best_level = torch.cat(want_best_level)
    assert torch.equal(result.best_level, best_level)  # the first level on a tie, as argmax takes the first
    assert result.matched.ignored_anchors == ignored > 0
    assert result.matched.total_anchors == anchors.shape[0] * small_dataset.num_images
    assert result.bpr == pytest.approx(float((torch.cat(want_strict) > 0).float().mean()))
    missing = result.missing.tolist()
    assert missing == torch.nonzero(torch.cat(want_pos) == 0).flatten().tolist()
    missing_strict = result.missing_strict.tolist()
    assert missing_strict == torch.nonzero(torch.cat(want_strict) == 0).flatten().tolist()
    assert len(missing_strict) > 2
    # The listing: the config's rules, or IoU >= high alone (the CLI's), at most `limit` rows.
    for strict, rows in ((False, missing), (True, missing_strict)):
        lines = format_missing(result, limit=2, strict=strict).splitlines()
        rule = "at IoU >= high alone" if strict else "under the config's rules"
        assert lines[0] == f"{result.name}: {len(rows)} boxes without a positive {rule}"
        listed = [int(line.split("annotation ")[1].split(":")[0]) for line in lines[1:] if "annotation" in line]
        assert listed == result.annotation_ids[rows[:2]].tolist()
        for line, row in zip(lines[1:3], rows):
            x1, y1, x2, y2 = small_dataset.boxes[row].tolist()
            image, level = int(small_dataset.image_ids[small_dataset.box_image[row]]), int(best_level[row])
            iou = float(result.best_iou[row])
            assert line == (f"  image {image} annotation -1: box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) "
                            f"{x2 - x1:.1f}x{y2 - y1:.1f} px, best IoU {iou:.3f} (level {level})")  # fmt: skip
        assert (lines[-1] == f"  ... {len(rows) - 2} more") == (len(rows) > 2)
    assert result.box_image_ids.tolist() == [11] * 3 + [13] * 6 + [14] + [15] * 4
    assert torch.equal(result.matched.by_shape, want_shape)
    assert result.summary()["ignore_boxes"] == 1  # the fixture's one crowd region
    _check_summary_from_counts(result, torch.cat(want_pos), torch.cat(want_strict), want_shape, ignored)


def _check_summary_from_counts(result, positives, strict, by_shape, ignored):
    """``summary()`` and the table (``check --json``'s numbers and the report's) against the brute force's counts."""
    summary = result.summary()
    boxes = result.boxes.double()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert summary["bpr_low_quality"] == pytest.approx(float((positives > 0).double().mean())) != summary["bpr"]
    assert summary["mean_positives"] == pytest.approx(float(positives.double().mean()))
    assert summary["mean_positives_strict"] == pytest.approx(float(strict.double().mean()))
    for size, rows in (("small", areas < 32**2), ("medium", (areas >= 32**2) & (areas < 96**2))):
        assert 0 < int(rows.sum()) < len(rows)  # both classes hold boxes, of mixed fates
        assert summary["by_size"][size] == pytest.approx({
            "boxes": int(rows.sum()),
            "bpr": float((strict[rows] > 0).double().mean()),
            "bpr_low_quality": float((positives[rows] > 0).double().mean()),
            "mean_positives": float(positives[rows].double().mean()),
        })  # fmt: skip
    bins = {"0": (0, 1), "1": (1, 2), "2-3": (2, 4), "4-7": (4, 8), "8-15": (8, 16), "16+": (16, 10**9)}
    histogram = {label: int(((positives >= lo) & (positives < hi)).sum()) for label, (lo, hi) in bins.items()}
    assert summary["positive_histogram"] == histogram
    level_totals = result.matched.by_level.sum(0).double()
    assert summary["level_share"] == pytest.approx((level_totals / level_totals.sum()).tolist())
    per_cell = result.config.anchors.anchors_per_cell
    used = [int((part > 0).sum()) for part in by_shape.split(list(per_cell))]
    assert summary["shapes_ever_positive"] == list(zip(used, per_cell)) and any(u < n for u, n in zip(used, per_cell))
    best = result.best_iou.double()
    for q in (10, 50, 90):
        assert summary["best_iou"][f"p{q}"] == pytest.approx(float(torch.quantile(best, q / 100)))
    assert summary["best_iou"]["below_high"] == pytest.approx(float((best < result.config.match.high).double().mean()))
    assert summary["ignored_fraction"] == pytest.approx(ignored / result.matched.total_anchors)
    assert summary["boxes_without_positive"] == int((positives == 0).sum())
    assert summary["boxes_without_positive_strict"] == int((strict == 0).sum())
    table = format_check_table([result]).splitlines()
    row = {line[: line.rindex("  ")].strip(): line[line.rindex("  ") :].strip() for line in table[2:]}
    for label, count in histogram.items():
        assert row[f"boxes with {label} positives"] == f"{count} ({100 * (count / len(positives)):.1f}%)"
    without, without_strict = int((positives == 0).sum()), int((strict == 0).sum())
    assert row["boxes without positive"] == f"{without} ({without_strict} at IoU>=high)"
    shares = (level_totals / level_totals.sum()).tolist()
    assert row["positives by level"] == " ".join(f"{round(100 * share)}" for share in shares) + " %"  # percent
    assert table[1] == "-" * len(table[0])  # the header's rule, as wide as the header


def _tiny_boxes():
    generator = torch.Generator().manual_seed(3)
    boxes = []
    for count in (3, 2, 4, 1, 2):
        wh = 10 + torch.rand(count, 2, generator=generator) * 50
        xy = torch.rand(count, 2, generator=generator) * (torch.tensor([128.0, 96.0]) - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
    return from_tensors(boxes, [(96, 128)] * 5)


def _two_level_config():
    # Strides 8 and 16 with the same 32 px square anchor: an anchor centred at (16, 16) on both levels.
    level = {"sizes": [32.0], "aspect_ratios": [1.0]}
    return presets.get("retinanet_torchvision").replace(
        **{"anchors.levels": [{**level, "stride": 8}, {**level, "stride": 16}]}
    )


def test_best_anchor_iou_keeps_the_first_level_on_a_tie():
    # The box is the anchor of both levels at (16, 16): IoU 1 twice, the finer level named (as argmax takes the first).
    best, level = best_anchor_iou(torch.tensor([[0.0, 0.0, 32.0, 32.0]]), _two_level_config(), (64, 64))
    assert best.tolist() == [1.0] and level.tolist() == [0]


def test_best_anchor_iou_of_a_box_no_anchor_overlaps_is_zero():
    # The nearest 10 x 10 anchor ([11, 11, 21, 21], stride 32) misses the box [0, 0, 10, 10] by 1 px on both axes: IoU
    # 0, not the 1 / 199 of the two negative overlaps multiplied; [6, 6, 16, 16] overlaps it 5 x 5: 25 / 175.
    config = presets.get("yolov5").replace(**{"anchors.levels": [{"stride": 32, "shapes": [[10.0, 10.0]]}]})
    best, _ = best_anchor_iou(torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 6.0, 16.0, 16.0]]), config, (64, 64))
    assert best.tolist() == [0.0, pytest.approx(1 / 7)]


def test_positives_on_the_first_anchor_of_a_level_count_for_that_level():
    # Level 1's first anchor (cell (0, 0), centred at the origin: [-16, -16, 16, 16]) is one of the four 32 px anchors
    # the low-quality rule gives the box [0, 0, 16, 16] (IoU 1/4 each); level 0's 4 px anchors reach 1/16.
    levels = [
        {"stride": 8, "sizes": [4.0], "aspect_ratios": [1.0]},
        {"stride": 16, "sizes": [32.0], "aspect_ratios": [1.0]},
    ]
    config = presets.get("retinanet_torchvision").replace(**{"anchors.levels": levels})
    result = check(from_tensors([torch.tensor([[0.0, 0.0, 16.0, 16.0]])], [(64, 64)]), config, backend="cpu")
    assert result.matched.by_level.tolist() == [[0, 4]] and result.matched.by_shape.tolist() == [0, 4]
    assert result.best_iou.tolist() == [0.25] and result.best_level.tolist() == [1]


def test_check_reports_progress_per_batch_of_images():
    # batch_images=2 over 5 images of one canvas: three assign calls, progress after each.
    calls = []
    check(_tiny_boxes(), presets.get("yolov5"), backend="cpu", batch_images=2, progress=lambda *a: calls.append(a))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    with pytest.raises(ValueError, match="batch_images: must be positive, got 0"):
        check(_tiny_boxes(), presets.get("yolov5"), backend="cpu", batch_images=0)
    with pytest.raises(TypeError, match="batch_images: expected an integer, got 1.5"):  # failed in torch's split
        check(_tiny_boxes(), presets.get("yolov5"), backend="cpu", batch_images=1.5)
    with pytest.raises(TypeError, match="^config: expected TargetConfig, got str"):  # a preset's name, not the preset
        check(_tiny_boxes(), "yolov5", backend="cpu")


@pytest.mark.parametrize("name", ["fasterrcnn_rpn_torchvision", "rpn_detectron2", "rpn_mmdet"])
def test_the_scan_turns_balanced_sampling_off(name):
    # Sampling draws among positives at random: the scan counts what the matcher offers it.
    config = presets.get(name)
    assert config.match.sample_size > 0
    assert scan_config(config).match.sample_size == 0 and strict_config(config).match.sample_size == 0
    assert scan_config(config).match.low_quality == config.match.low_quality
    assert strict_config(config).match.low_quality == "none"


def test_size_classes_and_positive_bins_split_at_their_edges():
    # COCO's small is area < 32², medium < 96² (areas exactly 32² and 96² go up); bins 0, 1, 2-3, 4-7, 8-15, 16+.
    boxes = [torch.tensor([[0.0, 0.0, 31.0, 33.0], [0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 96.0, 96.0]])]
    dataset = from_tensors([*boxes, torch.zeros(0, 4)], [(128, 128)] * 2)  # two images: anchors per image is half
    result = check(dataset, presets.get("yolov5"), backend="cpu")
    assert result.size_class.tolist() == [0, 1, 2]
    assert [label for label, _ in result.positive_histogram()] == ["0", "1", "2-3", "4-7", "8-15", "16+"]
    summary = result.summary()
    assert summary["anchors_per_image"] == result.matched.total_anchors / 2 == 3 * (16 * 16 + 8 * 8 + 4 * 4)
    assert [summary["by_size"][size]["boxes"] for size in ("small", "medium", "large")] == [1, 1, 1]


# ---------------------------------------------------------------- fit


def test_kmeans_iou_finds_separated_shapes(generator):
    shapes = torch.tensor([[10.0, 40.0], [40.0, 10.0], [100.0, 100.0]])
    wh = shapes.repeat_interleave(50, 0) * (1 + 0.05 * torch.randn(150, 2, generator=generator))
    centres = kmeans_iou(wh, 3, seed=1)
    torch.testing.assert_close(centres.float().sort(0).values, shapes.sort(0).values, rtol=0.05, atol=0)
    assert torch.equal(centres, kmeans_iou(wh, 3, seed=1))
    with pytest.raises(ValueError, match="k <= 150"):
        kmeans_iou(wh, 151)


def test_kmeans_iou_returns_its_centres_smallest_area_first():
    wh = torch.tensor([[100.0, 100.0]] * 10 + [[40.0, 10.0]] * 10 + [[10.0, 42.0]] * 10)  # by width: 420, 400
    centres = kmeans_iou(wh, 3, seed=0)
    assert (centres[:, 0] * centres[:, 1]).tolist() == [400.0, 420.0, 10000.0]


def test_kmeans_iou_never_repeats_a_centre():
    wh = torch.tensor([[30.0, 40.0]] * 10 + [[60.0, 20.0]] * 10)
    torch.testing.assert_close(kmeans_iou(wh, 2), torch.tensor([[30.0, 40.0], [60.0, 20.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="k <= 2, the distinct shapes"):
        kmeans_iou(wh, 5)
    with pytest.raises(ValueError, match="need 1 <= k <= 2.*got k=0"):  # one centre came back for none asked
        kmeans_iou(wh, 0)


@pytest.mark.parametrize("name", ["retinanet_torchvision", "yolov5"])
def test_fit_with_fewer_distinct_shapes_than_anchors_keeps_them_distinct(name):
    # Two boxes of one aspect (h/w 4/3): fewer than the 3 ratios (FPN) or 9 shapes (YOLO) to place.
    dataset = from_tensors([torch.tensor([[10.0, 10.0, 40.0, 50.0], [100.0, 100.0, 160.0, 180.0]])], [(300, 300)])
    preset = presets.get(name)
    result = fit_anchors(dataset, preset, generations=0, backend="cpu")
    levels = result.kmeans.anchors.levels
    if name == "yolov5":
        shapes = [wh for lv in levels for wh in lv.shapes]
        assert len(shapes) == len({(round(w, 6), round(h, 6)) for w, h in shapes}) == 9
        assert {(30.0, 40.0), (60.0, 80.0)} <= {(round(w, 6), round(h, 6)) for w, h in shapes}
    else:
        ratios = levels[0].aspect_ratios
        assert len(ratios) == len({round(r, 6) for r in ratios}) == 3 and any(abs(r - 4 / 3) < 1e-9 for r in ratios)
        assert all(len(lv.sizes) == len({round(s, 6) for s in lv.sizes}) for lv in levels)


def _boxes_of_shapes(shapes: list[tuple[float, float]], images: int) -> BoxDataset:
    """``images`` images of 640 x 640, each with one box of every (w, h) in ``shapes``, in a row."""
    boxes = torch.tensor([[10.0 + 70 * i, 300.0, 10.0 + 70 * i + w, 300.0 + h] for i, (w, h) in enumerate(shapes)])
    return from_tensors([boxes] * images, [(640, 640)] * images)


@pytest.mark.parametrize(("name", "shapes"), [
    ("retinanet_torchvision", [(60.0, 3.0), (100.0, 3.0), (150.0, 3.0), (200.0, 4.0), (60.0, 40.0)]),  # h/w 1/20-1/50
    ("rpn_mmdet", [(60.0, 3.0), (100.0, 3.0), (150.0, 3.0), (200.0, 4.0), (60.0, 40.0)]),
    ("yolov5", [(0.6, 40.0), (1.0, 40.0), (1.5, 40.0), (12.0, 48.0), (48.0, 12.0), (24.0, 96.0), (96.0, 24.0),
                (60.0, 60.0), (200.0, 50.0)]),  # 0.6-1.5 px wide: under 2 px on one side only
])  # fmt: skip
def test_fit_kmeans_shapes_beyond_the_bounds_do_not_repeat(name, shapes):
    """Boxes beyond a bound the fit holds anchors to (h/w within 1/16-16, sides of 2 px or
    more): their k-means centres, distinct, all came out as the bound (ratios 1/16, 1/16,
    1/16; yolo shapes 2 x 40 three times), a head's anchors repeated. Bounded first, they
    count as one shape, and the config's own fill the rest."""
    result = fit_anchors(_boxes_of_shapes(shapes, 4), presets.get(name), generations=0, backend="cpu")
    levels = result.kmeans.anchors.levels
    if name == "yolov5":
        fitted = [(round(w, 3), round(h, 3)) for lv in levels for w, h in lv.shapes]
        assert len(set(fitted)) == len(fitted) == 9 and (2.0, 40.0) in fitted, fitted
    else:
        ratios = [round(r, 6) for r in levels[0].aspect_ratios]
        assert len(set(ratios)) == len(ratios) == 3 and 1 / 16 in ratios, ratios


def test_fit_yolo_orders_shapes_by_area_across_levels():
    """As YOLOv5's autoanchor orders its evolved anchors: smallest to the finest level. The
    evolution moves shapes, and each level was sorted on its own (a stride-32 anchor of
    875 px^2 beside a stride-8 one of 1,974 px^2)."""
    parameters = _Parameters(presets.get("yolov5"))
    given = [(100.0, 90.0), (150.0, 200.0), (370.0, 320.0), (30.0, 60.0), (60.0, 45.0), (60.0, 120.0),
             (10.0, 13.0), (16.0, 30.0), (33.0, 23.0)]  # fmt: skip
    decoded = parameters.decode(torch.tensor(given, dtype=torch.float64).log().flatten())
    shapes = [[(round(w, 6), round(h, 6)) for w, h in lv.shapes] for lv in decoded.anchors.levels]
    assert shapes == [[(10.0, 13.0), (16.0, 30.0), (33.0, 23.0)], [(30.0, 60.0), (60.0, 45.0), (60.0, 120.0)],
                      [(100.0, 90.0), (150.0, 200.0), (370.0, 320.0)]]  # fmt: skip


def test_fit_samples_only_images_with_boxes():
    """Images without boxes add nothing to the objective: 30 images, boxes in the last 2
    only, 5 fit images. A sample drawn among all images held no box at all and "fitted"
    on nothing (objective 0 throughout, the start config written back)."""
    boxes = [torch.zeros(0, 4)] * 28 + [torch.tensor([[10.0, 10.0, 40.0, 50.0]]), torch.tensor([[5.0, 5, 90, 30]])]
    dataset = from_tensors(boxes, [(300, 300)] * 30)
    result = fit_anchors(dataset, presets.get("yolov5"), fit_images=5, generations=0, backend="cpu")
    assert result.fit_images == 2 and result.fitness_kmeans > 0


def test_fit_refuses_a_seed_torch_cannot_take(skewed_path):
    dataset = load_coco(skewed_path, Resize(mode="none")).subset(torch.arange(2))
    with pytest.raises(ValueError, match="seed must be in 0 .. 2\\*\\*64 - 1"):
        fit_anchors(dataset, presets.get("yolov5"), seed=2**64, generations=0, backend="cpu")


@pytest.fixture(scope="module")
def skewed_path(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("anchors") / "skewed.json", synthetic.skewed(60, seed=0))


def test_autoanchors_bpr_serves_the_boxes_the_matcher_leaves_without_a_positive():
    """README ("Anchor design"): on the demo's skewed set, where ``yolov5`` leaves 57% of the
    boxes without a positive at IoU >= high (benchmarks/results/anchor_design/
    fit_yolov5_skewed.txt), YOLOv5 autoanchor's BPR reads 1.0, 4.4 anchors per box within
    4x: its metric counts a box as served when the smaller of w / aw, aw / w, h / ah and
    ah / h exceeds 1/4 for some anchor."""
    boxes = synthetic.skewed(300, seed=0)["annotations"]
    sides = torch.tensor([box["bbox"][2:] for box in boxes], dtype=torch.float32)
    shapes = torch.tensor([shape for level in presets.get("yolov5").anchors.levels for shape in level.shapes])
    ratio = sides[:, None] / shapes[None]
    worst_side = torch.minimum(ratio, 1 / ratio).amin(dim=2)  # [boxes, anchors]
    within = worst_side > 1 / 4
    assert within.any(dim=1).all()  # BPR 1.0
    assert round(within.sum(dim=1).float().mean().item(), 1) == 4.4


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


def test_fit_refuses_levels_with_different_aspect_ratios():
    """The ratios are fitted shared: level 0's replaced every level's, and the fit then
    reported the start's objective for a config that had lost half its recall."""
    config = _small_fpn()
    levels = config.to_dict()["anchors"]["levels"]
    levels[1]["aspect_ratios"] = [0.25, 1.0, 4.0]
    config = config.replace(**{"anchors.levels": levels})
    dataset = from_tensors([torch.tensor([[10.0, 10.0, 40.0, 50.0]])], [(96, 128)])
    with pytest.raises(ValueError, match=r"same aspect ratios .*level 1 has \(0.25, 1.0, 4.0\), level 0 \(0.5"):
        fit_anchors(dataset, config, generations=0, backend="cpu")


@pytest.mark.parametrize("name", ["yolov5", "retinanet_torchvision", "retinanet_mmdet"])
def test_fit_leaves_boxes_under_two_pixels_out_of_the_kmeans(name):
    """k-means centres of 1-px boxes were clamped to 2 px: all 9 yolov5 shapes 2.0 x 2.0
    (recall 99.7% -> 24.7%), RetinaNet's smallest level three equal sizes."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for _ in range(20):
        xy = torch.rand(12, 2, generator=generator) * 200 + 20
        wh = torch.cat([torch.rand(8, 2, generator=generator) * 1.5 + 0.2,  # tiny
                        torch.rand(4, 2, generator=generator) * 60 + 8])  # fmt: skip
        images.append(torch.cat([xy, xy + wh], dim=1))
    dataset = from_tensors(images, [(256, 256)] * 20)
    result = fit_anchors(dataset, presets.get(name), generations=0, backend="cpu")
    assert result.boxes == 240 and result.small_boxes == 160
    for candidate in (result.kmeans, result.config):
        for lv in candidate.anchors.levels:
            shapes = lv.shapes or [(s, r) for s in (lv.sizes or lv.scales) for r in lv.aspect_ratios]
            assert len({(round(a, 6), round(b, 6)) for a, b in shapes}) == len(shapes), lv


def test_fit_never_returns_a_config_worse_than_the_start():
    """Boxes of 1 px on the centres of 1-px anchors: every shape the fit can reach is at
    least 2 px (IoU 0.25). It returned such a config under the start's objective."""
    config = presets.get("retinanet_detectron2")  # its anchors are not rounded to whole pixels
    levels = config.to_dict()["anchors"]["levels"][:1]
    levels[0].update(sizes=[1.0], aspect_ratios=[1.0])
    config = config.replace(**{"anchors.levels": levels})
    centres = torch.tensor([[16.0, 24.0], [40.0, 8.0], [64.0, 64.0]])
    dataset = from_tensors([torch.cat([centres - 0.5, centres + 0.5], dim=1)], [(96, 128)])
    result = fit_anchors(dataset, config, generations=5, backend="cpu")
    assert result.fitness_start > 1.0 and result.fitness_kmeans < 1.0
    assert result.config is config and result.fitness == result.fitness_start
    assert result.history == [(0, result.fitness_start)]


def _squares(images: int, low: float, high: float, seed: int = 0):
    """``images`` images of 256 x 256 with 6 square boxes each, sides in [low, high)."""
    generator, boxes = torch.Generator().manual_seed(seed), []
    for _ in range(images):
        xy = torch.rand(6, 2, generator=generator) * (250 - high) + 3  # inside: not clipped out of square
        side = torch.rand(6, 1, generator=generator) * (high - low) + low
        boxes.append(torch.cat([xy, xy + side.expand(-1, 2)], dim=1))
    return from_tensors(boxes, [(256, 256)] * images)


def test_fit_writes_back_a_start_nothing_beats_as_given():
    """The start ties k-means, both at the objective's 1.1 maximum: the k-means copy came
    back instead (ratios 0.9999995, ...), and the CLI's note did not print."""
    start = presets.get("retinanet_torchvision")
    result = fit_anchors(_squares(10, 30, 60), start, generations=3, backend="cpu")
    assert result.fitness_kmeans == result.fitness_start == pytest.approx(1.1)
    assert result.config is start and result.fitness == result.fitness_start
    assert result.history == [(0, result.fitness_start)]


def test_fit_mmdet_scales_follow_the_levels_that_have_boxes():
    """14-18 px squares all sit on the lowest level: the levels without boxes (the start's
    scale 8) outvoted it in an unweighted mean, and k-means scored 0 where scale 4 scores
    0.86 (torchvision's k-means, free per level, reaches 0.86 too)."""
    dataset = _squares(20, 14, 18)
    mmdet = fit_anchors(dataset, presets.get("rpn_mmdet"), generations=0, backend="cpu")
    torchvision = fit_anchors(dataset, presets.get("fasterrcnn_rpn_torchvision"), generations=0, backend="cpu")
    assert mmdet.fitness_kmeans > 0.8 and torchvision.fitness_kmeans > 0.8
    assert mmdet.kmeans.anchors.levels[0].scales[0] * 4 == pytest.approx(16.0, rel=0.1)  # level 0's stride is 4


def test_fit_kmeans_ratios_of_square_boxes_do_not_repeat():
    """float32 coordinates leave squares 1e-6 off square: counted as distinct shapes, they
    gave three ratios of ~1 (0.9999995, 0.99999998, 1.0000004)."""
    generator, boxes = torch.Generator().manual_seed(0), []
    for _ in range(30):  # 40-80 px squares far from the origin: float32 keeps fewer of their digits
        xy = torch.rand(6, 2, generator=generator) * 600 + 50
        boxes.append(torch.cat([xy, xy + (torch.rand(6, 1, generator=generator) * 40 + 40).expand(-1, 2)], dim=1))
    dataset = from_tensors(boxes, [(800, 800)] * 30)
    wh = (dataset.boxes[:, 2:] - dataset.boxes[:, :2]).double()
    assert 1e-6 < (wh[:, 1] / wh[:, 0]).log().abs().max() < 1e-5  # the case: squares up to float32 rounding
    result = fit_anchors(dataset, presets.get("retinanet_torchvision"), generations=0, backend="cpu")
    ratios = result.kmeans.anchors.levels[0].aspect_ratios
    assert len({round(r, 3) for r in ratios}) == 3, ratios


def test_fit_yolo_keeps_thin_boxes_in_the_kmeans():
    """1.8 px wide, 20-40 px tall: yolov5's autoanchor leaves out only boxes under 2 px on
    both sides; the fit left these out and its objective stayed 0."""
    generator, boxes = torch.Generator().manual_seed(0), []
    for _ in range(20):
        xy = torch.rand(6, 2, generator=generator) * 200 + 10
        wh = torch.cat([torch.full((6, 1), 1.8), torch.rand(6, 1, generator=generator) * 20 + 20], dim=1)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    result = fit_anchors(from_tensors(boxes, [(256, 256)] * 20), presets.get("yolov5"), generations=0, backend="cpu")
    assert result.small_boxes == 0 and result.fitness_kmeans > 0.1 > result.fitness_start


@pytest.mark.parametrize("name", ["retinanet_torchvision", "retinanet_detectron2", "rpn_mmdet", "keras"])
def test_fit_keeps_every_anchor_side_at_least_two_pixels(name):
    """Boxes of ~1 x 12 and ~12 x 1 px: the fit held sizes (sqrt(w x h)) at 2 px and took
    ratios up to 16, making sides of 0.5 px: zero-area anchors once torchvision rounds
    them (3 of its 9 cell shapes), and the note said anchors stay at least 2 px."""
    generator, boxes = torch.Generator().manual_seed(0), []
    for _ in range(40):
        xy = torch.rand(8, 2, generator=generator) * 200 + 10
        thin = torch.rand(8, 1, generator=generator) * 0.3 + 1
        long = torch.rand(8, 1, generator=generator) * 3 + 11
        tall = torch.rand(8, 1, generator=generator) < 0.5
        wh = torch.where(tall, torch.cat([thin, long], 1), torch.cat([long, thin], 1))
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    config = _keras_config() if name == "keras" else presets.get(name)
    result = fit_anchors(from_tensors(boxes, [(256, 256)] * 40), config, seed=0, generations=40, backend="cpu")
    anchors = generate_anchors(result.config.anchors, (256, 256))
    sides = anchors[:, 2:] - anchors[:, :2]
    assert sides.min() >= 2 - 1e-4, sides.min()


def _keras_config() -> TargetConfig:
    """keras-retinanet's AnchorParameters.default on strides 8-32: sizes 32, 64, 128 times
    scales 2^0, 2^(1/3), 2^(2/3), ratios 0.5, 1, 2."""
    scales = [2 ** (i / 3) for i in range(3)]
    levels = [{"stride": stride, "sizes": [size * s for s in scales], "aspect_ratios": [0.5, 1.0, 2.0]}
              for stride, size in ((8, 32), (16, 64), (32, 128))]  # fmt: skip
    return TargetConfig.from_dict({"anchors": {"layout": "keras", "levels": levels}})


@pytest.mark.parametrize("layout", ["mmdet", "keras"])
def test_fit_keeps_the_scales_shared_where_the_generator_shares_them(skewed_path, layout):
    """mmdet's AnchorGenerator and keras-retinanet's AnchorParameters take one set of scales
    for every level: the fit gave each level its own, which neither can build."""
    dataset = load_coco(skewed_path, Resize(mode="none")).subset(torch.arange(30))
    config = presets.get("retinanet_mmdet") if layout == "mmdet" else _keras_config()
    result = fit_anchors(dataset, config, seed=1, generations=10, backend="cpu")
    for fitted in (result.kmeans, result.config):
        levels = fitted.anchors.levels
        if layout == "mmdet":
            assert len({lv.scales for lv in levels}) == 1
            assert [lv.base_size for lv in levels] == [lv.base_size for lv in config.anchors.levels]
        else:
            multiples = [[s / lv.sizes[0] for s in lv.sizes] for lv in levels]
            for level_multiples in multiples[1:]:
                assert level_multiples == pytest.approx(multiples[0], rel=1e-9)
    assert result.fitness > result.fitness_start  # still free enough to fit the skewed boxes
    assert check(dataset, result.config, backend="cpu").bpr > check(dataset, config, backend="cpu").bpr


def test_fit_refuses_a_start_whose_levels_do_not_share_scales():
    levels = presets.get("retinanet_mmdet").to_dict()["anchors"]["levels"]
    levels[2]["scales"] = [3.0, 4.0, 5.0]
    config = presets.get("retinanet_mmdet").replace(**{"anchors.levels": levels})
    dataset = from_tensors([torch.tensor([[10.0, 10.0, 40.0, 50.0]])], [(96, 128)])
    with pytest.raises(ValueError, match="shares scales across levels; level 2's scales"):
        fit_anchors(dataset, config, generations=0, backend="cpu")


def test_fit_refuses_fixed_canvas_layouts(skewed_path):
    dataset = load_coco(skewed_path, Resize(mode="none")).subset(torch.arange(2))
    with pytest.raises(ValueError, match="ssd"):
        fit_anchors(dataset, presets.get("ssd300_torchvision"), generations=1)


def test_wh_iou_is_the_iou_of_shapes_sharing_a_centre():
    # 10 x 10 against 20 x 5: intersection 10 x 5 = 50, union 100 + 100 - 50 = 150.
    iou = _wh_iou(torch.tensor([[10.0, 10.0], [20.0, 5.0]]), torch.tensor([[20.0, 5.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 3], [1.0]]))


def test_kmeans_iou_centres_are_the_means_of_their_members():
    # One cluster of (10, 10) twice and (40, 40): the mean (20, 20), not the median (10, 10).
    centres = kmeans_iou(torch.tensor([[10.0, 10.0], [10.0, 10.0], [40.0, 40.0]]), 1)
    assert centres.tolist() == [[20.0, 20.0]]
    # Squares of 90, 10 and 20 px, seeded at 10 and 20: the first step makes {10} and {20, 90} (centre 55), the next
    # moves 20 to the 10 px cluster (1 - IoU 0.75 < 0.87), where it stays: the centres converge to 15 and 90.
    wh = torch.tensor([[90.0, 90.0], [10.0, 10.0], [20.0, 20.0]])
    assert kmeans_iou(wh, 2, seed=0, iterations=0).tolist() == [[10.0, 10.0], [20.0, 20.0]]
    assert kmeans_iou(wh, 2, seed=0).tolist() == [[15.0, 15.0], [90.0, 90.0]]


def test_kmeans_iou_seeds_by_squared_distance_as_kmeans_plus_plus():
    # 50 shapes at 10 x 10, 50 at 10 x 12 (1 - IoU 1/6) and one at 10 x 40 (1 - IoU ~0.7): k-means++ (D² weights)
    # draws the far one second for ~27% of seeds, D weights for ~8% (iterations=0: the seeds themselves).
    wh = torch.tensor([[10.0, 10.0]] * 50 + [[10.0, 12.0]] * 50 + [[10.0, 40.0]])
    far = sum(int((kmeans_iou(wh, 2, seed=seed, iterations=0)[:, 1] == 40).any()) for seed in range(400))
    assert 0.18 * 400 < far < 0.36 * 400


def test_fitness_is_bpr_plus_a_tenth_of_the_positives_capped_at_three():
    # Boxes with 0, 1 and 5 positives: BPR 2/3, served (0 + 1/3 + 1) / 3 (5 counts as 3).
    assert fitness(torch.tensor([0, 1, 5])) == pytest.approx(2 / 3 + 0.1 * (4 / 9))
    assert fitness(torch.tensor([0, 0])) == 0.0 and fitness(torch.zeros(0, dtype=torch.int64)) == 0.0


@pytest.mark.parametrize(("name", "wh", "small"), [
    ("retinanet_torchvision", [[2.0, 2.0], [1.0, 4.0], [1.9, 2.0], [0.5, 7.9]], [False, False, True, True]),
    ("yolov5", [[2.0, 1.0], [1.0, 5.0], [1.9, 1.9], [2.0, 2.0]], [False, False, True, False]),
])  # fmt: skip
def test_boxes_too_small_for_the_fit_are_under_two_pixels_exactly(name, wh, small):
    # FPN layouts: sqrt(w x h) < 2 px; yolo: both sides < 2 px (yolov5's autoanchor: `(wh0 < 3.0).any(1)` warns,
    # `wh0[(wh0 >= 2.0).any(1)]` keeps).
    assert _Parameters(presets.get(name)).too_small(torch.tensor(wh)).tolist() == small


def test_fit_decode_holds_sizes_so_the_thinnest_ratio_keeps_two_pixel_sides():
    # Ratio 16 stretches a size s into sides s / 4 and 4 s: 2 px sides need s >= 8 (not 2 x 16).
    config = presets.get("retinanet_torchvision")
    parameters = _Parameters(config)
    sizes = sum(len(lv.sizes) for lv in config.anchors.levels)
    vector = torch.tensor([1.0] * sizes + [32.0, 1.0, 1 / 32], dtype=torch.float64).log()  # ratios held at 1/16-16
    fitted = parameters.decode(vector)
    assert all(lv.sizes == pytest.approx((8.0,) * len(lv.sizes)) for lv in fitted.anchors.levels)
    assert fitted.anchors.levels[0].aspect_ratios == pytest.approx((1 / 16, 1.0, 16.0))


@pytest.mark.parametrize("name", ["retinanet_torchvision", "retinanet_detectron2", "rpn_mmdet", "keras", "yolov5"])
@pytest.mark.parametrize("shift", [-20.0, 20.0])
def test_fit_decode_keeps_every_anchor_side_within_two_to_4096_pixels(name, shift):
    # Every parameter of the start e^20 times smaller or larger (the ratios then all 1/16 or 16, the scales still
    # apart): each layout's bounds hold every side of every level's cell anchors within [2, 4096] px, the smallest
    # and largest at the bounds.
    config = _keras_config() if name == "keras" else presets.get(name)
    parameters = _Parameters(config)
    fitted = parameters.decode(parameters.encode(config) + shift)
    grid = resolve_grid(fitted.anchors, (256, 256))
    sides = torch.cat([lv.cells[:, 2:] - lv.cells[:, :2] for lv in grid.levels])
    assert sides.min() >= 2 - 1e-3 and sides.max() <= 4096 + 1e-3, (sides.min(), sides.max())
    bound = 2.0 if shift < 0 else 4096.0
    assert float(sides.min() if shift < 0 else sides.max()) == pytest.approx(bound, abs=1e-3)


def test_fit_kmeans_holds_sizes_only_as_far_as_the_ratios_need():
    # Squares of 10 and 20 px and 4 x 64 / 64 x 4 boxes (16 px, ratios 16 and 1/16): a 10 px size keeps 2.5 px sides
    # at ratio 16, so the k-means sizes are the boxes' own 10, 16 and 20 (held at 2 x 16 = 32 px, all three were 32).
    level = {"stride": 8, "sizes": [32.0, 64.0, 128.0], "aspect_ratios": [0.5, 1.0, 2.0]}
    parameters = _Parameters(presets.get("retinanet_torchvision").replace(**{"anchors.levels": [level]}))
    wh = torch.tensor([[10.0, 10.0], [20.0, 20.0], [4.0, 64.0], [64.0, 4.0]], dtype=torch.float64).repeat(5, 1)
    fitted = parameters.decode(parameters.kmeans(wh, seed=0)).anchors.levels[0]
    assert fitted.sizes == pytest.approx((10.0, 16.0, 20.0)) and fitted.aspect_ratios == pytest.approx((1 / 16, 1, 16))


def test_fit_yolo_kmeans_holds_boxes_past_4096_px_to_the_bound():
    # Boxes 5,000-7,000 px wide are one shape once held at 4,096 px: k-means made three centres of them, all decoded
    # to 4096 x 100, a head's anchors repeated.
    parameters = _Parameters(presets.get("yolov5"))
    wh = torch.tensor([[5000.0, 100.0], [6000.0, 100.0], [7000.0, 100.0], [30.0, 40.0], [60.0, 20.0]]).repeat(3, 1)
    fitted = parameters.decode(parameters.kmeans(wh.double(), seed=0))
    shapes = [(round(w, 3), round(h, 3)) for lv in fitted.anchors.levels for w, h in lv.shapes]
    assert len(set(shapes)) == len(shapes) == 9 and (4096.0, 100.0) in shapes, shapes


def test_fit_kmeans_gives_each_level_the_boxes_nearest_its_sizes():
    # Levels of sizes (16, 32) and (128, 256): centred at 22.6 and 181 px in logs, a 60 px box is nearer the first
    # (nearer the second's 128 px smallest size). k-means of 10, 40, 60 gives 10 and 50; of 100, 200, 300, 150 and 300.
    levels = [{"stride": 8, "sizes": [16.0, 32.0], "aspect_ratios": [1.0]},
              {"stride": 16, "sizes": [128.0, 256.0], "aspect_ratios": [1.0]}]  # fmt: skip
    parameters = _Parameters(presets.get("retinanet_torchvision").replace(**{"anchors.levels": levels}))
    sides = torch.tensor([10.0, 40.0, 60.0, 100.0, 200.0, 300.0], dtype=torch.float64)[:, None].expand(-1, 2)
    fitted = parameters.decode(parameters.kmeans(sides.repeat(2, 1), seed=0)).anchors.levels
    assert [lv.sizes for lv in fitted] == [pytest.approx((10.0, 50.0)), pytest.approx((150.0, 300.0))]


def test_fit_keras_kmeans_is_the_least_squares_fit_of_level_sizes_times_shared_scales():
    # Level 0's k-means sizes 10 and 40 px (a factor 4), level 1's 100 and 200 (2), as many boxes each: the shared
    # scales, in logs, are the weighted mean of the levels' own, (1, 2^1.5); each level's size keeps its sizes' mean
    # in logs: sqrt(10 x 40 / 2^1.5) and sqrt(100 x 200 / 2^1.5) (its smallest k-means size gave 10 and 100).
    levels = [{"stride": 8, "sizes": [16.0, 32.0], "aspect_ratios": [1.0]},
              {"stride": 16, "sizes": [128.0, 256.0], "aspect_ratios": [1.0]}]  # fmt: skip
    parameters = _Parameters(TargetConfig.from_dict({"anchors": {"layout": "keras", "levels": levels}}))
    wh = torch.tensor([[10.0, 10.0], [40.0, 40.0], [100.0, 100.0], [200.0, 200.0]], dtype=torch.float64).repeat(3, 1)
    fitted = parameters.decode(parameters.kmeans(wh, seed=0)).anchors.levels
    scale = 2**1.5
    assert fitted[0].sizes == pytest.approx((math.sqrt(400 / scale), math.sqrt(400 / scale) * scale))
    assert fitted[1].sizes == pytest.approx((math.sqrt(20000 / scale), math.sqrt(20000 / scale) * scale))


def test_fit_mmdet_kmeans_scales_are_over_each_levels_base_size():
    # mmdet's anchor is scale x base_size (the stride when no base size is given): 38-42 px squares on a stride-16
    # level of base size 8 take scale ~5, not ~2.5 (40 px over the stride: 20 px anchors).
    level = {"stride": 16, "scales": [2.0], "aspect_ratios": [1.0], "base_size": 8}
    config = TargetConfig.from_dict({"anchors": {"layout": "mmdet", "levels": [level]}})
    result = fit_anchors(_squares(4, 38, 42), config, generations=0, backend="cpu")
    assert result.kmeans.anchors.levels[0].scales[0] * 8 == pytest.approx(40.0, rel=0.05)
    assert result.fitness_kmeans > result.fitness_start


def test_fit_counts_the_boxes_too_small_for_it_by_its_layouts_rule():
    # 1.5 x 2.5 px: under 2 px on one side only (yolo keeps it), sqrt(w x h) under 2 px (the FPN layouts leave it out).
    boxes = torch.tensor([[10.0, 10.0, 11.5, 12.5], [30.0, 30.0, 70.0, 60.0], [100.0, 100.0, 150.0, 180.0]])
    dataset = from_tensors([boxes], [(256, 256)])
    small = {name: fit_anchors(dataset, presets.get(name), generations=0, backend="cpu").small_boxes
             for name in ("yolov5", "retinanet_torchvision")}  # fmt: skip
    assert small == {"yolov5": 0, "retinanet_torchvision": 1}


def test_fit_refuses_zero_fit_images():
    with pytest.raises(ValueError, match=r"^fit: the dataset has no boxes"):
        fit_anchors(from_tensors([torch.zeros(0, 4)], [(64, 64)]), presets.get("yolov5"), generations=3, backend="cpu")
    with pytest.raises(ValueError, match=r"need generations >= 0 and fit_images > 0, got 3, 0"):
        fit_anchors(_tiny_boxes(), presets.get("yolov5"), fit_images=0, generations=3, backend="cpu")
    # a fraction of an image failed in a slice ("slice indices must be integers"), unnamed
    with pytest.raises(TypeError, match=r"fit: fit_images: expected an integer, got 1.5"):
        fit_anchors(_tiny_boxes(), presets.get("yolov5"), fit_images=1.5, generations=3, backend="cpu")


def test_fit_history_records_strict_improvements_only():
    # A (1+1) evolution keeps a child only when it is strictly fitter: few boxes make ties common.
    result = fit_anchors(_tiny_boxes(), presets.get("yolov5"), generations=30, backend="cpu")
    scores = [score for _, score in result.history]
    assert all(b > a for a, b in zip(scores, scores[1:])) and result.fitness == scores[-1]


def test_fit_evolution_moves_about_half_the_parameters_per_generation():
    # The documented (1+1) step multiplies a random half of the shapes' sides: after one kept generation, some of the
    # 18 yolov5 sides are exactly those it started from (the k-means shapes or the config's), some are not.
    dataset = _tiny_boxes()
    kept = 0
    for seed in range(6):
        result = fit_anchors(dataset, presets.get("yolov5"), seed=seed, generations=1, backend="cpu")
        if [generation for generation, _ in result.history] != [0, 1]:
            continue
        kept += 1
        start = [v for c in (result.kmeans, result.start) for lv in c.anchors.levels for s in lv.shapes for v in s]
        sides = [v for lv in result.config.anchors.levels for s in lv.shapes for v in s]
        unchanged = sum(any(abs(v - s) <= 1e-9 * s for s in start) for v in sides)
        assert 0 < unchanged < len(sides) == 18
    assert kept >= 3


def test_fit_computes_its_objective_on_fit_images_of_the_images():
    # 5 images with boxes, fit_images=2: the objective runs on 2 of them (a seeded sample), their boxes only.
    dataset = _tiny_boxes()
    result = fit_anchors(dataset, presets.get("yolov5"), fit_images=2, generations=0, backend="cpu")
    assert result.fit_images == 2 and result.boxes < dataset.num_boxes
    assert result.boxes in {a + b for i, a in enumerate([3, 2, 4, 1, 2]) for b in [3, 2, 4, 1, 2][i + 1 :]}


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
        (["--preset", "ssd300_torchvision", "--min-size", "800"], "with --canvas H W (--canvas 300 300)"),
        # Its feature maps fit 297 x 297 too, and were checked alone: other anchors, another BPR.
        (["--preset", "ssd300_torchvision", "--canvas", "297", "297"], "need a 300x300 canvas, not 297x297"),
        (["--preset", "d2l_multibox", "--canvas", "250", "249"], "need a 256x256 canvas, not 250x249"),
        (["--config", "."], "config file: . is a folder; give the config's JSON file"),  # was "not found"
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


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", [["tritarget.service.cli", "anchors"], ["tritarget.clients.anchor_design.cli"]])
def test_a_reader_that_stops_reading_ends_the_report_quietly(skewed_path, command, buffered, tmp_path):
    """`tritarget anchors check ... --json out.json | head -1`: 141 (128 + SIGPIPE, as a
    shell reports it), no traceback. Buffered (Python's default), the lines reach the pipe
    at the entry point's flush, after the JSON (the exit's flush failed: status 120,
    "Exception ignored").
    Unbuffered, the reader already gone stops the command at its first line, the dataset's,
    before any check is computed; a reader gone after it stops it at the table, which now
    follows the JSON. The closed pipe was reported as a file error (exit 2)."""
    out = tmp_path / "check.json"
    result = run_into_a_closed_pipe(["-m", *command, "check", "--annotations", skewed_path, "--no-resize", "--quiet",
                                     "--preset", "yolov5", "--backend", "cpu", "--missing", "0", "--json", str(out)],
                                    buffered)  # fmt: skip
    assert (result.returncode, result.stderr) == (141, "")
    if buffered:
        assert json.loads(out.read_text())[0]["name"] == "yolov5"
    else:
        assert not out.exists()


def test_a_json_into_a_pipe_whose_reader_has_gone_is_a_file_not_written(skewed_path):
    """`anchors check --json >(true)`: that pipe's reader gone is a file not written (exit
    1, named, as a full disk), the report printed all the same; it was taken for stdout's
    (exit 141)."""
    with closed_pipe() as pipe:
        result = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "anchors", "check", "--annotations",
                                 skewed_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu", "--quiet",
                                 "--json", f"/dev/fd/{pipe}"],
                                capture_output=True, text=True, pass_fds=(pipe,), timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"tritarget anchors check: could not write /dev/fd/{pipe}: Broken pipe\n"
    assert "BPR, IoU >= high alone" in result.stdout


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_of_the_progress_lines_that_stops_ends_them_not_the_check(skewed_path, tmp_path, buffered):
    """`anchors check ... 2>&1 >/dev/null | head -1`: the progress lines' reader gone ended
    the command (status 120 or 141) before its JSON."""
    out = tmp_path / "check.json"
    result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "anchors", "check", "--annotations", skewed_path,
                                     "--no-resize", "--preset", "yolov5", "--backend", "cpu", "--json", str(out)],
                                    buffered, closed="stderr")  # fmt: skip
    assert result.returncode == 0
    assert "BPR, IoU >= high alone" in result.stdout and json.loads(out.read_text())[0]["name"] == "yolov5"


@pytest.mark.parametrize("progress", [[], ["--quiet"]], ids=["progress", "quiet"])
def test_check_and_fit_run_with_no_stderr_at_all(skewed_path, tmp_path, progress):
    """`2>&-`: the progress lines go nowhere and the commands run (with or without --quiet);
    they ended at once in an AttributeError nobody saw, exit 1, no report, no file."""
    out = tmp_path / "check.json"
    dataset = ["--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu"]
    result = run_without_stderr(["-m", "tritarget.service.cli", "anchors", "check", *dataset, "--missing", "0",
                                 "--json", str(out), *progress])  # fmt: skip
    assert result.returncode == 0
    assert "BPR, IoU >= high alone" in result.stdout and json.loads(out.read_text())[0]["name"] == "yolov5"
    fitted = tmp_path / "fit.json"
    result = run_without_stderr(["-m", "tritarget.service.cli", "anchors", "fit", *dataset, "--generations", "2",
                                 "--out", str(fitted), *progress])  # fmt: skip
    assert result.returncode == 0
    assert json.loads(fitted.read_text())["anchors"]["levels"]


def test_an_error_with_no_stderr_at_all_goes_nowhere_not_into_stdout(tmp_path):
    """`2>&-`: Python's print(file=sys.stderr) with no stderr writes to stdout, so a
    command's error line went into what its caller reads (a report, a JSON pipe); it goes
    nowhere, and the status says it."""
    missing = tmp_path / "missing.json"
    result = run_without_stderr(["-m", "tritarget.service.cli", "anchors", "check", "--annotations", str(missing),
                                 "--preset", "yolov5", "--backend", "cpu"])  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")


def test_a_reader_gone_after_the_first_line_stops_the_check_after_its_json(skewed_path, tmp_path, monkeypatch):
    """`anchors check --json out.json | head -1` with every line written at once
    (PYTHONUNBUFFERED): the reader has the dataset's line and goes; the table's line then
    ends the command (141), after the JSON, which the table used to precede."""

    class ClosedAfterOneLine(io.StringIO):
        def write(self, text: str) -> int:
            if "\n" in self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", ClosedAfterOneLine())
    monkeypatch.setattr(output, "reader_gone", lambda: 141)  # it points the real stdout at /dev/null
    out = tmp_path / "check.json"
    assert main(["anchors", "check", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5",
                 "--backend", "cpu", "--quiet", "--json", str(out)]) == 141  # fmt: skip
    assert json.loads(out.read_text())[0]["name"] == "yolov5"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names of any bytes: Linux")
def test_a_file_name_that_is_not_utf8_is_printed_escaped(skewed_path, tmp_path):
    """Under a UTF-8 locale stdout refused the name's undecodable bytes: `fit` failed (exit 2)
    after writing its file, and `check` printed nothing."""
    annotations = os.path.join(os.fsencode(tmp_path), b"caf\xe9.json")
    with open(skewed_path, "rb") as source, open(annotations, "wb") as copy:
        copy.write(source.read())
    out = os.path.join(os.fsencode(tmp_path), b"fitted\xe9.json")
    for argv in ([b"check", b"--annotations", annotations, b"--missing", b"0"],
                 [b"fit", b"--annotations", annotations, b"--generations", b"2", b"--out", out]):  # fmt: skip
        result = subprocess.run(
            [os.fsencode(sys.executable), b"-m", b"tritarget.service.cli", b"anchors", *argv, b"--no-resize",
             b"--preset", b"yolov5", b"--backend", b"cpu"],
            capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b"caf\\udce9.json" in result.stdout, result.stdout
    assert os.path.exists(out)


# ---------------------------------------------------------------- CLI: bad input, refused before the work


@pytest.fixture
def tiny_path(tmp_path):
    """Two 64 x 64 images with small boxes only (no medium or large ones)."""
    data = {
        "images": [{"id": 1, "height": 64, "width": 64}, {"id": 2, "height": 64, "width": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [4, 4, 12, 16]},
            {"id": 2, "image_id": 1, "bbox": [30, 20, 20, 10]},
            {"id": 3, "image_id": 2, "bbox": [10, 30, 16, 16]},
        ],
    }
    return _write(tmp_path / "tiny.json", data)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--min-size", "0"], "argument --min-size: must be a positive integer (at most 2**63 - 1), got 0"),
        (["check", "--size-divisible", "0"], "argument --size-divisible: must be a positive integer"),
        (["check", "--canvas", "0", "0"], "argument --canvas: must be a positive integer (at most 2**63 - 1), got 0"),
        (
            ["check", "--canvas", "-5", "300"],
            "argument --canvas: must be a positive integer (at most 2**63 - 1), got -5",
        ),
        (["check", "--letterbox", "0", "10"], "argument --letterbox: must be a positive integer"),
        (["check", "--batch-images", "-3"], "argument --batch-images: must be a positive integer"),
        # Past 2**63 - 1 the message named no bound ("must be a positive integer, got 10**20").
        (["check", "--batch-images", str(10**20)], "must be a positive integer (at most 2**63 - 1), got 1000"),
        (["check", "--missing", "-1"], "argument --missing: must be an integer in 0 .. 2**63 - 1, got -1"),
        (["show", "--out-dir", "pics", "--batch-images", "0"], "argument --batch-images: must be a positive"),
        (["fit", "--out", "f.json", "--generations", "-1"], "argument --generations: must be an integer in 0 .. 2"),
        (["fit", "--out", "f.json", "--fit-images", "0"], "argument --fit-images: must be a positive integer"),
        (["fit", "--out", "f.json", "--seed", str(10**23)], "argument --seed: must be an integer in 0 .. 2**64 - 1"),
    ],
)
def test_cli_numeric_flags_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["anchors", argv[0], "--annotations", "never_read.json", "--preset", "yolov5", *argv[1:]])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--preset", "yolov5", "--min-size", "900", "--max-size", "800"],
         "--min-size 900 is larger than --max-size 800"),
        (["check", "--preset", "yolov5", "--max-size", "640"],
         "--min-size 800 (the default) is larger than --max-size 640"),
        (["check", "--preset", "yolov5", "--letterbox", "64", "64", "--max-size", "800"],
         "--max-size goes with --min-size resizing"),
        (["check", "--preset", "yolov5", "--canvas", "64", "64", "--size-divisible", "64"],
         "--size-divisible pads --min-size and --no-resize canvases; --canvas 64 64 fixes the canvas"),
        (["check", "--preset", "yolov5", "--preset", "retinanet_torchvision"],
         "these configs resize differently by default (yolov5: --letterbox 640 640; retinanet_torchvision: "
         "--min-size 800 --max-size 1333)"),
        (["check", "--preset", "ssd300_torchvision", "--canvas", "512", "512"],
         "ssd300_torchvision: its fixed feature maps (38x38 at stride 8, 19x19 at stride 16, 10x10 at stride 32, "
         "5x5 at stride 64, 3x3 at stride 100, 1x1 at stride 300) need a 300x300 canvas, not 512x512"),
        (["check", "--preset", "d2l_multibox", "--letterbox", "300", "300"], "need a 256x256 canvas, not 300x300"),
        (["fit", "--preset", "ssd300_torchvision", "--canvas", "300", "300", "--out", "f.json"],
         "ssd300_torchvision: fit supports the torchvision, detectron2, mmdet, keras, yolo anchor layouts; "
         "this config's is 'ssd'"),
        (["fit", "--preset", "yolov5", "--preset", "yolov5", "--out", "f.json"], "fit takes one starting config"),
        (["show", "--preset", "yolov5", "--no-resize", "--out-dir", "pics"], "--no-resize needs --annotations"),
        (["show", "--preset", "yolov5", "--image-id", "999", "--out-dir", "pics"], "--image-id needs --annotations"),
    ],
)  # fmt: skip
def test_cli_refuses_flags_that_contradict_before_loading(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written, here or anywhere
    annotations = [] if argv[0] == "show" else ["--annotations", "never_read.json"]
    assert main(["anchors", *argv, *annotations, "--backend", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "never_read.json" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_the_triton_backend_without_a_gpu_before_drawing(tmp_path, monkeypatch, capsys):
    from tritarget.kernels import triton_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    for argv in (["check", "--annotations", "never_read.json"], ["show", "--out-dir", str(tmp_path / "pics")]):
        assert main(["anchors", *argv, "--preset", "yolov5", "--backend", "triton"]) == 2
        assert "--backend triton needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--out", "afile/f.json"], "--out afile/f.json: afile is not a folder"),
        (["fit", "--out", "folder"], "--out folder: is a folder; give a file name"),
        (["fit", "--out", "newdir/"], "--out newdir/: is a folder; give a file name"),
        (["fit", "--out", "bad.json"], "--out bad.json: that is the --annotations input"),
        (["check", "--json", "afile/x.json"], "--json afile/x.json: afile is not a folder"),
        (["show", "--out-dir", "afile"], "--out-dir afile: is a file, not a folder"),
        (["show", "--out-dir", "afile/pics"], "--out-dir afile/pics: afile is not a folder"),
        # The whole fit ran, then failed naming a temporary file; --json '' wrote nothing, silently.
        (["fit", "--out", ""], "--out : is empty; give a file name"),
        (["check", "--json", ""], "--json : is empty; give a file name"),
        (["show", "--out-dir", ""], "--out-dir : is empty; give a folder (. for the working one)"),  # wrote into .
    ],
)
def test_cli_checks_output_paths_before_loading(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.json").write_text("{not json")  # loading it would fail: the output is checked first
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["anchors", *argv, "--annotations", "bad.json", "--preset", "yolov5", "--backend", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "bad.json").read_text() == "{not json"


def test_cli_refuses_a_canvas_of_more_anchors_than_it_takes(skewed_path, tmp_path, capsys):
    """2.5 billion anchors per image: refused with one line, not a traceback out of memory."""
    message = "yolov5 on a 200000x200000 canvas: 2,460,937,500 anchors per image, over the 33,554,432"
    for argv in (["check", "--annotations", skewed_path], ["show", "--out-dir", str(tmp_path / "pics")]):
        assert main(["anchors", *argv, "--letterbox", "200000", "200000", "--preset", "yolov5", "--backend", "cpu",
                     "--quiet"]) == 2  # fmt: skip
        assert message in capsys.readouterr().err
    assert not (tmp_path / "pics").exists()


@pytest.mark.parametrize("argv", [["check", "--json"], ["fit", "--out"]])
def test_cli_refuses_to_write_over_its_config_input(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = json.dumps(presets.get("yolov5").to_dict())
    (tmp_path / "mine.json").write_text(text)
    assert main(["anchors", *argv, "mine.json", "--config", "mine.json", "--annotations", "never_read.json",
                 "--backend", "cpu"]) == 2  # fmt: skip
    assert f"{argv[1]} mine.json: that is the --config input; give another file" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == text


@pytest.mark.parametrize(("data", "message"), [
    ({"images": [], "annotations": []}, "no images"),
    ({"images": [{"id": 1, "height": 9, "width": 9}], "annotations": [{"image_id": 1, "bbox": [20, 20, 5, 5]}]},
     "no boxes to measure (1 annotations were empty after clipping to their image, 0 are crowd regions)"),
    ({"images": [{"id": 1, "height": 9, "width": 9}],
      "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1}]},
     "no boxes to measure (0 annotations were empty after clipping to their image, 1 are crowd regions)"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["check", "show"])
def test_cli_refuses_datasets_without_images_or_boxes(data, message, command, tmp_path, capsys):
    path = _write(tmp_path / "empty.json", data)
    pics = tmp_path / "pics"
    argv = ["anchors", command, "--annotations", path, "--preset", "yolov5", "--backend", "cpu", "--quiet"]
    assert main(argv + (["--out-dir", str(pics)] if command == "show" else [])) == 2
    assert f"{path}: {message}" in capsys.readouterr().err
    assert not pics.exists()


def test_cli_json_writes_null_where_there_is_no_value(tiny_path, tmp_path):
    out = tmp_path / "check.json"
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--quiet", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    (summary,) = json.loads(out.read_text(), parse_constant=refuse)
    assert summary["by_size"]["small"]["boxes"] == 3 and summary["by_size"]["small"]["bpr"] is not None
    assert summary["by_size"]["large"] == {"boxes": 0, "bpr": None, "bpr_low_quality": None, "mean_positives": None}


def test_cli_resizes_by_layout_unless_told(tiny_path, capsys):
    base = ["anchors", "check", "--annotations", tiny_path, "--backend", "cpu", "--quiet", "--missing", "0"]
    for preset, resize in (("yolov5", "letterboxed into 640x640"), ("ssd300_torchvision", "stretched to 300x300"),
                           ("d2l_multibox", "stretched to 256x256"),
                           ("retinanet_torchvision", "resized to shortest side 800, longest <= 1333")):  # fmt: skip
        assert main([*base, "--preset", preset]) == 0
        assert resize in capsys.readouterr().out, preset
    assert main([*base, "--preset", "yolov5", "--min-size", "320"]) == 0
    assert "resized to shortest side 320, longest <= 1333, canvas padded to /32" in capsys.readouterr().out


def test_cli_show_without_data_draws_each_layout_on_its_own_canvas(tmp_path, monkeypatch, capsys):
    from tritarget.clients.anchor_design import plots

    drawn = {}
    monkeypatch.setattr(plots, "plot_anchor_shapes", lambda config, canvas, path, title: drawn.setdefault(path, canvas))
    presets_given = ["ssd300_torchvision", "d2l_multibox", "yolov5", "retinanet_torchvision"]
    argv = ["anchors", "show", "--out-dir", str(tmp_path)]
    assert main([*argv, *(f for p in presets_given for f in ("--preset", p))]) == 0
    canvases = {os.path.basename(path): canvas for path, canvas in drawn.items()}
    assert canvases == {
        "anchors_ssd300_torchvision.png": (300, 300),  # ssd/d2l sizes are fractions of this canvas
        "anchors_d2l_multibox.png": (256, 256),
        "anchors_yolov5.png": (640, 640),
        "anchors_retinanet_torchvision.png": (800, 1344),
    }


def test_cli_names_configs_apart(tiny_path, tmp_path, monkeypatch, capsys):
    from tritarget.clients.anchor_design import plots

    config = tmp_path / "yolov5.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps(presets.get("yolov5").to_dict()).encode())  # a byte-order mark
    base = ["--preset", "yolov5", "--config", str(config), "--preset", "yolov5"]
    assert main(["anchors", "check", "--annotations", tiny_path, *base, "--backend", "cpu", "--quiet"]) == 0
    header = capsys.readouterr().out.split("\n")[1].split()
    assert header == ["yolov5", "yolov5_2", "yolov5_3"]
    drawn = []
    monkeypatch.setattr(plots, "plot_anchor_shapes", lambda config, canvas, path, title: drawn.append(path))
    assert main(["anchors", "show", *base, "--out-dir", str(tmp_path)]) == 0
    assert [os.path.basename(p) for p in drawn] == [f"anchors_{name}.png" for name in header]


@pytest.mark.parametrize(("argv", "message"), [
    (["--no-resize", "--max-size", "800"], "--max-size goes with --min-size resizing, not with --canvas"),
    (["--canvas", "64", "64", "--max-size", "800"], "--max-size goes with --min-size resizing, not with --canvas"),
    (["--letterbox", "64", "64", "--size-divisible", "64"],
     "--size-divisible pads --min-size and --no-resize canvases; --letterbox 64 64 fixes the canvas"),
])  # fmt: skip
def test_cli_refuses_resize_flags_that_contradict_no_resize_or_letterbox(argv, message, tmp_path, monkeypatch, capsys):
    # The flags the existing cases leave out: --max-size with --no-resize, --size-divisible with --letterbox.
    monkeypatch.chdir(tmp_path)
    assert main(["anchors", "check", "--preset", "yolov5", *argv, "--annotations", "never_read.json"]) == 2
    assert message in capsys.readouterr().err


def test_cli_takes_min_size_equal_to_max_size(tmp_path, capsys):
    # --min-size 64 --max-size 64 is a square cap (torchvision's min_size == max_size), not a contradiction.
    data = {"images": [{"id": 1, "height": 32, "width": 64}], "annotations": [{"image_id": 1, "bbox": [4, 4, 12, 8]}]}
    argv = ["anchors", "check", "--annotations", _write(tmp_path / "a.json", data), "--preset", "yolov5",
            "--min-size", "64", "--max-size", "64", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "1 images, 1 boxes" in capsys.readouterr().out


def test_cli_anchor_bound_is_the_services_rows_limit_exactly():
    # yolov5 on S x S: 63 S² / 1024 anchors; 2**25 lies between S = 23328 (33,480,783) and S = 23360 (33,572,700).
    configs = [("yolov5", presets.get("yolov5"))]
    _check_anchor_counts(configs, {(23328, 23328)})
    with pytest.raises(_UsageError, match="33,572,700 anchors per image, over the 33,554,432"):
        _check_anchor_counts(configs, {(23360, 23360)})


# ---------------------------------------------------------------- outputs written whole


def test_cli_full_disk_is_one_line_and_leaves_the_old_json(tiny_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "check.json"
    out.write_text("old")

    def disk_full(data, f, **options):
        f.write("[")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--quiet", "--missing", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 1  # not bad input (2): the output's failure, named (it was not)
    assert capsys.readouterr().err.strip() == f"tritarget anchors check: could not write {out}: No space left on device"
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["check.json", "tiny.json"]


def test_cli_fit_on_a_full_disk_still_shows_what_it_fitted(skewed_path, tmp_path, monkeypatch, capsys):
    """The fitted config was written before anything was printed: a full disk lost the
    fitted shapes and the before/after table (minutes of work on a real dataset)."""

    def disk_full(data, f, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    out = tmp_path / "fitted.json"
    argv = ["anchors", "fit", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--out", str(out),
            "--generations", "2", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    printed = capsys.readouterr()
    assert "fitted anchor shapes:" in printed.out and "after: fitted" in printed.out and "wrote" not in printed.out
    assert printed.err.strip() == f"tritarget anchors fit: could not write {out}: No space left on device"
    assert not out.exists()


def test_cli_show_names_the_picture_it_could_not_write(skewed_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design import plots

    def disk_full(results, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_check", disk_full)
    argv = ["anchors", "show", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--image-id", "2",
            "--out-dir", str(tmp_path), "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    printed = capsys.readouterr()
    written = [tmp_path / "anchors_yolov5.png", tmp_path / "assignment_yolov5_image2.png"]
    assert printed.out.splitlines()[-2:] == [f"wrote {path}" for path in written]  # those on disk, said so
    check_png = tmp_path / "check.png"
    assert printed.err.strip() == f"tritarget anchors show: could not write {check_png}: No space left on device"


def test_cli_show_without_matplotlib_is_refused_before_the_dataset_is_read(skewed_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec sees of a missing package
    argv = ["anchors", "show", "--annotations", skewed_path, "--preset", "yolov5", "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err.strip() == "tritarget anchors show: the anchor pictures need matplotlib: pip install matplotlib"
    assert skewed_path not in printed.out  # the dataset was not loaded (its summary line names it)


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def interrupted(path):
        with open(path, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    write_atomically(target, lambda path: Path(path).write_text("new"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it


def test_write_atomically_writes_through_links_and_into_special_files(tmp_path):
    """The rename replaced the path itself: a symbolic link became a file (its target kept
    the old text), an existing file's mode was lost, and run as root `--out /dev/null`
    turned the device into a regular file."""
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert write_atomically(link, lambda path: Path(path).write_text("new")) == str(link)
    assert link.is_symlink() and real.read_text() == "new" and real.stat().st_mode & 0o777 == 0o600
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_atomically(fifo, lambda path: Path(path).write_text("through"))
    reader.join(10)
    assert received == ["through"] and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.json", "pipe", "real.json"]


def test_write_atomically_gives_a_read_only_files_mode_after_writing(tmp_path):
    """The mode was copied onto the temporary file first: a 0o444 report could not be
    written by its owner (not root), after the whole run."""
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o444)
    modes = []

    def write(path):
        modes.append(os.stat(path).st_mode & 0o777)
        Path(path).write_text("new")

    write_atomically(target, write)
    assert modes[0] & 0o200 and target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o444


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("mode", ["w", "a"])  # `> log`, `>> log`
@pytest.mark.parametrize("name", ["/dev/stdout", "/proc/self/fd/1", "link"])
def test_write_atomically_writes_standard_output_where_the_shell_points_it(tmp_path, mode, name):
    """/dev/stdout resolved to the file the shell opened, which was replaced (what a `>>` log
    held and the table printed before were lost); opened anew for appending, the report went
    before the table still in Python's buffer, or was overwritten by it behind a `>`."""
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    (tmp_path / "link").symlink_to("/dev/stdout")
    script = ("import sys; from pathlib import Path; from tritarget.service.output import output_file_problem, "
              "write_atomically; print('table'); assert output_file_problem(sys.argv[1]) is None; "
              "write_atomically(sys.argv[1], lambda path: Path(path).write_text('report\\n'));"
              "print('wrote')")  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # block-buffered
    with open(log, mode) as out:
        subprocess.run([sys.executable, "-c", script, name], stdout=out, check=True, timeout=60, cwd=tmp_path,
                       env=environment)  # fmt: skip
    assert log.read_text() == ("earlier\n" if mode == "a" else "") + "table\nreport\nwrote\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_write_atomically_writes_standard_output_named_by_the_process_id(tmp_path):
    """/proc/<its own pid>/fd/1 is the process's stdout as /proc/self/fd/1 is: written
    through the descriptor, after what Python still buffers (opened anew, the report went
    before the table, which then overwrote it behind a `>`)."""
    log = tmp_path / "log.txt"
    script = ("import os; from pathlib import Path; from tritarget.service.output import write_atomically; "
              "print('table'); write_atomically(f'/proc/{os.getpid()}/fd/1', "
              "lambda path: Path(path).write_text('report\\n')); print('wrote')")  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # block-buffered
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, check=True, timeout=60, env=environment)
    assert log.read_text() == "table\nreport\nwrote\n"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_regular_file_under_dev_is_replaced_not_appended_to():
    path = f"/dev/shm/tritarget-test-{os.getpid()}.json"
    try:
        Path(path).write_text("old")
        write_atomically(path, lambda temporary: Path(temporary).write_text("new"))
        assert Path(path).read_text() == "new"
    finally:
        os.unlink(path)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_device_on_an_output_files_way_is_named_not_a_folder():
    """A path under something that exists but is no folder (a device, not only a regular
    file) is refused as such, before the run."""
    assert output_file_problem("/dev/null/report.json") == "/dev/null is not a folder"
    assert output_folder_problem("/dev/null/pictures") == "/dev/null is not a folder"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_is_checked_by_writing_in_it():
    """os.access says yes to root everywhere: a report for /proc was refused only after the
    whole run, naming the hidden temporary file."""
    assert output_file_problem("/proc/report.json").startswith("cannot write in /proc (")


def test_annotations_and_configs_are_read_from_pipes(skewed_path, capsys):
    """A pipe (``<(zcat instances.json.gz)``) or /dev/stdin is no regular file: both were
    refused as "not found"."""
    pipes = []
    for content in (Path(skewed_path).read_bytes(), json.dumps(presets.get("yolov5").to_dict()).encode()):
        read, write = os.pipe()
        pipes.append(read)
        threading.Thread(target=lambda w=write, c=content: (os.write(w, c), os.close(w)), daemon=True).start()
    try:
        assert stat.S_ISFIFO(os.fstat(pipes[0]).st_mode)
        argv = ["anchors", "check", "--annotations", f"/dev/fd/{pipes[0]}", "--config", f"/dev/fd/{pipes[1]}",
                "--backend", "cpu"]  # fmt: skip
        assert main(argv) == 0
    finally:
        for read in pipes:
            os.close(read)
    assert "BPR, IoU >= high alone" in capsys.readouterr().out


def test_a_tall_images_picture_is_drawn_within_bounds(tmp_path):
    """400,000 x 20 pixels asked matplotlib for a figure past its 2^23-pixel limit."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from tritarget.clients.anchor_design.plots import plot_image_assignment

    path = plot_image_assignment(torch.tensor([[2.0, 10.0, 18.0, 90.0]]), (400_000, 20), presets.get("yolov5"),
                                 tmp_path / "tall.png", backend="cpu")  # fmt: skip
    assert max(Image.open(path).size) <= 900


def test_the_check_table_says_when_positives_need_iou_above_high():
    """strict_high (IoU > high): the table said "IoU>=0.5", and a box whose best IoU is
    exactly high (half of the 10 x 13 anchor at cell (1, 1)) counted as reaching it."""
    config = presets.get("yolov5")
    dataset = from_tensors([torch.tensor([[7.0, 8.75, 17.0, 15.25]])], [(64, 64)], resize=Resize(mode="none"))
    strict = check(dataset, config.replace(**{"match.strict_high": True}), backend="cpu")
    plain = check(dataset, config, backend="cpu")
    assert strict.best_iou.tolist() == [0.5] and (strict.bpr, plain.bpr) == (0.0, 1.0)
    assert "IoU>0.5" in format_check_table([strict]) and "IoU>=0.5" in format_check_table([plain])
    assert (strict.summary()["best_iou"]["below_high"], plain.summary()["best_iou"]["below_high"]) == (1.0, 0.0)


def test_a_folder_given_as_annotations_is_named_a_folder(tmp_path, capsys):
    """It was "annotations file not found" for a folder that exists."""
    assert main(["anchors", "check", "--annotations", str(tmp_path), "--preset", "yolov5"]) == 2
    assert f"annotations file: {tmp_path} is a folder; give the COCO JSON file" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI: defaults, bounds and names


def test_cli_flags_default_as_their_help_says_and_take_their_bounds():
    """batch 256, --missing 10, --generations 300, --fit-images 1000, --seed 0, --backend
    auto; --seed up to 2**64 - 1 and --image-id down to -2**63 are taken, one past refused."""
    from tritarget.service.cli import build_parser

    parse = build_parser().parse_args
    check_args = parse(["anchors", "check", "--annotations", "a.json", "--preset", "yolov5"])
    assert (check_args.batch_images, check_args.missing, check_args.backend) == (256, 10, "auto")
    fit_args = parse(["anchors", "fit", "--annotations", "a.json", "--preset", "yolov5", "--out", "f.json"])
    assert (fit_args.seed, fit_args.generations, fit_args.fit_images) == (0, 300, 1000)
    assert parse(["anchors", "fit", "--annotations", "a.json", "--out", "f.json", "--seed", str(2**64 - 1)]).seed == (
        2**64 - 1
    )
    assert parse(["anchors", "show", "--out-dir", "p", "--image-id", str(-(2**63))]).image_id == -(2**63)
    too_far = (["fit", "--annotations", "a.json", "--out", "f.json", "--seed", str(2**64)],
               ["show", "--out-dir", "p", "--image-id", str(-(2**63) - 1)])  # fmt: skip
    for argv in too_far:
        with pytest.raises(SystemExit) as info:
            main(["anchors", *argv])
        assert info.value.code == 2


def test_cli_missing_zero_lists_no_boxes(tiny_path, capsys):
    """--missing 0: the table alone, no list of boxes without a positive."""
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--quiet"]  # fmt: skip
    assert main([*argv, "--missing", "0"]) == 0
    assert "boxes without a positive" not in capsys.readouterr().out
    assert main(argv) == 0
    assert "boxes without a positive at IoU >= high alone" in capsys.readouterr().out


def test_cli_progress_is_a_line_per_tenth_off_a_terminal_and_none_with_quiet(skewed_path, capsys):
    """60 images in batches of 1 off a terminal: at most 11 lines (0%, 10%, ... 100%), not
    one per batch; --quiet: none."""
    argv = ["anchors", "check", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--batch-images", "1", "--missing", "0"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 11 and all(line.startswith("check yolov5: ") for line in lines), lines
    assert lines[-1].startswith("check yolov5: 60/60 (100%)")
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_size_divisible_pads_a_no_resize_canvas(tiny_path, capsys):
    """--size-divisible goes with --no-resize as with --min-size (the help says both)."""
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--size-divisible", "64", "--preset",
            "yolov5", "--backend", "cpu", "--quiet", "--missing", "0"]  # fmt: skip
    assert main(argv) == 0
    said = f"{tiny_path}: 2 images, 3 boxes, 0 crowd regions, 0 empty boxes skipped; not resized, canvas padded to /64"
    assert said in capsys.readouterr().out


def test_cli_triton_backend_runs_in_the_interpreter_without_a_gpu(tiny_path, monkeypatch, capsys):
    """TRITON_INTERPRET=1 runs the triton kernels on the CPU: --backend triton is then taken
    without a GPU (it is refused only where it cannot run)."""
    pytest.importorskip("triton")
    from tritarget.kernels import triton_backend

    if not triton_backend.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend",
            "triton", "--quiet", "--missing", "0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "BPR, IoU >= high alone" in capsys.readouterr().out


def test_cli_refuses_an_output_that_is_its_input_by_another_name(tmp_path, monkeypatch, capsys):
    """`--out ./data.json --annotations data.json` name one file: refused, the input kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text("{not json")
    argv = ["anchors", "fit", "--annotations", "data.json", "--out", "./data.json", "--preset", "yolov5",
            "--backend", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "--out ./data.json: that is the --annotations input" in capsys.readouterr().err
    assert (tmp_path / "data.json").read_text() == "{not json"


def test_cli_anchor_bound_takes_exactly_the_services_rows_limit():
    """A canvas of exactly 2**25 anchors is taken (the bound is inclusive): one anchor per
    cell at stride 8 on a 32768 x 65536 canvas."""
    config = presets.get("retinanet_torchvision")
    levels = config.to_dict()["anchors"]["levels"][:1]
    levels[0].update(sizes=[32.0], aspect_ratios=[1.0])
    one = config.replace(**{"anchors.levels": levels})
    assert generate_anchors(one.anchors, (16, 16)).shape[0] == 4
    _check_anchor_counts([("one", one)], {(32768, 65536)})
    with pytest.raises(_UsageError, match="33,558,528 anchors per image"):
        _check_anchor_counts([("one", one)], {(32768, 65544)})


@pytest.mark.parametrize(("content", "message"), [
    ("[" * 100_000, "not valid JSON (maximum recursion depth"),
    ("[]", "not a TargetConfig (TargetConfig: expected a dict, got list)"),
])  # fmt: skip
def test_cli_names_a_config_file_it_cannot_take(content, message, tmp_path, capsys):
    """Nested past Python's recursion limit, or JSON that is not an object: one line, exit 2."""
    config = tmp_path / "bad.json"
    config.write_text(content)
    assert main(["anchors", "check", "--annotations", "never_read.json", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"tritarget anchors check: {config}: {message}" + err.split(message, 1)[1] and err.count("\n") == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc/self/mem")
def test_cli_an_input_that_fails_to_read_is_bad_input(tiny_path, capsys):
    """A read that fails once the file is open (EIO) is the input's problem: exit 2 and one
    line naming the file (the open's errors named it, the read's did not), not a traceback.
    A config file's read fails as aloud."""
    assert main(["anchors", "check", "--annotations", "/proc/self/mem", "--preset", "yolov5", "--backend", "cpu"]) == 2
    assert capsys.readouterr().err == "tritarget anchors check: /proc/self/mem: Input/output error\n"
    assert main(["anchors", "check", "--annotations", tiny_path, "--config", "/proc/self/mem", "--backend", "cpu"]) == 2
    assert capsys.readouterr().err == "tritarget anchors check: /proc/self/mem: Input/output error\n"


def test_cli_show_draws_the_image_with_the_most_boxes_unless_told(tiny_path, tmp_path, capsys):
    """Without --image-id, the first image with the most boxes (image 1: 2 boxes, image 2:
    1); an --image-id not in the dataset is refused naming it, nothing drawn."""
    pytest.importorskip("matplotlib")
    pics = tmp_path / "pics"
    argv = ["anchors", "show", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--out-dir", str(pics),
            "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main([*argv, "--image-id", "999"]) == 2
    assert "image id 999 is not in the dataset (2 images)" in capsys.readouterr().err
    assert not pics.exists() or list(pics.iterdir()) == []
    assert main(argv) == 0
    assert sorted(p.name for p in pics.iterdir()) == ["anchors_yolov5.png", "assignment_yolov5_image1.png",
                                                       "check.png"]  # fmt: skip


def test_cli_show_checks_every_picture_path_before_drawing(tiny_path, tmp_path, capsys):
    """A folder where check.png would go: refused before the scan, no picture drawn."""
    (tmp_path / "check.png").mkdir()
    argv = ["anchors", "show", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--out-dir",
            str(tmp_path), "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert f"{tmp_path / 'check.png'}: is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.png", "tiny.json"]


def test_cli_show_names_pictures_apart_by_their_file_names(tmp_path, capsys):
    """Configs "a_b" and "a b" make the same file-safe name: the second's pictures are
    a_b_2, not drawn over the first's; a dot stays in a name (v1.2)."""
    pytest.importorskip("matplotlib")
    text = json.dumps(presets.get("yolov5").to_dict())
    configs = [tmp_path / "a_b.json", tmp_path / "a b.json", tmp_path / "v1.2.json"]
    for config in configs:
        config.write_text(text)
    pics = tmp_path / "pics"
    assert main(["anchors", "show", *(f for c in configs for f in ("--config", str(c))), "--out-dir", str(pics)]) == 0
    assert sorted(p.name for p in pics.iterdir()) == ["anchors_a_b.png", "anchors_a_b_2.png", "anchors_v1.2.png"]


# ---------------------------------------------------------------- pictures and synthetic data


def test_a_picture_is_written_into_a_folder_it_creates(tmp_path):
    """The pictures are written whole (a temporary file moved into place) into their
    folder, created when missing."""
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design.plots import plot_anchor_shapes

    path = tmp_path / "new" / "shapes.png"
    assert plot_anchor_shapes(presets.get("yolov5"), (640, 640), path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(path.parent) == ["shapes.png"]


def test_a_picture_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from tritarget.clients.anchor_design.plots import plot_anchor_shapes

    with pytest.raises(ImportError, match=r"^the anchor pictures need matplotlib: pip install matplotlib$"):
        plot_anchor_shapes(presets.get("yolov5"), (640, 640), tmp_path / "a.png")


def test_coco_like_marks_about_crowd_rate_of_the_boxes_crowd():
    """About 1% of the boxes are iscrowd by default (COCO's share), about half at 0.5."""

    def share(data):
        return sum(a["iscrowd"] for a in data["annotations"]) / len(data["annotations"])

    assert 0.002 < share(synthetic.coco_like(500, seed=0)) < 0.03
    assert 0.4 < share(synthetic.coco_like(200, seed=0, crowd_rate=0.5)) < 0.6


def test_skewed_draws_tall_wide_and_tiny_boxes_inside_the_image():
    """A third each: h/w about 4, w/h about 4, squares of 16-24 px; every box inside its
    image, a small one too (sides capped at the image's)."""
    bbox = torch.tensor([a["bbox"] for a in synthetic.skewed(100, seed=0)["annotations"]])
    aspect = bbox[:, 3] / bbox[:, 2]
    tall, wide, square = aspect > 3, aspect < 1 / 3, (aspect - 1).abs() < 0.01
    assert bool((tall | wide | square).all())
    for kind in (tall, wide, square):
        assert 0.25 < float(kind.float().mean()) < 0.42
    assert 16 <= float(bbox[square, 2].min()) and float(bbox[square, 2].max()) <= 24
    small = synthetic.skewed(20, seed=1, image_size=(40, 30))
    box = torch.tensor([a["bbox"] for a in small["annotations"]])
    assert bool((box[:, :2] >= 0).all()) and bool((box[:, 0] + box[:, 2] <= 30).all())
    assert bool((box[:, 1] + box[:, 3] <= 40).all())


def test_cli_fit_says_where_it_wrote_the_config(skewed_path, tmp_path, capsys):
    out = tmp_path / "fitted.json"
    argv = ["anchors", "fit", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--out", str(out),
            "--generations", "2", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith(f"wrote {out}\n") and out.exists()


def test_coco_like_boxes_are_the_workloads_in_model_pixels():
    """Drawn on the image as the 800/1333 resize makes it (480 x 640 -> 800 x 1066), then
    scaled back by the resize's factor: scaled up again, they are the workload's boxes."""
    from tritarget.kernels.workload import coco_like_boxes, coco_like_counts

    generator = torch.Generator().manual_seed(3)
    counts = coco_like_counts(20, generator)
    expected = torch.cat([coco_like_boxes(c, (800, 1066), generator) for c in counts])
    bbox = torch.tensor([a["bbox"] for a in synthetic.coco_like(20, seed=3)["annotations"]], dtype=torch.float64)
    xyxy = torch.cat([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], 1) * (800 / 480)
    torch.testing.assert_close(xyxy, expected.double(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("canvas", [["256", "250"], ["250", "256"]])
def test_cli_refuses_a_fixed_layout_on_a_canvas_off_in_either_side(canvas, capsys):
    """d2l_multibox's maps are made for 256 x 256: a canvas off in its height or its width
    alone is refused as well."""
    assert main(["anchors", "check", "--annotations", "never_read.json", "--preset", "d2l_multibox", "--canvas",
                 *canvas]) == 2  # fmt: skip
    assert f"need a 256x256 canvas, not {canvas[0]}x{canvas[1]}" in capsys.readouterr().err


def test_an_images_picture_counts_the_anchors_its_crowd_regions_ignore(tmp_path, monkeypatch):
    """The picture's title counts what was assigned with the crowd regions given: a region
    over a quarter of the canvas ignores the anchors it covers."""
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design import plots

    titles, save = [], plots._save
    monkeypatch.setattr(
        plots, "_save", lambda figure, path: titles.append(figure.axes[0].get_title()) or save(figure, path)
    )
    config = presets.get("retinanet_mmdet").replace(**{"match.ignore_iof_thr": 0.5})
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    plots.plot_image_assignment(box, (128, 128), config, tmp_path / "plain.png", backend="cpu")
    plots.plot_image_assignment(box, (128, 128), config, tmp_path / "crowd.png", backend="cpu",
                                ignore_boxes=torch.tensor([[40.0, 40.0, 128.0, 128.0]]))  # fmt: skip
    ignored = [int(title.split(" ignored")[0].rsplit(" ", 1)[1]) for title in titles]
    assert ignored[1] > ignored[0] + 500, titles


def test_strict_high_configs_are_checked_and_labelled_with_their_own_comparison():
    """A box whose best anchor IoU is exactly the high threshold is positive on the high
    threshold alone under IoU >= high and not under strict_high's IoU > high; the table and
    the listing say which comparison each config used (they said ">= high" for both)."""
    dataset = from_tensors([torch.tensor([[10.0, 12.0, 50.0, 40.0]])], [(96, 128)])
    config = _small_fpn().replace(**{"match.low_quality": "none", "match.low": 0.1})
    best = float(check(dataset, config, backend="cpu").best_iou[0])
    assert 0.1 < best < 1
    at_best = config.replace(**{"match.high": best})
    strict = at_best.replace(**{"match.strict_high": True})
    results = [check(dataset, c, name=n, backend="cpu") for c, n in ((at_best, "inclusive"), (strict, "strict"))]
    assert [r.bpr for r in results] == [1.0, 0.0]
    assert "BPR, the high threshold alone" in format_check_table(results)
    assert "BPR, IoU > high alone" in format_check_table(results[1:])
    assert "1 (1 at IoU>high)" in format_check_table(results[1:])
    assert format_missing(results[1], strict=True).splitlines()[0] == (
        "strict: 1 boxes without a positive at IoU > high alone"
    )


# ---------------------------------------------------------------- what the table, the listing and the pictures show


def _table_rows(table: str) -> dict[str, str]:
    """The check table's rows of one config: label -> value."""
    return {line[: line.rindex("  ")].strip(): line[line.rindex("  ") :].strip() for line in table.splitlines()[2:]}


def test_the_check_table_shows_each_number_in_its_row(small_dataset):
    """Every row of the report against the counts it is made of (check's own numbers, not the summary's)."""
    config = _small_fpn()
    result = check(small_dataset, config, name="fpn", backend="cpu")
    positives, strict = result.matched.positives.double(), result.strict.positives.double()
    table = format_check_table([result])
    lines = table.splitlines()
    assert lines[0].split() == ["fpn"] and all(line == line.rstrip() for line in lines)  # values right-aligned
    assert len({len(line) for line in lines}) == 1
    row = _table_rows(table)
    anchors = generate_anchors(config.anchors, (96, 128)).shape[0]
    assert (row["images"], row["boxes (crowd regions)"], row["anchors per image"]) == ("5", "14 (1)", f"{anchors:,}")
    assert anchors >= 1000  # written with a thousands separator
    assert row["matching"] == f"IoU>=0.5, low-quality {config.match.low_quality}" != "IoU>=0.5, low-quality none"
    assert row["BPR, with low-quality rule"] == f"{100 * float((positives > 0).double().mean()):.1f}%"
    boxes = result.boxes.double()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    classes = {"small": areas < 32**2, "medium": (areas >= 32**2) & (areas < 96**2), "large": areas >= 96**2}
    assert int(classes["large"].sum()) == 0  # a class without boxes: "-"
    for size, rows in classes.items():
        n = int(rows.sum())
        want = "0 / - / -" if n == 0 else (
            f"{n} / {100 * float((strict[rows] > 0).double().mean()):.1f}% / {float(positives[rows].mean()):.1f}"
        )  # fmt: skip
        assert row[f"{size}: boxes / BPR / pos per box"] == want, size
    assert row["positives per box (mean)"] == f"{float(positives.mean()):.2f}"
    assert row["without low-quality rule"] == f"{float(strict.mean()):.2f}" != row["positives per box (mean)"]
    used = [int((part > 0).sum()) for part in result.matched.by_shape.split(list(config.anchors.anchors_per_cell))]
    assert row["shapes ever positive"] == " ".join(f"{u}/9" for u in used) and used != [9, 9, 9]
    best = result.best_iou.double()
    quantiles = [f"{float(torch.quantile(best, q)):.2f}" for q in (0.1, 0.5, 0.9)]
    assert row["best-anchor IoU p10/p50/p90"] == " / ".join(quantiles)
    assert row["best-anchor IoU short of high"] == f"{100 * float((best < 0.5).double().mean()):.1f}%"
    ignored = result.matched.ignored_anchors / result.matched.total_anchors
    assert row["ignored anchors"] == f"{100 * ignored:.3f}%" and ignored > 0
    assert re.fullmatch(r"\d+\.\d\d s, [\d,]+ img/s", row["scan"]), row["scan"]
    summary = result.summary()
    assert summary["images_per_second"] == pytest.approx(5 / summary["seconds"])
    assert summary["low_quality"] == config.match.low_quality and summary["high"] == 0.5


def test_check_of_a_dataset_without_boxes_says_none_where_there_is_no_value():
    """One image, no boxes: shares, means and quantiles are None (the table's "-"), every
    level's share of no positives 0, and the anchors per image those of its one canvas."""
    config = presets.get("yolov5")
    result = check(from_tensors([torch.zeros(0, 4)], [(64, 64)]), config, backend="cpu")
    summary = result.summary()
    assert summary["anchors_per_image"] == generate_anchors(config.anchors, (64, 64)).shape[0] == 252
    assert (summary["bpr"], summary["bpr_low_quality"], summary["mean_positives"]) == (None, None, None)
    assert summary["best_iou"] == {"mean": None, "p10": None, "p50": None, "p90": None, "below_high": None}
    assert summary["level_share"] == [0.0, 0.0, 0.0] and summary["boxes_without_positive"] == 0
    row = _table_rows(format_check_table([result]))
    assert (row["BPR, IoU >= high alone"], row["best-anchor IoU p10/p50/p90"]) == ("-", "- / - / -")
    assert row["small: boxes / BPR / pos per box"] == "0 / - / -" and row["positives per box (mean)"] == "-"
    assert format_missing(result) == "config: 0 boxes without a positive under the config's rules"


def test_cli_missing_lists_that_many_boxes_by_their_annotation_ids(skewed_path, capsys):
    """--missing 2: two boxes without a positive at the high threshold, each named by its
    image and annotation ids as the COCO file gives them, then how many more there are; the
    library's listing stops at 20 by default."""
    argv = ["anchors", "check", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--quiet", "--missing", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if "boxes without a positive" in line)
    result = check(load_coco(skewed_path, Resize(mode="none")), presets.get("yolov5"), backend="cpu")
    count = int(result.missing_strict.numel())
    assert count > 20 and result.missing.numel() < count  # the config's rules alone would list fewer
    header = f"yolov5: {count} boxes without a positive at IoU >= high alone"
    assert out[start:] == [header, *out[start + 1 : start + 3], f"  ... {count - 2} more"]
    annotations = {a["id"]: a for a in json.loads(Path(skewed_path).read_text())["annotations"]}
    listed = []
    for line in out[start + 1 : start + 3]:
        image, annotation = int(line.split("image ")[1].split()[0]), int(line.split("annotation ")[1].split(":")[0])
        x, y, w, h = annotations[annotation]["bbox"]
        assert annotations[annotation]["image_id"] == image
        box = [float(v) for v in line.split("box (")[1].split(")")[0].split(", ")]
        assert box == pytest.approx([x, y, x + w, y + h], abs=0.051)
        listed.append(annotation)
    assert listed == result.annotation_ids[result.missing_strict[:2]].tolist()
    assert len(format_missing(result, strict=True).splitlines()) == 1 + 20 + 1


def test_cli_check_says_where_it_wrote_the_json_and_ends_it_with_a_newline(tiny_path, tmp_path, capsys):
    out = tmp_path / "check.json"
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--quiet", "--missing", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith(f"wrote {out}\n")
    assert out.read_text().endswith("}\n]\n")


def test_cli_progress_on_a_terminal_is_one_line_rewritten_in_place(tiny_path, monkeypatch):
    """On a terminal: "\\r" before each state of the line, a newline once all is done."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["anchors", "check", "--annotations", tiny_path, "--no-resize", "--preset", "yolov5", "--backend", "cpu",
            "--batch-images", "1", "--missing", "0"]  # fmt: skip
    assert main(argv) == 0
    rate = r"[1-9][\d,]*/s"  # images per second: 2 images in well under 2 s
    pattern = rf"\rcheck yolov5: 1/2 \(50%\), {rate}\rcheck yolov5: 2/2 \(100%\), {rate}\n"
    assert re.fullmatch(pattern, terminal.getvalue()), repr(terminal.getvalue())


def test_cli_fit_reports_its_objective_and_the_shapes_it_wrote(skewed_path, tmp_path, capsys):
    """The fit's line (images, generations, seed, the objective at each step) is the library's
    fit; the shapes listed are those of the written config: w x h for yolo."""
    out = tmp_path / "fitted.json"
    argv = ["anchors", "fit", "--annotations", skewed_path, "--no-resize", "--preset", "yolov5", "--out", str(out),
            "--generations", "2", "--seed", "5", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    fit = fit_anchors(load_coco(skewed_path, Resize(mode="none")), presets.get("yolov5"), seed=5, generations=2,
                      backend="cpu")  # fmt: skip
    assert re.search(
        rf"^fit on {fit.fit_images} images in \d+\.\d s \(2 generations, seed 5\); "
        rf"objective {fit.fitness_start:.4f} \(yolov5\) -> "
        rf"k-means {fit.fitness_kmeans:.4f} -> fitted {fit.fitness:.4f}$", text, re.M,
    ), text  # fmt: skip
    assert fit.fitness_start < fit.fitness and "nothing found beats" not in text
    fitted = TargetConfig.from_dict(json.loads(out.read_text()))
    assert fitted == fit.config
    shapes = text.split("fitted anchor shapes:\n")[1].splitlines()[:3]
    assert shapes == [
        f"  level {i} (stride {level.stride}): (w x h) " + ", ".join(f"{w:.1f}x{h:.1f}" for w, h in level.shapes)
        for i, level in enumerate(fitted.anchors.levels)
    ]
    assert any(w != h for level in fitted.anchors.levels for w, h in level.shapes)


def test_cli_fit_notes_tiny_boxes_and_a_start_nothing_beats(tmp_path, capsys):
    """Squares of 30-60 px and one 1.5 px box under retinanet_mmdet: the note on the box under
    2 px, the note that the start is written back, and the shapes as mmdet's scales."""
    generator, images, annotations = torch.Generator().manual_seed(0), [], []
    for i in range(10):
        images.append({"id": i + 1, "height": 256, "width": 256})
        xy = torch.rand(6, 2, generator=generator) * 190 + 3
        side = torch.rand(6, generator=generator) * 30 + 30
        for (x, y), s in zip(xy.tolist(), side.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": [x, y, s, s]})
    annotations.append({"id": 999, "image_id": 1, "bbox": [5, 5, 1.5, 1.5]})
    path = _write(tmp_path / "squares.json", {"images": images, "annotations": annotations})
    out = tmp_path / "fitted.json"
    argv = ["anchors", "fit", "--annotations", path, "--no-resize", "--preset", "retinanet_mmdet", "--out", str(out),
            "--generations", "0", "--backend", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "note: 1 of 61 boxes are under 2 px" in text
    assert "note: nothing found beats retinanet_mmdet on these images; it is written back unchanged" in text
    start = presets.get("retinanet_mmdet")
    assert TargetConfig.from_dict(json.loads(out.read_text())) == start
    shapes = text.split("fitted anchor shapes:\n")[1].splitlines()[: len(start.anchors.levels)]
    assert shapes == [
        f"  level {i} (stride {level.stride}): scales {', '.join(f'{v:.2f}' for v in level.scales)}; h/w ratios "
        + ", ".join(f"{r:.3f}" for r in level.aspect_ratios)
        for i, level in enumerate(start.anchors.levels)
    ]


def _figures(monkeypatch) -> list:
    """The figures the pictures save, in order (each still written)."""
    from tritarget.clients.anchor_design import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    return figures


def test_the_anchor_shapes_picture_draws_each_levels_shapes_around_one_cell(tmp_path, monkeypatch):
    """Per level: the stride's square dashed and each shape centred on it, at their sizes,
    in view with y down; the title names the stride and the count of shapes."""
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design.plots import plot_anchor_shapes

    figures = _figures(monkeypatch)
    config = presets.get("yolov5")
    plot_anchor_shapes(config, (320, 640), tmp_path / "shapes.png")  # not square: x and y centres differ
    (figure,) = figures
    assert figure._suptitle.get_text() == "anchor shapes at one cell (yolo layout, pixels)"
    assert len(figure.axes) == 3
    for i, (axis, level) in enumerate(zip(figure.axes, config.anchors.levels)):
        assert axis.get_title() == f"level {i}: stride {level.stride}, 3 shapes"
        cell, *shapes = axis.patches
        half = level.stride / 2
        assert (cell.get_x(), cell.get_y(), cell.get_width(), cell.get_height()) == (-half, -half, 2 * half, 2 * half)
        assert cell.get_linestyle() == "--" and len(shapes) == 3
        for patch, (w, h) in zip(shapes, level.shapes):
            assert (patch.get_width(), patch.get_height()) == pytest.approx((w, h))
            assert (patch.get_x(), patch.get_y()) == pytest.approx((-w / 2, -h / 2), abs=1e-4)  # centred
        extent = 1.05 * max(half, *(max(w, h) / 2 for w, h in level.shapes))
        assert axis.get_xlim() == pytest.approx((-extent, extent)) and axis.get_ylim() == pytest.approx(
            (extent, -extent)
        )


def test_an_images_picture_draws_what_the_matcher_assigned(tmp_path, monkeypatch):
    """The second image of two (its boxes, its crowd region, its size within the canvas),
    assigned as ``check`` assigns it: sampling off, so the positives and ignored anchors are
    those check counts, each positive in its box's colour, each ignored anchor drawn."""
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design.plots import _colour, plot_assignment

    figures = _figures(monkeypatch)
    boxes = [
        torch.tensor([[50.0, 50.0, 90.0, 80.0]]),
        torch.tensor([[8.0, 8.0, 40.0, 40.0], [60.0, 20.0, 120.0, 90.0]]),
    ]
    crowd = [torch.zeros(0, 4), torch.tensor([[0.0, 70.0, 30.0, 100.0]])]
    dataset = from_tensors(boxes, [(100, 150)] * 2, ignore_boxes=crowd, image_ids=[6, 7])
    config = presets.get("fasterrcnn_rpn_torchvision")  # balanced sampling: off for the picture as for check
    plot_assignment(dataset, 7, config, tmp_path / "image.png", backend="cpu")
    result = check(dataset.subset(torch.tensor([1])), config, backend="cpu")
    positives, ignored = int(result.matched.positives.sum()), result.matched.ignored_anchors
    (figure,) = figures
    axis = figure.axes[0]
    assert axis.get_title() == (f"image 7\n2 boxes (thick), {positives} positive anchors (box colour), {ignored} "
                                "ignored (grey), crowd hatched")  # fmt: skip
    assert 0 < positives and 60 < ignored < 3000
    canvas, image, *rest = axis.patches
    assert (canvas.get_width(), canvas.get_height(), image.get_width(), image.get_height()) == (160, 128, 150, 100)
    drawn = {}
    for patch in rest:
        drawn.setdefault((patch.get_linewidth(), patch.get_hatch()), []).append(patch)
    assert len(drawn[0.4, None]) == ignored and len(drawn[0.8, None]) == positives
    colours = {tuple(patch.get_edgecolor()[:3]) for patch in drawn[0.8, None]}
    assert colours == {tuple(_colour(g)[:3]) for g in range(2)}
    assert [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in drawn[2.5, None]] == [
        (8, 8, 32, 32), (60, 20, 60, 70)
    ]  # fmt: skip
    assert [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in drawn[1.0, "//"]] == [(0, 70, 30, 30)]
    assert axis.get_xlim() == (-4, 164) and axis.get_ylim() == (132, -4)  # y down


def test_the_check_picture_plots_the_summary_side_by_side(small_dataset, tmp_path, monkeypatch):
    """Bars of each config beside the other's (share of boxes per bin of positives, BPR at the
    high threshold by size class, none for a class without boxes, share of positives per
    level), the best-anchor IoU in 50 bins with match.high marked."""
    pytest.importorskip("matplotlib")
    from tritarget.clients.anchor_design.plots import plot_check

    figures = _figures(monkeypatch)
    config = _small_fpn()
    results = [check(small_dataset, c, name=n, backend="cpu")
               for n, c in (("plain", config), ("high", config.replace(**{"match.high": 0.7})))]  # fmt: skip
    plot_check(results, tmp_path / "check.png")
    (figure,) = figures
    hist, iou, sizes, levels = figure.axes
    for i, result in enumerate(results):
        summary = result.summary()
        expected = {
            hist: [n / result.num_boxes for _, n in result.positive_histogram()],
            sizes: [math.nan if summary["by_size"][s]["bpr"] is None else summary["by_size"][s]["bpr"]
                    for s in ("small", "medium", "large")],
            levels: summary["level_share"],
        }  # fmt: skip
        for axis, values in expected.items():
            bars = axis.containers[i]
            assert bars.get_label() == result.name
            assert [p.get_height() for p in bars.patches] == pytest.approx(values, nan_ok=True)
            assert [p.get_x() + p.get_width() / 2 for p in bars.patches] == pytest.approx(
                [x + (i - 0.5) * 0.4 for x in range(len(values))]
            )  # side by side
            assert [p.get_width() for p in bars.patches] == pytest.approx([0.4] * len(values))
    assert math.isnan(sizes.containers[0].patches[2].get_height())  # no large boxes: no bar
    assert hist.containers[0].patches[0].get_facecolor() != hist.containers[1].patches[0].get_facecolor()
    assert [t.get_text() for t in hist.get_xticklabels()] == ["0", "1", "2-3", "4-7", "8-15", "16+"]
    assert [t.get_text() for t in sizes.get_xticklabels()] == ["small", "medium", "large"]
    assert sizes.get_ylim() == (0, 1.05)
    assert [len(p.get_xy()) for p in iou.patches] == [2 * 50 + 2] * 2  # step outlines of 50 bins
    assert list(iou.lines[0].get_xdata()) == [0.5, 0.5] and iou.lines[0].get_label() == "match.high"
    assert all(axis.get_legend() is not None for axis in figure.axes)


def test_cli_refuses_fixed_feature_maps_that_fit_no_canvas(tmp_path, capsys):
    """d2l maps of 32 x 32 at stride 8 but 5 x 5 at stride 16: no canvas gives both, with a
    resize flag or without one; refused naming the maps, before the dataset is read."""
    data = presets.get("d2l_multibox").to_dict()
    data["anchors"]["levels"][1]["feature_size"] = [5, 5]
    config = _write(tmp_path / "maps.json", data)
    for flags in ([], ["--canvas", "80", "80"]):
        assert main(["anchors", "check", "--annotations", "never_read.json", "--config", config, *flags]) == 2
        assert capsys.readouterr().err == (
            "tritarget anchors check: maps: its d2l feature maps (32x32 at stride 8, 5x5 at stride 16, 8x8 at "
            "stride 32, 4x4 at stride 64, 1x1 at stride 256) fit no canvas (ceil(canvas / stride) must give each "
            "level's map)\n"
        )
