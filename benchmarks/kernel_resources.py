"""What the GPU will run, measured without one: registers, spills and SASS size per kernel.

Compiles every Triton kernel of the triton backend for Hopper (sm_90) with the launch
parameters the backend uses, then reads the cubin with the ``cuobjdump`` Triton ships:
``-res-usage`` gives registers per thread, stack and spill bytes; ``-sass`` gives the
machine code, whose instruction count (total, and inside loops: between a backward
branch and its target) says how much work one pass of the inner loop is. Registers set
occupancy: 65,536 per SM / (registers x threads per program) programs fit an SM.

    python benchmarks/kernel_resources.py [--out benchmarks/results]

Writes ``kernel_resources.md`` under ``--out``. Needs no GPU (run it with
TRITON_INTERPRET unset). CI has the newest Triton; the GPU image has Triton 3.6, whose
compiler allocates differently: ``benchmarks/results/kernel_resources_triton3.6/`` is
the same table from a venv with ``torch==2.13.0 triton==3.6.0`` (both from PyPI, no GPU).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from recording import write_text  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritarget.kernels import triton_assign as k  # noqa: E402
from tritarget.kernels import triton_backend as backend  # noqa: E402

INT64 = {"gt_offsets_ptr", "box_key_ptr", "level_int_ptr", "ignore_offsets_ptr", "block_starts_ptr", "prefix_ptr",
         "pairs_ptr", "offsets_ptr", "totals_ptr", "invalid_ptr", "flags_ptr"}  # fmt: skip
INT32 = {"gt_classes_ptr", "matched_ptr", "classes_ptr", "block_counts_ptr", "positive_anchors_ptr",
         "positive_matched_ptr", "positive_classes_ptr", "ignored_anchors_ptr", "shape_int_ptr", "rect_ptr",
         "row_image_ptr", "row_box_ptr", "seg_max_ptr", "pad_ptr"}  # fmt: skip
FLOATS = {"high", "low", "min_pos_iou", "ignore_iof_thr"}
FLOATS |= {f"{a}_{b}" for a in ("weight", "mean", "std") for b in "xywh"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def kernels() -> list[tuple[str, object, dict]]:
    m = backend._COMPILED
    # The backend's defaults: a generated grid, its anchors built or loaded, registers capped or not.
    finalize = dict(
        GENERATE=True, BUILD_ANCHORS=not m.load_anchors, BLOCK_A=m.block_a, BLOCK_G=m.block_g, HEAVY_FIRST=m.heavy_first
    )
    gather = dict(finalize, BOXES=m.gather_boxes, NEAR=m.gather_near, SKIP_EMPTY=m.skip_empty,
                  LONE=m.lone_visits, maxnreg=m.gather_registers)  # fmt: skip
    lifting = dict(finalize, LIFT=True, NEAR=m.lift_near, SKIP_EMPTY=m.skip_empty, maxnreg=m.finalize_registers)
    inline = dict(lifting, INLINE=True, SKIP_EMPTY=False, LONE=m.lone_visits, maxnreg=m.gather_registers)
    return [
        ("segments", k.segments_kernel, dict(GENERATE=True, ROWS=m.segment_rows, SHAPES=64)),
        ("pairs: scatter", k.pairs_kernel, dict(STAGE=k.STAGE_SCATTER, GENERATE=True, BLOCK_P=m.block_p)),
        ("pairs: lift", k.pairs_kernel, dict(STAGE=k.STAGE_LIFT, GENERATE=True, BLOCK_P=m.block_p)),
        (
            "pairs: scatter, explicit anchors",
            k.pairs_kernel,
            dict(STAGE=k.STAGE_SCATTER, GENERATE=False, BLOCK_P=m.block_p),
        ),  # fmt: skip
        *(
            (
                f"pairs: scatter, {f'at most {registers}' if registers else 'uncapped'} registers",
                k.pairs_kernel,
                dict(STAGE=k.STAGE_SCATTER, GENERATE=True, BLOCK_P=m.block_p, maxnreg=registers),
            )
            for registers in (None, 48)
        ),
        (
            "pairs: scatter, no pre-check",
            k.pairs_kernel,
            dict(STAGE=k.STAGE_SCATTER, GENERATE=True, BLOCK_P=m.block_p, PRECHECK=False),
        ),  # fmt: skip
        ("lift segments", k.lift_segments_kernel, dict(BLOCK=1024)),
        ("forced (ssd)", k.forced_kernel, dict(BLOCK=128)),
        ("floor (before the pruned gather)", k.floor_kernel, dict(BOXES=m.gather_boxes)),
        ("gather: scatter", k.gather_kernel, gather),
        *(
            (
                f"gather: scatter, {near} near box{'es' if near > 1 else ''} at a time",
                k.gather_kernel,
                dict(gather, NEAR=near),
            )
            for near in (1, 2, 8)
        ),
        ("gather: scatter, uncapped registers", k.gather_kernel, dict(gather, maxnreg=None)),
        ("gather: scatter, at most 48 registers", k.gather_kernel, dict(gather, maxnreg=48)),
        ("gather: scatter, anchors built in every block", k.gather_kernel, dict(gather, BUILD_ANCHORS=True)),
        ("gather: scatter, 64 anchors per block", k.gather_kernel, dict(gather, BLOCK_A=64)),
        (
            "gather: box keys only (the finalize matching inline)",
            k.gather_kernel,
            dict(gather, RECORDS=False, SKIP_EMPTY=False),
        ),  # fmt: skip
        ("gather: scatter, every block's records", k.gather_kernel, dict(gather, SKIP_EMPTY=False)),
        ("gather: scatter, a lone near box visited alone", k.gather_kernel, dict(gather, LONE=True)),
        # low_quality is a runtime argument, so the visit loop holds every mode's fold;
        # compiled as a constant, the loop is one mode's path.
        ("gather: scatter, the lift modes' fold alone", k.gather_kernel, dict(gather, low_quality=1)),
        ("gather: scatter, ssd_forced's fold alone", k.gather_kernel, dict(gather, low_quality=4)),
        ("finalize: dense", k.finalize_kernel, dict(finalize, OUTPUT=k.OUTPUT_DENSE)),
        ("finalize: count", k.finalize_kernel, dict(finalize, OUTPUT=k.OUTPUT_COUNT)),
        ("finalize: sparse", k.finalize_kernel, dict(finalize, OUTPUT=k.OUTPUT_SPARSE)),
        # After the gather (skip_empty): the records read only where a block's flag says so.
        *(
            (
                f"finalize: {name}, the gather's records where flagged",
                k.finalize_kernel,
                dict(finalize, OUTPUT=output, SKIP_EMPTY=m.skip_empty),
            )
            for name, output in (("dense", k.OUTPUT_DENSE), ("sparse", k.OUTPUT_SPARSE))
        ),  # fmt: skip
        *(
            (
                f"finalize: {name} with the gather's lift{f', {near} near boxes at a time' if near > 1 else ''}",
                k.finalize_kernel,
                dict(lifting, OUTPUT=output, NEAR=near),
            )
            for name, output in (("dense", k.OUTPUT_DENSE), ("count", k.OUTPUT_COUNT))
            for near in (m.lift_near, 4)
        ),
        (
            "finalize: dense with the gather's lift, anchors built in every block",
            k.finalize_kernel,
            dict(lifting, OUTPUT=k.OUTPUT_DENSE, BUILD_ANCHORS=True),
        ),
        (
            "finalize: dense with the gather's lift, uncapped registers",
            k.finalize_kernel,
            dict(lifting, OUTPUT=k.OUTPUT_DENSE, maxnreg=None),
        ),
        (
            "finalize: dense with the gather's lift, 64 anchors per block",
            k.finalize_kernel,
            dict(lifting, OUTPUT=k.OUTPUT_DENSE, BLOCK_A=64),
        ),
        # Matching inline (``_Meta.inline_match``): the gather's search in the finalize,
        # under the gather's cap.
        ("finalize: dense, matching inline", k.finalize_kernel, dict(inline, OUTPUT=k.OUTPUT_DENSE, LIFT=False)),
        ("finalize: dense with the lift, matching inline", k.finalize_kernel, dict(inline, OUTPUT=k.OUTPUT_DENSE)),
        ("finalize: count with the lift, matching inline", k.finalize_kernel, dict(inline, OUTPUT=k.OUTPUT_COUNT)),
        (
            "finalize: dense with the lift, matching inline, uncapped registers",
            k.finalize_kernel,
            dict(inline, OUTPUT=k.OUTPUT_DENSE, maxnreg=None),
        ),
        ("scan", k.scan_kernel, dict(backend.SCAN_STEPS, num_warps=backend.SCAN_WARPS)),
    ]


def compile_cubin(fn, constexprs: dict) -> bytes:
    constexprs = dict(constexprs)
    options = {"num_warps": backend._COMPILED.num_warps, "enable_fp_fusion": False}
    # A compile option, as the launch passes it: the pair kernels get the backend's cap
    # unless the row names its own (None: the compiler's choice).
    default_cap = backend._COMPILED.pair_registers if fn is k.pairs_kernel else None
    cap = constexprs.pop("maxnreg", default_cap)
    options["num_warps"] = constexprs.pop("num_warps", options["num_warps"])  # a row's own, as its launch has
    if fn is k.pairs_kernel:  # a constexpr with a default: left out, it would compile as a runtime argument
        constexprs.setdefault("PRECHECK", backend._COMPILED.scatter_precheck)
    if fn is k.finalize_kernel:  # the walk's finalize unless the row says otherwise
        constexprs = {"LIFT": False, "BOXES": backend._COMPILED.gather_boxes, "NEAR": backend._COMPILED.lift_near,
                      "INLINE": False, "MATCH_NEAR": backend._COMPILED.gather_near, "SKIP_EMPTY": False,
                      "LONE": False, **constexprs}  # fmt: skip
    if fn is k.gather_kernel:  # with its records unless the row says otherwise
        constexprs.setdefault("RECORDS", True)
    if cap is not None:
        options["maxnreg"] = cap

    def kind(arg: str) -> str:
        if arg in constexprs:
            return "constexpr"
        if arg.endswith("_ptr"):
            if arg in INT64 or arg in INT32:
                return "*i64" if arg in INT64 else "*i32"
            return {"labels_ptr": "*i8", "near_ptr": "*u8"}.get(arg, "*fp32")
        return "fp32" if arg in FLOATS else "i32"

    signature = {arg: kind(arg) for arg in fn.arg_names}
    # torch allocations are 16-byte aligned: the JIT gives pointers this hint too, except
    # those it is told not to specialise on.
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if arg.endswith("_ptr") and arg not in fn.do_not_specialize_on_alignment}  # fmt: skip
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                              options=options)  # fmt: skip
    return compiled.asm["cubin"]


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    # SASS lines look like "/*0a40*/   IMAD R4, R2, ... ;" ; branches name their target.
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", sass.stdout)]
    opcodes = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for _, text in code]
    atomic_at = {a for (a, _), op in zip(code, opcodes) if op.split(".")[0] in ("ATOM", "ATOMG", "RED", "REDG")}
    loops = []  # (first, last) address of each loop
    for address, text in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    in_loops = {a for a, _ in code for first, last in loops if first <= a <= last}
    # The loop that does the per-visit work of a kernel with atomics (the gather's visits
    # of its near boxes, the pair walk's chunks): the smallest holding one.
    with_atomic = [(first, last) for first, last in loops if any(first <= a <= last for a in atomic_at)]
    innermost = min(with_atomic, key=lambda loop: loop[1] - loop[0], default=None)
    return {
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": int(fields.get("LOCAL", 0)),
        "stack": int(fields.get("STACK", 0)),
        "instructions": len(code),
        "in_loops": len(in_loops),
        "atomic_loop": 0 if innermost is None else sum(innermost[0] <= a <= innermost[1] for a, _ in code),
        # Memory fences, atomics whose result the thread waits for (ATOM, ATOMG) and
        # fire-and-forget ones (RED, REDG; not the warp reduction REDUX).
        "fences": sum(op.startswith("MEMBAR") for op in opcodes),
        "awaited_atomics": sum(op.split(".")[0] in ("ATOM", "ATOMG") for op in opcodes),
        "reductions": sum(op.split(".")[0] in ("RED", "REDG") for op in opcodes),
    }


def register_summary(registers: dict[str, int]) -> str:
    """The registers the notes compare, read from the table being written (what another
    Triton allocates differs: a number fixed in the notes would contradict its table)."""
    m = backend._COMPILED

    def capped(cap: int | None) -> str:
        return f"capped at {cap}" if cap else "uncapped"

    gather = [f"{registers['gather: scatter']} visiting {m.gather_near} near boxes at a time, "
              f"{capped(m.gather_registers)} (the default), {registers['gather: scatter, uncapped registers']} "
              "uncapped"]  # fmt: skip
    for count in (1, 2, 8):
        name = f"gather: scatter, {count} near box{'es' if count > 1 else ''} at a time"
        gather.append(f"{registers[name]} at {count}")
    lift = "finalize: dense with the gather's lift"
    return (
        f"Registers per thread here (triton {triton.__version__}): the gather's scatter {', '.join(gather)}; "
        f"the dense finalize {registers['finalize: dense']} without the gather's lift, {registers[lift]} with it "
        f"({capped(m.finalize_registers)}, the default), {registers[lift + ', uncapped registers']} with it "
        f"uncapped and {registers[lift + ', 4 near boxes at a time']} with it four boxes at a time."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    m = backend._COMPILED
    rows, registers = [], {}
    for name, fn, constexprs in kernels():
        r = resources(compile_cubin(fn, constexprs))
        registers[name] = r["registers"]
        threads = constexprs.get("num_warps", m.num_warps) * 32
        fit = 65536 // max(r["registers"] * threads, 1)
        rows.append(f"| {name} | {r['registers']} | {r['spill_bytes']} | {r['stack']} | {r['instructions']} | "
                    f"{r['in_loops']} | {r['atomic_loop'] or '-'} | {r['fences']} / {r['awaited_atomics']} / "
                    f"{r['reductions']} | {fit} |")  # fmt: skip
        print(rows[-1], flush=True)
    # The notes explain the table; every count in them is read from it, as the compiler
    # at hand allocates (Triton 3.6 and 3.9 give several kernels different register counts).
    header = [
        "# Triton kernels compiled for sm_90 (no GPU needed)",
        "",
        f"triton {triton.__version__}; {m.num_warps} warps per program (the scan {backend.SCAN_WARPS}); "
        f"block sizes {m}. "
        "`python benchmarks/kernel_resources.py` (cuobjdump -res-usage / -sass on the cubin). "
        "The pair kernels run capped (Triton's `maxnreg`, `pair_registers` above; the H200 sweeps "
        "of run6 and run8 timed the caps): a capped kernel keeps its extra values in a local-memory "
        "stack frame, so more programs fit an SM for a few more instructions and L1-cached loads, "
        "which paid on the H200 "
        "(benchmarks/results/gpu_h200/run6/sweep.txt). Atomics are relaxed (`triton_assign`'s docstring): "
        "with Triton's default acq_rel each atomic of the scatter and the lift came with a fence (followed "
        "by CCTL.IVALL, dropping the L1 cache) and waited for its result, where the last column counts "
        "fire-and-forget ones. Most of the finalize's code runs only where it is needed: its blocks build "
        "the anchors' boxes (the level walk, with its integer divisions) only when a rule needs them "
        "(crowd regions, border, padding) or the block encodes a positive, and the sparse pass's blocks "
        "with nothing to list exit after their first two loads; a COCO-like image's other blocks branch "
        "past the level walk to the key, the labels and the stores. The pair walk's searches over the "
        "prefix sums take one vector load per step: each persistent program's start a BLOCK_P-ary search "
        "(2-3 dependent loads for a batch, where a binary search took 15-20), each chunk's last segment a "
        "32-entry window (one load where galloping took 2 x log2 of the segments spanned). The gather "
        "tests an image's boxes 128 at a time against each block's two bounding boxes and visits the "
        "near ones a few at a time (`gather_near`): more at a time share a box's reduction over the "
        "block's anchors and the loop's own work, for more registers. Its lift runs inside the finalize "
        "(the rows 'with the gather's lift'); it visits few (box, block) pairs (`bench_gpu.py --pairs`), and "
        "the finalize is bound by its writes. Both load a generated grid's anchors (`load_anchors`: built "
        "once per device and canvas, 3.2 MB for RetinaNet at 800 x 1344, L2-resident) rather than build "
        "each block's from the level tables, and both run capped (`gather_registers`, and "
        "`finalize_registers` for the finalize that lifts): together 0.88x the gather's solve time "
        "(geometric mean of 7 points) on the H200 (benchmarks/results/gpu_h200/run12/combos/sweep.txt). "
        "The rows 'matching inline' are a variant not yet timed (`inline_match`): the finalize runs the "
        "gather's search itself, under the gather's cap, and the gather only folds the box keys, so no "
        "per-anchor record passes between them. The gather writes the records of the blocks near a box "
        "only, and a flag per block that the finalize reads before them (`skip_empty`, not yet timed; "
        "the rows 'every block's records' and the finalize's rows without 'where flagged' or 'the gather's "
        "lift' are without it). The row 'a lone near box visited alone' is a variant not yet timed "
        "(`lone_visits`): a step's last near box, where it would be alone in its tile, visited as a "
        "[BLOCK_A] pass. 'Innermost loop with an atomic' is the smallest loop "
        "holding one, the per-visit work: the gather's pass over its near boxes (`gather_near` at a time, "
        "with the fold of their best IoUs), the pair walk's chunk; the rows 'fold alone' compile "
        "`low_quality` as a constant, so that loop is one mode's path (the lift modes fold a 32-bit IoU, "
        "ssd_forced a 64-bit key that names the anchor). The scan is one program per image, a chain of "
        "dependent instructions per thread: in int32 and over 16 warps (`triton_backend.SCAN_STEPS`) each "
        "thread's chain is about a third of what it was in int64 over 4 warps (Triton 3.9: 3,960 SASS "
        "instructions and 251 registers; 3.6: 4,008 and 255; ~11 us a call on the H200 whatever the batch, "
        "run12), with 4 warps to interleave on each "
        "scheduler where there was one; not yet timed. " + register_summary(registers),
        "",
        "| kernel | registers / thread | spill bytes | stack bytes | SASS instructions | of them in loops | "
        "innermost loop with an atomic | fences (MEMBAR) / awaited atomics (ATOM) / fire-and-forget (RED) | "
        "programs per SM by registers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    path = Path(args.out) / "kernel_resources.md"
    write_text(path, "\n".join(header + rows) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
