"""Launching a compiled Triton kernel without its JIT's per-launch Python.

``kernel[grid](*args, **kwargs)`` binds and specialises every argument in Python before
Triton's C launcher runs. On the H200 machine (run8, ``benchmarks/results/gpu_h200/run8/
sweep.txt``) a B = 1 ``solve`` took 515 us of host time per call for 39 us of GPU time,
and under cProfile its five launches spent 375 us per call in ``JITFunction.run`` (129
argument specialisations); ``solve_sparse`` makes seven launches. ``Launcher`` goes
through the JIT once per kind of launch, keeps the compiled variant the JIT picked, and
launches that variant directly (``CompiledKernel[grid]``, Triton's own entry point for
a compiled kernel) when the arguments are of the same kind again.

"The same kind" is a superset of what Triton specialises a compilation on, so a launch
the JIT would compile differently never reuses a variant: each tensor's dtype and
(unless Triton is told not to look) whether it is 16-byte aligned, each int's type (i32, i64 or u64, by its range) and
(unless told not to) its being 1 or divisible by 16, every other argument's type, every
``tl.constexpr`` argument's value, and the launch options (warps, register cap, ...).
The JIT also specialises nothing else of our kernels' arguments (their globals are
constants). Under ``TRITON_INTERPRET=1`` there is nothing compiled: the JIT's launch as is,
one at a time in the process (``_INTERPRETER``).

Measured: the first version walked the arguments one Python step each; run9's sweep
(same process, H200 host) took a B = 1 ``solve`` from 405 to 291 us of host time. The
kind is now a few C-level maps over the arguments grouped by what Triton looks at: on
the development machine, for one launch of each of the five kernels of a sparse call,
58 us against 94 (the first version) and 62 for Triton's own binder alone, which the
JIT runs before the rest of its launch (a same-process A/B; the machine drifts 2x).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch

__all__ = ["Launcher", "Param", "keeping_arguments"]

_DTYPE = operator.attrgetter("dtype")
_IS_ONE = (1).__eq__
_IS_ZERO = (0).__eq__
_LOW_FOUR_BITS = (15).__and__


def _int_type(value: int) -> str:
    """The type Triton's binder gives an int argument (its range, not its bit length:
    -2**31 is an i32 and 2**31 an i64, -2**63 an i64 and 2**63 a u64)."""
    if -(2**31) <= value < 2**31:
        return "i32"
    return "u64" if value >= 2**63 else "i64"


def _picker(positions: list[int]):
    """A function of a sequence giving its items at ``positions``, as a tuple."""
    if not positions:
        return lambda sequence: ()
    if len(positions) == 1:
        return lambda sequence, at=positions[0]: (sequence[at],)
    return operator.itemgetter(*positions)


class Param(NamedTuple):
    """How Triton treats one kernel parameter: a ``tl.constexpr``, or a runtime value it
    specialises (an int's being 1 or divisible by 16: unless ``do_not_specialize``) and,
    for a pointer, its 16-byte alignment (unless ``do_not_specialize_on_alignment``)."""

    constexpr: bool = False
    specialize: bool = True
    align: bool = True


class _Plan:
    """The launch kind for arguments of given types, as C-level maps over the arguments
    grouped by what Triton looks at (a launch passes 8-60 of them: a Python step per
    argument cost 6-37 us per launch on the development machine, about what the JIT's
    own binding costs)."""

    def __init__(self, types: tuple[type, ...], params: tuple[Param, ...]) -> None:
        groups: dict[str, list[int]] = {"values": [], "tensors": [], "aligned": [], "ints": [], "specialized": []}
        for at, (kind, param) in enumerate(zip(types, params)):
            if param.constexpr or kind is bool or kind is type(None):
                groups["values"].append(at)
            elif issubclass(kind, torch.Tensor):
                groups["tensors"].append(at)
                if param.align:
                    groups["aligned"].append(at)
            elif kind is int:
                groups["ints"].append(at)
                if param.specialize:
                    groups["specialized"].append(at)
            # Any other type (a Python float: fp32) is kept by the types alone.
        self.pick = {name: _picker(positions) for name, positions in groups.items()}

    def key(self, arguments: list) -> tuple:
        pick = self.pick
        ints, specialized = pick["ints"](arguments), pick["specialized"](arguments)
        addresses = map(torch.Tensor.data_ptr, pick["aligned"](arguments))
        return (
            pick["values"](arguments),
            tuple(map(_DTYPE, pick["tensors"](arguments))),
            tuple(map(_IS_ZERO, map(_LOW_FOUR_BITS, addresses))),  # 16-byte aligned
            tuple(map(_IS_ONE, specialized)),
            tuple(map(_IS_ZERO, map(_LOW_FOUR_BITS, specialized))),  # divisible by 16
            # Triton types an int i32 when it fits, else i64 or u64 (specialised or not):
            # when one of them may not fit (31 bits always do), each one's type.
            tuple(map(_int_type, ints)) if ints and max(map(int.bit_length, ints)) > 31 else None,
        )


_KEEPING = threading.local()

# Triton's interpreter swaps triton.language's functions for its own while it runs a
# kernel, so two threads interpreting at once break each other's kernels: errors ("Did
# you forget to add @triton.jit ?") or silently wrong values (4 threads x 20 launches of
# a 6-line kernel, 2026-12-05). Interpreted launches go one at a time.
_INTERPRETER = threading.Lock()


@contextlib.contextmanager
def keeping_arguments() -> Iterator[list[torch.Tensor]]:
    """A list that collects every tensor this thread passes to a ``Launcher`` launch while
    open. A CUDA graph captured meanwhile reads them again on every replay, so its owner
    keeps them: the backend's caches (tables, anchors, block bounds) may evict and free
    theirs."""
    kept: list[torch.Tensor] = []
    outer = getattr(_KEEPING, "tensors", None)
    _KEEPING.tensors = kept
    try:
        yield kept
    finally:
        _KEEPING.tensors = outer


class Launcher:
    """``Launcher(kernel, interpreted)[grid](*args, **kwargs)`` launches like
    ``kernel[grid](...)`` (positional arguments first, then ``tl.constexpr`` ones and
    launch options by name): compiled, through the known compiled variants (``direct``;
    ``gpu_sweep.py`` sets it False to time the JIT's own launch); ``interpreted``, through
    the interpreter, one launch at a time in the process."""

    def __init__(self, kernel, interpreted: bool) -> None:
        self.kernel = kernel
        self.interpreted = interpreted
        self.direct = not interpreted
        self._signature = None
        self._variants: dict[tuple, object] = {}
        self._plans: dict[tuple[type, ...], _Plan] = {}

    def __getitem__(self, grid: tuple[int, ...]):
        kept = getattr(_KEEPING, "tensors", None)
        if kept is not None:
            return lambda *args, **kwargs: self._keep_and_launch(kept, grid, args, kwargs)
        if self.direct:
            return lambda *args, **kwargs: self._launch(grid, args, kwargs)
        return lambda *args, **kwargs: self._launch_through_jit(grid, args, kwargs)

    def _keep_and_launch(self, kept: list, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        kept.extend(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        if self.direct:
            self._launch(grid, args, kwargs)
        else:
            self._launch_through_jit(grid, args, kwargs)

    def _launch_through_jit(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if self.interpreted:
            with _INTERPRETER:
                self.kernel[grid](*args, **kwargs)
        else:
            self.kernel[grid](*args, **kwargs)

    def _parameters(self) -> tuple[list[str], frozenset[str], dict[str, object], tuple[Param, ...]]:
        if self._signature is None:
            parameters = inspect.signature(self.kernel.fn).parameters
            defaults = {name: p.default for name, p in parameters.items() if p.default is not p.empty}
            params = tuple(
                Param(p.is_constexpr, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                for p in self.kernel.params
            )
            self._signature = list(parameters), frozenset(parameters), defaults, params
        return self._signature

    def kind(self, args: tuple, kwargs: dict) -> tuple[list, tuple]:
        """A launch's arguments in parameter order (defaults filled in) and its kind, what
        its compiled variant depends on (see the module docstring), for
        ``kernel[grid](*args, **kwargs)``."""
        names, name_set, defaults, params = self._parameters()
        arguments = [*args, *(kwargs[name] if name in kwargs else defaults[name] for name in names[len(args) :])]
        options = tuple(sorted(item for item in kwargs.items() if item[0] not in name_set))
        types = tuple(map(type, arguments))
        plan = self._plans.get(types)
        if plan is None:
            plan = self._plans[types] = _Plan(types, params)
        return arguments, (types, plan.key(arguments), options)

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        arguments, kind = self.kind(args, kwargs)
        key = (torch.cuda.current_device(), kind)
        variant = self._variants.get(key)
        if variant is None:
            # The JIT compiles or finds the variant, launches it and returns it.
            self._variants[key] = self.kernel[grid](*args, **kwargs)
            return
        variant[tuple(grid) + (1,) * (3 - len(grid))](*arguments)
