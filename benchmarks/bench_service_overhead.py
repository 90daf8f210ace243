"""Server time per request outside compute, from the server's own metrics.

``tritarget serve`` (subprocesses, ``--backend``, metrics on) gets SPARSE COCO-like
requests of 1, 8 and 32 images from ``tritarget loadtest`` at concurrency 1, so that
every batch is one request. Per request, from ``/metrics``:

    outside compute = tritarget_request_seconds (arrival at the servicer -> response ready)
                      - tritarget_compute_seconds (the batched assign call)

which is decoding, batching hand-offs, encoding and serializing the response (on the
compute worker since 2026-12-05; gRPC serialized it after the handler before) and
bookkeeping (gRPC's own transport and the request's deserialization are outside both). The share of requests computed
on the event loop (no hand-off: ``--inline-max-images``, 8 by default, so that the
default server computes no 32-image request there) is listed beside them. A straight line through the
per-request figures gives the fixed and the per-image part, the issue's
"<= 150 us + 10 us per image". With the default bound the 32-image requests alone take
the hand-over to a worker and back, whose cost that line reads as per image; two more
servers (``--inline-max-images 32`` and ``0``) put every size on one path, the loop or a
worker, so that each of their lines splits its own path's cost in two. The sizes are
measured in ``--rounds`` rounds, interleaved (each server's 1, 8, 32, then the next
server's, then the next round) and each size's
row is its median round (the lower of the middle two of an even number): a shared VM's
neighbours come and go within minutes (single passes on 2026-12-04 fitted anywhere from
133 us + 7 us to 194 us + 17 us per image). Every round's figure is listed beside it.
Writes ``service_overhead.json`` and ``.md`` under ``--out``.

A calibration line reads the figures: the server's own decoding of a 1-image request,
timed back to back (code and data hot in the core's caches) and after the thread slept
1 ms, as each request's code runs in a server (it waits for the network and the compute
worker between requests). Their ratio is what this machine charges code that runs once
per request instead of in a loop.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from recording import machine_line, write_json, write_text
from serving import start_server

from tritarget.clients.loadtest import LoadTestOptions, Workload, run
from tritarget.service.codec import Limits, decode_assign

SIZES = (1, 8, 32)


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = re.compile(r"(tritarget_(?:(?:request|compute|encode|queue)_seconds_(?:sum|count)|inline_batches_total))"
                         r'(\{method="Assign"\})? (\S+)')  # fmt: skip
    values = {}
    for line in text.splitlines():
        if match := pattern.match(line):
            values[match.group(1)] = float(match.group(3))
    return values


def _decode_us(pause_s: float, runs: int = 500) -> float:
    """Median microseconds to decode a 1-image request, each after ``pause_s`` asleep."""
    request, limits, times = Workload(images=1).request(0), Limits(), []
    for _ in range(runs):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        decode_assign(request, limits)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


# Each server: its name, and the flags that put its requests on a path (the last two only
# where requests can be computed on the loop: the cpu backend).
SERVERS = (
    ("default", ()),
    ("all on the loop", ("--inline-max-images", str(max(SIZES)))),
    ("all on a worker", ("--inline-max-images", "0")),
)


def _round(address: str, metrics_url: str, images: int, duration: float) -> dict:
    """One round of ``images``-image requests at one server: per request, from its metrics."""
    workload = Workload(images=images)
    run(LoadTestOptions(targets=(address,), workload=workload, duration_s=1.0, warmup_s=0.0, concurrency=1))  # warm-up
    before = _metrics(metrics_url)
    report = run(LoadTestOptions(targets=(address,), workload=workload, duration_s=duration, warmup_s=0.0,
                                 concurrency=1))  # fmt: skip
    after = _metrics(metrics_url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    requests = delta["tritarget_request_seconds_count"]
    assert delta["tritarget_compute_seconds_count"] == requests, "batches merged requests"
    request_us = 1e6 * delta["tritarget_request_seconds_sum"] / requests
    compute_us = 1e6 * delta["tritarget_compute_seconds_sum"] / requests
    return {
        "images": images, "requests": int(requests), "request_us": request_us, "compute_us": compute_us,
        "encode_us": 1e6 * delta["tritarget_encode_seconds_sum"] / requests,
        "queue_us": 1e6 * delta["tritarget_queue_seconds_sum"] / requests,
        "outside_compute_us": request_us - compute_us,
        # computed on the event loop, without the hand-over to a worker (``--inline-max-images``)
        "inline_share": delta["tritarget_inline_batches_total"] / requests,
        "client_latency_us": 1000 * report.percentiles_ms()["mean"],
    }  # fmt: skip


def _medians(rounds: list[dict]) -> list[dict]:
    """Each size's median round, with every round's figure beside it."""
    rows = []
    for images in SIZES:
        measured = [r for r in rounds if r["images"] == images]
        median = sorted(measured, key=lambda r: r["outside_compute_us"])[(len(measured) - 1) // 2]
        rows.append({**median, "rounds_outside_compute_us": [r["outside_compute_us"] for r in measured]})
    return rows


def _fit(rows: list[dict]) -> tuple[float, float]:
    """Least squares: outside compute = fixed + per_image * images."""
    n = len(rows)
    mean_x = sum(r["images"] for r in rows) / n
    mean_y = sum(r["outside_compute_us"] for r in rows) / n
    slope = sum((r["images"] - mean_x) * (r["outside_compute_us"] - mean_y) for r in rows) / sum(
        (r["images"] - mean_x) ** 2 for r in rows
    )
    return mean_y - slope * mean_x, slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/service")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration <= 0:
        parser.error(f"--rounds must be at least 1 and --duration positive, got {args.rounds} and {args.duration}")
    kinds = SERVERS if args.backend == "cpu" else SERVERS[:1]
    # All servers up at once (an idle one costs nothing), their rounds interleaved with the sizes'.
    servers, rounds = [], [[] for _ in kinds]
    try:
        for _, flags in kinds:
            servers.append(start_server("--backend", args.backend, "--no-access-log", *flags, metrics=True))
        for _ in range(args.rounds):
            for (name, _), (_, address, metrics_url), measured in zip(kinds, servers, rounds):
                for images in SIZES:
                    measured.append(_round(address, metrics_url, images, args.duration))
                    print(f"{name}, {images:>2} images: outside compute {measured[-1]['outside_compute_us']:.0f} us "
                          "per request", flush=True)  # fmt: skip
    finally:
        for process, _, _ in servers:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    series = []
    for (name, flags), measured in zip(kinds, rounds):
        rows = _medians(measured)
        fixed, slope = _fit(rows)
        series.append({"server": name, "flags": list(flags), "rows": rows, "fixed_us": fixed, "per_image_us": slope})
    hot_us, after_sleep_us = _decode_us(0.0), _decode_us(0.001)
    machine = machine_line()
    result = {"machine": machine, "backend": args.backend, "series": series, "goal": "<= 150 us + 10 us per image",
              "decode_1_image_us": {"back_to_back": hot_us, "after_1ms_sleep": after_sleep_us}}  # fmt: skip
    out = Path(args.out)
    write_json(out / "service_overhead.json", result)
    lines = [f"# Server time per request outside compute ({args.backend} backend; {machine})", "",
             f"Each size's median round of {args.rounds}, {args.duration:g} s each, interleaved "
             "(sizes and servers).", ""]  # fmt: skip
    for entry in series:
        lines += [f"## {entry['server']} ({' '.join(entry['flags']) or 'no flags'})", "",
                  "| images / request | requests | on the event loop | request µs | compute µs | encode µs | queue µs "
                  "| outside compute µs | every round µs |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in entry["rows"]:
            every = ", ".join(f"{us:.0f}" for us in r["rounds_outside_compute_us"])
            lines.append(f"| {r['images']} | {r['requests']} | {100 * r['inline_share']:.0f}% | {r['request_us']:.0f} "
                         f"| {r['compute_us']:.0f} | {r['encode_us']:.0f} | {r['queue_us']:.0f} | "
                         f"{r['outside_compute_us']:.0f} | {every} |")  # fmt: skip
        lines += ["", f"fit: {entry['fixed_us']:.0f} µs + {entry['per_image_us']:.1f} µs per image "
                  "(goal: <= 150 µs + 10 µs per image)", ""]  # fmt: skip
    lines.append(
        f"calibration: decoding a 1-image request takes {hot_us:.0f} µs back to back and "
        f"{after_sleep_us:.0f} µs after 1 ms asleep ({after_sleep_us / hot_us:.1f}x) on this machine"
    )
    write_text(out / "service_overhead.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
