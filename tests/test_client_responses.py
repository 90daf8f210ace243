"""The client against servers that break the response contract: every malformed response,
out-of-order or missing stream answer is a clear error, never another image's or another
request's targets. The servers are real gRPC servers sending crafted responses (the true
targets, computed in-process, then broken one field at a time)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from test_service_harness import ServerThread, fake_assigner

from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.clients.wire import build_request, decode_response, decode_sparse
from tritarget.kernels import assign, presets
from tritarget.kernels.targets import IGNORED, NEGATIVE
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos.tensors import MAX_ANCHOR_ROWS, encode_tensor
from tritarget.service import codec

CANVAS = (96, 128)
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 90.0, 80.0], [5.0, 5.0, 40.0, 40.0]])
CLASSES = torch.tensor([1, 2, 3], dtype=torch.int32)
CONFIG = presets.get("retinanet_torchvision")
A = assign(BOXES[:1], [1], CANVAS, CONFIG, backend="cpu").num_anchors


def _answer(request: pb.AssignRequest) -> pb.AssignResponse:
    """The response a correct server sends."""
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, gt_classes=job.gt_classes,
                     return_max_iou=job.return_max_iou, backend="cpu")  # fmt: skip
    return codec.encode_assign(request, targets)


def _values(message: pb.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(message.data), dtype=dtype).clone()


def _edit(message: pb.Tensor, dtype: torch.dtype, change) -> None:
    values = _values(message, dtype)
    encode_tensor(change(values), message)


def _set(values: torch.Tensor, index: int, value: int) -> torch.Tensor:
    values[index] = value
    return values


def _image_1_start(response: pb.AssignResponse) -> int:
    return int(_values(response.sparse.positive_offsets, torch.int64)[1])


def _swap_first_two(values: torch.Tensor) -> torch.Tensor:
    values[[0, 1]] = values[[1, 0]]
    return values


def _first_positive(response: pb.AssignResponse) -> int:
    labels = _values(response.dense.labels, torch.int8)
    return int(torch.nonzero(labels == 1)[0])


def _list_a_positive(response: pb.AssignResponse) -> None:
    """Image 0's first positive anchor added, in order, to its ignored list."""
    sparse = response.sparse
    positive = int(_values(sparse.positive_anchors, torch.int32)[0])
    listed = _values(sparse.listed_anchors, torch.int32)
    offsets = _values(sparse.listed_offsets, torch.int64)
    image_0 = listed[: offsets[1]]
    at = int((image_0 < positive).sum())
    encode_tensor(torch.cat([listed[:at], torch.tensor([positive], dtype=torch.int32), listed[at:]]),
                  sparse.listed_anchors)  # fmt: skip
    offsets[1:] += 1
    encode_tensor(offsets, sparse.listed_offsets)


def _reshape(message: pb.Tensor, shape: list[int]) -> None:
    message.shape[:] = shape


