"""How a server's threads wait for the GPU: asleep by default, not spinning (``serve --gpu-wait``).

A thread that waits for the GPU -- a compute worker reading back its batch's list lengths,
or synchronising its stream before the lists are encoded -- spins by default: CUDA's
automatic schedule spins unless a process has more CUDA contexts than the machine has
cores, and a front end has one context on a machine of many. On the H200 machine
(``benchmarks/results/gpu_h200/run12/service_workers8.txt``, 8 front ends, CUDA's default)
the server spent 4.2 ms of CPU per 8-image request with 8 callers, about 0.9 of a core per
front end with one request in flight each, and 2.7-3.1 ms under full load, against 0.55
ms for the same requests computed in one process (spinning too, but through its own short
waits only). Spinning through waits that grow while 8 contexts take turns on the GPU, on
cores the event loops and the callers need, would explain the difference; how much of it
it is, ``benchmarks/gpu_service_ab.sh`` measures. Blocking puts a waiting thread to sleep
until the GPU signals it, for a wake-up (microseconds) per wait.

The schedule is a flag of a device's primary context (the one torch and Triton use), set
here through the CUDA driver API (torch has no call for it) before the server's first CUDA
work. It holds for every thread of the process: a context that already exists (a process
that used the GPU before it started a server) is left as it is.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["GPU_WAITS", "gpu_wait_in_effect", "set_gpu_wait"]

# CUDA's CU_CTX_SCHED_* flags, the three low bits of a context's flags.
_SCHEDULES = {"block": 4, "spin": 1}
_NAMES = {0: "auto", 1: "spin", 2: "yield", 4: "block"}
_SCHEDULE_BITS = 7
GPU_WAITS = tuple(_SCHEDULES)


def _driver() -> ctypes.CDLL:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"the GPU wait schedule: the CUDA driver (libcuda.so.1) does not load: {exc}") from None
    _call(driver, "cuInit", ctypes.c_uint(0))
    return driver


def _call(driver: ctypes.CDLL, function: str, *args) -> None:
    code = getattr(driver, function)(*args)
    if code != 0:
        raise RuntimeError(f"the GPU wait schedule: CUDA driver call {function} failed (CUresult {code})")


def _primary_state(driver: ctypes.CDLL, ordinal: int) -> tuple[ctypes.c_int, int, bool]:
    """(device handle, flags, whether the primary context exists) of device ``ordinal``."""
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    _call(driver, "cuDeviceGet", ctypes.byref(device), ctypes.c_int(ordinal))
    _call(driver, "cuDevicePrimaryCtxGetState", device, ctypes.byref(flags), ctypes.byref(active))
    return device, flags.value, bool(active.value)


def set_gpu_wait(wait: str, ordinal: int) -> None:
    """GPU ``ordinal``'s primary context, unless it exists already, to wait as ``wait``
    says: "block" or "spin". ``gpu_wait_in_effect`` tells what the process has.

    Raises ``ValueError`` for an unknown ``wait``, ``RuntimeError`` when the CUDA driver
    does not load or refuses."""
    if wait not in _SCHEDULES:
        raise ValueError(f"gpu_wait: expected one of {', '.join(GPU_WAITS)}, got {wait!r}")
    driver = _driver()
    device, flags, active = _primary_state(driver, ordinal)
    if not active:
        schedule = flags & ~_SCHEDULE_BITS | _SCHEDULES[wait]
        _call(driver, "cuDevicePrimaryCtxSetFlags_v2", device, ctypes.c_uint(schedule))


def gpu_wait_in_effect(device: torch.device) -> str:
    """How threads wait for CUDA ``device`` in this process: "block", "spin", "yield" or
    "auto" (CUDA's choice: spin unless the process has more contexts than the machine has
    cores)."""
    ordinal = torch.cuda.current_device() if device.index is None else device.index
    _, flags, _ = _primary_state(_driver(), ordinal)
    return _NAMES.get(flags & _SCHEDULE_BITS, f"flags {flags & _SCHEDULE_BITS}")
