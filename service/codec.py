"""Messages <-> domain objects: requests into ``AssignJob``s, ``Targets`` into responses.

Every limit is checked here from the request's declared sizes, before anything is
allocated (``ResourceExhausted``); malformed fields raise ``InvalidInput`` naming
the field. No grpc here, only the generated messages.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from tritarget.kernels import AnchorConfig, SparseTargets, TargetConfig, Targets, presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.kernels.problem import image_and_box
from tritarget.kernels.targets import IGNORED, NEGATIVE, POSITIVE
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import MAX_ANCHOR_ROWS, TensorError, decode_tensor, encode_tensor

from .backend import AssignJob
from .errors import InvalidInput, NotFound, ResourceExhausted, invalid_from_exception

__all__ = [
    "Limits",
    "resolve_config",
    "decode_assign",
    "encode_assign",
    "anchors_request",
    "encode_anchors",
    "list_presets",
    "lenient_deserializer",
    "check_response_size",
    "dense_response_bytes",
]

_MIB = 1 << 20
_INT32_MAX = 2**31 - 1
# A TargetConfig nests four levels (config, anchors, levels, a level's sizes); deeper JSON
# is refused by name rather than left to the parser's or the config code's recursion.
_JSON_DEPTH = 32
_NAME_CHARS = 64  # of an unknown preset's name, quoted back


@dataclass(frozen=True)
class Limits:
    """Per-request limits (RESOURCE_EXHAUSTED beyond them).

    ``max_message_bytes`` bounds responses on the wire (checked before computing when
    their size is known in advance, which it is for DENSE); requests are bounded by what
    the other limits let them hold (``max_request_bytes``, which gRPC enforces).
    ``max_unsent_bytes`` bounds the responses in memory that their callers have not read
    yet (one response always fits; a stream's request waits for room under it).
    """

    max_message_bytes: int = 256 * _MIB
    max_images: int = 256
    max_boxes: int = 100_000
    max_canvas_side: int = 8192
    # images x anchors per request: bounds the [B, A] outputs.
    max_anchor_rows: int = MAX_ANCHOR_ROWS
    # config_json plus every override's key and value: a real config is ~1 KB.
    max_config_bytes: int = 64 << 10
    # Overrides per request: a config has 23 fields (more with per-level values). Each costs
    # its own check when they are refused (~0.5 ms on the event loop, to name the culprit):
    # 8,000 within the size limit held the server for 27 s.
    max_overrides: int = 64
    # Responses built and not yet taken by their callers, all calls together, in bytes on
    # the wire: a caller that never reads held each of its responses (up to
    # max_message_bytes from a 62-byte request), and 8 of them pinned 5 GB. Callers that
    # read hold theirs for as long as sending takes: 4 GiB is ~100 8-image DENSE responses
    # on their way. The process holds a waiting response about twice over (its
    # serialization and gRPC's send buffer): ~2x its bytes in RSS for unary calls whose
    # callers did not read, 1.6x for streams (benchmarks/bench_unsent_memory.py).
    max_unsent_bytes: int = 4 << 30

    @property
    def max_request_bytes(self) -> int:
        """Bytes a request may take on the wire: twice what the largest one the other
        limits allow takes (``max_boxes`` boxes with int64 classes and as many crowd
        regions, ``max_images`` counts, image and pad sizes, a config of
        ``max_config_bytes``), so that a request somewhat past a limit still reaches the
        servicer and is refused by name, plus a MiB for its id and framing: 8.8 MiB with
        the defaults, and never more than ``max_message_bytes``. gRPC refuses a bigger one
        before any handler sees it. Requests shared the responses' 256 MiB before: padding
        in a field the server does not know took 1.1 GB of server memory per call, whose
        token was refused too, and the process kept it."""
        boxes = self.max_boxes * (16 + 8 + 16)
        images = self.max_images * (2 * 5 + 2 * 2 * 8)
        return min(self.max_message_bytes, 2 * (boxes + images + self.max_config_bytes) + _MIB)


def _invalid(field: str, description: str) -> InvalidInput:
    return InvalidInput(f"{field}: {description}", [(field, description)])


class UndecodableRequest:
    """What the server's deserializer hands the servicer for bytes that are not a valid
    message: the call then fails INVALID_ARGUMENT (in a stream: that item only) instead
    of gRPC's UNKNOWN with a traceback in the log."""

    request_id = ""

    def __init__(self, message_type: str, raw: bytes) -> None:
        self.message_type = message_type
        self.size = len(raw)

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf message method the servicer's metrics call
        return self.size

    def error(self) -> InvalidInput:
        return _invalid("request", f"{self.size} bytes that do not parse as a {self.message_type} message")


def lenient_deserializer(message_class) -> Callable[[bytes], Any]:
    """``message_class.FromString`` that returns an ``UndecodableRequest`` instead of raising."""

    def deserialize(raw: bytes):
        try:
            return message_class.FromString(raw)
        except DecodeError:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, raw)

    return deserialize