SPARSE = {
    "negative class": (
        lambda r: _edit(r.sparse.positive_classes, torch.int32, lambda v: _set(v, 1, -5)),
        r"positive_classes: positive 1: class -5 \(expected 0 to 2147483647\)",
    ),
    "positive anchor past num_anchors (spills into image 1)": (
        lambda r: _edit(r.sparse.positive_anchors, torch.int32, lambda v: _set(v, 0, int(v[0]) + A)),
        r"positive_anchors: image 0 lists anchor \d+, outside \[0, num_anchors=",
    ),
    "negative positive anchor": (
        lambda r: _edit(r.sparse.positive_anchors, torch.int32, lambda v: _set(v, _image_1_start(r), -1)),
        r"positive_anchors: image 1 lists anchor -1, outside",
    ),
    "anchors not ascending": (
        lambda r: _edit(r.sparse.positive_anchors, torch.int32, _swap_first_two),
        r"positive_anchors: image 0 lists anchor \d+ after \d+ \(must ascend\)",
    ),
    "listed anchor past num_anchors": (
        lambda r: _edit(r.sparse.listed_anchors, torch.int32, lambda v: _set(v, -1, A)),
        r"listed_anchors: image 1 lists anchor \d+, outside",
    ),
    "offsets decrease": (
        lambda r: _edit(r.sparse.positive_offsets, torch.int64, lambda v: _set(v, 1, int(v[2]) + 1)),
        r"positive_offsets: must start at 0, never decrease and end at \d+",
    ),
    "offsets start past 0": (
        lambda r: _edit(r.sparse.positive_offsets, torch.int64, lambda v: _set(v, 0, 1)),
        r"positive_offsets: must start at 0",
    ),
    "offsets end short of the list": (
        lambda r: _edit(r.sparse.listed_offsets, torch.int64, lambda v: _set(v, 2, int(v[2]) - 1)),
        r"listed_offsets: must start at 0, never decrease and end at",
    ),
    "offsets one per image, not one more": (
        lambda r: _edit(r.sparse.positive_offsets, torch.int64, lambda v: v[:-1].clone()),
        r"positive_offsets: shape \[2\], expected \[batch_size \+ 1\] = \[3\]",
    ),
    "offsets int32": (
        lambda r: _edit(r.sparse.positive_offsets, torch.int64, lambda v: v.to(torch.int32)),
        r"positive_offsets: dtype DTYPE_INT32 not allowed here",
    ),
    "unlisted label positive": (lambda r: setattr(r.sparse, "unlisted_label", 1), r"listed_label and unlisted_label"),
    "listed label 7": (lambda r: setattr(r.sparse, "listed_label", 7), r"listed_label and unlisted_label"),
    "both labels ignored": (
        lambda r: setattr(r.sparse, "unlisted_label", r.sparse.listed_label),
        r"listed_label and unlisted_label",
    ),
    "batch_size past the lists (phantom images)": (
        lambda r: setattr(r, "batch_size", 5),
        r"batch_size: 5, but the request sent 2 images",
    ),
    "batch_size short of the request": (
        lambda r: setattr(r, "batch_size", 1),
        r"batch_size: 1, but the request sent 2 images",
    ),
    "dropped lists the request did not ask for": (
        lambda r: r.dropped.add().box_index.extend([0]),
        r"dropped: sent, but the request did not ask for it",
    ),
    "matched box past the image's boxes": (
        lambda r: _edit(r.sparse.positive_matched_gt, torch.int32, lambda v: _set(v, 0, 99)),
        r"positive_matched_gt: a positive of image 0 matches box 99 of its 2",
    ),
    "matched box one past the image's boxes": (
        lambda r: _edit(r.sparse.positive_matched_gt, torch.int32, lambda v: _set(v, 0, 2)),
        r"positive_matched_gt: a positive of image 0 matches box 2 of its 2",
    ),
    "no matched box on a positive": (
        lambda r: _edit(r.sparse.positive_matched_gt, torch.int32, lambda v: _set(v, _image_1_start(r), -1)),
        r"positive_matched_gt: a positive of image 1 matches box -1 of its 1",
    ),
    "num_anchors one more than the config's": (
        lambda r: setattr(r, "num_anchors", A + 1),
        rf"num_anchors: {A + 1}, but the request's config has {A} anchors on its canvas",
    ),
    "background class not the config's": (
        lambda r: setattr(r, "background_class", -3),
        r"background_class: -3, but the request's config has 0",
    ),
    "classes missing": (
        lambda r: r.sparse.ClearField("positive_classes"),
        r"classes: missing, but the request asked for it",
    ),
    "matched_gt one short": (
        lambda r: _edit(r.sparse.positive_matched_gt, torch.int32, lambda v: v[:-1].clone()),
        r"positive_matched_gt: shape \[\d+\], expected one per positive anchor",
    ),
    "deltas flattened": (
        lambda r: _edit(r.sparse.positive_deltas, torch.float32, lambda v: v.clone()),
        r"positive_deltas: shape \[\d+\], expected one per positive anchor = \[\d+, 4\]",
    ),
    "classes float32": (
        lambda r: _edit(r.sparse.positive_classes, torch.int32, lambda v: v.to(torch.float32)),
        r"positive_classes: dtype DTYPE_FLOAT32 not allowed here",
    ),
    "no targets": (lambda r: r.ClearField("sparse"), r"holds no targets"),
}

