"""Which server settings serve the most: one load shape against several ``tritarget serve``
configurations, one after another, on this machine.

For each configuration (``--configs``, each a string of ``serve`` flags) a fresh server
(``--backend``) gets closed-loop load from ``tritarget loadtest``: ``--streams`` streams
with 2 requests in flight each, spread over ``--processes`` client processes, 8 COCO-like
images per SPARSE request, ``--duration`` seconds after a warm-up, 10 responses verified.
The default configurations are the GPU questions of the issue "The service at GPU scale"
(compute workers, batch size, queue delay, front-end processes); on a CPU they answer the
same questions for it.

    python benchmarks/service_sweep.py --backend triton --out "$OUT"

Writes ``service_sweep.md`` and ``.json`` under ``--out``; exit 1 on any error or
difference.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bench_loadtest import _serve
from recording import machine_line, write_json, write_text

from tritarget.clients.loadtest import LoadTestOptions, Workload, run

CONFIGS = [
    "--compute-workers 1",
    "--compute-workers 2",
    "--compute-workers 3",
    "--compute-workers 2 --max-batch-images 128",
    "--compute-workers 2 --max-queue-delay-ms 2",
    "--compute-workers 2 --workers 2 --port 50071",
]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="serve flags, one string per configuration")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/service")
    args = parser.parse_args()
    rows = []
    for flags in args.configs:
        process, address = _serve(args.backend, flags.split())
        try:
            report = run(LoadTestOptions(
                targets=(address,), workload=Workload(), duration_s=args.duration, warmup_s=args.warmup,
                concurrency=max(args.streams, args.processes), processes=args.processes, stream=True, window=2,
                verify=10,
            ))  # fmt: skip
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        summary = report.summary()
        latency = {"p50_ms": None, "p99_ms": None}  # None where the configuration answered nothing
        latency.update({f"{k}_ms": round(v, 2) for k, v in summary["latency_ms"].items()})
        rows.append({"serve": flags, "images_per_s": round(summary["images_per_s"], 1), **latency,
                     "errors": sum(report.errors.values()), "verified": report.verified,
                     "mismatches": len(report.mismatches)})  # fmt: skip
        print(f"{flags}: {rows[-1]['images_per_s']:.0f} images/s, p99 {_ms(rows[-1]['p99_ms'])} ms", flush=True)
    machine = machine_line()
    lines = [f"# Service settings sweep ({args.backend} backend; {machine})", "",
             f"{args.streams} streams x 2 in flight from {args.processes} client processes, 8 COCO-like images per "
             f"SPARSE request, {args.duration:g} s each after {args.warmup:g} s of warm-up.", "",
             "| serve flags | images/s | p50 ms | p99 ms | errors | verified |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        lines.append(f"| `{row['serve']}` | {row['images_per_s']:.0f} | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | "
                     f"{row['errors']} | {row['verified']} |")  # fmt: skip
    out = Path(args.out)
    write_text(out / "service_sweep.md", "\n".join(lines) + "\n")
    write_json(out / "service_sweep.json", {"machine": machine, "backend": args.backend, "rows": rows})
    print("\n".join(lines))
    return 0 if all(row["errors"] == 0 and row["mismatches"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