def decoded(request):
    """``request`` as parsed, refused (``InvalidInput``) where its bytes did not parse or it
    holds a field this server does not know."""
    if isinstance(request, UndecodableRequest):
        raise request.error()
    _known_fields_only(request, "request")
    return request


# The wire types' names, for an unknown field's error.
_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group", 4: "group end", 5: "32-bit"}


def _known_fields_only(message, path: str) -> None:
    """Refuse a field this server's proto does not have, or a known one sent with another
    wire type. Parsing keeps such fields aside, and the request was answered as though
    they were unset: a newer client's option (``pad_sizes`` was field 17, added later)
    ignored by an older server gave other targets than asked for, and no error. New request
    fields are added so that unset means the old behaviour: a newer client that does not
    use one sends nothing an older server refuses."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        field = unknown[0]
        kind = _WIRE_TYPES.get(field.wire_type, f"wire type {field.wire_type}")
        known = message.DESCRIPTOR.fields_by_number.get(field.field_number)
        if known is not None:
            raise _invalid(f"{path}.{known.name}" if path != "request" else known.name,
                           f"sent as {kind} (field number {field.field_number}), not as its type is")  # fmt: skip
        owner = message.DESCRIPTOR.full_name
        raise _invalid(path, f"field number {field.field_number} ({kind}) is not one of {owner}'s on this server: "
                             "a client built for a newer version? Update the server, or leave the option "
                             "unset")  # fmt: skip
    for name, repeated in _message_fields(message.DESCRIPTOR):
        if repeated:
            for index, item in enumerate(getattr(message, name)):
                _known_fields_only(item, f"{name}[{index}]")
        elif message.HasField(name):
            _known_fields_only(getattr(message, name), name)


@functools.cache
def _message_fields(descriptor) -> tuple[tuple[str, bool], ...]:
    """A message's fields that hold messages, and whether each is repeated: not its scalars,
    nor a map of strings (``ConfigRef.overrides``). Looked up by name (2.4 us a request)
    rather than walking ``ListFields()`` (5.7 us)."""
    return tuple((field.name, field.is_repeated) for field in descriptor.fields
                 if field.message_type is not None and not field.message_type.GetOptions().map_entry)  # fmt: skip


def _enum(request, field: str, enum, allowed: tuple[int, ...]) -> None:
    """Refuse enum values this server does not know (proto3 keeps them as plain ints)."""
    value = getattr(request, field)
    if value not in allowed:
        names = ", ".join(enum.Name(v) for v in allowed if v)
        given = enum.Name(value) if value in enum.values() else f"unknown value {value}"
        raise _invalid(field, f"must be one of {names} (or unset); got {given}")


@functools.lru_cache(maxsize=256)
def _config_from(preset: str, config_json: str, overrides: tuple[tuple[str, str], ...]) -> TargetConfig:
    if preset:
        try:
            config = presets.get(preset)
        except KeyError:
            raise NotFound(
                f"config.preset: unknown preset {_clipped(preset)}; known presets: {', '.join(presets.names())}"
            ) from None
    elif config_json:
        data = _json("config.config_json", config_json)
        try:
            config = TargetConfig.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise _config_error(exc, "config.config_json") from None
    else:
        raise _invalid("config", "set either preset or config_json")
    if overrides:
        values = {}
        for key, text in overrides:
            values[key] = _json(f"config.overrides[{key}]", text)
        try:
            config = config.replace(**values)
        except (ValueError, TypeError) as exc:
            raise _override_error(config, values, exc) from None
    return config


def _clipped(name: str) -> str:
    """A caller's name quoted back: its start, and how much more there was."""
    more = len(name) - _NAME_CHARS
    return f"{name[:_NAME_CHARS]!r}" + (f" ({more} more characters)" if more > 0 else "")


