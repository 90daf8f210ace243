"""The cpu backend on crowded images, one image per call and one thread, beside torchvision.

Dense-object datasets (retail shelves, crowds, aerial views) have hundreds to thousands of
small boxes per image. Cases: torchvision's RetinaNet preset (low-quality matches on),
boxes of log-uniform sizes and aspect ratios 1:2 to 2:1 spread over the canvas:

* G = 1,000 and 10,000 boxes of 6-48 pixels on the COCO canvas (800 x 1344, 201,600 anchors);
* G = 100,000 boxes of 5-15 pixels on an 8192 x 8192 canvas (12.6 M anchors): the
  service's ``--max-request-boxes`` default in one image;
* 100 boxes of 5-15 pixels and 100,000 crowd (ignore) regions of 16-128 pixels on that
  canvas, with mmdet's rule (an anchor whose IoF with a region is over 0.5 is ignored);
  torchvision's RetinaNet has no crowd regions, so no peer there.

Timed: ``assign_sparse`` and ``assign`` (dense) with ``backend="cpu"``, end to end, and
torchvision's per-image targets (``box_iou`` + ``Matcher(0.5, 0.4, allow_low_quality_matches
=True)`` + ``BoxCoder.encode_single``) where its [G, A] IoU matrix takes at most
TORCHVISION_MAX_MATRIX_GIB (beyond, the table gives the matrix's size). Median of up to
MAX_RUNS runs after a warm-up (fewer where one takes long). Writes
``benchmarks/results/cpu_crowded.{csv,json,md,png}``.

``--previous FILE`` adds the sparse and dense times of an earlier run's JSON (the same cases)
beside this run's, with the ratio: run this script once with an older checkout of the
package first on ``PYTHONPATH`` (``--out`` elsewhere), then with this one.

    python benchmarks/bench_crowded.py
    python benchmarks/bench_crowded.py --previous /tmp/before/cpu_crowded.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_cpu import machine, torchvision_targets
from recording import pyplot, save_figure, write_csv, write_json, write_text

from tritarget.kernels import assign, assign_sparse, generate_anchors, presets
from tritarget.kernels.workload import COCO_CANVAS

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "retinanet_torchvision"
# (name, boxes, crowd regions, canvas (height, width), box sizes and region sizes in pixels (least, greatest))
CASES = (
    ("G=1,000 on 800x1344", 1_000, 0, COCO_CANVAS, (6.0, 48.0), None),
    ("G=10,000 on 800x1344", 10_000, 0, COCO_CANVAS, (6.0, 48.0), None),
    ("G=100,000 on 8192x8192", 100_000, 0, (8192, 8192), (5.0, 15.0), None),
    ("G=100, 100,000 crowd regions on 8192x8192", 100, 100_000, (8192, 8192), (5.0, 15.0), (16.0, 128.0)),
)
CROWD_IOF = 0.5  # mmdet's ignore_iof_thr where crowd regions are used
TORCHVISION_MAX_MATRIX_GIB = 2.0
TIME_BUDGET_S, MAX_RUNS = 20.0, 7


def crowded_image(count: int, canvas: tuple[int, int], sizes: tuple[float, float], seed: int = 0) -> torch.Tensor:
    """[count, 4] boxes: geometric-mean sizes log-uniform in ``sizes``, aspect ratios
    log-uniform in [1/2, 2], centres uniform over the canvas (boxes clipped to it)."""
    generator = torch.Generator().manual_seed(seed)
    least, greatest = sizes
    size = least * (greatest / least) ** torch.rand(count, generator=generator)
    ratio = 2.0 ** (2 * torch.rand(count, generator=generator) - 1)
    w, h = size * ratio.sqrt(), size / ratio.sqrt()
    height, width = canvas
    cx, cy = torch.rand(count, generator=generator) * width, torch.rand(count, generator=generator) * height
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    return boxes.clamp(min=torch.zeros(4), max=torch.tensor([width, height, width, height], dtype=torch.float32))


def median_ms(call: Callable[[], object]) -> tuple[float, int]:
    """(median ms, runs) after a warm-up call, which also sizes the runs."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    runs = max(1, min(MAX_RUNS, int(TIME_BUDGET_S / max(first, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, runs


def run_case(
    name: str,
    count: int,
    regions: int,
    canvas: tuple[int, int],
    sizes: tuple[float, float],
    region_sizes: tuple[float, float] | None,
    tv,
) -> dict[str, object]:
    config = presets.get(PRESET)
    boxes = crowded_image(count, canvas, sizes)
    crowd = {}
    if regions:
        config = config.replace(**{"match.ignore_iof_thr": CROWD_IOF})
        crowd = {"ignore_boxes": crowded_image(regions, canvas, region_sizes, seed=1), "ignore_counts": [regions]}
    anchors = generate_anchors(config.anchors, canvas)
    row: dict[str, object] = {"case": name, "boxes": count, "crowd_regions": regions,
                              "canvas": f"{canvas[0]}x{canvas[1]}", "anchors": anchors.shape[0]}  # fmt: skip
    sparse = assign_sparse(boxes, [count], canvas, config, backend="cpu", **crowd)
    row["positives"], row["ignored"] = sparse.positive_anchors.numel(), sparse.ignored_anchors.numel()
    row["sparse_ms"], row["sparse_runs"] = median_ms(
        lambda: assign_sparse(boxes, [count], canvas, config, backend="cpu", **crowd)
    )
    row["dense_ms"], row["dense_runs"] = median_ms(
        lambda: assign(boxes, [count], canvas, config, backend="cpu", **crowd)
    )
    matrix_gib = count * anchors.shape[0] * 4 / 2**30
    row["torchvision_matrix_gib"] = round(matrix_gib, 2)
    row["torchvision_ms"] = row["torchvision_runs"] = None
    if tv is not None and not regions and matrix_gib <= TORCHVISION_MAX_MATRIX_GIB:
        row["torchvision_ms"], row["torchvision_runs"] = median_ms(lambda: tv([boxes], anchors))
    for form in ("sparse", "dense"):
        row[f"{form}_vs_torchvision"] = (
            round(row["torchvision_ms"] / row[f"{form}_ms"], 1) if row["torchvision_ms"] else None
        )
    print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_ms") and v), flush=True)
    return row


