"""GPU benchmark: the triton backend against torchvision and our reference, same run.

Workload "COCO-RetinaNet" (DESIGN §9): canvas 800 x 1344, torchvision RetinaNet
anchors (201,600), ``retinanet_torchvision`` preset, boxes from
``tritarget.kernels.workload`` -- COCO-like counts (mean ~7, "G=7" below) or a fixed
G = 200 / 1000 per image -- for batches B = 1, 8, 32. Methods:

* ``triton``: ``triton_backend.solve`` on a checked problem (pass 1 + pass 2, one
  launch each, allocation included): the kernel time;
* ``triton_sparse``: ``triton_backend.solve_sparse`` (the same plus the on-device
  compaction into positives/ignored, what the service sends);
* ``triton_assign``: ``assign(..., backend="triton")`` end to end (input checks too);
* ``torchvision``: what torchvision's RetinaNet does per image -- ``box_iou``,
  ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``, then
  ``BoxCoder((1, 1, 1, 1)).encode_single`` and the class gather on the foreground;
* ``reference``: our reference backend on the GPU.

Times are ``triton.testing.do_bench`` medians (with 20/80% quantiles); the floor is
the bytes the triton backend writes divided by the measured device-to-device copy
bandwidth (bytes read + written per second); peak memory is the largest extra
allocation during one call. Writes ``bench_gpu.csv``, ``bench_gpu.json``,
``bench_gpu.png`` and ``bench_gpu.md`` (a table for the README) under ``--out`` and
prints every peer/ours ratio.

``--smoke`` runs a tiny version on the CPU under Triton's interpreter (no torchvision
needed) to check the script itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from tritarget.kernels import assign, presets, reference  # noqa: E402
from tritarget.kernels.problem import build_problem  # noqa: E402
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch  # noqa: E402

PRESET = "retinanet_torchvision"
QUANTILES = [0.5, 0.2, 0.8]
# Design targets (DESIGN §9), printed next to the measurements.
TARGET_SPEEDUP_VS_TORCHVISION = 100.0
TARGET_FLOOR_RATIO = 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="output folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--boxes", nargs="+", default=["coco", "200", "1000"],
                        help="'coco' (COCO-like, mean ~7) or a fixed number of boxes per image")  # fmt: skip
    parser.add_argument("--methods", nargs="+",
                        default=["triton", "triton_sparse", "triton_assign", "torchvision", "reference"])  # fmt: skip
    parser.add_argument("--max-slow-seconds", type=float, default=1.5,
                        help="skip torchvision/reference points whose first call takes longer than this")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.boxes = [1, 2], ["coco", "20"]
    return args


# --- timing ------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """(median, 20%, 80%) milliseconds of fn."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=QUANTILES))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Largest allocation above the current one during a call (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth, bytes read + written per second (CUDA only)."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    median_ms = time_ms(lambda: dst.copy_(src), device)[0]
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
    return batch * num_anchors * (1 + 4 + 16 + 4)


def methods_for(problem, boxes, counts, classes, canvas, have_torchvision) -> dict[str, Callable[[], object]]:
    """The compared computations on one batch, by name."""
    from tritarget.kernels import triton_backend

    config = problem.config
    methods = {
        "triton": lambda: triton_backend.solve(problem),
        "triton_sparse": lambda: triton_backend.solve_sparse(problem),
        "triton_assign": lambda: assign(boxes, counts, canvas, config, gt_classes=classes, backend="triton"),
        "reference": lambda: reference.solve(problem),
    }
    if have_torchvision:
        methods["torchvision"] = lambda: torchvision_targets(boxes, counts, classes, problem.anchors)
    return methods


def run(args: argparse.Namespace, env: dict, out: Path) -> list[dict]:
    device = torch.device("cpu" if args.smoke else "cuda")
    canvas = (64, 96) if args.smoke else COCO_CANVAS
    config = presets.get(PRESET)
    try:
        import torchvision  # noqa: F401

        have_torchvision = True
    except ImportError:
        have_torchvision = False
        print("torchvision is not installed: its column is skipped")

    bandwidth = copy_bandwidth(device)
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = []
    for boxes_arg in args.boxes:
        fixed = None if boxes_arg == "coco" else int(boxes_arg)
        for batch in args.batches:
            boxes, counts, classes = coco_like_batch(batch, seed=batch, canvas=canvas, boxes_per_image=fixed)
            boxes, classes = boxes.to(device), classes.to(device)
            problem, _ = build_problem(boxes, counts, canvas, config, gt_classes=classes)
            methods = methods_for(problem, boxes, counts, classes, canvas, have_torchvision)
            label = "G~7 (COCO)" if fixed is None else f"G={fixed}"
            for name in args.methods:
                if name not in methods:
                    continue
                fn = methods[name]
                first = first_call_seconds(fn, device)  # also compiles the kernels
                if name in ("torchvision", "reference") and first > args.max_slow_seconds and not args.smoke:
                    median, low, high = first * 1e3, first * 1e3, first * 1e3
                    timing = "single call"
                else:
                    median, low, high = time_ms(fn, device)
                    timing = "do_bench" if device.type == "cuda" else "perf_counter"
                row = {
                    "workload": label, "boxes_per_image": fixed if fixed is not None else "coco",
                    "total_boxes": int(sum(counts)), "batch": batch, "anchors": problem.num_anchors,
                    "method": name, "median_ms": median, "p20_ms": low, "p80_ms": high, "timing": timing,
                    "peak_extra_bytes": peak_extra_bytes(fn, device),
                }  # fmt: skip
                if name == "triton" and bandwidth:
                    written = bytes_written(batch, problem.num_anchors)
                    row["bytes_written"] = written
                    row["floor_ms"] = written / bandwidth * 1e3
                    row["vs_floor"] = median / row["floor_ms"]
                rows.append(row)
                floor = f"  floor {row['floor_ms']:.3f} ms, x{row['vs_floor']:.2f}" if "floor_ms" in row else ""
                print(f"{label:>11} B={batch:<3} {name:>14}: {median:10.3f} ms (p20 {low:.3f}, p80 {high:.3f}){floor}")
            del problem, boxes, classes, methods
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_tables(rows, env, out)  # after every batch: a timeout still leaves results
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Peer time / triton time, per (workload, batch), on each peer's row."""
    ours = {(r["workload"], r["batch"]): r["median_ms"] for r in rows if r["method"] == "triton"}
    # Each peer row gets the ratio; the table reads it from there.
    for row in rows:
        key = (row["workload"], row["batch"])
        if row["method"] != "triton" and key in ours:
            row["speedup_of_triton"] = row["median_ms"] / ours[key]


