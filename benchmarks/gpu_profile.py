"""The kernels of three COCO-RetinaNet batches, for Nsight Compute (``gpu_profile.sh``).

Builds B = 32 images with G ~ 7 (COCO-like) and with G = 200 boxes each, and B = 8 with
G = 1,000 (the points of DESIGN section 9's goals), solves each a few times to compile
and warm up, then once more inside an NVTX range named after the batch (``coco/``,
``g200/``, ``g1000/``): ``ncu --nvtx --nvtx-include`` profiles those launches only. The
range holds ``solve`` (the gather and the dense finalize) and, for the COCO-like batch
alone, ``solve_sparse`` (its gather again, the count and the sparse pass: the sparse
goal's point), so that ncu replays 9 kernels, not 15, within gpu_profile.sh's timeout.
Prints each batch's pair count, the work the hardware counters are read against: the
pairs the compiled matching's first pass evaluates (``bench_gpu.evaluated_pairs``: the
gather's blocks times their near boxes, or the pair walk's rectangles).

    python benchmarks/gpu_profile.py
"""

from __future__ import annotations

import torch
from bench_gpu import evaluated_pairs

from tritarget.kernels import presets, triton_backend
from tritarget.kernels.problem import build_problem
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

# NVTX range -> B, G (None: COCO-like), and whether solve_sparse is profiled too.
BATCHES = {"coco": (32, None, True), "g200": (32, 200, False), "g1000": (8, 1000, False)}


def main() -> None:
    config = presets.get("retinanet_torchvision")
    for name, (batch, boxes, sparse) in BATCHES.items():
        gt, counts, classes = coco_like_batch(batch, seed=batch, boxes_per_image=boxes)
        problem, _ = build_problem(gt.cuda(), counts, COCO_CANVAS, config, gt_classes=classes.cuda())
        for _ in range(3):  # compiled, and the sparse lists sized as in steady use
            triton_backend.solve(problem)
            triton_backend.solve_sparse(problem)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(name)
        triton_backend.solve(problem)
        if sparse:
            triton_backend.solve_sparse(problem)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        matching, pairs = evaluated_pairs(problem, gt, counts)
        print(f"{name}: B = {batch}, {sum(counts)} boxes, {pairs:,} box-anchor pairs evaluated by the {matching}'s "
              "first pass", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