DENSE = {
    "labels [1, 2A]": (
        lambda r: _reshape(r.dense.labels, [1, 2 * A]),
        r"labels: shape \[1, \d+\], expected \[batch_size, num_anchors\] = \[2, \d+\]",
    ),
    "labels [2A]": (
        lambda r: _reshape(r.dense.labels, [2 * A]),
        r"labels: shape \[\d+\], expected \[batch_size, num_anchors\]",
    ),
    "deltas [B, 4A]": (
        lambda r: _reshape(r.dense.deltas, [2, 4 * A]),
        r"deltas: shape \[2, \d+\], expected \[batch_size, num_anchors, 4\]",
    ),
    "matched_gt [A, 2]": (
        lambda r: _reshape(r.dense.matched_gt, [A, 2]),
        r"matched_gt: shape \[\d+, 2\], expected \[batch_size, num_anchors\]",
    ),
    "classes float32": (
        lambda r: encode_tensor(torch.zeros(2, A), r.dense.classes),
        r"classes: dtype DTYPE_FLOAT32 not allowed here",
    ),
    "max_iou int8": (
        lambda r: encode_tensor(torch.zeros(2, A, dtype=torch.int8), r.max_iou),
        r"max_iou: dtype DTYPE_INT8 not allowed here",
    ),
    "max_iou [2A]": (
        lambda r: encode_tensor(torch.zeros(2 * A), r.max_iou),
        r"max_iou: shape \[\d+\], expected \[batch_size, num_anchors\]",
    ),
    "num_anchors one short": (
        lambda r: setattr(r, "num_anchors", A - 1),
        rf"num_anchors: {A - 1}, but the request's config has {A} anchors on its canvas",
    ),
    "dropped lists the request did not ask for": (
        lambda r: r.dropped.add().box_index.extend([0]),
        r"dropped: sent, but the request did not ask for it",
    ),
    "negative class": (  # decode_sparse(...).to_dense() refused it, decode_response took it
        lambda r: _edit(r.dense.classes, torch.int32, lambda v: _set(v, A + 3, -5).view(2, A)),
        r"classes: image 1, anchor 3: class -5 \(expected 0 to 2147483647\)",
    ),
    "label 5": (
        lambda r: _edit(r.dense.labels, torch.int8, lambda v: _set(v, 7, 5).view(2, A)),
        r"labels: image 0, anchor 7: label 5 \(expected 1, 0 or -1\)",
    ),
    "matched box past the image's boxes": (
        lambda r: _edit(r.dense.matched_gt, torch.int32, lambda v: _set(v, _first_positive(r), 1000).view(2, A)),
        r"matched_gt: image 0, anchor \d+ \(label 1\) matches box 1000 of its 2",
    ),
    "no matched box on a positive": (
        lambda r: _edit(r.dense.matched_gt, torch.int32, lambda v: _set(v, _first_positive(r), -1).view(2, A)),
        r"matched_gt: image 0, anchor \d+ \(label 1\) matches box -1 of its 2",
    ),
    "label -2": (  # below ignored: a mutation review found no case that held it
        lambda r: _edit(r.dense.labels, torch.int8, lambda v: _set(v, 7, -2).view(2, A)),
        r"labels: image 0, anchor 7: label -2 \(expected 1, 0 or -1\)",
    ),
    "matched box -5 on a negative": (
        lambda r: _edit(r.dense.matched_gt, torch.int32, lambda v: _set(v, A + 3, -5).view(2, A)),
        r"matched_gt: image 1, anchor 3 \(label 0\) matches box -5 of its 1",
    ),
    "matched box past the image's boxes on a negative": (
        lambda r: _edit(r.dense.matched_gt, torch.int32, lambda v: _set(v, A + 3, 1).view(2, A)),
        r"matched_gt: image 1, anchor 3 \(label 0\) matches box 1 of its 1",
    ),
    "max_iou missing": (lambda r: r.ClearField("max_iou"), r"max_iou: missing, but the request asked for it"),
    "matched box -2 on a negative": (  # -1 (none) is the only negative box: -2 is no nearer a valid one
        lambda r: _edit(r.dense.matched_gt, torch.int32, lambda v: _set(v, A + 3, -2).view(2, A)),
        r"matched_gt: image 1, anchor 3 \(label 0\) matches box -2 of its 1",
    ),
    "class -1": (  # the largest negative class: the bound is 0, not below -1
        lambda r: _edit(r.dense.classes, torch.int32, lambda v: _set(v, A + 3, -1).view(2, A)),
        r"classes: image 1, anchor 3: class -1 \(expected 0 to 2147483647\)",
    ),
}


@pytest.fixture(scope="module")
def breaking_server_once():
    """A server whose Assign answers correctly, then applies ``break_it`` to the response;
    AssignStream answers its requests as ``stream_mode`` says."""

    class Server:
        break_it = staticmethod(lambda response: None)
        stream_mode = "in order"
        calls = 0

    def unary(raw: bytes, context) -> bytes:
        Server.calls += 1
        response = _answer(pb.AssignRequest.FromString(raw))
        Server.break_it(response)
        return response.SerializeToString()

    def stream(raws, context):
        Server.calls += 1
        if Server.stream_mode == "ends early":  # answers the first request and ends, reading no more
            yield _answer(pb.AssignRequest.FromString(next(raws))).SerializeToString()
            return
        requests = [pb.AssignRequest.FromString(raw) for raw in raws]
        responses = [_answer(request) for request in requests]
        if Server.stream_mode == "swapped":
            responses[0], responses[1] = responses[1], responses[0]
        elif Server.stream_mode == "one extra":
            responses.append(responses[-1])
        elif Server.stream_mode == "one missing":
            responses.pop()
        elif Server.stream_mode == "ids not echoed":
            for response in responses:
                response.request_id = ""
        for response in responses:
            yield response.SerializeToString()

    with fake_assigner(unary, stream) as address, TargetClient(address, timeout=30) as client:
        Server.address, Server.client = address, client
        yield Server


