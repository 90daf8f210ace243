"""The ``triton`` backend: check, allocate, launch (DESIGN §5).

``solve(problem) -> Targets`` gives the dense targets before sampling (``api.assign``
samples and restores dropped indices); ``solve_sparse(problem) -> SparseTargets``
adds the on-device compaction. The kernels live in ``triton_assign`` (the two
passes) and ``triton_compact``; this module only turns a ``Problem`` into launches:

1. pass 1 (``box_max_kernel``), when the low-quality mode needs each box's maximum;
2. pass 2 (``assign_kernel``), which writes every output;
3. for the sparse form, a device ``cumsum`` of the per-block counts and
   ``compact_kernel``.

One launch per pass for the whole ragged batch. Tensors must be on a CUDA device,
or on the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI runs it).

Exactness: labels and matched indices equal the reference bit for bit (float32 IoU
in torchvision's order, IEEE division, no FMA contraction). Deltas go through
``log``, whose last bit may differ between libraries: they agree with the reference
within ``rtol = atol = 1e-6`` under the interpreter; on GPU the tests allow 1e-5.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .anchors import AnchorGrid
from .problem import Problem
from .targets import SparseTargets, Targets
from .triton_assign import (
    BORDER_OFF,
    BORDER_POST,
    BORDER_PRE,
    LEVEL_FLOAT_FIELDS,
    LEVEL_INT_FIELDS,
    LOW_QUALITY_CODES,
    assign_kernel,
    box_max_kernel,
)
from .triton_compact import compact_kernel

__all__ = ["solve", "solve_sparse", "interpreting"]

# Compiled: 128 anchors x 8 boxes is a 1024-value IoU tile, 8 per thread at 4 warps.
# ptxas (sm_90) gives the assign kernel 96 registers and no spills at this size, so 5
# programs (20 warps) fit an SM; 256 anchors took 160 registers (3 programs). Small
# blocks also skip more box chunks: a chunk is skipped when no box touches the block's
# anchors. 1,575 programs per RetinaNet image (201,600 anchors) fill the SMs even at
# B = 1. 8 boxes per chunk: a COCO image (mean ~7 boxes) wastes little of its one or
# two chunks on masked rows, while G = 1000 loops 125 times over full tiles.
# Chosen from register counts and reasoning, not tuned on a GPU yet (bench_gpu.py
# measures the result against the bandwidth floor).
_BLOCK_A = 128
_BLOCK_G = 8
_NUM_WARPS = 4
# Interpreter: every tl operation is one numpy call whatever its size, so larger tiles
# mean fewer Python-level steps (CI time), not more memory traffic.
_BLOCK_A_INTERPRETED = 2048
_BLOCK_G_INTERPRETED = 64

# Grid axis 1 (images) is limited to 65,535 programs by CUDA.
_MAX_IMAGES = 65_535
# Anchor indices within an image are int32 in the kernels and packed into 31 bits.
_MAX_ANCHORS = 2**31 - 1 - _BLOCK_A_INTERPRETED
_INT32 = (-(2**31), 2**31 - 1)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _meta() -> tuple[int, int, int]:
    if interpreting():
        return _BLOCK_A_INTERPRETED, _BLOCK_G_INTERPRETED, _NUM_WARPS
    return _BLOCK_A, _BLOCK_G, _NUM_WARPS


def _check(problem: Problem) -> None:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a tritarget.kernels.problem.Problem, got {type(problem).__name__}")
    device = problem.device
    if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (got tensors on {device}); on a machine without a GPU use "
            "backend 'cpu', or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors"
        )
    named = {
        "anchors": (problem.anchors, torch.float32),
        "gt_boxes": (problem.gt_boxes, torch.float32),
        "gt_offsets": (problem.gt_offsets, torch.int64),
        "ignore_boxes": (problem.ignore_boxes, torch.float32),
        "ignore_offsets": (problem.ignore_offsets, torch.int64),
        "image_sizes": (problem.image_sizes, torch.int64),
    }
    if problem.gt_classes is not None:
        named["gt_classes"] = (problem.gt_classes, torch.int32)
    for name, (tensor, dtype) in named.items():
        if tensor.device != device:
            raise ValueError(f"problem.{name}: on {tensor.device}, but gt_boxes are on {device}")
        if tensor.dtype != dtype:
            raise TypeError(f"problem.{name}: expected {dtype}, got {tensor.dtype}")
    batch = problem.batch_size
    if not 1 <= batch <= _MAX_IMAGES:
        raise ValueError(f"batch size {batch}: the triton backend takes 1 to {_MAX_IMAGES} images per call")
    if problem.num_anchors > _MAX_ANCHORS:
        raise ValueError(f"{problem.num_anchors} anchors per image: the triton backend takes at most {_MAX_ANCHORS}")
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


@functools.lru_cache(maxsize=32)
def _level_tables(grid: AnchorGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level tables of a grid: int64 [L, 6], float32 [L, 5], cells float32 [sum K, 4].

    Factors and scales are rounded to float32 exactly as ``anchors._centers`` and
    ``anchors._level_anchors`` round them (``torch.tensor(value, dtype=float32)``).
    """
    ints, floats, cells = [], [], []
    first_row = 0
    for level, start in zip(grid.levels, grid.level_starts):
        shapes = level.cells.shape[0]
        ints.append([start, level.height, level.width, shapes, first_row, int(level.center_op == "div")])
        scale_x = 1.0 if level.scale_x is None else level.scale_x
        scale_y = 1.0 if level.scale_y is None else level.scale_y
        floats.append([level.offset, level.factor_x, level.factor_y, scale_x, scale_y])
        cells.append(level.cells.to(torch.float32))
        first_row += shapes
    level_int = torch.tensor(ints, dtype=torch.int64).reshape(-1, LEVEL_INT_FIELDS)
    level_float = torch.tensor(floats, dtype=torch.float64).to(torch.float32).reshape(-1, LEVEL_FLOAT_FIELDS)
    return level_int.to(device), level_float.to(device), torch.cat(cells).contiguous().to(device)


