"""The fused Triton kernels: anchors, IoU, max-IoU matching and encoding.

The design evaluates only the box-anchor pairs that overlap, box by box, and keeps one
packed key per anchor; ``triton_backend`` launches the stages in this order:

1. ``segments_kernel`` -- per (box, level, cell shape), the rectangle of cells whose
   anchor of that shape intersects the box, in closed form: a generated anchor's edges
   ``((i + offset) * factor + cell) * scale`` grow with the cell index ``i``, so the cells
   whose right edge passes the box's left edge and whose left edge stays before the
   box's right edge form a range, found by binary search on the exact float32 formula.
   Every pair outside the rectangles has intersection 0, hence IoU exactly 0; every
   pair inside has a positive width and height. A ``cumsum`` of the rectangles' pair
   counts lays all pairs of the batch end to end, cut into chunks of ``BLOCK_P`` pairs.
   Explicit anchors have no such structure: a box's "rectangle" is all its image's anchors.
   With the walk it also checks every box it loads, for ``solve`` and ``solve_sparse``
   (a flag the host reads back once after the launches -- ``solve_sparse`` with the lists'
   lengths -- in place of ``build_problem``'s read-back before them; with the gather,
   ``gather_kernel`` checks).
2. ``pairs_kernel`` (stage ``SCATTER``) -- persistent programs walk contiguous ranges of
   those chunks (one binary search to start, then rectangle after rectangle; a chunk
   may span many small rectangles), so a 600-pixel box and a 10-pixel one cost in
   proportion to their pairs. For each pair
   with IoU > 0 it folds ``(IoU bits << 32) | (2^31 - 1 - box)`` into the anchor's key
   with ``atomic_max`` (highest IoU, then the lowest box index), skipping the atomic
   when the key already read is as large; and, for the low-quality modes, it folds
   ``(IoU bits << 32) | (2^31 - 1 - anchor)`` over the included anchors into the box's
   key (highest IoU, then the lowest anchor index) and each rectangle's best IoU.
3. Low-quality matching, once every box's best IoU is known: ``lift_segments_kernel``
   keeps the pairs of the rectangles where a qualifying box reaches its maximum (about
   one per box) and a re-summed ``cumsum`` lays them out; stage ``LIFT`` of
   ``pairs_kernel`` walks only those and marks, per anchor, the highest box index whose
   best IoU it reaches (``atomic_max`` of box + 1); ``ssd_forced`` needs no walk:
   ``forced_kernel`` marks each box's best anchor.
4. ``finalize_kernel`` -- per anchor, reads its key and mark, applies thresholds, the
   low-quality rule, ignore regions, the border rule and the padded-size rule (anchors on
   cells beyond an image's ``pad_sizes``, excluded like pre-match border anchors; the
   pair kernels exclude them too, from the pair's cell, where a box's maximum is
   taken), encodes the positives and
   writes the dense targets (``OUTPUT_DENSE``), or counts positives and ignored anchors
   per block (``OUTPUT_COUNT``) and, after ``scan_kernel`` has turned the counts into
   output rows, writes the sparse lists straight away (``OUTPUT_SPARSE``): dense targets
   never exist on the sparse path.

Stages 2-3 run by default as a gather (``gather_kernel``, ``_Meta.matching = "gather"``;
the default since the H200 timed both, run10; the walk above is the baseline): a program per
finalize block of anchors tests its image's boxes 128 at a time against the bounding
boxes of the block's two parts (cut where a block runs from one row of cells into the
next), lists the near ones (a scan; a byte per anchor and image of list memory)
and visits them a few at a time as an [anchors, boxes] tile, keeps every anchor's key as
a running maximum in registers (no atomic per pair), writes every anchor's whole record
(the work memory needs no zeroing) -- only in blocks near a box, with a byte per block
that tells the finalize which records to read (``_Meta.skip_empty``: 83% of a COCO-like
image's blocks write none, 62% without the threshold pruning) -- and for the low-quality modes folds each box's best
IoU once per (block, box) (in 32 bits; ssd_forced's whole key, which names the anchor);
the lift, which marks the anchors that reach a qualifying box's maximum the same way,
runs inside ``finalize_kernel`` (LIFT: no launch of its own, and a
block builds its anchors once for the lift and the encoding); blocks near no box
generate no anchors (a per-grid table of block bounds), the lift skips boxes whose area
is far from every anchor's, each image's first block checks unchecked boxes (dense and
sparse), and every image's coarsest blocks, which list the most boxes, start
first (``_program_block``). ``bench_gpu.py --pairs`` counts what it visits
(0.64x the overlapping pairs at G = 200, 1.86x without its threshold pruning, 2.26x with
one bounding box per block). The pruning (``prune``): ``floor_kernel``, a program per
image before the gather, gives each box what its pairs must reach to matter -- below the
low threshold and the box's best IoU a pair changes no target -- and the gather skips
the near boxes whose IoU bound (``_iou_bound``) falls short.
Matching inline (``_Meta.inline_match``, a variant): ``finalize_kernel`` (INLINE) runs
the gather's search itself (``_block_keys``) instead of reading the records, and
``gather_kernel`` (RECORDS False) runs only for the box keys of the modes that lift or
to check unchecked boxes: no per-anchor record between the passes.

Work memory: per anchor and image 16 bytes -- the key (int64) and the mark (int32) --
which the dense path keeps in its own deltas output (zeroed first for the walk; each
anchor's delta is written by the program that reads its key, after a barrier), so it
allocates nothing beyond its outputs; the sparse path allocates them. The gather's near
lists: a byte per anchor and image, and one per block for its flags. Per box: its key,
image and index (16 bytes), what the pruned gather needs of it (4 bytes, ``floor_kernel``)
and, where segments_kernel runs (the walk, ssd_forced), per (box, level, shape) a
rectangle, a pair count, a prefix entry and a best IoU (36 bytes).

Compile once: the matching rules and optional outputs are runtime scalars, not
``tl.constexpr``, since every constexpr combination is a separate compilation and a
rule's branch is uniform within a program. Only the anchor source (generated or
explicit), the stage and the block sizes are compile-time. Nor do the sizes that change
from request to request (boxes, images, segments, anchors), or pointers into a buffer at
a count-dependent offset, take part in Triton's specialisation (an int equal to 1 or
divisible by 16, a pointer 16-byte aligned): one compilation per kernel and mode
whatever the batch, preset or canvas, none in the middle of a service's traffic
(``tests/test_triton_backend.py`` and ``tests/test_service_batcher.py`` check it with
Triton's binder).

Exactness: IoU, IoF and the anchor formula are evaluated in float32 in the reference's
operation order, with IEEE division (``tl.div_rn``) and launched with
``enable_fp_fusion=False`` (no mul+add contraction into FMA), so labels and matched
indices equal the reference bit for bit. Keys are only ever raised, so a stale key
read before an ``atomic_max`` can only cause a redundant atomic, never a lost one.

Atomics are relaxed (``sem="relaxed"``, as CUDA's ``atomicMax``): within a launch nothing
reads a word another program raised except those pre-check loads, and max commutes, so
no order between programs is needed; the next launch sees every result. Triton's
default, acq_rel, fenced each atomic on sm_90 with MEMBAR.ALL.GPU (wait until all of
the thread's memory operations are done) and CCTL.IVALL (drop its L1 cache): ten per
chunk in the scatter (``benchmarks/results/kernel_resources.md``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "LOW_QUALITY_CODES",
    "BORDER_OFF",
    "BORDER_PRE",
    "BORDER_POST",
    "LEVEL_INT_FIELDS",
    "LEVEL_FLOAT_FIELDS",
    "BLOCK_BOUNDS",
    "SHAPE_INT_FIELDS",
    "SHAPE_FLOAT_FIELDS",
    "STAGE_SCATTER",
    "STAGE_LIFT",
    "OUTPUT_DENSE",
    "OUTPUT_COUNT",
    "OUTPUT_SPARSE",
    "segments_kernel",
    "pairs_kernel",
    "lift_segments_kernel",
    "forced_kernel",
    "floor_kernel",
    "gather_kernel",
    "finalize_kernel",
    "scan_kernel",
]

# Low-quality modes as kernel codes (MatchConfig.low_quality -> code).
LOW_QUALITY_CODES = {"none": 0, "torchvision": 1, "detectron2": 2, "mmdet": 3, "ssd_forced": 4}
_LQ_TORCHVISION = tl.constexpr(1)
_LQ_DETECTRON2 = tl.constexpr(2)
_LQ_SSD_FORCED = tl.constexpr(4)

# Border rule (MatchConfig.allowed_border / border_order) as kernel codes.
BORDER_OFF = 0
BORDER_PRE = 1
BORDER_POST = 2
_BORDER_PRE = tl.constexpr(1)
_BORDER_POST = tl.constexpr(2)

STAGE_SCATTER = 0
STAGE_LIFT = 1
_STAGE_SCATTER = tl.constexpr(0)
OUTPUT_DENSE = 0
OUTPUT_COUNT = 1
OUTPUT_SPARSE = 2
_OUTPUT_DENSE = tl.constexpr(0)
_OUTPUT_COUNT = tl.constexpr(1)
_OUTPUT_SPARSE = tl.constexpr(2)

# Runtime switches must not be specialised: Triton compiles an int argument equal to 1
# as a constant, which would bring back one compilation per combination. Nor the sizes
# that change from request to request (boxes, images, segments, and anchors with the
# canvas): Triton also specialises an int on divisibility by 16, so a new size class
# would compile the kernel again in the middle of a service's traffic. (Each thread
# handles one anchor of a block, so no vector access relied on the anchor count's
# divisibility; the deltas' 16-byte rows are aligned whatever it is.)
_RULES = ["use_ignore", "ignore_wrt_anchor", "border_rule", "pad_rule", "low_quality"]
_PAIRS_SWITCHES = [*_RULES, "num_shapes", "center_div", "num_segments", "num_anchors"]
_GATHER_SWITCHES = [*_RULES, "num_levels", "num_shapes", "shape_major", "num_anchors", "check_boxes", "prune"]
_FINALIZE_SWITCHES = [*_RULES, "num_levels", "num_shapes", "shape_major", "strict_high", "background_class"]
_FINALIZE_SWITCHES += ["has_classes", "want_max_iou", "positive_capacity", "ignored_capacity", "num_anchors"]

# Per-level table layout (see triton_backend._level_tables): int64 columns
# (first anchor, height, width, shapes per cell, first row in the cell table, 1 if the
# centre is (i + offset) / factor else (i + offset) * factor) and float32 columns
# (offset, factor_x, factor_y, scale_x, scale_y).
LEVEL_INT_FIELDS = 6
LEVEL_FLOAT_FIELDS = 5
_LEVEL_INT_FIELDS = tl.constexpr(6)
_LEVEL_FLOAT_FIELDS = tl.constexpr(5)

# The gather's per-block table (triton_backend._block_bounds): the bounding boxes
# (x1, y1, x2, y2) of the block's two parts, then the smallest and largest anchor area.
BLOCK_BOUNDS = 10
_BLOCK_BOUNDS = tl.constexpr(10)

# A key's low half holds 2^31 - 1 - index (indices < 2^31, checked by the launcher), so
# that on equal IoU bits the lower index gives the larger key. Key 0 means "no overlap".
_INDEX_MASK = tl.constexpr(2**31 - 1)


# --- which block of which image a program takes ----------------------------------------


@triton.jit
def _program_block(HEAVY_FIRST: tl.constexpr):
    """This program's block and image (int64), the blocks per image and the images. The
    GPU starts programs in the order of their index, axis 0 fastest, so the grid's
    layout decides what runs last. HEAVY_FIRST: a grid of (images, blocks per image)
    taken from an image's last block down -- every image's last block first, then every
    image's last but one, and so on. An image's last blocks hold the coarsest level's
    anchors, the largest, which overlap the most boxes (at G = 1,000 the last tenth of an
    image's blocks lists 16x the near boxes of the first tenth, ``bench_gpu.py --pairs``),
    so the long blocks start first and short ones fill the end. Otherwise a grid of
    (blocks per image, images), an image's blocks in turn, image after image, in which
    the last image's coarsest blocks started last and ran on alone. (The layout, not a
    start index divided by the batch: no division is spent, and the ids are read again
    where needed rather than held in registers.)"""
    if HEAVY_FIRST:
        num_blocks = tl.num_programs(1)
        return num_blocks - 1 - tl.program_id(1), tl.program_id(0).to(tl.int64), num_blocks, tl.num_programs(0)
    else:
        return tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(0), tl.num_programs(1)


# --- anchors ---------------------------------------------------------------------------


@triton.jit
def _level(level_int_ptr, level_float_ptr, lv):
    """One level's table row (see LEVEL_INT_FIELDS / LEVEL_FLOAT_FIELDS)."""
    ints = level_int_ptr + lv * _LEVEL_INT_FIELDS
    floats = level_float_ptr + lv * _LEVEL_FLOAT_FIELDS
    return (
        tl.load(ints).to(tl.int32),  # anchor indices within an image are < 2^31 (the launcher checks)
        tl.load(ints + 1).to(tl.int32),
        tl.load(ints + 2).to(tl.int32),
        tl.load(ints + 3).to(tl.int32),
        tl.load(ints + 4).to(tl.int32),
        tl.load(ints + 5).to(tl.int32),
        tl.load(floats),
        tl.load(floats + 1),
        tl.load(floats + 2),
        tl.load(floats + 3),
        tl.load(floats + 4),
    )


