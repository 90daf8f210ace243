"""The README's "Use it in your training loop" snippets run as written.

Each ``python`` block of that section is executed on its own; a block that imports a
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

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your training loop"


def _snippets() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.DOTALL)
    named = {}
    for block in blocks:
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