@pytest.fixture
def breaking_server(breaking_server_once):
    """The module's breaking server, answering correctly again after each test."""
    yield breaking_server_once
    breaking_server_once.break_it = staticmethod(lambda response: None)
    breaking_server_once.stream_mode = "in order"


def _assign(client, **kwargs):
    return client.assign(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision", gt_classes=CLASSES, **kwargs)


def test_a_correct_response_decodes_to_the_in_process_targets(breaking_server):
    expected = assign(BOXES, [2, 1], CANVAS, CONFIG, gt_classes=CLASSES, backend="cpu")
    for kwargs in ({}, {"format": "dense"}, {"return_max_iou": True}):
        targets = _assign(breaking_server.client, **kwargs)
        assert torch.equal(targets.labels, expected.labels) and torch.equal(targets.classes, expected.classes)
    sparse = _assign(breaking_server.client, densify=False)
    assert torch.equal(sparse.to_dense().labels, expected.labels)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_a_response_without_images_is_refused_when_the_request_is_not_known(decode):
    """Decoded on its own (no request to compare with), a response of no images still breaks
    the contract: every request holds at least one image."""
    response = pb.AssignResponse(batch_size=0, num_anchors=4)
    response.sparse.listed_label, response.sparse.unlisted_label = IGNORED, NEGATIVE
    with pytest.raises(ValueError, match=r"^malformed response: batch_size: must be >= 1"):
        decode(response)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
@pytest.mark.parametrize("known", [False, True], ids=["no-request", "unknown-preset"])
def test_a_response_whose_anchors_the_client_cannot_count_is_bounded(decode, known):
    """A 100-byte SPARSE response claiming 2**40 anchors (a preset this client does not
    know, or no request) made the client allocate terabytes (an OSError) to densify it."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision")
    response = _answer(request)
    request.config.preset = "a_newer_servers_preset"
    response.num_anchors = 2**40
    with pytest.raises(ValueError, match=r"^malformed response: num_anchors: 1099511627776 x batch_size 2 is over"):
        decode(response, request if known else None)
    response.num_anchors = MAX_ANCHOR_ROWS // 2 + 1
    with pytest.raises(ValueError, match=r"num_anchors: \d+ x batch_size 2 is over the service's 33,554,432"):
        decode(response, request if known else None)


@pytest.mark.parametrize("densify", [True, False], ids=["densified", "sparse"])
@pytest.mark.parametrize("case", list(SPARSE))
def test_a_malformed_sparse_response_is_refused_naming_the_field(breaking_server, case, densify):
    breaking_server.break_it, expected = SPARSE[case]
    with pytest.raises(ValueError, match=rf"^malformed response: {expected}"):
        _assign(breaking_server.client, densify=densify)


@pytest.mark.parametrize("case", list(DENSE))
def test_a_malformed_dense_response_is_refused_naming_the_field(breaking_server, case):
    breaking_server.break_it, expected = DENSE[case]
    with pytest.raises(ValueError, match=rf"^malformed response: {expected}"):
        _assign(breaking_server.client, format="dense", return_max_iou=True)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_dropped_lists_hold_ascending_indices_of_their_images_boxes(decode):
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision", drop_invalid=True)
    response = _answer(request)
    assert [list(d.box_index) for d in response.dropped] == [[], []]
    decode(response, request)
    for image, indices, text in [(1, [1], r"image 1 lists boxes \[1\] \(of 1 boxes\)"),
                                 (0, [1, 0], r"image 0 lists boxes \[1, 0\] \(of 2 boxes\)"),
                                 (0, [-1], r"image 0 lists boxes \[-1\] \(of 2 boxes\)"),
                                 (0, [1, 1], r"image 0 lists boxes \[1, 1\] \(of 2 boxes\)")]:  # fmt: skip
        broken = pb.AssignResponse.FromString(response.SerializeToString())
        broken.dropped[image].box_index.extend(indices)
        with pytest.raises(ValueError, match=rf"^malformed response: dropped: {text}; expected ascending"):
            decode(broken, request)
    broken = pb.AssignResponse.FromString(response.SerializeToString())
    broken.dropped[1].ignore_box_index.append(0)  # the request sent no ignore region
    with pytest.raises(ValueError, match=r"^malformed response: dropped: image 1 lists ignore regions \[0\] \(of 0 "
                                         r"ignore regions\); expected ascending"):  # fmt: skip
        decode(broken, request)
    del response.dropped[1]
    with pytest.raises(ValueError, match=r"^malformed response: dropped: 1 lists, expected one per image \(2\)"):
        decode(response, request)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_a_decoded_responses_empty_dropped_lists_are_its_own(decode):
    """One tensor shared by every image that lost no box, resized and filled through one
    decoded response, showed in every later one."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision")
    response = _answer(request)
    first = decode(response, request)
    first.dropped[0].resize_(2).fill_(5)
    later = decode(response, request)
    assert [d.tolist() for d in later.dropped + later.dropped_ignore] == [[]] * 4