# The config classes name themselves in their messages ("MatchConfig.high: ..."); a caller
# wrote the path in its JSON or its override key ("match.high").
_CONFIG_PATHS = {"TargetConfig": "", "AnchorConfig": "anchors", "MatchConfig": "match", "EncodeConfig": "encode"}


def _config_path(text: str) -> tuple[str, str]:
    """(path in the caller's config, description) of a config class's message; an empty
    path where it names no field of the config."""
    name, sep, description = text.partition(": ")
    head, _, rest = name.partition(".")
    if not sep or " " in name or head not in _CONFIG_PATHS:
        return "", text
    return ".".join(part for part in (_CONFIG_PATHS[head], rest) if part), description


def _config_error(exc: Exception, field: str) -> InvalidInput:
    path, description = _config_path(str(exc))
    return _invalid(f"{field}.{path}" if path else field, description)


def _override_error(config: TargetConfig, values: dict[str, Any], exc: Exception) -> InvalidInput:
    """The refusal of ``values`` as overrides of ``config``, named by the caller's key
    where one key alone is refused for the same reason (not the config class's field); as
    the overrides together otherwise (a value valid only beside the others, keys that
    overlap)."""
    for key, value in values.items():
        try:
            config.replace(**{key: value})
        except (ValueError, TypeError) as alone:
            if str(alone) == str(exc):
                path, description = _config_path(str(alone))
                return _invalid(f"config.overrides[{key}]", f"{path}: {description}" if path else description)
    return _config_error(exc, "config.overrides")


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refused where a key repeats: json keeps the last value, which
    would drop the other without a word (as overlapping overrides would)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def _json(field: str, text: str) -> Any:
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
        deep = _depth_exceeds(value, _JSON_DEPTH)
    except _RepeatedKey as exc:
        raise _invalid(field, f"the key {_clipped(exc.args[0])} appears twice in one object; give it once") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise _invalid(field, f"not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses once per level; where it stops depends on the Python
        deep = True
    if deep:
        raise _invalid(field, f"JSON nested too deeply (more than {_JSON_DEPTH} levels)")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest more than ``limit`` levels (walked without recursion,
    so the config code that recurses over the value never meets a deep one)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def resolve_config(ref: pb.ConfigRef, limits: Limits) -> TargetConfig:
    """The ``TargetConfig`` a request names (cached: data loaders repeat theirs)."""
    overrides = ref.overrides
    size = len(ref.config_json) + len(ref.preset)  # a preset's name too: it is hashed, and quoted when unknown
    if overrides:  # most requests have none: walking an empty map still costs microseconds
        if len(overrides) > limits.max_overrides:
            raise ResourceExhausted(
                f"config.overrides: {len(overrides)} overrides is over the server's limit of {limits.max_overrides}; "
                "give a config_json for a config that far from its preset"
            )
        size += sum(len(k) + len(v) for k, v in overrides.items())
    if size > limits.max_config_bytes:
        raise ResourceExhausted(
            f"config: preset, config_json and overrides are {size} characters, over the server's limit of "
            f"{limits.max_config_bytes}"
        )
    source = ref.WhichOneof("source")
    preset = ref.preset if source == "preset" else ""
    config_json = ref.config_json if source == "config_json" else ""
    return _config_from(preset, config_json, tuple(sorted(overrides.items())) if overrides else ())


def _canvas(height: int, width: int, limits: Limits) -> tuple[int, int]:
    for name, side in (("canvas_height", height), ("canvas_width", width)):
        if side <= 0:
            raise _invalid(name, f"must be positive, got {side}")
        if side > limits.max_canvas_side:
            raise ResourceExhausted(f"{name}: {side} is over the server's limit of {limits.max_canvas_side} pixels")
    return height, width


def _num_anchors(config: TargetConfig, canvas: tuple[int, int]) -> int:
    """Anchor count from the per-level grid (no [A, 4] tensor is built)."""
    try:
        return _anchor_count(config.anchors, canvas)
    except (ValueError, TypeError) as exc:
        raise invalid_from_exception(exc) from None


@functools.lru_cache(maxsize=256)
def _anchor_count(anchors: AnchorConfig, canvas: tuple[int, int]) -> int:
    return resolve_grid(anchors, canvas).num_anchors  # data loaders repeat their config and canvas


def _counts(values, field: str) -> list[int]:
    counts = list(values)
    for i, c in enumerate(counts):
        if c < 0:
            raise _invalid(field, f"image {i}: negative count {c}")
    return counts


def _tensor(message: pb.AssignRequest, name: str, **expect) -> torch.Tensor | None:
    if not message.HasField(name):
        return None
    try:
        return decode_tensor(getattr(message, name), name, **expect)
    except TensorError as exc:
        raise invalid_from_exception(exc) from None


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_bytes(payload: int) -> int:
    """A length-delimited field on the wire: tag (every field number here is < 16: one
    byte; a test keeps it so), length varint, payload."""
    return 1 + _varint_bytes(payload) + payload


def _tensor_bytes(dtype: int, shape: list[int], itemsize: int) -> int:
    data = math.prod(shape) * itemsize
    return pb.Tensor(dtype=dtype, shape=shape).ByteSize() + (_field_bytes(data) if data else 0)


def dense_response_bytes(images: int, anchors: int, request: pb.AssignRequest, background_class: int) -> int:
    """The exact serialized size of a request's DENSE response (the limit gRPC enforces
    on it), known before computing; with ``drop_invalid`` the dropped-box lists are
    counted at their largest (every box and ignore region dropped)."""
    half = request.delta_dtype == pb.DTYPE_FLOAT16
    rows = [images, anchors]
    dense = _field_bytes(_tensor_bytes(pb.DTYPE_INT8, rows, 1))
    dense += _field_bytes(_tensor_bytes(pb.DTYPE_INT32, rows, 4))
    dense += _field_bytes(_tensor_bytes(pb.DTYPE_FLOAT16 if half else pb.DTYPE_FLOAT32, [*rows, 4], 2 if half else 4))
    if request.return_classes:
        dense += _field_bytes(_tensor_bytes(pb.DTYPE_INT32, rows, 4))
    header = pb.AssignResponse(
        request_id=request.request_id, batch_size=images, num_anchors=anchors, background_class=background_class
    )
    size = header.ByteSize() + _field_bytes(dense)
    if request.return_max_iou:
        size += _field_bytes(_tensor_bytes(pb.DTYPE_FLOAT32, rows, 4))
    if request.drop_invalid:
        ignore_counts = request.ignore_counts or [0] * len(request.gt_counts)
        for count, ignore in zip(request.gt_counts, ignore_counts):
            size += _field_bytes(_indices_bytes(count) + _indices_bytes(ignore))
    return size


def _indices_bytes(count: int) -> int:
    """A packed field of ``count`` indices below ``count``, at its largest (absent when empty)."""
    return _field_bytes(count * _varint_bytes(max(count - 1, 0))) if count else 0


def check_response_size(response: pb.AssignResponse, limits: Limits) -> int:
    """``response``'s serialized size if it fits the message limit, else
    ``ResourceExhausted`` (a SPARSE response's size is known only once computed)."""
    size = response.ByteSize()
    if size > limits.max_message_bytes:
        raise ResourceExhausted(
            _too_big("the response", size, response.request_id, limits, "send fewer images per request")
        )
    return size


def _too_big(what: str, size: int, request_id: str, limits: Limits, advice: str) -> str:
    """The refusal of a response over the message limit, naming the echoed request id
    where that is what does not fit (fewer images would not help)."""
    id_bytes = len(request_id.encode())
    if size - id_bytes <= limits.max_message_bytes:  # it would fit without the id
        field, advice = "request_id", "send a shorter request_id"
        what += f" (echoing the {id_bytes}-byte request_id)"
    else:
        field = "format"
    return f"{field}: {what} would be {size} bytes, over the {limits.max_message_bytes}-byte message limit; {advice}"


# Up to this many classes are scanned as Python ints: a numpy reduction's fixed cost
# (~4 us) is that of listing and scanning a few hundred.
_LISTED_CLASSES = 256


def _classes_in_range(classes: torch.Tensor, counts: list[int]) -> None:
    """Classes travel back as int32 and negative ids collide with the ignore conventions; a
    bad one is named by image and box, as in-process."""
    if classes.numel() <= _LISTED_CLASSES:
        listed = classes.tolist()
        in_range = not listed or (min(listed) >= 0 and max(listed) <= _INT32_MAX)
    else:
        values = classes.numpy()
        # An int32 class (what the clients send) cannot exceed the maximum: one scan, not two.
        in_range = values.min() >= 0 and (classes.dtype == torch.int32 or values.max() <= _INT32_MAX)
    if not in_range:
        values = classes.numpy()
        bad = int(np.flatnonzero((values < 0) | (values > _INT32_MAX))[0])
        image, box = image_and_box(bad, counts)
        raise _invalid("gt_classes", f"image {image}, box {box}: class {int(values[bad])} is outside [0, {_INT32_MAX}]")


def _drawn_seed(config: TargetConfig) -> int:
    """The sampling seed of a request that sets none: fresh from the OS's entropy, so that
    sampling differs call to call (torch's global generator starts alike in every worker
    process and after every restart); 0 for a config that does not sample."""
    return secrets.randbelow(2**62) if config.match.sample_size > 0 else 0


def decode_assign(request: pb.AssignRequest, limits: Limits) -> AssignJob:
    """Check a request against the limits and decode it (tensors view its bytes)."""
    request = decoded(request)
    _enum(request, "format", pb.Format, (pb.FORMAT_UNSPECIFIED, pb.FORMAT_SPARSE, pb.FORMAT_DENSE))
    _enum(request, "delta_dtype", pb.DType, (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16))
    config = resolve_config(request.config, limits)
    canvas = _canvas(request.canvas_height, request.canvas_width, limits)
    # Repeated fields are measured before they are walked: a message within the size
    # limit may hold tens of millions of counts, and this runs on the event loop.
    if len(request.gt_counts) > limits.max_images:
        raise ResourceExhausted(
            f"gt_counts: {len(request.gt_counts)} images is over the server's limit of {limits.max_images}"
        )
    counts = _counts(request.gt_counts, "gt_counts")
    if not counts:
        raise _invalid("gt_counts", "the batch is empty (one count per image, 0 for an image without boxes)")
    if sum(counts) > limits.max_boxes:
        raise ResourceExhausted(f"gt_boxes: {sum(counts)} boxes is over the server's limit of {limits.max_boxes}")
    anchors = _num_anchors(config, canvas)
    if len(counts) * anchors > limits.max_anchor_rows:
        raise ResourceExhausted(
            f"gt_counts: {len(counts)} images x {anchors} anchors is over the server's limit of "
            f"{limits.max_anchor_rows} anchor rows per request; send fewer images per request"
        )
    boxes = _tensor(request, "gt_boxes", dtypes=(torch.float32,), ndim=2, last_dim=4)
    if boxes is None:
        if sum(counts):
            raise _invalid("gt_boxes", f"missing, but gt_counts sum to {sum(counts)}")
        boxes = torch.zeros(0, 4)
    # Rows against counts here, before anything is copied (the batcher's merge copies the
    # boxes, and the sizes are widened below), as ``build_problem`` words it.
    if boxes.shape[0] != sum(counts):
        raise _invalid("gt_counts", f"counts sum to {sum(counts)}, but gt_boxes has {boxes.shape[0]} rows")
    classes = _tensor(request, "gt_classes", dtypes=(torch.int32, torch.int64), ndim=1)
    if request.return_classes and classes is None:
        raise _invalid("return_classes", "needs gt_classes (one class per box)")
    if classes is not None:
        # Checked even when the classes are not returned: the request is wrong either way,
        # and in-process ``assign`` refuses it too.
        if classes.shape[0] != boxes.shape[0]:
            raise _invalid("gt_classes", f"expected shape [{boxes.shape[0]}] (one per box), got {list(classes.shape)}")
        _classes_in_range(classes, counts)
    ignore = _tensor(request, "ignore_boxes", dtypes=(torch.float32,), ndim=2, last_dim=4)
    if request.ignore_counts and len(request.ignore_counts) != len(counts):
        raise _invalid("ignore_counts", f"has {len(request.ignore_counts)} images, but gt_counts has {len(counts)}")
    ignore_counts = _counts(request.ignore_counts, "ignore_counts") if request.ignore_counts else None
    if ignore is not None and ignore_counts is None:
        raise _invalid("ignore_counts", "required with ignore_boxes (one count per image)")
    if ignore is None and ignore_counts is not None:
        if sum(ignore_counts):
            raise _invalid("ignore_boxes", f"missing, but ignore_counts sum to {sum(ignore_counts)}")
        ignore = torch.zeros(0, 4)
    if ignore is not None and ignore.shape[0] > limits.max_boxes:
        raise ResourceExhausted(
            f"ignore_boxes: {ignore.shape[0]} boxes is over the server's limit of {limits.max_boxes}"
        )
    if ignore is not None and ignore.shape[0] != sum(ignore_counts):
        raise _invalid(
            "ignore_counts", f"counts sum to {sum(ignore_counts)}, but ignore_boxes has {ignore.shape[0]} rows"
        )
    if request.format == pb.FORMAT_DENSE:
        # After the ignore counts are checked (with drop_invalid they size the dropped
        # lists: made-up counts were refused as a response too large); before any output.
        size = dense_response_bytes(len(counts), anchors, request, config.background_class)
        if size > limits.max_message_bytes:
            advice = "use FORMAT_SPARSE or fewer images per request"
            raise ResourceExhausted(_too_big("the DENSE response", size, request.request_id, limits, advice))
    sizes = _tensor(request, "image_sizes", dtypes=(torch.int32, torch.int64), ndim=2, last_dim=2)
    pads = _tensor(request, "pad_sizes", dtypes=(torch.int32, torch.int64), ndim=2, last_dim=2)
    for name, given in (("image_sizes", sizes), ("pad_sizes", pads)):
        if given is not None and given.shape[0] != len(counts):
            raise _invalid(name, f"expected shape [{len(counts)}, 2] (height, width), got {list(given.shape)}")
    return AssignJob(
        config=config,
        canvas=canvas,
        gt_boxes=boxes,
        gt_counts=counts,
        gt_classes=classes if request.return_classes else None,
        ignore_boxes=ignore,
        ignore_counts=ignore_counts,
        image_sizes=None if sizes is None else sizes.to(torch.int64),
        pad_sizes=None if pads is None else pads.to(torch.int64),
        drop_invalid=request.drop_invalid,
        return_max_iou=request.return_max_iou,
        seed=request.seed if request.HasField("seed") else _drawn_seed(config),
        sparse=request.format != pb.FORMAT_DENSE,
    )


def encode_assign(request: pb.AssignRequest, targets: Targets | SparseTargets) -> pb.AssignResponse:
    """The response to ``request`` holding ``targets`` in the requested format.

    ``SparseTargets`` (the batch ran sparse: SPARSE requests without max IoU) are encoded
    from their lists when those are what the response lists (ignored anchors no more
    than negative ones, the common case); otherwise they are densified first. Either
    way the response is the same bytes as from the dense targets.
    """
    half = request.delta_dtype == pb.DTYPE_FLOAT16
    if isinstance(targets, SparseTargets) and (request.format == pb.FORMAT_DENSE or not _lists_ignored(targets)):
        targets = Targets.from_sparse(targets, check=False)  # the response needs the anchors left out
    response = pb.AssignResponse(
        request_id=request.request_id,
        batch_size=targets.batch_size,
        num_anchors=targets.num_anchors,
        background_class=targets.background_class,
    )
    if isinstance(targets, SparseTargets):
        _encode_sparse_lists(targets, half, request.return_classes, response.sparse)
    elif request.format == pb.FORMAT_DENSE:
        dense = response.dense
        encode_tensor(targets.labels, dense.labels)
        encode_tensor(targets.matched_gt, dense.matched_gt)
        encode_tensor(_half_tensor(targets.deltas) if half else targets.deltas, dense.deltas)
        if request.return_classes and targets.classes is not None:
            encode_tensor(targets.classes, dense.classes)
    else:
        _encode_sparse(targets, half, request.return_classes, response.sparse)
    if request.return_max_iou and isinstance(targets, Targets) and targets.max_iou is not None:
        encode_tensor(targets.max_iou, response.max_iou)
    if request.drop_invalid:
        for dropped, dropped_ignore in zip(targets.dropped, targets.dropped_ignore, strict=True):
            lists = response.dropped.add()
            lists.box_index.extend(dropped.tolist())
            lists.ignore_box_index.extend(dropped_ignore.tolist())
    return response


def _half_overflow(overflowing: np.ndarray) -> InvalidInput:
    """The error for deltas that become infinite as float16; ``overflowing`` are those
    deltas (never NaN: a NaN stays NaN), so their largest magnitude is a number."""
    return _invalid(
        "delta_dtype",
        f"a delta of magnitude {float(np.abs(overflowing).max()):.4g} does not fit DTYPE_FLOAT16 (largest 65504; "
        "a box far larger than, smaller than or away from the anchor it matches makes deltas this large, as do "
        "large encode weights or small stds): use DTYPE_FLOAT32",
    )


def _half_array(deltas: np.ndarray) -> np.ndarray:
    """``deltas`` as float16, or ``InvalidInput`` where one would become infinite."""
    with np.errstate(over="ignore"):
        half = deltas.astype(np.float16)
    overflow = np.isinf(half)
    if overflow.any():
        raise _half_overflow(deltas[overflow])
    return half


def _half_tensor(deltas: torch.Tensor) -> torch.Tensor:
    half = deltas.to(torch.float16)
    overflow = torch.isinf(half)
    if overflow.any():
        raise _half_overflow(deltas[overflow].numpy())
    return half


def _nonzero_int8(values: np.ndarray) -> np.ndarray:
    """Ascending indices (int64) of the non-zero entries of a flat, contiguous int8 array.

    Scans it as int64 words first (8 labels per word, so 8x fewer elements for
    ``nonzero``, whose cost is per element), then looks inside the few non-zero words:
    about 4x faster than a plain ``nonzero`` on mostly-negative (zero) labels.
    """
    if values.size % 8 or not values.flags.c_contiguous:
        return np.flatnonzero(values)
    words = np.flatnonzero(values.view(np.int64) != 0)  # [W] (a bool mask scans 3x faster)
    row, col = np.nonzero(values.reshape(-1, 8)[words])  # within those words
    return words[row] * 8 + col


_NUMPY_WIRE = {
    np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.float16): pb.DTYPE_FLOAT16, np.dtype(np.int8): pb.DTYPE_INT8,
    np.dtype(np.int32): pb.DTYPE_INT32, np.dtype(np.int64): pb.DTYPE_INT64,
}  # fmt: skip


