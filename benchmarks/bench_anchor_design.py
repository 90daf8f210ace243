"""Scan speed of ``tritarget anchors check`` over many COCO-like images.

Writes a synthetic COCO-format file (``tritarget.clients.anchor_design.synthetic.coco_like``:
480 x 640 images, ~7 boxes each, 1% crowd), loads it as a torchvision RetinaNet sees it
(shortest side 800, longest <= 1333, canvas 800 x 1088) and times ``check`` with the
``retinanet_torchvision`` preset: both matcher runs (with and without the low-quality
rule, ``assign_sparse``), the best-anchor IoU and the counting. Results go to
``benchmarks/results/anchor_design/scan.{json,md}``.

    python benchmarks/bench_anchor_design.py --images 10000 [--backend cpu] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from recording import cpu_model, write_json, write_text

from tritarget.clients.anchor_design import Resize, check, format_check_table, load_coco, synthetic
from tritarget.kernels import presets

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "anchor_design")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--preset", default="retinanet_torchvision")
    parser.add_argument("--out", default=RESULTS, help="folder for scan.json and scan.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "coco_like.json")
        with open(path, "w") as f:
            json.dump(synthetic.coco_like(args.images, seed=0), f)
        start = time.perf_counter()
        dataset = load_coco(path, Resize(min_size=800, max_size=1333))
        load_s = time.perf_counter() - start
    config = presets.get(args.preset)
    check(dataset.subset(torch.arange(min(64, dataset.num_images))), config, backend=args.backend)  # warm caches
    result = check(dataset, config, backend=args.backend)
    per_image_ms = 1000 * result.seconds / dataset.num_images
    summary = result.summary()
    record = {
        "images": dataset.num_images,
        "boxes": dataset.num_boxes,
        "canvas": dataset.canvases[0].tolist(),
        "anchors_per_image": summary["anchors_per_image"],
        "preset": args.preset,
        "backend": args.backend,
        "threads": args.threads,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "load_s": load_s,
        "check_s": result.seconds,
        "images_per_s": dataset.num_images / result.seconds,
        "ms_per_image": per_image_ms,
        "extrapolated_100k_s": per_image_ms * 100,  # 100,000 images x ms / 1000
        "bpr": summary["bpr"],
        "bpr_low_quality": summary["bpr_low_quality"],
    }
    write_json(os.path.join(args.out, "scan.json"), record)
    lines = [
        f"# check scan speed ({args.preset}, backend {args.backend}, {args.threads} threads)",
        "",
        f"{record['images']:,} COCO-like images, {record['boxes']:,} boxes, canvas "
        f"{record['canvas'][0]}x{record['canvas'][1]} ({record['anchors_per_image']:,.0f} anchors per image); "
        f"torch {record['torch']}, {record['machine']}",
        "",
        "| load JSON s | check s | images/s | ms per image | 100,000 images (extrapolated) |",
        "|---:|---:|---:|---:|---:|",
        f"| {load_s:.1f} | {result.seconds:.1f} | {record['images_per_s']:,.0f} | {per_image_ms:.2f} | "
        f"{record['extrapolated_100k_s']:.0f} s |",
        "",
        "```",
        format_check_table([result]),
        "```",
    ]
    write_text(os.path.join(args.out, "scan.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
