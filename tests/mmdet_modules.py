"""mmdetection's own pure-torch target modules, loaded from its installed source.

mmdet's package ``__init__`` files import everything, including ``mmcv.ops`` (compiled
CUDA/C++ extensions that ``mmcv-lite`` and a plain CPU machine do not have). This helper
never runs them: it puts stand-in package modules into ``sys.modules`` whose ``__path__``
is mmdet's real source folder, so ``import mmdet.models.task_modules.assigners.max_iou_assigner``
executes that one file (and the real files it imports) and no ``__init__``. What is
stubbed, only while loading, and restored afterwards:

* ``mmdet.registry``: ``TASK_UTILS.register_module`` (a no-op decorator) and
  ``TASK_UTILS.build`` (builds ``BboxOverlaps2D``, the only thing the assigner builds);
* ``mmdet.structures.bbox``: the real ``bbox_overlaps.py`` and ``transforms.py``
  (``get_box_tensor``) are loaded into it; ``BaseBoxes`` / ``HorizontalBoxes`` are empty
  stand-in classes (only used with box types, which these tests do not pass);
* ``mmcv``, ``mmcv.ops``: empty modules, so that nothing compiled is ever imported;
* ``mmengine.utils.is_tuple_of`` and ``mmengine.structures.InstanceData`` only when
  mmengine is not installed.

``load()`` skips the calling test when mmdet's source is not installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

# Module files these tests need, relative to the installed mmdet package.
FILES = {
    "anchor_generator": "models/task_modules/prior_generators/anchor_generator.py",
    "max_iou_assigner": "models/task_modules/assigners/max_iou_assigner.py",
    "iou2d_calculator": "models/task_modules/assigners/iou2d_calculator.py",
    "assign_result": "models/task_modules/assigners/assign_result.py",
    "delta_xywh_bbox_coder": "models/task_modules/coders/delta_xywh_bbox_coder.py",
    "bbox_overlaps": "structures/bbox/bbox_overlaps.py",
    "bbox_transforms": "structures/bbox/transforms.py",
}


def mmdet_root() -> Path:
    """The installed mmdet source folder, with the files loaded here; skips the test (or, called
    at import, the whole module) when there is none."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mmdet is not installed", allow_module_level=True)
    root = Path(next(iter(spec.submodule_search_locations)))
    missing = [rel for rel in FILES.values() if not (root / rel).exists()]
    if missing:
        pytest.skip(f"mmdet at {root} lacks {', '.join(missing)} (mmdet 3.x layout expected)", allow_module_level=True)
    return root


def _package(name: str, folder: Path | None) -> types.ModuleType:
    """A stand-in package: submodules import from ``folder``, its __init__ never runs."""
    module = types.ModuleType(name)
    module.__path__ = [str(folder)] if folder is not None else []
    return module


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_ABSENT = object()


class _InstanceData:
    """mmengine.structures.InstanceData's attribute access, when mmengine is absent."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


@functools.cache
def _load(root: Path) -> types.SimpleNamespace:
    names = ("mmdet", "mmdet.models", "mmdet.models.task_modules", "mmdet.models.task_modules.assigners",
             "mmdet.models.task_modules.coders", "mmdet.models.task_modules.prior_generators", "mmdet.utils",
             "mmdet.structures", "mmdet.structures.bbox", "mmdet.registry", "mmcv", "mmcv.ops")  # fmt: skip
    before = set(sys.modules)
    saved = {name: sys.modules.get(name, _ABSENT) for name in names}
    stubs = {name: _package(name, root / name.partition(".")[2].replace(".", "/")) for name in names[:8]}
    stubs["mmdet"] = _package("mmdet", root)
    stubs["mmdet.structures.bbox"] = _package("mmdet.structures.bbox", None)
    stubs["mmcv"] = _package("mmcv", None)
    stubs["mmcv.ops"] = types.ModuleType("mmcv.ops")

    built: dict[str, type] = {}
    registry = types.ModuleType("mmdet.registry")
    registry.TASK_UTILS = types.SimpleNamespace(
        register_module=lambda *a, **k: lambda cls: built.setdefault(cls.__name__, cls),
        build=lambda cfg: built[cfg["type"]](**{k: v for k, v in cfg.items() if k != "type"}),
    )
    stubs["mmdet.registry"] = registry
    bbox = stubs["mmdet.structures.bbox"]
    bbox.BaseBoxes = type("BaseBoxes", (), {})
    bbox.HorizontalBoxes = type("HorizontalBoxes", (bbox.BaseBoxes,), {})
    try:
        from mmengine.structures import InstanceData
        from mmengine.utils import is_tuple_of  # noqa: F401
    except ImportError:
        InstanceData = _InstanceData
        utils = types.ModuleType("mmengine.utils")
        utils.is_tuple_of = lambda seq, kind: isinstance(seq, tuple) and all(isinstance(v, kind) for v in seq)
        structures = types.ModuleType("mmengine.structures")
        structures.InstanceData = _InstanceData
        for name, module in (("mmengine", _package("mmengine", None)), ("mmengine.utils", utils),
                             ("mmengine.structures", structures)):  # fmt: skip
            saved.setdefault(name, sys.modules.get(name, _ABSENT))
            stubs[name] = module
    sys.modules.update(stubs)
    try:
        overlaps = _load_file("mmdet.structures.bbox.bbox_overlaps", root / FILES["bbox_overlaps"])
        transforms = _load_file("mmdet.structures.bbox.transforms", root / FILES["bbox_transforms"])
        bbox.bbox_overlaps, bbox.get_box_tensor = overlaps.bbox_overlaps, transforms.get_box_tensor
        assigners = "mmdet.models.task_modules.assigners"
        iou2d = importlib.import_module(f"{assigners}.iou2d_calculator")
        max_iou = importlib.import_module(f"{assigners}.max_iou_assigner")
        result = importlib.import_module(f"{assigners}.assign_result")
        coder = importlib.import_module("mmdet.models.task_modules.coders.delta_xywh_bbox_coder")
        anchors = importlib.import_module("mmdet.models.task_modules.prior_generators.anchor_generator")
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(("mmdet", "mmcv")) or name in stubs:
                del sys.modules[name]
        for name, previous in saved.items():
            if previous is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return types.SimpleNamespace(
        AnchorGenerator=anchors.AnchorGenerator,
        MaxIoUAssigner=max_iou.MaxIoUAssigner,
        BboxOverlaps2D=iou2d.BboxOverlaps2D,
        AssignResult=result.AssignResult,
        DeltaXYWHBBoxCoder=coder.DeltaXYWHBBoxCoder,
        InstanceData=InstanceData,
        root=root,
    )


def load() -> types.SimpleNamespace:
    """mmdet's AnchorGenerator, MaxIoUAssigner (with BboxOverlaps2D), AssignResult,
    DeltaXYWHBBoxCoder and the InstanceData they take; skips when mmdet is absent."""
    return _load(mmdet_root())