def test_an_anchor_both_positive_and_ignored_is_refused_where_the_lists_are_densified(breaking_server):
    """Decoding a SPARSE response densifies it (a gather finds it); ``densify=False`` keeps
    the lists as they came, and ``to_dense`` refuses them."""
    breaking_server.break_it = _list_a_positive
    both = r"positive_anchors: image 0 lists anchor \d+ as positive and as ignored"
    with pytest.raises(ValueError, match=rf"^malformed response: {both}"):
        _assign(breaking_server.client)
    sparse = _assign(breaking_server.client, densify=False)
    with pytest.raises(ValueError, match=rf"^{both}"):
        sparse.to_dense()


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_an_anchor_listed_positive_and_negative_is_refused_densified_or_not(decode):
    """Where sampling leaves most anchors ignored the response lists the negatives; one
    listed as positive too was refused where the lists were densified, and kept as a
    positive by ``decode_sparse`` (review 48)."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="rpn_mmdet", seed=1)
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, seed=1, backend="cpu")
    response = codec.encode_assign(request, targets)
    assert response.sparse.listed_label == NEGATIVE
    _list_a_positive(response)
    with pytest.raises(ValueError, match=r"^malformed response: positive_anchors: image 0 lists anchor \d+ as "
                                         r"positive and as negative$"):  # fmt: skip
        decode(response, request)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_without_its_request_a_response_is_still_checked_for_what_no_request_allows(decode):
    """Decoded on its own: a positive matching no box."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision")
    broken = _answer(request)
    _edit(broken.sparse.positive_matched_gt, torch.int32, lambda v: _set(v, 0, -1))
    with pytest.raises(ValueError, match=r"^malformed response: positive_matched_gt: a positive of image 0 "
                                         r"matches box -1$"):  # fmt: skip
        decode(broken)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_without_its_request_more_dropped_lists_than_images_are_refused(decode):
    """Decoded on its own, a response holds no dropped lists or one per image: one more
    would hand back a list for an image the batch does not have."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision", drop_invalid=True)
    response = _answer(request)
    assert len(decode(response).dropped) == 2
    response.dropped.add()
    with pytest.raises(ValueError, match=r"^malformed response: dropped: 3 lists, expected none or one per image "
                                         r"\(2\)$"):  # fmt: skip
        decode(response)


def test_decode_sparse_of_a_response_listing_the_negatives_splits_the_ignored_anchors_by_image():
    """Where the server listed the negatives, decode_sparse finds the ignored anchors and
    their per-image offsets (from 0, one image after the other) itself: densified, they
    are the labels decode_response gives."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="rpn_mmdet", seed=1)
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, seed=1, backend="cpu")
    response = codec.encode_assign(request, targets)
    assert response.sparse.listed_label == NEGATIVE
    sparse = decode_sparse(response, request)
    ignored = (targets.labels == IGNORED).sum(dim=1)
    assert sparse.ignored_offsets.tolist() == [0, int(ignored[0]), int(ignored.sum())]
    assert torch.equal(sparse.to_dense().labels, decode_response(response, request).labels)
    assert torch.equal(sparse.to_dense().labels, targets.labels)


@pytest.mark.parametrize("decode", [decode_response, decode_sparse])
def test_a_response_of_no_anchors_is_refused(decode):
    """Every config has anchors on its canvas. Decoded without its request, 37 bytes claiming
    10**5 images of no anchors took 1.3 s and 300 MB (two tensors per image), 4 * 10**6
    took 34 s and 3.5 GB, and 2**31 - 1 images fit the field."""
    response = pb.AssignResponse(batch_size=10**5, num_anchors=0)
    for name, dtype, shape in (("labels", pb.DTYPE_INT8, [10**5, 0]), ("matched_gt", pb.DTYPE_INT32, [10**5, 0]),
                               ("deltas", pb.DTYPE_FLOAT32, [10**5, 0, 4])):  # fmt: skip
        getattr(response.dense, name).dtype = dtype
        getattr(response.dense, name).shape[:] = shape
    sparse = pb.AssignResponse(batch_size=10**5, num_anchors=0)
    sparse.sparse.listed_label, sparse.sparse.unlisted_label = IGNORED, NEGATIVE
    for broken in (response, sparse) if decode is decode_response else (sparse,):
        with pytest.raises(ValueError, match=r"^malformed response: num_anchors: must be >= 1 \(every config has "
                                             r"anchors on its canvas\), got 0$"):  # fmt: skip
            decode(broken)


