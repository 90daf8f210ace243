"""Import torchvision, the peer of the benchmarks and the parity tests, also where its
compiled ops cannot load.

Both run torchvision's own anchor generator, matcher, box coder and backbones: pure Python
over torch. Its compiled ops (nms, roi_align, ...) are built against one torch build, PyPI's
torchvision against PyPI's CUDA torch, so beside the CPU torch of the README's test command
(which installs torchvision without its dependencies, as it does mmdet) its ``_C`` library
does not load. torchvision means to run without it (``torchvision.extension._has_ops()``),
but its ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and others
whether or not they exist, and ``import torchvision`` raises for the missing ones. Those
fakes only describe the ops to ``torch.compile``; neither the benchmarks nor the tests use
them, nor the ops: ``load()`` imports torchvision without them in that one case.
"""

from __future__ import annotations

import sys
import types

__all__ = ["load"]


def load() -> types.ModuleType | None:
    """torchvision, or None where it is not installed."""
    try:
        import torchvision
    except ImportError:
        return None
    except RuntimeError as error:
        if "torchvision::" not in str(error):  # not a fake kernel of a missing op
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # the import that failed half-way
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision
