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
whether it is 16-byte aligned, each int's being 1, divisible by 16 and its integer
width, every other argument's type, every ``tl.constexpr`` argument's value, and the
launch options (warps, register cap, ...). The JIT also specialises nothing else of our
kernels' arguments (their globals are constants). Under ``TRITON_INTERPRET=1`` there
is nothing compiled: the JIT's launch as is.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["Launcher", "launch_kind"]

_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)


def _argument_kind(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value == 1, value % 16 == 0, value in _INT32, value in _INT64
    return type(value)


def launch_kind(arguments: list, constexpr: tuple[bool, ...], options: dict) -> tuple:
    """What a launch's compiled variant depends on (see the module docstring):
    ``arguments`` in the kernel's parameter order, ``constexpr`` whether each one is."""
    kinds = tuple(value if fixed else _argument_kind(value) for value, fixed in zip(arguments, constexpr))
    return kinds, tuple(sorted(options.items()))


class Launcher:
    """``Launcher(kernel, direct)[grid](*args, **kwargs)`` launches like
    ``kernel[grid](...)`` (positional arguments first, then ``tl.constexpr`` ones and
    launch options by name), through the known compiled variants when ``direct`` (False
    under the interpreter; ``gpu_sweep.py`` times both)."""

    def __init__(self, kernel, direct: bool) -> None:
        self.kernel = kernel
        self.direct = direct
        self._signature = None
        self._variants: dict[tuple, object] = {}

    def __getitem__(self, grid: tuple[int, ...]):
        if not self.direct:
            return self.kernel[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _parameters(self) -> tuple[list[str], dict[str, object], tuple[bool, ...]]:
        if self._signature is None:
            parameters = inspect.signature(self.kernel.fn).parameters
            defaults = {name: p.default for name, p in parameters.items() if p.default is not p.empty}
            constexpr = tuple(param.is_constexpr for param in self.kernel.params)
            self._signature = list(parameters), defaults, constexpr
        return self._signature

    def kind(self, args: tuple, kwargs: dict) -> tuple[list, tuple]:
        """A launch's arguments in parameter order (defaults filled in) and its
        ``launch_kind``, for ``kernel[grid](*args, **kwargs)``."""
        names, defaults, constexpr = self._parameters()
        arguments = list(args)
        for name in names[len(args) :]:
            arguments.append(kwargs[name] if name in kwargs else defaults[name])
        options = {name: value for name, value in kwargs.items() if name not in names}
        return arguments, launch_kind(arguments, constexpr, options)

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        arguments, kind = self.kind(args, kwargs)
        key = (torch.cuda.current_device(), kind)
        variant = self._variants.get(key)
        if variant is None:
            # The JIT compiles or finds the variant, launches it and returns it.
            self._variants[key] = self.kernel[grid](*args, **kwargs)
            return
        variant[tuple(grid) + (1,) * (3 - len(grid))](*arguments)