def add_previous(rows: list[dict[str, object]], previous: dict[str, object]) -> str:
    """Each row's times from an earlier run of the same case, and how many times faster this
    run is; returns what the earlier run was (its commit, when it recorded one)."""
    earlier = {row["case"]: row for row in previous["rows"]}
    for row in rows:
        before = earlier.get(row["case"], {})
        for form in ("sparse", "dense"):
            then = before.get(f"{form}_ms")
            row[f"previous_{form}_ms"] = then
            row[f"{form}_vs_previous"] = round(then / row[f"{form}_ms"], 1) if then else None
    recorded = previous.get("recorded", {})
    return f"commit {recorded.get('commit')} ({recorded.get('utc')} UTC)"


def markdown(rows: list[dict[str, object]], info: dict[str, object], previous: str | None) -> str:
    fmt = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
    lines = [
        "# The cpu backend on crowded images: one image per call, one thread",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, 1 torch thread; torch {info['torch']}, torchvision "
        f"{info['torchvision']}. Preset `{PRESET}` (low-quality matches on); boxes of log-uniform sizes and "
        "aspect ratios spread over the canvas (`bench_crowded.crowded_image`). Median ms per image; torchvision "
        f"only where its [G, A] IoU matrix takes at most {TORCHVISION_MAX_MATRIX_GIB:g} GiB.",
        "",
        "| case | anchors | positives | ignored | torchvision ms | assign_sparse ms | assign (dense) ms | "
        "sparse / dense vs torchvision |"
        + (" previous sparse / dense ms | sparse / dense vs previous |" if previous else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if previous else ""),
    ]
    for r in rows:
        tv = fmt(r["torchvision_ms"])
        if not r["torchvision_ms"]:
            tv = (
                "not installed"
                if info["torchvision"] is None
                else f"not run: a {r['torchvision_matrix_gib']:,} GiB matrix"
            )
            if r["crowd_regions"]:
                tv = "no crowd regions"
        ratios = (
            "-"
            if not r["torchvision_ms"]
            else f"{r['sparse_vs_torchvision']:,.0f}x / {r['dense_vs_torchvision']:,.0f}x"
        )
        line = (f"| {r['case']} | {r['anchors']:,} | {r['positives']:,} | {r['ignored']:,} | {tv} | "
                f"{fmt(r['sparse_ms'])} | {fmt(r['dense_ms'])} | {ratios} |")  # fmt: skip
        if previous:
            gains = " / ".join(
                "-" if r[f"{f}_vs_previous"] is None else f"{r[f'{f}_vs_previous']}x" for f in ("sparse", "dense")
            )
            line += f" {fmt(r['previous_sparse_ms'])} / {fmt(r['previous_dense_ms'])} | {gains} |"
        lines.append(line)
    if previous:
        lines += ["", f"Previous: {previous}, the same script and cases."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], info: dict[str, object], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [("torchvision_ms", "torchvision"), ("previous_sparse_ms", "assign_sparse, previous"),
              ("dense_ms", "assign (dense)"), ("sparse_ms", "assign_sparse")]  # fmt: skip
    series = [(key, label) for key, label in series if any(r.get(key) for r in rows)]
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, r in enumerate(rows) if r.get(key)]
        ax.bar(xs, [r[key] for r in rows if r.get(key)], width, label=label)
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows])
    ax.set(yscale="log", ylabel="ms per image (median)", title=f"Crowded images, {PRESET}, one thread")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{info['cpu']}, torch {info['torch']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--previous", type=Path, help="an earlier run's cpu_crowded.json, shown beside this one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = {**machine(), "threads": 1}
    print(f"machine: {info}")
    tv = torchvision_targets()
    rows = [run_case(*case, tv) for case in CASES]
    previous = add_previous(rows, json.loads(args.previous.read_text())) if args.previous else None
    text = markdown(rows, info, previous)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "cpu_crowded.csv", rows)
    write_json(args.out / "cpu_crowded.json", {"workload": f"{PRESET}, crowded images", "machine": info, "rows": rows,
                                               "previous": previous})  # fmt: skip
    write_text(args.out / "cpu_crowded.md", text)
    plotted = plot(rows, info, args.out / "cpu_crowded.png")
    print(f"wrote {args.out}/cpu_crowded.csv, .json, .md" + (", .png" if plotted else ""))


if __name__ == "__main__":
    main()
