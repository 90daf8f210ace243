"""The ``triton`` backend: check, allocate, launch (DESIGN §5).

``solve(problem) -> Targets`` gives the dense targets before sampling (``api.assign``
samples and restores dropped indices); ``solve_sparse(problem) -> SparseTargets``
writes the sparse form directly, without dense targets. The kernels and the design
live in ``triton_assign``; this module turns a ``Problem`` into launches. By default
(``_Meta.matching = "gather"``):

1. ``gather_kernel``: per block of anchors, the boxes near it, each anchor's best box and,
   for the low-quality modes, each box's best IoU (for a problem that left the check to
   it, it also checks the gt boxes and the ignore boxes);
2. ``finalize_kernel``: the lift (low-quality modes), then dense targets; or counts,
   ``scan_kernel`` (each image's rows and the images' offsets), sparse lists, sized from
   the recent batches' rows per image and read back once at the end (two totals: the
   rare batch that overflows is written again, into lists of its own size; and the flag
   of the boxes' check).

The pair walk (``matching = "walk"``, the baseline ``gpu_sweep.py`` times) does 1 as
``segments_kernel`` and a ``cumsum`` (the candidate rectangles and their chunk order),
``pairs_kernel`` (scatter: every overlapping pair, into per-anchor and per-box keys) and,
for the low-quality modes, ``pairs_kernel`` (lift). ssd_forced keeps ``segments_kernel``
for its box rows and ``forced_kernel`` with either matching.

One launch per stage for the whole ragged batch. Tensors must be on a CUDA device, or
on the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI runs it).

Exactness: labels and matched indices equal the reference bit for bit (float32 IoU in
torchvision's order, IEEE division, no FMA contraction). Deltas go through ``log``,
whose last bit may differ between libraries: they agree with the reference within
``rtol = atol = 1e-6`` under the interpreter; on GPU the tests allow 1e-5. Encode settings
at their extremes magnify that bit (a mean cancelling most of a log, divided by a std of
1e-6: a difference of 0.007 in dw of 210); labels never depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    from triton.runtime.interpreter import InterpretedFunction
except ModuleNotFoundError as missing:  # not a dependency of ours: CUDA builds of torch bring it
    if missing.name is None or missing.name.split(".")[0] != "triton":
        raise
    raise ModuleNotFoundError(
        "the triton backend needs the triton package, which is not installed here: CUDA builds of "
        "torch on Linux install it; elsewhere pip install 'tritarget[gpu]' (or the CPU backend: 'cpu')",
        name="triton",
    ) from missing

from . import triton_assign
from .anchors import AnchorGrid
from .boxes import box_area
from .problem import CheckBoxesFirst, Problem, canvas_limits
from .streams import stream_key
from .targets import SparseTargets, Targets
from .triton_assign import (
    BORDER_OFF,
    BORDER_POST,
    BORDER_PRE,
    LEVEL_FLOAT_FIELDS,
    LEVEL_INT_FIELDS,
    LOW_QUALITY_CODES,
    OUTPUT_COUNT,
    OUTPUT_DENSE,
    OUTPUT_SPARSE,
    SHAPE_INT_FIELDS,
    STAGE_LIFT,
    STAGE_SCATTER,
)
from .triton_graphs import Graphs, capacity
from .triton_launch import Launcher

__all__ = ["CHECKS_GT_BOXES", "solve", "solve_sparse", "candidate_pairs", "interpreting"]

# Both check the gt boxes (and the ignore boxes left with them) in gather_kernel
# (segments_kernel with the walk) and read the flag back once, after their launches
# (``problem.CheckBoxesFirst``): solve_sparse with the lists' lengths, solve alone.
# build_problem's check of boxes on a GPU would read back their extremes before the
# launches, after five more device operations.
CHECKS_GT_BOXES = ("solve", "solve_sparse")


@dataclass(frozen=True)
class _Meta:
    """Block sizes: anchors per finalize program, pairs per chunk, ignore boxes per tile,
    box rows per segments program, persistent pair programs per SM (compiled) or in all
    (interpreter), warps, a cap on the pair kernels' registers per thread (None: the
    compiler's choice, 80 on sm_90; ``benchmarks/results/kernel_resources.md``),
    whether the scatter loads each word before its atomic (``triton_assign._chunk``),
    how stages 2-3 find the overlapping pairs: "gather" (``gather_kernel``: per block of
    anchors, its image's boxes; the default since the H200 timed both: faster calls at
    every point of run10's sweep, dense and sparse, but more GPU time than the walk on
    large batches of few boxes, run11) or "walk" (the candidate rectangles' pairs, one
    ``atomic_max`` each; kept as the baseline gpu_sweep.py times), how many boxes the
    gather tests at once, how many near ones it visits at once, a cap on its registers
    (None: the compiler's choice), and how many near boxes the gather's lift (inside the
    finalize) visits at once: one on a GPU, where few boxes reach their maximum in a
    block (bench_gpu.py --pairs) and a wider tile would cost the finalize registers; and
    a cap on the registers of a finalize that lifts (None: the compiler's choice, 56 on
    sm_90 under Triton 3.6 and 9 programs resident per SM, against 12 at the cap of 40;
    the finalize without the lift takes 34, 15 programs: the pass is bound by its memory
    traffic); whether the gather and the
    finalize load a generated grid's anchors (``problem.anchors``, built once per device
    and canvas) instead of building each block's from the level tables in every image;
    and whether the finalize matches each block itself (``inline_match``, with the gather
    only: the gather's search in ``finalize_kernel``, INLINE, so that no per-anchor
    record is written and read back between the passes -- 16 bytes per anchor and image
    each way; the gather then runs only for the modes that lift, for its box keys, or to
    check unchecked boxes; for every mode but ssd_forced, whose marks live in the
    records); up to how many images ``solve`` and ``solve_sparse`` replay their
    launches as a CUDA graph (``triton_graphs``; 0: never, the default until a GPU run has
    timed the library's path: run10 and run12 timed a fixed problem's replay, 2 us of
    host time against ~120); and whether the gather and the finalize take every image's last blocks,
    the coarsest level's, first (``triton_assign._program_block``): the gather's counted
    work, list-scheduled on an H200's resident programs, ends 30% sooner at B = 8,
    G = 1,000 and 7% sooner at B = 32, G = 200 than in the grid's own order (``bench_gpu.py
    --pairs``; not yet timed on a GPU: gpu_sweep.py's "gather, grid order"); and whether
    the gather writes the records of the blocks near a box only, with a byte per block
    that tells the finalize which to read (``skip_empty``: 83% of a COCO-like image's
    blocks are near none, 62% without the threshold pruning, ``bench_gpu.py --pairs``;
    not yet timed on a GPU: gpu_sweep.py's "gather, every record"); and whether a step's
    last near box, where it would be alone in its tile of ``gather_near``, is visited
    alone (``lone_visits``, a variant: about half the tile's instructions, for 79% of the
    tile visits on COCO-like images and 21% at G = 200, ``bench_gpu.py --pairs``; run12
    timed one box at a time at 0.76x the gather's solve at B = 32, G ~ 7 and 1.19x at
    G = 1,000); and whether the gather's matching
    skips the pairs below the thresholds that no target depends on (``threshold_prune``:
    ``floor_kernel``; 0.20-0.64x the overlapping pairs at G = 200 instead of 1.86x,
    ``bench_gpu.py --pairs``; not yet timed on a GPU: gpu_sweep.py's "gather, every near
    box")."""

    block_a: int
    block_p: int
    block_g: int
    segment_rows: int
    pair_programs: int
    num_warps: int
    pair_registers: int | None = None
    scatter_precheck: bool = True
    matching: str = "gather"
    gather_boxes: int = 128
    gather_near: int = 4
    gather_registers: int | None = None
    lift_near: int = 1
    finalize_registers: int | None = None
    load_anchors: bool = False
    inline_match: bool = False
    graph_batches: int = 0
    heavy_first: bool = True
    skip_empty: bool = True
    lone_visits: bool = False
    threshold_prune: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.gather_boxes <= 256:  # the near lists hold a box's place in its step in a byte
            raise ValueError(f"gather_boxes: 1 to 256 boxes tested at once, got {self.gather_boxes}")
        if not 1 <= self.block_a < 2**15:  # finalize_kernel counts a block's ignored anchors in bits 16-30
            raise ValueError(f"block_a: 1 to 2^15 - 1 anchors per block, got {self.block_a}")


# Compiled, the gather's three (run12, benchmarks/results/gpu_h200/run12/combos/sweep.txt):
# anchors loaded, the gather capped at 64 registers and the lifting finalize at 40 beat
# the gather as run10 left it at 5 of 7 points for solve and 6 for solve_sparse, 0.88x
# and 0.94x its time (geometric means; each alone 0.94-1.01x), and the gather so set
# beat the walk in 15 of the 16 cells of B = 1-64 x G ~ 7-1,000 (all but one image of
# 1,000 boxes), where the gather as it was had lost 4-5. 128 anchors per finalize
# program (one per thread at 4 warps), testing crowd
# regions 2 at a time: the [BLOCK_G, BLOCK_A] tile of that loop set the finalize's
# registers (8 per tile: 56-67 per thread, 7-9 programs resident per SM; 2: 35-40,
# 12-14; kernel_resources.md), and an image has few crowd regions. Pairs: the
# H200 sweeps (benchmarks/results/gpu_h200/run6/sweep.txt) put 256 pairs per chunk, 32
# persistent programs per SM and a cap of 64 registers first over B = 32 at G = 200 and
# B = 8 at G = 1000 (solve 3.08 -> 2.49 ms and 3.15 -> 2.54 ms against 80 registers and
# 16 programs; G ~ 7 is launch-bound, 0.30-0.60 ms in every cell): the pair walk is bound
# by the latency of its dependent loads, and 64 registers let 8 programs of 4 warps stay
# resident per SM instead of 6, for 2.6% more instructions (kernel_resources.md).
# Interpreter: every tl operation is one numpy call whatever its size, so larger blocks
# mean fewer Python-level steps (CI time); 3 pair programs still exercise the split.
_COMPILED = _Meta(block_a=128, block_p=256, block_g=2, segment_rows=2, pair_programs=32, num_warps=4,
                  pair_registers=64, gather_registers=64, finalize_registers=40, load_anchors=True)  # fmt: skip
_INTERPRETED = _Meta(block_a=2048, block_p=4096, block_g=64, segment_rows=256, pair_programs=3, num_warps=4,
                     gather_boxes=64, gather_near=8, lift_near=8)  # fmt: skip

# CUDA limits grid axes 1 and 2 to 65,535 programs: the images lie on axis 1 in the
# grid's own order (``triton_assign._program_block``), the blocks per image heavy first.
_MAX_GRID_Y = 65_535
_MAX_IMAGES = _MAX_GRID_Y
# Anchor and box indices are int32 in the kernels and packed into 31 bits.
_MAX_INDEX = 2**31 - 1 - _INTERPRETED.block_a
_INT32 = (-(2**31), 2**31 - 1)


# Triton decides once, when ``triton_assign`` defines the kernels (this module's import),
# whether they are interpreted (TRITON_INTERPRET, as Triton parses it, or its knob): what
# it decided, read off a kernel, not on each of a call's seven lookups.
_INTERPRETING = isinstance(triton_assign.finalize_kernel, InterpretedFunction)


# The kernels, launched through their compiled variants once known (``triton_launch``).
segments_kernel = Launcher(triton_assign.segments_kernel, _INTERPRETING)
pairs_kernel = Launcher(triton_assign.pairs_kernel, _INTERPRETING)
lift_segments_kernel = Launcher(triton_assign.lift_segments_kernel, _INTERPRETING)
forced_kernel = Launcher(triton_assign.forced_kernel, _INTERPRETING)
floor_kernel = Launcher(triton_assign.floor_kernel, _INTERPRETING)
gather_kernel = Launcher(triton_assign.gather_kernel, _INTERPRETING)
finalize_kernel = Launcher(triton_assign.finalize_kernel, _INTERPRETING)
scan_kernel = Launcher(triton_assign.scan_kernel, _INTERPRETING)
# Every kernel above by its name here: what tools switch (gpu_sweep's direct launches)
# or record (the tests' launches) by name.
LAUNCHERS = ("segments_kernel", "pairs_kernel", "lift_segments_kernel", "forced_kernel", "floor_kernel",
             "gather_kernel", "finalize_kernel", "scan_kernel")  # fmt: skip


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when the
    kernels were defined)."""
    return _INTERPRETING


def _cdiv(numerator: int, denominator: int) -> int:
    # Plain ints: triton.cdiv is a constexpr function, microseconds per host call.
    return -(-numerator // denominator)


# Shape rows per segments_kernel tile at least: one compilation for every preset (SSD's
# 4-6 shapes per cell over 6 levels, RetinaNet's 45 rows, YOLO's 9), where a tile sized to
# each config compiled the kernel again for each family, in the middle of a service's
# traffic. Masked lanes cost nothing that matters: the kernel takes ~4 us a batch.
_SHAPE_TILE = 64
# And at most, the rest in more programs: a config may have thousands (16 levels of up to
# 64 sizes x 64 ratios), and one tile for them all was past Triton's largest block (2^20
# elements, the interpreter's 256 rows x 8,192 shapes) or a compiled program's registers.
_SHAPE_TILE_MAX = 1024


def _even(count: int) -> int:
    """``count`` rounded up to even: int64 parts of a buffer that start 16-byte aligned."""
    return count + count % 2


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _meta() -> _Meta:
    return _INTERPRETED if interpreting() else _COMPILED


def _check(problem: Problem, offsets: bool = True) -> None:
    """Refuse what the kernels cannot run: a problem's tensors of the wrong dtype or device,
    too many images, anchors or boxes. ``offsets``: its offsets and image sizes too (made
    by ``HostInts``, always int64 on the problem's device; looking copies them there)."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a tritarget.kernels.problem.Problem, got {type(problem).__name__}")
    device = problem.device
    if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (got tensors on {device}); on a machine without a GPU use "
            "backend 'cpu', or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors"
        )
    named = {  # name -> (tensor, the dtypes it may have)
        "gt_boxes": (problem.gt_boxes, (torch.float32,)),
        "ignore_boxes": (problem.ignore_boxes, (torch.float32,)),
    }
    if offsets:
        for name in ("gt_offsets", "ignore_offsets", "image_sizes"):
            named[name] = (getattr(problem, name), (torch.int64,))
    if problem.grid is None:
        named["anchors"] = (problem.anchors, (torch.float32,))
    if problem.gt_classes is not None:
        named["gt_classes"] = (problem.gt_classes, (torch.int32, torch.int64))
    for name, (tensor, dtypes) in named.items():
        if tensor.device != device:
            raise ValueError(f"problem.{name}: on {tensor.device}, but gt_boxes are on {device}")
        if tensor.dtype not in dtypes:
            raise TypeError(f"problem.{name}: expected {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    batch = problem.batch_size
    if not 1 <= batch <= _MAX_IMAGES:
        raise ValueError(f"batch size {batch}: the triton backend takes 1 to {_MAX_IMAGES} images per call")
    if problem.num_anchors > _MAX_INDEX:
        raise ValueError(f"{problem.num_anchors} anchors per image: the triton backend takes at most {_MAX_INDEX}")
    if problem.gt_boxes.shape[0] > _MAX_INDEX:
        raise ValueError(f"{problem.gt_boxes.shape[0]} boxes: the triton backend takes at most {_MAX_INDEX} per call")
    if problem.grid is not None and problem.grid.num_anchors != problem.num_anchors:
        raise ValueError(
            f"problem.grid has {problem.grid.num_anchors} anchors but problem.anchors has {problem.num_anchors}"
        )
    if not _INT32[0] <= problem.config.background_class <= _INT32[1]:
        raise ValueError(f"config.background_class {problem.config.background_class} does not fit int32")
    match = problem.config.match
    if match.low_quality not in LOW_QUALITY_CODES:
        raise ValueError(f"config.match.low_quality {match.low_quality!r} is not supported by the triton backend")
    if match.border_order not in ("pre_match", "post_match"):
        raise ValueError(f"config.match.border_order {match.border_order!r} is not supported by the triton backend")


@dataclass(frozen=True)
class _Tables:
    """A grid's tables on one device, and the sizes the kernels need."""

    level_int: torch.Tensor  # [L, LEVEL_INT_FIELDS] int64: finalize_kernel's anchors by index
    level_float: torch.Tensor  # [L, LEVEL_FLOAT_FIELDS] float32
    cells: torch.Tensor  # [R, 4] float32, R = sum over levels of the cell shapes
    shape_int: torch.Tensor  # [R, SHAPE_INT_FIELDS] int32: the pair kernels' rows per (level, shape)
    shape_float: torch.Tensor  # [R, SHAPE_FLOAT_FIELDS] float32
    center_div: int  # 1 if centres are (i + offset) / factor (one layout: every level alike)
    search_steps: int  # binary-search steps over a level's rows or columns


@functools.lru_cache(maxsize=32)
def _level_tables(grid: AnchorGrid, device: torch.device, stream: int | None) -> _Tables:
    """The grid's tables on ``device``, one copy per CUDA stream (see ``streams``). Factors
    and scales rounded to float32 exactly as ``anchors._centers`` and
    ``anchors._level_anchors`` round them (``torch.tensor(value, dtype=float32)``)."""
    ints, floats, cells, shape_ints, shape_floats = [], [], [], [], []
    for level, start in zip(grid.levels, grid.level_starts):
        shapes, height, width = level.cells.shape[0], level.height, level.width
        ints.append([start, height, width, shapes, len(shape_ints), int(level.center_op == "div")])
        scale_x = 1.0 if level.scale_x is None else level.scale_x
        scale_y = 1.0 if level.scale_y is None else level.scale_y
        # The candidate rectangles rely on anchor edges growing with the cell index.
        if min(level.factor_x, level.factor_y, scale_x, scale_y) <= 0:
            raise ValueError(f"anchor grid level {len(ints) - 1}: factors and scales must be positive")
        floats.append([level.offset, level.factor_x, level.factor_y, scale_x, scale_y])
        cells.append(level.cells.to(torch.float32))
        for k in range(shapes):
            if grid.shape_major:  # [K, H, W]
                shape_ints.append([start + k * height * width, 1, width, width, height])
            else:  # [H, W, K]
                shape_ints.append([start + k, shapes, width * shapes, width, height])
            shape_floats.append([level.offset, level.factor_x, level.factor_y, scale_x, scale_y])
    center_ops = {level.center_op for level in grid.levels}
    if len(center_ops) != 1:
        raise ValueError(f"anchor grid: levels mix centre formulas {sorted(center_ops)}")

    cells_on_device = torch.cat(cells).contiguous().to(device)

    def table(rows: list, dtype: torch.dtype, width: int) -> torch.Tensor:
        # Through float64, so float32 columns round once, as torch.tensor(value, float32) does.
        exact = torch.tensor(rows, dtype=torch.float64 if dtype.is_floating_point else torch.int64, device="cpu")
        return exact.to(dtype).reshape(-1, width).contiguous().to(device)

    tables = _Tables(
        level_int=table(ints, torch.int64, LEVEL_INT_FIELDS),
        level_float=table(floats, torch.float32, LEVEL_FLOAT_FIELDS),
        cells=cells_on_device,
        shape_int=table(shape_ints, torch.int32, SHAPE_INT_FIELDS),
        # Offset, factors and scales, then the cell anchor itself (already float32).
        shape_float=torch.cat([table(shape_floats, torch.float32, 5), cells_on_device], dim=1).contiguous(),
        center_div=int(center_ops == {"div"}),
        search_steps=max(max(lv.height, lv.width) for lv in grid.levels).bit_length() + 1,
    )
    return tables


@functools.lru_cache(maxsize=32)
def _block_bounds(grid: AnchorGrid, block_a: int, device: torch.device, stream: int | None) -> torch.Tensor:
    """[blocks, BLOCK_BOUNDS] float32 per block of ``block_a`` consecutive anchors: the
    bounding boxes (x1, y1, x2, y2) of its two parts, then the range of its anchors' areas,
    from the anchors the kernels generate (``AnchorGrid.materialize`` gives them bit for
    bit): the gather tests boxes against them before generating a block's anchors.

    The block is cut in two where the parts' bounding boxes have the least area in all. A
    block that runs past the end of a row of cells takes in the start of the next row, and
    one bounding box of both spans the whole width (on the coarse levels most blocks do):
    at G = 200 it listed 30.7 boxes per block where two parts list 25.1 and the boxes that
    overlap one of the block's anchors are 24.7 (``bench_gpu.py --pairs``). Computed on
    ``device``: the scans over every block take tens of milliseconds on a CPU."""
    anchors = grid.materialize().to(device)
    blocks = _cdiv(anchors.shape[0], block_a)
    # The last block filled up with copies of its last anchor: its bounds stay its own.
    filler = anchors[-1:].expand(blocks * block_a - anchors.shape[0], 4)
    blocked = torch.cat([anchors, filler]).view(blocks, block_a, 4)
    # Bounding boxes of every block's first i + 1 anchors and of its last block_a - i.
    head = torch.cat([blocked[..., :2].cummin(1).values, blocked[..., 2:].cummax(1).values], 2)
    tail = blocked.flip(1)
    tail = torch.cat([tail[..., :2].cummin(1).values, tail[..., 2:].cummax(1).values], 2).flip(1)
    head, tail = head[:, :-1], tail[:, 1:]  # the cut after anchor i, for i < block_a - 1
    areas = box_area(head) + box_area(tail)
    cut = areas.argmin(1)[:, None, None].expand(blocks, 1, 4)
    area = box_area(blocked)
    bounds = [head.gather(1, cut)[:, 0], tail.gather(1, cut)[:, 0], area.amin(1)[:, None], area.amax(1)[:, None]]
    return torch.cat(bounds, 1).contiguous()


def _border_limits(problem: Problem) -> torch.Tensor:
    """[B, 3] float32 (-b, w + b, h + b): the reference compares float32 anchors with
    Python floats, which torch rounds to float32; ``w + b`` itself is a double sum."""
    border = problem.config.match.allowed_border
    sizes = problem.image_sizes.to(torch.float64)
    low = torch.full_like(sizes[:, 0], -border)
    return torch.stack([low, sizes[:, 1] + border, sizes[:, 0] + border], dim=1).to(torch.float32).contiguous()


def _pad_table(problem: Problem, device: torch.device) -> torch.Tensor:
    """[B, R, 2] int32: each image's valid rows and columns (``problem.valid_cells``, per
    level) repeated for every shape row of the level, as the pair kernels index them."""
    shapes = torch.tensor([level.cells.shape[0] for level in problem.grid.levels], device="cpu")
    return problem.valid_cells.repeat_interleave(shapes, dim=1).contiguous().to(device)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU (not the current one); nothing to select on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_kwargs(num_warps: int | None = None) -> dict:
    # IEEE semantics need each mul and add rounded on its own: no FMA contraction.
    return {"num_warps": num_warps or _meta().num_warps, "enable_fp_fusion": False}


# scan_kernel's steps (block counts of an image, then images, at once) and warps. One
# program per image scans its block counts (RetinaNet's 1,575 in one step), each thread a
# chain of dependent instructions: with 4 warps, 2,664 SASS instructions a thread and no
# other warp on its scheduler to hide their latency (the int64 scan before, 3,960 and
# 251 registers, took ~11 us whatever the batch on the H200, run12); with 16 warps and
# the images' scan 256 wide, 1,192 and 75 registers (benchmarks/kernel_resources.py).
SCAN_STEPS = dict(BLOCK=2048, IMAGES=256)
SCAN_WARPS = 16


@functools.lru_cache(maxsize=8)
def _pair_programs(device: torch.device) -> int:
    meta = _meta()
    if device.type != "cuda":
        return meta.pair_programs
    return meta.pair_programs * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=32)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor for a pointer the kernel does not read under its switches (one per
    device and dtype: allocating them per call cost host time)."""
    return torch.empty(1, dtype=dtype, device=device)


class _Launch:
    """The kernel arguments shared by the stages of one problem."""

    def __init__(self, problem: Problem) -> None:
        _check(problem)
        self.problem = problem
        self.meta = _meta()
        self.device = device = problem.device
        self._placeholders = {
            dtype: _placeholder(device, dtype) for dtype in (torch.float32, torch.int32, torch.int64, torch.uint8)
        }
        config = problem.config
        match = config.match
        self.match, self.encode = match, config.encode
        self.batch, self.num_anchors = problem.batch_size, problem.num_anchors
        self.num_rows = problem.gt_boxes.shape[0]
        # int32, as the kernels read them (one kernel variant whatever the labels' dtype)
        self.gt_classes = None if problem.gt_classes is None else problem.gt_classes.to(torch.int32)
        self.generate = problem.grid is not None
        self.build_anchors = self.generate and not self.meta.load_anchors
        if self.generate:
            tables = _level_tables(problem.grid, device, stream_key(device))
            self.level_int, self.level_float, self.cells = tables.level_int, tables.level_float, tables.cells
            self.shape_int, self.shape_float = tables.shape_int, tables.shape_float
            # Built once per device and canvas (build_problem's cache), read as explicit ones are.
            self.anchors = problem.anchors if self.meta.load_anchors else self._placeholder(torch.float32)
            self.num_levels, self.num_shapes = tables.level_int.shape[0], tables.shape_int.shape[0]
            self.center_div, self.search_steps = tables.center_div, tables.search_steps
        else:
            self.level_int, self.shape_int = self._placeholder(torch.int64), self._placeholder(torch.int32)
            self.level_float = self.cells = self.shape_float = self._placeholder(torch.float32)
            self.anchors = problem.anchors.contiguous()
            self.num_levels = self.num_shapes = self.search_steps = 1
            self.center_div = 0
        self.use_ignore = match.ignore_iof_thr > 0 and problem.ignore_boxes.shape[0] > 0
        # Read by the rules, and by the box check (an unchecked problem's kernels test them).
        self.unchecked = _unchecked(problem)
        self.ignore = problem.ignore_boxes if self.use_ignore or self.unchecked else self._placeholder(torch.float32)
        if match.allowed_border < 0:
            self.border_rule, self.border = BORDER_OFF, self._placeholder(torch.float32)
        else:
            self.border_rule = BORDER_PRE if match.border_order == "pre_match" else BORDER_POST
            self.border = _border_limits(problem)
        if problem.valid_cells is None:
            self.pad_rule, self.pad = 0, self._placeholder(torch.int32)
        else:
            self.pad_rule, self.pad = 1, _pad_table(problem, device)
        self.gt_boxes = problem.gt_boxes.contiguous()
        self.low_quality = LOW_QUALITY_CODES[match.low_quality]
        # The finalize matches each block itself (``_Meta.inline_match``).
        self.inline = (self.meta.matching == "gather" and self.meta.inline_match
                       and self.low_quality != LOW_QUALITY_CODES["ssd_forced"])  # fmt: skip
        # The gather's records only where a box is near, and a flag per block (``gather``).
        self.skip_empty = self.meta.matching == "gather" and self.meta.skip_empty and not self.inline
        self.lone = self.meta.lone_visits and self.meta.gather_near > 1  # a tile of one is alone anyway
        self.shape_major = int(self.generate and problem.grid.shape_major)
        self.rules = (int(self.use_ignore), int(match.ignore_iof_wrt_anchor), self.border_rule, self.pad_rule)
        self.num_blocks = _cdiv(self.num_anchors, self.meta.block_a)
        # Heavy first, the blocks lie on grid axis 1 (``_program_block``): an image of more
        # blocks (8.4 M anchors at 128 a block) runs in the grid's own order.
        self.heavy_first = self.meta.heavy_first and self.num_blocks <= _MAX_GRID_Y
        self.block_grid = (self.batch, self.num_blocks) if self.heavy_first else (self.num_blocks, self.batch)
        # The gather's box keys, near-box lists and block bounds, which the finalize's lift
        # reads (``gather``); None: the finalize reads the marks from the work memory.
        self.lift: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def leaves_boxes_unchecked(self) -> bool:
        """Whether no launch would check the boxes of an unchecked problem: none runs
        without anchors, and with the walk ``segments_kernel``, which checks the ignore
        boxes with the gt boxes, none without gt boxes."""
        ignore = 0 if self.problem.ignore_boxes_checked else self.problem.ignore_boxes.shape[0]
        if self.num_anchors == 0:
            return self.num_rows + ignore > 0
        return self.meta.matching != "gather" and self.num_rows == 0 and ignore > 0

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        return self._placeholders[dtype]  # a call makes up to 21 of these lookups

    def scratch_words(self) -> int:
        """The int64 words of zeroed memory the match stage fills (``match_pairs``'s
        ``zeroed``): the walk's prefix sums, box keys and segment maxima (``segments``), the
        gather's box keys where its mode ranks each box's anchors (not for ``none``)."""
        if self.meta.matching == "gather":
            return 0 if self.low_quality == LOW_QUALITY_CODES["none"] else self.num_rows
        return self._segment_layout()[2]

    def _segment_layout(self) -> tuple[int, int, int]:
        """Where the box keys and segment maxima start in ``segments``' zeroed memory, and
        its words in all. Each part starts 16-byte aligned whatever the counts, as the
        kernels are specialised on their pointers' alignment (one compilation, not one per
        parity)."""
        num_segments = self.num_rows * self.num_shapes
        keys_at = _even(num_segments + 1)
        seg_max_at = keys_at + _even(self.num_rows)
        return keys_at, seg_max_at, seg_max_at + (num_segments + 1) // 2

    def segments(
        self, invalid: torch.Tensor | None = None, zeroed: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The candidate structure, S = N * shape rows segments: rect [S, 4] int32, pairs
        [S] int64 and prefix [S + 1] int64 (its exclusive cumsum), row_image and row_box
        [N] int32, and the zeroed box_key [N] int64 and seg_max [S] int32 the pair kernels
        fill, all three in ``zeroed`` (``scratch_words``; allocated here when None: each
        memset is a launch, which costs host time). ``invalid`` (int64, zeroed): set to 1
        if some gt box or ignore box may be invalid (the check a problem built with
        ``check_gt_boxes=False`` leaves to the backend)."""
        rows, num_segments = self.num_rows, self.num_rows * self.num_shapes
        keys_at, seg_max_at, words = self._segment_layout()
        if zeroed is None:
            zeroed = torch.zeros(words, dtype=torch.int64, device=self.device)
        out = {
            "rect": torch.empty(num_segments, 4, dtype=torch.int32, device=self.device),
            "prefix": zeroed[: num_segments + 1],
            "pairs": torch.empty(num_segments, dtype=torch.int64, device=self.device),
            "row_image": torch.empty(rows, dtype=torch.int32, device=self.device),
            "row_box": torch.empty(rows, dtype=torch.int32, device=self.device),
            "box_key": zeroed[keys_at : keys_at + rows],
            "seg_max": zeroed[seg_max_at:].view(torch.int32)[:num_segments],
        }
        check = invalid is not None
        if check:
            canvas = canvas_limits(self.problem.canvas, self.device, stream_key(self.device))
        else:
            canvas, invalid = self._placeholder(torch.float32), self._placeholder(torch.int64)
        shapes = min(max(_SHAPE_TILE, _next_power_of_2(self.num_shapes)), _SHAPE_TILE_MAX)
        segments_kernel[(_cdiv(rows, self.meta.segment_rows), _cdiv(self.num_shapes, shapes))](
            self.gt_boxes, self.problem.gt_offsets, self.shape_int, self.shape_float, out["rect"], out["pairs"],
            out["row_image"], out["row_box"], canvas, invalid, self.ignore, rows, self.batch, self.num_anchors,
            self.num_shapes, self.center_div, self.search_steps, max(self.batch - 1, 1).bit_length() + 1,
            int(check), self.problem.ignore_boxes.shape[0] if check else 0, GENERATE=self.generate,
            ROWS=self.meta.segment_rows, SHAPES=shapes, **_launch_kwargs(),
        )  # fmt: skip
        torch.cumsum(out["pairs"], 0, out=out["prefix"][1:])
        return out

    def match_pairs(
        self, work: torch.Tensor, invalid: torch.Tensor | None = None, zeroed: torch.Tensor | None = None
    ) -> None:
        """Stages 1-3: fill ``work`` ([B, A, 4] 32-bit words, from ``work()``) with keys and
        marks; with ``invalid``, check the gt and ignore boxes too (``segments``). ``zeroed``: the
        stage's zeroed memory (``scratch_words``), part of the caller's; None: its own."""
        if self.meta.matching == "gather":
            self.gather(work, invalid, zeroed)
            return
        if self.num_rows == 0 or self.num_anchors == 0:
            return
        candidates = self.segments(invalid, zeroed)
        rect, prefix, row_image = candidates["rect"], candidates["prefix"], candidates["row_image"]
        box_key, seg_max = candidates["box_key"], candidates["seg_max"]
        num_segments = rect.shape[0]
        common = (
            self.gt_boxes, candidates["row_box"], row_image, rect, prefix, self.anchors, self.shape_int,
            self.shape_float, self.ignore, self.problem.ignore_offsets, self.border, self.pad, work, box_key, seg_max,
            num_segments, self.num_anchors, self.num_shapes, self.center_div, float(self.match.ignore_iof_thr),
            *self.rules, self.low_quality,
        )  # fmt: skip
        grid = (_pair_programs(self.device),)
        meta = dict(GENERATE=self.generate, BLOCK_P=self.meta.block_p)
        if self.meta.pair_registers is not None:  # fewer registers, more programs resident per SM
            meta["maxnreg"] = self.meta.pair_registers
        pairs_kernel[grid](*common, STAGE=STAGE_SCATTER, PRECHECK=self.meta.scatter_precheck, **meta,
                           **_launch_kwargs())  # fmt: skip
        if self.low_quality == LOW_QUALITY_CODES["ssd_forced"]:
            block = 128
            forced_kernel[(_cdiv(self.num_rows, block),)](
                self.problem.gt_offsets, row_image, box_key, work, self.num_rows, self.num_anchors,
                float(self.match.min_pos_iou), BLOCK=block, **_launch_kwargs(),
            )  # fmt: skip
        elif self.low_quality != LOW_QUALITY_CODES["none"]:
            # The lift walks only the rectangles where a box reaches its maximum: their
            # pair counts, the others zeroed, re-summed into the same prefix.
            pairs, block = candidates["pairs"], 1024
            lift_segments_kernel[(_cdiv(num_segments, block),)](
                rect, box_key, seg_max, pairs, num_segments, self.num_shapes, float(self.match.min_pos_iou),
                BLOCK=block, **_launch_kwargs(),
            )  # fmt: skip
            torch.cumsum(pairs, 0, out=prefix[1:])
            pairs_kernel[grid](*common, STAGE=STAGE_LIFT, **meta, **_launch_kwargs())

    def gather(
        self, work: torch.Tensor, invalid: torch.Tensor | None = None, zeroed: torch.Tensor | None = None
    ) -> None:
        """Stage 2 by ``gather_kernel``: writes each anchor's key and a zero mark into
        ``work`` (zeroed or not; ``skip_empty``, only in the blocks near a box, and a flag per
        block in the near lists' memory; matching inline, nothing: the finalize finds the keys, and
        the gather runs only for the box keys of the modes that lift and for the box
        check), and with ``invalid`` checks the gt and ignore boxes too; stage 3 is forced_kernel's
        marks for ssd_forced (``segments_kernel`` runs for its box rows per image), the
        finalize's lift for the modes that lift (``self.lift``).
        ``zeroed``: the box keys' zeroed memory (``scratch_words``); None: its own."""
        if self.num_anchors == 0:
            return
        forced = self.low_quality == LOW_QUALITY_CODES["ssd_forced"]
        candidates = self.segments() if self.num_rows > 0 and forced else None
        check = invalid is not None
        if check:
            canvas = canvas_limits(self.problem.canvas, self.device, stream_key(self.device))
        else:
            canvas, invalid = self._placeholder(torch.float32), self._placeholder(torch.int64)
        need, prune = self._pruning()
        if self.low_quality == LOW_QUALITY_CODES["none"]:
            box_key = self._placeholder(torch.int64)
        elif zeroed is not None:
            box_key = zeroed[: self.num_rows]
        else:
            box_key = torch.zeros(self.num_rows, dtype=torch.int64, device=self.device)
        # Each program's list of near boxes (a byte per anchor and image at 128 per block),
        # then skipping empty blocks, a byte per block: whether its records were written.
        lists = self.meta.gather_boxes + int(self.skip_empty)
        near = torch.empty(self.batch * self.num_blocks * lists, dtype=torch.uint8, device=self.device)
        if self.generate:
            bounds = _block_bounds(self.problem.grid, self.meta.block_a, self.device, stream_key(self.device))
        else:  # explicit anchors: each block loads its own
            bounds = self._placeholder(torch.float32)
        common = (
            self.gt_boxes, self.problem.gt_offsets, self.anchors, self.level_int, self.level_float, self.cells,
            self.ignore, self.problem.ignore_offsets, self.border, self.pad, work, box_key, near, bounds, canvas,
            invalid, need, self.num_anchors, self.num_levels, self.num_shapes, self.shape_major,
            float(self.match.ignore_iof_thr), *self.rules, self.low_quality, int(check), int(prune),
        )  # fmt: skip
        meta = dict(GENERATE=self.generate, BUILD_ANCHORS=self.build_anchors, BLOCK_A=self.meta.block_a,
                    BLOCK_G=self.meta.block_g, BOXES=self.meta.gather_boxes, NEAR=self.meta.gather_near,
                    RECORDS=not self.inline, SKIP_EMPTY=self.skip_empty, LONE=self.lone,
                    HEAVY_FIRST=self.heavy_first, **_launch_kwargs())  # fmt: skip
        if self.meta.gather_registers is not None:
            meta["maxnreg"] = self.meta.gather_registers
        # Matching inline, the finalize needs the gather only for box keys and box checks.
        if not self.inline or check or self.low_quality != LOW_QUALITY_CODES["none"]:
            gather_kernel[self.block_grid](*common, **meta)
        if forced and candidates is not None:
            block = 128
            forced_kernel[(_cdiv(self.num_rows, block),)](
                self.problem.gt_offsets, candidates["row_image"], box_key, work, self.num_rows, self.num_anchors,
                float(self.match.min_pos_iou), BLOCK=block, **_launch_kwargs(),
            )  # fmt: skip
        self.lift = box_key, near, bounds

    def _pruning(self) -> tuple[torch.Tensor, bool]:
        """What each box needs of the gather's matching (``floor_kernel``), and whether it
        prunes: a generated grid whose anchors no rule excludes (the floor's anchors would
        have to be included), targets that hold no IoU below the thresholds (max IoU) and
        no box of a negative anchor (detectron2's matched boxes), and its records kept
        (matching inline, the finalize matches alone)."""
        codes = LOW_QUALITY_CODES
        prune = (self.meta.threshold_prune and self.generate and not self.inline and self.num_rows > 0
                 and self.match.low > 0 and not self.problem.want_max_iou and self.low_quality != codes["detectron2"]
                 and not self.use_ignore and self.border_rule != BORDER_PRE and self.pad_rule == 0)  # fmt: skip
        if not prune:
            return self._placeholder(torch.float32), False
        need = torch.empty(self.num_rows, dtype=torch.float32, device=self.device)
        floor_kernel[(self.batch,)](
            self.gt_boxes, self.problem.gt_offsets, self.level_int, self.level_float, self.cells, need,
            self.num_levels, float(self.match.low), int(self.low_quality == codes["torchvision"]),
            BOXES=self.meta.gather_boxes, **_launch_kwargs(),
        )  # fmt: skip
        return need, True

    def finalize(self, output: int, work: torch.Tensor, **outputs: torch.Tensor) -> None:
        """Stage 4 for one OUTPUT_* mode; outputs the mode does not write are placeholders."""
        names = (
            "labels",
            "matched",
            "classes",
            "max_iou",
            "block_counts",
            "block_starts",
            "offsets",
            "positive_anchors",
            "positive_matched",
            "positive_deltas",
            "positive_classes",
            "ignored_anchors",
        )
        pointers = [outputs.get(name) for name in names]
        pointers = [self._placeholder(torch.int32) if p is None else p for p in pointers]
        problem, encode = self.problem, self.encode
        has_classes = problem.gt_classes is not None
        capacities = [outputs[name].shape[0] if name in outputs else 0 for name in ("positive_anchors",
                                                                                    "ignored_anchors")]  # fmt: skip
        # The gather's lift runs here (the sparse pass reads the marks its count pass
        # stored, or, matching inline, with no records to keep them in, lifts again).
        lifts = self.low_quality not in (LOW_QUALITY_CODES["none"], LOW_QUALITY_CODES["ssd_forced"])
        lift = self.lift is not None and lifts and (output != OUTPUT_SPARSE or self.inline)
        lift_inputs = self.lift or tuple(map(self._placeholder, (torch.int64, torch.uint8, torch.float32)))
        # Registers: a finalize matching inline holds the gather's tile, and its cap; one that
        # lifts, its own.
        registers = self.meta.gather_registers if self.inline else self.meta.finalize_registers if lift else None
        cap = {} if registers is None else {"maxnreg": registers}
        finalize_kernel[self.block_grid](
            self.gt_boxes, problem.gt_offsets,
            self.gt_classes if has_classes else self._placeholder(torch.int32),
            self.anchors, self.level_int, self.level_float, self.cells, self.ignore, problem.ignore_offsets,
            self.border, self.pad, work, *lift_inputs, *pointers,
            self.num_anchors, self.num_levels, self.num_shapes, *capacities,
            float(self.match.high), float(self.match.low), float(self.match.ignore_iof_thr),
            float(self.match.min_pos_iou), *encode.weights, *encode.means, *encode.stds,
            problem.config.background_class, self.shape_major, self.low_quality, int(self.match.strict_high),
            *self.rules, int(has_classes), int(outputs.get("max_iou") is not None),
            OUTPUT=output, GENERATE=self.generate, BUILD_ANCHORS=self.build_anchors, BLOCK_A=self.meta.block_a,
            BLOCK_G=self.meta.block_g, LIFT=lift,
            BOXES=self.meta.gather_boxes, NEAR=self.meta.lift_near, INLINE=self.inline,
            # Read only when matching inline: fixed otherwise, so the gather's width variants
            # share the finalize's compiled variant (each compiled three more in the sweep).
            MATCH_NEAR=self.meta.gather_near if self.inline else 1, SKIP_EMPTY=self.skip_empty,
            LONE=self.lone and self.inline,
            HEAVY_FIRST=self.heavy_first, **_launch_kwargs(), **cap,
        )  # fmt: skip

    def work(self, dense: bool = True) -> torch.Tensor:
        """Per-anchor work words, [B, A, 4] float32 (see triton_assign): zeroed for the walk;
        for the sparse path (not ``dense``) matching inline, none (a placeholder)."""
        if self.inline and not dense:
            return self._placeholder(torch.float32)
        if self.meta.matching == "gather":  # writes the records it needs itself (skip_empty: flags the others)
            return torch.empty(self.batch, self.num_anchors, 4, dtype=torch.float32, device=self.device)
        return torch.zeros(self.batch, self.num_anchors, 4, dtype=torch.float32, device=self.device)


def solve(problem: Problem) -> Targets:
    """Dense targets of a checked batch (before sampling), in one launch per stage.

    For a problem whose gt values are unchecked (``_unchecked``), ``gather_kernel``
    (``segments_kernel`` with the walk) checks the boxes, and its flag is read back after
    the launches with the classes' extremes: ``CheckBoxesFirst`` if one may be invalid. A
    checked problem reads nothing back. Batches of up to ``_Meta.graph_batches`` images
    replay their launches as a CUDA graph (``triton_graphs``).

    Returns:
        Targets: labels [B, A] int8, matched_gt [B, A] int32, deltas [B, A, 4] float32,
        classes [B, A] int32 when the problem has gt_classes, max_iou [B, A] float32
        when asked; on the problem's device. The deltas double as the work memory.
    """
    if _replayable(problem):
        _check(problem, offsets=False)  # the graph's own problem holds copies, converted to its dtypes
        extremes = _class_extremes(problem)
        return _GRAPHS.run(problem, launch_dense, lambda out, copy: _dense_finished(out, extremes, copy), ("dense",))
    launched = launch_dense(problem)
    return _dense_finished(launched, _class_extremes(problem), False)


def _dense_finished(launched: tuple[Targets, torch.Tensor | None], extremes: list[torch.Tensor], copy: bool) -> Targets:
    """``launch_dense``'s targets (copies where ``copy``: a graph's), after its flag and
    the classes' ``extremes`` read back: ``CheckBoxesFirst`` if some value may be invalid."""
    targets, flag = launched
    if flag is not None and _found_invalid(*_read_back([flag, *extremes])):
        raise CheckBoxesFirst
    if not copy:
        return targets
    optional = [None if t is None else t.clone() for t in (targets.classes, targets.max_iou)]
    return Targets(targets.labels.clone(), targets.matched_gt.clone(), targets.deltas.clone(), *optional,
                   background_class=targets.background_class)  # fmt: skip


def launch_dense(problem: Problem) -> tuple[Targets, torch.Tensor | None]:
    """``solve``'s launches, nothing read back: its targets, and for an unchecked problem
    the box check's flag (a 0-dim int64 tensor, non-zero if some box may be invalid;
    None for a checked problem). Raises ``CheckBoxesFirst`` before launching where no
    launch would check an unchecked problem's boxes."""
    launch = _Launch(problem)
    batch, num_anchors, device = launch.batch, launch.num_anchors, launch.device
    check = launch.unchecked
    if check and launch.leaves_boxes_unchecked():
        raise CheckBoxesFirst
    labels = torch.empty(batch, num_anchors, dtype=torch.int8, device=device)
    matched = torch.empty(batch, num_anchors, dtype=torch.int32, device=device)
    deltas = launch.work()
    has_classes = problem.gt_classes is not None
    classes = torch.empty(batch, num_anchors, dtype=torch.int32, device=device) if has_classes else None
    max_iou = torch.empty(batch, num_anchors, dtype=torch.float32, device=device) if problem.want_max_iou else None
    targets = Targets(labels, matched, deltas, classes, max_iou, background_class=problem.config.background_class)
    if num_anchors == 0:
        return targets, None
    # One memset: the invalid-box flag, then the match stage's zeroed memory (16-byte
    # aligned, as when it is its own).
    zeroed = torch.zeros(2 + launch.scratch_words(), dtype=torch.int64, device=device) if check else None
    with _on(device):
        if check:
            launch.match_pairs(deltas, zeroed[:1], zeroed[2:])
        else:
            launch.match_pairs(deltas)
        launch.finalize(OUTPUT_DENSE, deltas, labels=labels, matched=matched, classes=classes, max_iou=max_iou)
    return targets, zeroed[0] if check else None


# The graphs ``solve`` and ``solve_sparse`` replay (``_replayable``).
_GRAPHS = Graphs()


def _replayable(problem: Problem) -> bool:
    """Whether ``solve`` and ``solve_sparse`` replay ``problem``'s launches as a CUDA graph
    (sparse: once an earlier call has sized the lists): a batch of at most
    ``graph_batches`` images on a GPU, generated anchors (explicit ones, proposals, are
    new on every call), no pad sizes (their table is built per call on the host), the
    gather reading each image's boxes through its offsets (the walk, and ssd_forced's
    box rows, read every row of the graph's buffer, past the call's own), and not inside
    the caller's own capture (where the launches are captured as they are)."""
    meta = _meta()
    return (
        meta.graph_batches > 0
        and isinstance(problem, Problem)
        and problem.batch_size <= meta.graph_batches
        and problem.device.type == "cuda"
        and problem.grid is not None
        and problem.valid_cells is None
        and problem.num_anchors > 0
        and meta.matching == "gather"
        and problem.config.match.low_quality != "ssd_forced"
        and not torch.cuda.is_current_stream_capturing()
    )


def _unchecked(problem: Problem) -> bool:
    """Whether the gt values are left to the backend: the boxes, and classes and ignore
    boxes given on a device (``build_problem``'s ``check_gt_boxes=False``)."""
    return not (problem.gt_boxes_checked and problem.gt_classes_checked and problem.ignore_boxes_checked)


def _class_extremes(problem: Problem) -> list[torch.Tensor]:
    """The gt classes' minimum and maximum where they are left to the backend, to be read
    back with the box check's flag after the launches (one device operation here, where
    build_problem's check of the classes took five and a read-back before them)."""
    classes = problem.gt_classes
    if problem.gt_classes_checked or classes is None or classes.numel() == 0:
        return []
    return list(torch.aminmax(classes))


def _read_back(values: list[torch.Tensor]) -> list[int]:
    """Integers of 0-dim tensors on one device, in one copy to the host."""
    return [values[0].item()] if len(values) == 1 else torch.stack(values).tolist()


def _found_invalid(flag: int, *extremes: int) -> bool:
    """Whether some gt box may be invalid (the kernels' ``flag``) or some class lies
    outside [0, 2^31) (``extremes``: the least and the greatest, if read back)."""
    return flag != 0 or (len(extremes) == 2 and not (extremes[0] >= 0 and extremes[1] <= _INT32[1]))


# Sparse rows per image of recent batches, per anchor count: (positives, ignored), each
# the maximum of the batch's mean and 0.9 x the previous estimate (a crowded batch
# raises it at once, it decays over calls). The most recent anchor counts are kept
# (explicit anchors, such as proposals, may bring a new count on every call). Updated by
# the service's compute workers at once: under a lock, as finding the least recent
# while another thread added a count raised "dictionary changed size during iteration".
_ROWS_PER_IMAGE: dict[int, tuple[float, float]] = {}
_ROWS_PER_IMAGE_KEPT = 64
_ROWS_LOCK = threading.Lock()