@triton.jit
def _center(i, offset, factor, center_div):
    """Cell centres of int32 cell indices: (i + offset) * factor, or / factor (float32)."""
    position = i.to(tl.float32) + offset
    if center_div != 0:
        center = tl.div_rn(position, factor)
    else:
        center = position * factor
    return center


@triton.jit
def _level_cells(anchor, anchor_mask, start, height, width, shapes, shape_major):
    """(in_level, k, cell) of a block of anchor indices within one level that starts at
    anchor ``start``: whether each is in the level, its cell shape and its cell (row-major),
    for cell-major (shape fastest) or shape-major anchor order."""
    local = anchor - start
    in_level = anchor_mask & (local >= 0) & (local < height * width * shapes)
    local = tl.where(in_level, local, 0)
    if shape_major != 0:
        k = local // (height * width)
        cell = local % (height * width)
    else:
        k = local % shapes
        cell = local // shapes
    return in_level, k, cell


@triton.jit
def _block_anchor_boxes(anchor, anchor_mask, first_anchor, end_anchor, anchors_ptr, level_int_ptr,
                        level_float_ptr, cells_ptr, num_levels, shape_major, GENERATE: tl.constexpr):  # fmt: skip
    """x1, y1, x2, y2 ([BLOCK_A] float32 each) of a block of consecutive anchors.

    anchor: [BLOCK_A] int32 indices within the image; [first_anchor, end_anchor) the
    range they span. Generated anchors follow tritarget.kernels.anchors exactly
    (float32, one rounding per operation): ((cx, cy, cx, cy) + cell[k]) * (sx, sy, sx, sy).
    Only the levels the block overlaps are evaluated (one, at a level's end two).
    """
    if GENERATE:
        x1 = tl.zeros(anchor.shape, tl.float32)
        y1 = tl.zeros(anchor.shape, tl.float32)
        x2 = tl.zeros(anchor.shape, tl.float32)
        y2 = tl.zeros(anchor.shape, tl.float32)
        for lv in range(num_levels):
            start, height, width, shapes, cell_row, center_div, offset, factor_x, factor_y, scale_x, scale_y = _level(
                level_int_ptr, level_float_ptr, lv
            )
            if (start < end_anchor) & (start + height * width * shapes > first_anchor):
                in_level, k, cell = _level_cells(anchor, anchor_mask, start, height, width, shapes, shape_major)
                cx = _center(cell % width, offset, factor_x, center_div)
                cy = _center(cell // width, offset, factor_y, center_div)
                row = cells_ptr + (cell_row + k) * 4
                x1 = tl.where(in_level, (cx + tl.load(row, mask=in_level, other=0.0)) * scale_x, x1)
                y1 = tl.where(in_level, (cy + tl.load(row + 1, mask=in_level, other=0.0)) * scale_y, y1)
                x2 = tl.where(in_level, (cx + tl.load(row + 2, mask=in_level, other=0.0)) * scale_x, x2)
                y2 = tl.where(in_level, (cy + tl.load(row + 3, mask=in_level, other=0.0)) * scale_y, y2)
    else:
        row = anchors_ptr + anchor.to(tl.int64) * 4
        x1 = tl.load(row, mask=anchor_mask, other=0.0)
        y1 = tl.load(row + 1, mask=anchor_mask, other=0.0)
        x2 = tl.load(row + 2, mask=anchor_mask, other=0.0)
        y2 = tl.load(row + 3, mask=anchor_mask, other=0.0)
    return x1, y1, x2, y2


@triton.jit
def _first_cell(bound, cell_edge, offset, factor, scale, center_div, count, steps, INCLUSIVE: tl.constexpr):
    """Per shape, the first cell i in [0, count] whose anchor edge
    ``(centre(i) + cell_edge) * scale`` is > bound (>= bound if INCLUSIVE); count if none.

    The edge grows with i (factor and scale are positive and float32 rounding is
    monotonic), so a binary search on the exact formula finds it; ``steps`` >=
    bit_length(count) iterations settle every lane.
    """
    lo = tl.zeros(cell_edge.shape, tl.int32) + tl.zeros(bound.shape, tl.int32)
    hi = lo + count
    for _step in range(steps):
        mid = (lo + hi) // 2
        edge = (_center(mid, offset, factor, center_div) + cell_edge) * scale
        if INCLUSIVE:
            past = edge >= bound
        else:
            past = edge > bound
        open_ = lo < hi
        hi = tl.where(open_ & past, mid, hi)
        lo = tl.where(open_ & ~past, mid + 1, lo)
    return lo


# --- IoU and the rules -------------------------------------------------------------------


@triton.jit
def _intersection(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2):
    w = tl.maximum(tl.minimum(bx2, ax2) - tl.maximum(bx1, ax1), 0.0)
    h = tl.maximum(tl.minimum(by2, ay2) - tl.maximum(by1, ay1), 0.0)
    return w * h


@triton.jit
def _iou(bx1, by1, bx2, by2, box_area, ax1, ay1, ax2, ay2, anchor_area):
    """IoU in torchvision's order: inter / ((area_box + area_anchor) - inter), 0 where union is 0."""
    inter = _intersection(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2)
    union = box_area + anchor_area - inter
    positive = union > 0.0
    return tl.where(positive, tl.div_rn(inter, tl.where(positive, union, 1.0)), 0.0)


@triton.jit
def _excluded(image, ax1, ay1, ax2, ay2, anchor_area, ignore_ptr, ignore_offsets_ptr, border_ptr, ignore_iof_thr,
              use_ignore, ignore_wrt_anchor, border_rule, BLOCK_G: tl.constexpr):  # fmt: skip
    """(excluded, outside), bool like ax1.

    excluded: taken out before matching -- IoF with an ignore box > ignore_iof_thr
        (mmdet; IoF over the anchor's area if ignore_wrt_anchor, else over the ignore
        box's), or across the border when border_rule is pre-match.
    outside: across the border (x1 >= -b, y1 >= -b, x2 < w + b, y2 < h + b fails).
    ignore_ptr: [M, 4] float32; ignore_offsets_ptr: [B + 1] int64; border_ptr: [B, 3]
        float32 per image (-b, w + b, h + b), rounded to float32 as torch rounds a
        Python scalar compared with a float32 tensor. Crowd regions are few per image:
        each is tested against every anchor it is asked about, BLOCK_G at a time.
    """
    excluded = tl.zeros(ax1.shape, tl.int1)
    outside = tl.zeros(ax1.shape, tl.int1)
    if use_ignore != 0:
        start = tl.load(ignore_offsets_ptr + image)
        end = tl.load(ignore_offsets_ptr + image + 1)
        inside_ignore = tl.zeros(ax1.shape, tl.int32)
        for m0 in range(start, end, BLOCK_G):
            rows = m0 + tl.arange(0, BLOCK_G).to(tl.int64)
            row_mask = rows < end
            row = ignore_ptr + rows * 4
            ix1 = tl.load(row, mask=row_mask, other=0.0)[:, None]
            iy1 = tl.load(row + 1, mask=row_mask, other=0.0)[:, None]
            ix2 = tl.load(row + 2, mask=row_mask, other=0.0)[:, None]
            iy2 = tl.load(row + 3, mask=row_mask, other=0.0)[:, None]
            inter = _intersection(ix1, iy1, ix2, iy2, ax1[None, :], ay1[None, :], ax2[None, :], ay2[None, :])
            area = tl.where(ignore_wrt_anchor != 0, anchor_area[None, :], (ix2 - ix1) * (iy2 - iy1))
            has_area = area > 0.0
            iof = tl.where(has_area, tl.div_rn(inter, tl.where(has_area, area, 1.0)), 0.0)
            over = (iof > ignore_iof_thr) & row_mask[:, None]
            inside_ignore = tl.maximum(inside_ignore, tl.max(over.to(tl.int32), axis=0))
        excluded = inside_ignore > 0
    if border_rule != 0:
        low = tl.load(border_ptr + image * 3)
        high_x = tl.load(border_ptr + image * 3 + 1)
        high_y = tl.load(border_ptr + image * 3 + 2)
        outside = ~((ax1 >= low) & (ay1 >= low) & (ax2 < high_x) & (ay2 < high_y))
        excluded = excluded | (outside & (border_rule == _BORDER_PRE))
    return excluded, outside


@triton.jit
def _outside_padding(anchor, anchor_mask, first_anchor, end_anchor, level_int_ptr, pad_ptr, image, num_levels,
                     num_shapes, shape_major):  # fmt: skip
    """bool [BLOCK_A]: anchors whose cell lies beyond the image's valid cells
    (reference.outside_padding), for a block of consecutive generated anchors (see
    _block_anchor_boxes). pad_ptr: [B, R, 2] int32, the valid rows and columns of each
    (image, shape row)."""
    outside = tl.zeros(anchor.shape, tl.int1)
    for lv in range(num_levels):
        ints = level_int_ptr + lv * _LEVEL_INT_FIELDS
        start = tl.load(ints).to(tl.int32)
        height = tl.load(ints + 1).to(tl.int32)
        width = tl.load(ints + 2).to(tl.int32)
        shapes = tl.load(ints + 3).to(tl.int32)
        cell_row = tl.load(ints + 4).to(tl.int32)
        if (start < end_anchor) & (start + height * width * shapes > first_anchor):
            in_level, k, cell = _level_cells(anchor, anchor_mask, start, height, width, shapes, shape_major)
            valid = pad_ptr + (image * num_shapes + cell_row + k) * 2
            rows = tl.load(valid, mask=in_level, other=0)
            columns = tl.load(valid + 1, mask=in_level, other=0)
            outside = outside | (in_level & ((cell // width >= rows) | (cell % width >= columns)))
    return outside


# --- 1. candidate rectangles -------------------------------------------------------------

# Per-shape table layout (see triton_backend._level_tables), one row per (level, cell
# shape) in level order: int32 columns (the anchor index of cell (0, 0), the index step
# per cell along x and along y, width, height) and float32 columns (offset, factor_x,
# factor_y, scale_x, scale_y, and the cell anchor x1, y1, x2, y2).
SHAPE_INT_FIELDS = 5
SHAPE_FLOAT_FIELDS = 9
_SHAPE_INT_FIELDS = tl.constexpr(5)
_SHAPE_FLOAT_FIELDS = tl.constexpr(9)


@triton.jit
def _shape_ints(shape_int_ptr, shape):
    """The shape table's int columns for shape rows ``shape`` (any shape of int indices)."""
    ints = shape_int_ptr + shape * _SHAPE_INT_FIELDS
    return tl.load(ints), tl.load(ints + 1), tl.load(ints + 2), tl.load(ints + 3), tl.load(ints + 4)


@triton.jit
def _shape_floats(shape_float_ptr, shape):
    """The shape table's float columns for shape rows ``shape``."""
    floats = shape_float_ptr + shape * _SHAPE_FLOAT_FIELDS
    return (
        tl.load(floats), tl.load(floats + 1), tl.load(floats + 2), tl.load(floats + 3), tl.load(floats + 4),
        tl.load(floats + 5), tl.load(floats + 6), tl.load(floats + 7), tl.load(floats + 8),
    )  # fmt: skip


@triton.jit
def _positive_finite(value):
    """value in (0, inf): false for NaN."""
    return (value > 0.0) & (value <= 3.4028234663852886e38)


@triton.jit
def _flag_invalid_boxes(boxes_ptr, rows, real, canvas_ptr, invalid_ptr):
    """Set the int64 at invalid_ptr to 1 if one of the boxes ``rows`` (where ``real``)
    may be invalid by ``problem._margins``' rule: width, height, x2, y2, canvas width - x1
    and canvas height - y1 in (0, inf), in float32 (canvas_ptr: float32 width, height), and
    every coordinate within (-2**31, 2**31) (``problem.BOX_REACH``)."""
    box = boxes_ptr + rows * 4
    x1 = tl.load(box, mask=real, other=0.0)
    y1 = tl.load(box + 1, mask=real, other=0.0)
    x2 = tl.load(box + 2, mask=real, other=0.0)
    y2 = tl.load(box + 3, mask=real, other=0.0)
    valid = _positive_finite(x2 - x1) & _positive_finite(y2 - y1) & _positive_finite(x2) & _positive_finite(y2)
    valid = valid & _positive_finite(tl.load(canvas_ptr) - x1) & _positive_finite(tl.load(canvas_ptr + 1) - y1)
    valid = valid & (x1 > -2147483648.0) & (y1 > -2147483648.0) & (x2 < 2147483648.0) & (y2 < 2147483648.0)
    tl.store(invalid_ptr + rows * 0, tl.full(rows.shape, 1, tl.int64), mask=real & ~valid)


@triton.jit
def _last_at_or_below(sorted_ptr, value, lo, hi, steps):
    """Per lane, the last index in [lo, hi] whose entry of the ascending sorted_ptr is <=
    value, given that lo's is: ``steps`` halvings (bit_length(hi - lo) suffice)."""
    for _step in range(steps):
        mid = (lo + hi + 1) // 2
        before = tl.load(sorted_ptr + mid) <= value
        open_ = lo < hi
        hi = tl.where(open_ & ~before, mid - 1, hi)
        lo = tl.where(open_ & before, mid, lo)
    return lo


_SEGMENTS_SWITCHES = ["num_rows", "batch", "num_anchors", "num_shapes", "center_div", "image_steps", "check_boxes",
                      "num_ignore"]  # fmt: skip


# The box-check flag sits inside solve_sparse's offsets ([2, B]), 16-byte aligned or not
# with the batch's parity: specialising on it would compile the kernel twice (see _RULES).
@triton.jit(do_not_specialize=_SEGMENTS_SWITCHES, do_not_specialize_on_alignment=["invalid_ptr"])
def segments_kernel(
    gt_boxes_ptr,
    gt_offsets_ptr,
    shape_int_ptr,
    shape_float_ptr,
    rect_ptr,
    pairs_ptr,
    row_image_ptr,
    row_box_ptr,
    canvas_ptr,
    invalid_ptr,
    ignore_ptr,
    num_rows,
    batch,
    num_anchors,
    num_shapes,
    center_div,
    search_steps,
    image_steps,
    check_boxes,
    num_ignore,
    GENERATE: tl.constexpr,
    ROWS: tl.constexpr,
    SHAPES: tl.constexpr,
):
    """Per box row: each (level, cell shape)'s rectangle of overlapping cells.

    gt_boxes_ptr: [N, 4] float32; gt_offsets_ptr: [B + 1] int64.
    check_boxes: set the int64 at invalid_ptr to 1 if some box may be invalid by
        ``problem._margins``' rule (width, height, x2, y2, canvas width - x1 and canvas
        height - y1 in (0, inf), float32; canvas_ptr: float32 (width, height)), the check
        ``build_problem`` left to the backend; the first program checks the num_ignore
        ignore boxes at ignore_ptr ([M, 4] float32) too, 128 at a time.
    rect_ptr: [N, R, 4] int32 out (first x, cells along x, first y, cells along y) for
        the R = num_shapes shape rows; pairs_ptr: [N, R] int64 out, nx * ny;
        row_image_ptr, row_box_ptr: [N] int32 out, the image of each box row and its
        index within the image.
    Explicit anchors (not GENERATE, R = 1): the rectangle is all anchors (x0 = 0,
    nx = num_anchors, y0 = 0, ny = 1).
    Grid: (cdiv(N, ROWS), cdiv(R, SHAPES)), a [ROWS, SHAPES] tile of rows and shapes per
    program; the first column of programs finds the rows' images and checks the boxes.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    real_row = rows < num_rows
    if tl.program_id(1) == 0:
        # The image owning each row: the last image whose first row is <= row.
        first = tl.zeros((ROWS,), tl.int64)
        lo = _last_at_or_below(gt_offsets_ptr, rows, first, first + batch - 1, image_steps)
        tl.store(row_image_ptr + rows, lo.to(tl.int32), mask=real_row)
        tl.store(row_box_ptr + rows, (rows - tl.load(gt_offsets_ptr + lo)).to(tl.int32), mask=real_row)
        if check_boxes != 0:
            _flag_invalid_boxes(gt_boxes_ptr, rows, real_row, canvas_ptr, invalid_ptr)
            if tl.program_id(0) == 0:  # crowd regions are few: one program's loop, a row per thread
                for start in range(0, num_ignore, 128):
                    ignore_rows = start + tl.arange(0, 128).to(tl.int64)
                    _flag_invalid_boxes(ignore_ptr, ignore_rows, ignore_rows < num_ignore, canvas_ptr, invalid_ptr)
    shape = tl.program_id(1) * SHAPES + tl.arange(0, SHAPES)[None, :]
    real = real_row[:, None] & (shape < num_shapes)
    if GENERATE:
        box = gt_boxes_ptr + rows[:, None] * 4
        bx1 = tl.load(box, mask=real_row[:, None], other=0.0)
        by1 = tl.load(box + 1, mask=real_row[:, None], other=0.0)
        bx2 = tl.load(box + 2, mask=real_row[:, None], other=0.0)
        by2 = tl.load(box + 3, mask=real_row[:, None], other=0.0)
        shape_row = tl.where(shape < num_shapes, shape, 0)
        _base, _step_x, _step_y, width, height = _shape_ints(shape_int_ptr, shape_row)
        offset, factor_x, factor_y, scale_x, scale_y, c0, c1, c2, c3 = _shape_floats(shape_float_ptr, shape_row)
        # Overlap along x: the anchor's x2 > bx1 and its x1 < bx2 (same along y).
        x0 = _first_cell(bx1, c2, offset, factor_x, scale_x, center_div, width, search_steps, False)
        x_end = _first_cell(bx2, c0, offset, factor_x, scale_x, center_div, width, search_steps, True)
        y0 = _first_cell(by1, c3, offset, factor_y, scale_y, center_div, height, search_steps, False)
        y_end = _first_cell(by2, c1, offset, factor_y, scale_y, center_div, height, search_steps, True)
        nx = tl.maximum(x_end - x0, 0)
        ny = tl.maximum(y_end - y0, 0)
    else:
        x0 = tl.zeros((ROWS, SHAPES), tl.int32)
        y0 = x0
        nx = x0 + num_anchors
        ny = x0 + 1
    seg = rows[:, None] * num_shapes + shape
    tl.store(rect_ptr + seg * 4, x0, mask=real)
    tl.store(rect_ptr + seg * 4 + 1, nx, mask=real)
    tl.store(rect_ptr + seg * 4 + 2, y0, mask=real)
    tl.store(rect_ptr + seg * 4 + 3, ny, mask=real)
    tl.store(pairs_ptr + seg, nx.to(tl.int64) * ny, mask=real)


# --- 2./3. the pairs -----------------------------------------------------------------------


# Segments a pair walk probes with one load: a warp's worth of prefix entries (256
# contiguous bytes), enough for most chunks (a COCO-like box's rectangles hold hundreds
# of pairs each, a chunk 256).
_WINDOW = tl.constexpr(32)


@triton.jit
def _segment_at(prefix_ptr, target, num_segments, BLOCK: tl.constexpr):
    """The last segment s in [0, num_segments) with prefix[s] <= target (prefix[0] = 0):
    a BLOCK-ary search, one vector load per step, so ceil(log_BLOCK(S)) dependent loads
    (2-3 for a batch) where the binary search before took bit_length(S) + 1 (15-20): the
    start of every persistent program waits on this chain."""
    lo = target * 0
    span = lo + num_segments  # candidates [lo, lo + span), prefix[lo] <= target
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    while span > 1:
        step = (span + BLOCK - 1) // BLOCK
        probe = lo + lanes * step
        real = probe < lo + span
        before = real & (tl.load(prefix_ptr + probe, mask=real, other=0) <= target)
        taken = (tl.sum(before.to(tl.int32), axis=0) - 1).to(tl.int64)  # probe 0 is lo: >= 0
        lo += taken * step
        span = tl.minimum(step, span - taken * step)
    return lo


@triton.jit
def _last_segment(prefix_ptr, seg, seg_end, last_pair, num_segments):
    """The last segment starting at or before ``last_pair``, searching forward from ``seg``
    (which holds the chunk's first pair; ``seg_end`` = its end): a chunk inside one
    rectangle costs no load, one across fewer than _WINDOW more segments one load of
    the prefix entries after ``seg``, longer ones a window per _WINDOW segments."""
    found = seg
    if seg_end <= last_pair:
        lanes = tl.arange(0, _WINDOW).to(tl.int64)
        window = seg + 1  # segment window + i starts at prefix[window + i]
        full = True
        while full:
            probe = window + lanes
            real = probe < num_segments
            before = real & (tl.load(prefix_ptr + probe, mask=real, other=0) <= last_pair)
            count = tl.sum(before.to(tl.int32), axis=0)
            found = tl.where(count > 0, window + count - 1, found)
            full = count == _WINDOW
            window += _WINDOW
    return found


@triton.jit
def _excluded_lanes(image, ax1, ay1, ax2, ay2, anchor_area, ignore_ptr, ignore_offsets_ptr, border_ptr,
                    ignore_iof_thr, use_ignore, ignore_wrt_anchor, border_rule):  # fmt: skip
    """``_excluded`` where each lane may belong to another image (the pair kernels):
    lane-parallel over anchors, one ignore box per lane at a time."""
    excluded = tl.zeros(ax1.shape, tl.int1)
    if use_ignore != 0:
        # Broadcast: ``image`` is one scalar in a uniform chunk.
        start = tl.zeros(ax1.shape, tl.int64) + tl.load(ignore_offsets_ptr + image)
        count = tl.load(ignore_offsets_ptr + image + 1) - start
        for m in range(0, tl.max(count, axis=0)):
            has = m < count
            row = ignore_ptr + (start + m) * 4
            ix1 = tl.load(row, mask=has, other=0.0)
            iy1 = tl.load(row + 1, mask=has, other=0.0)
            ix2 = tl.load(row + 2, mask=has, other=0.0)
            iy2 = tl.load(row + 3, mask=has, other=0.0)
            inter = _intersection(ix1, iy1, ix2, iy2, ax1, ay1, ax2, ay2)
            area = tl.where(ignore_wrt_anchor != 0, anchor_area, (ix2 - ix1) * (iy2 - iy1))
            has_area = area > 0.0
            iof = tl.where(has_area, tl.div_rn(inter, tl.where(has_area, area, 1.0)), 0.0)
            excluded = excluded | (has & (iof > ignore_iof_thr))
    if border_rule == _BORDER_PRE:
        low = tl.load(border_ptr + image * 3)
        high_x = tl.load(border_ptr + image * 3 + 1)
        high_y = tl.load(border_ptr + image * 3 + 2)
        excluded = excluded | ~((ax1 >= low) & (ay1 >= low) & (ax2 < high_x) & (ay2 < high_y))
    return excluded


@triton.jit
def _chunk(segs, local, mask, gt_boxes_ptr, row_box_ptr, row_image_ptr, rect_ptr, anchors_ptr, shape_int_ptr,
           shape_float_ptr, ignore_ptr, ignore_offsets_ptr, border_ptr, pad_ptr, key_ptr, mark_ptr, box_key_ptr,
           seg_max_ptr, num_anchors, num_shapes, center_div, ignore_iof_thr, use_ignore,
           ignore_wrt_anchor, border_rule, pad_rule, low_quality, STAGE: tl.constexpr, GENERATE: tl.constexpr,
           PRECHECK: tl.constexpr, UNIFORM: tl.constexpr):  # fmt: skip
    """One chunk of pairs: ``segs`` is the segment of every lane ([BLOCK_P]), or one
    scalar when the whole chunk lies in one segment (UNIFORM): then the box, its image,
    the rectangle and the shape's constants are scalar loads shared by all lanes, and
    the box's key and segment maximum take one reduction and one atomic.

    PRECHECK: each ``atomic_max`` is issued only where a plain load of the word says it
    can raise it (fewer atomics, but the lane waits for that load); without it every
    overlapping pair sends its atomic, whose result nobody reads, so the compiler may
    emit a fire-and-forget reduction (RED) and the lane does not wait at all. The same
    words either way: max is order-independent."""
    row = segs // num_shapes
    if STAGE != _STAGE_SCATTER:  # the lift
        # The lift walks only the segments where their box reaches its maximum, a
        # qualifying one (lift_segments_kernel zeroed the others' pairs): every lane in
        # the walk may lift, so no test of the whole chunk (a block reduction) is needed.
        # Per lane even in a uniform chunk (a broadcast): the interpreter mishandles
        # `block & scalar` for a scalar loaded through a scalar pointer.
        box_bits = (tl.load(box_key_ptr + row) >> 32).to(tl.int32) + tl.zeros(mask.shape, tl.int32)
        box_max = box_bits.to(tl.float32, bitcast=True)
    image = tl.load(row_image_ptr + row).to(tl.int64)
    box = tl.load(row_box_ptr + row).to(tl.int64)
    rect = rect_ptr + segs * 4
    x0 = tl.load(rect)
    nx = tl.load(rect + 1)
    y0 = tl.load(rect + 2)
    dy = local // nx
    x = x0 + local - dy * nx
    if GENERATE:
        y = y0 + dy
        shape = (segs - row * num_shapes).to(tl.int32)
        base, step_x, step_y, _width, _height = _shape_ints(shape_int_ptr, shape)
        offset, factor_x, factor_y, scale_x, scale_y, c0, c1, c2, c3 = _shape_floats(shape_float_ptr, shape)
        cx = _center(x, offset, factor_x, center_div)
        cy = _center(y, offset, factor_y, center_div)
        ax1 = (cx + c0) * scale_x
        ay1 = (cy + c1) * scale_y
        ax2 = (cx + c2) * scale_x
        ay2 = (cy + c3) * scale_y
        anchor = base + x * step_x + y * step_y
        padded = tl.zeros(mask.shape, tl.int1)
        if pad_rule != 0:
            # The pair's own cell against its image's valid cells for this shape row.
            # Broadcast first: in a uniform chunk image and shape are scalars loaded
            # through scalar pointers (see the LIFT note above).
            valid = pad_ptr + (image * num_shapes + shape) * 2
            rows = tl.load(valid) + tl.zeros(mask.shape, tl.int32)
            columns = tl.load(valid + 1) + tl.zeros(mask.shape, tl.int32)
            padded = (y >= rows) | (x >= columns)
    else:
        padded = tl.zeros(mask.shape, tl.int1)
        anchor = x
        a = anchors_ptr + anchor.to(tl.int64) * 4
        ax1 = tl.load(a, mask=mask, other=0.0)
        ay1 = tl.load(a + 1, mask=mask, other=0.0)
        ax2 = tl.load(a + 2, mask=mask, other=1.0)
        ay2 = tl.load(a + 3, mask=mask, other=1.0)
    b = gt_boxes_ptr + row * 4
    bx1 = tl.load(b)
    by1 = tl.load(b + 1)
    bx2 = tl.load(b + 2)
    by2 = tl.load(b + 3)
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    iou = _iou(bx1, by1, bx2, by2, (bx2 - bx1) * (by2 - by1), ax1, ay1, ax2, ay2, anchor_area)
    slot = image * num_anchors + anchor
    if STAGE == _STAGE_SCATTER:
        overlap = mask & (iou > 0.0)
        iou_bits = iou.to(tl.int32, bitcast=True)
        bits = iou_bits.to(tl.int64) << 32
        key = bits | (box ^ _INDEX_MASK)
        if PRECHECK:
            seen = tl.load(key_ptr + slot * 2, mask=overlap, other=0)
            tl.atomic_max(key_ptr + slot * 2, key, mask=overlap & (key > seen), sem="relaxed")
        else:
            tl.atomic_max(key_ptr + slot * 2, key, mask=overlap, sem="relaxed")
        if low_quality != 0:
            excluded = _excluded_lanes(image, ax1, ay1, ax2, ay2, anchor_area, ignore_ptr, ignore_offsets_ptr,
                                       border_ptr, ignore_iof_thr, use_ignore, ignore_wrt_anchor,
                                       border_rule) | padded  # fmt: skip
            counted = overlap & ~excluded
            box_key = tl.where(counted, bits | (anchor.to(tl.int64) ^ _INDEX_MASK), 0)
            seg_bits = tl.where(counted, iou_bits, 0)
            if UNIFORM:
                best = tl.max(box_key, axis=0)
                if best > 0:
                    tl.atomic_max(box_key_ptr + row, best, sem="relaxed")
                    tl.atomic_max(seg_max_ptr + segs, tl.max(seg_bits, axis=0), sem="relaxed")
            elif PRECHECK:
                seen = tl.load(box_key_ptr + row, mask=counted, other=0)
                tl.atomic_max(box_key_ptr + row, box_key, mask=box_key > seen, sem="relaxed")
                seen_bits = tl.load(seg_max_ptr + segs, mask=counted, other=0)
                tl.atomic_max(seg_max_ptr + segs, seg_bits, mask=seg_bits > seen_bits, sem="relaxed")
            else:
                tl.atomic_max(box_key_ptr + row, box_key, mask=counted, sem="relaxed")
                tl.atomic_max(seg_max_ptr + segs, seg_bits, mask=counted, sem="relaxed")
    else:
        excluded = _excluded_lanes(image, ax1, ay1, ax2, ay2, anchor_area, ignore_ptr, ignore_offsets_ptr,
                                   border_ptr, ignore_iof_thr, use_ignore, ignore_wrt_anchor,
                                   border_rule) | padded  # fmt: skip
        hit = mask & (iou == box_max) & ~excluded
        tl.atomic_max(mark_ptr + slot * 4 + 2, (box + 1).to(tl.int32), mask=hit, sem="relaxed")


@triton.jit(do_not_specialize=_PAIRS_SWITCHES)
def pairs_kernel(
    # Pointers
    gt_boxes_ptr,
    row_box_ptr,
    row_image_ptr,
    rect_ptr,
    prefix_ptr,
    anchors_ptr,
    shape_int_ptr,
    shape_float_ptr,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    pad_ptr,
    work_ptr,
    box_key_ptr,
    seg_max_ptr,
    # Sizes
    num_segments,
    num_anchors,
    num_shapes,
    # Scalars and rule switches
    center_div,
    ignore_iof_thr,
    use_ignore,
    ignore_wrt_anchor,
    border_rule,
    pad_rule,
    low_quality,
    # Meta-parameters
    STAGE: tl.constexpr,
    GENERATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECHECK: tl.constexpr = True,
):
    """Walk the overlapping pairs: scatter anchor/box keys (SCATTER) or mark lifts (LIFT).

    rect_ptr: [S, 4] int32 and prefix_ptr: [S + 1] int64 (exclusive cumsum of the pairs):
        segments_kernel's output, S = num_segments = N * num_shapes; segment s is box row
        s // num_shapes and shape row s % num_shapes. The pairs of all segments, in
        order, are cut into chunks of BLOCK_P: one lane per pair, a chunk may span many
        small rectangles (each lane finds its own by bisection between the chunk's
        first and last segment).
    work_ptr: [B, A, 4] 32-bit words per anchor (see the module docstring): words 0-1
        the anchor's int64 key, word 2 its int32 mark (the highest lifting box + 1).
    pad_ptr: [B, R, 2] int32, each (image, shape row)'s valid rows and columns (read
        when pad_rule != 0): a pair on a cell beyond them is excluded.
    box_key_ptr: [N] int64 box keys and seg_max_ptr: [S] int32 each segment's best IoU
        bits over included anchors (both written by SCATTER for low-quality modes, read
        by LIFT, which skips the segments that do not reach their box's maximum).
    PRECHECK: SCATTER loads each word before its atomic (``_chunk``).
    Grid: (P,) persistent programs; program p takes chunks [T p / P, T (p + 1) / P) of
    the T = cdiv(prefix[S], BLOCK_P) chunks, in order.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    total_pairs = tl.load(prefix_ptr + num_segments)
    total = (total_pairs + BLOCK_P - 1) // BLOCK_P
    begin = total * program // programs
    end = total * (program + 1) // programs
    if begin < end:
        # The segment holding the first pair: the last one starting at or before it.
        seg = _segment_at(prefix_ptr, begin * BLOCK_P, num_segments, BLOCK_P)
        seg_end = tl.load(prefix_ptr + seg + 1)
        key_ptr = work_ptr.to(tl.pointer_type(tl.int64))
        mark_ptr = work_ptr.to(tl.pointer_type(tl.int32))
        chunk = begin
        while chunk < end:
            first_pair = chunk * BLOCK_P
            last_pair = tl.minimum(first_pair + BLOCK_P, total_pairs) - 1
            while seg_end <= first_pair:
                seg += 1
                seg_end = tl.load(prefix_ptr + seg + 1)
            pair = first_pair + tl.arange(0, BLOCK_P)
            mask = pair <= last_pair
            last_seg = _last_segment(prefix_ptr, seg, seg_end, last_pair, num_segments)
            if last_seg == seg:
                local = (pair - tl.load(prefix_ptr + seg)).to(tl.int32)
                _chunk(seg, local, mask, gt_boxes_ptr, row_box_ptr, row_image_ptr, rect_ptr, anchors_ptr,
                       shape_int_ptr, shape_float_ptr, ignore_ptr, ignore_offsets_ptr, border_ptr, pad_ptr, key_ptr,
                       mark_ptr, box_key_ptr, seg_max_ptr, num_anchors, num_shapes, center_div,
                       ignore_iof_thr, use_ignore, ignore_wrt_anchor, border_rule, pad_rule, low_quality, STAGE,
                       GENERATE, PRECHECK,
                       True)  # fmt: skip
            else:
                steps = 0
                span = last_seg - seg
                while span > 0:
                    steps += 1
                    span = span // 2
                lane_seg = _last_at_or_below(prefix_ptr, pair, tl.zeros((BLOCK_P,), tl.int64) + seg,
                                             tl.zeros((BLOCK_P,), tl.int64) + last_seg, steps)  # fmt: skip
                local = (pair - tl.load(prefix_ptr + lane_seg)).to(tl.int32)
                # Masked lanes (past the last pair) may stand on any segment: they load
                # valid table rows and write nothing.
                _chunk(lane_seg, local, mask, gt_boxes_ptr, row_box_ptr, row_image_ptr, rect_ptr, anchors_ptr,
                       shape_int_ptr, shape_float_ptr, ignore_ptr, ignore_offsets_ptr, border_ptr, pad_ptr, key_ptr,
                       mark_ptr, box_key_ptr, seg_max_ptr, num_anchors, num_shapes, center_div,
                       ignore_iof_thr, use_ignore, ignore_wrt_anchor, border_rule, pad_rule, low_quality, STAGE,
                       GENERATE, PRECHECK,
                       False)  # fmt: skip
            seg = last_seg
            seg_end = tl.load(prefix_ptr + seg + 1)
            chunk += 1


@triton.jit(do_not_specialize=["num_segments", "num_shapes"])
def lift_segments_kernel(rect_ptr, box_key_ptr, seg_max_ptr, pairs_ptr, num_segments, num_shapes, min_pos_iou,
                         BLOCK: tl.constexpr):  # fmt: skip
    """Before the lift: keep the pairs of the segments where a qualifying box reaches its
    maximum (about one of a box's dozens of rectangles), zero the others, so that the
    lift's walk, over the cumsum of these counts, skips them in a step.

    rect_ptr: [S, 4] int32; box_key_ptr: [N] int64; seg_max_ptr: [S] int32 (see
    pairs_kernel); pairs_ptr: [S] int64 out. Grid: (cdiv(S, BLOCK),).
    """
    seg = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    real = seg < num_segments
    box_bits = (tl.load(box_key_ptr + seg // num_shapes, mask=real, other=0) >> 32).to(tl.int32)
    box_max = box_bits.to(tl.float32, bitcast=True)
    # A box whose best IoU is 0 lifts nothing (the peers' zero-IoU pitfall).
    reaches = real & (box_max > 0.0) & (box_max >= min_pos_iou) & (tl.load(seg_max_ptr + seg, mask=real) == box_bits)
    nx = tl.load(rect_ptr + seg * 4 + 1, mask=reaches, other=0)
    ny = tl.load(rect_ptr + seg * 4 + 3, mask=reaches, other=0)
    tl.store(pairs_ptr + seg, nx.to(tl.int64) * ny, mask=real)


@triton.jit(do_not_specialize=["num_rows", "num_anchors"])
def forced_kernel(gt_offsets_ptr, row_image_ptr, box_key_ptr, work_ptr, num_rows, num_anchors, min_pos_iou,
                  BLOCK: tl.constexpr):  # fmt: skip
    """ssd_forced: mark each qualifying box's best anchor with the highest such box + 1.

    The box key's low half names the best included anchor (lowest index on ties).
    Grid: (cdiv(N, BLOCK),).
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    real = rows < num_rows
    key = tl.load(box_key_ptr + rows, mask=real, other=0)
    box_max = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    qualifies = real & (box_max > 0.0) & (box_max >= min_pos_iou)
    image = tl.load(row_image_ptr + rows, mask=real, other=0).to(tl.int64)
    box = rows - tl.load(gt_offsets_ptr + image, mask=real, other=0)
    anchor = (key & _INDEX_MASK) ^ _INDEX_MASK
    slot = (image * num_anchors + anchor) * 4 + 2
    tl.atomic_max(work_ptr.to(tl.pointer_type(tl.int32)) + slot, (box + 1).to(tl.int32), mask=qualifies, sem="relaxed")


# --- 2-3, gathered: per block of anchors, its image's boxes ---------------------------------


@triton.jit
def _bounds(x1, y1, x2, y2, mask):
    """A block's parts (``_table_bounds``), here both its bounding box, and the range of
    its anchors' areas."""
    area = (x2 - x1) * (y2 - y1)
    box = (
        tl.min(tl.where(mask, x1, float("inf")), axis=0),
        tl.min(tl.where(mask, y1, float("inf")), axis=0),
        tl.max(tl.where(mask, x2, -float("inf")), axis=0),
        tl.max(tl.where(mask, y2, -float("inf")), axis=0),
    )
    area_low = tl.min(tl.where(mask, area, float("inf")), axis=0)
    return (box, box), area_low, tl.max(tl.where(mask, area, -float("inf")), axis=0)


@triton.jit
def _table_bounds(bounds_ptr, block):
    """A block's row of the grid's table (BLOCK_BOUNDS): the bounding boxes of its two
    parts, and the range of its anchors' areas."""
    row = bounds_ptr + block * _BLOCK_BOUNDS
    a = (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3))
    b = (tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7))
    return (a, b), tl.load(row + 8), tl.load(row + 9)


@triton.jit
def _block_parts(block, bounds_ptr, anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr, level_float_ptr,
                 cells_ptr, num_levels, shape_major, ax1, ay1, ax2, ay2, GENERATE: tl.constexpr,
                 BUILD_ANCHORS: tl.constexpr):  # fmt: skip
    """A block's two parts and its anchors' area range, with its anchors' boxes: a
    generated grid's from its table (``_table_bounds``: no anchor built; ax1..ay2 come
    back as given), explicit anchors' from the anchors themselves, loaded."""
    if GENERATE:
        parts, area_low, area_high = _table_bounds(bounds_ptr, block)
    else:
        ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr,
                                                 level_float_ptr, cells_ptr, num_levels, shape_major,
                                                 BUILD_ANCHORS)  # fmt: skip
        parts, area_low, area_high = _bounds(ax1, ay1, ax2, ay2, anchor_mask)
    return parts, area_low, area_high, ax1, ay1, ax2, ay2


@triton.jit
def _crosses(x1, y1, x2, y2, part):
    """Whether each box has a positive intersection with the box ``part`` (x1, y1, x2, y2)."""
    return (x1 < part[2]) & (y1 < part[3]) & (x2 > part[0]) & (y2 > part[1])


@triton.jit
def _box_best_iou(box_key_ptr, rows, mask):
    """The boxes' best IoU: the high word of each one's key (little-endian: the int32 above
    the low one), read alone, as the gather folds it."""
    return tl.load(box_key_ptr.to(tl.pointer_type(tl.float32)) + rows * 2 + 1, mask=mask, other=0.0)


@triton.jit
def _iou_bound(x1, y1, x2, y2, parts, area_low, area_high):
    """Per box, a bound on its IoU with every anchor of a block whose two ``parts`` have
    these bounding boxes and whose anchors' areas lie in [area_low, area_high]: an anchor
    of area a in a part overlaps the box by at most the box's intersection I with the
    part's bounding box, so IoU <= min(I, a) / max(area, a), largest at the a of the
    range nearest the box's area (I <= area). Rounding is monotone, so I as computed is
    at least any anchor's intersection as computed; the callers' slack (10^-4) covers the
    IoU's own rounding (a few ulps)."""
    area = (x2 - x1) * (y2 - y1)
    a, b = parts
    overlap = tl.maximum(_intersection(x1, y1, x2, y2, a[0], a[1], a[2], a[3]),
                         _intersection(x1, y1, x2, y2, b[0], b[1], b[2], b[3]))  # fmt: skip
    nearest = tl.minimum(tl.maximum(area, area_low), area_high)
    return tl.div_rn(tl.minimum(overlap, nearest), tl.maximum(area, nearest))


@triton.jit
def _near_boxes(gt_boxes_ptr, box_key_ptr, rows, box_end, parts, area_low, area_high, min_pos_iou, need_ptr, prune,
                LIFT: tl.constexpr):  # fmt: skip
    """Which of the boxes ``rows`` (up to ``box_end``) a block visits: those crossing the
    bounding box of one of its two ``parts`` (a positive intersection with one anchor
    implies one with the bounding box of its part); for the lift (LIFT), only those that
    may reach their maximum IoU in the block; for the matching with ``prune``, only those
    whose IoU with an anchor of the block may reach the box's ``need_ptr`` value
    (``floor_kernel``)."""
    in_image = rows < box_end
    tested = gt_boxes_ptr + rows * 4
    x1 = tl.load(tested, mask=in_image, other=float("inf"))
    y1 = tl.load(tested + 1, mask=in_image, other=float("inf"))
    x2 = tl.load(tested + 2, mask=in_image, other=-float("inf"))
    y2 = tl.load(tested + 3, mask=in_image, other=-float("inf"))
    near = in_image & (_crosses(x1, y1, x2, y2, parts[0]) | _crosses(x1, y1, x2, y2, parts[1]))
    if LIFT:
        # A box whose best IoU is 0 lifts nothing (the peers' zero-IoU pitfall).
        maxima = _box_best_iou(box_key_ptr, rows, near)
        near = near & (maxima > 0.0) & (maxima >= min_pos_iou)
        # Nor can a box reach its maximum where no anchor's IoU can (_iou_bound): the area
        # range alone rules out the anchors of other levels (80% of these visits on
        # COCO-like images, 89% at G = 200), the intersection 61-68% of the rest, the
        # blocks the box only grazes (bench_gpu.py --pairs).
        near = near & (_iou_bound(x1, y1, x2, y2, parts, area_low, area_high) * 1.0001 >= maxima)
    elif prune != 0:
        # A pair below its box's need changes no label, positive's box or box's best IoU
        # (floor_kernel): 0.20-0.64x the overlapping pairs are visited at G = 200, where
        # every near box was 1.86x (bench_gpu.py --pairs).
        need = tl.load(need_ptr + rows, mask=near, other=0.0)
        near = near & (_iou_bound(x1, y1, x2, y2, parts, area_low, area_high) * 1.0001 >= need)
    return near


@triton.jit
def _first_near(gt_boxes_ptr, box_key_ptr, box_start, box_end, parts, area_low, area_high, min_pos_iou, need_ptr,
                prune, BOXES: tl.constexpr, LIFT: tl.constexpr):  # fmt: skip
    """The first step of BOXES boxes with one near the block: its first box row (box_end:
    none), and which of its boxes are near (``_block_keys`` starts from there)."""
    found = box_end
    start = box_start
    near = tl.zeros((BOXES,), tl.int1)
    while (found == box_end) & (start < box_end):
        rows = start + tl.arange(0, BOXES)
        near = _near_boxes(gt_boxes_ptr, box_key_ptr, rows, box_end, parts, area_low, area_high, min_pos_iou,
                           need_ptr, prune, LIFT)  # fmt: skip
        found = tl.where(tl.sum(near.to(tl.int32), axis=0) > 0, start, box_end)
        start += BOXES
    return found, near


@triton.jit
def _list_near(near_rows, near):
    """Lists the near boxes of a step (``near``: one per box tested), in box order, at
    ``near_rows`` as their places in the step (one byte each: a step tests at most 256);
    returns how many. BOXES boxes are tested at once (one per thread): a box-by-box test
    would cost every thread ~35 instructions per box of the image (SASS). The caller visits
    the list NEAR at a time (``_listed_boxes``), so that each box's reduction over the
    block's anchors and the loop's own work are shared by NEAR boxes, then calls
    ``tl.debug_barrier()`` before the next step overwrites the list."""
    count = tl.sum(near.to(tl.int32), axis=0)
    if count > 0:
        place = tl.arange(0, near.shape[0]).to(tl.uint8)
        tl.store(near_rows + tl.cumsum(near.to(tl.int32), axis=0) - 1, place, mask=near)
        tl.debug_barrier()  # every thread's list entries written before any is read
    return count


@triton.jit
def _listed_boxes(near_rows, start, column, count, gt_boxes_ptr):
    """The listed boxes ``column`` (a NEAR-wide step of the list of the step at box row
    ``start``): their rows (int64), which are real (``column < count``), and their corners."""
    listed = column < count
    row = start + tl.load(near_rows + column, mask=listed, other=0).to(tl.int64)
    box = gt_boxes_ptr + row * 4
    bx1 = tl.load(box, mask=listed, other=0.0)
    by1 = tl.load(box + 1, mask=listed, other=0.0)
    bx2 = tl.load(box + 2, mask=listed, other=0.0)
    by2 = tl.load(box + 3, mask=listed, other=0.0)
    return row, listed, bx1, by1, bx2, by2


@triton.jit
def _filled_flag(near_ptr, image, block, num_blocks, batch, BOXES: tl.constexpr):
    """Where gather_kernel (SKIP_EMPTY) says whether it wrote a block's records: a byte
    per block of each image, after every program's near list (int64: the lists may pass
    2^31 bytes)."""
    return near_ptr + (batch.to(tl.int64) * BOXES + image) * num_blocks + block


@triton.jit
def _tile_iou(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2, anchor_area):
    """IoU of every anchor of the block (rows) with every listed box (columns)."""
    return _iou(bx1[None, :], by1[None, :], bx2[None, :], by2[None, :], ((bx2 - bx1) * (by2 - by1))[None, :],
                ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None], anchor_area[:, None])  # fmt: skip


@triton.jit
def _lift_marks(gt_boxes_ptr, box_key_ptr, near_rows, box_start, box_end, parts, ax1, ay1, ax2, ay2, included,
                min_pos_iou, BLOCK_A: tl.constexpr, BOXES: tl.constexpr, NEAR: tl.constexpr):  # fmt: skip
    """The low-quality lift of a block of anchors, once every box's key (its best IoU over
    the included anchors) is known: per anchor, the highest box + 1 whose qualifying best
    IoU it reaches among the included anchors, else 0. Only the boxes that may reach their
    maximum here are visited (``_near_boxes``, LIFT)."""
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    # The area bound over the included anchors only; none: nothing to mark.
    area_low = tl.min(tl.where(included, anchor_area, float("inf")), axis=0)
    area_high = tl.max(tl.where(included, anchor_area, -float("inf")), axis=0)
    box_end = tl.where(area_low <= area_high, box_end, box_start)
    mark = tl.zeros((BLOCK_A, NEAR), tl.int32)  # per tile column: the last box marked
    for start in range(box_start, box_end, BOXES):
        rows = start + tl.arange(0, BOXES)
        near = _near_boxes(gt_boxes_ptr, box_key_ptr, rows, box_end, parts, area_low, area_high, min_pos_iou,
                           gt_boxes_ptr, 0, True)  # fmt: skip
        count = _list_near(near_rows, near)
        if count > 0:
            for k in range(0, count, NEAR):
                row, listed, bx1, by1, bx2, by2 = _listed_boxes(near_rows, start, k + tl.arange(0, NEAR), count,
                                                                gt_boxes_ptr)  # fmt: skip
                iou = _tile_iou(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2, anchor_area)
                box_max = _box_best_iou(box_key_ptr, row, listed)
                hit = included[:, None] & listed[None, :] & (iou == box_max[None, :])
                mark = tl.where(hit, (row - box_start + 1).to(tl.int32)[None, :], mark)
            tl.debug_barrier()  # every entry read before the next step overwrites the list
    return tl.max(mark, axis=1)


@triton.jit
def _keep_best(iou, pair, box, best_iou, best_box, box_key_ptr, row, anchor_low, low_quality, BOX_KEYS: tl.constexpr):
    """One visit folded in: per anchor, the best IoU and its box (a strict comparison
    keeps the lowest box on a tie: boxes come in increasing order), and with BOX_KEYS each
    visited box's best over the counted pairs into its key (``_block_keys``). Any shape:
    a [BLOCK_A, NEAR] tile (``box``, ``row`` per column, ``anchor_low`` [BLOCK_A, 1]) or
    one box ([BLOCK_A], scalars)."""
    better = pair & (iou > best_iou)
    best_iou = tl.where(better, iou, best_iou)
    best_box = tl.where(better, box, best_box)
    if BOX_KEYS:
        counted = pair & (anchor_low >= 0)
        if low_quality == _LQ_SSD_FORCED:  # forces each box's best anchor: the key names it
            top = (iou.to(tl.int32, bitcast=True).to(tl.int64) << 32) | anchor_low.to(tl.int64)
            top = tl.max(tl.where(counted & (iou > 0.0), top, 0), axis=0)
            tl.atomic_max(box_key_ptr + row, top, mask=top > 0, sem="relaxed")
        elif low_quality != 0:
            # The lift reads only each box's best IoU, its key's high word
            # (_box_best_iou), so the fold over the block's anchors takes 32-bit values: a
            # float max per step of the reduction and one register per shuffle, where the
            # 64-bit key took two compares, two selects and two shuffles (SASS).
            best = tl.max(tl.where(counted, iou, 0.0), axis=0)
            tl.atomic_max(box_key_ptr.to(tl.pointer_type(tl.int32)) + row * 2 + 1,
                          best.to(tl.int32, bitcast=True), mask=best > 0.0, sem="relaxed")  # fmt: skip
    return best_iou, best_box


@triton.jit
def _keys(best_iou, best_box):
    """pairs_kernel's key of a best IoU and its box; 0 where no box overlaps."""
    key = (best_iou.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (best_box ^ _INDEX_MASK).to(tl.int64)
    return tl.where(best_iou > 0.0, key, 0)


@triton.jit
def _block_keys(gt_boxes_ptr, box_key_ptr, near_rows, box_start, found, found_near, box_end, parts, area_low,
                area_high, need_ptr, prune, anchor_mask, ax1, ay1, ax2, ay2, anchor_low, low_quality,
                BOX_KEYS: tl.constexpr, BLOCK_A: tl.constexpr, BOXES: tl.constexpr, NEAR: tl.constexpr,
                LONE: tl.constexpr):  # fmt: skip
    """Each anchor's key over the boxes near its block (``pairs_kernel``'s key: IoU bits,
    then 2^31 - 1 - box; 0 where no box overlaps it): the image's boxes tested BOXES at a
    time against the block's two ``parts``, from the first step with a near box
    (``_first_near``: ``found``, whose test ``found_near`` is not repeated), the near ones
    listed at ``near_rows`` and visited NEAR at a time as a [BLOCK_A, NEAR] tile. LONE: a
    step's last near box, where it would be alone in its tile, is visited alone (a
    [BLOCK_A] pass, about half the tile's instructions: on COCO-like images, where most
    steps with a near box list one, 79% of the tile visits, ``bench_gpu.py --pairs``).
    With BOX_KEYS, for the low-quality modes (``low_quality``), also each box's best IoU
    over the included anchors (``anchor_low`` >= 0: 2^31 - 1 - anchor, -1 where excluded,
    [BLOCK_A] int32), one ``atomic_max`` per (block, box) into the high word of its key;
    for ssd_forced into the whole key, with the best anchor (lowest on a tie) below."""
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    # anchor_low broadcast over the tile's columns here: inside the loop the broadcast
    # would cost a layout conversion through shared memory (three barriers) per visit.
    low_tile = anchor_low
    if BOX_KEYS:
        low_tile = anchor_low[:, None]
    # Per anchor and column of the tile, and for the lone visits: the best IoU and its
    # box, in 32-bit registers, reduced to keys once at the end.
    best_iou = tl.zeros((BLOCK_A, NEAR), tl.float32)
    best_box = tl.zeros((BLOCK_A, NEAR), tl.int32)
    lone_iou = tl.zeros((BLOCK_A,), tl.float32)
    lone_box = tl.zeros((BLOCK_A,), tl.int32)
    near = found_near
    for start in range(found, box_end, BOXES):
        if start != found:
            near = _near_boxes(gt_boxes_ptr, box_key_ptr, start + tl.arange(0, BOXES), box_end, parts, area_low,
                               area_high, 0.0, need_ptr, prune, False)  # fmt: skip
        count = _list_near(near_rows, near)
        if count > 0:
            tiled = count  # the entries visited as tiles
            if LONE:
                if NEAR > 1:
                    lone = count % NEAR == 1
                    tiled -= lone.to(tl.int32)
            for k in range(0, tiled, NEAR):
                row, listed, bx1, by1, bx2, by2 = _listed_boxes(near_rows, start, k + tl.arange(0, NEAR), count,
                                                                gt_boxes_ptr)  # fmt: skip
                iou = _tile_iou(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2, anchor_area)
                best_iou, best_box = _keep_best(iou, anchor_mask[:, None] & listed[None, :],
                                                (row - box_start).to(tl.int32)[None, :], best_iou, best_box,
                                                box_key_ptr, row, low_tile, low_quality, BOX_KEYS)  # fmt: skip
            if LONE:
                if tiled < count:  # the last entry, alone
                    row = start + tl.load(near_rows + tiled).to(tl.int64)
                    box = gt_boxes_ptr + row * 4
                    bx1 = tl.load(box)
                    by1 = tl.load(box + 1)
                    bx2 = tl.load(box + 2)
                    by2 = tl.load(box + 3)
                    iou = _iou(bx1, by1, bx2, by2, (bx2 - bx1) * (by2 - by1), ax1, ay1, ax2, ay2, anchor_area)
                    lone_iou, lone_box = _keep_best(iou, anchor_mask, (row - box_start).to(tl.int32), lone_iou,
                                                    lone_box, box_key_ptr, row, anchor_low, low_quality,
                                                    BOX_KEYS)  # fmt: skip
            tl.debug_barrier()  # every entry read before the next step overwrites the list
    # The highest key: the best IoU, then the lowest box, over the columns (and the lone visits).
    key = tl.max(_keys(best_iou, best_box), axis=1)
    if LONE:
        key = tl.maximum(key, _keys(lone_iou, lone_box))
    return key


@triton.jit
def _nearest_cell(center, offset, factor, scale, center_div, count):
    """Per box, a cell index in [0, count) whose centre lies about at ``center`` (any cell
    would do for floor_kernel: the nearest gives the tightest floor)."""
    position = center / scale
    if center_div != 0:
        i = position * factor - offset
    else:
        i = position / factor - offset
    i = tl.where(i == i, i, 0.0)  # NaN (an unchecked box)
    return tl.minimum(tl.maximum(i + 0.5, 0.0), (count - 1).to(tl.float32)).to(tl.int32)


@triton.jit(do_not_specialize=["num_levels", "per_image"])
def floor_kernel(gt_boxes_ptr, gt_offsets_ptr, level_int_ptr, level_float_ptr, cells_ptr, need_ptr, num_levels, low,
                 per_image, BOXES: tl.constexpr):  # fmt: skip
    """What gather_kernel's matching pass needs of each box (prune): need_ptr [N] float32,
    min(low, a floor under the box's best IoU), below which a pair changes no label (the
    anchor is negative with or without it), no positive's box (its IoU >= low) and no
    box's best IoU (it is below the floor); with ``per_image`` the image's lowest, for
    torchvision's lift, which keeps a lifted anchor's own best box: that box's IoU is at
    least the lifting box's best, at least the image's lowest floor.

    The floor is the box's best IoU over one anchor per level and cell shape, at the cell
    nearest its centre: anchors of a generated grid, built by the same float32 formula
    as ``_block_anchor_boxes``, whose IoU the gather computes alike, so the floor is at
    most the box's best when no rule excludes an anchor (the launcher prunes only then).
    On COCO-like images it equals the best or passes ``low`` for every box (``bench_gpu.py
    --pairs``). Grid: (B,)."""
    image = tl.program_id(0)
    box_start = tl.load(gt_offsets_ptr + image)
    box_end = tl.load(gt_offsets_ptr + image + 1)
    lowest = low
    for start in range(box_start, box_end, BOXES):
        rows = start + tl.arange(0, BOXES)
        in_image = rows < box_end
        box = gt_boxes_ptr + rows * 4
        bx1 = tl.load(box, mask=in_image, other=0.0)
        by1 = tl.load(box + 1, mask=in_image, other=0.0)
        bx2 = tl.load(box + 2, mask=in_image, other=1.0)
        by2 = tl.load(box + 3, mask=in_image, other=1.0)
        area = (bx2 - bx1) * (by2 - by1)
        best = tl.zeros((BOXES,), tl.float32)
        for lv in range(num_levels):
            _start, height, width, shapes, cell_row, center_div, offset, factor_x, factor_y, scale_x, scale_y = _level(
                level_int_ptr, level_float_ptr, lv
            )
            cx = _center(_nearest_cell(0.5 * (bx1 + bx2), offset, factor_x, scale_x, center_div, width), offset,
                         factor_x, center_div)  # fmt: skip
            cy = _center(_nearest_cell(0.5 * (by1 + by2), offset, factor_y, scale_y, center_div, height), offset,
                         factor_y, center_div)  # fmt: skip
            for k in range(shapes):
                cell = cells_ptr + (cell_row + k) * 4
                ax1 = (cx + tl.load(cell)) * scale_x
                ay1 = (cy + tl.load(cell + 1)) * scale_y
                ax2 = (cx + tl.load(cell + 2)) * scale_x
                ay2 = (cy + tl.load(cell + 3)) * scale_y
                iou = _iou(bx1, by1, bx2, by2, area, ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1))
                best = tl.maximum(best, iou)
        need = tl.minimum(tl.where(best > 0.0, best, 0.0), low)  # NaN (an unchecked box): 0, no pruning
        tl.store(need_ptr + rows, need, mask=in_image)
        lowest = tl.minimum(lowest, tl.min(tl.where(in_image, need, low), axis=0))
    if per_image != 0:
        for start in range(box_start, box_end, BOXES):
            rows = start + tl.arange(0, BOXES)
            tl.store(need_ptr + rows, tl.zeros((BOXES,), tl.float32) + lowest, mask=rows < box_end)


# The box-check flag sits inside solve_sparse's offsets (see segments_kernel).
@triton.jit(do_not_specialize=_GATHER_SWITCHES, do_not_specialize_on_alignment=["invalid_ptr"])
def gather_kernel(
    # Pointers
    gt_boxes_ptr,
    gt_offsets_ptr,
    anchors_ptr,
    level_int_ptr,
    level_float_ptr,
    cells_ptr,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    pad_ptr,
    work_ptr,
    box_key_ptr,
    near_ptr,
    bounds_ptr,
    canvas_ptr,
    invalid_ptr,
    need_ptr,
    # Sizes
    num_anchors,
    num_levels,
    num_shapes,
    # Scalars and rule switches
    shape_major,
    ignore_iof_thr,
    use_ignore,
    ignore_wrt_anchor,
    border_rule,
    pad_rule,
    low_quality,
    check_boxes,
    prune,
    # Meta-parameters
    GENERATE: tl.constexpr,
    BUILD_ANCHORS: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BOXES: tl.constexpr,
    NEAR: tl.constexpr,
    RECORDS: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    LONE: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    """Stage 2 as a gather (``_Meta.matching == "gather"``): a program per block of
    BLOCK_A consecutive anchors of one image (the finalize's blocks) builds their boxes
    only if some box is near, tests its image's boxes BOXES at a time against its two
    parts' bounding boxes (a positive intersection with one anchor implies one with the
    bounding box of its part), lists the near ones and visits only those, NEAR at a time
    as a [BLOCK_A, NEAR] tile; no atomic per pair. It writes each anchor's key (the walk's ``atomic_max`` result, as
    a running maximum in registers) and a zero mark, the whole record (no zeroed work
    memory needed); for the low-quality modes, each box's best IoU over the block's
    included anchors, one ``atomic_max`` per (block, box) on its key's high word (ssd_forced:
    on the whole key, with the anchor). The lift runs in ``finalize_kernel`` (LIFT), over
    these box keys.

    work_ptr: [B, A, 4] 32-bit words (see pairs_kernel); box_key_ptr: [N] int64 (zeroed);
    near_ptr: [B * cdiv(num_anchors, BLOCK_A) * BOXES] uint8, each program's list of the
    near boxes among the BOXES (at most 256) it tests at once (contents ignored); bounds_ptr:
    [cdiv(num_anchors, BLOCK_A), BLOCK_BOUNDS] float32, each block's parts' bounding
    boxes and area range (generated anchors; ``triton_backend._block_bounds``).
    check_boxes: each image's first block sets the int64 at invalid_ptr to 1 if one of its
    gt boxes or ignore boxes may be invalid (as segments_kernel does; canvas_ptr: float32
    width, height).
    BUILD_ANCHORS: a generated grid's anchor boxes built from the level tables (the
    level walk, with its integer divisions) or, False, loaded from anchors_ptr (the same
    float32 values, built once per device: ``triton_backend._Meta.load_anchors``); False
    for explicit anchors. The same in finalize_kernel.
    prune: visits only the pairs whose IoU may reach their box's value at need_ptr ([N]
    float32, ``floor_kernel``'s).
    RECORDS: write the records; False (finalize_kernel's INLINE, which matches each block
    itself), only the box keys and the box check: no work memory is written or needed.
    LONE: a step's last near box, where it would be alone in its tile, is visited alone
    (``_block_keys``; the same in finalize_kernel's INLINE).
    SKIP_EMPTY (with RECORDS): a block near no box writes no records, only a zero byte
    where ``_filled_flag`` puts it (near_ptr then holds B * cdiv(num_anchors, BLOCK_A)
    bytes more), and finalize_kernel (SKIP_EMPTY) reads the records of the others only.
    Grid: (cdiv(num_anchors, BLOCK_A), B), or with HEAVY_FIRST (B, cdiv(num_anchors,
    BLOCK_A)): ``_program_block``.
    """
    block, image, num_blocks, batch = _program_block(HEAVY_FIRST)
    first = block * BLOCK_A
    last = tl.minimum(first + BLOCK_A, num_anchors)
    anchor = first + tl.arange(0, BLOCK_A)
    anchor_mask = anchor < num_anchors
    box_start = tl.load(gt_offsets_ptr + image)
    box_end = tl.load(gt_offsets_ptr + image + 1)
    if (check_boxes != 0) & (block == 0):
        for start in range(box_start, box_end, BOXES):
            rows = start + tl.arange(0, BOXES)
            _flag_invalid_boxes(gt_boxes_ptr, rows, rows < box_end, canvas_ptr, invalid_ptr)
        ignore_end = tl.load(ignore_offsets_ptr + image + 1)
        for start in range(tl.load(ignore_offsets_ptr + image), ignore_end, BOXES):
            rows = start + tl.arange(0, BOXES)
            _flag_invalid_boxes(ignore_ptr, rows, rows < ignore_end, canvas_ptr, invalid_ptr)
    # A generated grid's parts from its table (the same anchors _block_anchor_boxes
    # generates), so that a block near no box generates none.
    ax1 = tl.zeros((BLOCK_A,), tl.float32)
    ay1, ax2, ay2 = ax1, ax1, ax1
    parts, area_low, area_high, ax1, ay1, ax2, ay2 = _block_parts(
        block, bounds_ptr, anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr,
        num_levels, shape_major, ax1, ay1, ax2, ay2, GENERATE, BUILD_ANCHORS)  # fmt: skip
    key = tl.zeros((BLOCK_A,), tl.int64)
    # Without records or box keys to fold (a launch for the box check alone), no search.
    searched_end = tl.where((low_quality != 0) | RECORDS, box_end, box_start)
    found, near = _first_near(gt_boxes_ptr, box_key_ptr, box_start, searched_end, parts, area_low, area_high, 0.0,
                              need_ptr, prune, BOXES, False)  # fmt: skip
    if found < searched_end:
        if GENERATE:
            ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr,
                                                     level_int_ptr, level_float_ptr, cells_ptr, num_levels,
                                                     shape_major, BUILD_ANCHORS)  # fmt: skip
        included = anchor_mask
        if low_quality != 0:
            excluded, _outside = _excluded(image, ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1), ignore_ptr,
                                           ignore_offsets_ptr, border_ptr, ignore_iof_thr, use_ignore,
                                           ignore_wrt_anchor, border_rule, BLOCK_G)  # fmt: skip
            if pad_rule != 0:
                excluded = excluded | _outside_padding(anchor, anchor_mask, first, last, level_int_ptr, pad_ptr,
                                                       image, num_levels, num_shapes, shape_major)  # fmt: skip
            included = anchor_mask & ~excluded
        near_rows = near_ptr + (image * num_blocks + block) * BOXES
        # The low half of each included anchor's key for a box's maximum, -1 where
        # excluded (32 bits: one register per anchor through the loop).
        anchor_low = tl.where(included, anchor ^ _INDEX_MASK, -1)
        key = _block_keys(gt_boxes_ptr, box_key_ptr, near_rows, box_start, found, near, box_end, parts, area_low,
                          area_high, need_ptr, prune, anchor_mask, ax1, ay1, ax2, ay2, anchor_low, low_quality, True,
                          BLOCK_A, BOXES, NEAR, LONE)  # fmt: skip
    if RECORDS:
        # The whole 16-byte record: the key, then a zero mark with the unused word after it
        # (one 8-byte store). The key and the mark alone, 12 bytes, left every 32-byte
        # sector written in part, which the L2 cache fills from memory before writing it
        # back (a read of the records for nothing: 103 MB at B = 32).
        records = work_ptr.to(tl.pointer_type(tl.int64)) + (image * num_anchors + anchor) * 2
        written = anchor_mask
        if SKIP_EMPTY:
            # A block near no box (83% of them on COCO-like images, 62% without the
            # threshold pruning) leaves its records alone, which the finalize then does not
            # read: 16 bytes per anchor written and read back for nothing, 86 of 103 MB each
            # way at B = 32 (64 without the pruning; bench_gpu.py --pairs).
            filled = found < searched_end
            tl.store(_filled_flag(near_ptr, image, block, num_blocks, batch, BOXES), filled.to(tl.uint8))
            written = tl.where(filled, written, False)  # (block & scalar fails in Triton's interpreter)
        tl.store(records, key, mask=written)
        tl.store(records + 1, tl.zeros((BLOCK_A,), tl.int64), mask=written)


# --- 4. per anchor: decide, encode, write ---------------------------------------------------


# The classes are read one per positive (a gather: alignment buys nothing), and a
# request's slice of a merged batch starts anywhere.
@triton.jit(do_not_specialize=_FINALIZE_SWITCHES, do_not_specialize_on_alignment=["gt_classes_ptr"])
def finalize_kernel(
    # Pointers: inputs
    gt_boxes_ptr,
    gt_offsets_ptr,
    gt_classes_ptr,
    anchors_ptr,
    level_int_ptr,
    level_float_ptr,
    cells_ptr,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    pad_ptr,
    work_ptr,
    box_key_ptr,
    near_ptr,
    bounds_ptr,
    # Pointers: dense outputs (OUTPUT_DENSE; deltas go to work_ptr)
    labels_ptr,
    matched_ptr,
    classes_ptr,
    max_iou_ptr,
    # Pointers: sparse outputs (OUTPUT_COUNT writes counts, OUTPUT_SPARSE reads starts)
    block_counts_ptr,
    block_starts_ptr,
    offsets_ptr,
    positive_anchors_ptr,
    positive_matched_ptr,
    positive_deltas_ptr,
    positive_classes_ptr,
    ignored_anchors_ptr,
    # Sizes
    num_anchors,
    num_levels,
    num_shapes,
    positive_capacity,
    ignored_capacity,
    # Scalars: matching
    high,
    low,
    ignore_iof_thr,
    min_pos_iou,
    # Scalars: encoding
    weight_x,
    weight_y,
    weight_w,
    weight_h,
    mean_x,
    mean_y,
    mean_w,
    mean_h,
    std_x,
    std_y,
    std_w,
    std_h,
    background_class,
    # Rule switches and optional outputs (0 / 1, or a code)
    shape_major,
    low_quality,
    strict_high,
    use_ignore,
    ignore_wrt_anchor,
    border_rule,
    pad_rule,
    has_classes,
    want_max_iou,
    # Meta-parameters
    OUTPUT: tl.constexpr,
    GENERATE: tl.constexpr,
    BUILD_ANCHORS: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
    LIFT: tl.constexpr,
    BOXES: tl.constexpr,
    NEAR: tl.constexpr,
    INLINE: tl.constexpr,
    MATCH_NEAR: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    LONE: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    """Match a block of anchors of one image from their keys and marks, encode, write.

    INLINE: the keys are found here (``_block_keys``, as gather_kernel finds them, over
    its near_ptr and bounds_ptr, MATCH_NEAR boxes visited at once: the gather's width)
    instead of read from the work memory, which then holds nothing between the passes
    (OUTPUT_DENSE writes the deltas there, the other outputs do not touch it); the marks
    come from the lift (LIFT, in every output) and gather_kernel, if it ran, wrote only
    the box keys. No mode that marks with forced_kernel.

    SKIP_EMPTY (after gather_kernel's SKIP_EMPTY, not INLINE): a block reads its records
    only where its flag (``_filled_flag``, in near_ptr) says the gather wrote them; the
    others hold key 0 and mark 0 (no box near: every IoU is 0, and nothing is lifted or
    forced there).

    LIFT (after ``gather_kernel``, a mode that lifts; OUTPUT_DENSE and OUTPUT_COUNT, and
    with INLINE OUTPUT_SPARSE too): the block's marks are found here (``_lift_marks``,
    BOXES boxes tested and NEAR visited at once, over box_key_ptr [N] int64 and
    gather_kernel's near_ptr and bounds_ptr) rather than in a launch of their own, which
    generated the block's anchors a second time; OUTPUT_COUNT stores the marks it found
    in work_ptr for OUTPUT_SPARSE (not with INLINE: no records). Otherwise the marks are
    read from work_ptr (the walk's lift, forced_kernel's, or OUTPUT_COUNT's).

    pad_ptr: [B, R, 2] int32 (see pairs_kernel), read when pad_rule != 0.
    work_ptr: [B, A, 4] 32-bit words (key, mark; see pairs_kernel). OUTPUT_DENSE writes
        labels [B, A] int8, matched [B, A] int32, classes [B, A] int32 (if has_classes),
        max_iou [B, A] float32 (if want_max_iou) and the deltas [B, A, 4] float32 over
        work_ptr itself. OUTPUT_COUNT writes block_counts [B, nblocks, 2] int32 (positive,
        ignored). OUTPUT_SPARSE reads those counts (to skip empty blocks) and writes,
        from block_starts [B * nblocks, 2] int64 (each block's first output rows within
        its image) and offsets [3, B + 1] int64 (rows 0-1: each image's first rows; [2, B]
        the box check's flag, not read here), positives
        (anchor int32, matched int32, deltas [P, 4] float32, class int32) and ignored
        anchors (int32), in anchor order; rows at or past ``positive_capacity`` /
        ``ignored_capacity`` (the lists' lengths) are not written.
    Grid: (cdiv(num_anchors, BLOCK_A), B), or with HEAVY_FIRST (B, cdiv(num_anchors,
    BLOCK_A)): ``_program_block``.

    Ties (worked example): anchor 7 has IoU 0.3 with boxes 2 and 5 -> box 2 (its key
    holds the larger 2^31 - 1 - box).
    """
    block, image, num_blocks, batch = _program_block(HEAVY_FIRST)
    if OUTPUT == _OUTPUT_SPARSE:
        # Most blocks list nothing (COCO-like images: ~1% of anchors are listed): they
        # stop here, before any per-anchor work.
        counts = block_counts_ptr + (image * num_blocks + block) * 2
        if tl.load(counts) + tl.load(counts + 1) == 0:
            return
    box_start = tl.load(gt_offsets_ptr + image)
    has_boxes = tl.load(gt_offsets_ptr + image + 1) > box_start
    first = block * BLOCK_A
    last = tl.minimum(first + BLOCK_A, num_anchors)
    anchor = first + tl.arange(0, BLOCK_A)
    anchor_mask = anchor < num_anchors

    # The anchors' boxes serve the rules below and the encoding. Without rules they are
    # built only in blocks that encode a positive: a COCO-like image's other blocks (most
    # of them, and every block of the count pass) skip the level walk and its divisions.
    geometry_rules = (use_ignore != 0) | (border_rule != 0) | (pad_rule != 0)
    ax1 = tl.zeros((BLOCK_A,), tl.float32)
    ay1, ax2, ay2 = ax1, ax1, ax1
    excluded = tl.zeros((BLOCK_A,), tl.int1)
    outside = excluded
    if geometry_rules:
        ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr,
                                                 level_float_ptr, cells_ptr, num_levels, shape_major,
                                                 BUILD_ANCHORS)  # fmt: skip
        excluded, outside = _excluded(image, ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1), ignore_ptr,
                                      ignore_offsets_ptr, border_ptr, ignore_iof_thr, use_ignore, ignore_wrt_anchor,
                                      border_rule, BLOCK_G)  # fmt: skip
        if pad_rule != 0:
            excluded = excluded | _outside_padding(anchor, anchor_mask, first, last, level_int_ptr, pad_ptr, image,
                                                   num_levels, num_shapes, shape_major)  # fmt: skip
    included = anchor_mask & ~excluded
    anchors_built = geometry_rules

    dense = image * num_anchors + anchor  # int64: B * A may pass 2^31
    records = anchor_mask  # the anchors whose key and mark are read from work_ptr
    if INLINE:
        key = tl.zeros((BLOCK_A,), tl.int64)
        box_end = tl.load(gt_offsets_ptr + image + 1)
        parts, _area_low, _area_high, ax1, ay1, ax2, ay2 = _block_parts(
            block, bounds_ptr, anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr, level_float_ptr,
            cells_ptr, num_levels, shape_major, ax1, ay1, ax2, ay2, GENERATE, BUILD_ANCHORS)  # fmt: skip
        anchors_built = anchors_built | (not GENERATE)  # explicit anchors: loaded for their bounds
        found, near = _first_near(gt_boxes_ptr, box_key_ptr, box_start, box_end, parts, 0.0, 0.0, 0.0, gt_boxes_ptr,
                                  0, BOXES, False)  # fmt: skip
        visits = found < box_end
        if visits:
            if GENERATE:
                if ~anchors_built:
                    ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr,
                                                             level_int_ptr, level_float_ptr, cells_ptr, num_levels,
                                                             shape_major, BUILD_ANCHORS)  # fmt: skip
            near_rows = near_ptr + (image * num_blocks + block) * BOXES
            key = _block_keys(gt_boxes_ptr, box_key_ptr, near_rows, box_start, found, near, box_end, parts, 0.0,
                              0.0, gt_boxes_ptr, 0, anchor_mask, ax1, ay1, ax2, ay2, 0, 0, False, BLOCK_A, BOXES,
                              MATCH_NEAR, LONE)  # fmt: skip
        anchors_built = anchors_built | visits
    else:
        if SKIP_EMPTY:
            filled = tl.load(_filled_flag(near_ptr, image, block, num_blocks, batch, BOXES)) != 0
            records = tl.where(filled, records, False)
        key = tl.load(work_ptr.to(tl.pointer_type(tl.int64)) + dense * 2, mask=records, other=0)
    bits = (key >> 32).to(tl.int32)
    # No overlapping box: IoU 0 with every box, and the lowest box index is 0.
    best_box = tl.where(bits > 0, ((key & _INDEX_MASK) ^ _INDEX_MASK).to(tl.int32), 0)
    best_iou = bits.to(tl.float32, bitcast=True)
    # An image without boxes: every included anchor is negative, none matched.
    best_box = tl.where(has_boxes, best_box, -1)
    best_iou = tl.where(has_boxes, best_iou, -1.0)
    mark = tl.zeros((BLOCK_A,), tl.int32)
    if LIFT:
        # An anchor is lifted where its IoU with a box is that box's maximum, which is
        # positive and at least min_pos_iou: so is the anchor's own best IoU. A block whose
        # included anchors all fall short (most blocks of a COCO-like image; every block of
        # an image without boxes, whose best IoU is -1) tests no box.
        block_best = tl.max(tl.where(included, best_iou, 0.0), axis=0)
        if (block_best > 0.0) & (block_best >= min_pos_iou):
            # The boxes that may reach their maximum in this block (the grid's table of
            # block bounds: a block far from them builds no anchors for the lift).
            parts, area_low, area_high, ax1, ay1, ax2, ay2 = _block_parts(
                block, bounds_ptr, anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr, level_float_ptr,
                cells_ptr, num_levels, shape_major, ax1, ay1, ax2, ay2, GENERATE, BUILD_ANCHORS)  # fmt: skip
            box_end = tl.load(gt_offsets_ptr + image + 1)
            found, _near = _first_near(gt_boxes_ptr, box_key_ptr, box_start, box_end, parts, area_low, area_high,
                                       min_pos_iou, gt_boxes_ptr, 0, BOXES, True)  # fmt: skip
            # _lift_marks tests again from the start: it bounds the areas by the included anchors only.
            lifts = found < box_end
            if lifts:
                if GENERATE:
                    if ~anchors_built:
                        ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr,
                                                                 level_int_ptr, level_float_ptr, cells_ptr,
                                                                 num_levels, shape_major, BUILD_ANCHORS)  # fmt: skip
                near_rows = near_ptr + (image * num_blocks + block) * BOXES
                mark = _lift_marks(gt_boxes_ptr, box_key_ptr, near_rows, box_start, box_end, parts, ax1, ay1, ax2, ay2,
                                   included, min_pos_iou, BLOCK_A, BOXES, NEAR)  # fmt: skip
                if OUTPUT == _OUTPUT_COUNT:
                    if not INLINE:  # for OUTPUT_SPARSE (gather_kernel wrote zeros; INLINE: it lifts again)
                        tl.store(work_ptr.to(tl.pointer_type(tl.int32)) + dense * 4 + 2, mark, mask=mark > 0)
            anchors_built = anchors_built | lifts
    elif low_quality != 0:
        mark = tl.load(work_ptr.to(tl.pointer_type(tl.int32)) + dense * 4 + 2, mask=records, other=0)

    # Thresholds: [low, high) ignored; strict_high (DALI/MLPerf SSD) flips both ends, (low, high].
    strict = strict_high != 0
    positive = included & ((best_iou > high) | (~strict & (best_iou == high)))
    matched = tl.where(positive, best_box, -1)
    # Low-quality lifts: torchvision/detectron2 keep the anchor's own argmax box,
    # mmdet/ssd_forced take the highest box that lifted it (marks hold box + 1).
    lifted = included & (mark > 0)
    lifts_own = (low_quality == _LQ_TORCHVISION) | (low_quality == _LQ_DETECTRON2)
    matched = tl.where(lifted, tl.where(lifts_own, best_box, mark - 1), matched)
    positive = positive | lifted
    negative = included & ((best_iou < low) | (strict & (best_iou == low))) & ~positive
    labels = tl.where(positive, 1, tl.where(negative, 0, -1))
    labels = tl.where(outside & (border_rule == _BORDER_POST), -1, labels)
    positive = labels == 1
    detectron2_matched = tl.where(included, best_box, -1)
    matched = tl.where(low_quality == _LQ_DETECTRON2, detectron2_matched, tl.where(positive, matched, -1))
    ignored = anchor_mask & (labels == -1)

    if OUTPUT == _OUTPUT_COUNT:
        # Both counts in one block reduction: positives in the low 16 bits, ignored above
        # (a block has at most BLOCK_A < 2^15 of each: 2^15 ignored would reach the sign
        # bit; _Meta refuses such a block).
        both = tl.sum((positive & anchor_mask).to(tl.int32) + (ignored.to(tl.int32) << 16), axis=0)
        counts = block_counts_ptr + (image * num_blocks + block) * 2
        tl.store(counts, both & 0xFFFF)
        tl.store(counts + 1, both >> 16)
    else:
        # Encoding (torchvision's BoxCoder order, then mmdet's (d - mean) / std) into one
        # [BLOCK_A, 4] tile, so each thread writes an anchor's 16 bytes in one vector
        # store. Only blocks with a positive pay for the logs and divisions. The
        # reduction is also the barrier after which a block may overwrite its keys.
        column = tl.arange(0, 4)[None, :]
        deltas = tl.zeros((BLOCK_A, 4), tl.float32)
        if tl.max(positive.to(tl.int32), axis=0) > 0:
            if ~anchors_built:
                ax1, ay1, ax2, ay2 = _block_anchor_boxes(anchor, anchor_mask, first, last, anchors_ptr, level_int_ptr,
                                                         level_float_ptr, cells_ptr, num_levels, shape_major,
                                                         BUILD_ANCHORS)  # fmt: skip
            row = gt_boxes_ptr + (box_start + tl.where(positive, matched, 0).to(tl.int64)) * 4
            gx1 = tl.load(row, mask=positive, other=0.0)
            gy1 = tl.load(row + 1, mask=positive, other=0.0)
            gx2 = tl.load(row + 2, mask=positive, other=1.0)
            gy2 = tl.load(row + 3, mask=positive, other=1.0)
            aw = tl.where(positive, ax2 - ax1, 1.0)
            ah = tl.where(positive, ay2 - ay1, 1.0)
            acx = tl.where(positive, ax1, 0.0) + 0.5 * aw
            acy = tl.where(positive, ay1, 0.0) + 0.5 * ah
            gw = gx2 - gx1
            gh = gy2 - gy1
            gcx = gx1 + 0.5 * gw
            gcy = gy1 + 0.5 * gh
            dx = tl.div_rn(tl.div_rn(weight_x * (gcx - acx), aw) - mean_x, std_x)
            dy = tl.div_rn(tl.div_rn(weight_y * (gcy - acy), ah) - mean_y, std_y)
            dw = tl.div_rn(weight_w * tl.log(tl.div_rn(gw, aw)) - mean_w, std_w)
            dh = tl.div_rn(weight_h * tl.log(tl.div_rn(gh, ah)) - mean_h, std_h)
            deltas = tl.where(column == 0, dx[:, None], tl.where(column == 1, dy[:, None],
                              tl.where(column == 2, dw[:, None], dh[:, None])))  # fmt: skip
            deltas = tl.where(positive[:, None], deltas, 0.0)
        if has_classes != 0:
            box_class = tl.load(gt_classes_ptr + box_start + matched.to(tl.int64), mask=positive, other=0)
        else:
            box_class = tl.zeros((BLOCK_A,), tl.int32)
        if OUTPUT == _OUTPUT_DENSE:
            tl.store(labels_ptr + dense, labels.to(tl.int8), mask=anchor_mask)
            tl.store(matched_ptr + dense, matched, mask=anchor_mask)
            tl.store(work_ptr + dense[:, None] * 4 + column, deltas, mask=anchor_mask[:, None])
            if has_classes != 0:
                tl.store(classes_ptr + dense, tl.where(positive, box_class, background_class), mask=anchor_mask)
            if want_max_iou != 0:
                tl.store(max_iou_ptr + dense, tl.where(has_boxes, best_iou, 0.0), mask=anchor_mask)
        else:
            starts = block_starts_ptr + (image * num_blocks + block) * 2
            first_positive = tl.load(offsets_ptr + image) + tl.load(starts)
            out = first_positive + tl.cumsum(positive.to(tl.int32), axis=0).to(tl.int64) - 1
            fits = positive & (out < positive_capacity)
            tl.store(positive_anchors_ptr + out, anchor, mask=fits)
            tl.store(positive_matched_ptr + out, matched, mask=fits)
            tl.store(positive_deltas_ptr + out[:, None] * 4 + column, deltas, mask=fits[:, None])
            if has_classes != 0:
                tl.store(positive_classes_ptr + out, box_class, mask=fits)
            first_ignored = tl.load(offsets_ptr + batch + 1 + image) + tl.load(starts + 1)
            out = first_ignored + tl.cumsum(ignored.to(tl.int32), axis=0).to(tl.int64) - 1
            tl.store(ignored_anchors_ptr + out, anchor, mask=ignored & (out < ignored_capacity))


