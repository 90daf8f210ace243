"""The benchmark scripts' shared pieces (benchmarks/recording.py, benchmarks/serving.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import recording  # noqa: E402
import serving  # noqa: E402


def test_a_benchmark_without_matplotlib_skips_its_picture(monkeypatch, capsys):
    """matplotlib is an extra: bench_cpu.py and bench_client_cpu.py died at their plot, after
    minutes of measuring, before writing the rest of their results."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now fails, as when not installed
    assert recording.pyplot() is None
    assert "matplotlib is not installed: no PNG" in capsys.readouterr().out


def test_a_json_record_says_when_and_from_which_commit_it_was_written(tmp_path):
    """The benches wrote no date (the README's dates were hand-written) nor commit."""
    recording.write_json(tmp_path / "r.json", {"rows": [1]})
    record = json.loads((tmp_path / "r.json").read_text())
    assert list(record) == ["recorded", "rows"] and record["rows"] == [1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", record["recorded"]["utc"])
    head = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    if head:  # a git checkout (CI's clone is one)
        assert record["recorded"]["commit"].startswith(head[:7])


def test_a_server_that_cannot_start_says_why():
    """The server's own refusal was read and thrown away; the benchmark then failed with
    "'NoneType' object is not iterable" from the client it gave no address."""
    with pytest.raises(RuntimeError, match=r"(?s)the server exited \(2\) before it was ready:.*--max-batch-images"):
        serving.start_server("--max-batch-images", "0")


def test_a_started_server_is_serving_with_its_metrics():
    process, address, metrics = serving.start_server("--backend", "cpu", metrics=True)
    try:
        assert address.startswith("127.0.0.1:") and metrics.startswith("http://") and metrics.endswith("/metrics")
    finally:
        process.terminate()
        process.wait(30)


def test_a_benchmark_server_with_several_front_ends_is_ready_once_each_is():
    """``serve --workers N`` prints its count, then each front end its SERVING: a load test
    started at the first sent its first connections to the few that were ready."""
    lines = ["tritarget serve: 2 front-end process(es) (--workers)\n",
             "tritarget serving on 127.0.0.1:50061 (plaintext, backend cpu on cpu)\n",
             "warm-up done: health is SERVING\n",
             "tritarget serving on 127.0.0.1:50061 (plaintext, backend cpu on cpu)\n",
             "warm-up done: health is SERVING\n", "never read\n"]  # fmt: skip
    stream = iter(lines)
    assert serving.until_ready(stream)[::3] == ("127.0.0.1:50061", True)
    assert next(stream) == "never read\n"
    assert serving.until_ready(iter(lines[:3]))[3] is False  # one of two, then the end
    assert serving.until_ready(iter(lines[1:3]))[3] is True  # one front end: no count printed


def test_gpu_ratios_are_the_others_time_over_ours():
    import bench_gpu

    rows = [{"workload": "w", "batch": 1, "method": "triton", "median_ms": 2.0},
            {"workload": "w", "batch": 1, "method": "triton_assign", "median_ms": 4.0},
            {"workload": "w", "batch": 1, "method": "torchvision", "median_ms": 10.0},
            {"workload": "w", "batch": 8, "method": "torchvision", "median_ms": 10.0}]  # fmt: skip
    bench_gpu.add_ratios(rows)
    assert rows[2]["speedup_of_triton"] == 5.0 and rows[2]["speedup_of_triton_assign"] == 2.5
    assert rows[1]["speedup_of_triton"] == 2.0  # end to end against the kernels alone
    assert "speedup_of_triton" not in rows[0] and "speedup_of_triton" not in rows[3]  # no solve row at B = 8


def test_gpu_kernel_table_puts_the_sparse_kernels_over_the_dense_ones():
    """run12's do_bench put solve_sparse at 1.6x solve (B = 32, G ~ 7) where the profiler's
    kernels summed to 1.09x: the rest is the call's read-back and host work."""
    import bench_gpu

    def point(method: str, batch: int, *times: float) -> dict:
        kernels = [{"name": f"k{i}", "ms_per_call": t, "launches_per_call": 1} for i, t in enumerate(times)]
        return {"workload": "w", "batch": batch, "method": method, "kernels": kernels}

    table = bench_gpu.kernel_table([point("triton", 32, 0.2, 0.05), point("triton_sparse", 32, 0.2, 0.1, 0.025),
                                    point("triton_sparse", 8, 0.1)], "GPU")  # fmt: skip
    ratios = [line for line in table if "sparse / dense" in line]
    assert len(ratios) == 1 and ratios[0].split()[0] == "1.30x"  # 0.325 over 0.25; none at B = 8 (no dense point)


def test_gpu_goal_lines_judge_dense_by_do_bench_and_sparse_and_assign_by_the_wall_clock():
    import bench_gpu

    coco = bench_gpu.COCO_LABEL
    rows = [{"workload": coco, "batch": 32, "method": "triton", "median_ms": 0.14, "wall_ms": 0.2},
            {"workload": coco, "batch": 32, "method": "triton_sparse", "median_ms": 0.09, "wall_ms": 0.11},
            {"workload": "G=200", "batch": 32, "method": "triton", "median_ms": 0.7},
            {"workload": coco, "batch": 1, "method": "triton_assign", "median_ms": 0.1, "wall_ms": 0.15}]  # fmt: skip
    kernels = [
        {"workload": coco, "batch": 1, "method": "triton", "kernels": [{"ms_per_call": 0.05}, {"ms_per_call": 0.03}]}
    ]
    lines = bench_gpu.goal_lines(rows, kernels)
    verdicts = [line.split("[")[-1].rstrip("]") for line in lines[2:]]
    assert verdicts == ["target <= 0.15 ms: met", "target <= 0.1 ms: NOT met", "target <= 0.6 ms: NOT met",
                        "target <= 1 ms", "NOT met"], lines  # fmt: skip
    assert "not measured" in lines[5] and "solve's kernels 0.080 ms + 60 us = 0.140" in lines[6]
    rows[-1]["wall_ms"] = 0.13
    assert bench_gpu.goal_lines(rows, kernels)[-1].endswith("[met]")


def test_a_gpu_bench_method_that_fails_is_recorded_and_the_run_goes_on(capsys):
    """One GPU run is scarce: a kernel variant that fails to compile there costs its row,
    not every point and table after it."""
    import argparse

    import bench_gpu

    def broken():
        raise RuntimeError("PassManager::run failed\n(more)")

    results = {"skipped": []}
    args = argparse.Namespace(max_slow_seconds=1.5, smoke=True)
    assert bench_gpu.time_method("triton", broken, args, torch.device("cpu"), results, "w", 8) is None
    assert results["skipped"] == [{"workload": "w", "batch": 8, "method": "triton",
                                   "why": "RuntimeError: PassManager::run failed"}]  # fmt: skip
    row = bench_gpu.time_method("triton_assign", lambda: None, args, torch.device("cpu"), results, "w", 8)
    assert row["method"] == "triton_assign" and row["wall_calls"] >= 1 and row["wall_ms"] >= 0


def test_crowded_images_are_valid_boxes_and_the_gain_is_before_over_now():
    import bench_crowded

    boxes = bench_crowded.crowded_image(500, (64, 96), (4.0, 8.0))
    assert boxes.shape == (500, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 96).all() and (boxes[:, [1, 3]] <= 64).all()
    rows = [{"case": "a", "sparse_ms": 2.0, "dense_ms": 5.0}, {"case": "new", "sparse_ms": 1.0, "dense_ms": 1.0}]
    earlier = {"rows": [{"case": "a", "sparse_ms": 8.0, "dense_ms": 5.0}], "recorded": {"commit": "abc", "utc": "t"}}
    assert bench_crowded.add_previous(rows, earlier) == "commit abc (t UTC)"
    assert (rows[0]["sparse_vs_previous"], rows[0]["dense_vs_previous"]) == (4.0, 1.0)
    assert rows[1]["sparse_vs_previous"] is None  # a case the earlier run did not have


def test_the_schedule_model_starts_each_program_in_order_on_the_first_free_slot():
    """``bench_gpu.py --pairs``'s model of the gather's start order: a long program started
    last runs on alone, started first it overlaps the short ones."""
    import bench_gpu

    assert bench_gpu.list_schedule([3.0, 1.0, 1.0, 1.0], slots=2) == 3.0
    assert bench_gpu.list_schedule([1.0, 1.0, 1.0, 3.0], slots=2) == 4.0


def test_the_schedule_model_visits_each_test_steps_near_boxes_apart():
    """The gather lists and visits the near boxes of each step of ``gather_boxes`` apart: a
    block near 2 boxes of one step and 1 of the next visits twice, not once (4 at a time)."""
    import bench_gpu

    from tritarget.kernels import AnchorGrid, presets, triton_backend
    from tritarget.kernels.anchors import resolve_grid

    meta = triton_backend._COMPILED
    grid = resolve_grid(presets.get("retinanet_torchvision").anchors, (64, 64))
    assert isinstance(grid, AnchorGrid)
    far = [60.0, 60.0, 61.0, 61.0]  # near the last blocks only (the coarsest anchors cover the canvas)
    near = [1.0, 1.0, 3.0, 3.0]
    rows = [far] * meta.gather_boxes + [near] * 2 + [far] * (meta.gather_boxes - 2) + [near]
    near_boxes, visits = bench_gpu.block_near(torch.tensor(rows), [len(rows)], grid)
    first = 0  # the first block: a corner's smallest anchors, near the corner's boxes alone
    assert int(near_boxes[0][first]) == 3 and int(visits[0][first]) == 2


def test_the_bench_counts_the_pairs_of_the_compiled_matching():
    """bench_gpu's ``pairs_evaluated`` counted the pair walk's rectangles (exactly the
    overlapping pairs) while the gather, the default it timed, evaluates ~1.9x as many
    (review 49): it now counts what ``--pairs`` counts for the gather as built."""
    import bench_gpu

    from tritarget.kernels import assign, generate_anchors, presets, triton_backend
    from tritarget.kernels.problem import build_problem
    from tritarget.kernels.workload import coco_like_batch

    canvas, config = (160, 224), presets.get("retinanet_torchvision")
    boxes, counts, _ = coco_like_batch(2, seed=3, canvas=canvas, boxes_per_image=12)
    # On the GPU where there is one: compiled, the triton backend's counts take CUDA tensors.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem, _ = build_problem(boxes.to(device), counts, canvas, config)
    labels = assign(boxes, counts, canvas, config, backend="cpu").labels
    built = bench_gpu.gather_as_built(boxes, counts, generate_anchors(config.anchors, canvas), problem.grid, labels)
    assert triton_backend._COMPILED.matching == "gather"
    assert bench_gpu.evaluated_pairs(problem, boxes, counts) == ("gather", built["evaluated"])
    assert built["evaluated"] > triton_backend.candidate_pairs(problem)["evaluated"]  # the walk's count, below


def test_the_matching_verdict_compares_with_the_walk_where_it_ran():
    """A point where the walk failed crashed the verdict (and the sweep's last lines)."""
    import gpu_sweep

    points = [{"batch": 1, "boxes": None, "differ": [], "ms": {"walk": (1.0, 2.0), "gather": (0.5, 3.0)}},
              {"batch": 8, "boxes": None, "differ": ["gather"], "ms": {"walk": (1.0, 2.0), "gather": (0.9, 1.0)}},
              {"batch": 32, "boxes": None, "differ": [], "ms": {"gather": (0.1, 0.1)}}]  # fmt: skip
    # Time ratios: solve sqrt(0.5 * 0.9), solve_sparse sqrt(1.5 * 0.5).
    assert gpu_sweep.matching_verdict(points).splitlines()[1] == "  gather: 2 / 2, 1 / 2; time x0.671, x0.866; DIFFER"
    against_gather = gpu_sweep.matching_verdict(points, baseline="gather").splitlines()
    assert against_gather == ["verdict against the gather (points faster: solve, solve_sparse; time / its (geomean); "
                              "targets):", "  walk: 0 / 2, 1 / 2; time x1.491, x1.155; equal"]  # fmt: skip


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="its --smoke run is the interpreter's, which on the GPU image (Triton 3.6, NumPy 2.5) fails in the kernels' "
    "range() over an int argument (a 1-element array to a Python int: an error since NumPy 2.4; run11); there "
    "gpu_check.sh interrupts the compiled bench itself",
)
def test_an_interrupted_gpu_bench_still_writes_its_tables_and_plots(tmp_path):
    """gpu_check.sh stops the bench with SIGINT at its step's timeout: a point still running
    then lost the plots (drawn at the end), which the device run brings back."""
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--smoke", "--methods", "triton", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    # Every line is read from the one buffered stream (communicate() with a timeout reads the
    # pipe itself and loses what the iteration had buffered: a failure on the H200 showed none).
    seen, signalled = [], False
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            seen.append(line)
            if not signalled and re.search(r"B=1 +triton: ", line):  # the first point measured, the next under way
                process.send_signal(signal.SIGINT)
                signalled = True
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    out = "".join(seen)
    assert signalled and process.returncode == 0 and "interrupted: tables and plots" in out, out
    assert (tmp_path / "bench_gpu.png").exists() and (tmp_path / "bench_gpu_vs_g.png").exists()
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [row["batch"] for row in results["rows"]][:1] == [1]
    assert results["skipped"][-1]["why"].startswith("interrupted")
