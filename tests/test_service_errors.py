"""Every error path returns its status code and a message naming the problem, and the
server keeps serving afterwards (each test ends with a good request)."""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import logging
import re
import threading
import time

import grpc
import pytest
import torch
from test_service_harness import ServerThread, batching, limits, until

from tritarget.clients import TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.kernels import assign, presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import encode_tensor
from tritarget.service import codec
from tritarget.service.errors import InvalidInput, NotFound, ResourceExhausted, invalid_from_exception
from tritarget.service.status import status_of

CANVAS = (96, 128)
GOOD = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0]])
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server():
    with ServerThread(
        limits=limits(max_images=8, max_boxes=50, max_canvas_side=1024, max_message_bytes=1 << 20)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with TargetClient(server.address, retries=0, timeout=30) as c:
        yield c


def _still_serving(client):
    targets = client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    assert targets.labels.shape[0] == 1 and (targets.labels == 1).any()


def _fails(client, code, *match, call=None, **kwargs):
    args = {"gt_boxes": GOOD, "gt_counts": [2], "canvas": CANVAS, "preset": "retinanet_torchvision", **kwargs}
    with pytest.raises(TargetServiceError) as info:
        if call is None:
            client.assign(args.pop("gt_boxes"), args.pop("gt_counts"), args.pop("canvas"), **args)
        else:
            call()
    error = info.value
    assert error.code == code, error
    for text in match:
        assert text in error.details, (text, error.details)
    _still_serving(client)
    return error


BAD_BOXES = [
    ("degenerate", [[10.0, 10.0, 60.0, 50.0], [30.0, 30.0, 30.0, 80.0]], "image 1, box 0: degenerate box (x2 <= x1)"),
    ("nan", [[10.0, 10.0, 60.0, 50.0], [float("nan"), 0.0, 10.0, 10.0]], "image 1, box 0: coordinates are not finite"),
    ("outside", [[500.0, 500.0, 600.0, 700.0], [1.0, 1.0, 9.0, 9.0]], "image 0, box 0: wholly outside the 96x128"),
]


@pytest.mark.parametrize("name, boxes, message", BAD_BOXES, ids=[b[0] for b in BAD_BOXES])
def test_invalid_box_names_image_and_box(client, name, boxes, message):
    error = _fails(client, INVALID, message, gt_boxes=torch.tensor(boxes), gt_counts=[1, 1])
    assert error.field_violations and error.field_violations[0][0] == "gt_boxes"
    assert message in error.field_violations[0][1]


def test_invalid_ignore_box_names_field(client):
    ignore = torch.tensor([[5.0, 5.0, 1.0, 9.0]])
    error = _fails(client, INVALID, "ignore_boxes: image 0, box 0", ignore_boxes=ignore, ignore_counts=[1])
    assert error.field_violations[0][0] == "ignore_boxes"


@pytest.mark.parametrize(
    "kwargs, field, text",
    [
        ({"gt_counts": [1]}, "gt_counts", "counts sum to 1, but gt_boxes has 2 rows"),
        ({"gt_counts": []}, "gt_counts", "the batch is empty"),
        ({"canvas": (0, 128)}, "canvas_height", "must be positive"),
        ({"canvas": (96, 0)}, "canvas_width", "must be positive, got 0"),
        ({"image_sizes": torch.tensor([[200, 100]])}, "image_sizes[0]", "must be positive and fit"),
        ({"image_sizes": torch.tensor([[90, 100], [80, 80]])}, "image_sizes", "expected shape [1, 2]"),
        ({"return_classes": True}, "return_classes", "needs gt_classes"),
        ({"gt_classes": torch.tensor([1, 2, 3])}, "gt_classes", "expected shape [2]"),
        # Not returned, but still wrong: refused as in-process assign refuses it.
        ({"gt_classes": torch.tensor([1, 2, 3]), "return_classes": False}, "gt_classes", "expected shape [2]"),
        ({"gt_classes": torch.tensor([1])}, "gt_classes", "expected shape [2] (one per box), got [1]"),  # fewer too
        (
            {"preset": None, "config": {"anchors": {"layout": "nope", "levels": []}}},
            "config.config_json.anchors.layout",
            "must be one of",
        ),
        (
            {"preset": None, "config": {"anchors": {"layout": "torchvision", "levels": [{"stride": -8}]}}},
            "config.config_json.anchors.levels[0].stride",
            "must be in [1, ",
        ),
        # Overrides are named by the caller's key (the config classes' names meant nothing to it).
        ({"overrides": {"match.high": 1.5}}, "config.overrides[match.high]", "match.high: must be in [0, 1]"),
        ({"overrides": {"match.low": 0.3, "match.high": 1.5}}, "config.overrides[match.high]", "must be in [0, 1]"),
        ({"overrides": {"match.nope": 1}}, "config.overrides[match.nope]", "unknown config field 'match.nope'"),
        # A value valid only beside the others is not blamed for what another key did.
        (
            {"overrides": {"match.high": 0.3, "match.low": 0.2, "match.nope": 1}},
            "config.overrides[match.nope]",
            "unknown config field 'match.nope'",
        ),
        # Valid alone, not together: named by the config's path under the overrides.
        (
            {"overrides": {"match.low": 0.45, "match.high": 0.42}},
            "config.overrides.match.low",
            "must be in [0, high=0.42], got 0.45",
        ),
        (
            {"overrides": {"match": {"high": 0.3}, "match.low": 0.1}},
            "config.overrides",
            "overrides 'match' and 'match.low'",
        ),
        (
            {"overrides": {"anchors.levels": [{"stride": -8}]}},
            "config.overrides[anchors.levels]",
            "anchors.levels[0].stride: must be in [1, ",
        ),
        # Zero in float32: every delta would be NaN or infinite.
        ({"overrides": {"encode.stds": [1e-46] * 4}}, "config.overrides[encode.stds]", "values must be in"),
        # Found by the fuzz test: float16 deltas that would be infinite are refused, not sent as inf.
        (
            {"overrides": {"encode.weights": [1e6] * 4}, "delta_dtype": "float16"},
            "delta_dtype",
            "does not fit DTYPE_FLOAT16",
        ),
        (
            {"overrides": {"encode.weights": [1e6] * 4}, "delta_dtype": "float16", "format": "dense"},
            "delta_dtype",
            "does not fit DTYPE_FLOAT16",
        ),
    ],
)
def test_invalid_argument_with_field_violation(client, kwargs, field, text):
    error = _fails(client, INVALID, text, **kwargs)
    assert (field, error.field_violations[0][1]) == error.field_violations[0], error.field_violations
    assert text in error.field_violations[0][1]


def _raw(client, mutate):
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    mutate(request)
    return lambda: client.assign_raw(request)


@pytest.mark.parametrize(
    "mutate, text",
    [
        (
            lambda r: setattr(r.gt_boxes, "data", r.gt_boxes.data[:-4]),
            "gt_boxes: shape [2, 4] x 4 bytes needs 32 bytes, got 28",
        ),
        (lambda r: setattr(r.gt_boxes, "dtype", pb.DTYPE_INT32), "gt_boxes: dtype DTYPE_INT32 not allowed here"),
        (lambda r: setattr(r.gt_boxes, "dtype", 99), "gt_boxes: unknown or unset dtype 99"),
        (lambda r: r.gt_boxes.shape.__setitem__(1, 2), "gt_boxes: expected last dimension 4"),
        (lambda r: r.ClearField("gt_boxes"), "gt_boxes: missing, but gt_counts sum to 2"),
        (
            lambda r: setattr(r, "delta_dtype", pb.DTYPE_INT8),
            "delta_dtype: must be one of DTYPE_FLOAT32, DTYPE_FLOAT16 (or unset); got DTYPE_INT8",
        ),
        # D1: an unknown enum value is refused by name, not INTERNAL while naming it.
        (
            lambda r: setattr(r, "delta_dtype", 77),
            "delta_dtype: must be one of DTYPE_FLOAT32, DTYPE_FLOAT16 (or unset); got unknown value 77",
        ),
        (
            lambda r: setattr(r, "format", 9),
            "format: must be one of FORMAT_SPARSE, FORMAT_DENSE (or unset); got unknown value 9",
        ),
        # D2: a background class that cannot travel as int32 is refused before computing.
        # A TargetConfig field's own path is its name (no leading dot).
        (
            lambda r: r.config.overrides.__setitem__("background_class", "2147483648"),
            "config.overrides[background_class]: background_class: must be in [0, 2147483647]",
        ),
        (lambda r: r.config.overrides.__setitem__("background_class", str(2**70)), "must be in [0, 2147483647]"),
        (lambda r: r.config.overrides.__setitem__("background_class", "-7"), "must be in [0, 2147483647]"),
        (
            lambda r: r.gt_classes.CopyFrom(encode_tensor(torch.tensor([3, -1], dtype=torch.int32))),
            "gt_classes: image 0, box 1: class -1 is outside [0, 2147483647]",
        ),
        (lambda r: r.gt_classes.CopyFrom(encode_tensor(torch.tensor([2**40, 1]))), "box 0: class 1099511627776"),
        # D3: deep JSON is a clear INVALID_ARGUMENT, not a RecursionError.
        (lambda r: setattr(r.config, "config_json", "[" * 5000 + "]" * 5000), "config_json: JSON nested too deeply"),
        (lambda r: r.config.overrides.__setitem__("match.high", "[" * 5000 + "]" * 5000), "JSON nested too deeply"),
        # Deep enough to refuse, shallow enough for every Python's parser: the limit is ours.
        (
            lambda r: r.config.overrides.__setitem__("match.high", "[" * 33 + "]" * 33),
            "config.overrides[match.high]: JSON nested too deeply (more than 32 levels)",
        ),
        (
            lambda r: setattr(r.config, "config_json", '{"anchors": ' + "[" * 40 + "]" * 40 + "}"),
            "config.config_json: JSON nested too deeply",
        ),
        (lambda r: setattr(r.config, "config_json", "{not json"), "config.config_json: not valid JSON"),
        # An integer of more digits than Python converts: json raises a plain ValueError.
        (lambda r: r.config.overrides.__setitem__("match.high", "9" * 5000), "overrides[match.high]: not valid JSON"),
        (lambda r: r.ClearField("config"), "config: set either preset or config_json"),
        (lambda r: r.gt_counts.__setitem__(0, -2), "gt_counts: image 0: negative count -2"),
        (lambda r: r.gt_counts.extend([-1]), "gt_counts: image 1: negative count -1"),
        (lambda r: r.ignore_counts.extend([-1]), "ignore_counts: image 0: negative count -1"),
        # Fewer ignore counts than images, as more are.
        (
            lambda r: (r.gt_counts.append(0), r.ignore_counts.append(0)),
            "ignore_counts: has 1 images, but gt_counts has 2",
        ),
        (lambda r: r.ignore_boxes.CopyFrom(encode_tensor(GOOD[:1])), "ignore_counts: required with ignore_boxes"),
    ],
)
def test_malformed_messages(client, mutate, text):
    error = _fails(client, INVALID, text, call=_raw(client, mutate))
    assert error.field_violations


@pytest.mark.parametrize(
    ("limits_at", "over", "text"),
    [({"max_canvas_side": 128}, {"canvas": (129, 128)}, "canvas_height: 129 is over the server's limit of 128 pixels"),
     ({"max_canvas_side": 128}, {"canvas": (128, 129)}, "canvas_width: 129 is over the server's limit of 128 pixels"),
     ({"max_images": 2}, {"gt_counts": [1, 0, 1]}, "gt_counts: 3 images is over the server's limit of 2"),
     ({"max_boxes": 2}, {"gt_counts": [3], "gt_boxes": GOOD[[0, 1, 1]]}, "gt_boxes: 3 boxes is over")],
)  # fmt: skip
def test_a_request_at_a_limit_is_served_and_one_past_it_refused(limits_at, over, text):
    at = {"gt_boxes": GOOD, "gt_counts": [1, 1], "canvas": (128, 128)}
    limited = codec.Limits(**limits_at)
    request = build_request(at["gt_boxes"], at["gt_counts"], at["canvas"], preset="retinanet_torchvision")
    assert list(codec.decode_assign(request, limited).gt_counts) == [1, 1]
    past = {**at, **over}
    request = build_request(past["gt_boxes"], past["gt_counts"], past["canvas"], preset="retinanet_torchvision")
    with pytest.raises(ResourceExhausted, match=re.escape(text)):
        codec.decode_assign(request, limited)


@pytest.mark.parametrize("boxes", [3, 300])  # listed as Python ints, or scanned in numpy
@pytest.mark.parametrize(
    "dtype, bad, text",
    [(torch.int32, -1, "class -1 is outside"), (torch.int64, -5, "class -5 is outside"),
     (torch.int64, 2**40, "class 1099511627776 is outside")],
)  # fmt: skip
def test_classes_out_of_range_are_named_by_box(boxes, dtype, bad, text):
    """The server's own check (a client may send any int32 or int64 classes)."""
    request = build_request(GOOD[:1].repeat(boxes, 1), [boxes], CANVAS, gt_classes=torch.ones(boxes, dtype=dtype),
                            preset="retinanet_torchvision")  # fmt: skip
    classes = torch.arange(boxes, dtype=dtype)
    classes[-1] = bad
    request.gt_classes.CopyFrom(encode_tensor(classes))
    with pytest.raises(InvalidInput, match=f"gt_classes: image 0, box {boxes - 1}: {text}"):
        codec.decode_assign(request, codec.Limits())
    classes[-1] = 2**31 - 1  # the largest class that travels back as int32
    request.gt_classes.CopyFrom(encode_tensor(classes))
    assert codec.decode_assign(request, codec.Limits()).gt_classes[-1] == 2**31 - 1


@pytest.mark.parametrize("format", ["sparse", "dense"])  # numpy's float16 check, torch's
def test_float16_overflow_names_the_overflowing_magnitude_beside_a_nan(format):
    """A NaN delta (which float16 keeps as NaN) does not turn the reported magnitude into nan."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format=format, delta_dtype="float16")
    targets = assign(GOOD, [2], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
    positives = torch.nonzero(targets.labels.view(-1) == 1).view(-1)
    targets.deltas.view(-1, 4)[positives[0]] = torch.tensor([float("nan"), 1e6, 0.0, 0.0])
    with pytest.raises(InvalidInput, match="a delta of magnitude 1e[+]06 does not fit DTYPE_FLOAT16"):
        codec.encode_assign(request, targets)


def test_float16_overflow_from_a_box_does_not_blame_the_config():
    """A box 2^31 pixels wide (as wide as a valid box reaches) overflows float16 deltas
    under the preset's own weights: the error names boxes as a cause (it said only "the
    config's encode weights or stds"; review 49)."""
    boxes = torch.tensor([[128 - 2.0**31, 0.0, 10.0, 10.0]])
    request = build_request(boxes, [1], CANVAS, preset="retinanet_torchvision", delta_dtype="float16")
    targets = assign(boxes, [1], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
    assert (targets.labels == 1).any()  # low-quality matching gives the box its best anchors
    with pytest.raises(InvalidInput, match="does not fit DTYPE_FLOAT16 .* a box far larger than, smaller than or away"):
        codec.encode_assign(request, targets)


def test_errors_repeating_long_input_stay_readable(client, caplog):
    """A status travels in the trailers, which gRPC clients refuse over 8-16 KiB: a message
    repeating a 6,000-character name (or a 3,000-dimension shape) is cut, so the caller
    gets its code and reason instead of RESOURCE_EXHAUSTED from its own transport."""
    for _ in range(5):  # the 8 KiB limit refuses at random
        error = _fails(client, grpc.StatusCode.NOT_FOUND, "unknown preset 'xxxx", "more characters)",
                       preset="x" * 6000)  # fmt: skip
        assert len(error.details) < 1000
    # Cut by bytes on the wire, not characters: gRPC percent-encodes each byte of an emoji
    # in grpc-message (12 bytes), and 512 of them in a value or a key went over 8 KiB.
    for overrides in ({"match.high": '"' + "\U0001f600" * 3000 + '"'}, {"\U0001f600" * 3000: "1"}):
        request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
        request.config.overrides.update(overrides)
        for _ in range(5):
            error = _fails(client, INVALID, "config.overrides", "more characters)",
                           call=functools.partial(client.assign_raw, request))  # fmt: skip
            assert "\U0001f600" * 30 in error.details
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.gt_boxes.shape[:] = [1] * 3000 + [2, 4]
    error = _fails(client, INVALID, "gt_boxes", call=lambda: client.assign_raw(request))
    assert all(len(description) < 1000 for _, description in error.field_violations)
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", request_id="r" * 100_000)
    with caplog.at_level(logging.INFO, logger="tritarget.access"):
        client.assign_raw(request)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"][-1:]
    assert "r" * 128 in line and len(line) < 400  # a caller's id is not logged whole


def test_a_key_repeated_in_config_json_or_an_override_is_refused():
    """JSON keeps a repeated key's last value: background_class 5 then 9 served 9, the 5
    dropped without a word, where overlapping overrides are refused."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.ClearField("preset")
    request.config.config_json = '{"background_class": 5, "background_class": 9}'
    with pytest.raises(InvalidInput, match=r"^config.config_json: the key 'background_class' appears twice in one"):
        codec.decode_assign(request, codec.Limits())
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.overrides["match"] = '{"high": 0.5, "low": 0.4, "high": 0.7}'
    with pytest.raises(InvalidInput, match=r"^config.overrides\[match\]: the key 'high' appears twice in one object"):
        codec.decode_assign(request, codec.Limits())
    # A long key is quoted clipped.
    key = "k" * 100
    request.config.overrides["match"] = f'{{"{key}": 0.5, "{key}": 0.7}}'
    with pytest.raises(InvalidInput, match=f"the key '{'k' * 64}' \\(36 more characters\\) appears twice"):
        codec.decode_assign(request, codec.Limits())
    # The key that repeats is named, not the object's first.
    request.config.overrides["match"] = '{"low": 0.4, "high": 0.5, "high": 0.7}'
    with pytest.raises(InvalidInput, match=r"^config.overrides\[match\]: the key 'high' appears twice in one object"):
        codec.decode_assign(request, codec.Limits())


@pytest.mark.parametrize("format", ["sparse", "dense"])
def test_made_up_ignore_counts_are_named_in_either_format(format):
    """With drop_invalid the ignore counts size a DENSE response's dropped lists: counts
    that sum to 2e9 without ignore boxes were refused as a response too large."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format=format, drop_invalid=True)
    request.ignore_counts[:] = [2_000_000_000]
    with pytest.raises(InvalidInput, match="ignore_boxes: missing, but ignore_counts sum to 2000000000"):
        codec.decode_assign(request, codec.Limits())


@pytest.mark.parametrize("char", ["x", "%", "\u00e9", "\U0001f600", "\n"])
def test_a_status_fits_the_trailers_whatever_its_characters(char):
    """grpc-message percent-encodes every byte outside printable ASCII (and %), and the
    details travel again in base64: their sum stays well under the 8 KiB that clients
    accept at random."""
    text = char * 5000
    status = status_of(InvalidInput(f"gt_boxes: {text}", [(text, text)] * 10))
    message = sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in status.message)
    assert message <= 512 + 40 and message + len(base64.b64encode(status.SerializeToString())) < 6 * 1024


@pytest.mark.parametrize(
    "field, error, text",
    [("gt_counts", ResourceExhausted, "gt_counts: 5000001 images is over the server's limit of 256"),
     ("ignore_counts", InvalidInput, "ignore_counts: has 5000000 images, but gt_counts has 1"),
     ("gt_boxes.shape", InvalidInput, "gt_boxes: 5000002 dimensions (at most 8)")],
)  # fmt: skip
def test_millions_of_counts_or_dimensions_are_refused_by_their_length(field, error, text):
    """A message within the size limit may repeat a field millions of times, and requests
    are decoded on the event loop: refused by the field's length, not after walking it
    (~0.35 s of CPU per 5 million entries on a 2-core VM, every other call waiting)."""
    request = build_request(GOOD[:1], [1], CANVAS, preset="retinanet_torchvision")
    if field == "gt_boxes.shape":
        request.gt_boxes.shape.extend([1] * 5_000_000)
    else:
        getattr(request, field).extend([0] * 5_000_000)
    started = time.thread_time()
    with pytest.raises(error) as info:
        codec.decode_assign(request, codec.Limits())
    assert str(info.value).startswith(text)
    assert time.thread_time() - started < 0.05


@pytest.mark.parametrize(
    "field, rows, text",
    [("gt_boxes", 3, "gt_counts: counts sum to 2, but gt_boxes has 3 rows"),
     ("ignore_boxes", 4, "ignore_counts: counts sum to 1, but ignore_boxes has 4 rows"),
     ("image_sizes", 4_000_000, "image_sizes: expected shape [2, 2] (height, width), got [4000000, 2]"),
     ("pad_sizes", 3, "pad_sizes: expected shape [2, 2] (height, width), got [3, 2]"),
     # Fewer rows than the counts say, as more are.
     ("gt_boxes", 1, "gt_counts: counts sum to 2, but gt_boxes has 1 rows"),
     ("ignore_boxes", 0, "ignore_counts: counts sum to 1, but ignore_boxes has 0 rows"),
     ("image_sizes", 1, "image_sizes: expected shape [2, 2] (height, width), got [1, 2]"),
     ("pad_sizes", 1, "pad_sizes: expected shape [2, 2] (height, width), got [1, 2]")],
)  # fmt: skip
def test_rows_that_do_not_match_the_counts_are_refused_when_decoded(field, rows, text):
    """On the event loop, before anything is copied: 4 million int32 sizes (32 MB) were
    widened to int64 there and merged into a batch before the compute worker refused them."""
    request = build_request(GOOD, [1, 1], CANVAS, preset="retinanet_torchvision",
                            ignore_boxes=GOOD[:1], ignore_counts=[1, 0])  # fmt: skip
    value = {"gt_boxes": GOOD[:1].repeat(rows, 1), "ignore_boxes": GOOD[:1].repeat(rows, 1),
             "image_sizes": torch.full((rows, 2), 64, dtype=torch.int32),
             "pad_sizes": torch.full((rows, 2), 64, dtype=torch.int64)}[field]  # fmt: skip
    getattr(request, field).CopyFrom(encode_tensor(value))
    started = time.thread_time()
    with pytest.raises(InvalidInput) as info:
        codec.decode_assign(request, codec.Limits())
    assert str(info.value) == text and info.value.violations[0][0] == text.split(":")[0]
    assert time.thread_time() - started < 0.05


def test_unknown_preset_is_not_found(client):
    _fails(client, grpc.StatusCode.NOT_FOUND, "unknown preset 'retinanet_nope'", "retinanet_torchvision",
           preset="retinanet_nope")  # fmt: skip
    _fails(client, grpc.StatusCode.NOT_FOUND, "unknown preset", call=lambda: client.get_anchors(CANVAS, preset="x"))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"gt_boxes": GOOD.repeat(5, 1), "gt_counts": [1] * 10}, "10 images is over the server's limit of 8"),
        ({"gt_boxes": GOOD.repeat(30, 1), "gt_counts": [60]}, "60 boxes is over the server's limit of 50"),
        ({"ignore_boxes": GOOD.repeat(26, 1), "ignore_counts": [52]}, "ignore_boxes: 52 boxes is over"),
        ({"canvas": (2048, 128)}, "canvas_height: 2048 is over the server's limit of 1024"),
        ({"canvas": (800, 1000), "format": "dense"}, "the DENSE response would be"),
    ],
)
def test_over_limits_is_resource_exhausted(client, kwargs, text):
    _fails(client, grpc.StatusCode.RESOURCE_EXHAUSTED, text, **kwargs)


