"""The fused Triton kernels: anchors, IoU, max-IoU matching and encoding.

Reading order: the tuning constants, the small ``@triton.jit`` building blocks
(anchor from index, IoU, exclusion rules), then the two passes of DESIGN §5:

* ``box_max_kernel`` (pass 1, only for low-quality modes): per box, the best IoU over
  the included anchors of its image and the lowest anchor index reaching it, reduced
  across programs by ``atomic_max`` on one int64 key ``(IoU bits << 32) | (2^31 - 1 -
  anchor)``: a larger key is a larger IoU, then a lower anchor index.
* ``assign_kernel`` (pass 2): per anchor, its best box (lowest index on ties),
  thresholds, the low-quality rule, ignore regions, the border rule, encoding and
  every write, plus per-block counts for the sparse compaction
  (``tritarget.kernels.triton_compact``).

Both kernels stream: a program holds ``BLOCK_A`` anchors and walks its image's boxes
``BLOCK_G`` at a time, so memory is O(A + G) and any number of boxes per image works.
One launch covers the whole ragged batch: axis 0 of the grid is the anchor block,
axis 1 the image, and ``gt_offsets`` give each image's rows. A chunk of boxes none of
which touches the block's bounding box has IoU exactly 0 with all its anchors; both
passes then skip its IoU tile (pass 2 unless a box of the chunk has best IoU 0, which
lifts zero-IoU anchors). Encoding runs only in blocks that have a positive.

Compile once: the matching rules (low-quality mode, strict threshold, ignore regions,
border rule) and the optional outputs are runtime scalars, not ``tl.constexpr``. Every
constexpr combination is a separate compilation (about a second each), and a rule's
branch is the same for every thread of a program (a uniform scalar branch), so it
costs a few instructions, not divergence. Only the anchor source (generated or
explicit: a different pointer) and the block sizes are compile-time.

Exactness: IoU, IoF and the anchor formula are evaluated in float32 in the
reference's operation order, with IEEE division (``tl.div_rn``; Triton's ``/`` may be
approximate on GPU) and launched with ``enable_fp_fusion=False`` (no mul+add
contraction into FMA), so labels and matched indices equal the reference bit for bit.
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
    "box_max_kernel",
    "assign_kernel",
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

# Runtime switches must not be specialised: Triton compiles an int argument equal to 1
# as a constant, which would bring back one compilation per combination.
_PASS1_SWITCHES = ["num_levels", "shape_major", "use_ignore", "ignore_wrt_anchor", "border_rule"]
_PASS2_SWITCHES = [*_PASS1_SWITCHES, "low_quality", "strict_high", "background_class"]
_PASS2_SWITCHES += ["has_classes", "want_max_iou", "count_sparse"]

# Per-level table layout (see triton_backend._level_tables): int64 columns
# (first anchor, height, width, shapes per cell, first row in the cell table, 1 if the
# centre is (i + offset) / factor else (i + offset) * factor) and float32 columns
# (offset, factor_x, factor_y, scale_x, scale_y).
LEVEL_INT_FIELDS = 6
LEVEL_FLOAT_FIELDS = 5
_LEVEL_INT_FIELDS = tl.constexpr(6)
_LEVEL_FLOAT_FIELDS = tl.constexpr(5)

# A packed key's low half holds 2^31 - 1 - anchor (anchors per image < 2^31, checked
# by the launcher), so that on equal IoU bits the lower anchor index gives the larger
# key; an int32 literal keeps every operand signed.
_INDEX_MASK = tl.constexpr(2**31 - 1)
# Larger than any box index within an image: the neutral element of the tie "min".
_NO_BOX = tl.constexpr(2**31 - 1)


@triton.jit
def _anchor_boxes(
    anchor,
    anchor_mask,
    first_anchor,
    end_anchor,
    anchors_ptr,
    level_int_ptr,
    level_float_ptr,
    cells_ptr,
    num_levels,
    shape_major,
    GENERATE: tl.constexpr,
):
    """x1, y1, x2, y2 ([BLOCK_A] float32 each) of anchors by index within the image.

    anchor: [BLOCK_A] int32 anchor indices, anchor_mask: which are real, and
        [first_anchor, end_anchor) the range they span (scalars).
    anchors_ptr: explicit anchors, [A, 4] float32 x1 y1 x2 y2 (read if not GENERATE).
    level_int_ptr: [num_levels, 6] int64, level_float_ptr: [num_levels, 5] float32: the
        per-level tables; cells_ptr: [sum K, 4] float32 cell-anchor offsets.
    shape_major: 1 for yolo's [K, H, W] order within a level, 0 for [H, W, K].

    Generated anchors follow tritarget.kernels.anchors exactly (float32, one rounding
    per operation): cx = (x + offset) * factor (or / factor), then
    ((cx, cy, cx, cy) + cell[k]) * (sx, sy, sx, sy), scale 1 where a layout has none.
    Only the levels that the block overlaps are evaluated (one, at a level's end two):
    the integer divisions that split an index into (cell, shape) are not cheap.
    """
    if GENERATE:
        x1 = tl.zeros(anchor.shape, tl.float32)
        y1 = tl.zeros(anchor.shape, tl.float32)
        x2 = tl.zeros(anchor.shape, tl.float32)
        y2 = tl.zeros(anchor.shape, tl.float32)
        for lv in range(num_levels):
            ints = level_int_ptr + lv * _LEVEL_INT_FIELDS
            start = tl.load(ints).to(tl.int32)
            height = tl.load(ints + 1).to(tl.int32)
            width = tl.load(ints + 2).to(tl.int32)
            shapes = tl.load(ints + 3).to(tl.int32)
            count = height * width * shapes
            if (start < end_anchor) & (start + count > first_anchor):
                cell_row = tl.load(ints + 4).to(tl.int32)
                center_div = tl.load(ints + 5)
                floats = level_float_ptr + lv * _LEVEL_FLOAT_FIELDS
                offset = tl.load(floats)
                factor_x = tl.load(floats + 1)
                factor_y = tl.load(floats + 2)
                scale_x = tl.load(floats + 3)
                scale_y = tl.load(floats + 4)

                local = anchor - start
                in_level = anchor_mask & (local >= 0) & (local < count)
                local = tl.where(in_level, local, 0)
                if shape_major != 0:
                    k = local // (height * width)
                    cell = local % (height * width)
                else:
                    k = local % shapes
                    cell = local // shapes
                px = (cell % width).to(tl.float32) + offset
                py = (cell // width).to(tl.float32) + offset
                if center_div != 0:
                    cx = tl.div_rn(px, factor_x)
                    cy = tl.div_rn(py, factor_y)
                else:
                    cx = px * factor_x
                    cy = py * factor_y
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
def _intersection(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2):
    """[BLOCK_G, BLOCK_A] intersection areas of boxes ([BLOCK_G, 1]) and anchors ([1, BLOCK_A])."""
    w = tl.maximum(tl.minimum(bx2, ax2) - tl.maximum(bx1, ax1), 0.0)
    h = tl.maximum(tl.minimum(by2, ay2) - tl.maximum(by1, ay1), 0.0)
    return w * h


@triton.jit
def _iou(bx1, by1, bx2, by2, box_area, ax1, ay1, ax2, ay2, anchor_area):
    """[BLOCK_G, BLOCK_A] IoU in torchvision's order: inter / ((area_box + area_anchor) - inter), 0 where union is 0."""
    inter = _intersection(bx1, by1, bx2, by2, ax1, ay1, ax2, ay2)
    union = box_area + anchor_area - inter
    positive = union > 0.0
    return tl.where(positive, tl.div_rn(inter, tl.where(positive, union, 1.0)), 0.0)


@triton.jit
def _load_boxes(boxes_ptr, rows, mask):
    """x1, y1, x2, y2, area as [BLOCK, 1] float32 of boxes ([N, 4] float32) at int64 ``rows``."""
    row = boxes_ptr + rows * 4
    x1 = tl.load(row, mask=mask, other=0.0)
    y1 = tl.load(row + 1, mask=mask, other=0.0)
    x2 = tl.load(row + 2, mask=mask, other=0.0)
    y2 = tl.load(row + 3, mask=mask, other=0.0)
    area = (x2 - x1) * (y2 - y1)
    return x1[:, None], y1[:, None], x2[:, None], y2[:, None], area[:, None]


@triton.jit
def _extent(ax1, ay1, ax2, ay2, anchor_mask):
    """Bounding box (4 scalars) of a block's real anchors."""
    return (
        tl.min(tl.where(anchor_mask, ax1, float("inf")), axis=0),
        tl.min(tl.where(anchor_mask, ay1, float("inf")), axis=0),
        tl.max(tl.where(anchor_mask, ax2, -float("inf")), axis=0),
        tl.max(tl.where(anchor_mask, ay2, -float("inf")), axis=0),
    )


@triton.jit
def _touches(bx1, by1, bx2, by2, row_mask, ex1, ey1, ex2, ey2):
    """Whether any box of a chunk ([BLOCK_G, 1] coordinates) may intersect the extent.

    When none does, every intersection with the block's anchors is exactly 0 (min - max
    of the edges is <= 0 on one axis, and float subtraction keeps that sign), so every
    IoU is exactly 0 and the chunk's tile need not be computed.
    """
    touch = row_mask[:, None] & (bx1 < ex2) & (bx2 > ex1) & (by1 < ey2) & (by2 > ey1)
    return tl.max(tl.max(touch.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _excluded(
    image,
    ax1,
    ay1,
    ax2,
    ay2,
    anchor_area,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    ignore_iof_thr,
    use_ignore,
    ignore_wrt_anchor,
    border_rule,
    BLOCK_G: tl.constexpr,
):
    """(excluded, outside): [BLOCK_A] bool each.

    excluded: taken out before matching -- IoF with an ignore box > ignore_iof_thr
        (mmdet; IoF over the anchor's area if ignore_wrt_anchor, else over the ignore
        box's), or across the border when border_rule is pre-match.
    outside: across the border (x1 >= -b, y1 >= -b, x2 < w + b, y2 < h + b fails).
    ignore_ptr: [M, 4] float32 ignore boxes; ignore_offsets_ptr: [B + 1] int64.
    border_ptr: [B, 3] float32 per image (-b, w + b, h + b), rounded to float32 as
        torch rounds a Python scalar compared with a float32 tensor.
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
            ix1, iy1, ix2, iy2, ignore_area = _load_boxes(ignore_ptr, rows, row_mask)
            inter = _intersection(ix1, iy1, ix2, iy2, ax1[None, :], ay1[None, :], ax2[None, :], ay2[None, :])
            area = tl.where(ignore_wrt_anchor != 0, anchor_area[None, :], ignore_area)  # [BLOCK_G, BLOCK_A]
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
def _block_anchors(
    image, block, num_anchors, anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr, num_levels, shape_major,
    ignore_ptr, ignore_offsets_ptr, border_ptr, ignore_iof_thr, use_ignore, ignore_wrt_anchor, border_rule,
    GENERATE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """The program's block of anchors, shared by both passes.

    Returns anchor indices [BLOCK_A], their mask, x1 y1 x2 y2 and area, and whether each
    is excluded before matching / outside the border (see _anchor_boxes, _excluded).
    """
    first = block * BLOCK_A
    anchor = first + tl.arange(0, BLOCK_A)
    anchor_mask = anchor < num_anchors
    ax1, ay1, ax2, ay2 = _anchor_boxes(
        anchor, anchor_mask, first, tl.minimum(first + BLOCK_A, num_anchors), anchors_ptr,
        level_int_ptr, level_float_ptr, cells_ptr, num_levels, shape_major, GENERATE,
    )  # fmt: skip
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    excluded, outside = _excluded(
        image, ax1, ay1, ax2, ay2, anchor_area, ignore_ptr, ignore_offsets_ptr, border_ptr,
        ignore_iof_thr, use_ignore, ignore_wrt_anchor, border_rule, BLOCK_G,
    )  # fmt: skip
    return anchor, anchor_mask, ax1, ay1, ax2, ay2, anchor_area, excluded, outside


@triton.jit(do_not_specialize=_PASS1_SWITCHES)
def box_max_kernel(
    # Pointers
    gt_boxes_ptr,
    gt_offsets_ptr,
    box_key_ptr,
    anchors_ptr,
    level_int_ptr,
    level_float_ptr,
    cells_ptr,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    # Sizes
    num_anchors,
    num_levels,
    # Scalars and rule switches
    ignore_iof_thr,
    shape_major,
    use_ignore,
    ignore_wrt_anchor,
    border_rule,
    # Meta-parameters
    GENERATE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Pass 1: each box's best IoU over its image's included anchors, and the best anchor.

    gt_boxes_ptr: [N, 4] float32 x1 y1 x2 y2, all images' boxes one after another.
    gt_offsets_ptr: [B + 1] int64, image i owns rows gt_offsets[i]:gt_offsets[i + 1].
    box_key_ptr: [N] int64, filled with -1 by the launcher; receives
        max over included anchors a of (IoU bits << 32) | (2^31 - 1 - a). It stays -1
        for a box without an included anchor. IoU >= 0, so its float32 bits order as
        integers do.
    anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr, shape_major: see _anchor_boxes.
    ignore_ptr, ignore_offsets_ptr, border_ptr, use_ignore, ignore_wrt_anchor,
        border_rule: see _excluded.
    Grid: (cdiv(num_anchors, BLOCK_A), B).
    """
    block = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    box_start = tl.load(gt_offsets_ptr + image)
    box_end = tl.load(gt_offsets_ptr + image + 1)
    if box_end > box_start:
        anchor, anchor_mask, ax1, ay1, ax2, ay2, anchor_area, excluded, _ = _block_anchors(
            image, block, num_anchors, anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr, num_levels,
            shape_major, ignore_ptr, ignore_offsets_ptr, border_ptr, ignore_iof_thr, use_ignore,
            ignore_wrt_anchor, border_rule, GENERATE, BLOCK_A, BLOCK_G,
        )  # fmt: skip
        included = anchor_mask & ~excluded
        anchor_code = anchor.to(tl.int64) ^ _INDEX_MASK  # 2^31 - 1 - anchor, [BLOCK_A]
        # The key of IoU 0: the block's lowest included anchor (-1 if none).
        zero_key = tl.max(tl.where(included, anchor_code, -1), axis=0)
        ex1, ey1, ex2, ey2 = _extent(ax1, ay1, ax2, ay2, anchor_mask)
        for g0 in range(box_start, box_end, BLOCK_G):
            rows = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
            row_mask = rows < box_end
            bx1, by1, bx2, by2, box_area = _load_boxes(gt_boxes_ptr, rows, row_mask)
            if _touches(bx1, by1, bx2, by2, row_mask, ex1, ey1, ex2, ey2):
                iou = _iou(bx1, by1, bx2, by2, box_area, ax1[None, :], ay1[None, :], ax2[None, :], ay2[None, :],
                           anchor_area[None, :])  # fmt: skip
                # +0.0 for any -0.0, whose sign bit would make a negative key.
                iou = tl.where(iou > 0.0, iou, 0.0)
                key = (iou.to(tl.int32, bitcast=True).to(tl.int64) << 32) | anchor_code[None, :]
                key = tl.where(row_mask[:, None] & included[None, :], key, -1)
                best = tl.max(key, axis=1)  # [BLOCK_G]
            else:
                best = tl.where(row_mask, zero_key, -1)
            tl.atomic_max(box_key_ptr + rows, best, mask=row_mask & (best >= 0))


@triton.jit(do_not_specialize=_PASS2_SWITCHES)
def assign_kernel(
    # Pointers: inputs
    gt_boxes_ptr,
    gt_offsets_ptr,
    gt_classes_ptr,
    box_key_ptr,
    anchors_ptr,
    level_int_ptr,
    level_float_ptr,
    cells_ptr,
    ignore_ptr,
    ignore_offsets_ptr,
    border_ptr,
    # Pointers: outputs
    labels_ptr,
    matched_ptr,
    deltas_ptr,
    classes_ptr,
    max_iou_ptr,
    block_counts_ptr,
    # Sizes
    num_anchors,
    num_levels,
    # Scalars: matching
    high,
    low,
    min_pos_iou,
    ignore_iof_thr,
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
    has_classes,
    want_max_iou,
    count_sparse,
    # Meta-parameters
    GENERATE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Pass 2: match every anchor of the batch, encode, write.

    gt_boxes_ptr: [N, 4] float32; gt_offsets_ptr: [B + 1] int64 (see box_max_kernel).
    gt_classes_ptr: [N] int32 class of each box (read if has_classes).
    box_key_ptr: [N] int64 pass-1 keys (read unless low_quality is 0, none).
    anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr, shape_major: see _anchor_boxes.
    ignore_ptr, ignore_offsets_ptr, border_ptr, use_ignore, ignore_wrt_anchor,
        border_rule: see _excluded.
    labels_ptr: [B, A] int8 out, 1 positive / 0 negative / -1 ignored.
    matched_ptr: [B, A] int32 out, box index within the image or -1.
    deltas_ptr: [B, A, 4] float32 out, (dx, dy, dw, dh), zeros where not positive.
    classes_ptr: [B, A] int32 out (if has_classes), background_class where not positive.
    max_iou_ptr: [B, A] float32 out (if want_max_iou), best IoU, 0 without boxes.
    block_counts_ptr: [B, cdiv(A, BLOCK_A), 2] int32 out (if count_sparse), positives
        and ignored anchors of each program's block.
    Grid: (cdiv(num_anchors, BLOCK_A), B).

    Ties (worked example): anchor 7 has IoU 0.3 with boxes 2 and 5 -> box 2 (the chunk
    loop keeps the running best on equality, and within a chunk the lowest index wins).
    """
    block = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    box_start = tl.load(gt_offsets_ptr + image)
    box_end = tl.load(gt_offsets_ptr + image + 1)
    anchor, anchor_mask, ax1, ay1, ax2, ay2, anchor_area, excluded, outside = _block_anchors(
        image, block, num_anchors, anchors_ptr, level_int_ptr, level_float_ptr, cells_ptr, num_levels,
        shape_major, ignore_ptr, ignore_offsets_ptr, border_ptr, ignore_iof_thr, use_ignore,
        ignore_wrt_anchor, border_rule, GENERATE, BLOCK_A, BLOCK_G,
    )  # fmt: skip
    included = anchor_mask & ~excluded
    lifts_own_argmax = (low_quality == _LQ_TORCHVISION) | (low_quality == _LQ_DETECTRON2)

    # Running best box over the chunks; -1 IoU is below any real IoU.
    best_iou = tl.full((BLOCK_A,), -1.0, tl.float32)
    best_box = tl.full((BLOCK_A,), -1, tl.int32)
    # torchvision/detectron2: some qualifying box has its maximum here.
    # mmdet: the last such box; ssd_forced: the last box whose best anchor this is.
    lifted = tl.zeros((BLOCK_A,), tl.int32)
    forced_box = tl.full((BLOCK_A,), -1, tl.int32)
    ex1, ey1, ex2, ey2 = _extent(ax1, ay1, ax2, ay2, anchor_mask)
    for g0 in range(box_start, box_end, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        row_mask = rows < box_end
        box = (rows - box_start).to(tl.int32)
        bx1, by1, bx2, by2, box_area = _load_boxes(gt_boxes_ptr, rows, row_mask)
        if low_quality != 0:
            key = tl.load(box_key_ptr + rows, mask=row_mask, other=-1)
            box_max = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            # A box whose best IoU is 0 lifts nothing (the peers' zero-IoU pitfall).
            qualifies = (key >= 0) & (box_max > 0.0) & (box_max >= min_pos_iou)  # [BLOCK_G]
        else:
            key = tl.full((BLOCK_G,), -1, tl.int64)
            box_max = tl.full((BLOCK_G,), -1.0, tl.float32)
            qualifies = row_mask & False
        if _touches(bx1, by1, bx2, by2, row_mask, ex1, ey1, ex2, ey2):
            iou = _iou(bx1, by1, bx2, by2, box_area, ax1[None, :], ay1[None, :], ax2[None, :], ay2[None, :],
                       anchor_area[None, :])  # fmt: skip
            iou = tl.where(row_mask[:, None], iou, -1.0)  # [BLOCK_G, BLOCK_A]
            chunk_best = tl.max(iou, axis=0)
            chunk_box = tl.min(tl.where(iou == chunk_best[None, :], box[:, None], _NO_BOX), axis=0)
            better = chunk_best > best_iou  # strict: an earlier chunk keeps its lower box index
            best_box = tl.where(better, chunk_box, best_box)
            best_iou = tl.where(better, chunk_best, best_iou)

            if low_quality != 0:
                if low_quality == _LQ_SSD_FORCED:
                    best_anchor = ((key & _INDEX_MASK) ^ _INDEX_MASK).to(tl.int32)
                    hit = (best_anchor[:, None] == anchor[None, :]) & qualifies[:, None]
                else:
                    hit = (iou == box_max[:, None]) & qualifies[:, None]
                if lifts_own_argmax:
                    lifted = tl.maximum(lifted, tl.max(hit.to(tl.int32), axis=0))
                else:
                    forced_box = tl.maximum(forced_box, tl.max(tl.where(hit, box[:, None], -1), axis=0))
        else:
            # Every IoU is 0: the chunk's first box, for anchors that have none better yet.
            # No box here has its maximum (> 0) in this block, so nothing is lifted.
            first_box = tl.min(tl.where(row_mask, box, _NO_BOX), axis=0)
            better = best_iou < 0.0
            best_box = tl.where(better, first_box, best_box)
            best_iou = tl.where(better, 0.0, best_iou)

    # Thresholds: [low, high) ignored; strict_high (DALI/MLPerf SSD) flips both ends, (low, high].
    strict = strict_high != 0
    positive = included & ((best_iou > high) | (~strict & (best_iou == high)))
    matched = tl.where(positive, best_box, -1)
    # Low-quality lifts: torchvision/detectron2 keep the anchor's own argmax box,
    # mmdet/ssd_forced take the box that lifted it (lifted/forced_box stay 0/-1 otherwise).
    lift_own = included & (lifted > 0)
    lift_forced = included & (forced_box >= 0)
    matched = tl.where(lift_own, best_box, matched)
    matched = tl.where(lift_forced, forced_box, matched)
    positive = positive | lift_own | lift_forced
    negative = included & ((best_iou < low) | (strict & (best_iou == low))) & ~positive
    labels = tl.where(positive, 1, tl.where(negative, 0, -1))
    labels = tl.where(outside & (border_rule == _BORDER_POST), -1, labels)
    positive = labels == 1
    detectron2_matched = tl.where(included, best_box, -1)
    matched = tl.where(low_quality == _LQ_DETECTRON2, detectron2_matched, tl.where(positive, matched, -1))

    # Encoding (torchvision's BoxCoder order, then mmdet's (d - mean) / std) into one
    # [BLOCK_A, 4] tile, so each thread writes an anchor's 16 bytes in one vector store.
    # Only blocks with a positive pay for it (two logs and six divisions per anchor):
    # most blocks of a detection batch have none.
    column = tl.arange(0, 4)[None, :]
    deltas = tl.zeros((BLOCK_A, 4), tl.float32)
    if tl.max(positive.to(tl.int32), axis=0) > 0:
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

    out = image * num_anchors + anchor  # int64: B * A may pass 2^31
    tl.store(labels_ptr + out, labels.to(tl.int8), mask=anchor_mask)
    tl.store(matched_ptr + out, matched, mask=anchor_mask)
    tl.store(deltas_ptr + out[:, None] * 4 + column, deltas, mask=anchor_mask[:, None])
    if has_classes != 0:
        box_class = tl.load(gt_classes_ptr + box_start + matched.to(tl.int64), mask=positive, other=0)
        tl.store(classes_ptr + out, tl.where(positive, box_class, background_class), mask=anchor_mask)
    if want_max_iou != 0:
        tl.store(max_iou_ptr + out, tl.where(box_end > box_start, best_iou, 0.0), mask=anchor_mask)
    if count_sparse != 0:
        counts = block_counts_ptr + (image * tl.num_programs(0) + block) * 2
        tl.store(counts, tl.sum((positive & anchor_mask).to(tl.int32), axis=0))
        tl.store(counts + 1, tl.sum(((labels == -1) & anchor_mask).to(tl.int32), axis=0))