@triton.jit(do_not_specialize=["num_blocks", "batch"])
def scan_kernel(block_counts_ptr, block_starts_ptr, totals_ptr, offsets_ptr, flags_ptr, num_blocks, batch,
                BLOCK: tl.constexpr, IMAGES: tl.constexpr):  # fmt: skip
    """Exclusive scan of one image's per-block counts; the last program to finish also
    lays the images end to end.

    block_counts_ptr: [B * nblocks, 2] int32 (positive, ignored); block_starts_ptr: same
    shape int64 out, each block's first output row within its image; totals_ptr: [2, B]
    int64 scratch, the image's positives (row 0) and ignored anchors (row 1); offsets_ptr:
    [3, B + 1] int64 out, uninitialised: rows 0 and 1 each image's first positive and
    ignored row, then the totals; [2, B] a copy of the invalid-box flag, to be read back
    with the totals beside it (the rest of row 2 is left alone); flags_ptr: two zeroed
    int64, the invalid-box flag (set by the match stage) and the count of programs done.
    A RetinaNet image has 1,575 blocks: one step of BLOCK = 2048; the last program scans
    the images IMAGES at a time (``triton_backend.SCAN_STEPS``). (A torch cumsum across
    the outer dimension of [B * nblocks, 2] took milliseconds; the images' offsets, a
    cumsum and a copy on the host's side, two launches; zeroing the offsets, a memset.)
    Grid: (B,).
    """
    image = tl.program_id(0).to(tl.int64)
    # An image's rows are fewer than its anchors (int32 indices): its scan in int32, half
    # the registers of int64 (the images' scan below stays int64).
    image_positive = tl.program_id(0) * 0
    image_ignored = tl.program_id(0) * 0
    for first in range(0, num_blocks, BLOCK):
        block = first + tl.arange(0, BLOCK)
        real = block < num_blocks
        flat = image * num_blocks + block
        positive = tl.load(block_counts_ptr + flat * 2, mask=real, other=0)
        ignored = tl.load(block_counts_ptr + flat * 2 + 1, mask=real, other=0)
        positive_start = image_positive + tl.cumsum(positive, axis=0) - positive
        ignored_start = image_ignored + tl.cumsum(ignored, axis=0) - ignored
        tl.store(block_starts_ptr + flat * 2, positive_start.to(tl.int64), mask=real)
        tl.store(block_starts_ptr + flat * 2 + 1, ignored_start.to(tl.int64), mask=real)
        image_positive += tl.sum(positive, axis=0)
        image_ignored += tl.sum(ignored, axis=0)
    tl.store(totals_ptr + image, image_positive.to(tl.int64))
    tl.store(totals_ptr + batch + image, image_ignored.to(tl.int64))
    # The program that finishes last sees every image's totals: the stores above are
    # ordered before its count (the barrier, then the count's release), and the last
    # count's acquire orders the reads below after all of them.
    tl.debug_barrier()
    if tl.atomic_add(flags_ptr + 1, 1, sem="acq_rel") == batch - 1:
        row = batch + 1  # offsets' row length
        tl.store(offsets_ptr, image * 0)
        tl.store(offsets_ptr + row, image * 0)
        tl.store(offsets_ptr + 2 * row + batch, tl.load(flags_ptr))
        carry_positive = image * 0
        carry_ignored = image * 0
        for first in range(0, batch, IMAGES):
            images = first + tl.arange(0, IMAGES)
            real = images < batch
            positive = tl.load(totals_ptr + images, mask=real, other=0)
            ignored = tl.load(totals_ptr + batch + images, mask=real, other=0)
            tl.store(offsets_ptr + 1 + images, carry_positive + tl.cumsum(positive, axis=0), mask=real)
            tl.store(offsets_ptr + row + 1 + images, carry_ignored + tl.cumsum(ignored, axis=0), mask=real)
            carry_positive += tl.sum(positive, axis=0)
            carry_ignored += tl.sum(ignored, axis=0)
