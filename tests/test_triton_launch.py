"""The direct launch of compiled variants (``kernels/triton_launch.py``): a launch may
reuse a variant only where Triton's JIT would pick the same one.

The JIT's choice is taken from Triton's own argument binder for sm_90 (no GPU needed,
as ``tests/support.compile_keys`` does): over the backend's real launches and copies
of them with one argument changed in each way Triton specialises on, each launch kind
must name exactly one compile key. On a GPU the whole triton suite runs through the
direct launches (every compiled test after a kernel's first launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from support import on_device, record_launches
from tritarget.kernels import assign, assign_sparse, presets
from tritarget.kernels.workload import coco_like_batch

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tritarget.kernels import triton_backend  # noqa: E402
from tritarget.kernels.triton_launch import Launcher  # noqa: E402

# Without the interpreter, where Triton compiles: per kernel, how many compile keys
# each launch kind of ours spans over the launches and their one-argument changes.
_KINDS_AGAINST_BINDER = r"""
import collections, json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from tritarget.kernels import triton_assign
from tritarget.kernels.triton_launch import Launcher

def tensor(dtype, aligned):
    dtype = getattr(torch, dtype)
    step = 8 // torch.empty(0, dtype=dtype).element_size()  # 8 bytes in: 8-byte aligned only
    return torch.empty(64, dtype=dtype)[0 if aligned else step:]

def changed(args):
    # Each argument changed in each way Triton specialises on, one at a time.
    for i, a in enumerate(args):
        if isinstance(a, dict):
            yield args[:i] + [{"tensor": [a["tensor"][0], not a["tensor"][1]]}] + args[i + 1:]
        elif isinstance(a, int) and not isinstance(a, bool):
            for value in (1, 16 * 7, 17, 2**40, 0, -1, -(2**31), 2**31, -(2**63), 2**63):
                yield args[:i] + [value] + args[i + 1:]

