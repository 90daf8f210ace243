"""The service end to end: a real server on 127.0.0.1 (port 0) and the real client.

Targets through the service must equal in-process ``assign`` exactly (labels,
matched boxes, classes; deltas bit for bit in float32 and within float16 rounding
in float16), dense and sparse, unary and streaming.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service_harness import ServerThread, batching, sparse_view, until

from support import assert_targets_equal, random_batch
from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.kernels import assign, generate_anchors, presets
from tritarget.service.server import SERVICE_NAME, create_server

# Small canvases keep the reference backend fast; ssd300 fixes its own 300 x 300 grid.
CASES = [
    ("retinanet_torchvision", (96, 128)),
    ("retinanet_detectron2", (80, 112)),
    ("retinanet_mmdet", (96, 96)),
    ("fasterrcnn_rpn_torchvision", (64, 96)),
    ("ssd300_torchvision", (300, 300)),
    ("yolov5", (128, 160)),
]


@pytest.fixture(scope="module")
def server():
    with ServerThread(batching=batching(max_queue_delay_s=0.005)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with TargetClient(server.address, timeout=60) as c:
        yield c


def _batch(generator, counts, canvas):
    boxes, counts = random_batch(generator, counts, canvas)
    classes = torch.randint(1, 81, (boxes.shape[0],), generator=generator, dtype=torch.int32)
    return boxes, counts, classes


def _reference(boxes, counts, canvas, preset, **kwargs):
    return assign(boxes, counts, canvas, presets.get(preset), backend="reference", **kwargs)


@pytest.mark.parametrize("preset, canvas", CASES)
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_unary_equals_in_process(client, generator, preset, canvas, fmt):
    boxes, counts, classes = _batch(generator, [3, 0, 1, 7], canvas)
    got = client.assign(boxes, counts, canvas, preset=preset, gt_classes=classes, format=fmt, seed=11,
                        return_max_iou=True)  # fmt: skip
    ref = _reference(boxes, counts, canvas, preset, gt_classes=classes, seed=11, return_max_iou=True)
    assert_targets_equal(got, ref if fmt == "dense" else sparse_view(ref), rtol=0, atol=0)
    assert got.max_iou is not None and torch.equal(got.max_iou, ref.max_iou)
    assert got.background_class == ref.background_class
    assert [d.tolist() for d in got.dropped] == [[]] * 4


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_float16_deltas_within_half_precision(client, generator, fmt):
    canvas = (96, 128)
    boxes, counts, _ = _batch(generator, [5, 2], canvas)
    got = client.assign(boxes, counts, canvas, preset="retinanet_torchvision", format=fmt, delta_dtype="float16")
    ref = _reference(boxes, counts, canvas, "retinanet_torchvision")
    assert got.deltas.dtype == torch.float32
    assert torch.equal(got.labels, ref.labels)
    assert torch.equal(got.deltas, ref.deltas.to(torch.float16).to(torch.float32))


def test_empty_and_crowded_images(client, generator):
    canvas = (96, 128)
    for counts in ([0], [0, 0, 0], [300], [0, 250, 0]):
        boxes, counts, classes = _batch(generator, counts, canvas)
        for fmt in ("dense", "sparse"):
            got = client.assign(boxes, counts, canvas, preset="retinanet_torchvision", gt_classes=classes, format=fmt)
            ref = _reference(boxes, counts, canvas, "retinanet_torchvision", gt_classes=classes)
            assert_targets_equal(got, ref, rtol=0, atol=0)


def test_inline_config_overrides_ignore_boxes_and_image_sizes(client, generator):
    canvas = (96, 128)
    config = presets.get("retinanet_mmdet").replace(**{"match.ignore_iof_thr": 0.5, "match.allowed_border": 0.0})
    boxes, counts, classes = _batch(generator, [4, 3], canvas)
    ignore = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 40.0, 90.0, 96.0]])
    sizes = torch.tensor([[96, 128], [80, 100]])
    kwargs = dict(gt_classes=classes, ignore_boxes=ignore, ignore_counts=[1, 1], image_sizes=sizes)
    got = client.assign(boxes, counts, canvas, config=config.to_dict(), overrides={"match.high": 0.55}, **kwargs)
    ref = assign(boxes, counts, canvas, config.replace(**{"match.high": 0.55}), backend="reference", **kwargs)
    assert_targets_equal(got, ref, rtol=0, atol=0)
    assert (got.labels == -1).any()


def test_drop_invalid_reports_dropped_boxes(client, generator):
    canvas = (96, 128)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 40.0], [50.0, 10.0, 50.0, 30.0], [0.0, 0.0, 30.0, 20.0],
                          [200.0, 200.0, 220.0, 240.0]])  # fmt: skip
    got = client.assign(boxes, [2, 2], canvas, preset="retinanet_torchvision", drop_invalid=True, format="dense")
    ref = _reference(boxes, [2, 2], canvas, "retinanet_torchvision", drop_invalid=True)
    assert_targets_equal(got, ref, rtol=0, atol=0)
    assert [d.tolist() for d in got.dropped] == [[1], [1]]


@pytest.mark.parametrize("kwargs", [{"format": "dense"}, {"densify": False}], ids=["dense", "sparse"])
def test_drop_invalid_reports_dropped_ignore_regions(client, kwargs):
    canvas = (96, 128)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 40.0], [0.0, 0.0, 30.0, 20.0]])
    ignore = torch.tensor([[0.0, 0.0, 50.0, 50.0], [60.0, 10.0, 60.0, 30.0], [math.nan, 0.0, 4.0, 4.0]])
    got = client.assign(boxes, [1, 1], canvas, preset="retinanet_mmdet", ignore_boxes=ignore, ignore_counts=[2, 1],
                        drop_invalid=True, **kwargs)  # fmt: skip
    ref = _reference(boxes, [1, 1], canvas, "retinanet_mmdet", ignore_boxes=ignore, ignore_counts=[2, 1],
                     drop_invalid=True)  # fmt: skip
    assert [d.tolist() for d in got.dropped_ignore] == [[1], [0]] and [d.tolist() for d in got.dropped] == [[], []]
    assert_targets_equal(got if kwargs.get("format") else got.to_dense(), ref, rtol=0, atol=0)


def test_box_formats_are_converted_at_the_edge(client):
    canvas = (96, 128)
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 60.0], [30.0, 5.0, 90.0, 45.0]])
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    ref = client.assign(xyxy, [2], canvas, preset="retinanet_torchvision")
    for boxes, box_format in ((xywh, "xywh"), (cxcywh, "cxcywh")):
        got = client.assign(boxes, [2], canvas, preset="retinanet_torchvision", box_format=box_format)
        assert_targets_equal(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("sized", [False, True], ids=["of-the-canvas", "of-image_sizes"])
def test_normalised_boxes_are_fractions_of_each_images_size(client, sized):
    """DESIGN §3: normalised boxes are converted at the edge, as fractions of each image's
    valid size where ``image_sizes`` gives it, else of the canvas (powers of two here, so
    that the fractions are exact and the targets equal bit for bit)."""
    canvas = (128, 256)
    sizes = torch.tensor([[64, 128], [128, 256]]) if sized else torch.tensor([canvas, canvas])
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 60.0], [30.0, 5.0, 90.0, 45.0], [100.0, 40.0, 220.0, 120.0]])
    counts, crowd = [2, 1], torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    per_box = sizes.repeat_interleave(torch.tensor(counts), dim=0).flip(1).repeat(1, 2).float()  # w, h, w, h
    kwargs = dict(preset="retinanet_mmdet", overrides={"match.ignore_iof_thr": 0.5}, ignore_counts=[0, 1],
                  **({"image_sizes": sizes} if sized else {}))  # fmt: skip
    ref = client.assign(xyxy, counts, canvas, ignore_boxes=crowd, **kwargs)
    assert int((ref.labels == -1).sum()) > 0 and int((ref.labels == 1).sum()) > 0
    crowd_scale = torch.tensor([[256.0, 128.0, 256.0, 128.0]])  # the crowd's image is the canvas's size

    def xywh(b):
        return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1)

    def cxcywh(b):
        return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], dim=1)

    for convert, box_format in ((lambda b: b, "xyxyn"), (xywh, "xywhn"), (cxcywh, "cxcywhn")):
        got = client.assign(convert(xyxy) / per_box, counts, canvas, box_format=box_format,
                            ignore_boxes=convert(crowd) / crowd_scale, **kwargs)  # fmt: skip
        assert_targets_equal(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gt_counts": [1, 1]}, r"gt_boxes: 3 rows, but gt_counts add up to 2 \(a normalised box_format scales"),
     ({"image_sizes": [[64, 128]]}, r"image_sizes: expected shape \[2, 2\] \(height, width per image\), got \[1, 2\]"),
     ({"ignore_boxes": [[0.0, 0.0, 0.5, 0.5]]}, "ignore_counts: required with ignore_boxes")],
)  # fmt: skip
def test_normalised_boxes_whose_images_cannot_be_told_are_refused(client, kwargs, message):
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.4, 0.6], [0.0, 0.5, 1.0, 1.0]])
    arguments = {"gt_boxes": boxes, "gt_counts": [2, 1], "canvas": (128, 256), **kwargs}
    with pytest.raises(ValueError, match=message):
        client.assign(preset="retinanet_torchvision", box_format="xyxyn", **arguments)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_stream_is_ordered_and_equals_in_process(client, generator, fmt):
    items, refs = [], []
    for i, (preset, canvas) in enumerate(CASES * 2):
        boxes, counts, classes = _batch(generator, [i % 4, 2], canvas)
        items.append(dict(gt_boxes=boxes, gt_counts=counts, canvas=canvas, preset=preset, gt_classes=classes, seed=i))
        ref = _reference(boxes, counts, canvas, preset, gt_classes=classes, seed=i)
        refs.append(ref if fmt == "dense" else sparse_view(ref))
    got = list(client.stream(items, format=fmt))
    assert len(got) == len(refs)
    for g, r in zip(got, refs):
        assert_targets_equal(g, r, rtol=0, atol=0)


def test_stream_keeps_a_window_of_eight_in_flight(generator):
    """A stream's requests are read ahead up to the window (8), so they batch together,
    and no further: with a long batching wait every batch holds exactly the requests
    read by then."""
    canvas = (96, 128)
    boxes, counts, _ = _batch(generator, [2], canvas)
    with ServerThread(batching=batching(max_batch_images=64, max_queue_delay_s=0.3)) as srv:
        with TargetClient(srv.address) as client:
            items = [dict(gt_boxes=boxes, gt_counts=counts, canvas=canvas, preset="retinanet_torchvision")] * 20
            assert len(list(client.stream(items))) == 20
        metrics = srv.server.metrics
        assert metrics.value("tritarget_batch_requests_sum") == 20
        assert metrics.value("tritarget_batch_requests_bucket", {"le": "8.0"}) == metrics.value(
            "tritarget_batch_requests_count"
        )  # no batch of more than 8
        assert metrics.value("tritarget_batch_requests_bucket", {"le": "4.0"}) < metrics.value(
            "tritarget_batch_requests_count"
        )  # and the window did fill


def test_stream_answers_a_bad_item_and_goes_on(client, generator):
    canvas = (96, 128)
    good, counts, _ = _batch(generator, [3], canvas)
    bad = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    items = [
        dict(gt_boxes=good, gt_counts=counts),
        dict(gt_boxes=bad, gt_counts=[1]),
        dict(gt_boxes=good, gt_counts=counts, preset="no_such_preset"),
        dict(gt_boxes=good, gt_counts=counts),
    ]
    got = list(client.stream(items, preset="retinanet_torchvision", canvas=canvas, return_exceptions=True))
    ref = _reference(good, counts, canvas, "retinanet_torchvision")
    assert_targets_equal(got[0], sparse_view(ref), rtol=0, atol=0)
    assert isinstance(got[1], TargetServiceError) and got[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert got[1].request_id == "1" and "image 0, box 0" in got[1].details
    assert [field for field, _ in got[1].field_violations] == ["gt_boxes"]  # in-band, as a unary call's
    assert isinstance(got[2], TargetServiceError) and got[2].code == grpc.StatusCode.NOT_FOUND
    assert_targets_equal(got[3], sparse_view(ref), rtol=0, atol=0)
    with pytest.raises(TargetServiceError, match="degenerate"):
        list(client.stream(items[:2], preset="retinanet_torchvision", canvas=canvas))


def test_async_client_unary_and_stream(server, generator):
    canvas = (96, 128)
    boxes, counts, classes = _batch(generator, [4, 1], canvas)
    ref = _reference(boxes, counts, canvas, "retinanet_torchvision", gt_classes=classes)

    async def main():
        async with AsyncTargetClient(server.address) as client:
            one = await client.assign(boxes, counts, canvas, preset="retinanet_torchvision", gt_classes=classes)
            item = dict(gt_boxes=boxes, gt_counts=counts, gt_classes=classes)
            many = [t async for t in client.stream([item] * 3, preset="retinanet_torchvision", canvas=canvas)]
            names = [p["name"] for p in await client.list_presets()]
            return one, many, names

    one, many, names = asyncio.run(main())
    for got in (one, *many):
        assert_targets_equal(got, sparse_view(ref), rtol=0, atol=0)
    assert names == presets.names()


def test_list_presets_and_get_anchors(client):
    listed = client.list_presets()
    assert [p["name"] for p in listed] == presets.names()
    for p in listed:
        assert p["config"] == presets.get(p["name"]).to_dict()
        assert p["description"] == presets.describe(p["name"])
    anchors = client.get_anchors((96, 128), preset="retinanet_torchvision")
    assert torch.equal(anchors, generate_anchors(presets.get("retinanet_torchvision").anchors, (96, 128)))


def test_concurrent_requests_are_batched_and_each_gets_its_own(server, client, generator):
    """Concurrent callers land in one assign call; every caller gets exactly its own rows."""
    canvas = (96, 128)
    preset = "fasterrcnn_rpn_torchvision"  # sampling: each request's seeds must survive merging
    jobs = []
    for i in range(12):
        boxes, counts, classes = _batch(generator, [1 + i % 5, i % 3], canvas)
        # Any int64, as in-process: image i's seed + i may pass 2**63 - 1 (a torch.Generator takes it).
        jobs.append((boxes, counts, classes, (100 + i, -(2**63) + i, 2**63 - 2 - i)[i % 3]))
    before = server.metrics.value("tritarget_batch_images_count")
    merged_before = server.metrics.value("tritarget_batch_requests_sum")

    def call(job):
        boxes, counts, classes, seed = job
        return client.assign(boxes, counts, canvas, preset=preset, gt_classes=classes, seed=seed, format="dense")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, jobs))
    for (boxes, counts, classes, seed), got in zip(jobs, results):
        ref = _reference(boxes, counts, canvas, preset, gt_classes=classes, seed=seed)
        assert_targets_equal(got, ref, rtol=0, atol=0)
    calls = server.metrics.value("tritarget_batch_images_count") - before
    requests = server.metrics.value("tritarget_batch_requests_sum") - merged_before
    assert requests == 12
    assert calls < 12, "no two requests were merged"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    sizes = [line for line in text.splitlines() if line.startswith("tritarget_batch_requests_bucket")]
    le1 = next(float(line.split()[-1]) for line in sizes if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in sizes if 'le="+Inf"' in line)
    assert total > le1, "the /metrics endpoint shows no batch of more than one request"


def test_the_metrics_port_serves_process_metrics_and_only_metrics(server, client):
    """An operator's view (a helper's audit): the process's memory and descriptors, which
    --max-unsent-mb and the connection limits guard, were not exported (a registry of our
    own); every path answered 200 with the metrics, so an HTTP probe at /healthz passed
    during warm-up or drain; latency past 10 s read only as +Inf, under a 60 s timeout."""
    client.assign(torch.tensor([[10.0, 10.0, 60.0, 50.0]]), [1], (96, 128), preset="retinanet_torchvision")
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total", "python_info"} <= names
    assert 'tritarget_request_seconds_bucket{le="60.0",method="Assign"}' in text
    # Whether it serves, and the calls open (none now: the assign above has finished).
    assert server.metrics.value("tritarget_serving") == 1 and server.metrics.value("tritarget_calls_in_flight") == 0
    for path in ("/", "/healthz", "/metric"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}{path}", timeout=10)
        assert info.value.code == 404 and b"readiness is the gRPC health service" in info.value.read()


def test_the_batch_histograms_have_a_bucket_at_every_power_of_two(server):
    """Images and requests per batch are read against powers of two (a batch of 4, of 8):
    each histogram has a bucket at every one from 1 to 512, where ``value`` would read a
    missing one as 0."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("tritarget_batch_images", "tritarget_batch_requests"):
        edges = [line.split('le="')[1].split('"')[0] for line in text.splitlines() if line.startswith(f"{name}_bucket")]
        assert edges == [f"{2.0**i}" for i in range(10)] + ["+Inf"], (name, edges)


