"""Compile and load the CPU path's C kernel (``cpu_kernel.c``) on first use.

Why C through ``ctypes`` rather than a torch C++ extension or numba (measured in
``benchmarks/cpu_technique.md``): the source includes no Python or torch headers, so
the system C compiler builds it in about 0.3 s, nothing new is installed, and
``ctypes`` releases the GIL during the call.

The shared library is cached in ``$TRITARGET_CACHE_DIR`` (default
``$XDG_CACHE_HOME/tritarget`` or ``~/.cache/tritarget``), named by a hash of the source,
the flags, the compiler and the CPU, so an upgrade rebuilds and concurrent processes (data
loader workers, forked server processes) never load a half-written file. A build already
in that folder is loaded even where this user may not write there (an image's cache); a
new one goes to a private temporary folder then.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
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


# Every build ends with these bytes and the SHA-256 of the bytes before them (``_sealed``).
_SEAL = b"tritarget-cpu-kernel-sha256:"
_SEAL_BYTES = len(_SEAL) + 32


class CompileError(RuntimeError):
    """The C kernel could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """Where compiled libraries are kept, as an absolute path: dlopen looks a name without
    a slash up in the system's folders (``TRITARGET_CACHE_DIR=.`` made one)."""
    if os.environ.get("TRITARGET_CACHE_DIR"):
        return Path(os.environ["TRITARGET_CACHE_DIR"]).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (Path(base) / "tritarget").absolute()


def _writable_cache() -> Path:
    # A read-only home (some containers) falls back to a per-user temporary folder.
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder
    private, refusal = _private_temp_folder()
    if private is not None:
        return private
    raise CompileError(f"no writable folder for the compiled CPU kernel ({folder} is not; {refusal}): "
                       "set TRITARGET_CACHE_DIR")  # fmt: skip


def _private_temp_folder() -> tuple[Path | None, str]:
    """``$TMPDIR/tritarget-<uid>``, only if it is this user's own and no one else may write
    to it, else why not: its name is predictable, and on a shared /tmp another user could
    make it first and put there a library that this process would load and run."""
    uid = getattr(os, "getuid", lambda: 0)()
    folder = Path(tempfile.gettempdir()) / f"tritarget-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        return None, f"{folder}: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return None, f"{folder} is not a folder of its own (a link?)"
    if info.st_uid != uid or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None, f"{folder} is another user's or writable by others"
    if not os.access(folder, os.W_OK):
        return None, f"{folder} is not writable"
    return folder, ""


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


def _build_unless_built(compiler: str, target: Path) -> None:
    """``target`` built, unless another caller has built it meanwhile: first calls at once
    on a fresh cache (a loader's workers, a pool's threads) take turns on a lock file beside
    it, so one compiles and the others load its build (each compiled its own: 20 compilers
    for 10 processes, 24 for 3 processes of 8 threads). ``flock`` excludes threads too (each
    opens the file anew) and goes with its holder, killed or not."""
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _readable_build(target):
            _build(compiler, target)


def _build(compiler: str, target: Path) -> None:
    # Named after its target, and written only by the lock's holder: a build killed midway
    # (a worker's SIGKILL) leaves one file the next build overwrites, not one per try.
    partial = str(target.with_name(target.name + ".partial"))
    portable = tuple(flag for flag in FLAGS if flag != "-march=native")
    try:
        for flags in (FLAGS, portable):
            command = [compiler, *flags, str(SOURCE), "-o", partial, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
        else:
            raise CompileError(f"building the CPU kernel failed: {' '.join(command)}\n{done.stderr.strip()}")
        with open(partial, "r+b") as built:
            built.write(_SEAL + hashlib.sha256(built.read()).digest())  # past the ELF's end: dlopen ignores it
            os.fsync(built.fileno())  # on disk before it has its name: a crash leaves no cut-short library
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
    name = f"cpu_kernel-{key}.so"
    target = cache_dir() / name
    if not _readable_build(target):  # a read-only cache's build serves as well: built into it before
        target = _writable_cache() / name
        if not _readable_build(target):
            _build_unless_built(compiler, target)
    try:
        return CDLL(str(target))
    except OSError as exc:  # our own build, whole (sealed): the folder's doing
        raise CompileError(
            f"the CPU kernel built in {target.parent} does not load ({exc}); a folder mounted noexec? "
            "set TRITARGET_CACHE_DIR to another, or use backend='reference'"
        ) from None


def _readable_build(path: Path) -> bool:
    try:
        return path.is_file() and _sealed(path)
    except OSError:  # unreadable: another user's, or a folder this user may not list
        return False


def _sealed(path: Path) -> bool:
    """Whether a cached library ends with the seal ``_build`` gave it: a copy cut short
    (an interrupted sync or restore) faulted in dlopen (SIGBUS), one damaged inside with
    its length intact crashed in its initialisers (SIGSEGV), in every process that loaded
    it, and another library under the kernel's name failed every call; none of them is
    loaded now, each is built again."""
    data = path.read_bytes()
    body, seal = data[:-_SEAL_BYTES], data[-_SEAL_BYTES:]
    return len(data) > _SEAL_BYTES and seal == _SEAL + hashlib.sha256(body).digest()
