"""GPU sweep of the triton backend: where a call's time goes, and which matching wins where.

Run on a GPU machine after ``gpu_check.sh`` (same PYTHONPATH), one file out:

    python benchmarks/gpu_sweep.py --out "$OUT"

1. Host versus device: for COCO-RetinaNet B = 1 and 32 (G ~ 7), ``solve`` timed by
   ``do_bench`` (device-bound when the GPU is busy), by host time per call with no
   synchronisation (the launch cost), and the top host functions of 200 calls of
   ``solve``, of ``solve_sparse`` (host-bound in run12: 289 us per call at B = 1, its
   wait for the lists' lengths included, against 122 for ``solve``) and of ``assign``
   under cProfile; ``assign`` end to end beside it, and
   ``assign`` with its gt boxes checked by build_problem before the launches (five device
   operations and a read-back), as before 2026-12-04, against the check in the gather
   and its flag read back after the launches (today's). Both wait for the GPU once per
   call (before the launches, or after them): their host microseconds per call include
   that wait, end-to-end latency rather than launch cost.
2. CUDA graphs (``_Meta.graph_batches``, ``triton_graphs``): ``assign`` and
   ``assign_sparse`` end to end, ``solve`` and ``solve_sparse`` at B = 1, 8, 32 (G ~ 7),
   launched and replayed, host microseconds and do_bench milliseconds per call each way,
   the first replayed call (its capture), and the targets checked equal; ``graph_batches``
   is 0 (off) until this says what it saves.
3. Direct launches (``triton_launch``) against the JIT's launch: host microseconds per
   ``solve`` and ``solve_sparse`` at B = 1 and 32, labels checked equal.
4. The pair walk against the gather by anchor block (``_Meta.matching``) and the
   gather's variants: 2 or 1 near boxes visited at once (``gather_near``; 8, the lift
   four boxes at a time and blocks of 64 anchors lost in run10-run12 and left; 1 lost
   overall but won at B = 32, G ~ 7), a step's lone last near box visited alone
   (``lone_visits``), its programs in the grid's own order instead of every image's
   coarsest blocks first (``heavy_first``), every block's records written and read back
   (``skip_empty`` off), every near box visited (``threshold_prune`` off), the gather as
   run10 left it (without the three settings run12 made the defaults -- a generated
   grid's anchors loaded, the gather capped at 64 registers, the finalize that lifts at
   40 -- whose each alone run12 timed, in the grid's order, with every record and every
   near box); and the finalize matching each block itself
   (``inline_match``), capped as the gather or not, or visiting 2 near boxes at once:
   ``solve`` and ``solve_sparse`` at B = 1, 8, 32, 64 (G ~ 7), B = 32, G = 200, B = 8
   and B = 1 at G = 1000, targets (labels, matched boxes, deltas, classes) checked equal
   to the walk's; a variant that fails is reported and skipped; then a verdict per
   variant (points where it beat the walk, then where it beat the default gather, and
   its time over theirs as a geometric mean; targets equal or not).
5. Where each matching is faster: ``solve`` and ``solve_sparse``, the walk, the gather,
   the gather as run10 left it (built anchors, uncapped, in grid order, every record,
   every near box), the gather matching inline, visiting one near box at a time, a lone
   one alone, and every near box (the threshold pruning off),
   over B = 1, 8, 32, 64 x G ~ 7, 50, 200, 500, 1000, targets checked equal (the data a
   per-batch choice of the matching would be placed by).

Every "ms" is a ``triton.testing.do_bench`` median, as in ``bench_gpu.py``.

``--sections`` picks some of host, graphs, launches, matching, boundary (default: all).
Writes ``sweep.txt`` under ``--out`` line by line as it measures (gpu_check.sh's timeout
may end it), with the JSON on its last line when it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import math
import pstats
import statistics
import time
from pathlib import Path

import torch
import triton.testing

from tritarget.kernels import assign, assign_sparse, presets, triton_backend
from tritarget.kernels.problem import build_problem
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

PRESET = "retinanet_torchvision"
SECTIONS = ("host", "graphs", "launches", "matching", "boundary")
# (batch, boxes per image; None: COCO-like, G ~ 7) where the variants of the matching run.
MATCHING_POINTS = [(1, None), (8, None), (32, None), (64, None), (32, 200), (8, 1000), (1, 1000)]


def problem_for(batch: int, boxes: int | None):
    gt, counts, classes = coco_like_batch(batch, seed=batch, boxes_per_image=boxes)
    config = presets.get(PRESET)
    problem, _ = build_problem(gt.cuda(), counts, COCO_CANVAS, config, gt_classes=classes.cuda())
    return problem, (gt.cuda(), counts, classes.cuda(), config)


def bench(fn) -> float:
    """Median milliseconds of fn (do_bench's default is the mean; bench_gpu.py reports medians)."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def host_us(fn, calls: int = 100) -> float:
    """Host microseconds per call, launches queued without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def set_direct_launches(direct: bool) -> None:
    """The backend's kernels launched through their compiled variants, or the JIT."""
    for name in triton_backend.LAUNCHERS:
        getattr(triton_backend, name).direct = direct


def matching_verdict(points: list[dict], baseline: str = "walk") -> str:
    """One line per variant: at how many points it beat ``baseline`` (the walk, or the
    default gather for its variants), ``solve`` and ``solve_sparse`` apart, and whether
    its targets ever differed from the walk's. Points where the baseline failed compare
    nothing."""
    lines = [f"verdict against the {baseline} (points faster: solve, solve_sparse; time / its (geomean); targets):"]
    variants = list(dict.fromkeys(name for point in points for name in point["ms"] if name != baseline))
    for name in variants:
        timed = [point for point in points if name in point["ms"] and baseline in point["ms"]]
        faster = [sum(point["ms"][name][i] < point["ms"][baseline][i] for point in timed) for i in (0, 1)]
        same = not any(name in point["differ"] for point in timed)
        # How much faster, not only where: the geometric mean of time / the baseline's.
        ratios = [math.exp(statistics.fmean(math.log(p["ms"][name][i] / p["ms"][baseline][i]) for p in timed))
                  if timed else math.nan for i in (0, 1)]  # fmt: skip
        lines.append(f"  {name}: {faster[0]} / {len(timed)}, {faster[1]} / {len(timed)}; "
                     f"time x{ratios[0]:.3f}, x{ratios[1]:.3f}; {'equal' if same else 'DIFFER'}")  # fmt: skip
    return "\n".join(lines)


def _outputs(targets) -> list:
    """What a matching variant must reproduce exactly: labels, matched boxes, deltas, classes."""
    return [t for t in (targets.labels, targets.matched_gt, targets.deltas, targets.classes) if t is not None]


def graphed_calls(batch: int) -> dict:
    """``assign``, ``assign_sparse``, ``solve`` and ``solve_sparse`` of a COCO-like batch of
    ``batch`` images launched and replayed as CUDA graphs (``_Meta.graph_batches``,
    ``triton_graphs``): do_bench milliseconds and host microseconds per call each way, the
    first replayed call of each (its capture), and whether the targets are the launches'
    (every output bit for bit)."""
    problem, (gt, counts, classes, config) = problem_for(batch, None)
    calls = {
        "assign": lambda: assign(gt, counts, COCO_CANVAS, config, gt_classes=classes, backend="triton"),
        "assign_sparse": lambda: assign_sparse(gt, counts, COCO_CANVAS, config, gt_classes=classes, backend="triton"),
        "solve": lambda: triton_backend.solve(problem),
        "solve_sparse": lambda: triton_backend.solve_sparse(problem),
    }
    default = triton_backend._COMPILED
    row: dict = {"batch": batch}
    outputs: dict = {}
    try:
        for graphs in (0, batch):
            triton_backend._COMPILED = dataclasses.replace(default, graph_batches=graphs)
            timed = row["replayed" if graphs else "launched"] = {}
            for name, call in calls.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()  # replayed: the capture (sparse: the launched round has sized the lists)
                torch.cuda.synchronize()
                first_ms = (time.perf_counter() - start) * 1e3
                outputs[name, graphs] = _all_outputs(call())
                timed[name] = dict(ms=bench(call), host_us=host_us(call), first_ms=first_ms)
    finally:
        triton_backend._COMPILED = default
    row["same"] = {name: all(map(torch.equal, outputs[name, 0], outputs[name, batch])) for name in calls}
    row["graphs_kept"] = len(triton_backend._GRAPHS)
    # A failed capture turns graphs off for the process (a warning on stderr): the
    # "replayed" times are then launches, which must not read as "graphs save nothing".
    row["failed"] = triton_backend._GRAPHS.failed
    return row


def _all_outputs(targets) -> list[torch.Tensor]:
    """Every tensor of dense or sparse targets."""
    values = (getattr(targets, field.name) for field in dataclasses.fields(targets))
    return [value for value in values if isinstance(value, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which of {', '.join(SECTIONS)} to run, comma-separated (default: all)")  # fmt: skip
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Written line by line: gpu_check.sh stops the sweep at its step's timeout, and what
    # was measured by then must stay.
    report = open(out / "sweep.txt", "w")  # open for the whole run, closed at its end
    record: dict = {"host": []}

    def say(text: str) -> None:
        print(text, flush=True)
        report.write(text + "\n")
        report.flush()

    @contextlib.contextmanager
    def surviving(section: str):
        """A section that raises says so in the report, and the sweep goes on."""
        try:
            yield
        except Exception as error:
            say(f"{section}: failed: {type(error).__name__}: {error}")

    say(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}; ms: do_bench medians"
    )

    say("== host versus device (solve, COCO-like G ~ 7) ==")
    with surviving("host"):
        for batch in (1, 32) if "host" in sections else ():
            problem, (gt, counts, classes, config) = problem_for(batch, None)
            solve_ms = bench(lambda p=problem: triton_backend.solve(p))
            sparse_ms = bench(lambda p=problem: triton_backend.solve_sparse(p))
            host = host_us(lambda p=problem: triton_backend.solve(p))
            host_sparse = host_us(lambda p=problem: triton_backend.solve_sparse(p))

            def end_to_end(gt=gt, counts=counts, config=config, classes=classes):
                return assign(gt, counts, COCO_CANVAS, config, gt_classes=classes, backend="triton")

            assign_ms = bench(end_to_end)
            host_assign = host_us(end_to_end)
            # A crowd region per image on the GPU: checked with the gt boxes in the kernels
            # since 2026-12-04, where it alone cost a read-back before the launches.
            crowd = torch.tensor([[100.0, 100.0, 300.0, 300.0]], device=gt.device).repeat(batch, 1)

            def with_crowd(gt=gt, counts=counts, config=config, classes=classes, crowd=crowd):
                return assign(gt, counts, COCO_CANVAS, config, gt_classes=classes, ignore_boxes=crowd,
                              ignore_counts=[1] * len(counts), backend="triton")  # fmt: skip

            crowd_ms, host_crowd = bench(with_crowd), host_us(with_crowd)
            checks = triton_backend.CHECKS_GT_BOXES
            triton_backend.CHECKS_GT_BOXES = tuple(name for name in checks if name != "solve")
            try:
                checked_first_ms, checked_first_host = bench(end_to_end), host_us(end_to_end)
            finally:
                triton_backend.CHECKS_GT_BOXES = checks
            say(
                f"B={batch}: solve {solve_ms:.3f} ms (host {host:.0f} us/call), solve_sparse {sparse_ms:.3f} ms "
                f"(host {host_sparse:.0f} us/call), assign {assign_ms:.3f} ms (host {host_assign:.0f} us/call); "
                f"assign with its boxes checked before the launches {checked_first_ms:.3f} ms "
                f"(host {checked_first_host:.0f} us/call); assign with a crowd region per image {crowd_ms:.3f} ms "
                f"(host {host_crowd:.0f} us/call)"
            )
            record["host"].append(
                dict(batch=batch, solve_ms=solve_ms, solve_host_us=host, sparse_ms=sparse_ms,
                     sparse_host_us=host_sparse, assign_ms=assign_ms, assign_host_us=host_assign,
                     assign_checked_first_ms=checked_first_ms, assign_checked_first_host_us=checked_first_host,
                     assign_crowd_ms=crowd_ms, assign_crowd_host_us=host_crowd)
            )  # fmt: skip
            if batch == 1:  # where the host time goes: the solves, and what assign adds to them
                calls = (("solve", lambda p=problem: triton_backend.solve(p)),
                         ("solve_sparse", lambda p=problem: triton_backend.solve_sparse(p)),
                         ("assign", end_to_end))  # fmt: skip
                for name, call in calls:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(200):
                        call()
                    profiler.disable()
                    torch.cuda.synchronize()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
                    say(f"-- cProfile, 200 calls of {name} --\n{text.getvalue()}")

    say("== CUDA graphs: calls launched, then replayed (graph_batches); ms and host us per call ==")
    record["graphs"] = []
    for batch in (1, 8, 32) if "graphs" in sections else ():
        try:
            row = graphed_calls(batch)
        except Exception as error:  # the experiment's answer, not the sweep's end
            say(f"B={batch}: failed: {type(error).__name__}: {error}")
            continue
        off = f", GRAPHS OFF: {row['failed']}" if row["failed"] else ""
        for name, launched in row["launched"].items():
            replayed = row["replayed"][name]
            say(f"B={batch} {name}: {launched['ms']:.3f} -> {replayed['ms']:.3f} ms (host {launched['host_us']:.0f} -> "
                f"{replayed['host_us']:.0f} us/call); first call {launched['first_ms']:.1f} -> "
                f"{replayed['first_ms']:.1f} ms (the capture); "
                f"{'targets equal' if row['same'][name] else 'TARGETS DIFFER'}; "
                f"graphs kept {row['graphs_kept']}{off}")  # fmt: skip
        record["graphs"].append(row)

    say("== launches: compiled variants directly (triton_launch) against the JIT's launch ==")
    record["launches"] = []
    with surviving("launches"):
        for batch in (1, 32) if "launches" in sections else ():
            problem = problem_for(batch, None)[0]
            row = {"batch": batch}
            for direct in (False, True):
                set_direct_launches(direct)
                labels = triton_backend.solve(problem).labels
                row[direct] = (host_us(lambda p=problem: triton_backend.solve(p)),
                               host_us(lambda p=problem: triton_backend.solve_sparse(p)), labels)  # fmt: skip
            same = torch.equal(row[True][2], row[False][2])
            differ = "" if same else "  LABELS DIFFER"
            say(f"B={batch}: host us per call, JIT -> direct: solve {row[False][0]:.0f} -> {row[True][0]:.0f}, "
                f"solve_sparse {row[False][1]:.0f} -> {row[True][1]:.0f}{differ}")  # fmt: skip
            record["launches"].append(dict(batch=batch, jit_us=row[False][:2], direct_us=row[True][:2], same=same))

    say("== matching: the pair walk against the gather by anchor block (gather_kernel) ==")
    record["matching"] = []
    default = triton_backend._COMPILED
    variants = {"walk": dict(matching="walk"), "gather": dict(matching="gather")}
    variants["gather near=2"] = dict(matching="gather", gather_near=2)
    # One near box at a time: run12 (run10's settings) timed it 0.76x the gather's solve at
    # B = 32, G ~ 7 (0.216 against 0.283 ms) and 1.19x at B = 8, G = 1,000; with the loads and
    # caps since, and over B x G below, where a width chosen per batch would switch.
    near_one = dict(matching="gather", gather_near=1)
    variants["gather near=1"] = near_one
    # A step's last near box visited alone where it would be alone in its tile of 4
    # (lone_visits): one box at a time where most steps list one (G ~ 7), tiles elsewhere.
    variants["gather, lone visits"] = dict(matching="gather", lone_visits=True)
    # The programs in the grid's own order, an image's blocks in turn, as before
    # 2026-12-05 (heavy first: every image's coarsest blocks start first; the list
    # schedule of bench_gpu.py --pairs ends 31% sooner at B = 8, G = 1,000).
    variants["gather, grid order"] = dict(matching="gather", heavy_first=False)
    # Every block's records written and read back, as before 2026-12-05 (skip_empty: a
    # block near no box, 83% of them at G ~ 7, writes a flag instead, and the finalize
    # reads its records only where the flag is set).
    variants["gather, every record"] = dict(matching="gather", skip_empty=False)
    # Every near box visited, as before 2026-12-06 (threshold_prune: the matching skips the
    # pairs below the thresholds that no target depends on, floor_kernel's need; 0.64x the
    # overlapping pairs at G = 200 instead of 1.86x, bench_gpu.py --pairs).
    variants["gather, every near box"] = dict(matching="gather", threshold_prune=False)
    # The gather as run10 timed it: the three settings run12 made the defaults undone
    # (each alone was timed in run12: 0.94-1.01x: the gather uncapped, the lifting
    # finalize uncapped, a block's anchors built from the level tables instead of loaded),
    # and the three built since (blocks in grid order, every block's records, every near box).
    as_run10 = dict(matching="gather", load_anchors=False, gather_registers=None, finalize_registers=None,
                    heavy_first=False, skip_empty=False, threshold_prune=False)  # fmt: skip
    variants["gather as run10 left it"] = as_run10
    # The finalize matching each block itself: no 16-byte record per anchor written and read
    # back between the passes (the G ~ 7 batches' floor above the targets' writes), the
    # search twice where the gather runs for the box keys; under the gather's cap or none.
    inline = dict(matching="gather", inline_match=True)
    variants["gather, matching inline"] = inline
    variants["gather, matching inline, uncapped"] = dict(inline, gather_registers=None)
    # Visiting 4 near boxes at once the inline finalize reaches the 64-register cap with 80
    # bytes of stack (Triton 3.6, kernel_resources_triton3.6/); 2 at once is lighter.
    variants["gather, matching inline, near=2"] = dict(inline, gather_near=2)
    failed = set()
    for point in MATCHING_POINTS if "matching" in sections else ():
        try:
            problem = problem_for(*point)[0]
        except Exception as error:  # the point's answer (out of memory at its size), not the sweep's end
            say(f"B={point[0]} G={point[1] or '~7'}: failed: {type(error).__name__}: {error}")
            continue
        row = {}
        for name, change in variants.items():
            if name in failed:
                continue
            triton_backend._COMPILED = dataclasses.replace(default, **change)
            try:
                row[name] = (bench(lambda p=problem: triton_backend.solve(p)),
                             bench(lambda p=problem: triton_backend.solve_sparse(p)),
                             _outputs(triton_backend.solve(problem)))  # fmt: skip
            except Exception as error:  # the variant's answer, not the sweep's end
                say(f"{name}: failed: {type(error).__name__}: {error}")
                failed.add(name)
        triton_backend._COMPILED = default
        walk = row["walk"][2] if "walk" in row else None
        differ = [name for name in row if walk is not None and not all(map(torch.equal, row[name][2], walk))]
        times = ", ".join(f"{name} {row[name][0]:.3f} / {row[name][1]:.3f}" for name in row)
        say(f"B={point[0]} G={point[1] or '~7'}: solve / solve_sparse ms: {times}"
            f"{f'  LABELS DIFFER: {differ}' if differ else ''}")  # fmt: skip
        record["matching"].append(dict(batch=point[0], boxes=point[1], differ=differ,
                                       ms={name: row[name][:2] for name in row}))  # fmt: skip
    if record["matching"]:
        say(matching_verdict(record["matching"]))
        say(matching_verdict(record["matching"], baseline="gather"))  # which variant becomes the default next

    # Neither matching wins everywhere (run10 against run11, GPU time): the gather on
    # crowded images and small batches, the walk on large batches of few boxes (B = 32
    # and 64 at G ~ 7) and on one image of 1,000 boxes. Where the boundary lies decides
    # whether a per-batch rule pays; the walk's own launch parameters were swept in
    # run6, run8 and run10 and stood.
    say("== matching over batch x boxes per image: solve / solve_sparse ms, walk against the gathers ==")
    record["boundary"] = []
    contenders = {"walk": dict(matching="walk"), "gather": dict(matching="gather"), "gather as run10": as_run10,
                  "inline": inline, "gather near=1": near_one,
                  "gather, lone visits": dict(matching="gather", lone_visits=True),
                  "gather, every near box": dict(matching="gather", threshold_prune=False)}  # fmt: skip
    for batch in (1, 8, 32, 64) if "boundary" in sections else ():
        for boxes in (None, 50, 200, 500, 1000):  # 500: B = 1 flips between 200 and 1000 (run12)
            row = {}
            try:
                problem = problem_for(batch, boxes)[0]
                for name, change in contenders.items():
                    triton_backend._COMPILED = dataclasses.replace(default, **change)
                    row[name] = (bench(lambda p=problem: triton_backend.solve(p)),
                                 bench(lambda p=problem: triton_backend.solve_sparse(p)),
                                 _outputs(triton_backend.solve(problem)))  # fmt: skip
            except Exception as error:  # the cell's answer, not the sweep's end
                say(f"B={batch} G={boxes or '~7'}: failed: {type(error).__name__}: {error}")
                continue
            finally:
                triton_backend._COMPILED = default
            same = all(all(map(torch.equal, row["walk"][2], row[name][2])) for name in row)
            walk = row["walk"]
            cells = "  ".join(
                f"{name} {row[name][0]:7.3f} / {row[name][1]:7.3f}"
                + ("" if name == "walk" else f" (x{row[name][0] / walk[0]:.2f} / x{row[name][1] / walk[1]:.2f})")
                for name in row
            )
            say(f"B={batch:<3} G={boxes or '~7':<5} {cells}{'' if same else '  TARGETS DIFFER'}")
            record["boundary"].append(dict(batch=batch, boxes=boxes, same=same,
                                           ms={name: row[name][:2] for name in row}))  # fmt: skip

    say(json.dumps(record))
    report.close()


if __name__ == "__main__":
    main()