def _put(values: np.ndarray, field: pb.Tensor) -> None:
    """``encode_tensor`` for a numpy array: same bytes (row-major, in the host's byte
    order, which is the wire's little-endian: ``protos.tensors`` refuses other hosts)."""
    field.dtype = _NUMPY_WIRE[values.dtype]
    field.shape[:] = values.shape
    field.data = values.tobytes()


def _encode_sparse(targets: Targets, half: bool, with_classes: bool, sparse: pb.SparseTargets) -> None:
    """The SPARSE form of dense targets, in numpy: some 25 small array operations per
    request, which cost a few microseconds each in numpy against several times that in
    torch (whose per-call overhead dominates at these sizes)."""
    batch, count = targets.batch_size, targets.num_anchors
    labels = targets.labels.numpy().reshape(-1)
    # One pass over the flat labels finds positives and ignored together (image-major,
    # ascending), so per-image offsets are a binary search away.
    marked = _nonzero_int8(labels)
    positive_mask = labels[marked] == POSITIVE
    positives = marked[positive_mask]
    ignored = marked[~positive_mask]
    # List the rarer of ignored / negative; with RPN sampling most anchors end up ignored.
    if ignored.size <= labels.size - marked.size:
        listed, listed_label, unlisted_label = ignored, IGNORED, NEGATIVE
    else:
        listed, listed_label, unlisted_label = np.flatnonzero(labels == NEGATIVE), NEGATIVE, IGNORED
    image_starts = np.arange(batch + 1, dtype=np.int64) * count
    _put(np.searchsorted(positives, image_starts).astype(np.int64), sparse.positive_offsets)
    _put((positives % count).astype(np.int32), sparse.positive_anchors)
    _put(targets.matched_gt.numpy().reshape(-1)[positives], sparse.positive_matched_gt)
    deltas = targets.deltas.numpy().reshape(-1, 4)[positives]
    _put(_half_array(deltas) if half else deltas, sparse.positive_deltas)
    if with_classes and targets.classes is not None:
        _put(targets.classes.numpy().reshape(-1)[positives], sparse.positive_classes)
    sparse.listed_label = listed_label
    sparse.unlisted_label = unlisted_label
    _put(np.searchsorted(listed, image_starts).astype(np.int64), sparse.listed_offsets)
    _put((listed % count).astype(np.int32), sparse.listed_anchors)


