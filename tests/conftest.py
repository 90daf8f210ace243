import random

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator; every test that draws random boxes uses it."""
    random.seed(0)
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
