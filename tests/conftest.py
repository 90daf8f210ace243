import importlib.util
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Triton reads TRITON_INTERPRET once, when it is first imported: without a GPU, run its
# kernels in the interpreter for the whole session (an explicit setting wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torchvision (an optional peer), also where its compiled ops cannot load: the README's test
# command installs PyPI's torchvision beside a CPU torch, and the parity tests run its
# Python (benchmarks/torchvision_peer.py says why). Loaded here, before any test imports it.
_spec = importlib.util.spec_from_file_location(
    "torchvision_peer", Path(__file__).parents[1] / "benchmarks" / "torchvision_peer.py"
)
torchvision_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torchvision_peer)
torchvision_peer.load()

# pytest started in the background by a non-interactive shell (`pytest &`, nohup) ignores
# SIGINT, and so would the servers and commands the tests start, whose Ctrl-C the tests
# check: Python's own handler again (a child's exec resets a handled signal to default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
