import os
import random

import pytest
import torch
from hypothesis import settings

# Triton reads TRITON_INTERPRET once, when it is first imported: without a GPU, run its
# kernels in the interpreter for the whole session (an explicit setting wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis draws the same examples on every run (CI, another machine), as the seeded
# generators below do; HYPOTHESIS_PROFILE=explore draws new ones to hunt for bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator; every test that draws random boxes uses it."""
    random.seed(0)
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