def test_anchor_rows_up_to_the_limit_are_accepted_and_one_image_more_is_not():
    anchors = resolve_grid(presets.get("retinanet_torchvision").anchors, CANVAS).num_anchors
    limits = codec.Limits(max_anchor_rows=2 * anchors)
    request = build_request(GOOD, [1, 1], CANVAS, preset="retinanet_torchvision")
    assert codec.decode_assign(request, limits).images == 2
    request = build_request(GOOD.repeat(2, 1), [1, 1, 1], CANVAS, preset="retinanet_torchvision")
    with pytest.raises(ResourceExhausted, match=rf"3 images x {anchors} anchors is over the server's limit of "):
        codec.decode_assign(request, limits)


def test_config_over_its_size_limit_is_resource_exhausted(client):  # D3
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.config_json = "[" * 100000 + "]" * 100000
    _fails(client, grpc.StatusCode.RESOURCE_EXHAUSTED,
           "config: preset, config_json and overrides are 200000 characters",
           call=lambda: client.assign_raw(request))  # fmt: skip


def test_a_config_of_the_limits_size_is_taken_and_one_character_more_refused():
    """The config limit is an inclusive bound: a preset, config_json and overrides of
    ``max_config_bytes`` characters in all are taken."""
    ref = pb.ConfigRef(preset="retinanet_torchvision", overrides={"match.high": "0.6"})
    size = len("retinanet_torchvision") + len("match.high") + len("0.6")
    assert codec.resolve_config(ref, codec.Limits(max_config_bytes=size)).match.high == 0.6
    with pytest.raises(ResourceExhausted, match=f"are {size} characters, over the server's limit of {size - 1}"):
        codec.resolve_config(ref, codec.Limits(max_config_bytes=size - 1))