def _border_limits(problem: Problem) -> torch.Tensor:
    """[B, 3] float32 (-b, w + b, h + b): the reference compares float32 anchors with
    Python floats, which torch rounds to float32; ``w + b`` itself is a double sum."""
    border = problem.config.match.allowed_border
    sizes = problem.image_sizes.to(torch.float64)
    low = torch.full_like(sizes[:, 0], -border)
    return torch.stack([low, sizes[:, 1] + border, sizes[:, 0] + border], dim=1).to(torch.float32).contiguous()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU (not the current one); nothing to select on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_kwargs() -> dict:
    # IEEE semantics need each mul and add rounded on its own: no FMA contraction.
    return {"num_warps": _NUM_WARPS, "enable_fp_fusion": False}


def _dense(problem: Problem, count_sparse: bool) -> tuple[Targets, torch.Tensor | None, int]:
    """Run passes 1 and 2. Returns (targets, block counts [B, nblocks, 2] or None, BLOCK_A)."""
    _check(problem)
    config = problem.config
    match, encode = config.match, config.encode
    batch, num_anchors = problem.batch_size, problem.num_anchors
    device = problem.device
    block_a, block_g, _ = _meta()

    # (2) allocate
    labels = torch.empty(batch, num_anchors, dtype=torch.int8, device=device)
    matched = torch.empty(batch, num_anchors, dtype=torch.int32, device=device)
    deltas = torch.empty(batch, num_anchors, 4, dtype=torch.float32, device=device)
    has_classes = problem.gt_classes is not None
    classes = torch.empty(batch, num_anchors, dtype=torch.int32, device=device) if has_classes else None
    max_iou = torch.empty(batch, num_anchors, dtype=torch.float32, device=device) if problem.want_max_iou else None
    targets = Targets(labels, matched, deltas, classes, max_iou, background_class=config.background_class)
    num_blocks = triton.cdiv(num_anchors, block_a)
    block_counts = torch.zeros(batch, num_blocks, 2, dtype=torch.int32, device=device) if count_sparse else None
    if num_anchors == 0:
        return targets, block_counts, block_a

    def placeholder(dtype: torch.dtype) -> torch.Tensor:
        # A distinct tensor for a pointer the kernel does not read under its meta-parameters.
        return torch.empty(1, dtype=dtype, device=device)

    generate = problem.grid is not None
    if generate:
        level_int, level_float, cells = _level_tables(problem.grid, device)
        anchors = placeholder(torch.float32)
        num_levels = level_int.shape[0]
    else:
        level_int, level_float, cells = placeholder(torch.int64), placeholder(torch.float32), placeholder(torch.float32)
        anchors = problem.anchors.contiguous()
        num_levels = 0
    use_ignore = match.ignore_iof_thr >= 0 and problem.ignore_boxes.shape[0] > 0
    ignore = problem.ignore_boxes.contiguous() if use_ignore else placeholder(torch.float32)
    if match.allowed_border < 0:
        border_rule, border = BORDER_OFF, placeholder(torch.float32)
    else:
        border_rule = BORDER_PRE if match.border_order == "pre_match" else BORDER_POST
        border = _border_limits(problem)
    gt_boxes = problem.gt_boxes.contiguous()
    low_quality = LOW_QUALITY_CODES[match.low_quality]
    shape_major = int(generate and problem.grid.shape_major)
    rules = (int(use_ignore), int(match.ignore_iof_wrt_anchor), border_rule)
    grid = (num_blocks, batch)

    # (3) launch
    if low_quality != LOW_QUALITY_CODES["none"] and gt_boxes.shape[0] > 0:
        box_key = torch.full((gt_boxes.shape[0],), -1, dtype=torch.int64, device=device)
        with _on(device):
            box_max_kernel[grid](
                gt_boxes, problem.gt_offsets, box_key, anchors, level_int, level_float, cells,
                ignore, problem.ignore_offsets, border,
                num_anchors, num_levels,
                float(match.ignore_iof_thr), shape_major, *rules,
                GENERATE=generate, BLOCK_A=block_a, BLOCK_G=block_g, **_launch_kwargs(),
            )  # fmt: skip
    else:
        box_key = placeholder(torch.int64)
    wx, wy, ww, wh = encode.weights
    mx, my, mw, mh = encode.means
    sx, sy, sw, sh = encode.stds
    with _on(device):
        assign_kernel[grid](
            gt_boxes, problem.gt_offsets,
            problem.gt_classes if has_classes else placeholder(torch.int32),
            box_key, anchors, level_int, level_float, cells, ignore, problem.ignore_offsets, border,
            labels, matched, deltas,
            classes if has_classes else placeholder(torch.int32),
            max_iou if max_iou is not None else placeholder(torch.float32),
            block_counts if count_sparse else placeholder(torch.int32),
            num_anchors, num_levels,
            float(match.high), float(match.low), float(match.min_pos_iou), float(match.ignore_iof_thr),
            wx, wy, ww, wh, mx, my, mw, mh, sx, sy, sw, sh,
            config.background_class,
            shape_major, low_quality, int(match.strict_high), *rules,
            int(has_classes), int(max_iou is not None), int(count_sparse),
            GENERATE=generate, BLOCK_A=block_a, BLOCK_G=block_g, **_launch_kwargs(),
        )  # fmt: skip
    return targets, block_counts, block_a