def _remember_rows(num_anchors: int, totals: list[int], batch: int) -> None:
    with _ROWS_LOCK:
        previous = _ROWS_PER_IMAGE.pop(num_anchors, None) or (0.0, 0.0)
        if len(_ROWS_PER_IMAGE) >= _ROWS_PER_IMAGE_KEPT:
            _ROWS_PER_IMAGE.pop(next(iter(_ROWS_PER_IMAGE)), None)  # the least recent
        _ROWS_PER_IMAGE[num_anchors] = tuple(max(t / batch, 0.9 * p) for t, p in zip(totals, previous))


def _sparse_lists(positives: int, ignored: int, has_classes: bool, device: torch.device) -> dict[str, torch.Tensor]:
    return dict(
        positive_anchors=torch.empty(positives, dtype=torch.int32, device=device),
        positive_matched=torch.empty(positives, dtype=torch.int32, device=device),
        positive_deltas=torch.empty(positives, 4, dtype=torch.float32, device=device),
        positive_classes=torch.empty(positives, dtype=torch.int32, device=device) if has_classes else None,
        ignored_anchors=torch.empty(ignored, dtype=torch.int32, device=device),
    )


def solve_sparse(problem: Problem) -> SparseTargets:
    """Sparse targets of a checked batch (before sampling), written directly.

    Equals ``solve(problem).to_sparse()``: positives (anchor, matched box, deltas,
    class) and ignored anchors per image in ascending anchor order, with int64 CSR
    offsets. Dense targets are never built: the per-anchor work memory (16 bytes per
    anchor and image) is the only [B, A] allocation.

    The lists' lengths are known on the device only. Rather than read them back between
    counting and writing (the GPU would idle while the host allocates and launches the
    write), the write goes into lists sized from recent batches (twice their rows per
    image, ``_ROWS_PER_IMAGE``; at most B x A rows), then the two totals are read back
    once, and the lists are returned cut to length. A batch with more rows than that, or
    the first batch of an anchor count, is written again into lists of its exact length.
    For a problem whose gt values are unchecked (``_unchecked``), ``gather_kernel``
    (``segments_kernel`` with the walk) checks the boxes and its flag comes back beside
    the totals (24 bytes in all, 40 with the classes' extremes): ``CheckBoxesFirst`` if
    one may be invalid. Batches of up to ``_Meta.graph_batches`` images replay their
    launches as a CUDA graph once an earlier call has sized the lists (``triton_graphs``;
    the lists' sizes rounded up to powers of two, ``_graph_list_sizes``).
    """
    if _replayable(problem):
        _check(problem, offsets=False)  # the graph's own problem holds copies, converted to its dtypes
        sizes = _graph_list_sizes(problem)
        if sizes is not None:
            extremes = _class_extremes(problem)
            return _GRAPHS.run(problem, functools.partial(launch_sparse, sizes=sizes),
                               lambda out, copy: _sparse_finished(out, extremes, copy), ("sparse", sizes))  # fmt: skip
    launched = launch_sparse(problem)
    return _sparse_finished(launched, _class_extremes(problem), False)