def test_classes_sent_but_not_asked_for_are_not_computed():
    """A request may carry its boxes' classes without asking for them back: the job
    leaves them out (no class targets computed, and it merges with requests without)."""
    classes = torch.tensor([3, 7], dtype=torch.int32)
    asked, not_asked = (build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", gt_classes=classes)
                        for _ in range(2))  # fmt: skip
    not_asked.return_classes = False
    assert torch.equal(codec.decode_assign(asked, codec.Limits()).gt_classes, classes)
    job = codec.decode_assign(not_asked, codec.Limits())
    assert job.gt_classes is None
    assert job.merge_key == codec.decode_assign(build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision"),
                                                codec.Limits()).merge_key  # fmt: skip


def test_many_overrides_are_refused_by_their_count_and_checked_in_linear_time():
    """8,000 overrides within the size limit held the event loop for 27 s (their keys
    checked pair by pair, then one by one to name the refused one): refused by their
    count now, and a config's overrides are checked in time linear in their keys."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.overrides.update({f"k{i:05d}": "1" for i in range(8000)})
    started = time.thread_time()
    with pytest.raises(ResourceExhausted, match="config.overrides: 8000 overrides is over the server's limit of 64"):
        codec.decode_assign(request, codec.Limits())
    assert time.thread_time() - started < 0.05
    request.config.ClearField("overrides")
    request.config.overrides.update({f"k{i:05d}": "1" for i in range(64)})
    with pytest.raises(InvalidInput, match=r"config.overrides\[k00000\]: override 'k00000': unknown config field"):
        codec.decode_assign(request, codec.Limits())
    # In process, no count limit: 5,000 keys took ~5 s of pairs before the first was refused.
    started = time.thread_time()
    with pytest.raises(ValueError, match="unknown config field 'k00000'"):
        presets.get("retinanet_torchvision").replace(**{f"k{i:05d}": 1 for i in range(5000)})
    assert time.thread_time() - started < 0.5
    # One long key: its text's prefixes were compared at every dot, 1 s for 64 KiB of dots.
    for key in ("." * 65_000, "match" + ".high" * 13_000):
        request.config.ClearField("overrides")
        request.config.overrides[key] = "1"
        started = time.thread_time()
        with pytest.raises(InvalidInput, match="cannot address"):
            codec.decode_assign(request, codec.Limits())
        assert time.thread_time() - started < 0.05, key[:10]


def test_a_message_is_clipped_only_past_its_limit():
    """512 bytes of grpc-message are sent whole (a non-ASCII character costs its percent
    encoding, 3 bytes per UTF-8 byte); one byte more is clipped, saying how much is left."""
    for text in ("a" * 512, "a" * 506 + "é"):  # é: 2 UTF-8 bytes, 6 on the wire
        assert status_of(ResourceExhausted(text)).message == text
        assert status_of(ResourceExhausted(text + "b")).message == f"{text}... (1 more characters)"


@pytest.mark.parametrize("char", [" ", "~"])
def test_printable_asciis_first_and_last_characters_cost_one_byte(char):
    """Space (0x20) and tilde (0x7e) bound printable ASCII, which grpc-message sends as
    itself: 512 of either are sent whole, and one more is clipped."""
    assert status_of(ResourceExhausted(char * 512)).message == char * 512
    assert status_of(ResourceExhausted(char * 513)).message == f"{char * 512}... (1 more characters)"


@pytest.mark.parametrize(
    ("text", "message", "violation"),
    [("gt_boxes: image 0, box 3: degenerate box", "gt_boxes: image 0, box 3: degenerate box",
      ("gt_boxes", "image 0, box 3: degenerate box")),
     ("canvas too small: 3 x 3", "request: canvas too small: 3 x 3", ("request", "canvas too small: 3 x 3")),
     ("no field named", "request: no field named", ("request", "no field named"))],
)  # fmt: skip
def test_a_library_error_names_its_field_or_the_request(text, message, violation):
    """A kernel's message that starts with its field ("gt_boxes: ...") is that field's
    violation, the rest of the message its description; one that starts with words (a
    space before the first ": ") or has no ": " is the request's, said whole."""
    error = invalid_from_exception(ValueError(text))
    assert (error.message, error.violations) == (message, [violation])


