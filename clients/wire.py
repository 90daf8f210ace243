"""Client side of the wire format: requests from tensors, ``Targets`` from responses.

Boxes may be given as ``xyxy`` (the wire format), ``xywh`` or ``cxcywh`` pixels;
they are converted here, at the edge. DENSE responses decode without copying
(the tensors view the response's bytes; float16 deltas are widened to float32);
SPARSE responses are densified.
"""

from __future__ import annotations

import functools
import json
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tritarget.kernels import TargetConfig, presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.kernels.problem import integer_dtype
from tritarget.kernels.sampling import fresh_seed
from tritarget.kernels.targets import IGNORED, NEGATIVE, NOTHING_DROPPED, POSITIVE, SparseTargets, Targets, filled
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import TensorError, decode_tensor, encode_tensor

__all__ = ["BOX_FORMATS", "build_request", "to_xyxy", "config_ref", "decode_response", "decode_sparse", "level_starts"]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
_FORMATS = {"sparse": pb.FORMAT_SPARSE, "dense": pb.FORMAT_DENSE}
_DELTA_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


def to_xyxy(boxes: torch.Tensor, box_format: str) -> torch.Tensor:
    """``boxes`` [N, 4] of ``box_format`` (one of ``BOX_FORMATS``) as xyxy corners."""
    if box_format == "xyxy":
        return boxes
    if box_format == "xywh":
        x, y, w, h = boxes.unbind(-1)
        return torch.stack([x, y, x + w, y + h], dim=-1)
    if box_format == "cxcywh":
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    raise ValueError(f"box_format: must be one of {', '.join(BOX_FORMATS)}; got {box_format!r}")


def _boxes(name: str, boxes: Any, box_format: str) -> torch.Tensor:
    if box_format == "xyxy" and _is_cpu_tensor(boxes, torch.float32) and boxes.dim() == 2 and boxes.shape[1] == 4:
        return boxes  # already what the wire holds: no torch op (a call's own cost is the caller's CPU)
    boxes = torch.as_tensor(boxes)
    if boxes.is_complex():
        raise TypeError(f"{name}: expected real coordinates, got {boxes.dtype}")
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    return to_xyxy(boxes.detach().to("cpu", torch.float32), box_format).to(torch.float32)


def _is_cpu_tensor(value: Any, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == dtype and value.is_cpu


def _canvas(canvas: Any) -> tuple[int, int]:
    """Two ints, as in-process ``assign`` takes them (a float side would be truncated);
    their values are the server's to check (its errors name canvas_height / canvas_width)."""
    if not isinstance(canvas, (tuple, list)) or len(canvas) != 2:
        raise TypeError(f"canvas: expected (height, width), got {canvas!r}")
    if not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in canvas):
        raise TypeError(f"canvas: expected two ints (height, width), got {canvas!r}")
    return int(canvas[0]), int(canvas[1])


def _ints(name: str, value: Any) -> torch.Tensor:
    """int32 on the host, as the wire holds classes and sizes; other values refused as
    in-process ``assign`` refuses them (a float class would be truncated to another)."""
    if _is_cpu_tensor(value, torch.int32):
        return value
    values = torch.as_tensor(value)
    if not integer_dtype(values.dtype):
        raise TypeError(f"{name}: expected integers, got {values.dtype}")
    return values.to("cpu", torch.int32)


def _counts(name: str, counts: Any) -> list[int]:
    values = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name}: expected integers, got {values!r}")
    return [int(v) for v in values]


def config_ref(preset: str | None, config: Any, overrides: Mapping[str, Any] | None) -> pb.ConfigRef:
    """A ``ConfigRef``: a preset name, or a config (``TargetConfig`` or its dict), plus overrides."""
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset= or config=")
    ref = pb.ConfigRef()
    if preset is not None:
        ref.preset = preset
    else:
        data = config.to_dict() if hasattr(config, "to_dict") else config
        ref.config_json = json.dumps(data)
    for key, value in (overrides or {}).items():
        ref.overrides[key] = json.dumps(value)
    return ref


def level_starts(request: pb.AssignRequest, num_anchors: int) -> tuple[int, ...] | None:
    """The pyramid levels' first anchors of a request's targets (``Targets.levels()``),
    which the wire does not carry: the service's anchors are the config's generated ones,
    so they follow from the config and canvas. None where this client cannot resolve the
    config (a preset of a newer server) or its count disagrees with the response's."""
    config = _resolved(request.config)
    if config is None:
        return None
    starts = _level_starts(config, request.canvas_height, request.canvas_width)
    return starts if starts[-1] == num_anchors else None


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


