import os
import random

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported: without a GPU, run its
# kernels in the interpreter for the whole session (an explicit setting wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator; every test that draws random boxes uses it."""
    random.seed(0)
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