@pytest.mark.parametrize(
    "anchors, text",
    [(torch.arange(10), r"anchors: dtype DTYPE_INT64 not allowed here"),
     (torch.zeros(10, 4), r"anchors: 10 rows, but the config has \d+ anchors on the canvas"),
     (torch.zeros(A, 2), r"anchors: expected last dimension 4")],
)  # fmt: skip
def test_anchors_from_a_server_are_checked(anchors, text):
    def get_anchors(raw: bytes, context) -> bytes:
        return pb.GetAnchorsResponse(anchors=encode_tensor(anchors)).SerializeToString()

    with (
        fake_assigner(None, None, get_anchors) as address,
        TargetClient(address, timeout=30, retries=0) as client,
    ):
        with pytest.raises(ValueError, match=rf"^malformed response: {text}"):
            client.get_anchors(CANVAS, preset="retinanet_torchvision")


def test_get_anchors_takes_the_canvas_as_assign_does(breaking_server):
    """A float side is refused, not truncated to another canvas's anchors."""
    with pytest.raises(TypeError, match=r"canvas: expected two ints \(height, width\), got \(96.5, 128\)"):
        breaking_server.client.get_anchors((96.5, 128), preset="retinanet_torchvision")


ITEMS = [{"gt_boxes": BOXES[:1], "gt_counts": [1]}, {"gt_boxes": BOXES, "gt_counts": [2, 1]}]
STREAM_ERRORS = {
    "swapped": r"request_id '1' where the answer to '0' was due",
    "one extra": r"an answer with no request outstanding",
    "one missing": r"the stream ended OK with 1 of its requests unanswered",
}


@pytest.mark.parametrize("mode", list(STREAM_ERRORS))
def test_a_stream_answered_out_of_order_or_not_one_for_one_is_refused(breaking_server, mode):
    breaking_server.stream_mode = mode
    with pytest.raises(ValueError, match=rf"^malformed response: {STREAM_ERRORS[mode]}"):
        list(breaking_server.client.stream(ITEMS, preset="retinanet_torchvision", canvas=CANVAS))


def test_a_stream_that_raises_ends_its_call_there_and_then():
    """A stream that fails (here: an answer to another request) cancels its call as it
    raises, not once the exception is let go: a caller that keeps the error (a log, a
    retry loop, ``pytest.raises``) must not keep the server's stream open and the
    stream's source being read and sent."""
    ended, read = threading.Event(), []

    def stream(raws, context):
        context.add_callback(ended.set)
        first = pb.AssignRequest.FromString(next(raws))
        answer = _answer(first)
        answer.request_id = f"not {first.request_id}"
        yield answer.SerializeToString()
        for _ in raws:  # reads on until the call ends
            pass

    def source():
        while True:
            read.append(1)
            yield ITEMS[0]

    with fake_assigner(lambda raw, context: b"", stream) as address, TargetClient(address, timeout=30) as client:
        with pytest.raises(ValueError, match="malformed response: request_id 'not 0'") as info:
            list(client.stream(source(), preset="retinanet_torchvision", canvas=CANVAS))
        assert ended.wait(10), f"the server's stream is still open, {len(read)} requests read"
        assert info.value is not None  # the error still held


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_stream_ended_ok_before_its_requests_were_all_sent_is_refused(breaking_server, asynchronous):
    """The requests a stream had not read from its source yet were never sent, and nothing
    said so: the caller got fewer answers than requests (a data loader: an IndexError)."""
    breaking_server.stream_mode = "ends early"
    later = threading.Event()

    def items():  # the second request is not ready when the server ends the stream
        yield ITEMS[0]
        later.wait(10)
        yield ITEMS[1]

    async def async_items():
        yield ITEMS[0]
        await asyncio.sleep(10)
        yield ITEMS[1]

    async def run():
        async with AsyncTargetClient(breaking_server.address, timeout=30) as client:
            return [t async for t in client.stream(async_items(), preset="retinanet_torchvision", canvas=CANVAS)]

    def sync_run():
        return list(breaking_server.client.stream(items(), preset="retinanet_torchvision", canvas=CANVAS))

    try:
        with pytest.raises(ValueError, match=r"^malformed response: the stream ended OK before all its requests were "
                                             r"sent"):  # fmt: skip
            asyncio.run(run()) if asynchronous else sync_run()
    finally:
        later.set()