def summary(rows: list[dict]) -> list[str]:
    lines = ["", "peer / ours (same run):"]
    for row in rows:
        if "speedup_of_triton" in row:
            mark = ""
            if row["method"] == "torchvision" and row["batch"] == 32:
                met = row["speedup_of_triton"] >= TARGET_SPEEDUP_VS_TORCHVISION
                mark = f"  [target >= {TARGET_SPEEDUP_VS_TORCHVISION:.0f}x: {'met' if met else 'NOT met'}]"
            lines.append(f"  {row['workload']:>11} B={row['batch']:<3} {row['method']:>14} {row['median_ms']:10.3f} ms"
                         f" / triton = {row['speedup_of_triton']:8.1f}x{mark}")  # fmt: skip
    for row in rows:
        if "vs_floor" in row:
            met = row["vs_floor"] <= TARGET_FLOOR_RATIO
            lines.append(f"  {row['workload']:>11} B={row['batch']:<3} triton vs floor: x{row['vs_floor']:.2f}"
                         f"  [target <= {TARGET_FLOOR_RATIO:.0f}x: {'met' if met else 'NOT met'}]")  # fmt: skip
    return lines


def markdown_table(rows: list[dict], env: dict) -> str:
    """One line per (workload, B): ours, the floor, the peers and the ratios."""
    by_point: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_point.setdefault((row["workload"], row["batch"]), {})[row["method"]] = row

    def ms(row: dict | None) -> str:
        return "-" if row is None else f"{row['median_ms']:.3f}"

    def ratio(row: dict | None) -> str:
        return "-" if row is None or "speedup_of_triton" not in row else f"{row['speedup_of_triton']:.3g}x"

    def mib(row: dict | None) -> str:
        return "-" if row is None or row.get("peak_extra_bytes") is None else f"{row['peak_extra_bytes'] / 2**20:.0f}"

    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, torchvision {env['torchvision']}; "
        f"{PRESET}, {env['canvas'][0]}x{env['canvas'][1]}; median ms per batch",
        "",
        "| boxes | B | triton | floor | x floor | sparse | torchvision | speedup | reference | speedup "
        "| peak MiB triton / torchvision |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workload, batch), methods in by_point.items():
        ours, tv, ref = methods.get("triton"), methods.get("torchvision"), methods.get("reference")
        floor = "-" if ours is None or "floor_ms" not in ours else f"{ours['floor_ms']:.3f}"
        times = "-" if ours is None or "vs_floor" not in ours else f"{ours['vs_floor']:.1f}"
        lines.append(f"| {workload} | {batch} | {ms(ours)} | {floor} | {times} | {ms(methods.get('triton_sparse'))} "
                     f"| {ms(tv)} | {ratio(tv)} | {ms(ref)} | {ratio(ref)} | {mib(ours)} / {mib(tv)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def environment(smoke: bool) -> dict:
    import triton

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "interpreted": smoke, "preset": PRESET, "canvas": list((64, 96) if smoke else COCO_CANVAS),
    }  # fmt: skip
    if torch.cuda.is_available() and not smoke:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    return info


def write_tables(rows: list[dict], env: dict, out: Path) -> None:
    """bench_gpu.csv (one row per point) and bench_gpu.json (environment + rows)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "bench_gpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", *columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({"device": env["device"], **row})
    with open(out / "bench_gpu.json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    (out / "bench_gpu.md").write_text(markdown_table(rows, env))


def plot(rows: list[dict], env: dict, out: Path) -> None:
    """bench_gpu.png: ms per batch against B, one panel per workload, with the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
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
    fig.savefig(out / "bench_gpu.png", dpi=120)


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke for a tiny interpreter run on the CPU)")
    env = environment(args.smoke)
    print(json.dumps(env))
    out = Path(args.out)
    rows = run(args, env, out)
    print("\n".join(summary(rows)))
    write_tables(rows, env, out)
    plot(rows, env, out)
    print(markdown_table(rows, env))
    print(f"wrote {args.out}/bench_gpu.csv, .json, .md, .png")


if __name__ == "__main__":
    main()
