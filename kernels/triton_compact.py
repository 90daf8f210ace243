"""Compaction of dense targets into the sparse form, on the device.

After ``assign_kernel`` has written the dense targets and, per program block, the
number of positive and ignored anchors, an exclusive scan of those counts (a torch
``cumsum`` on the device) gives every block its first output row. ``compact_kernel``
then writes each block's positives (anchor index, matched box, deltas, class) and
ignored anchor indices at ``block start + rank within the block`` (a ``tl.cumsum``),
which keeps them in ascending anchor order per image, as ``Targets.to_sparse()`` does.
Nothing travels to the host in between; only the two totals are read to size the
outputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["compact_kernel"]


# has_classes is a runtime switch (see triton_assign): not specialised, one compilation.
@triton.jit(do_not_specialize=["has_classes"])
def compact_kernel(
    # Pointers: dense inputs
    labels_ptr,
    matched_ptr,
    deltas_ptr,
    classes_ptr,
    block_starts_ptr,
    # Pointers: sparse outputs
    positive_anchors_ptr,
    positive_matched_ptr,
    positive_deltas_ptr,
    positive_classes_ptr,
    ignored_anchors_ptr,
    # Sizes
    num_anchors,
    # Switches
    has_classes,
    # Meta-parameters
    BLOCK_A: tl.constexpr,
):
    """Scatter one block of one image's positives and ignored anchors.

    labels_ptr: [B, A] int8; matched_ptr: [B, A] int32; deltas_ptr: [B, A, 4] float32;
        classes_ptr: [B, A] int32 (read if has_classes) -- assign_kernel's outputs.
    block_starts_ptr: [B, cdiv(A, BLOCK_A), 2] int64, the first output row of each
        block's positives and ignored anchors (exclusive scan of the block counts).
    positive_anchors_ptr: [P] int32 anchor index; positive_matched_ptr: [P] int32;
        positive_deltas_ptr: [P, 4] float32; positive_classes_ptr: [P] int32.
    ignored_anchors_ptr: [I] int32 anchor index.
    Grid: (cdiv(num_anchors, BLOCK_A), B), with the BLOCK_A of assign_kernel.
    """
    block = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    anchor = block * BLOCK_A + tl.arange(0, BLOCK_A)
    anchor_mask = anchor < num_anchors
    dense = image * num_anchors + anchor
    labels = tl.load(labels_ptr + dense, mask=anchor_mask, other=0)
    starts = block_starts_ptr + (image * tl.num_programs(0) + block) * 2

    positive = labels == 1
    row = tl.load(starts) + tl.cumsum(positive.to(tl.int32), axis=0).to(tl.int64) - 1
    tl.store(positive_anchors_ptr + row, anchor, mask=positive)
    tl.store(positive_matched_ptr + row, tl.load(matched_ptr + dense, mask=positive), mask=positive)
    for j in tl.static_range(4):
        tl.store(positive_deltas_ptr + row * 4 + j, tl.load(deltas_ptr + dense * 4 + j, mask=positive), mask=positive)
    if has_classes != 0:
        tl.store(positive_classes_ptr + row, tl.load(classes_ptr + dense, mask=positive), mask=positive)

    ignored = labels == -1
    row = tl.load(starts + 1) + tl.cumsum(ignored.to(tl.int32), axis=0).to(tl.int64) - 1
    tl.store(ignored_anchors_ptr + row, anchor, mask=ignored)
