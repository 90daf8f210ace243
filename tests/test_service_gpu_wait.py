"""How the server's threads wait for the GPU (``serve --gpu-wait``, ``service/gpu_wait.py``)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
from test_service_harness import read_until, spawn_cli

from tritarget.service.gpu_wait import set_gpu_wait


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_an_unknown_wait_is_refused_by_name():
    with pytest.raises(ValueError, match="gpu_wait: expected one of block, spin, got 'yield'"):
        set_gpu_wait("yield", 0)


@pytest.mark.skipif(_driver_loads(), reason="this machine has a CUDA driver")
def test_without_a_cuda_driver_setting_the_wait_says_why():
    with pytest.raises(RuntimeError, match=r"the CUDA driver \(libcuda\.so\.1\) does not load"):
        set_gpu_wait("block", 0)


# A fresh process (the server sets the wait only where it is the first CUDA user): it sets
# the schedule, creates the context, prints the schedule in effect, then the CPU seconds
# and the wall seconds of one wait for a GPU kernel that sleeps ~0.5 s, waited for as the
# server's compute workers wait: a device-wide synchronisation, a read-back (the sparse
# lists' lengths) or a synchronisation of the worker's own stream (before the lists are
# encoded).
_WAIT_FOR_A_SLEEPING_KERNEL = """
import sys, time, torch
from tritarget.service.gpu_wait import gpu_wait_in_effect, set_gpu_wait
set_gpu_wait(sys.argv[1], 0)
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(gpu_wait_in_effect(torch.device("cuda")))
stream = torch.cuda.Stream() if sys.argv[2] == "stream" else torch.cuda.current_stream()
with torch.cuda.stream(stream):
    value = torch.ones(1, device="cuda")
    torch.cuda._sleep(1_000_000_000)  # GPU clock cycles: ~0.5 s at 2 GHz
    value += 1
cpu, wall = time.process_time(), time.perf_counter()
if sys.argv[2] == "device":
    torch.cuda.synchronize()
elif sys.argv[2] == "read-back":
    assert value.tolist() == [2.0]
else:
    stream.synchronize()
print(time.process_time() - cpu, time.perf_counter() - wall)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["device", "read-back", "stream"])
@pytest.mark.parametrize(("wait", "busy"), [("block", (0.0, 0.2)), ("spin", (0.25, 1.5))])
def test_a_waiting_thread_sleeps_or_spins_as_set(wait, busy, how):
    """Blocking, a wait costs the process next to no CPU; spinning, much of its length (the
    bound leaves room for a busy machine: the suite runs on 12 workers there)."""
    done = subprocess.run([sys.executable, "-c", _WAIT_FOR_A_SLEEPING_KERNEL, wait, how], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    in_effect, timing = done.stdout.split("\n")[:2]
    assert in_effect == wait
    cpu, wall = map(float, timing.split())
    assert wall > 0.1, wall  # the kernel did make the thread wait
    assert busy[0] <= cpu / wall <= busy[1], (cpu, wall)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serve_on_a_gpu_blocks_while_waiting_and_says_so():
    process = spawn_cli("serve", "--port", "0", "--backend", "triton", "--warmup-canvas", "64", "64")
    try:
        read_until(process, r"serving on 127\.0\.0\.1:\d+ \(plaintext, backend triton on cuda, GPU waits: block\)")
    finally:
        process.kill()
        process.communicate(timeout=60)