def test_a_lone_small_sparse_request_is_computed_on_the_event_loop(generator):
    """Over gRPC, the cpu backend's server computes a small SPARSE request that finds it idle
    on its event loop (counted in /metrics), with the targets computed in process; a DENSE
    one goes to a compute worker."""
    canvas, preset = (96, 128), "retinanet_torchvision"
    boxes, counts, classes = _batch(generator, [3, 1], canvas)
    with ServerThread(backend="cpu") as srv, TargetClient(srv.address, timeout=60) as client:
        for fmt, inline in (("sparse", 1), ("dense", 1), ("sparse", 2)):
            time.sleep(0.01)  # the server idles (a call right after another goes to a worker)
            got = client.assign(boxes, counts, canvas, preset=preset, gt_classes=classes, format=fmt)
            expected = assign(boxes, counts, canvas, presets.get(preset), gt_classes=classes, backend="cpu")
            assert_targets_equal(got, expected if fmt == "dense" else sparse_view(expected), rtol=0, atol=0)
            assert srv.metrics.value("tritarget_inline_batches_total") == inline
        assert srv.metrics.value("tritarget_batch_images_count") == 3


def test_health_is_serving_after_warm_up(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tritarget.v1.TargetAssigner"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_list_gives_every_status_and_logs_no_error(server, caplog):
    """grpcio-health-checking leaves List unimplemented: each call was answered
    UNIMPLEMENTED and logged an ERROR with a traceback (health needs no token)."""
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {name: s.status for name, s in reply.statuses.items()} == {"": serving, SERVICE_NAME: serving}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_health_not_serving_until_warm_up_done():
    """Hold the only compute worker, so the warm-up batch cannot run: NOT_SERVING until
    released, in Check and in List, for the server and the service (a List that said
    SERVING sent a prober's traffic to a cold server)."""
    gate = threading.Event()
    srv = ServerThread()
    srv.thread.start()

    async def start_blocked():
        srv.server, srv.port = create_server(srv.options)
        asyncio.ensure_future(srv.server.batcher.run(gate.wait))
        await srv.server.start()

    try:
        srv.run(start_blocked())
        with grpc.insecure_channel(srv.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for status in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING):
                assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == status
                listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
                assert {name: listed[name].status for name in listed} == {"": status, SERVICE_NAME: status}
                gate.set()
                srv.run(srv.server.wait_ready(30))
    finally:
        gate.set()
        srv.stop()


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"tritarget.v1.TargetAssigner", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_and_bytes(server, client, generator):
    canvas = (96, 128)
    boxes, counts, _ = _batch(generator, [2], canvas)
    before = server.metrics.value("tritarget_requests_total", {"method": "Assign"})
    sent = server.metrics.value("tritarget_response_bytes_total", {"method": "Assign"})
    client.assign(boxes, counts, canvas, preset="retinanet_torchvision")
    assert server.metrics.value("tritarget_requests_total", {"method": "Assign"}) == before + 1
    assert server.metrics.value("tritarget_response_bytes_total", {"method": "Assign"}) > sent
    for name in ("tritarget_queue_seconds_count", "tritarget_compute_seconds_count", "tritarget_encode_seconds_count"):
        assert server.metrics.value(name) > 0, name
    json.dumps(client.list_presets())  # configs are JSON all the way


def test_metrics_count_each_requests_bytes(server, client, generator):
    boxes, counts, _ = _batch(generator, [3], (96, 128))
    request = build_request(boxes, counts, (96, 128), preset="retinanet_torchvision", request_id="sized")
    received = lambda: server.metrics.value("tritarget_request_bytes_total", {"method": "Assign"})  # noqa: E731
    before = received()
    client.assign_raw(request)
    assert received() == before + request.ByteSize()


def test_a_bad_stream_item_is_counted_as_a_failed_request_and_holds_no_bytes(server, client):
    metrics = server.metrics
    invalid = {"method": "AssignStream", "code": "INVALID_ARGUMENT"}
    failed = lambda: metrics.value("tritarget_errors_total", invalid)  # noqa: E731
    timed = lambda: metrics.value("tritarget_request_seconds_count", {"method": "AssignStream"})  # noqa: E731
    unsent = lambda: metrics.value("tritarget_unsent_response_bytes")  # noqa: E731
    before, answered = failed(), timed()
    bad = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    with pytest.raises(TargetServiceError, match="degenerate"):
        list(client.stream([dict(gt_boxes=bad, gt_counts=[1])], preset="retinanet_torchvision", canvas=(96, 128)))
    until(lambda: timed() == answered + 1)  # recorded once gRPC took its answer: the client may read it first
    assert failed() == before + 1
    until(lambda: unsent() <= 0)  # earlier calls' responses are let go as their calls end
    assert unsent() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_workers_on_streams_of_their_own_answer_exactly(generator):
    """On a GPU the server runs two compute workers, each on a CUDA stream of its own:
    concurrent requests for configs and canvases not seen before (anchors and kernel
    tables cached by one stream while the other computes) each get exactly the in-process
    answer."""
    jobs = []
    for i in range(48):
        preset, canvas = CASES[i % len(CASES)]
        canvas = (canvas[0] + 32 * (i % 4), canvas[1])  # new canvases: caches fill under load
        boxes, counts, classes = _batch(generator, [1 + i % 5, i % 3], canvas)
        jobs.append((preset, canvas, boxes, counts, classes, i))
    with ServerThread(backend="triton") as srv:
        assert srv.server.batcher.options.compute_workers == 2
        with TargetClient(srv.address, timeout=120) as client:

            def call(job):
                preset, canvas, boxes, counts, classes, seed = job
                return client.assign(boxes, counts, canvas, preset=preset, gt_classes=classes, seed=seed,
                                     format="dense")  # fmt: skip

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(pool.map(call, jobs))
    for (preset, canvas, boxes, counts, classes, seed), got in zip(jobs, results):
        ref = assign(boxes.cuda(), counts, canvas, presets.get(preset), gt_classes=classes.cuda(), seed=seed,
                     backend="triton")  # fmt: skip
        assert_targets_equal(got, ref, rtol=0, atol=0)


def test_default_auto_backend_matches_in_process(generator):
    """`tritarget serve`'s default backend (auto: cpu here, triton on a GPU) through the service."""
    try:
        srv = ServerThread(backend="auto").start()
    except ValueError as exc:  # the cpu backend could not build here (no C compiler)
        pytest.skip(str(exc))
    try:
        canvas = (96, 128)
        boxes, counts, classes = _batch(generator, [6, 0, 3], canvas)
        with TargetClient(srv.address) as client:
            got = client.assign(boxes, counts, canvas, preset="retinanet_torchvision", gt_classes=classes,
                                format="dense")  # fmt: skip
        server = srv.server  # in process on the server's device: CUDA for compiled Triton
        config, device = presets.get("retinanet_torchvision"), server.device
        ref = assign(boxes.to(device), counts, canvas, config, gt_classes=classes.to(device), backend=server.backend)
        assert_targets_equal(got, ref, rtol=0, atol=0)
        assert server.backend == ("triton" if torch.cuda.is_available() else "cpu")
    finally:
        srv.stop()