class _SparseLaunch(NamedTuple):
    """What ``launch_sparse`` launched: the problem's launch, its work memory, the rows the
    sparse pass reads (``block_counts``, ``block_starts``, ``offsets`` [3, B + 1]: the
    positive and ignored offsets, then the box check's flag at [2, B]) and the lists it
    wrote, sized from recent batches (None: not written)."""

    launch: _Launch
    work: torch.Tensor | None
    rows: dict[str, torch.Tensor]
    lists: dict[str, torch.Tensor | None] | None


def _list_sizes(batch: int, num_anchors: int, bucketed: bool = False) -> tuple[int, int] | None:
    """Rows of the positive and ignored lists for a batch, from recent batches (twice their
    rows per image, ``_ROWS_PER_IMAGE``, at most B x A; ``bucketed``: rounded up to a power
    of two, so that a graph's lists serve calls alike); None before any batch of the anchor
    count."""
    guess = _ROWS_PER_IMAGE.get(num_anchors)
    if guess is None:
        return None
    sizes = (int(2 * per_image * batch) + 64 for per_image in guess)
    return tuple(min(capacity(size, 64) if bucketed else size, batch * num_anchors) for size in sizes)


def _graph_list_sizes(problem: Problem) -> tuple[int, int] | None:
    """The lists' sizes of ``problem``'s sparse graph: ``_list_sizes`` rounded up to powers
    of two, or the smallest lists of a kept graph of its kind that hold them and are at
    most twice as long. The estimate decays by 0.9 per call, so a workload whose rows
    hover near a power of two would otherwise alternate between two sizes, and capture a
    graph for each."""
    sizes = _list_sizes(problem.batch_size, problem.num_anchors, bucketed=True)
    if sizes is None:
        return None
    larger = [
        kept[1] for kept in _GRAPHS.launches_kept(problem)
        if kept[0] == "sparse" and all(size <= rows <= 2 * size for size, rows in zip(sizes, kept[1]))
    ]  # fmt: skip
    return min(larger, key=sum, default=sizes)


