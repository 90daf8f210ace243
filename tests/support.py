"""Shared test helpers: random ragged batches, a comparison that shows mismatches, and
the compile keys of the triton backend's launches."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import torch

from tritarget.kernels import Targets


def random_boxes(
    generator: torch.Generator, count: int, canvas: tuple[int, int], min_size: float = 4.0, max_frac: float = 0.6
) -> torch.Tensor:
    """Tensor[count, 4] float32 valid boxes, partly outside the canvas now and then."""
    height, width = canvas
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = min_size + torch.rand(count, 2, generator=generator) * (size * max_frac)
    centre = torch.rand(count, 2, generator=generator) * size
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    return boxes.clamp(min=torch.tensor([-8.0, -8.0, 1.0, 1.0]), max=torch.cat([size - 1, size + 8]))


def random_batch(
    generator: torch.Generator, counts: list[int], canvas: tuple[int, int], **kwargs
) -> tuple[torch.Tensor, list[int]]:
    """(gt_boxes [sum(counts), 4], counts): one random image per count."""
    boxes = [random_boxes(generator, c, canvas, **kwargs) for c in counts]
    return torch.cat(boxes) if boxes else torch.zeros(0, 4), list(counts)


def with_ties(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Repeat some boxes (exact duplicates tie on every IoU) and snap to a coarse grid."""
    snapped = (boxes / 8).round() * 8
    snapped[:, 2:] = torch.maximum(snapped[:, 2:], snapped[:, :2] + 8)
    if snapped.shape[0] >= 2:
        dup = torch.randint(0, snapped.shape[0], (snapped.shape[0] // 2,), generator=generator)
        snapped[-dup.numel() :] = snapped[dup]
    return snapped


def _describe(name: str, ours: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor) -> str:
    where = torch.nonzero(bad)[:8].tolist()
    rows = [f"  at {w}: ours={ours[tuple(w)].tolist()} reference={ref[tuple(w)].tolist()}" for w in where]
    return f"{name}: {int(bad.sum())} mismatches\n" + "\n".join(rows)


def assert_targets_equal(ours: Targets, ref: Targets, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Labels, matched indices and classes exactly; deltas within rtol/atol."""
    assert ours.labels.shape == ref.labels.shape, (ours.labels.shape, ref.labels.shape)
    for name in ("labels", "matched_gt", "classes"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), f"{name}: present in only one result"
        if a is not None:
            a, b = a.cpu(), b.cpu()
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            bad = a != b
            assert not bad.any(), _describe(name, a, b, bad)
    a, b = ours.deltas.cpu(), ref.deltas.cpu()
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol)
    assert not bad.any(), _describe("deltas", a, b, bad)
    assert (ours.max_iou is None) == (ref.max_iou is None), "max_iou: present in only one result"
    if ours.max_iou is not None:
        a, b = ours.max_iou.cpu(), ref.max_iou.cpu()
        bad = a != b
        assert not bad.any(), _describe("max_iou", a, b, bad)


def triton_runs_here() -> bool:
    """Whether the triton backend can run: on a CUDA GPU, or in Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    from tritarget.kernels import triton_backend

    return torch.cuda.is_available() or triton_backend.interpreting()


def on_device(function, boxes, counts, canvas, config, *, backend: str, **kwargs):
    """``function`` (``assign`` or ``assign_sparse``) with its tensors on ``backend``'s
    device: CUDA for triton on a GPU machine, where it runs compiled, else the CPU (triton
    in the interpreter). The result comes back on the host."""
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    return function(boxes.to(device), counts, canvas, config, backend=backend, **moved).to("cpu")


def record_launches(monkeypatch) -> list:
    """Record every launch of the triton backend's kernels from now on (the test's end
    restores them): [kernel name, arguments (tensors as {"tensor": [dtype, 16-byte
    aligned]}), constexpr keyword arguments] per launch, for ``compile_keys``."""
    from tritarget.kernels import triton_backend

    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def record(*args, **kwargs):
                described = [
                    {"tensor": [str(a.dtype).removeprefix("torch."), a.data_ptr() % 16 == 0]}
                    if isinstance(a, torch.Tensor) else a
                    for a in args
                ]  # fmt: skip
                launches.append([self.name, described, {k: v for k, v in kwargs.items() if k.isupper()}])
                return launch(*args, **kwargs)

            return record

    for name in triton_backend.LAUNCHERS:
        monkeypatch.setattr(triton_backend, name, Recorder(name, getattr(triton_backend, name)))
    return launches


# Run without the interpreter, where triton compiles: Triton's own argument binder for
# sm_90 (no GPU needed) turns each recorded launch into the key of its compiled variant.
_COMPILE_KEYS = r"""
import collections, json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from tritarget.kernels import triton_assign

class Tensor:
    def __init__(self, dtype, aligned):
        self.dtype, self.address = getattr(torch, dtype), 16 if aligned else 8
    def data_ptr(self):
        return self.address

backend = make_backend(GPUTarget("cuda", 90, 32))
keys = collections.defaultdict(set)
for name, args, constexprs in json.load(sys.stdin):
    kernel = getattr(triton_assign, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [Tensor(*a["tensor"]) if isinstance(a, dict) else a for a in args]
    _, specialization, _ = binder(*args, **constexprs)
    keys[name].add(json.dumps([sorted(constexprs.items()), str(specialization)]))
print(json.dumps({name: sorted(found) for name, found in keys.items()}))
"""


def compile_keys(launches: list) -> dict[str, set[str]]:
    """Each kernel's compile keys over ``launches`` (``record_launches``): its constexprs
    and Triton's specialisation of its arguments, as the compiled JIT would key them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_KEYS], input=json.dumps(launches), env=env,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: set(keys) for name, keys in json.loads(run.stdout.strip().splitlines()[-1]).items()}


def modes(keys: set[str]) -> set[str]:
    """The constexpr sets (modes: stage, output, block sizes) among a kernel's compile keys."""
    return {json.dumps(json.loads(key)[0]) for key in keys}


# An ignore region's IoF with a0 is exactly the threshold 0.5, with a1 above it; a2 is the
# box, positive. Relative to the anchor (50/100, 50/80) or to the region (50/100, 60/100):
# every value is exact in float32.
IOF_AT_THRESHOLD = [
    (True, [[0, 0, 10, 10], [0, 0, 10, 8], [40, 40, 50, 50]], [0, 0, 10, 5]),
    (False, [[0, 0, 10, 5], [0, 0, 10, 6], [40, 40, 50, 50]], [0, 0, 10, 10]),
]


def run_into_a_closed_pipe(argv: list[str], buffered: bool, closed: str = "stdout") -> subprocess.CompletedProcess:
    """``python argv`` with ``closed`` (stdout or stderr) a pipe whose reader has already
    stopped reading (as ``head -1`` does once it has its line), the other stream captured.
    ``buffered``: stdout as Python has it by default, written at exit or when its buffer
    fills; else as under PYTHONUNBUFFERED (container images set it), every line at once."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with closed_pipe() as write_end:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, closed: write_end}
        return subprocess.run([sys.executable, *argv], **streams, text=True, env=env, timeout=120)


def run_without_stderr(argv: list[str]) -> subprocess.CompletedProcess:
    """``python argv`` with no stderr at all (``2>&-``, as some daemons and cron jobs run
    commands: Python's ``sys.stderr`` is None), stdout captured."""
    command = ["bash", "-c", 'exec "$@" 2>&-', "bash", sys.executable, *argv]
    return subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=120)


def without_stdout(argv: list[str]) -> list[str]:
    """The command ``python argv`` with no stdout at all (``>&-``: Python's ``sys.stdout`` is
    None). A shell closes it: a ``preexec_fn`` closing it made subprocess fork the test
    process itself, where gRPC's fork handlers (its threads busy) could abort the child
    before its exec (SIGABRT, "epoll_wait error: Bad file descriptor")."""
    return ["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, *argv]


@contextlib.contextmanager
def closed_pipe() -> Iterator[int]:
    """The write end of a pipe whose reader has gone: writing it raises BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)
