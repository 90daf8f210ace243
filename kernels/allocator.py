"""``keep_freed_memory``: glibc's allocator tuned for a process that computes batch after batch.

Dense targets are megabytes per image. A tensor above glibc's mmap threshold (which
grows with what is freed, up to 32 MB) is mapped on allocation and unmapped on free, so
each batch faults every page of its outputs in again and the kernel zeroes them first.
Dense ``assign`` of 16 COCO images (80 MB of outputs, one 51 MB tensor) spent 11-15 of
its 42-44 ms there on this project's 2-core VM; with freed memory kept, 31-32 ms and no
page faults (``tests/test_cpu_backend.py``); in the server, merged batches of 32 images
cost ~1.8x per image what 2-image batches did before. ``tritarget serve`` calls it at
start; a training process or data-loader worker that computes dense batches of ~10
images or more on the CPU can call it once (forked workers inherit it). Sparse targets
and smaller batches gain nothing: their blocks stay below the threshold.
"""

from __future__ import annotations

import ctypes

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory in this process: one arena, no mmap for
    big blocks, no trimming (zero page faults in steady state, and merged batches cost
    no more per image than small ones). The price is that the process keeps its peak
    heap. Returns False where it does not apply (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    big = ctypes.c_int(1 << 30)
    # Older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MB on 64 bits): then
    # 32 MB, which still keeps the blocks of dense batches up to ~10 COCO images off mmap.
    # Each option is set whatever another one did.
    results = (
        libc.mallopt(_M_ARENA_MAX, 1),
        libc.mallopt(_M_MMAP_THRESHOLD, big) or libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 << 20)),
        libc.mallopt(_M_TRIM_THRESHOLD, big),
    )
    return all(results)
