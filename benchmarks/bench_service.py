"""Service benchmark: wire size and throughput of the gRPC service over loopback.

Workload "COCO-RetinaNet" (DESIGN §9): canvas 800 x 1344, ``retinanet_torchvision``
(201,600 anchors), COCO-like boxes from ``tritarget.kernels.workload`` (mean ~7 per
image, classes included), requests of ``--images-per-request`` images. Measures:

* bytes per image of the response, DENSE vs SPARSE, float32 and float16 deltas
  (target: SPARSE >= 50x smaller than DENSE);
* images/s through the service (``tritarget serve`` in a subprocess, one asyncio
  client process keeping ``concurrency`` requests in flight, SPARSE responses
  densified into ``Targets`` by the client) vs two in-process baselines on the same
  requests one after another with the same backend (target >= 90% at concurrency >= 8,
  the issue "The service at GPU scale"; below 8 no target applies): ``assign``
  (dense targets, what a training loop calls) and ``assign_sparse`` (the same
  SPARSE targets the service sends, compacted by the backend). Each baseline runs
  with the machine's torch threads and with one thread, and the faster counts (on
  2 cores the cpu kernel is memory-bound, so one thread is as fast, and torch's
  OpenMP threads spinning after a parallel op can slow the kernel's own threads);
* latency per request (building the request -> dense ``Targets``), p50 / p99, at
  concurrency 1, 8, 32;
* the same with a client that stops at the parsed SPARSE response: the server's
  capacity when, as in a real deployment, the data loaders densify on their own
  machines (on loopback, the client's densifying takes cores from the server).

Server and client share the machine's cores, as a loopback deployment does. The
client process decodes with one torch thread, as a ``DataLoader`` worker does (torch
sets one thread per worker). In-process and service runs alternate over ``--rounds``
rounds and the best of each side is reported (medians too), so that bursts of
background load on a shared machine hurt neither side more than the other; latency
percentiles pool all rounds.
Writes ``service_loopback.csv``, ``.json`` and ``.png`` (``--prefix``)
under ``--out`` and prints every ratio, against both baselines, next to its target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import serving
import torch
from recording import cpu_model, pyplot, save_figure, write_csv, write_json

from tritarget.clients import AsyncTargetClient, TargetClient
from tritarget.clients.wire import build_request, decode_response
from tritarget.kernels import assign, assign_sparse, presets
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch
from tritarget.service.arguments import integer

PRESET = "retinanet_torchvision"
TARGET_SPARSE_RATIO = 50.0
TARGET_THROUGHPUT_RATIO = 0.9  # of in-process, at concurrency >= TARGET_MIN_CONCURRENCY
TARGET_MIN_CONCURRENCY = 8
# Row modes: the client densifies every response into Targets (end to end, client and
# server on the same cores), or keeps the parsed SPARSE response (the server's capacity,
# densifying left to the data loaders' machines).
MODES = {"service": "end to end (client densifies)", "service_sparse": "server capacity (client parses only)"}
# In-process baselines: dense targets, and the sparse targets the service sends.
BASELINES = {"assign": assign, "assign_sparse": assign_sparse}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--prefix", default="service_loopback", help="file name prefix (default: service_loopback)")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "triton", "reference"),
                        help="server and in-process backend (default cpu; triton needs a GPU)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement (default 200)")
    parser.add_argument("--images-per-request", type=int, default=2)
    parser.add_argument("--max-batch-images", type=int, default=8, help="server batcher limit (default 8)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="server batching wait (default 0)")
    parser.add_argument("--compute-workers", type=int, default=2,
                        help="server compute workers, the cores split between them (default 2: on 2 cores, one "
                             "torch thread each beats one worker with two)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best of each side (default 3)")
    parser.add_argument("--size-images", type=integer(1), default=64, help="images for the bytes-per-image figures")
    return parser.parse_args()


def workload(requests: int, images: int, seed: int = 0) -> list[dict]:
    """One dict of ``assign`` arguments per request, deterministic."""
    items = []
    for i in range(requests):
        boxes, counts, classes = coco_like_batch(images, seed=seed + i)
        items.append({"gt_boxes": boxes, "gt_counts": counts, "gt_classes": classes})
    return items


def backend_or_fallback(name: str) -> tuple[str, str]:
    """The backend to use and a note when it had to fall back to the reference."""
    if name != "cpu":
        return name, ""
    try:
        assign(torch.zeros(0, 4), [0], (32, 32), presets.get(PRESET), backend="cpu")
    except ImportError as exc:
        return "reference", f"cpu backend unavailable ({exc}); measured with the reference backend instead"
    return "cpu", ""


def in_process(items: list[dict], backend: str, function=assign) -> float:
    """Images per second of ``function`` (``assign`` or ``assign_sparse``) on the requests
    one after another (on the GPU for triton, inputs already there and targets left there,
    as a training loop would)."""
    config = presets.get(PRESET)
    device = torch.device("cuda" if backend == "triton" else "cpu")
    moved = [(i["gt_boxes"].to(device), i["gt_counts"], i["gt_classes"].to(device)) for i in items]
    for boxes, counts, classes in moved[:3]:
        function(boxes, counts, COCO_CANVAS, config, gt_classes=classes, backend=backend)
    if device.type == "cuda":  # the warm-up's kernels end before the clock starts
        torch.cuda.synchronize()
    start = time.perf_counter()
    for boxes, counts, classes in moved:
        function(boxes, counts, COCO_CANVAS, config, gt_classes=classes, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(item["gt_counts"]) for item in items) / (time.perf_counter() - start)


def start_server(
    backend: str, max_batch_images: int, delay_ms: float, workers: int = 1
) -> tuple[subprocess.Popen, str, str]:
    return serving.start_server("--backend", backend, "--max-batch-images", str(max_batch_images),
                                "--max-queue-delay-ms", str(delay_ms), "--compute-workers", str(workers),
                                metrics=True)  # fmt: skip


def response_bytes(address: str, items: list[dict]) -> dict[str, float]:
    """Mean serialized response bytes per image for each format x delta dtype."""
    sizes = {}
    with TargetClient(address) as client:
        for fmt in ("dense", "sparse"):
            for dtype in ("float32", "float16"):
                total = images = 0
                for item in items:
                    request = build_request(
                        item["gt_boxes"], item["gt_counts"], COCO_CANVAS, preset=PRESET,
                        gt_classes=item["gt_classes"], format=fmt, delta_dtype=dtype,
                    )  # fmt: skip
                    total += client.assign_raw(request).ByteSize()
                    images += len(item["gt_counts"])
                sizes[f"{fmt}_{dtype}"] = total / images
    return sizes


async def through_service(
    address: str, items: list[dict], concurrency: int, densify: bool = True, metrics_url: str | None = None
) -> tuple[float, list[float], tuple[float, float]]:
    """(images/s, per-request latencies in s, (batched calls, images in them)) with
    ``concurrency`` requests in flight; the batches are the timed requests' alone, read
    from ``metrics_url`` (none without it), after the warm-up's requests, sent one by one.

    ``densify=False`` stops at the parsed SPARSE response: what the server sustains when
    the densifying happens on the data loaders' own machines, as in a real deployment.
    """
    finish = decode_response if densify else (lambda response: response)
    latencies: list[float] = []
    async with AsyncTargetClient(address, timeout=120) as client:
        for item in items[: max(concurrency, 4)]:  # warm the channel and the server
            decode_response(await client.assign_raw(build_request(**item, canvas=COCO_CANVAS, preset=PRESET)))
        queue = iter(items)
        before = batch_counters(metrics_url) if metrics_url else (0.0, 0.0)

        async def worker() -> None:
            for item in queue:
                # Timed from the request's building: the in-process baselines pay for their inputs too.
                start = time.perf_counter()
                request = build_request(**item, canvas=COCO_CANVAS, preset=PRESET)
                finish(await client.assign_raw(request))
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
        after = batch_counters(metrics_url) if metrics_url else (0.0, 0.0)
    images = sum(len(item["gt_counts"]) for item in items)
    return images / elapsed, latencies, (after[0] - before[0], after[1] - before[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def batch_counters(metrics_url: str) -> tuple[float, float]:
    """(batched assign calls, images in them) so far, from the server's /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("tritarget_batch_images_count"), value("tritarget_batch_images_sum")


