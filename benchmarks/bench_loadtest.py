"""The README's "Load testing" table: ``tritarget loadtest`` against ``tritarget serve``
(``--backend``, cpu by default, default options, a subprocess) on this machine.

Runs, each ``--duration`` seconds after a warm-up, 8 COCO-like images per SPARSE request
on the 800 x 1344 RetinaNet canvas: closed loop at concurrency 1, 4 and 16 (unary), 4
streams with 2 requests in flight each, then open loop at 80% of the best closed-loop
unary rate (latency without coordinated omission; skipped when no unary request was
answered), and at each ``--open-rate`` given (requests/s: the issue "The service at GPU
scale" asks for the p99 at 80% of its 25,000 images/s goal, 2,500 8-image requests/s).
Every run verifies 20 responses.
Before the server starts, the same requests' ``assign_sparse`` in this process, one
after another (the same backend), gives the baseline each run's images/s is divided by
("x in-process"; ``bench_service.in_process``): the fastest of four measurements, ``--duration / 2`` seconds each, with
the machine's torch threads and with one thread (on a small machine one thread can be
faster, as ``bench_service.py`` says), before the server starts and after it stops (a
shared machine's speed drifts while the runs go on).
``--processes N`` drives the load from N client processes (one Python client tops out
at a few thousand requests per second: a GPU server needs several; every run has at
least N callers), ``--scale K`` multiplies every run's callers.
Each run also reports the CPU it cost per request (Linux): the server process's (its
threads included) and this process's with its client processes', and how busy that kept
the machine's cores: on a machine that client and server share, the service's images/s is
the cores divided by that cost once they are busy.
Writes ``loadtest.json`` (every report), ``loadtest.csv`` (one row per run) and
``loadtest.png`` (the last run, the open-loop one, over time) under ``--out``; also when a
run fails: the runs before it are kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_service import in_process
from recording import machine_line, write_csv, write_json
from serving import start_server

from tritarget.clients.loadtest import LoadTestOptions, Workload, run
from tritarget.kernels import assign_sparse

# (stream?, callers); streams keep 2 requests in flight each.
RUNS = [(False, 1), (False, 4), (False, 16), (True, 4)]
# Report.percentiles_ms() keys: a run without an answered request has none (None in its row).
LATENCIES = ("p50", "p90", "p99", "p99.9", "max", "mean")
CSV_FIELDS = ("run", "requests", "errors", "requests_per_s", "images_per_s", "vs_in_process",
              *(f"{k}_ms" for k in LATENCIES), "verified", "mismatches", "server_cpu_ms", "client_cpu_ms",
              "cores_busy")  # fmt: skip


def _run_name(stream: bool, callers: int) -> str:
    if stream:
        return f"stream, closed loop, {callers} streams x 2"
    return f"unary, closed loop, {callers} caller{'s' if callers > 1 else ''}"


def _serve(backend: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process, address, _ = start_server("--backend", backend, *extra)
    return process, address


def _stat(pid: int | str) -> list[str] | None:
    """``/proc/PID/stat``'s fields after the command name (field 3 on), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _server_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the server has used: process ``pid``, its threads
    included (those that ended too), and its child processes (``serve --workers N`` forks
    its front ends); None where there is no Linux ``/proc``."""
    fields = _stat(pid)
    if fields is None:
        return None
    seconds = int(fields[11]) + int(fields[12])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (child := _stat(entry)) is not None and child[1] == str(pid):
            seconds += int(child[11]) + int(child[12])
    return seconds / os.sysconf("SC_CLK_TCK")


def _in_process_images_per_s(workload: Workload, backend: str, seconds: float) -> tuple[float, float]:
    """``assign_sparse`` of the workload's requests, one after another, in this process,
    for about ``seconds`` (``bench_service.in_process``, the requests cycled through):
    images/s, and CPU ms per request (its 3 warm-up calls included)."""
    items = [{"gt_boxes": boxes, "gt_counts": counts, "gt_classes": classes}
             for boxes, counts, classes in map(workload.batch, range(workload.variants))]  # fmt: skip
    one_pass = workload.images * len(items) / in_process(items, backend, assign_sparse)
    repeated = items * max(1, round(seconds / one_pass))
    cpu = time.process_time()
    rate = in_process(repeated, backend, assign_sparse)
    return rate, 1e3 * (time.process_time() - cpu) / (len(repeated) + 3)


def _in_process(rates: dict[str, float], cpu_ms: dict[str, float], when: str, args: argparse.Namespace) -> None:
    """Add the in-process rates (and CPU ms per request) with the machine's threads and
    with one, labelled ``when``."""
    threads = torch.get_num_threads()
    for count in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(count)
        label = f"{when} the runs, {count} thread(s)"
        rates[label], cpu_ms[label] = _in_process_images_per_s(Workload(), args.backend, args.duration / 2)
        print(f"in-process assign_sparse, the same requests one after another, {label}: {rates[label]:.0f} images/s, "
              f"{cpu_ms[label]:.2f} CPU ms per request", flush=True)  # fmt: skip
    torch.set_num_threads(threads)


def _timed_run(options: LoadTestOptions, server_pid: int):
    """``run(options)``, and its CPU ms per request (server, clients) and how busy the
    machine's cores were while the load ran (warm-up included: its requests are counted
    too). The clients' CPU is what their load cost (``Report.client_cpu_s``): a client
    process's start-up, seconds of imports, is not a cost per request (until 2026-11-30 it
    was counted, which put 4-18 ms per request on the H200 machine's clients)."""
    server = _server_cpu_seconds(server_pid)
    report = run(options)
    server = None if server is None else _server_cpu_seconds(server_pid) - server  # idle while clients start
    requests = max(1, report.requests + report.warmup_requests)
    busy = None if server is None else (server + report.client_cpu_s) / (report.window_s * os.cpu_count())
    cpu = {"server_cpu_ms": None if server is None else round(1e3 * server / requests, 2),
           "client_cpu_ms": round(1e3 * report.client_cpu_s / requests, 2),
           "cores_busy": None if busy is None else round(busy, 2)}  # fmt: skip
    return report, cpu


