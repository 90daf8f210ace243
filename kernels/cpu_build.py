"""Compile and load the CPU path's C kernel (``cpu_kernel.c``) on first use.

Why C through ``ctypes`` rather than a torch C++ extension or numba (measured in
``benchmarks/cpu_technique.md``): the source includes no Python or torch headers, so
the system C compiler builds it in about 0.3 s, nothing new is installed, and
``ctypes`` releases the GIL during the call.

The shared library is cached in ``$TRITARGET_CACHE_DIR`` (default
``$XDG_CACHE_HOME/tritarget`` or ``~/.cache/tritarget``), named by a hash of the source,
the flags, the compiler and the CPU, so an upgrade rebuilds and concurrent processes (data
loader workers, forked server processes) never load a half-written file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import CDLL
from pathlib import Path

__all__ = ["CompileError", "SOURCE", "FLAGS", "cache_dir", "load_library"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")

# -ffp-contract=off: no fused multiply-add, so every IoU rounds exactly as torch's does
# (ties and thresholds depend on the last bit); and no -ffast-math for the same reason.
# -march=native: the library is built on the machine that runs it; AVX2 makes crowded
# images 3-5x faster than the SSE2 baseline (benchmarks/cpu_technique.md). A compiler
# that rejects it gets a second try without it.
# -fno-trapping-math: lets the compiler compute an IoU's division and comparisons in every
# lane and select the results, which is what vectorises the pair loops on AVX2 (AVX-512's
# masked lanes did it without; without AVX-512 they stayed scalar: 1.5x slower at G = 200,
# benchmarks/cpu_technique.md). It changes no value: every operation still rounds as IEEE.
# -fopenmp-simd: honour `#pragma omp simd` reductions (exact min/max) without OpenMP's runtime.
FLAGS = (
    "-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd",
    "-march=native",
)  # fmt: skip


class CompileError(RuntimeError):
    """The C kernel could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    if os.environ.get("TRITARGET_CACHE_DIR"):
        return Path(os.environ["TRITARGET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritarget"


def _writable_cache() -> Path:
    # A read-only home (some containers) falls back to a per-user temporary folder.
    uid = getattr(os, "getuid", lambda: 0)()
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"tritarget-{uid}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise CompileError("no writable folder for the compiled CPU kernel: set TRITARGET_CACHE_DIR")


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise CompileError(
        "the CPU backend compiles a small C kernel on first use and found no C compiler: "
        "install one (e.g. apt-get install gcc) or set CC, or use backend='reference'"
    )


def _cpu_signature() -> str:
    # -march=native code must not be loaded on another CPU sharing the cache (NFS home).
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else compiler


def _build(compiler: str, target: Path) -> None:
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    portable = tuple(flag for flag in FLAGS if flag != "-march=native")
    try:
        for flags in (FLAGS, portable):
            command = [compiler, *flags, str(SOURCE), "-o", partial, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
        else:
            raise CompileError(f"building the CPU kernel failed: {' '.join(command)}\n{done.stderr.strip()}")
        os.replace(partial, target)  # atomic: another process sees the old file or the whole new one
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.lru_cache(maxsize=1)
def load_library() -> CDLL:
    """The compiled kernel, built first if this source/flags/compiler has no cached build."""
    if not SOURCE.is_file():
        raise CompileError(f"the CPU kernel's source {SOURCE} is missing from this installation")
    compiler = _compiler()
    identity = [" ".join(FLAGS), _compiler_version(compiler), _cpu_signature()]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(identity).encode()).hexdigest()[:16]
    target = _writable_cache() / f"cpu_kernel-{key}.so"
    if not target.is_file():
        _build(compiler, target)
    try:
        return CDLL(str(target))
    except OSError:  # a damaged cache entry: build it again
        _build(compiler, target)
        return CDLL(str(target))