def test_a_preset_name_counts_toward_the_config_limit_and_is_quoted_clipped(client):
    """A preset name had no bound below the message size: 200 MB of name was hashed and
    quoted whole (twice) into the NOT_FOUND message, seconds on the event loop."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.preset = "x" * 100_000
    _fails(client, grpc.StatusCode.RESOURCE_EXHAUSTED, "config: preset, config_json and overrides are 100000",
           call=lambda: client.assign_raw(request))  # fmt: skip
    request.config.preset = "y" * 1000
    error = _fails(client, grpc.StatusCode.NOT_FOUND, "config.preset: unknown preset 'yyyy",
                   call=lambda: client.assign_raw(request))  # fmt: skip
    assert "y" * 65 not in error.details


def test_request_over_message_size_is_rejected_by_grpc(client):
    boxes = torch.rand(100_000, 4) * 10 + torch.tensor([0.0, 0.0, 20.0, 20.0])
    _fails(client, grpc.StatusCode.RESOURCE_EXHAUSTED, gt_boxes=boxes, gt_counts=[100_000])


def test_unexpected_error_is_internal_and_generic(client, monkeypatch, caplog):
    def broken(request, targets):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(codec, "encode_assign", broken)
    with caplog.at_level(logging.ERROR, logger="tritarget.service.status"):
        with pytest.raises(TargetServiceError) as info:
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details and "internal server error" in info.value.details
    assert any("secret detail of a bug" in r.getMessage() or (r.exc_info and "secret" in str(r.exc_info[1]))
               for r in caplog.records)  # fmt: skip
    # The traceback names its call, as its access-log line does (only the time matched them).
    assert any(r.getMessage() == "unexpected error while serving Assign id=''" for r in caplog.records)
    monkeypatch.undo()
    _still_serving(client)


def test_an_unexpected_errors_log_line_cuts_a_long_request_id(client, monkeypatch, caplog):
    def broken(request, targets):
        raise RuntimeError("a bug")

    monkeypatch.setattr(codec, "encode_assign", broken)
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", request_id="r" * 100_000)
    with caplog.at_level(logging.ERROR, logger="tritarget.service.status"):
        with pytest.raises(TargetServiceError, match="INTERNAL"):
            client.assign_raw(request)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("unexpected error")] == [
        f"unexpected error while serving Assign id={'r' * 128!r}"
    ]
    monkeypatch.undo()
    _still_serving(client)


def test_the_access_log_sums_the_boxes_of_a_request_within_the_image_limit_only(client, caplog):
    """Up to max_images (8 here) a request's boxes are summed in its access-log line; past
    it (a refused request may hold millions of counts) they are not."""
    with caplog.at_level(logging.INFO, logger="tritarget.access"):
        client.assign(GOOD[:1].repeat(8, 1), [1] * 8, CANVAS, preset="retinanet_torchvision", request_id="eight")
        with pytest.raises(TargetServiceError, match="RESOURCE_EXHAUSTED"):
            client.assign(GOOD[:1].repeat(9, 1), [1] * 9, CANVAS, preset="retinanet_torchvision", request_id="nine")
    lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
    assert [line.split(" ")[1:5] for line in lines] == [
        ["id='eight'", "images=8", "boxes=8", "OK"],
        ["id='nine'", "images=9", "boxes=?", "RESOURCE_EXHAUSTED"],
    ], lines


@pytest.mark.parametrize("error", [
    MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 201129984000 bytes"),
], ids=["MemoryError", "cuda", "host-allocator"])  # fmt: skip
def test_running_out_of_memory_is_resource_exhausted_not_a_bug(client, monkeypatch, caplog, error):
    """A request within every limit can still be too large for the server's memory now:
    that was INTERNAL, "a bug"; it is RESOURCE_EXHAUSTED saying what to send less of."""

    def out_of_memory(request, targets):
        raise error

    monkeypatch.setattr(codec, "encode_assign", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="tritarget.service.status"):
        with pytest.raises(TargetServiceError) as info:
            client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details.startswith("the server ran out of memory computing this request")
    assert any(r.getMessage().startswith("out of memory while serving Assign") for r in caplog.records)
    monkeypatch.undo()
    _still_serving(client)


def test_full_queue_is_resource_exhausted_and_others_finish():
    gate = threading.Event()
    with ServerThread(batching=batching(max_queue_images=2, max_queue_delay_s=0.0)) as srv:
        srv.run(_occupy(srv, gate))
        with TargetClient(srv.address, retries=0, timeout=30) as client:
            call = lambda: client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")  # noqa: E731
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                # Queued behind the busy worker (work run on it counts as a batch): the queue is full.
                waiting = [pool.submit(call), pool.submit(call)]
                until(lambda: srv.metrics.value("tritarget_queued_images") == 2)
                with pytest.raises(TargetServiceError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "overloaded" in info.value.details
                # A full queue passes: a client of two replicas goes on to the other (it gave
                # up at once, as for a request over a limit).
                with ServerThread() as idle, TargetClient([srv.address, idle.address], timeout=30) as both:
                    assert (both.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision").labels == 1).any()
                    assert idle.metrics.value("tritarget_requests_total", {"method": "Assign"}) == 1
                    assert both.stats.retries == 1
                gate.set()
                for future in waiting:
                    assert (future.result(30).labels == 1).any()
            # They waited together, and ran as one batch (one took the worker's turn behind
            # the gate, and the other a turn after it).
            assert srv.metrics.value("tritarget_batch_requests_count") == 1
            errors = srv.metrics.value("tritarget_errors_total", {"method": "Assign", "code": "RESOURCE_EXHAUSTED"})
            assert errors == 2
            _still_serving(client)


def test_a_stream_waits_for_room_in_a_full_queue_and_unary_calls_are_refused():
    """A stream's requests are not refused by a full queue (a data loader's epoch would
    fail midway, its stream having no other replica to go to): they wait for room,
    counted by a gauge, while a new unary call is refused as overloaded; once the queue
    moves, every item is answered as in-process."""
    gate = threading.Event()
    items = [{"gt_boxes": GOOD[: 1 + i % 2], "gt_counts": [1 + i % 2]} for i in range(4)]
    with ServerThread(batching=batching(max_queue_images=2, max_batch_images=2, max_queue_delay_s=0.0)) as srv:
        srv.run(_occupy(srv, gate))
        with TargetClient(srv.address, retries=0, timeout=30) as client:
            call = lambda: client.assign(GOOD, [2], CANVAS, preset="retinanet_torchvision")  # noqa: E731
            stream = lambda: list(client.stream(items, preset="retinanet_torchvision", canvas=CANVAS))  # noqa: E731
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                # One image each, queued behind the busy worker: the queue is full.
                queued = [pool.submit(call), pool.submit(call)]
                until(lambda: srv.metrics.value("tritarget_queued_images") == 2)
                streamed = pool.submit(stream)
                until(lambda: srv.metrics.value("tritarget_stream_requests_waiting") >= 1)
                with pytest.raises(TargetServiceError) as info:
                    client.assign(GOOD[:1], [1], CANVAS, preset="retinanet_torchvision")
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "stream requests waiting for room" in info.value.details
                gate.set()
                assert all((call.result(30).labels == 1).any() for call in queued)
                for item, got in zip(items, streamed.result(30), strict=True):
                    want = assign(item["gt_boxes"], item["gt_counts"], CANVAS, presets.get("retinanet_torchvision"))
                    assert torch.equal(got.labels, want.labels) and torch.equal(got.matched_gt, want.matched_gt)
        assert srv.metrics.value("tritarget_stream_requests_waiting") == 0
        refused = srv.metrics.value("tritarget_errors_total", {"method": "AssignStream", "code": "RESOURCE_EXHAUSTED"})
        assert not refused


def test_a_full_queue_says_it_passes_and_a_limit_does_not():
    """Both are RESOURCE_EXHAUSTED; only a full queue carries ErrorInfo OVERLOADED and a
    RetryInfo (what a client retries on), a request over a limit nothing (retried, it
    fails again anywhere)."""
    from google.rpc import error_details_pb2

    from tritarget.service.errors import Overloaded, ResourceExhausted
    from tritarget.service.status import status_of

    overloaded = status_of(Overloaded("server overloaded"))
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert [d.Unpack(m) for d, m in zip(overloaded.details, (info, retry))] == [True, True]
    assert (info.reason, info.domain, retry.retry_delay.ToMilliseconds()) == ("OVERLOADED", "tritarget.v1", 100)
    assert overloaded.code == status_of(ResourceExhausted("gt_boxes: over")).code
    assert not status_of(ResourceExhausted("gt_boxes: over")).details
    with ServerThread() as srv, TargetClient(srv.address, timeout=30) as client:
        with pytest.raises(TargetServiceError, match="RESOURCE_EXHAUSTED"):
            client.assign(torch.zeros(0, 4), [0] * 300, CANVAS, preset="retinanet_torchvision")  # over 256 images
        assert client.stats.retries == 0


def test_a_get_anchors_call_past_its_deadline_is_counted_timed_and_logged(caplog, monkeypatch):
    """Cut off by its deadline (its anchors held 1 s here: a large canvas's took 0.05-0.5 s,
    too close to any deadline a test can give), a GetAnchors call was counted as a request
    but not as an error, with no latency and no access-log line."""
    from tritarget.protos import target_assigner_pb2_grpc as pb_grpc
    from tritarget.service import servicer

    cached = servicer.grid_and_anchors
    monkeypatch.setattr(servicer, "grid_and_anchors", lambda *args: (time.sleep(1.0), cached(*args))[1])
    request = pb.GetAnchorsRequest(config=pb.ConfigRef(preset="retinanet_torchvision"), canvas_height=512,
                                   canvas_width=512)  # fmt: skip
    with ServerThread(access_log=True) as srv, grpc.insecure_channel(srv.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # connected: the deadline is the call's alone
        with caplog.at_level(logging.INFO, logger="tritarget.access"):
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.TargetAssignerStub(channel).GetAnchors(request, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            seconds = {"method": "GetAnchors"}
            until(lambda: srv.metrics.value("tritarget_request_seconds_count", seconds) == 1)
            # Written on the server's thread just after the latency is observed.
            until(lambda: any(r.getMessage().startswith("GetAnchors ") and "DEADLINE_EXCEEDED" in r.getMessage()
                               for r in caplog.records))  # fmt: skip
        errors = {"method": "GetAnchors", "code": "DEADLINE_EXCEEDED"}
        assert srv.metrics.value("tritarget_errors_total", errors) == 1


async def _occupy(srv, gate):
    """Hold the server's only compute worker until ``gate`` is set."""
    import asyncio

    asyncio.ensure_future(srv.server.batcher.run(gate.wait))


