"""RPN targets with balanced sampling on the CPU: the cpu backend against torchvision.

A data-loader worker (one torch thread) makes Faster R-CNN's RPN targets for COCO-like
images on the 800 x 1344 canvas (``fasterrcnn_rpn_torchvision``: 268,569 anchors; 256
sampled per image, at most half positive), one image per call:

* torchvision (the peer; the ``parity`` extra): ``box_iou``, ``Matcher(0.7, 0.3,
  allow_low_quality_matches=True)``, ``BalancedPositiveNegativeSampler(256, 0.5)`` and
  ``BoxCoder.encode_single`` of every anchor's matched box, as its RPN does;
* ``assign(..., backend="cpu")`` (dense targets, sampled) and ``assign_sparse``.

Median ms per image over runs, the median over images, and the ratio. Writes
``sampling.{csv,json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from bench_cpu import _median_and_best_ms, machine
from recording import pyplot, save_figure, write_csv, write_json, write_text
from torchvision_peer import load as load_torchvision

from tritarget.kernels import assign, assign_sparse, generate_anchors, presets
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

PRESET = "fasterrcnn_rpn_torchvision"
SEEDS = tuple(range(11))
RUNS = {"torchvision": 5, "ours": 21}


def torchvision_rpn_targets():
    """torchvision's RPN targets of one image, or None without torchvision."""
    if load_torchvision() is None:
        return None
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import box_iou

    matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
    sampler = det_utils.BalancedPositiveNegativeSampler(256, 0.5)
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def run(boxes: torch.Tensor, anchors: torch.Tensor) -> None:
        if boxes.numel() == 0:  # every anchor negative; its RPN still encodes every anchor (against zeros)
            labels = torch.zeros(anchors.shape[0])
            sampler([labels])
            coder.encode_single(torch.zeros_like(anchors), anchors)
            return
        matched = matcher(box_iou(boxes, anchors))
        labels = (matched >= 0).float()
        labels[matched == matcher.BETWEEN_THRESHOLDS] = -1.0
        sampler([labels])
        coder.encode_single(boxes[matched.clamp(min=0)], anchors)

    return run


def _row(seed: int, config, anchors: torch.Tensor, tv) -> dict:
    """One COCO-like image: median ms of each way, and the ratios."""
    boxes, counts, _ = coco_like_batch(1, seed=seed)
    calls = {
        "dense": lambda: assign(boxes, counts, COCO_CANVAS, config, backend="cpu", seed=seed),
        "sparse": lambda: assign_sparse(boxes, counts, COCO_CANVAS, config, backend="cpu", seed=seed),
    }
    row = {"seed": seed, "boxes": counts[0]}
    for name, call in calls.items():
        row[f"{name}_ms"] = round(_median_and_best_ms(call, RUNS["ours"])[0], 3)
    row["torchvision_ms"] = None
    if tv is not None:
        row["torchvision_ms"] = round(_median_and_best_ms(lambda: tv(boxes, anchors), RUNS["torchvision"])[0], 3)
    for name in ("dense", "sparse"):
        ratio = None if tv is None else row["torchvision_ms"] / row[f"{name}_ms"]
        row[f"{name}_vs_torchvision"] = None if ratio is None else round(ratio, 1)
    return row


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(8, 4))
    boxes = [r["boxes"] for r in rows]
    for key, label in (("torchvision_ms", "torchvision"), ("dense_ms", "assign (cpu)"),
                       ("sparse_ms", "assign_sparse (cpu)")):  # fmt: skip
        if rows[0].get(key) is not None:
            axis.plot(boxes, [r[key] for r in rows], "o", label=label)
    axis.set(yscale="log", xlabel="boxes in the image", ylabel="ms per image (median)",
             title=f"RPN targets with sampling ({PRESET}, 800x1344), one image per call, one thread")  # fmt: skip
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sampling")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as DataLoader sets its workers
    config = presets.get(PRESET)
    anchors = generate_anchors(config.anchors, COCO_CANVAS)
    tv = torchvision_rpn_targets()
    rows = []
    for seed in SEEDS:
        rows.append(_row(seed, config, anchors, tv))
        print(rows[-1], flush=True)

    info = {**machine(), "threads": 1}
    median = {key: statistics.median(r[key] for r in rows) for key in ("dense_ms", "sparse_ms")}
    if tv is not None:
        median["torchvision_ms"] = statistics.median(r["torchvision_ms"] for r in rows)
    write_csv(args.out / "sampling.csv", rows)
    write_json(args.out / "sampling.json", {"preset": PRESET, "machine": info, "rows": rows, "median": median})
    _plot(rows, args.out / "sampling.png")
    lines = [f"# RPN targets with sampling, one image per call, one thread ({PRESET}, 800x1344)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, torchvision "
             f"{info['torchvision']}. Medians over {RUNS['ours']} runs (torchvision {RUNS['torchvision']}).", "",
             "| seed | G | torchvision ms | assign (dense) ms | assign_sparse ms | dense / sparse vs torchvision |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        tv_ms = "–" if r["torchvision_ms"] is None else f"{r['torchvision_ms']:.2f}"
        ratios = (
            "–" if r["torchvision_ms"] is None else f"{r['dense_vs_torchvision']:g}x / {r['sparse_vs_torchvision']:g}x"
        )
        lines.append(
            f"| {r['seed']} | {r['boxes']} | {tv_ms} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {ratios} |"
        )
    summary = (
        f"Median over images: assign (dense) {median['dense_ms']:.2f} ms, assign_sparse {median['sparse_ms']:.2f} ms"
    )
    if tv is not None:
        tv_ms = median["torchvision_ms"]
        summary += (f", torchvision {tv_ms:.2f} ms: {tv_ms / median['dense_ms']:.0f}x / "
                    f"{tv_ms / median['sparse_ms']:.0f}x")  # fmt: skip
    lines += ["", summary + "."]
    write_text(args.out / "sampling.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