backend = make_backend(GPUTarget("cuda", 90, 32))
found = collections.defaultdict(lambda: collections.defaultdict(set))
for name, args, constexprs in json.load(sys.stdin):
    kernel = getattr(triton_assign, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launcher = Launcher(kernel, interpreted=False)
    for variant in [args, *changed(args)]:
        real = [tensor(*a["tensor"]) if isinstance(a, dict) else a for a in variant]
        _, specialization, _ = binder(*real, **constexprs)
        _, kind = launcher.kind(tuple(real), constexprs)
        found[name][repr(kind)].add(json.dumps([sorted(constexprs.items()), str(specialization)]))
summary = {name: {"kinds": len(kinds), "most_keys_per_kind": max(len(keys) for keys in kinds.values()),
                  "keys": len(set().union(*kinds.values()))} for name, kinds in found.items()}
print(json.dumps(summary))
"""


def _kinds_against_binder(launches: list) -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _KINDS_AGAINST_BINDER], input=json.dumps(launches), env=env,
                         capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_launch_kind_never_spans_two_compiled_variants(monkeypatch):
    """Over the backend's launches in every stage (dense and sparse, a low-quality lift
    and ssd_forced, the pair walk and the gather) and each of them with one argument changed -- a tensor's alignment
    flipped, an int set to 1, a multiple of 16, an odd number, a 64-bit value, 0, -1,
    the ends of the i32 and i64 ranges --
    Triton's binder picks one compile key per launch kind of ours: a direct launch never
    runs a variant compiled for other arguments. (Dropping any trait from
    ``_Plan.key`` fails this.)"""
    launches = record_launches(monkeypatch)
    canvas = (96, 128)
    boxes, counts, classes = coco_like_batch(2, seed=5, canvas=canvas, boxes_per_image=4)
    for matching in ("walk", "gather"):
        monkeypatch.setattr(triton_backend, "_INTERPRETED", replace(triton_backend._INTERPRETED, matching=matching))
        monkeypatch.setattr(triton_backend, "_COMPILED", replace(triton_backend._COMPILED, matching=matching))
        for preset in ("retinanet_torchvision", "ssd300_torchvision"):
            for function in (assign, assign_sparse):
                on_device(function, boxes, counts, canvas, presets.get(preset), gt_classes=classes, backend="triton")
    summary = _kinds_against_binder(launches)
    assert set(summary) == set(triton_backend.LAUNCHERS)
    for name, counts_ in summary.items():
        assert counts_["most_keys_per_kind"] == 1, (name, counts_)
        assert counts_["keys"] > 1, (name, counts_)  # the changes did reach other variants


# Kernels to take launch kinds of (``Launcher.kind`` reads a JIT function's parameters,
# never runs it): made with JITFunction itself, which the interpreter's triton.jit is not.
def _one(a):
    pass


def _two(a, b):
    pass


def _constexpr(a: tl.constexpr):
    pass


def _defaulted(a, B: tl.constexpr = 2):
    pass


_ONE, _TWO, _CONSTEXPR, _DEFAULTED = map(JITFunction, (_one, _two, _constexpr, _defaulted))
_LOOSE = JITFunction(_two, do_not_specialize=["b"], do_not_specialize_on_alignment=["a"])


class _Boxes(torch.Tensor):
    """A tensor subclass (as torchvision's tv_tensors are): Triton binds it as a tensor."""


def test_launch_kind_keeps_what_triton_specialises_on():
    """The traits by hand: alignment and dtype of tensors, an int's being 1, its
    divisibility by 16 and its type (by range: -2**31 is an i32, 2**31 an i64), bools
    apart from ints, constexpr values (given or defaulted), options (in any order);
    two ints of the same traits (or two tensors at other aligned addresses) share a kind,
    so a new batch size reuses the variant; and what Triton is told not to specialise (an
    int's value, a pointer's alignment) is left out, but not an int's type."""
    aligned = torch.empty(64, dtype=torch.float32)

    def kind(*arguments, probe=None, **options):
        launcher = Launcher(probe or (_ONE, _TWO)[len(arguments) - 1], interpreted=False)
        return launcher.kind(arguments, options)[1]

    assert kind(aligned, 17) == kind(aligned[4:], 33)  # +16 bytes: still aligned; both odd
    assert kind(aligned, 17) != kind(aligned[2:], 17)  # +8 bytes
    assert kind(aligned, 17) != kind(aligned.view(torch.int32), 17)
    pairs = ((17, 1), (17, 32), (17, 2**40), (2**40, 2**64 - 1), (-(2**31), 2**31), (-(2**63), 2**63),
             (True, 1), (False, 0), (0.5, 1), (None, 0))  # fmt: skip
    for a, b in pairs:
        assert kind(a) != kind(b), (a, b)
    assert kind(256, probe=_CONSTEXPR) != kind(512, probe=_CONSTEXPR)
    assert kind(17, probe=_DEFAULTED) == kind(17, B=2, probe=_DEFAULTED) != kind(17, B=4, probe=_DEFAULTED)
    assert kind(17, num_warps=4) != kind(17, num_warps=8)
    assert kind(17, 33) == kind(19, 35)
    assert kind(0.5, 17) != kind(17, 0.5)  # the same traits, at other places: (fp32, i32) against (i32, fp32)
    assert kind(17) == kind(2**31 - 15)  # 31 bits: an i32 whatever its value
    assert kind(17, num_warps=4, num_stages=2) == kind(17, num_stages=2, num_warps=4)
    boxes = aligned.as_subclass(_Boxes)
    assert kind(boxes, 17) != kind(boxes[2:], 17)
    assert kind(boxes, 17) != kind(boxes.view(torch.int32), 17)
    assert kind(aligned, 17, probe=_LOOSE) == kind(aligned[2:], 1, probe=_LOOSE) == kind(aligned, 32, probe=_LOOSE)
    assert kind(aligned, 17, probe=_LOOSE) != kind(aligned, 2**40, probe=_LOOSE)


def test_one_launcher_keeps_what_triton_specialises_on_whatever_it_launched_before():
    """A launcher plans its kinds per argument types: a tensor where an earlier launch
    passed a float (or None) is still told apart by its alignment and dtype."""
    aligned = torch.empty(64, dtype=torch.float32)
    launcher = Launcher(_TWO, interpreted=False)
    for before in (0.5, None, aligned):
        launcher.kind((before, 17), {})
        assert launcher.kind((aligned, 17), {})[1] != launcher.kind((aligned[2:], 17), {})[1], before
        assert launcher.kind((aligned, 17), {})[1] != launcher.kind((aligned.view(torch.int32), 17), {})[1], before


@pytest.mark.parametrize("value", ["y", " 1", "0"])
def test_the_backend_interprets_exactly_when_triton_does(value):
    """TRITON_INTERPRET as Triton itself reads it ("y" interprets; " 1" does not)."""
    probe = ("from triton.runtime.interpreter import InterpretedFunction as Interpreted\n"
             "from tritarget.kernels import triton_assign, triton_backend\n"
             "print(triton_backend.interpreting(), isinstance(triton_assign.scan_kernel, Interpreted))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": value})  # fmt: skip
    ours, theirs = done.stdout.split()
    assert ours == theirs, done.stdout + done.stderr


def test_the_backend_launches_through_its_launchers():
    """The backend's kernels are the direct launchers (the interpreter's launches go
    through the JIT as before; compiled, the variants)."""
    for name in ("segments_kernel", "pairs_kernel", "lift_segments_kernel", "forced_kernel", "gather_kernel",
                 "finalize_kernel", "scan_kernel"):  # fmt: skip
        launcher = getattr(triton_backend, name)
        assert isinstance(launcher, Launcher), name
        assert launcher.direct == (not triton_backend.interpreting()), name