def test_the_async_stream_refuses_answers_out_of_order(breaking_server):
    breaking_server.stream_mode = "swapped"

    async def run():
        async with AsyncTargetClient(breaking_server.address, timeout=30) as client:
            return [t async for t in client.stream(ITEMS, preset="retinanet_torchvision", canvas=CANVAS)]

    with pytest.raises(ValueError, match=rf"^malformed response: {STREAM_ERRORS['swapped']}"):
        asyncio.run(run())


def test_answers_without_an_echoed_id_pair_by_position(breaking_server):
    """A server echoes an empty request_id for an item it could not parse: such answers
    are paired by their place in the stream."""
    breaking_server.stream_mode = "ids not echoed"
    got = list(breaking_server.client.stream(ITEMS, preset="retinanet_torchvision", canvas=CANVAS))
    for item, targets in zip(ITEMS, got, strict=True):
        assert torch.equal(targets.labels, assign(item["gt_boxes"], item["gt_counts"], CANVAS, CONFIG).labels)


def test_sparse_targets_with_max_iou_are_refused_before_any_call(breaking_server):
    """SparseTargets hold no max IoU: asking for both would drop what the server sent."""
    calls = breaking_server.calls
    client = breaking_server.client
    with pytest.raises(ValueError, match="densify=False returns SparseTargets, which hold no max IoU"):
        _assign(client, densify=False, return_max_iou=True)
    with pytest.raises(ValueError, match="densify=False returns SparseTargets, which hold no max IoU"):
        list(client.stream(ITEMS, densify=False, return_max_iou=True, preset="retinanet_torchvision", canvas=CANVAS))
    assert breaking_server.calls == calls
    ready = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision", return_max_iou=True)
    with pytest.raises(ValueError, match="stream item 0: densify=False returns SparseTargets, which hold no max IoU"):
        list(client.stream([ready], densify=False))  # a ready request too (its answer was refused)


def test_decode_sparse_refuses_a_response_that_holds_max_iou():
    """What the stream now refuses before sending: a server's answer with max IoU, which
    SparseTargets would drop."""
    request = build_request(BOXES, [2, 1], CANVAS, preset="retinanet_torchvision", return_max_iou=True)
    targets = assign(BOXES, [2, 1], CANVAS, presets.get("retinanet_torchvision"), return_max_iou=True,
                     backend="reference")  # fmt: skip
    response = codec.encode_assign(request, targets)
    assert response.HasField("max_iou")
    with pytest.raises(ValueError, match="decode_sparse: the response holds max IoU"):
        decode_sparse(response, request)


class _AssignInCollate:
    """A collate that gets each batch's targets from the service (the batch's boxes are bad)."""

    def __init__(self, client: TargetClient) -> None:
        self.client = client

    def __call__(self, batch):
        boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [float("nan"), 0.0, 10.0, 10.0]])
        return self.client.assign(boxes, [2], CANVAS, preset="retinanet_torchvision")


def test_a_service_error_in_a_data_loader_worker_reaches_the_trainer_with_its_code():
    """torch re-raises a worker's exception as ``type(exc)(message)``: the trainer catches
    ``TargetServiceError`` with the server's code, not a RuntimeError."""
    with ServerThread() as server:
        client = TargetClient(server.address, timeout=30)
        loader = torch.utils.data.DataLoader(range(2), batch_size=2, num_workers=1,
                                             collate_fn=_AssignInCollate(client))  # fmt: skip
        with pytest.raises(TargetServiceError) as caught:
            next(iter(loader))
        client.close()
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("gt_boxes: image 0, box 1: coordinates are not finite"), error.details
    assert "DataLoader worker process 0" in str(error)  # the worker's traceback is kept


