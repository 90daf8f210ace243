"""GPU benchmark: the triton backend against torchvision and our reference, same run.

Workload "COCO-RetinaNet" (DESIGN §9): canvas 800 x 1344, torchvision RetinaNet
anchors (201,600), ``retinanet_torchvision`` preset, boxes from
``tritarget.kernels.workload`` -- COCO-like counts (mean ~7, "G=7" below) or a fixed
G = 200 / 1000 per image -- for batches B = 1, 8, 32, 64. Methods:

* ``triton``: ``triton_backend.solve`` on a checked problem built once (every stage,
  one launch each, allocation included: the kernels' time, which DESIGN §9's goals are
  stated for), with the box-anchor pairs its kernels evaluate. It leaves out what every
  real call also pays: ``build_problem``'s host work and the host-to-device copy of the
  offsets and image sizes, which the reused problem made on its first call and kept;
* ``triton_sparse``: ``triton_backend.solve_sparse`` on that problem (positives and
  ignored anchors written directly, what the service sends);
* ``triton_assign``: ``assign(..., backend="triton")`` end to end (a fresh problem per
  call: its checks and copies included);
* ``torchvision``: what torchvision's RetinaNet does per image -- ``box_iou``,
  ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``, then
  ``BoxCoder((1, 1, 1, 1)).encode_single`` and the class gather on the foreground;
* ``reference``: our reference backend on the GPU.

Times are ``triton.testing.do_bench`` medians (with 20/80% quantiles; the peers over at
least 5 calls); ours also by the wall clock, one call at a time from an idle device
(``wall_ms``: do_bench hides part of a call's host work, which ``assign`` and
``solve_sparse``'s goals count). A method that fails is recorded and the run goes on.
torchvision is
timed whole, so each peer's ratio is given twice: against ``solve`` (the kernels) and
against ``assign`` (end to end, what a caller waits for). The floor is
the bytes the triton backend writes divided by the measured device-to-device copy
bandwidth (bytes read + written per second); peak memory is the largest extra
allocation during the first call. Once every point is timed, ``solve`` and
``solve_sparse`` run a few times under ``torch.profiler`` at each (a profiler session
slows the host's launches of the calls timed after it): the device time per kernel name (whatever
kernels the backend launches, memsets and copies included), and ``solve_sparse``'s
kernels over ``solve``'s (the do_bench ratio adds what a sparse call waits for beyond
its kernels: the read-back of its lists' lengths, and the host's work around it). Writes ``bench_gpu.csv``,
``bench_gpu.json`` (rows, per-kernel times, skipped points), ``bench_gpu.png`` (time
against B), ``bench_gpu_vs_g.png`` (time per image against boxes per image at B = 32) and
``bench_gpu.md`` (a table for the README) under ``--out`` and prints every peer/ours
ratio against the DESIGN §9 targets, then the issue's times per batch, each judged.
``--time-limit`` skips the points left once that many seconds have passed (and the
profiling after them), so a caller's timeout still gets every table and plot.

``--smoke`` runs a tiny version on the CPU under Triton's interpreter (no torchvision
needed) to check the script itself; there the "kernels" are the top-level torch ops, and
each time is the median of 3 runs with their min and max.

``--pairs`` (CPU, Triton's interpreter) measures the work target instead: for two
COCO-like images and two with G = 200 at 800 x 1344, the box-anchor pairs the triton
kernels evaluate against the pairs with IoU > 0: the pair walk's
(``triton_backend.candidate_pairs``) and the gather's, counted as the kernel tests boxes;
its last line is ``evaluated/nonzero pairs: <ratio at G = 200>`` for the compiled
default's matching (``_Meta.matching``); writes ``pairs.json``,
with the shape of the compiled pair walk for B = 32 (chunks, the share inside one
rectangle, chunks per persistent program on an H200), and the gather's programs
list-scheduled in the order they start, the grid's against heavy first (``gather_schedule``).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv or "--pairs" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from recording import cpu_model, pyplot, save_figure, write_csv, write_json, write_text  # noqa: E402
from torchvision_peer import load as load_torchvision  # noqa: E402

from tritarget.kernels import Targets, assign, box_iou, generate_anchors, presets, reference, triton_backend  # noqa: E402
from tritarget.kernels.boxes import box_area  # noqa: E402
from tritarget.kernels.problem import build_problem  # noqa: E402
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch  # noqa: E402

PRESET = "retinanet_torchvision"
QUANTILES = [0.5, 0.2, 0.8]
COCO_LABEL = "G~7 (COCO)"
# Design targets (DESIGN §9), printed next to the measurements: torchvision / triton
# at (workload, B), and triton / floor at B = 32, G ~ 7.
TARGET_SPEEDUP_VS_TORCHVISION = {(COCO_LABEL, 32): 170.0, ("G=200", 32): 115.0, ("G=1000", 8): 65.0}
TARGET_FLOOR_RATIO = 4.0
TARGET_SPARSE_VS_DENSE = 1.2
# The issue "Kernels at the hardware limit": milliseconds per batch at (workload, B, method),
# and B = 1's ``assign`` end to end at most its kernels' device time plus this.
TARGET_MS = {(COCO_LABEL, 32, "triton"): 0.15, (COCO_LABEL, 32, "triton_sparse"): 0.10, ("G=200", 32, "triton"): 0.6,
             ("G=1000", 8, "triton"): 1.0}  # fmt: skip
TARGET_ASSIGN_OVER_KERNELS_MS = 0.060
PROFILED_CALLS = 5
REP_MS = 200  # do_bench's timed span per method and point
# Of --time-limit, the seconds no new point starts its timings in: the profiling of the
# points timed (goal points first) gets them at least (about 2 s a point on the H200).
PROFILE_RESERVE_S = 15
WALL_CALLS = 200  # the most single calls ``wall_ms`` times
L2_FLUSH_BYTES = 256 * 2**20  # as do_bench's flush: more than any L2 (H100 50 MB, H200 60 MB)
PEERS = ("torchvision", "reference")
PAIRS_SEED = 1  # two COCO-like images with 8 and 6 boxes
PAIRS_ANCHOR_CHUNK = 32768  # IoU rows of this many anchors at a time: bounded memory at G = 200
WALK_BATCH = 32  # the batch of the GPU goals, whose pair walk --pairs describes
GATHER_TILES = (32, 128)  # anchors per tile of the gather --pairs weighs against the walk
H200_SMS = 132


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="output folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--boxes", nargs="+", default=["coco", "200", "1000"],
                        help="'coco' (COCO-like, mean ~7) or a fixed number of boxes per image")  # fmt: skip
    parser.add_argument("--methods", nargs="+",
                        default=["triton", "triton_sparse", "triton_assign", "torchvision", "reference"])  # fmt: skip
    parser.add_argument("--max-slow-seconds", type=float, default=1.5,
                        help="skip torchvision/reference points whose first call takes longer than this")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which nothing more runs (no new point's timings starts in the last "
                             f"{PROFILE_RESERVE_S:g}: the profiling's)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    parser.add_argument("--pairs", action="store_true",
                        help="CPU: box-anchor pairs the triton kernels evaluate vs pairs with IoU > 0")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.boxes = [1, 2], ["coco", "20"]
    return args


# --- timing ------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = REP_MS) -> dict[str, float]:
    """Milliseconds of fn: ``median_ms`` and its spread, ``p20_ms`` and ``p80_ms``
    (do_bench's quantiles over about ``rep_ms`` of calls) on CUDA, ``min_ms`` and
    ``max_ms`` of 3 runs on the CPU."""
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=QUANTILES)
        return {"median_ms": median, "p20_ms": low, "p80_ms": high}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def wall_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5) -> dict[str, float]:
    """Wall-clock milliseconds of single calls (median, 20th and 80th percentiles, at least
    5 (on CUDA) and at most ``WALL_CALLS`` calls within about ``budget_s``), each from an idle device
    whose L2 was flushed first, so that the host's work in the call counts in full:
    do_bench starts its clock when the flush is queued, and the call's host work overlaps
    the flush (run12 on the H200: B = 1 ``assign`` 0.402 ms by do_bench, 463 us a call by
    the wall clock; ``solve_sparse`` 0.259 against 289 us)."""
    cuda = device.type == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES // 4 if cuda else 1, dtype=torch.int32, device=device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    fewest = 5 if cuda else 1  # on the CPU (--smoke) a call of the interpreter takes a second
    while len(times) < WALL_CALLS and (len(times) < fewest or time.perf_counter() < deadline):
        flush.zero_()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    low, median, high = (times[round(q * (len(times) - 1))] for q in (0.2, 0.5, 0.8))
    return {"wall_ms": median, "wall_p20_ms": low, "wall_p80_ms": high, "wall_calls": len(times)}


def spread(row: dict) -> str:
    """The spread ``time_ms`` measured, named for what it is."""
    if "p20_ms" in row:
        return f" (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
    if "min_ms" in row:
        return f" (min {row['min_ms']:.3f}, max {row['max_ms']:.3f} of 3 runs)"
    return " (one call)"


def one_call(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak extra bytes) of one call: the largest allocation above the current
    one (CUDA only)."""
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    del result
    return seconds, torch.cuda.max_memory_allocated(device) - before if cuda else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(fn: Callable[[], object], device: torch.device, calls: int = PROFILED_CALLS) -> list[dict]:
    """Device time per kernel name per call, the largest first: fn run ``calls`` times
    under torch.profiler. On the CPU (--smoke: interpreted kernels are no profiler
    events) the top-level torch ops stand in for kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    totals: dict[str, list[float]] = {}  # name -> [microseconds, launches]
    for event in prof.events():
        if (event.device_type == DeviceType.CUDA) if cuda else (event.cpu_parent is None):
            total = totals.setdefault(event.name, [0.0, 0])
            total[0] += event.time_range.elapsed_us()
            total[1] += 1
    kernels = [{"name": name, "ms_per_call": us / calls / 1e3, "launches_per_call": n / calls}
               for name, (us, n) in totals.items()]  # fmt: skip
    return sorted(kernels, key=lambda k: -k["ms_per_call"])


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth, bytes read + written per second (CUDA only)."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    median_ms = time_ms(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * src.numel() * src.element_size() / (median_ms * 1e-3)


# --- the peer: torchvision RetinaNet's per-image target code ----------------------


def torchvision_targets(boxes, counts, classes, anchors):
    """Per image as torchvision RetinaNet's compute_loss: IoU, Matcher, encode the foreground."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import box_iou

    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    out = []
    start = 0
    for count in counts:
        gt = boxes[start : start + count]
        gt_classes = classes[start : start + count]
        start += count
        if count == 0:
            out.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            continue
        matched = matcher(box_iou(gt, anchors))
        foreground = matched >= 0
        regression = coder.encode_single(gt[matched[foreground]], anchors[foreground])
        out.append((matched, regression, gt_classes[matched[foreground]]))
    return out


# --- the benchmark -----------------------------------------------------------------


def bytes_written(batch: int, num_anchors: int) -> int:
    """Dense outputs of the triton backend: labels int8, matched int32, deltas 4 float32, classes int32."""
    return batch * num_anchors * Targets.bytes_per_anchor(classes=True, max_iou=False)


def methods_for(problem, boxes, counts, classes, canvas, have_torchvision) -> dict[str, Callable[[], object]]:
    """The compared computations on one batch, by name."""
    config = problem.config
    methods = {
        # The problem is reused: after its first call it holds its offsets and sizes on
        # the device (Problem._device_ints), so these time the kernels alone.
        "triton": lambda: triton_backend.solve(problem),
        "triton_sparse": lambda: triton_backend.solve_sparse(problem),
        "triton_assign": lambda: assign(boxes, counts, canvas, config, gt_classes=classes, backend="triton"),
        "reference": lambda: reference.solve(problem),
    }
    if have_torchvision:
        methods["torchvision"] = lambda: torchvision_targets(boxes, counts, classes, problem.anchors)
    return methods


def _points_in_order(boxes: list[str], batches: list[int]) -> list[tuple[str, int]]:
    """Every (boxes, B) point, those with a goal first (the GPU goals' points, then B = 1's
    end-to-end one, then G = 1000's at B = 32, which the plot against G draws): a
    --time-limit that cuts the run short cuts the others."""
    labels = {"coco": COCO_LABEL}
    goals = [*TARGET_SPEEDUP_VS_TORCHVISION, (COCO_LABEL, 1), ("G=1000", 32)]
    points = [(b, batch) for b in boxes for batch in batches]
    rank = {point: goals.index(key) if (key := (labels.get(point[0], f"G={point[0]}"), point[1])) in goals
            else len(goals) for point in points}  # fmt: skip
    return sorted(points, key=rank.__getitem__)


def run(args: argparse.Namespace, env: dict, out: Path, results: dict) -> None:
    """Every (boxes, B) point, into ``results``: {"rows": timings, "kernels": per-kernel
    device times, "skipped": points or methods left out, with why}. Every point is timed
    first, then each is profiled and its pairs counted (``profile_points``): host-bound
    calls timed after a profiler session ran ~3.5x slower (run12 on the H200: B = 1
    ``solve`` 0.318 ms in this bench against 0.086 ms in gpu_sweep.py, which profiles
    nothing; B = 32, bound by the device, read the same in both)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    canvas = (64, 96) if args.smoke else COCO_CANVAS
    config = presets.get(PRESET)
    have_torchvision = load_torchvision() is not None
    if not have_torchvision:
        print("torchvision is not installed: its column is skipped")

    bandwidth = copy_bandwidth(device)
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = results["rows"]
    started = time.perf_counter()
    timed = []  # (label, fixed, batch) of the points timed, for the profiling after
    for boxes_arg, batch in _points_in_order(args.boxes, args.batches):
        fixed = None if boxes_arg == "coco" else int(boxes_arg)
        label = COCO_LABEL if fixed is None else f"G={fixed}"
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit - PROFILE_RESERVE_S:
            print(f"{label:>11} B={batch:<3} skipped: past --time-limit {args.time_limit:g} s less "
                  f"{PROFILE_RESERVE_S:g} s kept for profiling")  # fmt: skip
            results["skipped"].append({"workload": label, "batch": batch, "why": "time limit"})
            continue
        boxes, counts, classes = coco_like_batch(batch, seed=batch, canvas=canvas, boxes_per_image=fixed)
        boxes, classes = boxes.to(device), classes.to(device)
        problem, _ = build_problem(boxes, counts, canvas, config, gt_classes=classes)
        methods = methods_for(problem, boxes, counts, classes, canvas, have_torchvision)
        for name in args.methods:
            if name in methods:
                row = time_method(name, methods[name], args, device, results, label, batch)
                if row is None:
                    continue
                row.update(workload=label, boxes_per_image=fixed if fixed is not None else "coco",
                           total_boxes=int(sum(counts)), batch=batch, anchors=problem.num_anchors)  # fmt: skip
                row = {key: row[key] for key in ROW_HEAD} | row  # the CSV's first columns
                if name == "triton" and bandwidth:
                    written = bytes_written(batch, problem.num_anchors)
                    row["bytes_written"] = written
                    row["floor_ms"] = written / bandwidth * 1e3
                    row["vs_floor"] = row["median_ms"] / row["floor_ms"]
                rows.append(row)
                floor = f"  floor {row['floor_ms']:.3f} ms, x{row['vs_floor']:.2f}" if "floor_ms" in row else ""
                wall = f", wall {row['wall_ms']:.3f} ms" if "wall_ms" in row else ""
                print(f"{label:>11} B={batch:<3} {name:>14}: {row['median_ms']:10.3f} ms{spread(row)}{wall}{floor}")
        timed.append((label, fixed, batch))
        del problem, boxes, classes, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_tables(results, env, out)  # after every batch: a timeout still leaves results
    profile_points(timed, args, device, canvas, config, results, started)
    write_tables(results, env, out)


# A row's first columns, in this order.
ROW_HEAD = ("workload", "boxes_per_image", "total_boxes", "batch", "anchors", "method")
# Methods also timed by the wall clock, one call at a time (``wall_ms``): those whose host
# work the goals count (``assign`` end to end; ``solve_sparse`` reads its lengths back).
WALL_TIMED = ("triton", "triton_sparse", "triton_assign")


def time_method(name: str, fn: Callable[[], object], args, device: torch.device, results: dict, label: str,
                batch: int) -> dict | None:  # fmt: skip
    """One method's timings at one point, or None (recorded in ``results["skipped"]``)
    where it ran out of memory or failed: a method that fails (a kernel variant never
    compiled before) costs its own row, not the points and tables after it."""
    try:
        first, peak = one_call(fn, device)  # also compiles the kernels
        if name in PEERS and first > args.max_slow_seconds and not args.smoke:
            return {"method": name, "median_ms": first * 1e3, "timing": "single call", "peak_extra_bytes": peak}
        warm, peak = one_call(fn, device)  # without first-use allocations and compiles
        # The peers get at least 5 timed calls (do_bench runs rep / its estimate: 1-3 of
        # torchvision's at G = 200 and 1000, where the goals' ratios rest on them).
        rep_ms = max(REP_MS, 6e3 * warm) if name in PEERS else REP_MS
        times = time_ms(fn, device, rep_ms)
        if name in WALL_TIMED:
            times.update(wall_ms(fn, device))
    except torch.cuda.OutOfMemoryError:
        why = "OOM"
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 -- reported and recorded; the run goes on
        why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    else:
        timing = "do_bench" if device.type == "cuda" else "perf_counter, 3 runs"
        return {"method": name, **times, "timing": timing, "peak_extra_bytes": peak}
    print(f"{label:>11} B={batch:<3} {name:>14}: {why}")
    results["skipped"].append({"workload": label, "batch": batch, "method": name, "why": why})
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an error's launches end before the next method's
    return None


def profile_points(timed: list[tuple], args, device: torch.device, canvas, config, results: dict,
                   started: float) -> None:  # fmt: skip
    """After every point's timings: each point's kernels under torch.profiler (``solve`` and
    ``solve_sparse``) and the pairs ``solve`` evaluates, while ``--time-limit`` allows."""
    rows = results["rows"]
    for label, fixed, batch in timed:
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            print(f"{label:>11} B={batch:<3} not profiled: past --time-limit {args.time_limit:g} s")
            results["skipped"].append({"workload": label, "batch": batch, "why": "time limit (profile, pairs)"})
            continue
        boxes, counts, classes = coco_like_batch(batch, seed=batch, canvas=canvas, boxes_per_image=fixed)
        boxes, classes = boxes.to(device), classes.to(device)
        problem, _ = build_problem(boxes, counts, canvas, config, gt_classes=classes)
        methods = {"triton": functools.partial(triton_backend.solve, problem),
                   "triton_sparse": functools.partial(triton_backend.solve_sparse, problem)}  # fmt: skip
        for row in rows:
            if (row["workload"], row["batch"], row["method"]) != (label, batch, "triton"):
                continue
            row["matching"], row["pairs_evaluated"] = evaluated_pairs(problem, boxes, counts)
            print(f"{label:>11} B={batch:<3} {'triton':>14}: {row['pairs_evaluated']:,} pairs evaluated "
                  f"({row['matching']}'s first pass)")  # fmt: skip
        measured = {row["method"] for row in rows if (row["workload"], row["batch"]) == (label, batch)}
        for name, fn in methods.items():
            if name not in measured:
                continue
            try:
                fn()  # the profiler records whole calls: none of it is a first call's
                kernels = kernel_times(fn, device)
            except RuntimeError as exc:  # the profiler (CUPTI) unusable here: the timings still count
                print(f"{label:>11} B={batch:<3} {name:>14}: no kernel times ({exc})")
                results["skipped"].append({"workload": label, "batch": batch, "method": name,
                                           "why": f"profiler: {exc}"})  # fmt: skip
            else:
                results["kernels"].append({"workload": label, "batch": batch, "method": name,
                                           "calls": PROFILED_CALLS, "kernels": kernels})  # fmt: skip
        del problem, boxes, classes, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """Per (workload, batch), on each other row: its time / ``solve``'s
    (``speedup_of_triton``), and on the peers' rows also / ``assign``'s, end to end
    (``speedup_of_triton_assign``)."""
    solve = {(r["workload"], r["batch"]): r["median_ms"] for r in rows if r["method"] == "triton"}
    end_to_end = {(r["workload"], r["batch"]): r["median_ms"] for r in rows if r["method"] == "triton_assign"}
    # Each row gets its ratios; the table reads them from there.
    for row in rows:
        key = (row["workload"], row["batch"])
        if row["method"] != "triton" and key in solve:
            row["speedup_of_triton"] = row["median_ms"] / solve[key]
        if row["method"] in PEERS and key in end_to_end:
            row["speedup_of_triton_assign"] = row["median_ms"] / end_to_end[key]


def _verdict(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return f"  [target {'>=' if at_least else '<='} {target:g}x: {'met' if met else 'NOT met'}]"


def summary(rows: list[dict], kernels: list[dict] = ()) -> list[str]:
    """Every peer/ours ratio and triton against the floor, next to the DESIGN §9 targets,
    then the issue's times per batch (``goal_lines``; ``kernels``: ``results["kernels"]``)."""
    lines = ["", "time / ours (same run): / solve = triton_backend.solve on a problem built once, the kernels "
             "(DESIGN §9's targets); / assign = assign end to end, a fresh problem per call"]  # fmt: skip
    for row in rows:
        if "speedup_of_triton" in row:
            key, ratio = (row["workload"], row["batch"]), row["speedup_of_triton"]
            mark = ""
            if row["method"] == "torchvision" and key in TARGET_SPEEDUP_VS_TORCHVISION:
                mark = _verdict(ratio, TARGET_SPEEDUP_VS_TORCHVISION[key], at_least=True)
            elif row["method"] == "triton_sparse":
                mark = _verdict(ratio, TARGET_SPARSE_VS_DENSE, at_least=False)
            if "speedup_of_triton_assign" in row:
                mark += f"; / assign = {row['speedup_of_triton_assign']:.2f}x"
            lines.append(f"  {row['workload']:>11} B={row['batch']:<3} {row['method']:>14} {row['median_ms']:10.3f} ms"
                         f" / solve = {ratio:8.2f}x{mark}")  # fmt: skip
    for row in rows:
        if "vs_floor" in row:
            mark = ""
            if (row["workload"], row["batch"]) == (COCO_LABEL, 32):
                mark = _verdict(row["vs_floor"], TARGET_FLOOR_RATIO, at_least=False)
            lines.append(f"  {row['workload']:>11} B={row['batch']:<3} triton vs floor: x{row['vs_floor']:.2f}{mark}")
    return lines + goal_lines(rows, kernels)


def _met(value: float, most: float) -> str:
    return f"{'met' if value <= most else 'NOT met'}"


def goal_lines(rows: list[dict], kernels: list[dict]) -> list[str]:
    """The issue's times per batch, each judged: dense ``solve`` by do_bench's median (the
    device's time), ``solve_sparse`` and ``assign`` by the wall clock (``wall_ms``: their
    host work and read-backs count, which do_bench partly hides)."""
    lines = ["", "goals, ms per batch (dense: do_bench median; sparse and assign: wall clock, one call at a time):"]
    by_key = {(r["workload"], r["batch"], r["method"]): r for r in rows}
    for (workload, batch, method), most in TARGET_MS.items():
        row = by_key.get((workload, batch, method))
        if row is None:
            lines.append(f"  {workload:>11} B={batch:<3} {method:>14}: not measured [target <= {most:g} ms]")
            continue
        judged = row.get("wall_ms", row["median_ms"]) if method != "triton" else row["median_ms"]
        wall = f", wall {row['wall_ms']:.3f}" if "wall_ms" in row else ""
        lines.append(f"  {workload:>11} B={batch:<3} {method:>14}: {row['median_ms']:.3f} ms{wall} "
                     f"[target <= {most:g} ms: {_met(judged, most)}]")  # fmt: skip
    end_to_end = by_key.get((COCO_LABEL, 1, "triton_assign"))
    device = {(k["workload"], k["batch"], k["method"]): sum(x["ms_per_call"] for x in k["kernels"]) for k in kernels}
    solve_kernels = device.get((COCO_LABEL, 1, "triton"))
    if end_to_end is None or solve_kernels is None or "wall_ms" not in end_to_end:
        lines.append(f"  {COCO_LABEL:>11} B=1   {'triton_assign':>14}: not measured (or its kernels not profiled) "
                     f"[target <= kernels + {TARGET_ASSIGN_OVER_KERNELS_MS * 1e3:g} us]")  # fmt: skip
    else:
        most = solve_kernels + TARGET_ASSIGN_OVER_KERNELS_MS
        lines.append(f"  {COCO_LABEL:>11} B=1   {'triton_assign':>14}: wall {end_to_end['wall_ms']:.3f} ms against "
                     f"solve's kernels {solve_kernels:.3f} ms + {TARGET_ASSIGN_OVER_KERNELS_MS * 1e3:g} us = "
                     f"{most:.3f} [{_met(end_to_end['wall_ms'], most)}]")  # fmt: skip
    return lines


def kernel_table(kernels: list[dict], device: str, most: int = 8) -> list[str]:
    """Per (workload, B, method): the ``most`` longest kernels' device time and launches
    per call, and the total over all of them; for ``triton_sparse``, that total over
    ``triton``'s at the same point."""
    lines = ["", f"{device} time per kernel (torch.profiler, mean of {PROFILED_CALLS} calls):",
             f"  {'boxes':>11} {'B':>3} {'method':>13}  {'ms/call':>9} {'launches':>8}  kernel"]  # fmt: skip
    totals = {(p["workload"], p["batch"], p["method"]): sum(k["ms_per_call"] for k in p["kernels"]) for p in kernels}
    for point in kernels:
        head = f"  {point['workload']:>11} {point['batch']:>3} {point['method']:>13}"
        for kernel in point["kernels"][:most]:
            lines.append(f"{head}  {kernel['ms_per_call']:9.4f} {kernel['launches_per_call']:8.3g}  {kernel['name']}")
            head = " " * len(head)
        total = totals[point["workload"], point["batch"], point["method"]]
        rest = len(point["kernels"]) - most
        lines.append(f"{head}  {total:9.4f} {'':>8}  (total{f', {rest} more kernels' if rest > 0 else ''})")
        dense = totals.get((point["workload"], point["batch"], "triton"))
        if point["method"] == "triton_sparse" and dense:
            lines.append(f"{head}  {total / dense:8.2f}x {'':>8}  (over triton's total: sparse / dense, kernels alone)")
    return lines


def markdown_table(rows: list[dict], env: dict) -> str:
    """One line per (workload, B): ours, the floor, the peers and their ratios to ``solve``
    (the kernels) and to ``assign`` (end to end)."""
    by_point: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_point.setdefault((row["workload"], row["batch"]), {})[row["method"]] = row

    def ms(row: dict | None) -> str:
        if row is None:
            return "-"
        return f"{row['median_ms']:.3f}" + (f" / {row['wall_ms']:.3f}" if "wall_ms" in row else "")

    def ratio(row: dict | None, key: str = "speedup_of_triton") -> str:
        return "-" if row is None or key not in row else f"{row[key]:.3g}x"

    def mib(row: dict | None) -> str:
        return "-" if row is None or row.get("peak_extra_bytes") is None else f"{row['peak_extra_bytes'] / 2**20:.0f}"

    end_to_end = "speedup_of_triton_assign"
    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, torchvision {env['torchvision']}; "
        f"{PRESET}, {env['canvas'][0]}x{env['canvas'][1]}; median ms per batch. solve: "
        "`triton_backend.solve` on a problem built once (the kernels; DESIGN §9's targets are stated for it), "
        "without `build_problem`'s host work and the host-to-device copy every real call pays; sparse: "
        "`solve_sparse` likewise; assign: `assign(..., backend='triton')` end to end. torchvision and the "
        "reference are timed whole: each is divided by solve and by assign. Where two times are given: do_bench's "
        "median / the wall clock's (one call at a time from an idle device, its host work in full).",
        "",
        "| boxes | B | solve | floor | solve / floor | sparse | assign | torchvision | torchvision / solve "
        "| torchvision / assign | reference | reference / solve | reference / assign "
        "| peak MiB solve / torchvision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workload, batch), methods in by_point.items():
        ours, tv, ref = methods.get("triton"), methods.get("torchvision"), methods.get("reference")
        floor = "-" if ours is None or "floor_ms" not in ours else f"{ours['floor_ms']:.3f}"
        times = "-" if ours is None or "vs_floor" not in ours else f"{ours['vs_floor']:.1f}"
        lines.append(f"| {workload} | {batch} | {ms(ours)} | {floor} | {times} | {ms(methods.get('triton_sparse'))} "
                     f"| {ms(methods.get('triton_assign'))} | {ms(tv)} | {ratio(tv)} | {ratio(tv, end_to_end)} "
                     f"| {ms(ref)} | {ratio(ref)} | {ratio(ref, end_to_end)} | {mib(ours)} / {mib(tv)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def environment(smoke: bool) -> dict:
    import triton

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "interpreted": smoke, "preset": PRESET, "canvas": list((64, 96) if smoke else COCO_CANVAS),
        "host_cpu": cpu_model(),
    }  # fmt: skip
    if torch.cuda.is_available() and not smoke:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        info["device"] = f"cpu ({info['host_cpu']})"
    torchvision = load_torchvision()
    info["torchvision"] = None if torchvision is None else torchvision.__version__
    return info


def write_tables(results: dict, env: dict, out: Path) -> None:
    """bench_gpu.csv (one row per point), bench_gpu.json (environment + results), bench_gpu.md,
    each with the ratios of the rows so far."""
    rows = results["rows"]
    # In the tables' order (the run measures the points with goals first); sorted stably,
    # so each point's methods stay in their order.
    rows.sort(key=lambda r: (r["workload"] != COCO_LABEL, r["boxes_per_image"] if r["workload"] != COCO_LABEL else 0,
                             r["batch"]))  # fmt: skip
    add_ratios(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_csv(out / "bench_gpu.csv", [{"device": env["device"], **row} for row in rows], ["device", *columns])
    write_json(out / "bench_gpu.json", {"environment": env, **results})
    write_text(out / "bench_gpu.md", markdown_table(rows, env))


def plot(rows: list[dict], env: dict, out: Path) -> None:
    """bench_gpu.png: ms per batch against B, one panel per workload, with the floor."""
    plt = pyplot()
    if plt is None:
        return
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["batch"], r["median_ms"]) for r in rows if r["workload"] == workload and r["method"] == method]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        floor = [(r["batch"], r["floor_ms"]) for r in rows if r["workload"] == workload and "floor_ms" in r]
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="gray", label="floor (bytes / copy BW)")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="ms per batch", title=workload)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{PRESET} targets, {env['canvas'][0]}x{env['canvas'][1]}, {env['device']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "bench_gpu.png", dpi=120)
    plt.close(fig)


