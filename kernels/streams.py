"""Cached device tensors that several CUDA streams read.

The server gives each compute worker a CUDA stream of its own. Anchors and kernel
tables are built once per device and cached: the copy that fills one is queued on the
stream of the worker that first asked for it, and another worker's kernels may read
the cached tensor at once, on another stream, before that copy has run. ``shared``
waits for the copy before the tensor is handed out (once per cache entry).
"""

from __future__ import annotations

import torch

__all__ = ["shared"]


def shared(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, once the work queued on the current stream (its filling) is done."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
    return tensor