def _row(name: str, report, cpu: dict, baseline: float) -> dict:
    summary = report.summary()
    latency = summary["latency_ms"]
    return {
        "run": name, "requests": report.requests, "errors": sum(report.errors.values()),
        "requests_per_s": round(report.requests_per_s, 1), "images_per_s": round(summary["images_per_s"], 1),
        "vs_in_process": round(summary["images_per_s"] / baseline, 2),
        **{f"{k}_ms": round(latency[k], 2) if k in latency else None for k in LATENCIES},
        "verified": report.verified, "mismatches": len(report.mismatches), **cpu,
    }  # fmt: skip


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _write_results(out: Path, args: argparse.Namespace, machine: str, rates: dict[str, float],
                   cpu_ms: dict[str, float], reports: list) -> None:  # fmt: skip
    """The CSV, the JSON and the plot of the runs that finished, and the README table."""
    baseline_at = max(rates, key=rates.get)
    baseline = rates[baseline_at]
    rows = [_row(name, report, cpu, baseline) for name, report, cpu in reports]
    write_csv(out / "loadtest.csv", rows, CSV_FIELDS)
    everything = {"machine": machine, "server": f"tritarget serve --backend {args.backend} {args.server_args}".strip(),
                  "client_processes": args.processes,
                  "in_process_images_per_s": {label: round(rate, 1) for label, rate in rates.items()},
                  "in_process_cpu_ms_per_request": {label: round(ms, 2) for label, ms in cpu_ms.items()},
                  "runs": [{**report.summary(), "series": report.series, "cpu": cpu}
                           for _, report, cpu in reports]}  # fmt: skip
    write_json(out / "loadtest.json", everything)
    if reports:
        reports[-1][1].plot(out / "loadtest.png")
    print(f"machine: {machine}; in-process assign_sparse {baseline:.0f} images/s ({baseline_at}), "
          f"{cpu_ms[baseline_at]:.2f} CPU ms per request")  # fmt: skip
    print("| run | req/s | images/s | x in-process | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors "
          "| verified | CPU ms / request: server / clients | cores busy |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        latency = " | ".join(_cell(row[f"{k}_ms"], ".1f") for k in ("p50", "p90", "p99", "p99.9", "max"))
        busy = "–" if row["cores_busy"] is None else f"{row['cores_busy']:.0%}"
        print(f"| {row['run']} | {row['requests_per_s']:.1f} | {row['images_per_s']:.0f} | "
              f"{row['vs_in_process']:.2f} | {latency} | {row['errors']} | {row['verified']} | "
              f"{_cell(row['server_cpu_ms'], '.2f')} / {row['client_cpu_ms']:.2f} | {busy} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/loadtest")
    parser.add_argument("--server-args", default="", help="extra `tritarget serve` flags, e.g. '--compute-workers 2'")
    parser.add_argument("--backend", default="cpu", help="the server's --backend (default cpu)")
    parser.add_argument("--processes", type=int, default=1, help="client processes (default 1)")
    parser.add_argument("--scale", type=int, default=1, help="callers per run x this (default 1)")
    parser.add_argument("--open-rate", type=float, nargs="*", default=[],
                        help="also an open loop at each of these requests/s (2500: 80%% of 25k images/s)")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    rates: dict[str, float] = {}
    in_process_cpu_ms: dict[str, float] = {}
    _in_process(rates, in_process_cpu_ms, "before", args)
    reports = []
    try:
        process, address = _serve(args.backend, args.server_args.split())
        try:
            common = {"targets": (address,), "workload": Workload(), "duration_s": args.duration,
                      "warmup_s": args.warmup, "verify": 20, "processes": args.processes}  # fmt: skip
            for stream, callers in RUNS:
                callers = max(callers * args.scale, args.processes)
                name = _run_name(stream, callers)
                kwargs = {"stream": True, "window": 2} if stream else {}
                reports.append((name, *_timed_run(LoadTestOptions(**common, concurrency=callers, **kwargs),
                                                  process.pid)))  # fmt: skip
                print(f"{name}: {reports[-1][1].summary()['images_per_s']:.0f} images/s", flush=True)
            best = max((report for name, report, _ in reports if name.startswith("unary")),
                       key=lambda r: r.requests_per_s)  # fmt: skip
            rate = round(0.8 * best.requests_per_s, 1)
            images = Workload().images
            open_loops = [(rate, "80% of the best unary rate")] if rate > 0 else []
            open_loops += [(r, f"--open-rate: {r * images:,.0f} images/s") for r in args.open_rate]
            if rate <= 0:
                print("open loop at 80% skipped: no closed-loop unary request was answered", flush=True)
            for rate, why in open_loops:
                name = f"unary, open loop at {rate:g} requests/s ({why})"
                # Over as many connections as the best closed loop had callers (one each).
                open_loop = LoadTestOptions(**common, rate=rate, concurrency=best.options.concurrency)
                reports.append((name, *_timed_run(open_loop, process.pid)))
                p99 = reports[-1][1].percentiles_ms().get("p99")
                print(f"{name}: p99 {_cell(p99, '.1f')} ms", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        _in_process(rates, in_process_cpu_ms, "after", args)
    finally:  # what ran is written, also when a later step failed
        _write_results(out, args, machine, rates, in_process_cpu_ms, reports)
    # An --open-rate run is a measurement at a load the server may not keep up with: its
    # refusals are in its row (errors), not a failure of the benchmark.
    return 0 if all(report.ok for name, report, _ in reports if "(--open-rate" not in name) else 1


if __name__ == "__main__":
    sys.exit(main())