def test_ignore_regions_at_the_box_limit_are_taken_and_one_more_refused():
    """max_boxes bounds ignore_boxes inclusively, as it does gt_boxes (``>`` not ``>=``)."""
    limited = codec.Limits(max_boxes=2)
    at = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", ignore_boxes=GOOD, ignore_counts=[2])
    assert codec.decode_assign(at, limited).ignore_boxes.shape[0] == 2
    past = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", ignore_boxes=GOOD[[0, 1, 1]],
                         ignore_counts=[3])  # fmt: skip
    with pytest.raises(ResourceExhausted, match=re.escape("ignore_boxes: 3 boxes is over the server's limit of 2")):
        codec.decode_assign(past, limited)


@pytest.mark.parametrize(
    "field, tensor, text",
    [("gt_boxes", GOOD.half(), "gt_boxes: dtype DTYPE_FLOAT16 not allowed here (expected DTYPE_FLOAT32)"),
     ("image_sizes", torch.tensor([[96, 128, 3]], dtype=torch.int32), "image_sizes: expected last dimension 2"),
     ("pad_sizes", torch.tensor([[96, 128, 3]], dtype=torch.int32), "pad_sizes: expected last dimension 2")],
)  # fmt: skip
def test_a_tensor_of_the_wrong_dtype_or_width_is_refused_by_the_codec_naming_it(field, tensor, text):
    """Refused when decoded, before a merged batch sees it: float16 boxes would be read as
    another dtype's values, and a [B, 3] size as something the backend must refuse."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    encode_tensor(tensor, getattr(request, field))
    with pytest.raises(InvalidInput, match=re.escape(text)) as info:
        codec.decode_assign(request, codec.Limits())
    assert info.value.violations[0][0] == field


def test_a_response_that_fits_without_its_id_at_exactly_the_limit_names_the_request_id():
    """``_too_big``: size minus the id's bytes equal to the limit fits without the id (its tag
    and length are not counted), so the id is what is named, not the format."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format="dense", request_id="r" * 100)
    job = codec.decode_assign(request, codec.Limits())
    size = codec.dense_response_bytes(1, resolve_grid(job.config.anchors, CANVAS).num_anchors, request, 0)
    with pytest.raises(ResourceExhausted, match=r"^request_id: the DENSE response \(echoing the 100-byte"):
        codec.decode_assign(request, codec.Limits(max_message_bytes=size - 100))