def solve(problem: Problem) -> Targets:
    """Dense targets of a checked batch (before sampling), in one launch per pass.

    Returns:
        Targets: labels [B, A] int8, matched_gt [B, A] int32, deltas [B, A, 4] float32,
        classes [B, A] int32 when the problem has gt_classes, max_iou [B, A] float32
        when asked; on the problem's device.
    """
    targets, _, _ = _dense(problem, count_sparse=False)
    return targets


def solve_sparse(problem: Problem) -> SparseTargets:
    """Sparse targets of a checked batch (before sampling), compacted on the device.

    Equals ``solve(problem).to_sparse()``: positives (anchor, matched box, deltas,
    class) and ignored anchors per image in ascending anchor order, with int64 CSR
    offsets. The dense targets are computed on the device and compacted there; only
    the two totals (16 bytes) are read back, to size the outputs.
    """
    targets, block_counts, block_a = _dense(problem, count_sparse=True)
    batch, num_anchors = targets.batch_size, targets.num_anchors
    device = targets.labels.device
    per_image = block_counts.sum(dim=1, dtype=torch.int64)  # [B, 2]
    offsets = torch.cat([per_image.new_zeros(1, 2), per_image.cumsum(dim=0)])  # [B + 1, 2]
    flat = block_counts.reshape(-1, 2).to(torch.int64)
    block_starts = (flat.cumsum(dim=0) - flat).contiguous()  # exclusive scan, [B * nblocks, 2]
    num_positive, num_ignored = offsets[-1].tolist()

    has_classes = targets.classes is not None
    positive_anchors = torch.empty(num_positive, dtype=torch.int32, device=device)
    positive_matched = torch.empty(num_positive, dtype=torch.int32, device=device)
    positive_deltas = torch.empty(num_positive, 4, dtype=torch.float32, device=device)
    positive_classes = torch.empty(num_positive, dtype=torch.int32, device=device) if has_classes else None
    ignored_anchors = torch.empty(num_ignored, dtype=torch.int32, device=device)
    if num_anchors > 0 and num_positive + num_ignored > 0:
        with _on(device):
            compact_kernel[(block_counts.shape[1], batch)](
                targets.labels, targets.matched_gt, targets.deltas,
                targets.classes if has_classes else torch.empty(1, dtype=torch.int32, device=device),
                block_starts,
                positive_anchors, positive_matched, positive_deltas,
                positive_classes if has_classes else torch.empty(1, dtype=torch.int32, device=device),
                ignored_anchors,
                num_anchors, int(has_classes),
                BLOCK_A=block_a, num_warps=_NUM_WARPS,
            )  # fmt: skip
    return SparseTargets(
        num_anchors=num_anchors,
        positive_offsets=offsets[:, 0].contiguous(),
        positive_anchors=positive_anchors,
        positive_matched_gt=positive_matched,
        positive_deltas=positive_deltas,
        ignored_offsets=offsets[:, 1].contiguous(),
        ignored_anchors=ignored_anchors,
        positive_classes=positive_classes,
        background_class=targets.background_class,
    )
