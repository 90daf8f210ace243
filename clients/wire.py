"""Client side of the wire format: requests from tensors, ``Targets`` from responses.

Boxes may be given as ``xyxy`` (the wire format), ``xywh`` or ``cxcywh`` pixels, or
normalised (``xyxyn``, ``xywhn``, ``cxcywhn``: fractions of each image's size); they are
converted here, at the edge. DENSE responses decode without copying
(the tensors view the response's bytes; float16 deltas are widened to float32);
SPARSE responses are densified.
"""

from __future__ import annotations

import functools
import json
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tritarget.kernels import TargetConfig, presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.kernels.config import plain_value
from tritarget.kernels.problem import check_flags, integer_dtype
from tritarget.kernels.sampling import fresh_seed
from tritarget.kernels.targets import (
    IGNORED,
    NEGATIVE,
    POSITIVE,
    SparseTargets,
    Targets,
    csr_problem,
    csr_rows,
    filled,
    nothing_dropped,
    overlap_problem,
)
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import MAX_ANCHOR_ROWS, TensorError, decode_tensor, encode_tensor

__all__ = [
    "BOX_FORMATS", "build_request", "to_xyxy", "normalised", "row_sizes", "config_ref", "decode_response",
    "decode_sparse", "level_starts", "anchors_request", "decode_anchors",
]  # fmt: skip

# Pixels, or normalised ("n"): coordinates as fractions of the box's image, as YOLO labels
# are (ultralytics' "xywhn" is "cxcywhn" here: torchvision's xywh is a corner and a size).
BOX_FORMATS = ("xyxy", "xywh", "cxcywh", "xyxyn", "xywhn", "cxcywhn")
_FORMATS = {"sparse": pb.FORMAT_SPARSE, "dense": pb.FORMAT_DENSE}
_DELTA_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