def test_a_preset_name_of_64_characters_is_quoted_whole_and_one_more_is_clipped():
    """An unknown preset's name is quoted back up to 64 characters; past them, the rest is counted."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.preset = "z" * 64
    with pytest.raises(NotFound, match=f"^config.preset: unknown preset '{'z' * 64}'; known presets: "):
        codec.decode_assign(request, codec.Limits())
    request.config.preset = "z" * 65
    with pytest.raises(NotFound, match=re.escape(f"unknown preset '{'z' * 64}' (1 more characters); known")):
        codec.decode_assign(request, codec.Limits())


def test_json_nested_32_levels_deep_is_not_refused_as_too_deep():
    """The depth limit is inclusive: 32 levels reach the config code (refused there for
    what they hold), 33 are refused as too deep (``test_malformed_messages``)."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.overrides["match.high"] = "[" * 32 + "]" * 32
    with pytest.raises(InvalidInput, match=r"^config.overrides\[match.high\]: match.high: expected a number, got \[\["):
        codec.decode_assign(request, codec.Limits())
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision")
    request.config.ClearField("preset")
    request.config.config_json = '{"anchors": ' + "[" * 31 + "]" * 31 + "}"  # the object is level 1
    with pytest.raises(InvalidInput, match=r"^config.config_json.anchors: expected AnchorConfig, got list"):
        codec.decode_assign(request, codec.Limits())