def environment(backend: str, note: str, args: argparse.Namespace) -> dict:
    return {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "gpu": torch.cuda.get_device_name() if backend == "triton" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backend": backend,
        "note": note,
        "preset": PRESET,
        "canvas": list(COCO_CANVAS),
        "images_per_request": args.images_per_request,
        "requests": args.requests,
        "max_batch_images": args.max_batch_images,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "compute_workers": args.compute_workers,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write(rows: list[dict], env: dict, sizes: dict, out: Path, prefix: str) -> None:
    write_csv(out / f"{prefix}.csv", rows)
    write_json(out / f"{prefix}.json", {"environment": env, "bytes_per_image": sizes, "rows": rows})
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(sizes)
    ax1.bar(names, [sizes[n] for n in names], color=["#c44", "#e88", "#48c", "#8ae"])
    ax1.set_yscale("log")
    ax1.set_ylabel("response bytes per image")
    ax1.set_title(f"wire size (SPARSE {sizes['dense_float32'] / sizes['sparse_float32']:.0f}x smaller)")
    ax1.tick_params(axis="x", rotation=20)
    service = [r for r in rows if r["mode"] == "service"]
    capacity = [r for r in rows if r["mode"] == "service_sparse"]
    conc = [r["concurrency"] for r in service]
    ax2.plot(conc, [r["images_per_s"] for r in service], "o-", label=MODES["service"])
    ax2.plot(conc, [r["images_per_s"] for r in capacity], "s-", label=MODES["service_sparse"])
    for row, color in zip(rows[:2], ("black", "#8a2be2")):
        name = "assign" if row["mode"] == "in_process" else "assign_sparse"
        threads = f"{row['threads']} thread{'s' * (row['threads'] > 1)}"
        ax2.axhline(row["images_per_s"], color=color, ls="--", lw=1, label=f"in-process {name} ({threads})")
        goal = f"{TARGET_THROUGHPUT_RATIO:.0%} of in-process {name} (target at c >= {TARGET_MIN_CONCURRENCY})"
        ax2.axhline(row["images_per_s"] * TARGET_THROUGHPUT_RATIO, color=color, ls=":", lw=1, label=goal)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("requests in flight")
    ax2.set_ylabel("images / s")
    ax2.set_ylim(bottom=0)
    top_e2e, top_cap = (max(r, key=lambda x: x["images_per_s"]) for r in (service, capacity))
    ax2.set_title(f"throughput; best end to end {top_e2e['ratio_vs_assign']:.0%} of assign / "
                  f"{top_e2e['ratio_vs_assign_sparse']:.0%} of assign_sparse,\nserver capacity "
                  f"{top_cap['ratio_vs_assign']:.0%} / {top_cap['ratio_vs_assign_sparse']:.0%}",
                  fontsize=9)  # fmt: skip
    ax2.legend(loc="lower right", fontsize=7)
    ax3.plot(conc, [r["p50_ms"] for r in service], "o-", label="p50 (end to end)")
    ax3.plot(conc, [r["p99_ms"] for r in service], "s-", label="p99 (end to end)")
    ax3.set_xscale("log", base=2)
    ax3.set_xlabel("requests in flight")
    ax3.set_ylabel(f"ms per request ({env['images_per_request']} images)")
    ax3.set_title("latency")
    ax3.legend(fontsize=8)
    where = env["machine"] + (f", {env['gpu']}" if env["gpu"] else "")
    fig.suptitle(f"tritarget service, loopback, backend {env['backend']}: {where}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / f"{prefix}.png", dpi=110)


def main() -> None:
    args = parse_args()
    backend, note = backend_or_fallback(args.backend)
    if note:
        print(f"NOTE: {note}")
    items = workload(args.requests, args.images_per_request)
    threads = torch.get_num_threads()
    process, address, metrics_url = start_server(
        backend, args.max_batch_images, args.max_queue_delay_ms, args.compute_workers
    )
    runs = [(mode, c) for mode in MODES for c in args.concurrency]
    # Per baseline and round: the faster of all threads and one thread (and which it was).
    baselines: dict[str, list[float]] = {name: [] for name in BASELINES}
    baseline_threads: dict[str, list[int]] = {name: [] for name in BASELINES}
    thread_counts = sorted({threads, 1}, reverse=True)
    best: dict[tuple[str, int], float] = {}
    every: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    latencies: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    batch_images: dict[tuple[str, int], list[float]] = {run: [0.0, 0.0] for run in runs}
    try:
        torch.set_num_threads(1)  # the client side, as in a DataLoader worker
        requests = -(-args.size_images // args.images_per_request)  # whole requests, rounded up
        sizes = response_bytes(address, workload(requests, args.images_per_request, seed=10_000))
        ratio = sizes["dense_float32"] / sizes["sparse_float32"]
        for name, size in sizes.items():
            print(f"bytes per image {name:>15}: {size:>12,.0f}")
        verdict = "meets" if ratio >= TARGET_SPARSE_RATIO else "MISSES"
        print(f"SPARSE is {ratio:.0f}x smaller than DENSE (target >= {TARGET_SPARSE_RATIO:.0f}x: {verdict})")
        # Rounds alternate in-process and service runs; the best of each counts, so a burst
        # of background load on a shared machine hurts neither side more than the other.
        for round_ in range(args.rounds):
            line = []
            for name, function in BASELINES.items():
                measured = {}
                for count in thread_counts:
                    torch.set_num_threads(count)
                    measured[count] = in_process(items, backend, function)
                fastest = max(measured, key=measured.get)
                baselines[name].append(measured[fastest])
                baseline_threads[name].append(fastest)
                line.append(f"in-process {name} " + " / ".join(f"{v:.1f}" for v in measured.values())
                            + f" ({' / '.join(map(str, measured))} threads)")  # fmt: skip
            torch.set_num_threads(1)
            for run in runs:
                mode, concurrency = run
                throughput, lat, (calls, images) = asyncio.run(
                    through_service(address, items, concurrency, mode == "service", metrics_url)
                )
                batch_images[run][0] += calls
                batch_images[run][1] += images
                latencies[run] += lat
                best[run] = max(best.get(run, 0.0), throughput)
                every[run].append(throughput)
                line.append(f"{mode} c={concurrency} {throughput:.1f}")
            print(f"round {round_ + 1}: " + ", ".join(line), flush=True)
    finally:
        process.terminate()
        process.wait(30)
        torch.set_num_threads(threads)
    top = {name: max(values) for name, values in baselines.items()}
    middle = {name: statistics.median(values) for name, values in baselines.items()}
    rows = []
    for name in BASELINES:
        # The thread count of the best round (and how many rounds each count won).
        won = baseline_threads[name][baselines[name].index(top[name])]
        rows.append({
            "mode": "in_process" if name == "assign" else "in_process_sparse", "concurrency": 1,
            "images_per_s": round(top[name], 1), "median_images_per_s": round(middle[name], 1),
            **{f"ratio_vs_{b}": round(top[name] / top[b], 3) for b in BASELINES},
            **{f"median_ratio_vs_{b}": round(middle[name] / middle[b], 3) for b in BASELINES},
            "p50_ms": "", "p99_ms": "", "mean_batch_images": "", "threads": won,
        })  # fmt: skip
        print(f"in-process {name} ({backend}, best of {args.rounds} rounds x {thread_counts} threads): "
              f"{top[name]:.1f} images/s with {won} thread(s) (median {middle[name]:.1f})")  # fmt: skip
    for run in runs:
        mode, concurrency = run
        calls, images = batch_images[run]
        median = statistics.median(every[run])
        row = {
            "mode": mode, "concurrency": concurrency, "images_per_s": round(best[run], 1),
            "median_images_per_s": round(median, 1),
            **{f"ratio_vs_{b}": round(best[run] / top[b], 3) for b in BASELINES},
            **{f"median_ratio_vs_{b}": round(median / middle[b], 3) for b in BASELINES},
            "p50_ms": round(percentile(latencies[run], 0.5) * 1000, 2),
            "p99_ms": round(percentile(latencies[run], 0.99) * 1000, 2),
            "mean_batch_images": round(images / max(calls, 1), 2), "threads": "",
        }  # fmt: skip
        rows.append(row)
        shares = []
        targeted = concurrency >= TARGET_MIN_CONCURRENCY
        for b in BASELINES:
            share = row[f"ratio_vs_{b}"]
            verdict = ("meets" if share >= TARGET_THROUGHPUT_RATIO else "misses") if targeted else "no target"
            shares.append(f"{share:.0%} of in-process {b} (median {row[f'median_ratio_vs_{b}']:.0%}; {verdict})")
        target = (f"target >= {TARGET_THROUGHPUT_RATIO:.0%}" if targeted
                  else f"the {TARGET_THROUGHPUT_RATIO:.0%} target is for c >= {TARGET_MIN_CONCURRENCY}")  # fmt: skip
        print(f"{MODES[mode]:<37} c={concurrency:>2}: {row['images_per_s']:6.1f} images/s = {', '.join(shares)}"
              f" [{target}]; p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
              f"{row['mean_batch_images']} images per batched call")  # fmt: skip
    env = environment(backend, note, args)
    env["client_torch_threads"] = 1
    env["server_threads_per_compute_worker"] = max(1, threads // args.compute_workers)
    env["baseline_thread_counts_tried"] = thread_counts
    env["baseline_threads_per_round"] = baseline_threads
    env["rounds"] = args.rounds
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    env["sparse_vs_dense_ratio"] = round(ratio, 1)
    write(rows, env, {k: round(v, 1) for k, v in sizes.items()}, Path(args.out), args.prefix)
    print(f"wrote {args.out}/{args.prefix}.csv, .json, .png")


if __name__ == "__main__":
    main()