def _lists_ignored(targets: SparseTargets) -> bool:
    """Whether the SPARSE response lists the ignored anchors, decided as ``_encode_sparse``
    does over the whole request: ignored no more than negative (neither positive nor ignored)."""
    ignored = targets.ignored_anchors.numel()
    return ignored <= targets.batch_size * targets.num_anchors - targets.positive_anchors.numel() - ignored


def _encode_sparse_lists(targets: SparseTargets, half: bool, with_classes: bool, sparse: pb.SparseTargets) -> None:
    """The SPARSE form straight from the lists (no scan of the B x A labels): the same
    fields, dtypes and bytes ``_encode_sparse`` builds from the dense form."""
    array = lambda tensor, dtype: tensor.numpy().astype(dtype, copy=False)  # noqa: E731
    _put(array(targets.positive_offsets, np.int64), sparse.positive_offsets)
    _put(array(targets.positive_anchors, np.int32), sparse.positive_anchors)
    _put(array(targets.positive_matched_gt, np.int32), sparse.positive_matched_gt)
    deltas = array(targets.positive_deltas, np.float32)
    _put(_half_array(deltas) if half else deltas, sparse.positive_deltas)
    if with_classes and targets.positive_classes is not None:
        _put(array(targets.positive_classes, np.int32), sparse.positive_classes)
    sparse.listed_label = IGNORED
    sparse.unlisted_label = NEGATIVE
    _put(array(targets.ignored_offsets, np.int64), sparse.listed_offsets)
    _put(array(targets.ignored_anchors, np.int32), sparse.listed_anchors)


def encode_anchors(anchors: torch.Tensor) -> pb.GetAnchorsResponse:
    response = pb.GetAnchorsResponse()
    encode_tensor(anchors, response.anchors)
    return response


def anchors_request(request: pb.GetAnchorsRequest, limits: Limits) -> tuple[TargetConfig, tuple[int, int], int]:
    """Config and canvas of a GetAnchors request, and its response's size (within the
    message limit)."""
    config = resolve_config(decoded(request).config, limits)
    canvas = _canvas(request.canvas_height, request.canvas_width, limits)
    size = _field_bytes(_tensor_bytes(pb.DTYPE_FLOAT32, [_num_anchors(config, canvas), 4], 4))  # the whole message
    if size > limits.max_message_bytes:
        raise ResourceExhausted(f"the anchors would be {size} bytes, over the {limits.max_message_bytes}-byte limit")
    return config, canvas, size


def list_presets() -> pb.ListPresetsResponse:
    response = pb.ListPresetsResponse()
    for name in presets.names():
        response.presets.add(
            name=name, description=presets.describe(name), config_json=json.dumps(presets.get(name).to_dict())
        )
    return response