@pytest.mark.parametrize("boxes", [3, 300])  # listed as Python ints, or scanned in numpy
def test_of_several_classes_out_of_range_the_first_is_named(boxes):
    classes = torch.ones(boxes, dtype=torch.int64)
    request = build_request(GOOD[:1].repeat(boxes, 1), [boxes - 1, 1], CANVAS, gt_classes=classes,
                            preset="retinanet_torchvision")  # fmt: skip
    classes[[-2, -1]] = torch.tensor([-1, 2**40])
    request.gt_classes.CopyFrom(encode_tensor(classes))
    with pytest.raises(InvalidInput, match=f"^gt_classes: image 0, box {boxes - 2}: class -1 is outside"):
        codec.decode_assign(request, codec.Limits())


@pytest.mark.parametrize("format", ["sparse", "dense"])
def test_float16_overflow_names_the_largest_overflowing_magnitude(format):
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format=format, delta_dtype="float16")
    targets = assign(GOOD, [2], CANVAS, presets.get("retinanet_torchvision"), backend="reference")
    positives = torch.nonzero(targets.labels.view(-1) == 1).view(-1)
    targets.deltas.view(-1, 4)[positives[0]] = torch.tensor([1e5, 0.0, 0.0, 0.0])
    targets.deltas.view(-1, 4)[positives[1]] = torch.tensor([0.0, -3e6, 0.0, 0.0])
    with pytest.raises(InvalidInput, match="a delta of magnitude 3e[+]06 does not fit DTYPE_FLOAT16"):
        codec.encode_assign(request, targets)