@functools.lru_cache(maxsize=64)
def _level_starts(config: TargetConfig, height: int, width: int) -> tuple[int, ...]:
    return resolve_grid(config.anchors, (height, width)).level_starts


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
) -> pb.AssignRequest:
    """The ``AssignRequest`` for a ragged batch (arguments as ``TargetClient.assign``)."""
    if format not in _FORMATS:
        raise ValueError(f"format: must be 'sparse' or 'dense', got {format!r}")
    if delta_dtype not in _DELTA_DTYPES:
        raise ValueError(f"delta_dtype: must be 'float32' or 'float16', got {delta_dtype!r}")
    height, width = _canvas(canvas)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(
            f"seed: the service takes one int per request (each image's seed derives from it, as with "
            f"assign(seed=int) in-process); got {type(seed).__name__}"
        )
    ref = config_ref(preset, config, overrides)
    if seed is None:
        seed = _fresh_seed_if_sampled(ref)
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
        seed=int(seed),
    )
    encode_tensor(_boxes("gt_boxes", gt_boxes, box_format), request.gt_boxes)
    if gt_classes is not None:
        encode_tensor(_ints("gt_classes", gt_classes), request.gt_classes)
    if ignore_boxes is not None:
        encode_tensor(_boxes("ignore_boxes", ignore_boxes, box_format), request.ignore_boxes)
    if ignore_counts is not None:
        request.ignore_counts.extend(_counts("ignore_counts", ignore_counts))
    if image_sizes is not None:
        encode_tensor(_ints("image_sizes", image_sizes), request.image_sizes)
    if pad_sizes is not None:
        encode_tensor(_ints("pad_sizes", pad_sizes), request.pad_sizes)
    return request


def _fresh_seed_if_sampled(ref: pb.ConfigRef) -> int:
    """A fresh seed, drawn in the caller's process (where ``torch.manual_seed`` and a
    DataLoader's per-worker seeding apply), for a config that samples; 0 otherwise, so
    requests without sampling stay byte-identical. A config this client cannot resolve
    gets a fresh one too."""
    config = _resolved(ref)
    return fresh_seed() if config is None or config.match.sample_size > 0 else 0


def decode_response(response: pb.AssignResponse, images: int | None = None) -> Targets:
    """The ``Targets`` a response holds (densified when SPARSE). ``images``: how many the
    request sent, when known. A response that breaks the wire contract (shapes, dtypes,
    anchor indices, labels) raises ``ValueError`` ("malformed response: ...") naming the field."""
    batch, count = _checked_header(response, images)
    if _kind(response) == "dense":
        dense, rows = response.dense, [batch, count]
        labels = _field(dense.labels, "labels", _INT8, rows, _ROWS)
        matched = _field(dense.matched_gt, "matched_gt", _INT32, rows, _ROWS)
        deltas = _field(dense.deltas, "deltas", _DELTAS, [*rows, 4], "[batch_size, num_anchors, 4]").float()
        classes = _field(dense.classes, "classes", _INT32, rows, _ROWS) if dense.HasField("classes") else None
    else:
        labels, matched, deltas, classes = _densify(
            _SparseLists.of(response, batch, count), batch, count, response.background_class
        )
    max_iou = None
    if response.HasField("max_iou"):
        max_iou = _field(response.max_iou, "max_iou", _FLOAT32, [batch, count], _ROWS)
    dropped = [torch.tensor(list(d.box_index), dtype=torch.int64) for d in response.dropped]
    if not dropped:
        dropped = [NOTHING_DROPPED] * batch
    return Targets(labels, matched, deltas, classes, max_iou, dropped, response.background_class)


def decode_sparse(response: pb.AssignResponse, images: int | None = None) -> SparseTargets:
    """The ``SparseTargets`` a SPARSE response holds, without densifying (the tensors view
    the response's bytes; ``.to_dense(device=...)`` densifies where the trainer is).
    ``images`` and malformed responses as ``decode_response``.

    When the server listed the negatives (sampling left most anchors ignored), the ignored
    lists are what neither the positives nor the negatives list, found per image."""
    if _kind(response) != "sparse":
        raise ValueError("decode_sparse: the response holds DENSE targets (request format='sparse')")
    if response.HasField("max_iou"):
        raise ValueError("decode_sparse: the response holds max IoU, which SparseTargets cannot (decode_response)")
    batch, count = _checked_header(response, images)
    lists = _SparseLists.of(response, batch, count)
    if lists.listed_label == IGNORED:
        ignored_offsets, ignored_anchors = lists.listed_offsets, lists.listed_anchors
    else:
        rest = torch.ones(batch * count, dtype=torch.bool)
        rest[_rows(lists.positive_offsets, lists.positive_anchors, count)] = False
        rest[_rows(lists.listed_offsets, lists.listed_anchors, count)] = False
        image, anchor = torch.nonzero(rest.view(batch, count), as_tuple=True)
        ignored_offsets = torch.searchsorted(image, torch.arange(batch + 1))
        ignored_anchors = anchor.to(torch.int32)
    dropped = [torch.tensor(list(d.box_index), dtype=torch.int64) for d in response.dropped]
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
        dropped=dropped or [NOTHING_DROPPED] * batch,
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


