"""Tensors on the wire: ``Tensor{dtype, shape, data}``, little-endian, row-major.

Shared by the server and the clients, so both sides agree on one definition.
Decoding checks ``prod(shape) * itemsize == len(data)`` before touching the bytes
and returns a tensor that views the bytes protobuf hands out for the field (no copy of
ours; a 1-byte payload is copied). protobuf's C runtime (upb) copies a bytes field into a
new object on every read, ~46 us per MB here: decode each field once and use the tensor.
Such a tensor is read-only in spirit: clone it before writing into it.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings

import numpy as np
import torch

from .target_assigner_pb2 import DType, Tensor

__all__ = ["TensorError", "DTYPES", "MAX_ANCHOR_ROWS", "encode_tensor", "decode_tensor", "wire_dtype"]

# Wire dtype -> torch dtype. Every other torch dtype is refused on both ends.
DTYPES: dict[int, torch.dtype] = {
    DType.DTYPE_FLOAT32: torch.float32,
    DType.DTYPE_FLOAT16: torch.float16,
    DType.DTYPE_INT8: torch.int8,
    DType.DTYPE_INT32: torch.int32,
    DType.DTYPE_INT64: torch.int64,
}
_WIRE = {torch_dtype: wire for wire, torch_dtype in DTYPES.items()}
_NUMPY = {torch_dtype: torch.empty(0, dtype=torch_dtype).numpy().dtype for torch_dtype in _WIRE}

# Images x anchors of one request's [B, A] targets: the service refuses more (a request of
# 32 COCO images holds 6.5M), and a client densifies no more from a response whose anchors
# it cannot count itself (a SPARSE response of 100 bytes may claim 2**40).
MAX_ANCHOR_ROWS = 1 << 25

# No tensor of the protocol has more dimensions (deltas: [batch, anchors, 4]), nor a
# dimension past int32 (anchor indices are int32).
_MAX_NDIM = 8
_MAX_DIM = 2**31 - 1

# The wire is little-endian; a big-endian host would have to byte-swap (not supported).
_NATIVE_LITTLE = sys.byteorder == "little"


class TensorError(ValueError):
    """A wire tensor that cannot be decoded; ``str()`` says why."""


def wire_dtype(dtype: torch.dtype) -> int:
    if dtype not in _WIRE:
        raise TypeError(f"dtype {dtype} has no wire encoding (use one of {', '.join(map(str, _WIRE))})")
    return _WIRE[dtype]


def encode_tensor(tensor: torch.Tensor, out: Tensor | None = None) -> Tensor:
    """Fill ``out`` (or a new ``Tensor``) with a CPU copy of ``tensor``'s bytes."""
    if not _NATIVE_LITTLE:
        raise RuntimeError("tritarget's wire format needs a little-endian host")
    message = Tensor() if out is None else out
    message.dtype = wire_dtype(tensor.dtype)
    message.shape[:] = list(tensor.shape)
    flat = tensor if tensor.is_cpu and tensor.is_contiguous() else tensor.detach().to("cpu").contiguous()
    message.data = ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b""
    return message


def decode_tensor(
    message: Tensor,
    name: str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    last_dim: int | None = None,
) -> torch.Tensor:
    """The tensor a message holds (a view of its bytes), checked.

    ``name`` is the field name used in errors; ``dtypes``, ``ndim`` and ``last_dim``
    are optional expectations. Raises ``TensorError`` naming the field.
    """
    if message.dtype not in DTYPES:
        raise TensorError(f"{name}: unknown or unset dtype {message.dtype}")
    dtype = DTYPES[message.dtype]
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(DType.Name(_WIRE[d]) for d in dtypes)
        raise TensorError(f"{name}: dtype {DType.Name(message.dtype)} not allowed here (expected {allowed})")
    if len(message.shape) > _MAX_NDIM:
        # Refused by its length, before the shape is listed or printed: a message within the
        # size limit may hold millions of dimensions.
        raise TensorError(f"{name}: {len(message.shape)} dimensions (at most {_MAX_NDIM})")
    shape = list(message.shape)
    if shape and min(shape) < 0:
        raise TensorError(f"{name}: negative dimension in shape {shape}")
    if shape and max(shape) > _MAX_DIM:  # with a 0 elsewhere, torch's own error (an overflowed storage size)
        raise TensorError(f"{name}: dimension over {_MAX_DIM} in shape {shape}")
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"{name}: expected {ndim} dimensions, got shape {shape}")
    if last_dim is not None and (not shape or shape[-1] != last_dim):
        raise TensorError(f"{name}: expected last dimension {last_dim}, got shape {shape}")
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    data = message.data
    if expected != len(data):
        raise TensorError(f"{name}: shape {shape} x {itemsize} bytes needs {expected} bytes, got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if not _NATIVE_LITTLE:
        raise RuntimeError("tritarget's wire format needs a little-endian host")
    if expected == 1:
        # CPython hands out one shared object for every 1-byte ``bytes`` value: a view of
        # it written into (a caller marking an anchor in a [1, 1] labels tensor) would
        # change that byte for the whole process (every b"\x00" reading b"\x01"). One
        # byte costs nothing to copy.
        data = bytearray(data)
    # A view of the bytes, no copy: torch's own for a vector (one call), numpy's otherwise
    # (frombuffer, reshape, from_numpy: cheaper than torch's frombuffer and view). Both
    # cost microseconds, and a SPARSE response holds seven tensors.
    if len(shape) == 1:
        return torch.frombuffer(data, dtype=dtype)
    return torch.from_numpy(np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape))


def _silence_read_only_warning() -> None:
    """torch warns, once per process and per way of viewing them (numpy's, its own), that
    a tensor viewing immutable bytes is not writable. Decoded tensors are read-only by
    contract (module docstring), so the warnings are spent here, silenced, instead of on a
    request (and instead of a ``warnings.catch_warnings`` per tensor, which costs more
    than the view itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))
        torch.frombuffer(bytes(4), dtype=torch.float32)


_silence_read_only_warning()