def launch_sparse(problem: Problem, sizes: tuple[int, int] | None = None) -> _SparseLaunch:
    """``solve_sparse``'s launches, nothing read back: the match stage, the count pass, the
    scan and the sparse pass into lists of ``sizes`` rows (positive, ignored; None: sized
    from recent batches, ``_list_sizes``, and not written before the first). Raises
    ``CheckBoxesFirst`` before launching where no launch would check an unchecked
    problem's boxes."""
    launch = _Launch(problem)
    batch, num_anchors, device = launch.batch, launch.num_anchors, launch.device
    check = launch.unchecked
    if check and launch.leaves_boxes_unchecked():
        raise CheckBoxesFirst
    # Rows 0 and 1: the positive and ignored offsets; [2, B]: the invalid-box flag, read
    # back with the totals beside it (scan_kernel writes them all).
    offsets = torch.empty(3, batch + 1, dtype=torch.int64, device=device)
    if num_anchors == 0:
        offsets.zero_()
        return _SparseLaunch(launch, None, dict(offsets=offsets), None)
    # One memset: the invalid-box flag and scan_kernel's count of programs done, then
    # the match stage's zeroed memory (16-byte aligned, as when it is its own).
    zeroed = torch.zeros(2 + launch.scratch_words(), dtype=torch.int64, device=device)
    flags, invalid = zeroed[:2], zeroed[:1] if check else None
    work = launch.work(dense=False)
    block_counts = torch.empty(batch * launch.num_blocks, 2, dtype=torch.int32, device=device)
    block_starts = torch.empty(batch * launch.num_blocks, 2, dtype=torch.int64, device=device)
    image_totals = torch.empty(2, batch, dtype=torch.int64, device=device)
    rows = dict(block_counts=block_counts, block_starts=block_starts, offsets=offsets)
    if sizes is None:
        sizes = _list_sizes(batch, num_anchors)
    lists = None
    with _on(device):
        launch.match_pairs(work, invalid, zeroed[2:])
        launch.finalize(OUTPUT_COUNT, work, block_counts=block_counts)
        scan_kernel[(batch,)](block_counts, block_starts, image_totals, offsets, flags, launch.num_blocks, batch,
                              **SCAN_STEPS, **_launch_kwargs(SCAN_WARPS))  # fmt: skip
        if sizes is not None:
            lists = _sparse_lists(*sizes, problem.gt_classes is not None, device)
            launch.finalize(OUTPUT_SPARSE, work, **rows, **lists)
    return _SparseLaunch(launch, work, rows, lists)


def _sparse_finished(launched: _SparseLaunch, extremes: list[torch.Tensor], copy: bool) -> SparseTargets:
    """The sparse targets of ``launch_sparse``'s launches, after its totals, its flag and
    the classes' ``extremes`` read back (``CheckBoxesFirst`` if some value may be invalid):
    its lists cut to length, or, where they were not written or overflowed, lists of the
    totals' lengths written now; copies where ``copy`` (a graph's lists and offsets)."""
    launch, offsets, lists = launched.launch, launched.rows["offsets"], launched.lists
    batch, num_anchors, device = launch.batch, launch.num_anchors, launch.device
    totals = (0, 0)
    if num_anchors > 0:
        positives, ignored, *checks = _read_back([*offsets[:, batch], *extremes])
        if _found_invalid(*checks):
            raise CheckBoxesFirst
        totals = (positives, ignored)
        _remember_rows(num_anchors, totals, batch)
        if lists is not None and (positives > len(lists["positive_anchors"]) or
                                  ignored > len(lists["ignored_anchors"])):  # fmt: skip
            lists = None  # overflowed: written again below
    fresh = lists is None
    if fresh:
        lists = _sparse_lists(*totals, launch.problem.gt_classes is not None, device)
        if sum(totals) > 0:
            with _on(device):
                launch.finalize(OUTPUT_SPARSE, launched.work, **launched.rows, **lists)
    positives, ignored = totals
    cut = {name: None if tensor is None else tensor[: ignored if name == "ignored_anchors" else positives]
           for name, tensor in lists.items()}  # fmt: skip
    if copy:
        offsets = offsets.clone()
        if not fresh:
            cut = {name: None if tensor is None else tensor.clone() for name, tensor in cut.items()}
    return SparseTargets(
        num_anchors=num_anchors,
        positive_offsets=offsets[0],
        positive_anchors=cut["positive_anchors"],
        positive_matched_gt=cut["positive_matched"],
        positive_deltas=cut["positive_deltas"],
        ignored_offsets=offsets[1],
        ignored_anchors=cut["ignored_anchors"],
        positive_classes=cut["positive_classes"],
        background_class=launch.problem.config.background_class,
    )


def candidate_pairs(problem: Problem, block_p: int | None = None) -> dict[str, int]:
    """The work the triton path does for a problem, counted from its candidate structure.

    Returns ``evaluated`` (box-anchor pairs whose IoU the pair kernels compute: the
    rectangles of segments_kernel; with explicit anchors every pair), ``chunks`` (steps
    of ``block_p`` pairs they take, per pass; default: this mode's BLOCK_P), ``lanes``
    (chunks x block_p) and ``uniform_chunks`` (chunks inside one rectangle, which take
    the box and shape as scalar loads; the others find each lane's rectangle by bisection).
    """
    launch = _Launch(problem)
    if launch.num_rows == 0 or launch.num_anchors == 0:
        return {"evaluated": 0, "chunks": 0, "lanes": 0, "uniform_chunks": 0}
    with _on(launch.device):
        prefix = launch.segments()["prefix"]
    evaluated, block_p = int(prefix[-1]), block_p or launch.meta.block_p
    chunks = _cdiv(evaluated, block_p)
    first = torch.arange(chunks, device=prefix.device) * block_p
    last = (first + block_p).clamp(max=evaluated) - 1
    # The rectangle holding a pair: the last one starting at or before it.
    uniform = torch.searchsorted(prefix, first, right=True) == torch.searchsorted(prefix, last, right=True)
    return {"evaluated": evaluated, "chunks": chunks, "lanes": chunks * block_p, "uniform_chunks": int(uniform.sum())}
