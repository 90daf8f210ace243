"""The README's Python snippets run as written: the "Library" section's, and those of
"Use it in your training loop".

Each ``python`` block of the training section is executed on its own; a block that imports a
framework which is not installed is skipped (torchvision: its Python alone, as
conftest.py loads it). The blocks end in assertions of their own (losses equal to the
framework's, the anchors a framework trains as foreground those we assign positive,
excluded anchors present), so a snippet that drifts from the API fails here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from tritarget.kernels.config import ANCHOR_LAYOUTS

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your training loop"


def _blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.DOTALL)


def _snippets() -> dict[str, str]:
    named = {}
    for block in _blocks(SECTION):
        framework = next(name for name in ("torchvision", "detectron2", "mmdet") if f"{name}_targets" in block
                         or f"from {name}" in block or f"{name}_matched_idxs" in block)  # fmt: skip
        named[framework] = block
    return named


def test_the_section_has_one_snippet_per_framework():
    assert sorted(_snippets()) == ["detectron2", "mmdet", "torchvision"]


@pytest.mark.parametrize("framework", ["torchvision", "detectron2", "mmdet"])
def test_snippet_runs(framework):
    code = _snippets()[framework]
    for module in re.findall(r"^(?:from|import) (\w+)", code, flags=re.MULTILINE):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    exec(compile(code, f"README.md ({framework} snippet)", "exec"), {})


def test_the_library_snippet_runs():
    """The first code a reader meets: its closing assertion (dense and sparse targets
    agree) and the shapes and dtypes its comments promise."""
    (code,) = _blocks("## Library")
    scope = {}
    exec(compile(code, "README.md (Library snippet)", "exec"), scope)
    targets, anchors = scope["t"], scope["anchors"]
    assert anchors.shape == (201600, 4) and anchors.dtype == torch.float32
    assert targets.labels.shape == (2, 201600) and targets.labels.dtype == torch.int8
    assert targets.matched_gt.dtype == torch.int32 and targets.deltas.shape == (2, 201600, 4)
    assert targets.classes.dtype == torch.int32 and set(targets.classes[targets.labels == 1].tolist()) == {1, 3, 7}


def test_the_layouts_the_library_section_lists_are_the_configs():
    library = README.read_text(encoding="utf-8").split("## Library")[1].split("\n## ")[0]
    listed = re.search(r"`AnchorConfig` names its `layout`, one of (.*?): ", library, flags=re.DOTALL).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(ANCHOR_LAYOUTS)