@pytest.mark.parametrize(
    ("message", "code", "details"),
    [
        ("NOT_FOUND: no preset 'x'", grpc.StatusCode.NOT_FOUND, "no preset 'x'"),
        ("Caught TargetServiceError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
         '  File "w.py", line 1, in f\ntritarget.clients.client.TargetServiceError: UNAVAILABLE: gone\nfor good\n',
         grpc.StatusCode.UNAVAILABLE, "gone\nfor good"),
        # Chained tracebacks (an error raised while handling another): the last one's error is the one raised.
        ("Caught TargetServiceError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
         '  File "w.py", line 1, in f\ntritarget.clients.client.TargetServiceError: NOT_FOUND: first\n\n'
         "During handling of the above exception, another exception occurred:\n\nTraceback (most recent call "
         'last):\n  File "w.py", line 2, in f\ntritarget.clients.client.TargetServiceError: UNAVAILABLE: last\n',
         grpc.StatusCode.UNAVAILABLE, "last"),
        ("no code here", grpc.StatusCode.UNKNOWN, "no code here"),
        ("NOT_A_CODE: text", grpc.StatusCode.UNKNOWN, "NOT_A_CODE: text"),
    ],
)  # fmt: skip
def test_a_service_error_rebuilt_from_its_message_has_its_code(message, code, details):
    error = TargetServiceError(message)
    assert (error.code, error.details, str(error)) == (code, details, message)


def test_a_status_whose_trailers_disagree_with_it_is_the_calls_own():
    """A proxy may rewrite a call's status and keep the server's ``google.rpc.Status``
    trailer: grpcio's reader raised ValueError ("Code in Status proto ... mismatches"),
    which escaped the client unnamed. The call's own code and message are what it gets."""
    from google.rpc import status_pb2

    def unary(request, context):
        rich = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="server overloaded")
        context.set_trailing_metadata((("grpc-status-details-bin", rich.SerializeToString()),))
        context.abort(grpc.StatusCode.INTERNAL, "rewritten by a proxy")

    with fake_assigner(unary, None) as address, TargetClient(address, timeout=30) as client:
        with pytest.raises(TargetServiceError) as info:
            client.assign(BOXES, [3], CANVAS, preset="retinanet_torchvision")
    assert (info.value.code, info.value.details) == (grpc.StatusCode.INTERNAL, "rewritten by a proxy")


UNPARSABLE = b"\x0a\x40"  # field 1: 64 bytes follow, and none do


@pytest.mark.parametrize("method", ["assign", "stream", "get_anchors"])
def test_bytes_that_do_not_parse_are_the_same_error_in_both_clients(method):
    """grpc.aio logs a response it cannot parse and hands the client None: the async client
    failed with AttributeError ('NoneType' object has no attribute 'ByteSize'), where the
    blocking client raises INTERNAL."""

    def stream(raws, context):
        for _ in raws:
            yield UNPARSABLE

    def call(client):
        if method == "assign":
            return client.assign(BOXES, [3], CANVAS, preset="retinanet_torchvision")
        if method == "get_anchors":
            return client.get_anchors(CANVAS, preset="retinanet_torchvision")
        return client.stream([{"gt_boxes": BOXES, "gt_counts": [3]}], preset="retinanet_torchvision", canvas=CANVAS)

    def blocking(address):
        with TargetClient(address, timeout=30) as client:
            answer = call(client)
            return list(answer) if method == "stream" else answer

    async def asynchronous(address):
        async with AsyncTargetClient(address, timeout=30) as client:
            answer = call(client)
            return [item async for item in answer] if method == "stream" else await answer

    unparsable = lambda raw, context: UNPARSABLE  # noqa: E731
    with fake_assigner(unparsable, stream, unparsable) as address:
        for run in (lambda: blocking(address), lambda: asyncio.run(asynchronous(address))):
            with pytest.raises(TargetServiceError) as info:
                run()
            assert (info.value.code, info.value.details) == (
                grpc.StatusCode.INTERNAL,
                "Exception deserializing response!",
            )


@pytest.mark.parametrize("sparse_lists", [False, True], ids=["from dense targets", "from sparse lists"])
def test_a_sparse_response_densifies_its_classes_with_the_configs_background_class(sparse_lists):
    """Every preset's background class is 0: a config whose is 80 (COCO's classes 0-79) got
    class 0, a real class, on every anchor that is not positive, were it densified with 0."""
    from tritarget.kernels import assign_sparse

    config = CONFIG.replace(background_class=80)
    request = build_request(BOXES, [2, 1], CANVAS, config=config, gt_classes=CLASSES, return_classes=True)
    targets = assign(BOXES, [2, 1], CANVAS, config, gt_classes=CLASSES, backend="cpu")
    computed = assign_sparse(BOXES, [2, 1], CANVAS, config, gt_classes=CLASSES, backend="cpu") if sparse_lists \
        else targets  # fmt: skip
    got = decode_response(codec.encode_assign(request, computed), request)
    assert (got.classes[got.labels != 1] == 80).all() and (targets.classes[targets.labels != 1] == 80).all()
    for name in ("labels", "matched_gt", "classes", "deltas"):
        assert torch.equal(getattr(got, name), getattr(targets, name)), name
