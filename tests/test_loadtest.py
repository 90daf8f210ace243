"""``tritarget loadtest`` against real servers on loopback: every mode answers, counts and
verifies; errors and differences fail the run."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from test_service_harness import ServerThread, limits, peer_recording_server, serve_process

from tritarget.clients.loadtest import LoadTestOptions, Workload, run, verify_response
from tritarget.kernels import assign
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service import codec
from tritarget.service.cli import main

WORKLOAD = Workload(canvas=(256, 320), images=2, variants=4)


@pytest.fixture(scope="module")
def server():
    with ServerThread(backend="cpu") as srv:
        yield srv


def _options(server, **kwargs) -> LoadTestOptions:
    defaults = {"targets": (server.address,), "workload": WORKLOAD, "duration_s": 1.5, "warmup_s": 0.3,
                "concurrency": 4, "verify": 4}  # fmt: skip
    return LoadTestOptions(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stream": True, "window": 2}, {"workload": Workload(canvas=(256, 320), images=1, format="dense", fp16=True,
                                                               boxes=20, variants=4)}],
    ids=["unary", "stream", "dense-fp16-fixed-G"],
)  # fmt: skip
def test_closed_loop_answers_and_verifies(server, kwargs, tmp_path):
    before = server.metrics.value("tritarget_requests_total", {"method": "AssignStream" if kwargs.get("stream")
                                                               else "Assign"})  # fmt: skip
    report = run(_options(server, **kwargs))
    assert report.ok, report.table()
    assert report.errors == {} and report.mismatches == [] and report.verified == 4
    assert report.requests > 0 and report.warmup_requests > 0
    served = server.metrics.value("tritarget_requests_total", {"method": "AssignStream" if kwargs.get("stream")
                                                               else "Assign"}) - before  # fmt: skip
    assert served >= report.requests + report.warmup_requests  # every counted answer came from the server
    latency = report.percentiles_ms()
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert sum(row["ok"] for row in report.series) == report.requests
    report.write_json(tmp_path / "out.json")
    report.write_csv(tmp_path / "out.csv")
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["requests"] == report.requests and summary["ok"] is True and summary["series"]
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert sum(int(row["ok"]) for row in rows) == report.requests


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_open_loop_sends_on_schedule(server, stream):
    report = run(_options(server, rate=40, duration_s=2.0, stream=stream, concurrency=2))
    assert report.ok, report.table()
    assert abs(report.requests - 80) <= 2  # the schedule, whatever the answers did


def test_several_client_processes(server):
    report = run(_options(server, processes=2, duration_s=2.0))
    assert report.ok, report.table()
    assert report.verified == 4
    # The clients' CPU is their load's, not their start-up's (each spawned process imports
    # torch and gRPC first, seconds of CPU): within the load's window no more than the
    # machine's cores can have been busy.
    assert 0 < report.client_cpu_s <= (os.cpu_count() or 1) * report.window_s
    assert report.window_s >= report.options.warmup_s + report.options.duration_s
    assert report.summary()["client_cpu_s"] == report.client_cpu_s
    assert "load generator: " in report.table() and "2 process(es)" in report.table()


@pytest.mark.parametrize("loop", [{}, {"rate": 60}, {"stream": True}], ids=["closed", "open", "stream"])
def test_each_caller_has_its_own_connection(loop):
    """Front ends sharing a port (`serve --workers N`) are handed connections, not calls:
    the load comes over one connection per caller or stream (open loop: `concurrency`
    connections), as from a training job's many data-loader workers."""
    with peer_recording_server() as (address, peers):
        report = run(LoadTestOptions(targets=(address,), workload=WORKLOAD, duration_s=0.5, warmup_s=0.1,
                                     concurrency=5, **loop))  # fmt: skip
    assert report.ok and report.requests > 10, report.table()
    assert len(peers) == 5, peers


def test_errors_are_counted_by_code_and_fail_the_run():
    with ServerThread(backend="cpu", limits=limits(max_images=1)) as srv:
        report = run(_options(srv, verify=0, duration_s=1.0))
        assert not report.ok
        assert report.requests == 0 and list(report.errors) == ["RESOURCE_EXHAUSTED"]
        assert "errors by code: RESOURCE_EXHAUSTED" in report.table()
        code = main(["loadtest", "--target", srv.address, "--duration", "0.5", "--warmup", "0", "--canvas", "256",
                     "320", "--images", "2", "--no-progress"])  # fmt: skip
    assert code == 1


def _response(workload: Workload, index: int) -> pb.AssignResponse:
    request = workload.request(index)
    job = codec.decode_assign(request, codec.Limits())
    targets = assign(job.gt_boxes, job.gt_counts, job.canvas, job.config, gt_classes=job.gt_classes, backend="cpu")
    return codec.encode_assign(request, targets)


def test_verification_finds_a_wrong_label_and_a_wrong_delta():
    response = _response(WORKLOAD, 1)
    assert verify_response(WORKLOAD, 1, response) is None
    assert "labels differ" in verify_response(WORKLOAD, 2, response)  # another request's targets
    tampered = pb.AssignResponse()
    tampered.CopyFrom(response)
    deltas = torch.frombuffer(bytearray(tampered.sparse.positive_deltas.data), dtype=torch.float32).clone()
    deltas[0] += 0.01
    tampered.sparse.positive_deltas.data = deltas.numpy().tobytes()
    assert "deltas of positives differ by up to 0.01" in verify_response(WORKLOAD, 1, tampered)


def test_cli_against_tritarget_serve(tmp_path):
    """The issue's command, shortened: a `tritarget serve` process, exit 0, the table, the JSON."""
    process, port = serve_process("--backend", "cpu", "--warmup-canvas", "64", "64")
    try:
        out = tmp_path / "out.json"
        code = main(["loadtest", "--target", f"127.0.0.1:{port}", "--duration", "2", "--warmup", "0.5",
                     "--concurrency", "4", "--verify", "5", "--canvas", "256", "320", "--images", "2",
                     "--json", str(out), "--no-progress"])  # fmt: skip
        assert code == 0
        summary = json.loads(out.read_text())
        assert summary["errors"] == {} and summary["verified"] == 5 and summary["requests"] > 0
        assert summary["workload"].startswith("retinanet_torchvision 256x320, 2 COCO-like images")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
