"""What training targets cost a data-loader worker's CPU: computing them itself, or
asking ``tritarget serve``.

A data-loader worker (this process, one torch thread, as ``DataLoader`` sets its workers)
gets the targets of COCO-like images on the 800 x 1344 RetinaNet canvas, requests of 1
and of 8 images, in one of these ways:

* torchvision: ``box_iou`` + ``Matcher`` + ``BoxCoder.encode_single`` per image, as its
  RetinaNet does (the peer; the ``parity`` extra, skipped when absent);
* in-process ``assign`` (dense) and ``assign_sparse``, cpu backend;
* the service (a ``tritarget serve --backend cpu`` subprocess on this machine, default
  options): ``TargetClient.assign`` densified (dense ``Targets``), the same with
  ``densify=False`` (``SparseTargets``; densify on the trainer's GPU), and
  ``client.stream`` with ``densify=False``.

Reported per image: this process's CPU time (``time.process_time``: every thread of the
worker, gRPC's included; the server's CPU is not the worker's) and the wall time, the
median over alternating rounds, and how many times less CPU than torchvision's path each
way costs. Writes ``client_cpu.{csv,json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_cpu import torchvision_targets
from bench_service import start_server
from recording import machine_line, pyplot, save_figure, write_csv, write_json, write_text

from tritarget.clients import TargetClient
from tritarget.clients.loadtest import Workload
from tritarget.kernels import assign, assign_sparse, generate_anchors, presets
from tritarget.kernels.workload import COCO_CANVAS

PRESET = "retinanet_torchvision"
SIZES = (1, 8)
VARIANTS = 16  # distinct requests per size, cycled through


def _ways(client: TargetClient, batches: list[tuple], tv, anchors) -> dict[str, Callable[[], int]]:
    """name -> one pass over the batches (returns the images it did)."""
    config = presets.get(PRESET)
    images = sum(len(counts) for _, counts, _ in batches)

    def each(call) -> Callable[[], int]:
        def one_pass() -> int:
            for boxes, counts, classes in batches:
                call(boxes, counts, classes)
            return images

        return one_pass

    def stream() -> int:
        requests = [{"gt_boxes": b, "gt_counts": c, "gt_classes": k} for b, c, k in batches]
        for _ in client.stream(requests, preset=PRESET, canvas=COCO_CANVAS, densify=False):
            pass
        return images

    def per_image(boxes, counts, _classes):
        tv(list(boxes.split(counts)), anchors)

    ways = {} if tv is None else {"torchvision (in-process)": each(per_image)}
    ways.update({
        "assign, cpu backend (in-process)": each(
            lambda b, c, k: assign(b, c, COCO_CANVAS, config, gt_classes=k, backend="cpu")),
        "assign_sparse, cpu backend (in-process)": each(
            lambda b, c, k: assign_sparse(b, c, COCO_CANVAS, config, gt_classes=k, backend="cpu")),
        "service: client.assign (dense Targets)": each(
            lambda b, c, k: client.assign(b, c, COCO_CANVAS, preset=PRESET, gt_classes=k)),
        "service: client.assign(densify=False)": each(
            lambda b, c, k: client.assign(b, c, COCO_CANVAS, preset=PRESET, gt_classes=k, densify=False)),
        "service: client.stream(densify=False)": stream,
    })  # fmt: skip
    return ways


def _measure(one_pass: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(CPU ms, wall ms) per image over whole passes lasting about ``seconds``."""
    one_pass()  # warm: caches, the server's first batches of this size
    images, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        images += one_pass()
    return 1e3 * (time.process_time() - cpu) / images, 1e3 * (time.perf_counter() - wall) / images


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    ways = list(dict.fromkeys(r["way"] for r in rows))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(SIZES)
    for k, size in enumerate(SIZES):
        values = {r["way"]: r["cpu_ms_per_image"] for r in rows if r["images_per_request"] == size}
        positions = [i + k * width for i in range(len(ways))]
        axis.barh(positions, [values.get(w, 0) for w in ways], height=width, label=f"{size} image(s) per request")
    axis.set_yticks([i + width * (len(SIZES) - 1) / 2 for i in range(len(ways))], ways, fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("data-loader CPU ms per image (log scale)")
    axis.set_title(
        "Targets for COCO-like images, RetinaNet 800x1344: what the data-loader worker's CPU pays", fontsize=9
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per way, size and round (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/client_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as DataLoader sets its workers
    tv = torchvision_targets()
    anchors = generate_anchors(presets.get(PRESET).anchors, COCO_CANVAS)
    process, address, _ = start_server("cpu", 128, 0.0)
    measured: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        with TargetClient(address) as client:
            client.wait_until_ready(timeout=120)
            for size in SIZES:
                batches = [Workload(images=size).batch(i) for i in range(VARIANTS)]
                ways = _ways(client, batches, tv, anchors)
                for round_ in range(args.rounds):  # alternating: a shared machine's speed drifts
                    for name, one_pass in ways.items():
                        measured.setdefault((size, name), []).append(_measure(one_pass, args.seconds))
                        cpu_ms, wall_ms = measured[(size, name)][-1]
                        print(f"{size} image(s), round {round_ + 1}, {name}: {cpu_ms:.3f} CPU ms / image "
                              f"({wall_ms:.3f} wall)", flush=True)  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)

    rows = []
    for (size, name), values in measured.items():
        rows.append({"images_per_request": size, "way": name,
                     "cpu_ms_per_image": round(statistics.median(v[0] for v in values), 4),
                     "wall_ms_per_image": round(statistics.median(v[1] for v in values), 4),
                     "rounds": len(values)})  # fmt: skip
    for row in rows:
        peer = next((r for r in rows if r["images_per_request"] == row["images_per_request"]
                     and r["way"].startswith("torchvision")), None)  # fmt: skip
        row["less_cpu_than_torchvision"] = (
            None if peer is None else round(peer["cpu_ms_per_image"] / row["cpu_ms_per_image"], 1)
        )

    out = Path(args.out)
    write_csv(out / "client_cpu.csv", rows)
    machine = machine_line()
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    write_json(out / "client_cpu.json", {"machine": machine, "versions": versions, "rows": rows})
    _plot(rows, out / "client_cpu.png")
    lines = [f"# Data-loader CPU per image: computing targets or asking the service ({machine}; {versions})", "",
             f"One torch thread in the caller; server `tritarget serve --backend cpu` on the same machine; medians of "
             f"{args.rounds} alternating rounds of ~{args.seconds:g} s.", "",
             "| images / request | way | CPU ms / image | wall ms / image | x less CPU than torchvision |",
             "|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ratio = "–" if r["less_cpu_than_torchvision"] is None else f"{r['less_cpu_than_torchvision']:g}x"
        lines.append(f"| {r['images_per_request']} | {r['way']} | {r['cpu_ms_per_image']:.3f} | "
                     f"{r['wall_ms_per_image']:.3f} | {ratio} |")  # fmt: skip
    if tv is None:
        lines += ["", "torchvision is not installed here (the `parity` extra): no peer column."]
    write_text(out / "client_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
