"""The ``tritarget`` command.

``tritarget demo``: compute targets for a synthetic COCO-like batch in-process and
print a summary per image.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from tritarget.kernels import assign, generate_anchors, presets
    from tritarget.kernels.api import resolve_backend
    from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

    config = presets.get(args.preset)
    canvas = tuple(args.canvas) if args.canvas else COCO_CANVAS
    boxes, counts, classes = coco_like_batch(args.batch, seed=args.seed, canvas=canvas)
    device = torch.device("cuda" if args.backend in ("auto", "triton") and torch.cuda.is_available() else "cpu")
    backend = resolve_backend(args.backend, device)
    num_anchors = generate_anchors(config.anchors, canvas).shape[0]
    print(f"preset {args.preset}: {num_anchors:,} anchors on a {canvas[0]}x{canvas[1]} canvas")
    print(f"batch of {args.batch} COCO-like images, {sum(counts)} boxes; backend {backend} on {device}")
    boxes, classes = boxes.to(device), classes.to(device)
    assign(boxes, counts, canvas, config, gt_classes=classes, backend=backend)  # warm-up (caches, compile)
    start = time.perf_counter()
    targets = assign(boxes, counts, canvas, config, gt_classes=classes, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"{'image':>5} {'boxes':>5} {'positive':>9} {'negative':>9} {'ignored':>9}")
    for i, (count, row) in enumerate(zip(counts, targets.summary())):
        print(f"{i:>5} {count:>5} {row['positive']:>9,} {row['negative']:>9,} {row['ignored']:>9,}")
    print(f"assigned in {elapsed * 1000:.1f} ms ({elapsed * 1000 / args.batch:.1f} ms per image)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tritarget.kernels import BACKENDS, presets

    parser = argparse.ArgumentParser(prog="tritarget", description="Object-detection training targets.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compute targets for a synthetic COCO-like batch in-process")
    demo.add_argument("--preset", default="retinanet_torchvision", choices=presets.names())
    demo.add_argument("--backend", default="auto", choices=BACKENDS)
    demo.add_argument("--batch", type=int, default=4, help="images in the batch (default 4)")
    demo.add_argument("--canvas", type=int, nargs=2, metavar=("H", "W"), help="canvas size (default 800 1344)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