def to_xyxy(boxes: torch.Tensor, box_format: str, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``boxes`` [N, 4] of ``box_format`` (one of ``BOX_FORMATS``) as xyxy pixel corners. A
    normalised format's corners are then scaled by each box's image (height, width):
    ``sizes`` [N, 2] (``row_sizes``), as ultralytics' ``xywhn2xyxy`` scales them."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format: must be one of {', '.join(BOX_FORMATS)}; got {box_format!r}")
    corners = boxes
    if box_format.startswith("xywh"):
        x, y, w, h = boxes.unbind(-1)
        corners = torch.stack([x, y, x + w, y + h], dim=-1)
    elif box_format.startswith("cxcywh"):
        cx, cy, w, h = boxes.unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    if not normalised(box_format):
        return corners
    if sizes is None:
        raise ValueError(f"box_format {box_format!r}: normalised boxes need their images' sizes")
    height, width = sizes.to(corners).unbind(-1)
    return corners * torch.stack([width, height, width, height], dim=-1)


def normalised(box_format: str) -> bool:
    """Whether ``box_format`` is one of the normalised ``BOX_FORMATS`` (fractions of an image)."""
    return box_format in BOX_FORMATS and box_format.endswith("n")


def row_sizes(
    name: str, rows: int, counts_name: str, counts: Sequence[int], canvas: Sequence[int], image_sizes: Any = None
) -> torch.Tensor:
    """Each of ``rows`` boxes' image (height, width) [rows, 2], the images holding ``counts``
    boxes each: ``image_sizes`` [B, 2] where given (each image's valid size), else the
    canvas: what a normalised box_format's fractions are of."""
    counts = [int(count) for count in counts]
    if sum(counts) != rows:
        raise ValueError(f"{name}: {rows} rows, but {counts_name} add up to {sum(counts)} (a normalised "
                         "box_format scales each image's boxes by that image's size)")  # fmt: skip
    if image_sizes is None:
        sizes = torch.tensor([[int(side) for side in canvas]]).expand(len(counts), 2)
    else:
        sizes = torch.as_tensor(image_sizes, device="cpu")
        if sizes.shape != (len(counts), 2):
            raise ValueError(f"image_sizes: expected shape [{len(counts)}, 2] (height, width per image), "
                             f"got {list(sizes.shape)}")  # fmt: skip
    return sizes.to(torch.float32).repeat_interleave(torch.tensor(counts), dim=0)


def _boxes(name: str, boxes: Any, box_format: str, sizes: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``boxes`` as the wire holds them: float32 xyxy pixels on the host. ``sizes(rows)``:
    the boxes' image sizes (``row_sizes``), asked for by a normalised format only."""
    if box_format == "xyxy" and _is_cpu_tensor(boxes, torch.float32) and boxes.dim() == 2 and boxes.shape[1] == 4:
        return boxes  # already what the wire holds: no torch op (a call's own cost is the caller's CPU)
    try:
        boxes = as_tensor(boxes)
    except (TypeError, ValueError, RuntimeError):  # None, ragged lists, strings
        raise TypeError(f"{name}: expected a Tensor[N, 4] of coordinates, got {type(boxes).__name__}") from None
    if boxes.is_complex() or boxes.dtype == torch.bool:  # a bool would travel as 0.0 / 1.0
        raise TypeError(f"{name}: expected real coordinates, got {boxes.dtype}")
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    return to_xyxy(boxes.detach().to("cpu", torch.float32), box_format,
                   sizes(boxes.shape[0]) if normalised(box_format) else None).to(torch.float32)  # fmt: skip


def _is_cpu_tensor(value: Any, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == dtype and value.is_cpu


def is_integer(value: Any) -> bool:
    """An int, Python's or numpy's (not a bool, whose True would read as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A number, Python's or numpy's (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def checked_canvas(canvas: Any) -> tuple[int, int]:
    """Two ints, as in-process ``assign`` takes them (a float side would be truncated);
    their values are the server's to check (its errors name canvas_height / canvas_width)."""
    if not isinstance(canvas, (tuple, list)) or len(canvas) != 2:
        raise TypeError(f"canvas: expected (height, width), got {canvas!r}")
    if not all(is_integer(side) for side in canvas):
        raise TypeError(f"canvas: expected two ints (height, width), got {canvas!r}")
    return _int32("canvas[0]", int(canvas[0])), _int32("canvas[1]", int(canvas[1]))


def as_tensor(value: Any) -> torch.Tensor:
    """``torch.as_tensor``, also of numpy arrays torch cannot share, which it refuses:
    views with negative strides (``array[::-1]``) and non-native byte order (``>f4``)."""
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
    return torch.as_tensor(value, device="cpu")


def _ints(name: str, value: Any, counts: list[int] | None = None) -> torch.Tensor:
    """int32 on the host, as the wire holds classes and sizes; other values refused as
    in-process ``assign`` refuses them (a float class would be truncated to another). A
    value past int32 is named by its index, and for a value per box (``counts``: boxes
    per image) by its image and box too."""
    if _is_cpu_tensor(value, torch.int32):
        return value
    try:
        values = as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # None, ragged lists, strings, ints past int64
        raise TypeError(f"{name}: expected integers (a list or a tensor), got {type(value).__name__}: {exc}") from None
    if not integer_dtype(values.dtype):
        raise TypeError(f"{name}: expected integers, got {values.dtype}")
    if values.dtype not in _WITHIN_INT32:
        # numpy compares every integer type by value: torch has no comparison of unsigned
        # tensors, and compares int8 with the bounds wrapped into int8.
        array = values.detach().cpu().numpy()
        outside = (array < _INT32_RANGE.min) | (array > _INT32_RANGE.max)
        if outside.any():  # a cast would wrap it to another, valid value (2**32 + 7 to class 7)
            where = [int(i) for i in np.argwhere(outside)[0]]
            place = ""
            if counts is not None and array.ndim == 1:
                image = int(np.searchsorted(np.cumsum(counts), where[0], side="right"))
                place = f" (image {image}, box {where[0] - sum(counts[:image])})"
            raise ValueError(f"{name}{where}{place}: {int(array[tuple(where)])} does not fit the wire's int32")
    return values.to("cpu", torch.int32)


_INT32_RANGE = torch.iinfo(torch.int32)
_WITHIN_INT32 = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32)


def _int32(name: str, value: int) -> int:
    """``value`` for an int32 field of the message (protobuf's own refusal names no field)."""
    if not _INT32_RANGE.min <= value <= _INT32_RANGE.max:
        raise ValueError(f"{name}: {value} does not fit the wire's int32")
    return value


def _counts(name: str, counts: Any) -> list[int]:
    if isinstance(counts, (torch.Tensor, np.ndarray)) and counts.ndim != 1:
        raise ValueError(f"{name}: expected shape [B] (one count per image), got {list(counts.shape)}")
    if not isinstance(counts, (torch.Tensor, np.ndarray, Sequence)) or isinstance(counts, (str, bytes)):
        raise TypeError(f"{name}: expected one int per image (a list or a 1-D tensor), got {type(counts).__name__}")
    values = counts.tolist() if isinstance(counts, (torch.Tensor, np.ndarray)) else list(counts)
    if not all(is_integer(v) for v in values):
        raise TypeError(f"{name}: expected integers, got {values!r}")
    return [_int32(f"{name}[{i}]", int(v)) for i, v in enumerate(values)]


# Config fields added since the first release, each with the value that behaves as the
# config did before it: a TargetConfig's JSON leaves them out at that value, so that a
# server from before them (it refuses fields it does not know, by name) still reads
# every config that does not use them, while clients are upgraded first.
_ADDED_FIELDS = {("encode", "symmetric_clamp"): False}


def _wire_dict(config: TargetConfig) -> dict[str, Any]:
    data = config.to_dict()
    for (section, name), before in _ADDED_FIELDS.items():
        if data[section][name] is before:
            del data[section][name]
    return data


def config_ref(preset: str | None, config: Any, overrides: Mapping[str, Any] | None) -> pb.ConfigRef:
    """A ``ConfigRef``: a preset name, or a config (``TargetConfig`` or its dict), plus overrides."""
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset= or config=")
    ref = pb.ConfigRef()
    if preset is not None:
        ref.preset = preset
    else:
        data = config
        if isinstance(config, TargetConfig):
            data = _wire_dict(config)
        elif hasattr(config, "to_dict"):
            data = config.to_dict()
        ref.config_json = json.dumps(data)
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"overrides: keys are dotted field names ('match.high'), got {key!r}")
        try:
            ref.overrides[key] = json.dumps(plain_value(value))  # a config object (AnchorLevel) as its dict
        except (TypeError, ValueError) as exc:  # a numpy scalar, a set: nothing JSON carries
            raise TypeError(f"overrides[{key!r}]: {value!r} cannot travel as JSON ({exc})") from None
    return ref


def level_starts(request: pb.AssignRequest | pb.GetAnchorsRequest) -> tuple[int, ...] | None:
    """The pyramid levels' first anchors (the last entry: the anchor count) of a request's
    targets (``Targets.levels()``), which the wire does not carry: the service's anchors
    are the config's generated ones, so they follow from the config and canvas. None where
    this client cannot resolve the config (a preset of a newer server)."""
    layout = _layout(request)
    return None if layout is None else layout[1]


def _resolved(ref: pb.ConfigRef) -> TargetConfig | None:
    """The config a ``ConfigRef`` names, or None where this client cannot resolve it."""
    return _config(ref.preset, ref.config_json, tuple(sorted(ref.overrides.items())))


@functools.lru_cache(maxsize=64)
def _config(preset: str, config_json: str, overrides: tuple[tuple[str, str], ...]) -> TargetConfig | None:
    try:
        config = presets.get(preset) if preset else TargetConfig.from_dict(json.loads(config_json))
        if overrides:
            config = config.replace(**{name: json.loads(value) for name, value in overrides})
        return config
    except (KeyError, ValueError, TypeError):
        return None


def _layout(request: pb.AssignRequest | pb.GetAnchorsRequest) -> tuple[TargetConfig, tuple[int, ...]] | None:
    """(config, level starts) of a request, or None where this client cannot resolve its config."""
    ref = request.config
    overrides = tuple(sorted(ref.overrides.items()))
    return _config_layout(ref.preset, ref.config_json, overrides, request.canvas_height, request.canvas_width)


@functools.lru_cache(maxsize=64)
def _config_layout(preset: str, config_json: str, overrides: tuple[tuple[str, str], ...], height: int,
                   width: int) -> tuple[TargetConfig, tuple[int, ...]] | None:  # fmt: skip
    # Keyed by the request's strings and ints: hashing a TargetConfig costs more per call.
    config = _config(preset, config_json, overrides)
    if config is None:
        return None
    return config, resolve_grid(config.anchors, (height, width)).level_starts


def build_request(
    gt_boxes: Any,
    gt_counts: Any,
    canvas: Sequence[int],
    *,
    preset: str | None = None,
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    gt_classes: Any = None,
    ignore_boxes: Any = None,
    ignore_counts: Any = None,
    image_sizes: Any = None,
    pad_sizes: Any = None,
    box_format: str = "xyxy",
    drop_invalid: bool = False,
    format: str = "sparse",
    delta_dtype: str = "float32",
    return_classes: bool | None = None,
    return_max_iou: bool = False,
    seed: int | None = None,
    request_id: str = "",
    seeds: torch.Generator | None = None,
) -> pb.AssignRequest:
    """The ``AssignRequest`` for a ragged batch (arguments as ``TargetClient.assign``).
    ``seeds``: where a sampling config's fresh seed is drawn (default: torch's global
    generator; a stream builds its requests on gRPC's thread, so it brings its own)."""
    check_flags(drop_invalid=drop_invalid, return_max_iou=return_max_iou)
    if return_classes is not None:
        check_flags(return_classes=return_classes)
    for name, value in (("preset", preset), ("request_id", request_id)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a mapping of dotted names to values, got {type(overrides).__name__}")
    if format not in _FORMATS:
        raise ValueError(f"format: must be 'sparse' or 'dense', got {format!r}")
    if delta_dtype not in _DELTA_DTYPES:
        raise ValueError(f"delta_dtype: must be 'float32' or 'float16', got {delta_dtype!r}")
    height, width = checked_canvas(canvas)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(
            f"seed: the service takes one int per request (each image's seed derives from it, as with "
            f"assign(seed=int) in-process); got {type(seed).__name__}"
        )
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed: the service takes an int64, in [-2**63, 2**63), got {seed}")
    ref = config_ref(preset, config, overrides)
    if seed is None:
        seed = _fresh_seed_if_sampled(ref, seeds)
    request = pb.AssignRequest(
        request_id=request_id,
        config=ref,
        canvas_height=height,
        canvas_width=width,
        gt_counts=_counts("gt_counts", gt_counts),
        drop_invalid=drop_invalid,
        format=_FORMATS[format],
        delta_dtype=_DELTA_DTYPES[delta_dtype],
        return_classes=gt_classes is not None if return_classes is None else return_classes,
        return_max_iou=return_max_iou,
        seed=None if seed is None else int(seed),  # None leaves it unset
    )
    if image_sizes is not None:
        image_sizes = _ints("image_sizes", image_sizes)
        encode_tensor(image_sizes, request.image_sizes)
    if ignore_counts is not None:
        request.ignore_counts.extend(_counts("ignore_counts", ignore_counts))

    def sizes(name: str, counts_name: str, counts: Sequence[int] | None) -> Callable[[int], torch.Tensor]:
        def of_rows(rows: int) -> torch.Tensor:
            if counts is None:
                raise ValueError(f"{counts_name}: required with {name} (one count per image)")
            return row_sizes(name, rows, counts_name, counts, (height, width), image_sizes)

        return of_rows

    encode_tensor(_boxes("gt_boxes", gt_boxes, box_format, sizes("gt_boxes", "gt_counts", request.gt_counts)),
                  request.gt_boxes)  # fmt: skip
    if gt_classes is not None:
        encode_tensor(_ints("gt_classes", gt_classes, list(request.gt_counts)), request.gt_classes)
    if ignore_boxes is not None:
        counts = request.ignore_counts if ignore_counts is not None else None
        encode_tensor(_boxes("ignore_boxes", ignore_boxes, box_format, sizes("ignore_boxes", "ignore_counts", counts)),
                      request.ignore_boxes)  # fmt: skip
    if pad_sizes is not None:
        encode_tensor(_ints("pad_sizes", pad_sizes), request.pad_sizes)
    return request


def anchors_request(canvas: Sequence[int], preset: str | None, config: Any, overrides) -> pb.GetAnchorsRequest:
    """The ``GetAnchorsRequest`` of ``TargetClient.get_anchors``."""
    height, width = checked_canvas(canvas)
    return pb.GetAnchorsRequest(config=config_ref(preset, config, overrides), canvas_height=height, canvas_width=width)


def decode_anchors(response: pb.GetAnchorsResponse, request: pb.GetAnchorsRequest) -> torch.Tensor:
    """The anchors [A, 4] float32 a ``GetAnchors`` response holds (a view of its bytes),
    as many as the request's config has on its canvas where this client can tell."""
    anchors = _tensor(response.anchors, "anchors", _FLOAT32, ndim=2, last_dim=4)
    starts = level_starts(request)
    if starts is not None and anchors.shape[0] != starts[-1]:
        raise _malformed(f"anchors: {anchors.shape[0]} rows, but the config has {starts[-1]} anchors on the canvas")
    return anchors


def _fresh_seed_if_sampled(ref: pb.ConfigRef, seeds: torch.Generator | None) -> int | None:
    """A fresh seed, drawn in the caller's process (where ``torch.manual_seed`` and a
    DataLoader's per-worker seeding apply, which a seed the server draws would escape), for
    a config that samples; None (unset) otherwise, so requests without sampling stay
    byte-identical. A config this client cannot resolve gets a fresh one too."""
    config = _resolved(ref)
    return fresh_seed(seeds) if config is None or config.match.sample_size > 0 else None


def decode_response(response: pb.AssignResponse, request: pb.AssignRequest | None = None) -> Targets:
    """The ``Targets`` a response holds (densified when SPARSE). ``request``: the request it
    answers, when known. A response that breaks the wire contract (shapes, dtypes, anchor
    indices, labels, matched boxes) or does not answer ``request`` (its images, anchors,
    optional outputs) raises ``ValueError`` ("malformed response: ...") naming the field."""
    batch, count = _checked_header(response, request)
    boxes = _box_counts(request)
    if _kind(response) == "dense":
        dense, rows = response.dense, [batch, count]
        labels = _field(dense.labels, "labels", _INT8, rows, _ROWS)
        matched = _field(dense.matched_gt, "matched_gt", _INT32, rows, _ROWS)
        _check_dense(labels.numpy(), matched.numpy(), boxes)
        deltas = _field(dense.deltas, "deltas", _DELTAS, [*rows, 4], "[batch_size, num_anchors, 4]").float()
        classes = None
        if dense.HasField("classes"):
            classes = _classes(_field(dense.classes, "classes", _INT32, rows, _ROWS), "classes")
    else:
        lists = _SparseLists.of(response, batch, count, boxes)
        labels, matched, deltas, classes = _densify(lists, batch, count, response.background_class)
    max_iou = None
    if response.HasField("max_iou"):
        max_iou = _field(response.max_iou, "max_iou", _FLOAT32, [batch, count], _ROWS)
    return Targets(labels, matched, deltas, classes, max_iou, _dropped(response, boxes), response.background_class,
                   dropped_ignore=_dropped(response, _ignore_counts(request), ignore=True))  # fmt: skip


def decode_sparse(response: pb.AssignResponse, request: pb.AssignRequest | None = None) -> SparseTargets:
    """The ``SparseTargets`` a SPARSE response holds, without densifying (the tensors view
    the response's bytes; ``.to_dense(device=...)`` densifies where the trainer is).
    ``request`` and malformed responses as ``decode_response``.

    When the server listed the negatives (sampling left most anchors ignored), the ignored
    lists are what neither the positives nor the negatives list, found per image; an
    anchor listed as both positive and negative is refused as ``decode_response`` refuses
    it. That no anchor is both positive and ignored (lists the server sent) is checked by
    ``to_dense`` (``SparseTargets.check``)."""
    if _kind(response) != "sparse":
        raise ValueError("decode_sparse: the response holds DENSE targets (request format='sparse')")
    if response.HasField("max_iou"):
        raise ValueError("decode_sparse: the response holds max IoU, which SparseTargets cannot (decode_response)")
    batch, count = _checked_header(response, request)
    boxes = _box_counts(request)
    lists = _SparseLists.of(response, batch, count, boxes)
    if lists.listed_label == IGNORED:
        ignored_offsets, ignored_anchors = lists.listed_offsets, lists.listed_anchors
    else:
        rest = torch.ones(batch * count, dtype=torch.bool, device="cpu")
        positives = _rows(lists.positive_offsets, lists.positive_anchors, count)
        negatives = _rows(lists.listed_offsets, lists.listed_anchors, count)
        rest[positives] = False
        if not rest[negatives].all():  # a positive listed as negative too
            raise _malformed(overlap_problem(positives.numpy(), negatives.numpy(), count, "negative"))
        rest[negatives] = False
        image, anchor = torch.nonzero(rest.view(batch, count), as_tuple=True)
        ignored_offsets = torch.searchsorted(image, torch.arange(batch + 1, device="cpu"))
        ignored_anchors = anchor.to(torch.int32)
    return SparseTargets(
        num_anchors=count,
        positive_offsets=lists.positive_offsets,
        positive_anchors=lists.positive_anchors,
        positive_matched_gt=lists.positive_matched_gt,
        positive_deltas=lists.positive_deltas,
        ignored_offsets=ignored_offsets,
        ignored_anchors=ignored_anchors,
        positive_classes=lists.positive_classes,
        background_class=response.background_class,
        dropped=_dropped(response, boxes),
        dropped_ignore=_dropped(response, _ignore_counts(request), ignore=True),
    )


_INT8, _INT32, _INT64, _FLOAT32 = (torch.int8,), (torch.int32,), (torch.int64,), (torch.float32,)
_DELTAS = (torch.float32, torch.float16)
_ROWS = "[batch_size, num_anchors]"


def _malformed(text: str) -> ValueError:
    """A response that breaks the wire contract: a server bug, never the caller's input."""
    return ValueError(f"malformed response: {text}")


def _kind(response: pb.AssignResponse) -> str:
    """ "dense" or "sparse": which targets the response holds."""
    kind = response.WhichOneof("targets")
    if kind is None:
        raise _malformed("holds no targets (neither dense nor sparse)")
    return kind


def _checked_header(response: pb.AssignResponse, request: pb.AssignRequest | None) -> tuple[int, int]:
    """(batch_size, num_anchors), checked; with the request, also that the response holds
    what it asked for: its images, its config's anchors and background class, and each
    optional output (classes, max IoU, dropped lists) exactly when asked."""
    _kind(response)
    batch, count = response.batch_size, response.num_anchors
    if request is not None and batch != len(request.gt_counts):
        raise _malformed(f"batch_size: {batch}, but the request sent {len(request.gt_counts)} images")
    if batch < 1:
        raise _malformed(f"batch_size: must be >= 1 (a request holds at least one image), got {batch}")
    if count < 1:  # a config has anchors on any canvas; 0 let a few bytes claim billions of images
        raise _malformed(f"num_anchors: must be >= 1 (every config has anchors on its canvas), got {count}")
    layout = None if request is None else _layout(request)
    if layout is None and batch * count > MAX_ANCHOR_ROWS:  # else it is the request's, counted here
        raise _malformed(f"num_anchors: {count} x batch_size {batch} is over the service's {MAX_ANCHOR_ROWS:,} "
                         "anchor rows per request")  # fmt: skip
    if request is None:
        if len(response.dropped) not in (0, batch):
            raise _malformed(f"dropped: {len(response.dropped)} lists, expected none or one per image ({batch})")
        return batch, count
    if layout is not None:
        config, anchors = layout[0], layout[1][-1]
        if count != anchors:
            raise _malformed(f"num_anchors: {count}, but the request's config has {anchors} anchors on its canvas")
        if response.background_class != config.background_class:
            raise _malformed(f"background_class: {response.background_class}, but the request's config has "
                             f"{config.background_class}")  # fmt: skip
    holds_classes = response.dense.HasField("classes") or response.sparse.HasField("positive_classes")
    for field, asked, held in (
        ("classes", request.return_classes, holds_classes),
        ("max_iou", request.return_max_iou, response.HasField("max_iou")),
        ("dropped", request.drop_invalid, len(response.dropped) > 0),
    ):
        if held != asked:
            whether = "missing, but the request asked for it" if asked else "sent, but the request did not ask for it"
            raise _malformed(f"{field}: {whether}")
    if request.drop_invalid and len(response.dropped) != batch:
        raise _malformed(f"dropped: {len(response.dropped)} lists, expected one per image ({batch})")
    return batch, count


def _box_counts(request: pb.AssignRequest | None) -> list[int] | None:
    """Each image's boxes (what its matched indices must stay below), when the request is known."""
    return None if request is None else list(request.gt_counts)


def _ignore_counts(request: pb.AssignRequest | None) -> list[int] | None:
    """Each image's ignore regions, when the request is known."""
    return None if request is None else list(request.ignore_counts) or [0] * len(request.gt_counts)


def _field(message: pb.Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: list[int], dims: str) -> torch.Tensor:
    """A response tensor of one of ``dtypes`` and exactly ``shape`` (``dims`` names its
    dimensions, for the error): a view of its bytes."""
    if message.shape != shape:
        raise _malformed(f"{name}: shape {list(message.shape)}, expected {dims} = {shape}")
    return _tensor(message, name, dtypes)


def _tensor(message: pb.Tensor, name: str, dtypes: tuple[torch.dtype, ...], **expected) -> torch.Tensor:
    """``decode_tensor``, its errors as a malformed response's."""
    try:
        return decode_tensor(message, name, dtypes=dtypes, **expected)
    except TensorError as error:
        raise _malformed(str(error)) from None


def _classes(classes: torch.Tensor, name: str) -> torch.Tensor:
    """``classes``, refused where one is negative (a request's classes, and the background
    class, are 0 to 2**31 - 1)."""
    if classes.numel() and int(classes.min()) < 0:
        where = tuple(int(i) for i in np.argwhere(classes.numpy() < 0)[0])
        at = f"image {where[0]}, anchor {where[1]}" if len(where) == 2 else f"positive {where[0]}"
        raise _malformed(f"{name}: {at}: class {int(classes[where])} (expected 0 to 2147483647)")
    return classes


def _check_dense(labels: np.ndarray, matched: np.ndarray, boxes: np.ndarray | None) -> None:
    """Labels are POSITIVE, NEGATIVE or IGNORED; a positive anchor has a matched box, and
    every matched box is -1 or one of its image's (when the request is known; configs that
    keep every anchor's best box give one to anchors not positive too)."""
    if labels.size == 0:
        return
    if labels.min() < IGNORED or labels.max() > POSITIVE:
        image, anchor = np.argwhere((labels < IGNORED) | (labels > POSITIVE))[0]
        raise _malformed(f"labels: image {image}, anchor {anchor}: label {labels[image, anchor]} "
                         f"(expected {POSITIVE}, {NEGATIVE} or {IGNORED})")  # fmt: skip
    limit = np.iinfo(np.int32).max if boxes is None else np.array(boxes)[:, None]
    wrong = ((labels == POSITIVE) & (matched < 0)) | (matched < -1) | (matched >= limit)
    if wrong.any():
        image, anchor = np.argwhere(wrong)[0]
        raise _malformed(_bad_match(image, anchor, labels[image, anchor], matched[image, anchor], boxes))


def _bad_match(image: int, anchor: int, label: int, box: int, boxes: list[int] | None) -> str:
    of = "" if boxes is None else f" of its {boxes[image]}"
    return f"matched_gt: image {image}, anchor {anchor} (label {label}) matches box {box}{of}"


def _dropped(response: pb.AssignResponse, boxes: list[int] | None, ignore: bool = False) -> list[torch.Tensor]:
    """Each image's dropped box (``ignore``: ignore region) indices: ascending, each one
    of its image's ``boxes`` (when the request is known)."""
    if not response.dropped:
        return nothing_dropped(response.batch_size)
    what = "ignore regions" if ignore else "boxes"
    dropped = []
    for image, lst in enumerate(response.dropped):
        indices = np.array(lst.ignore_box_index if ignore else lst.box_index, dtype=np.int64)
        limit = np.iinfo(np.int64).max if boxes is None else boxes[image]
        if indices.size and (indices[0] < 0 or indices[-1] >= limit or (np.diff(indices) <= 0).any()):
            of = "" if boxes is None else f" (of {limit} {what})"
            raise _malformed(f"dropped: image {image} lists {what} {indices.tolist()}{of}; expected ascending "
                             f"indices of its {what}")  # fmt: skip
        dropped.append(torch.from_numpy(indices))
    return dropped


@dataclass
class _SparseLists:
    """A SPARSE response's lists, checked: offsets start at 0, never decrease and end at
    their list's length; anchors are in [0, num_anchors) and ascending within each image;
    the positives' boxes, deltas and classes have one row per positive, each matched box
    one of its image's; the two labels are NEGATIVE and IGNORED. A few array operations
    per list, whatever its length: the client decodes thousands of responses a second.
    That no anchor is both positive and listed is checked where the lists are densified
    (``_densify``, ``SparseTargets.to_dense``): there it costs one gather."""

    positive_offsets: torch.Tensor
    positive_anchors: torch.Tensor
    positive_matched_gt: torch.Tensor
    positive_deltas: torch.Tensor
    positive_classes: torch.Tensor | None
    listed_label: int
    listed_offsets: torch.Tensor
    listed_anchors: torch.Tensor
    unlisted_label: int

    @classmethod
    def of(cls, response: pb.AssignResponse, batch: int, count: int, boxes: np.ndarray | None) -> _SparseLists:
        sparse = response.sparse
        labels = (sparse.listed_label, sparse.unlisted_label)
        if set(labels) != {NEGATIVE, IGNORED}:
            raise _malformed(
                f"listed_label and unlisted_label: expected one NEGATIVE ({NEGATIVE}) and one IGNORED ({IGNORED}), "
                f"got {labels[0]} and {labels[1]}"
            )
        positive_offsets, positive_anchors = _csr(sparse, "positive", batch, count)
        listed_offsets, listed_anchors = _csr(sparse, "listed", batch, count)
        positives, one_each = [positive_anchors.shape[0]], "one per positive anchor"
        matched = _field(sparse.positive_matched_gt, "positive_matched_gt", _INT32, positives, one_each)
        _check_matched(matched.numpy(), positive_offsets.tolist(), boxes)
        classes = None
        if sparse.HasField("positive_classes"):
            classes = _classes(_field(sparse.positive_classes, "positive_classes", _INT32, positives, one_each),
                               "positive_classes")  # fmt: skip
        return cls(
            positive_offsets=positive_offsets,
            positive_anchors=positive_anchors,
            positive_matched_gt=matched,
            positive_deltas=_field(sparse.positive_deltas, "positive_deltas", _DELTAS, [*positives, 4], one_each),
            positive_classes=classes,
            listed_label=sparse.listed_label,
            listed_offsets=listed_offsets,
            listed_anchors=listed_anchors,
            unlisted_label=sparse.unlisted_label,
        )


def _csr(sparse: pb.SparseTargets, which: str, batch: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One CSR list (offsets, anchors), checked."""
    offsets = _field(getattr(sparse, f"{which}_offsets"), f"{which}_offsets", _INT64, [batch + 1],
                     "[batch_size + 1]")  # fmt: skip
    message = getattr(sparse, f"{which}_anchors")
    anchors = _tensor(message, f"{which}_anchors", _INT32, ndim=1)
    # numpy costs less per operation than torch (the same bytes).
    problem = csr_problem(which, offsets.tolist(), anchors.numpy(), count)
    if problem is not None:
        raise _malformed(problem)
    return offsets, anchors


def _rows(offsets: torch.Tensor, anchors: torch.Tensor, count: int) -> torch.Tensor:
    """Row of each CSR entry in a flattened [B * A] array (ascending: the lists are checked)."""
    return torch.from_numpy(csr_rows(offsets.numpy(), anchors.numpy(), count))


def _check_matched(matched: np.ndarray, ends: list[int], boxes: list[int] | None) -> None:
    """Each positive's matched box is one of its image's (>= 0 when the request is not known).
    As unsigned, a negative box is past every limit: one maximum per image, taken together
    over the images with positives (``reduceat``: each one's run ends where the next starts)."""
    if not matched.size:
        return
    unsigned = matched.view(np.uint32)
    if boxes is None:
        boxes = [np.iinfo(np.int32).max + 1] * (len(ends) - 1)
    starts = [start for start, end in zip(ends, ends[1:]) if end > start]
    limits = [limit for start, end, limit in zip(ends, ends[1:], boxes) if end > start]
    if (np.maximum.reduceat(unsigned, starts) < limits).all():
        return
    image = next(i for i, (start, end) in enumerate(zip(ends, ends[1:])) if (unsigned[start:end] >= boxes[i]).any())
    box = matched[ends[image] : ends[image + 1]][unsigned[ends[image] : ends[image + 1]] >= boxes[image]][0]
    of = f" of its {boxes[image]}" if boxes[image] <= np.iinfo(np.int32).max else ""
    raise _malformed(f"positive_matched_gt: a positive of image {image} matches box {box}{of}")


def _densify(lists: _SparseLists, batch: int, count: int, background: int):
    host = torch.device("cpu")
    positives = _rows(lists.positive_offsets, lists.positive_anchors, count)
    labels = filled((batch, count), lists.unlisted_label, torch.int8, host)
    listed = _rows(lists.listed_offsets, lists.listed_anchors, count)
    labels.view(-1)[listed] = lists.listed_label
    if (labels.view(-1)[positives] != lists.unlisted_label).any():  # a positive listed too
        name = "ignored" if lists.listed_label == IGNORED else "negative"
        raise _malformed(overlap_problem(positives.numpy(), listed.numpy(), count, name))
    labels.view(-1)[positives] = POSITIVE
    matched = filled((batch, count), -1, torch.int32, host)
    matched.view(-1)[positives] = lists.positive_matched_gt
    deltas = filled((batch, count, 4), 0, torch.float32, host)
    deltas.view(-1, 4).index_copy_(0, positives, lists.positive_deltas.float())
    classes = None
    if lists.positive_classes is not None:
        classes = filled((batch, count), background, torch.int32, host)
        classes.view(-1)[positives] = lists.positive_classes
    return labels, matched, deltas, classes
