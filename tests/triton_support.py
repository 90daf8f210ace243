"""What the tests of the triton backend share: where its kernels run here (a GPU,
compiled, or the CPU under Triton's interpreter: conftest sets TRITON_INTERPRET=1 where
there is no GPU), the deltas' tolerance there, and the ``gpu`` mark. Importing this
skips the importing module where neither is at hand.

Deltas go through ``log``: within 1e-6 (rtol and atol) under the interpreter, whose
numpy log may differ from torch's in the last bit, and within 1e-5 compiled, where the
GPU's logf is a different implementation again.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tritarget.kernels import triton_backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_backend.interpreting()
if not (HAS_CUDA or INTERPRETED):
    pytest.skip("the triton backend needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
TOL = 1e-6 if INTERPRETED else 1e-5
_needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU with compiled Triton")


def gpu(test):
    """Marked ``gpu`` (``pytest -m gpu`` selects them) and skipped without a GPU."""
    return pytest.mark.gpu(_needs_gpu(test))
