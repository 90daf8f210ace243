"""SPARSE requests are computed sparse end to end and answered with the same bytes.

A batch whose every request is SPARSE (none asks for max IoU, the config does not
sample) runs ``assign_sparse`` and encodes the responses straight from its lists. The
old path (dense targets, then the encoder's label scan) stays: for a request whose
response lists the negative anchors (rarer than ignored over the whole request), its
lists are densified first, and batches with a DENSE or max-IoU request or a sampling
config compute dense targets. Every response here must be byte for byte what the old
path gives the request: in the batcher with real merged batches, and over gRPC.
"""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
import torch
from test_service_harness import ServerThread, batching

from support import random_batch
from tritarget.clients.wire import build_request
from tritarget.kernels import SparseTargets, Targets, assign_sparse, presets
from tritarget.kernels.targets import IGNORED, NEGATIVE
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos import target_assigner_pb2_grpc as pb_grpc
from tritarget.service.backend import Batcher, BatchOptions, _sparse_to_host
from tritarget.service.codec import Limits, _nonzero_int8, decode_assign, encode_assign

CANVAS = (96, 128)
# Anchors with IoU below 0 are negative: none in an image with boxes, so there the ignored
# ones outnumber the negative ones and the response lists the negatives.
NO_NEGATIVES = {"match.low": 0.0}
INVALID = torch.tensor([[50.0, 10.0, 50.0, 30.0]])  # x2 == x1: dropped with drop_invalid


@pytest.fixture(scope="module", params=["cpu", "reference"])
def batcher(request):
    batcher = Batcher(request.param, BatchOptions(max_batch_images=64))
    yield batcher
    batcher.stop_workers()


def _request(generator, counts, *, preset="retinanet_torchvision", canvas=CANVAS, classes=True, invalid=(), **kwargs):
    """A request for random boxes; ``invalid``: images that get one degenerate box first."""
    boxes, counts = random_batch(generator, counts, canvas)
    for image in invalid:
        at = sum(counts[:image])
        boxes = torch.cat([boxes[:at], INVALID, boxes[at:]])
        counts[image] += 1
    gt_classes = torch.randint(1, 81, (boxes.shape[0],), generator=generator, dtype=torch.int32) if classes else None
    return build_request(boxes, counts, canvas, preset=preset, gt_classes=gt_classes, **kwargs)


def _old_path(batcher: Batcher, request: pb.AssignRequest) -> bytes:
    """The response as before: the request's dense targets alone (seeds are per image, so
    batch mates change nothing), then the dense encoder."""
    job = decode_assign(request, Limits())
    job.sparse = False
    return encode_assign(request, batcher._assign([job])).SerializeToString(deterministic=True)


def _through_batcher(batcher: Batcher, requests: list[pb.AssignRequest]) -> list[pb.AssignResponse]:
    """The requests as one merged batch, encoded on the worker as the servicer does."""
    jobs = [decode_assign(r, Limits()) for r in requests]
    responses = batcher._compute(jobs, [functools.partial(encode_assign, r) for r in requests])
    for response in responses:
        assert isinstance(response, pb.AssignResponse), response
    return responses


def _assert_same_bytes(batcher, requests, responses):
    for request, response in zip(requests, responses):
        assert response.SerializeToString(deterministic=True) == _old_path(batcher, request)


def _runs_sparse(batcher, requests) -> bool:
    return isinstance(batcher._assign([decode_assign(r, Limits()) for r in requests]), SparseTargets)


CASES = {
    "random": lambda g: [_request(g, [3, 0, 1, 7], seed=5), _request(g, [2, 5]), _request(g, [9])],
    "empty_images": lambda g: [_request(g, [0]), _request(g, [0, 0, 0]), _request(g, [0, 4])],
    "crowded": lambda g: [_request(g, [120, 0]), _request(g, [60])],
    "dropped_boxes": lambda g: [
        _request(g, [2, 3, 0], invalid=(1,), drop_invalid=True),
        _request(g, [0, 1], invalid=(0, 1), drop_invalid=True),
    ],
    "no_classes": lambda g: [_request(g, [3, 2], classes=False), _request(g, [1], classes=False)],
    "classes_not_returned": lambda g: [
        _request(g, [3, 2], return_classes=False),
        _request(g, [4], return_classes=False),
    ],
    "float16_and_float32": lambda g: [_request(g, [3, 2], delta_dtype="float16"), _request(g, [4])],
    "detectron2": lambda g: [_request(g, [4, 1], preset="retinanet_detectron2", canvas=(80, 112))],
    "mmdet_ignore_regions": lambda g: [
        _request(
            g,
            [3, 2],
            preset="retinanet_mmdet",
            overrides={"match.ignore_iof_thr": 0.5},
            ignore_boxes=torch.tensor([[10.0, 10.0, 60.0, 50.0]]),
            ignore_counts=[1, 0],
            image_sizes=torch.tensor([[96, 128], [80, 100]]),
        ),
        _request(g, [2], preset="retinanet_mmdet", overrides={"match.ignore_iof_thr": 0.5}),
    ],  # fmt: skip
    "ssd": lambda g: [
        _request(g, [2, 6], preset="ssd300_torchvision", canvas=(300, 300)),
        _request(g, [1], preset="ssd300_torchvision", canvas=(300, 300)),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_batch_answers_the_same_bytes(batcher, generator, case):
    requests = CASES[case](generator)
    assert _runs_sparse(batcher, requests)
    responses = _through_batcher(batcher, requests)
    _assert_same_bytes(batcher, requests, responses)
    for response in responses:
        assert response.sparse.listed_label == IGNORED  # encoded from the lists


def test_as_many_ignored_as_negative_anchors_lists_the_ignored_from_either_form():
    """At a tie over the request, dense targets and sparse lists answer the same bytes: both
    list the ignored anchors (listing the negatives from one of them reads the same, once
    decoded, but breaks the same-bytes promise)."""
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]], dtype=torch.int8)
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 0], deltas[1, 1] = torch.tensor([0.5, -0.25, 0.1, 0.2]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    targets = Targets(labels=labels, matched_gt=torch.tensor([[0, -1, -1], [-1, 1, -1]], dtype=torch.int32),
                      deltas=deltas)  # fmt: skip
    request = pb.AssignRequest(format=pb.FORMAT_SPARSE)
    dense, sparse = encode_assign(request, targets), encode_assign(request, targets.to_sparse())
    assert dense.sparse.listed_label == IGNORED and dense.sparse.unlisted_label == NEGATIVE
    assert dense.SerializeToString() == sparse.SerializeToString()


def test_negatives_rarer_than_ignored_falls_back_per_request(batcher, generator):
    """The listed label is decided over a whole request: a request of one crowded image
    lists its negatives (densified, then scanned), one with an empty image too lists its
    ignored anchors (from the lists), in the same merged batch."""
    requests = [_request(generator, [6], overrides=NO_NEGATIVES), _request(generator, [6, 0], overrides=NO_NEGATIVES)]
    assert _runs_sparse(batcher, requests)
    responses = _through_batcher(batcher, requests)
    _assert_same_bytes(batcher, requests, responses)
    assert [r.sparse.listed_label for r in responses] == [NEGATIVE, IGNORED]


def test_sampling_batches_stay_dense_and_keep_their_seeds(batcher, generator):
    """RPN sampling leaves most anchors ignored: the responses list the negatives, which
    take the dense labels, so the batch computes them at once."""
    kwargs = dict(preset="fasterrcnn_rpn_torchvision", canvas=(64, 96))
    requests = [_request(generator, [3, 0], seed=7, **kwargs), _request(generator, [1, 2, 4], seed=100, **kwargs)]
    assert not _runs_sparse(batcher, requests)
    responses = _through_batcher(batcher, requests)
    _assert_same_bytes(batcher, requests, responses)
    assert {r.sparse.listed_label for r in responses} == {NEGATIVE}


@pytest.mark.parametrize(
    "make",
    [
        lambda g: [_request(g, [3, 1], format="dense"), _request(g, [2])],  # DENSE and SPARSE merge
        lambda g: [_request(g, [2]), _request(g, [3, 1], format="dense")],  # the DENSE one not first
        lambda g: [_request(g, [3, 1], return_max_iou=True), _request(g, [2], return_max_iou=True)],
    ],
    ids=["with_a_dense_request", "with_a_dense_request_after_a_sparse_one", "with_max_iou"],
)
def test_batches_that_need_dense_targets_stay_dense(batcher, generator, make):
    requests = make(generator)
    assert not _runs_sparse(batcher, requests)
    _assert_same_bytes(batcher, requests, _through_batcher(batcher, requests))


def test_sparse_to_host_packs_and_restores_every_list(generator):
    """One copy for all lists (run on CUDA when there is one, into pinned memory): same
    values, dtypes, shapes; the bytes it reports are the lists' bytes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    boxes, counts = random_batch(generator, [5, 0, 3], CANVAS)
    classes = torch.randint(1, 81, (boxes.shape[0],), generator=generator)
    backend = "triton" if device == "cuda" else "cpu"
    sparse = assign_sparse(boxes.to(device), counts, CANVAS, presets.get("retinanet_torchvision"),
                           gt_classes=classes.to(device), backend=backend)  # fmt: skip
    for deltas, with_classes in ((torch.float32, True), (torch.float16, False)):
        given = SparseTargets(
            sparse.num_anchors, sparse.positive_offsets, sparse.positive_anchors, sparse.positive_matched_gt,
            sparse.positive_deltas.to(deltas), sparse.ignored_offsets, sparse.ignored_anchors,
            sparse.positive_classes if with_classes else None, sparse.background_class, sparse.dropped,
        )  # fmt: skip
        host, copied = _sparse_to_host(given)
        listed = [getattr(given, name) for name in ("positive_offsets", "positive_anchors", "positive_matched_gt",
                  "positive_deltas", "ignored_offsets", "ignored_anchors", "positive_classes")]  # fmt: skip
        assert copied == sum(t.numel() * t.element_size() for t in listed if t is not None)
        assert host.positive_anchors.is_pinned() == (device == "cuda")
        for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas",
                     "ignored_offsets", "ignored_anchors", "positive_classes"):  # fmt: skip
            ours, theirs = getattr(host, name), getattr(given, name)
            if theirs is None:
                assert ours is None, name
                continue
            assert ours.device.type == "cpu" and ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            assert torch.equal(ours, theirs.cpu()), name


@pytest.mark.parametrize("size", [0, 7, 8, 64, 1003, 4096])
def test_label_scan_finds_what_numpy_finds(size):
    """The dense path's label scan (int64 words first, then inside the non-zero ones) lists
    exactly ``np.flatnonzero``'s indices: every label value, a word's first and last byte,
    lengths off the word size, views that are not contiguous."""
    rng = np.random.default_rng(size)
    labels = rng.choice(np.array([0, 1, -1], dtype=np.int8), size=size, p=[0.9, 0.05, 0.05])
    labels[-1:] = -1  # the last word's last byte
    for values in (labels, labels[::2], labels[1:]):
        assert np.array_equal(_nonzero_int8(values), np.flatnonzero(values))
    words = np.zeros(64, dtype=np.int8)
    words[[0, 15, 16, 63]] = [1, -1, 1, -1]
    assert _nonzero_int8(words).tolist() == [0, 15, 16, 63]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_server_copies_only_the_sparse_lists_to_the_host():
    """On a GPU, SPARSE requests never bring dense targets (~5 MB per COCO image) to the
    host: the server's own count of device-to-host bytes stays at the sparse lists' size."""
    from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

    server = ServerThread(backend="triton").start()
    try:
        before = server.server.metrics.value("tritarget_device_to_host_bytes_total")  # the warm-up's copies
        images = 0
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TargetAssignerStub(channel)
            for seed in range(4):
                boxes, counts, classes = coco_like_batch(8, seed=seed)
                request = build_request(boxes, counts, COCO_CANVAS, preset="retinanet_torchvision",
                                        gt_classes=classes, format="sparse")  # fmt: skip
                response = stub.Assign(request, timeout=120)
                assert response.sparse.positive_anchors.shape[0] > 0
                images += len(counts)
        copied = server.server.metrics.value("tritarget_device_to_host_bytes_total") - before
        anchors = response.num_anchors
        assert 0 < copied / images < 64 << 10, copied / images  # dense: anchors x 25 bytes per image
        assert copied / images < anchors * 25 / 50
    finally:
        server.stop()


def test_over_grpc_merged_stream_answers_the_same_bytes(generator):
    """A real server (cpu backend): a stream's SPARSE requests merge into sparse batches,
    and every response is the bytes the dense path gives that request alone."""
    requests = [r for case in ("random", "dropped_boxes", "float16_and_float32", "empty_images") for r in
                CASES[case](generator)]  # fmt: skip
    requests += [_request(generator, [6], overrides=NO_NEGATIVES), _request(generator, [6, 0], overrides=NO_NEGATIVES)]
    requests += [_request(generator, [2, 1], preset="fasterrcnn_rpn_torchvision", canvas=(64, 96), seed=3)]
    for i, request in enumerate(requests):
        request.request_id = str(i)
    old = Batcher("cpu")
    try:
        expected = [_old_path(old, r) for r in requests]
    finally:
        old.stop_workers()
    with ServerThread(backend="cpu", batching=batching(max_queue_delay_s=0.05, max_batch_images=64)) as srv:
        batches = srv.metrics.value("tritarget_batch_requests_count")
        with grpc.insecure_channel(srv.address) as channel:
            got = list(pb_grpc.TargetAssignerStub(channel).AssignStream(iter(requests), timeout=120))
        batches = srv.metrics.value("tritarget_batch_requests_count") - batches
    assert [g.request_id for g in got] == [r.request_id for r in requests]
    for response, want in zip(got, expected):
        assert not response.HasField("error"), response.error
        assert response.SerializeToString(deterministic=True) == want
    assert batches < len(requests), "no two requests were merged"


def test_a_request_without_a_format_is_answered_sparse(generator):
    """The wire's contract (``Format``: UNSPECIFIED means SPARSE): a client that leaves
    the field unset (grpcurl, another language's client: the Python client always sets
    it) gets the SPARSE response, the same bytes as asking for it, not ~5 MB of DENSE
    targets per image."""
    explicit = _request(generator, [3, 1])
    unset = pb.AssignRequest()
    unset.CopyFrom(explicit)
    unset.ClearField("format")
    assert explicit.format == pb.FORMAT_SPARSE and unset.format == pb.FORMAT_UNSPECIFIED
    assert decode_assign(unset, Limits()).sparse
    with ServerThread(backend="cpu") as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.TargetAssignerStub(channel)
        answers = [stub.Assign(request, timeout=60) for request in (unset, explicit)]
    assert answers[0].WhichOneof("targets") == "sparse"
    assert answers[0].SerializeToString(deterministic=True) == answers[1].SerializeToString(deterministic=True)


def test_a_request_without_a_seed_samples_anew_and_one_with_seed_0_repeats(generator):
    """A sampling request that leaves ``seed`` unset (grpcurl, another language's client:
    the Python client always sets one where the config samples) gets a seed the server
    draws, so its sampling differs call to call as torchvision's does, not the same
    anchors every epoch; seed 0, set, is a seed like any other and repeats exactly."""
    canvas, preset = (64, 96), "fasterrcnn_rpn_torchvision"
    boxes, counts = random_batch(generator, [2, 1], canvas)
    seeded = build_request(boxes, counts, canvas, preset=preset, seed=0)
    unset = pb.AssignRequest()
    unset.CopyFrom(seeded)
    unset.ClearField("seed")
    assert seeded.HasField("seed") and not unset.HasField("seed")
    assert decode_assign(seeded, Limits()).seed == 0
    assert len({decode_assign(unset, Limits()).seed for _ in range(3)}) == 3
    with ServerThread(backend="cpu") as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.TargetAssignerStub(channel)
        drawn = [stub.Assign(unset, timeout=60).SerializeToString(deterministic=True) for _ in range(3)]
        repeated = [stub.Assign(seeded, timeout=60).SerializeToString(deterministic=True) for _ in range(2)]
    assert len(set(drawn)) == 3, "a request without a seed sampled the same anchors twice"
    assert repeated[0] == repeated[1]
    expected = encode_assign(seeded, assign_sparse(boxes, counts, canvas, presets.get(preset), backend="cpu", seed=0))
    assert repeated[0] == expected.SerializeToString(deterministic=True)


def test_a_request_without_a_seed_that_does_not_sample_draws_none():
    """Seeds matter only to sampling configs: without one the job keeps seed 0, and the
    Python client leaves the field unset (the bytes of a request stay the same)."""
    request = build_request(torch.tensor([[1.0, 2.0, 30.0, 40.0]]), [1], CANVAS, preset="retinanet_torchvision")
    assert not request.HasField("seed")
    assert {decode_assign(request, Limits()).seed for _ in range(3)} == {0}


def test_a_config_that_samples_one_anchor_draws_a_seed_too(generator):
    """Any sample_size above 0 samples: a request without a seed gets one drawn, from the
    range in-process ``fresh_seed`` draws (seed + image stays an int64 a client can send)."""
    canvas = (64, 96)
    boxes, counts = random_batch(generator, [2, 1], canvas)
    request = build_request(boxes, counts, canvas, preset="fasterrcnn_rpn_torchvision",
                            overrides={"match.sample_size": 1}, seed=0)  # fmt: skip
    request.ClearField("seed")
    seeds = [decode_assign(request, Limits()).seed for _ in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= seed < 2**62 for seed in seeds)


@pytest.mark.parametrize("format", [pb.FORMAT_DENSE, pb.FORMAT_SPARSE], ids=["dense", "sparse"])
def test_a_request_without_a_delta_dtype_is_answered_float32(format):
    """The wire's contract (``delta_dtype``: DTYPE_FLOAT32 by default): a client that leaves
    it unset gets the float32 deltas, the same bytes as asking for them, not float16."""
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]], dtype=torch.int8)
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 0], deltas[1, 1] = torch.tensor([0.1, -0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    targets = Targets(labels=labels, matched_gt=torch.tensor([[0, -1, -1], [-1, 1, -1]], dtype=torch.int32),
                      deltas=deltas)  # fmt: skip
    unset = encode_assign(pb.AssignRequest(format=format), targets)
    explicit = encode_assign(pb.AssignRequest(format=format, delta_dtype=pb.DTYPE_FLOAT32), targets)
    sent = unset.dense.deltas if format == pb.FORMAT_DENSE else unset.sparse.positive_deltas
    assert sent.dtype == pb.DTYPE_FLOAT32
    assert unset.SerializeToString(deterministic=True) == explicit.SerializeToString(deterministic=True)


def _small_targets(**fields) -> Targets:
    """Two images of three anchors: as many ignored as negative anchors (the SPARSE
    response lists the ignored ones from either form)."""
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]], dtype=torch.int8)
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 0], deltas[1, 1] = torch.tensor([0.5, -0.25, 0.1, 0.2]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    return Targets(labels=labels, matched_gt=torch.tensor([[0, -1, -1], [-1, 1, -1]], dtype=torch.int32),
                   deltas=deltas, **fields)  # fmt: skip


FORMS = {
    "dense": (pb.FORMAT_DENSE, lambda t: t),
    "sparse_from_dense": (pb.FORMAT_SPARSE, lambda t: t),
    "sparse_from_lists": (pb.FORMAT_SPARSE, lambda t: t.to_sparse()),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_classes_and_dropped_lists_are_sent_only_when_asked_for(form):
    """The response holds what its request asks for, whatever the targets carry: classes
    with return_classes, the dropped lists (per image, boxes and ignore regions apart)
    with drop_invalid."""
    format, shape = FORMS[form]
    targets = _small_targets(classes=torch.tensor([[7, 0, 0], [0, 9, 0]], dtype=torch.int32),
                             dropped=[torch.tensor([2]), torch.tensor([], dtype=torch.int64)],
                             dropped_ignore=[torch.tensor([], dtype=torch.int64), torch.tensor([0, 3])])  # fmt: skip
    given = shape(targets)
    plain = encode_assign(pb.AssignRequest(format=format), given)
    asked = encode_assign(pb.AssignRequest(format=format, return_classes=True, drop_invalid=True), given)
    dense = format == pb.FORMAT_DENSE
    classes = lambda r: r.dense.HasField("classes") if dense else r.sparse.HasField("positive_classes")  # noqa: E731
    assert not classes(plain) and not plain.dropped
    assert classes(asked)
    assert [(list(d.box_index), list(d.ignore_box_index)) for d in asked.dropped] == [([2], []), ([], [0, 3])]


@pytest.mark.parametrize("format", [pb.FORMAT_DENSE, pb.FORMAT_SPARSE], ids=["dense", "sparse"])
def test_max_iou_is_sent_only_when_asked_for(format):
    targets = _small_targets(max_iou=torch.tensor([[0.7, 0.1, 0.45], [0.3, 0.9, 0.0]]))
    assert not encode_assign(pb.AssignRequest(format=format), targets).HasField("max_iou")
    sent = encode_assign(pb.AssignRequest(format=format, return_max_iou=True), targets).max_iou
    assert np.array_equal(np.frombuffer(sent.data, dtype=np.float32), targets.max_iou.numpy().reshape(-1))


def test_sparse_lists_answer_a_dense_request_densified():
    """A DENSE request answered from sparse lists gets the DENSE response its dense targets give."""
    targets = _small_targets()
    request = pb.AssignRequest(format=pb.FORMAT_DENSE)
    from_lists = encode_assign(request, targets.to_sparse())
    assert from_lists.WhichOneof("targets") == "dense"
    assert from_lists.SerializeToString(deterministic=True) == encode_assign(request, targets).SerializeToString(
        deterministic=True
    )
