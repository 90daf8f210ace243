"""What the anchors' key layout costs the scatter, on the real pair stream (GPU only).

Run8's Nsight Compute profile (``results/gpu_h200/run8/profile_details.txt``) found the
scatter of B = 32, G = 200 bound by L2 tag requests (77% of peak), not by DRAM (7%) or
instructions (52%). A uniform chunk's lanes walk one row of a box's rectangle for one
cell shape, so consecutive lanes touch anchors ``shapes per cell`` apart: with the
16-byte record per anchor (key, mark, and on the dense path the anchor's own deltas),
144 bytes apart for RetinaNet, one L2 request per lane for the pre-check load and one
per atomic. This probe replays exactly those pairs (``segments_kernel``'s rectangles of
a COCO-like and a G = 200 batch) through a kernel that does only the key traffic --
pre-check load, then ``atomic_max`` where it raises the key -- with the keys laid out
three ways:

* ``record16``: today's layout, key in the first 8 bytes of a 16-byte record per anchor;
* ``keys8``: the keys alone, 8 bytes per anchor in anchor order (72 bytes apart);
* ``planes``: per cell shape a plane of keys in row-major cell order, so a row of a
  rectangle is contiguous (8 bytes apart).

Each timing (a ``do_bench`` median) zeroes the keys first (as the solve does), minus the
zeroing timed alone.
The work per pair other than the keys (IoU, tables) is left out on purpose: the
difference between the layouts is what the real kernel could gain.

    python benchmarks/gpu_key_layout.py   # ~20 s on an H200; prints one line per cell
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from tritarget.kernels import presets, triton_backend
from tritarget.kernels.problem import build_problem
from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

LAYOUTS = {"record16": 0, "keys8": 1, "planes": 2}


@triton.jit
def _key_traffic(seg_of_pair_ptr, prefix_ptr, rect_ptr, row_image_ptr, shape_int_ptr, plane_base_ptr, key_ptr,
                 total, num_anchors, num_shapes, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pair < total
    seg = tl.load(seg_of_pair_ptr + pair, mask=mask, other=0).to(tl.int64)
    local = (pair - tl.load(prefix_ptr + seg, mask=mask, other=0)).to(tl.int32)
    rect = rect_ptr + seg * 4
    x0 = tl.load(rect, mask=mask, other=0)
    nx = tl.load(rect + 1, mask=mask, other=1)
    y0 = tl.load(rect + 2, mask=mask, other=0)
    dy = local // nx
    x = x0 + local - dy * nx
    y = y0 + dy
    row = seg // num_shapes
    shape = seg - row * num_shapes
    ints = shape_int_ptr + shape * 5
    base = tl.load(ints, mask=mask, other=0)
    step_x = tl.load(ints + 1, mask=mask, other=0)
    step_y = tl.load(ints + 2, mask=mask, other=0)
    width = tl.load(ints + 3, mask=mask, other=0)
    image = tl.load(row_image_ptr + row, mask=mask, other=0).to(tl.int64)
    if LAYOUT == 0:
        slot = (image * num_anchors + base + x * step_x + y * step_y) * 2
    elif LAYOUT == 1:
        slot = image * num_anchors + base + x * step_x + y * step_y
    else:
        slot = image * num_anchors + tl.load(plane_base_ptr + shape, mask=mask, other=0) + y * width + x
    # Some key that varies with the box and the shape (the real one holds IoU bits).
    key = (((seg * 2654435761) & 0x3FFFFFFF) << 32) | row
    seen = tl.load(key_ptr + slot, mask=mask, other=0)
    tl.atomic_max(key_ptr + slot, key, mask=mask & (key > seen), sem="relaxed")


def plane_bases(shape_int: torch.Tensor) -> torch.Tensor:
    """Per shape row, where its plane starts if each level's anchors were stored shape by
    shape (cell-major order inside each plane), from the shape table (base, step_x,
    step_y, width, height) of a cell-major grid."""
    rows = shape_int.cpu().tolist()
    out = []
    for base, step_x, _step_y, width, height in rows:
        shape_in_level = base % step_x if step_x > 1 else 0
        level_start = base - shape_in_level
        out.append(level_start + shape_in_level * width * height)
    return torch.tensor(out, dtype=torch.int32, device=shape_int.device)


def time_layout(args: tuple, sizes: tuple, num_keys: int, code: int, block: int = 256) -> float:
    """GPU ms of the key traffic in layout ``code`` (zeroing the keys, as each solve does,
    timed alone and taken off)."""
    keys = torch.zeros(num_keys * (2 if code == LAYOUTS["record16"] else 1), dtype=torch.int64, device="cuda")

    def run() -> None:
        keys.zero_()
        _key_traffic[(triton.cdiv(sizes[0], block),)](*args, keys, *sizes, LAYOUT=code, BLOCK=block)

    median = dict(warmup=50, rep=300, return_mode="median")  # do_bench's default is the mean
    return do_bench(run, **median) - do_bench(keys.zero_, **median)


def main() -> None:
    config = presets.get("retinanet_torchvision")
    print(torch.cuda.get_device_name(0), "triton", triton.__version__, flush=True)
    for name, boxes in {"COCO-like": None, "G=200": 200}.items():
        gt, counts, _ = coco_like_batch(32, seed=32, boxes_per_image=boxes)
        problem, _ = build_problem(gt.cuda(), counts, COCO_CANVAS, config)
        launch = triton_backend._Launch(problem)
        assert not launch.problem.grid.shape_major, "the plane bases assume cell-major anchors"
        with torch.cuda.device(problem.device):
            seg = launch.segments()
        prefix, total = seg["prefix"], int(seg["prefix"][-1])
        seg_of_pair = (torch.searchsorted(prefix, torch.arange(total, device=prefix.device), right=True) - 1).int()
        args = (seg_of_pair, prefix, seg["rect"], seg["row_image"], launch.shape_int, plane_bases(launch.shape_int))
        sizes = (total, problem.num_anchors, launch.num_shapes)
        num_keys = problem.batch_size * problem.num_anchors
        times = {layout: time_layout(args, sizes, num_keys, code) for layout, code in LAYOUTS.items()}
        line = ", ".join(f"{layout} {ms:.3f} ms" for layout, ms in times.items())
        print(f"{name}, B = 32: {total:,} pairs; key traffic: {line} "
              f"(record16 / planes = {times['record16'] / times['planes']:.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