def plot_vs_boxes(rows: list[dict], env: dict, out: Path, batch: int, fallback: int) -> None:
    """bench_gpu_vs_g.png: ms per image against boxes per image (mean), log-log, at B = batch
    (32); a workload without a triton time there is drawn at B = fallback (8), labelled so
    (per image, so that a point of the other batch sits where its time per image does)."""
    plt = pyplot()
    if plt is None:
        return
    triton_batches = {(r["workload"], r["batch"]) for r in rows if r["method"] == "triton"}
    chosen = {}  # workload -> the batch drawn for it
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for b in (batch, fallback):
            if (workload, b) in triton_batches:
                chosen[workload] = b
                break
    picked = [r for r in rows if chosen.get(r["workload"]) == r["batch"]]
    if not picked:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lines = {"triton": "triton solve", "triton_sparse": "triton solve_sparse", "torchvision": "torchvision"}
    for method, label in lines.items():
        points = sorted((r["total_boxes"] / r["batch"], r["median_ms"] / r["batch"]) for r in picked
                        if r["method"] == method)  # fmt: skip
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    floor = sorted((r["total_boxes"] / r["batch"], r["floor_ms"] / r["batch"]) for r in picked if "floor_ms" in r)
    if floor:
        ax.plot(*zip(*floor), linestyle="--", color="gray", label="floor (bytes / copy BW)")
    for r in picked:
        if r["method"] == "triton" and r["batch"] != batch:
            ax.annotate(f"B={r['batch']}", (r["total_boxes"] / r["batch"], r["median_ms"] / r["batch"]), fontsize=8,
                        textcoords="offset points", xytext=(4, -10))  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="boxes per image G (mean)", ylabel=f"ms per image (batches of {batch})")
    ticks = sorted({r["total_boxes"] / r["batch"] for r in picked})
    ax.set_xticks(ticks, [f"{g:.3g}" for g in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{PRESET}, {env['canvas'][0]}x{env['canvas'][1]}, {env['device']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "bench_gpu_vs_g.png", dpi=120)
    plt.close(fig)


# --- --pairs: the work the kernels do against the work there is --------------------


def nonzero_pairs(boxes: torch.Tensor, counts: list[int], anchors: torch.Tensor) -> int:
    """Box-anchor pairs with IoU > 0, image by image, anchors in chunks (bounded memory)."""
    total, start = 0, 0
    for count in counts:
        image = boxes[start : start + count]
        start += count
        for chunk in anchors.split(PAIRS_ANCHOR_CHUNK):
            total += int((box_iou(image, chunk) > 0).sum())
    return total


def gather_pairs(problem, tile: int) -> dict[str, int]:
    """The pairs a gather by anchor tile would evaluate instead of the pair walk (each
    tile of anchors takes every box that overlaps one of its anchors and evaluates all
    of its anchors against it, reducing in registers: no atomic per pair): over tiles of
    ``tile`` consecutive anchors of an image, and over runs of ``tile`` cells of one
    shape along a row (per-shape planes), from the same rectangles as the walk."""
    launch = triton_backend._Launch(problem)
    with triton_backend._on(launch.device):
        rect = launch.segments()["rect"].long()
    shapes = launch.shape_int.long()
    segment = torch.arange(rect.shape[0])
    row, shape = segment // launch.num_shapes, segment % launch.num_shapes
    cells = rect[:, 1] * rect[:, 3]
    # Every pair of every rectangle: its segment, then its cell (x, y) in the rectangle.
    owner = torch.repeat_interleave(segment, cells)
    local = torch.arange(owner.numel()) - torch.repeat_interleave(torch.cumsum(cells, 0) - cells, cells)
    x = rect[owner, 0] + local % rect[owner, 1]
    y = rect[owner, 2] + local // rect[owner, 1]
    base, step_x, step_y, width = (shapes[shape[owner], column] for column in range(4))
    anchor_tile = (base + x * step_x + y * step_y) // tile
    run = ((shape[owner] * COCO_CANVAS[0] + y) * (COCO_CANVAS[1] // tile + 1)) + x // tile
    counts = {}
    for name, key in (("anchor_tiles", anchor_tile), ("shape_runs", run)):
        per_box = torch.unique(row[owner] * (int(key.max()) + 1) + key).numel()
        counts[name] = per_box * tile
    return counts


def _block_bounds(grid, block_a: int) -> torch.Tensor:
    """The gather's table for blocks of ``block_a`` anchors: its parts' bounding boxes
    [blocks, 0:4] and [blocks, 4:8], its area range [blocks, 8:10]."""
    return triton_backend._block_bounds(grid, block_a, torch.device("cpu"), None)


def _crossing(image: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """[blocks, G] bool: the boxes the gather lists for each block (its test: crossing the
    bounding box of one of the block's parts, strict inequalities)."""

    def crosses(part: torch.Tensor) -> torch.Tensor:
        crossing = (image[None, :, 0] < part[:, None, 2]) & (image[None, :, 2] > part[:, None, 0])
        return crossing & (image[None, :, 1] < part[:, None, 3]) & (image[None, :, 3] > part[:, None, 1])

    return crosses(bounds[:, :4]) | crosses(bounds[:, 4:8])


def evaluated_pairs(problem, boxes: torch.Tensor, counts: list[int]) -> tuple[str, int]:
    """The compiled matching and the box-anchor pairs it evaluates: the gather, every anchor
    of a block for each box its test lists there; the pair walk, its rectangles (each pair
    pass walks them once)."""
    matching = triton_backend._COMPILED.matching
    if matching != "gather":
        return matching, triton_backend.candidate_pairs(problem)["evaluated"]
    block_a = triton_backend._COMPILED.block_a
    bounds = triton_backend._block_bounds(problem.grid, block_a, torch.device("cpu"), None)
    anchors = problem.grid.materialize()
    near = sum(int(_kept_near(image, bounds, problem.grid, anchors, problem.config).sum())
               for image in boxes.cpu().split(counts))  # fmt: skip
    return matching, block_a * near


def _kept_near(image: torch.Tensor, bounds: torch.Tensor, grid, anchors: torch.Tensor, config=None) -> torch.Tensor:
    """[blocks, G]: the near boxes the gather visits, its test of the block's two parts
    (``_crossing``) after the threshold pruning (the bound at least what the box needs,
    ``box_needs``; ``config``: this bench's preset's)."""
    need = box_needs(image, grid, anchors, presets.get(PRESET) if config is None else config)
    return _crossing(image, bounds) & (_iou_bounds(image, bounds) * 1.0001 >= need[None, :])


def _iou_bounds(image: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """[blocks, G]: ``triton_assign._iou_bound``, each box's bound on its IoU with the
    anchors of each block (the intersection with the parts' bounding boxes over the
    nearest anchor area, over the larger of that and the box's)."""
    area = ((image[:, 2] - image[:, 0]) * (image[:, 3] - image[:, 1]))[None, :]
    nearest = torch.minimum(torch.maximum(area, bounds[:, 8:9]), bounds[:, 9:10])
    overlap = torch.maximum(_part_overlap(image, bounds[:, :4]), _part_overlap(image, bounds[:, 4:8]))
    return torch.minimum(overlap, nearest) / torch.maximum(area, nearest)


def box_needs(image: torch.Tensor, grid, anchors: torch.Tensor, config, per_image: bool | None = None) -> torch.Tensor:
    """[G]: ``floor_kernel``'s need of each box (min(low, its best IoU over one anchor per
    level and cell shape, at the cell nearest its centre)); ``per_image`` (default: for
    torchvision's lift) the image's lowest for every box."""
    low = config.match.low
    per_image = config.match.low_quality == "torchvision" if per_image is None else per_image
    centre = (image[:, :2] + image[:, 2:]) / 2
    best = torch.zeros(image.shape[0])
    for level, first in zip(grid.levels, grid.level_starts, strict=False):
        cell = []
        for axis, factor, scale, count in ((0, level.factor_x, level.scale_x, level.width),
                                           (1, level.factor_y, level.scale_y, level.height)):  # fmt: skip
            position = centre[:, axis] / (1.0 if scale is None else scale)
            i = position * factor - level.offset if level.center_op == "div" else position / factor - level.offset
            cell.append((i + 0.5).clamp(0, count - 1).to(torch.int64))
        col, row = cell
        shapes = level.cells.shape[0]
        for k in range(shapes):
            if grid.shape_major:
                index = first + k * level.height * level.width + row * level.width + col
            else:
                index = first + (row * level.width + col) * shapes + k
            best = torch.maximum(best, _paired_iou(image, anchors[index]))
    need = best.clamp(max=low)
    return need.min().expand_as(need) if per_image and need.numel() else need


def _paired_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """[G]: each box's IoU with its own row of ``others``, as ``box_iou`` computes a pair
    (its diagonal, without the [G, G] matrix: 45 of them per image took 3.7 s at G = 1000)."""
    lt = torch.maximum(boxes[:, :2], others[:, :2])
    rb = torch.minimum(boxes[:, 2:], others[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes) + box_area(others) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def _part_overlap(image: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """[blocks, G]: each box's intersection with the bounding box of each block's part."""
    w = torch.minimum(image[None, :, 2], part[:, None, 2]) - torch.maximum(image[None, :, 0], part[:, None, 0])
    h = torch.minimum(image[None, :, 3], part[:, None, 3]) - torch.maximum(image[None, :, 1], part[:, None, 1])
    return w.clamp(min=0) * h.clamp(min=0)


def _touching(image: torch.Tensor, anchors: torch.Tensor, block_a: int) -> int:
    """The (box, block) pairs where the box overlaps one of the block's anchors."""
    touching = 0
    for first in range(0, anchors.shape[0], block_a * 256):  # 256 blocks at a time
        chunk = anchors[first : first + block_a * 256]
        overlaps = torch.nn.functional.pad(box_iou(image, chunk) > 0, (0, -chunk.shape[0] % block_a))
        touching += int(overlaps.view(image.shape[0], -1, block_a).any(2).sum())
    return touching


def gather_tile(boxes: torch.Tensor, counts: list[int], anchors: torch.Tensor, grid,
                block_a: int) -> dict[str, int]:  # fmt: skip
    """The gather's visits with another number of anchors per block: blocks, listed
    (box, block) pairs and those touching one of the block's anchors."""
    bounds = _block_bounds(grid, block_a)
    near = touching = start = 0
    for count in counts:
        image = boxes[start : start + count]
        start += count
        near += int(_crossing(image, bounds).sum())
        touching += _touching(image, anchors, block_a)
    return {"blocks": bounds.shape[0] * len(counts), "near": near, "touching": touching, "evaluated": near * block_a}


def gather_as_built(boxes: torch.Tensor, counts: list[int], anchors: torch.Tensor, grid,
                    labels: torch.Tensor) -> dict[str, int]:  # fmt: skip
    """What ``gather_kernel`` visits with the compiled sizes: per image and block of
    ``block_a`` consecutive anchors, the boxes that cross the bounding box of one of the
    block's two parts (its test, strict inequalities, on the backend's table), and the
    steps of ``gather_boxes`` boxes it tests; for the lift (in the finalize), those of
    them with a best IoU > 0 (over every anchor: no rule excludes any here) that the
    block's area range and the box's intersection with the block's parts let reach it
    (the kernel's bound; ``lift_near_area_bounded``, by the area range alone). And the blocks that generate
    their anchors: in the gather, those with a near box; in the finalize (no rule needs
    the anchors here), those the lift visits or with a positive to encode (``labels``
    [B, A], the targets), which before the lift moved into the finalize generated them
    once in each; ``recorded``, the anchors of the blocks with a near box, whose 16-byte
    records the gather writes and the finalize reads (``_Meta.skip_empty``; every anchor's
    without it); ``tiles``, the visits of ``gather_near`` boxes, and ``lone_steps``, the
    steps whose last near box is alone in its tile (``_Meta.lone_visits`` visits it alone).
    ``near`` counts the pairs the matching keeps after the threshold pruning
    (``_Meta.threshold_prune``: the box's IoU bound at least what it needs,
    ``box_needs``; the preset's lift, torchvision's, prunes by the image's lowest need),
    ``near_crossing`` every near box before it, ``near_box_floor`` what each box's own
    need would keep (mmdet's lift, the forced one, none).
    ``touching``: the (box, block) pairs where the box overlaps one of the
    block's anchors, what an exact per-block test would list (the rest of the gather's
    evaluated pairs above the overlapping ones is the tile's granularity: a box visits
    every anchor of a block it touches). ``lift_testing``: the blocks whose lift tests
    boxes at all, those with an anchor whose best IoU is positive and at least
    min_pos_iou (the finalize's gate; no rule excludes an anchor here)."""
    meta = triton_backend._COMPILED
    blocks = anchors.split(meta.block_a)
    bounds = _block_bounds(grid, meta.block_a)
    area_low, area_high = bounds[:, 8:9], bounds[:, 9:10]
    near = lifted = bounded = steps = start = generating = lift_generating = positive = finalize_generating = 0
    touching = lift_testing = recorded = tiles = lone_steps = area_bounded = box_floor = crossing = 0
    config = presets.get(PRESET)
    sizes = torch.tensor([len(block) for block in blocks])
    min_pos_iou = config.match.min_pos_iou
    for index, count in enumerate(counts):
        image = boxes[start : start + count]
        start += count
        crosses = _crossing(image, bounds)
        bound = _iou_bounds(image, bounds)
        kept = _kept_near(image, bounds, grid, anchors, config)
        crossing += int(crosses.sum())
        box_floor += int((crosses & (bound * 1.0001 >= box_needs(image, grid, anchors, config, False))).sum())
        near += int(kept.sum())
        touching += _touching(image, anchors, meta.block_a)
        steps += len(blocks) * -(-count // meta.gather_boxes)
        for first in range(0, count, meta.gather_boxes):
            listed = kept[:, first : first + meta.gather_boxes].sum(1)
            tiles += int((-(-listed // meta.gather_near)).sum())
            lone_steps += int((listed % meta.gather_near == 1).sum()) if meta.gather_near > 1 else 0
        best, anchor_best = torch.zeros(count), torch.zeros(anchors.shape[0])  # per box, per anchor
        for first in range(0, anchors.shape[0], PAIRS_ANCHOR_CHUNK) if count else ():
            iou = box_iou(image, anchors[first : first + PAIRS_ANCHOR_CHUNK])
            best = torch.maximum(best, iou.max(1).values)
            anchor_best[first : first + iou.shape[1]] = iou.max(0).values
        best = best[None, :]
        block_best = torch.stack([part.max() for part in anchor_best.split(meta.block_a)])
        lift_testing += int(((block_best > 0) & (block_best >= min_pos_iou)).sum())
        area = ((image[:, 2] - image[:, 0]) * (image[:, 3] - image[:, 1]))[None, :]
        nearest = torch.minimum(torch.maximum(area, area_low), area_high)
        area_bound = torch.minimum(area, nearest) / torch.maximum(area, nearest)
        area_bounded += int((crosses & (best > 0) & (area_bound * 1.0001 >= best)).sum())
        visited = crosses & (best > 0) & (bound * 1.0001 >= best)
        lifted += int((crosses & (best > 0)).sum())
        bounded += int(visited.sum())
        generating += int(kept.any(1).sum())
        recorded += int(sizes[kept.any(1)].sum())
        lift_generating += int(visited.any(1).sum())
        encodes = torch.stack([(part == 1).any() for part in labels[index].split(meta.block_a)])
        positive += int(encodes.sum())
        finalize_generating += int((encodes | visited.any(1)).sum())
    return {"blocks": len(blocks) * len(counts), "steps": steps, "near": near, "touching": touching,
            "evaluated": near * meta.block_a,
            "lift_near": lifted, "lift_near_area_bounded": area_bounded, "lift_near_bounded": bounded,
            "near_crossing": crossing, "near_box_floor": box_floor,
            "generating": generating,
            "lift_generating": lift_generating, "positive_blocks": positive,
            "finalize_generating": finalize_generating, "lift_testing": lift_testing, "recorded": recorded,
            "tiles": tiles, "lone_steps": lone_steps}  # fmt: skip


# The gather's cost per block, in SASS instructions per warp (Triton 3.6 on sm_90,
# benchmarks/results/kernel_resources_triton3.6/): a test step of 128 boxes ~100, a visit
# of 4 near boxes 229 (the lift modes' innermost loop), a block's straight path ~100 and
# ~300 more where a near box makes it load its anchors and apply the rules.
SCHEDULE_COSTS = {"step": 100, "visit": 229, "block": 100, "near_block": 300}
# Programs resident at once on an H200: 132 SMs x 8 (64 registers x 128 threads).
SCHEDULE_SLOTS = H200_SMS * 8
SCHEDULE_POINTS = [(32, None), (32, 200), (8, 1000), (1, 1000)]  # (B, G; None: COCO-like)


def block_near(boxes: torch.Tensor, counts: list[int], grid) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, each gather program's near boxes (``_kept_near``) and its visits: the
    near boxes of each test step of ``gather_boxes`` visited ``gather_near`` at a time,
    the last visit of a step part-filled."""
    meta = triton_backend._COMPILED
    bounds = _block_bounds(grid, meta.block_a)
    anchors = grid.materialize()
    near, visits, start = [], [], 0
    for count in counts:
        crossing = _kept_near(boxes[start : start + count], bounds, grid, anchors)
        start += count
        steps = torch.nn.functional.pad(crossing, (0, -count % meta.gather_boxes)).view(crossing.shape[0], -1,
                                                                                        meta.gather_boxes)  # fmt: skip
        per_step = steps.sum(2)
        near.append(per_step.sum(1))
        visits.append(torch.div(per_step + meta.gather_near - 1, meta.gather_near, rounding_mode="floor").sum(1))
    return near, visits


def block_costs(boxes: torch.Tensor, counts: list[int], grid) -> torch.Tensor:
    """[B, blocks] each gather program's instructions by SCHEDULE_COSTS: its test steps,
    visits (``block_near``) and, with a near box, its anchors loaded and rules applied."""
    steps = [-(-count // triton_backend._COMPILED.gather_boxes) for count in counts]
    near, visits = block_near(boxes, counts, grid)
    return torch.stack([SCHEDULE_COSTS["block"] + SCHEDULE_COSTS["step"] * step + SCHEDULE_COSTS["visit"] * visit
                        + SCHEDULE_COSTS["near_block"] * (image > 0)
                        for step, image, visit in zip(steps, near, visits)]).double()  # fmt: skip


def tenths(boxes: torch.Tensor, counts: list[int], grid) -> float:
    """How many times the near boxes of the first tenth of an image's blocks its last tenth
    lists (over the batch): the coarsest level's blocks against the finest's."""
    near = torch.stack(block_near(boxes, counts, grid)[0]).double()
    tenth = near.shape[1] // 10
    return float(near[:, -tenth:].sum() / near[:, :tenth].sum())


def list_schedule(costs: list[float], slots: int = SCHEDULE_SLOTS) -> float:
    """When the last program ends if each starts, in order, on the first free slot of
    ``slots`` (the GPU's block scheduler), every slot running at one speed."""
    free = [0.0] * slots
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


def gather_schedule() -> list[dict]:
    """The gather's programs in the grid's order (an image's blocks in turn, image after
    image) against heavy first (every image's last block, the coarsest level's, then the
    last but one; ``_Meta.heavy_first``), list-scheduled: the end of each, in thousands of
    instructions per warp, against the balanced bound (the work spread evenly). A model:
    a slot's speed does not change as the GPU empties (it rises), and the costs are the
    SASS's, not timed."""
    config = presets.get(PRESET)
    points = []
    for batch, fixed in SCHEDULE_POINTS:
        boxes, counts, _ = coco_like_batch(batch, seed=batch, canvas=COCO_CANVAS, boxes_per_image=fixed)
        problem, _ = build_problem(boxes, counts, COCO_CANVAS, config)
        costs = block_costs(boxes, counts, problem.grid)
        grid_order = list_schedule(costs.reshape(-1).tolist())
        heavy_first = list_schedule(costs.flip(1).t().reshape(-1).tolist())
        balanced = max(float(costs.sum()) / SCHEDULE_SLOTS, float(costs.max()))
        points.append({"batch": batch, "boxes": fixed, "grid_order": grid_order / 1e3,
                       "heavy_first": heavy_first / 1e3, "balanced": balanced / 1e3,
                       "longest_block": float(costs.max()) / 1e3,
                       "last_tenth_near": tenths(boxes, counts, problem.grid)})  # fmt: skip
    return points


def pairs(out: Path) -> None:
    config = presets.get(PRESET)
    low_threshold = config.match.low
    anchors = generate_anchors(config.anchors, COCO_CANVAS)
    points = []
    for fixed in (None, 200):
        boxes, counts, classes = coco_like_batch(2, seed=PAIRS_SEED, canvas=COCO_CANVAS, boxes_per_image=fixed)
        problem, _ = build_problem(boxes, counts, COCO_CANVAS, config, gt_classes=classes)
        candidates = triton_backend.candidate_pairs(problem)
        nonzero = nonzero_pairs(boxes, counts, anchors)
        point = {"workload": COCO_LABEL if fixed is None else f"G={fixed}", "counts": counts,
                 "anchors": anchors.shape[0], "nonzero": nonzero, **candidates,
                 "ratio": candidates["evaluated"] / nonzero}  # fmt: skip
        point["gather"] = {tile: gather_pairs(problem, tile) for tile in GATHER_TILES}
        labels = assign(boxes, counts, COCO_CANVAS, config, backend="cpu").labels
        point["gather_as_built"] = built = gather_as_built(boxes, counts, anchors, problem.grid, labels)
        point["gather_tiles"] = tiles = {
            block_a: gather_tile(boxes, counts, anchors, problem.grid, block_a) for block_a in (64,)
        }
        points.append(point)
        extra = {k: v for k, v in candidates.items() if k != "evaluated"}
        print(f"{point['workload']:>11} boxes {counts}, {anchors.shape[0]} anchors: evaluated {point['evaluated']:,} "
              f"pairs, IoU > 0 {nonzero:,}, ratio {point['ratio']:.2f} {extra or ''}")  # fmt: skip
        for tile, gathered in point["gather"].items():
            print(f"{'':>11} a gather by {tile} consecutive anchors would evaluate {gathered['anchor_tiles']:,} "
                  f"(ratio {gathered['anchor_tiles'] / nonzero:.2f}), by runs of {tile} cells of one shape "
                  f"{gathered['shape_runs']:,} ({gathered['shape_runs'] / nonzero:.2f})")  # fmt: skip
        print(f"{'':>11} gather_kernel as built: {built['near']:,} near (box, block) pairs over {built['blocks']:,} "
              f"blocks ({built['near'] / built['blocks']:.1f} per block, {built['steps'] / built['blocks']:.0f} "
              f"test steps), evaluating {built['evaluated']:,} pairs "
              f"(ratio {built['evaluated'] / nonzero:.2f}; boxes touching one of a block's anchors: "
              f"{built['touching'] / built['blocks']:.1f} per block, ratio "
              f"{built['touching'] * triton_backend._COMPILED.block_a / nonzero:.2f}); its lift tests boxes in "
              f"{built['lift_testing'] / built['blocks']:.0%} of the blocks and visits "
              f"{built['lift_near_bounded']:,} (box, block) pairs ({built['lift_near_area_bounded']:,} with the "
              f"area bound alone, {built['lift_near']:,} with neither; both passes: ratio "
              f"{(built['near'] + built['lift_near_bounded']) * triton_backend._COMPILED.block_a / nonzero:.2f}); "
              f"blocks that generate "
              f"their anchors: {built['generating'] / built['blocks']:.0%} in the gather, "
              f"{built['finalize_generating'] / built['blocks']:.0%} in the finalize (lift and encoding; as "
              f"two launches: {built['lift_generating'] / built['blocks']:.0%} + "
              f"{built['positive_blocks'] / built['blocks']:.0%})")  # fmt: skip
        block_a = triton_backend._COMPILED.block_a
        print(f"{'':>11} the threshold pruning (low {low_threshold:g}): {built['near']:,} near pairs kept of "
              f"{built['near_crossing']:,} crossing (ratio {built['near_crossing'] * block_a / nonzero:.2f} "
              f"unpruned); by each box's own need (mmdet's lift, the forced one, none) "
              f"{built['near_box_floor']:,} (ratio {built['near_box_floor'] * block_a / nonzero:.2f})")  # fmt: skip
        every, per_image = anchors.shape[0] * len(counts), built["recorded"] * 16 / len(counts) / 1e6
        print(f"{'':>11} records between the passes (16 bytes per anchor, skip_empty): "
              f"{built['recorded'] / every:.0%} of the anchors', {per_image:.2f} MB per image written and read "
              f"back, against {anchors.shape[0] * 16 / 1e6:.2f} MB for every record")  # fmt: skip
        print(f"{'':>11} visits of {triton_backend._COMPILED.gather_near} near boxes: {built['tiles']:,}; a step's "
              f"last near box alone in its tile (lone_visits visits it alone): {built['lone_steps']:,} "
              f"({built['lone_steps'] / built['tiles']:.0%} of the visits)")  # fmt: skip
        for block_a, tile in tiles.items():
            print(f"{'':>11} in blocks of {block_a} anchors (gpu_sweep.py times them): {tile['near']:,} near "
                  f"(box, block) pairs unpruned ({tile['near'] / built['near_crossing']:.2f}x as built unpruned, "
                  f"{tile['near'] / tile['blocks']:.1f} per block), evaluating {tile['evaluated']:,} pairs "
                  f"(ratio {tile['evaluated'] / nonzero:.2f}; "
                  f"touching: ratio {tile['touching'] * block_a / nonzero:.2f})")  # fmt: skip
    walk = walk_shape(config)
    schedule = gather_schedule()
    print(f"the gather's programs on {SCHEDULE_SLOTS} resident (an H200), list-scheduled in start order "
          f"(k instructions per warp; costs {SCHEDULE_COSTS}):")  # fmt: skip
    for point in schedule:
        print(f"{'':>11} B = {point['batch']}, G = {point['boxes'] or '~7'}: grid order {point['grid_order']:.0f}, "
              f"heavy first {point['heavy_first']:.0f} ({point['heavy_first'] / point['grid_order']:.2f}x), "
              f"balanced {point['balanced']:.0f}, longest block {point['longest_block']:.1f}; an image's last "
              f"tenth of blocks lists {point['last_tenth_near']:.1f}x the near boxes of its first")  # fmt: skip
    write_json(out / "pairs.json", {"preset": PRESET, "canvas": list(COCO_CANVAS), "points": points, "walk": walk,
                                    "schedule": {"costs": SCHEDULE_COSTS, "slots": SCHEDULE_SLOTS,
                                                 "points": schedule}})  # fmt: skip
    matching, last = triton_backend._COMPILED.matching, points[-1]
    evaluated = last["gather_as_built"]["evaluated"] if matching == "gather" else last["evaluated"]
    print(f"target (DESIGN §9): at most 2x at G = 200; wrote {out / 'pairs.json'}; the compiled default: {matching}")
    if matching == "gather":
        lifted = last["gather_as_built"]["lift_near_bounded"] * triton_backend._COMPILED.block_a
        print(
            f"with the lift's pairs (the low-quality modes' second pass): {(evaluated + lifted) / last['nonzero']:.2f}"
        )
    print(f"evaluated/nonzero pairs: {evaluated / last['nonzero']:.2f}")


def walk_shape(config) -> list[dict]:
    """How the compiled pair walk cuts a B = 32 batch: its chunks of the compiled chunk size,
    the share inside one rectangle, and chunks per persistent program on an H200 (132 SMs)."""
    block_p, programs = triton_backend._COMPILED.block_p, triton_backend._COMPILED.pair_programs * H200_SMS
    rows = []
    for fixed in (None, 200):
        boxes, counts, classes = coco_like_batch(WALK_BATCH, seed=PAIRS_SEED, canvas=COCO_CANVAS, boxes_per_image=fixed)
        problem, _ = build_problem(boxes, counts, COCO_CANVAS, config, gt_classes=classes)
        walk = triton_backend.candidate_pairs(problem, block_p=block_p)
        row = {"workload": COCO_LABEL if fixed is None else f"G={fixed}", "batch": WALK_BATCH, "boxes": len(boxes),
               "block_p": block_p, "programs": programs, **walk,
               "chunks_per_program": round(walk["chunks"] / programs, 2),
               "uniform_share": round(walk["uniform_chunks"] / walk["chunks"], 3)}  # fmt: skip
        rows.append(row)
        per_sm = triton_backend._COMPILED.pair_programs
        print(f"walk, B = {WALK_BATCH}, {row['workload']:>11}: {walk['evaluated']:,} pairs in {walk['chunks']:,} "
              f"chunks of {block_p} ({row['uniform_share']:.0%} inside one rectangle), {row['chunks_per_program']} "
              f"per program of {programs:,} ({per_sm} per SM x {H200_SMS} SMs)")  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.pairs:
        pairs(out)
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke for a tiny interpreter run on the CPU)")
    env = environment(args.smoke)
    print(json.dumps(env))
    results = {"rows": [], "kernels": [], "skipped": []}
    try:
        run(args, env, out, results)
    except KeyboardInterrupt:  # gpu_check.sh's step timeout (SIGINT): the points measured are still written
        print("interrupted: tables and plots of the points measured so far")
        results["skipped"].append({"why": "interrupted (SIGINT) in the middle of a point"})
    except Exception as exc:  # noqa: BLE001 -- one GPU run is scarce: what it measured is still written
        traceback.print_exc()
        print(f"failed ({type(exc).__name__}): tables and plots of the points measured so far")
        results["skipped"].append({"why": f"failed: {type(exc).__name__}: {exc}"[:500]})
    # What was measured is written whatever comes now: a SIGINT that lands after the last
    # point (a step's timeout racing the end) cut the plots off with a traceback; a writer
    # that hangs still ends at the timeout's SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rows = results["rows"]
    write_tables(results, env, out)  # the ratios too
    print("\n".join(summary(rows, results["kernels"])))
    print("\n".join(kernel_table(results["kernels"], "CPU" if args.smoke else "GPU")))
    plot(rows, env, out)
    plot_vs_boxes(rows, env, out, *((2, 1) if args.smoke else (32, 8)))
    print(markdown_table(rows, env))
    print(f"wrote {args.out}/bench_gpu.csv, .json, .md, .png, _vs_g.png")


if __name__ == "__main__":
    main()