def _checked_header(response: pb.AssignResponse, images: int | None) -> tuple[int, int]:
    """(batch_size, num_anchors), checked against the request and the dropped lists."""
    batch, count = response.batch_size, response.num_anchors
    if images is not None and batch != images:
        raise _malformed(f"batch_size: {batch}, but the request sent {images} images")
    if batch < 1:
        raise _malformed(f"batch_size: must be >= 1 (a request holds at least one image), got {batch}")
    if count < 0:
        raise _malformed(f"num_anchors: must be >= 0, got {count}")
    if len(response.dropped) not in (0, batch):
        raise _malformed(f"dropped: {len(response.dropped)} lists, expected none or one per image ({batch})")
    return batch, count


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


@dataclass
class _SparseLists:
    """A SPARSE response's lists, checked: offsets start at 0, never decrease and end at
    their list's length; anchors are in [0, num_anchors) and ascending within each image;
    the positives' boxes, deltas and classes have one row per positive; the two labels
    are NEGATIVE and IGNORED. A few array operations per list, whatever its length: the
    client decodes thousands of responses a second."""

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
    def of(cls, response: pb.AssignResponse, batch: int, count: int) -> _SparseLists:
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
        classes = None
        if sparse.HasField("positive_classes"):
            classes = _field(sparse.positive_classes, "positive_classes", _INT32, positives, one_each)
        return cls(
            positive_offsets=positive_offsets,
            positive_anchors=positive_anchors,
            positive_matched_gt=_field(sparse.positive_matched_gt, "positive_matched_gt", _INT32, positives, one_each),
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
    ends, size = offsets.tolist(), anchors.shape[0]
    if ends[0] != 0 or ends[-1] != size or any(map(operator.gt, ends, ends[1:])):
        raise _malformed(f"{which}_offsets: must start at 0, never decrease and end at {size} (the {which} anchors); "
                         f"got {ends}")  # fmt: skip
    if size:
        # Ascending within each image: an anchor may be at most its predecessor only where
        # an image starts. In [0, A): as unsigned, a negative anchor is out of range too
        # (one outside would land in another image's row). numpy on the message's bytes
        # costs less per operation than torch on its view.
        indices = np.frombuffer(message.data, np.int32)
        descents = (indices[1:] <= indices[:-1]).nonzero()[0].tolist()
        starts = set(ends[1:-1])
        if indices.view(np.uint32).max() >= count or not all(i + 1 in starts for i in descents):
            raise _malformed(_bad_anchor(which, ends, indices, count))
    return offsets, anchors


def _bad_anchor(which: str, ends: list[int], indices: np.ndarray, count: int) -> str:
    """What is wrong with the first bad anchor of a list (only when there is one)."""
    image = np.repeat(np.arange(len(ends) - 1), np.diff(ends))
    outside = np.flatnonzero((indices < 0) | (indices >= count))
    if outside.size:
        i = outside[0]
        return f"{which}_anchors: image {image[i]} lists anchor {indices[i]}, outside [0, num_anchors={count})"
    i = np.flatnonzero((np.diff(indices) <= 0) & (image[1:] == image[:-1]))[0] + 1
    return f"{which}_anchors: image {image[i]} lists anchor {indices[i]} after {indices[i - 1]} (must ascend)"


def _rows(offsets: torch.Tensor, anchors: torch.Tensor, count: int) -> torch.Tensor:
    """Row of each CSR entry in a flattened [B * A] array."""
    image = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets.numpy()))
    return torch.from_numpy(image * count + anchors.numpy())


def _densify(lists: _SparseLists, batch: int, count: int, background: int):
    host = torch.device("cpu")
    positives = _rows(lists.positive_offsets, lists.positive_anchors, count)
    labels = filled((batch, count), lists.unlisted_label, torch.int8, host)
    labels.view(-1)[_rows(lists.listed_offsets, lists.listed_anchors, count)] = lists.listed_label
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