def test_a_request_id_is_measured_in_bytes_when_it_is_what_does_not_fit():
    """An id of 50 two-byte characters is 100 bytes on the wire: a DENSE response 100 bytes
    over the limit fits without it, so the id is what is named."""
    request = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision", format="dense", request_id="\u00e9" * 50)
    job = codec.decode_assign(request, codec.Limits())
    size = codec.dense_response_bytes(1, resolve_grid(job.config.anchors, CANVAS).num_anchors, request, 0)
    with pytest.raises(ResourceExhausted, match=r"^request_id: the DENSE response \(echoing the 100-byte request_id\)"):
        codec.decode_assign(request, codec.Limits(max_message_bytes=size - 100))


@pytest.mark.parametrize(
    "extra, field, description",
    [(b"\x7a\x00", "return_max_iou", "sent as length-delimited (field number 15), not as its type is"),
     (b"\x2a\x05\x0d\x01\x00\x00\x00", "gt_boxes.dtype", "sent as 32-bit (field number 1), not as its type is"),
     (b"\x12\x02\x18\x07", "config.overrides", "sent as varint (field number 3), not as its type is"),
     (b"\x12\x02\x20\x07", "config", "field number 4 (varint) is not one of tritarget.v1.ConfigRef's on this"),
     # Of two unknown fields, the first is named.
     (b"\x90\x01\x01\x98\x01\x01", "request", "field number 18 (varint) is not one of tritarget.v1.AssignRequest's")],
    ids=["wire_type", "nested_wire_type", "map_wire_type", "nested_unknown", "first_of_two"],
)  # fmt: skip
def test_a_field_sent_as_this_server_does_not_know_it_is_named_by_its_path(extra, field, description):
    """A known field sent with another wire type is named by its path (a nested one under
    its message's field, a top-level one alone); an unknown one by the message holding it."""
    sent = build_request(GOOD, [2], CANVAS, preset="retinanet_torchvision").SerializeToString() + extra
    with pytest.raises(InvalidInput) as info:
        codec.decode_assign(pb.AssignRequest.FromString(sent), codec.Limits())
    assert str(info.value).startswith(f"{field}: {description}")
    assert info.value.violations[0][0] == field
