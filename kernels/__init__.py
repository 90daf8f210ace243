"""tritarget.kernels: anchors, IoU, max-IoU matching and box encoding.

Reading order, as a textbook of the pipeline: ``config`` (what to compute),
``anchors`` (each peer's layout), ``boxes`` (IoU, IoF, encode, decode),
``reference`` (the executable specification), ``presets``, then the fast
backends ``cpu`` and ``triton_backend``, and ``api.assign`` that dispatches.
For training loops: ``adapters`` (each framework's target conventions) and ``losses``
(focal / BCE and box losses straight from ``SparseTargets``). They sit here, not in a
new top-level package, because the layout's top level is fixed (DESIGN §2) and they
need nothing but torch and these targets.

Importing this package needs neither triton nor a GPU: backends load on first use.
"""

from . import presets
from .allocator import keep_freed_memory
from .anchors import AnchorGrid, generate_anchors, level_slices, resolve_grid
from .api import BACKENDS, assign, assign_sparse
from .boxes import box_iof, box_iou, decode, encode
from .config import AnchorConfig, AnchorLevel, EncodeConfig, MatchConfig, TargetConfig
from .targets import IGNORED, NEGATIVE, POSITIVE, SparseTargets, Targets

__all__ = [
    "BACKENDS",
    "IGNORED",
    "NEGATIVE",
    "POSITIVE",
    "AnchorConfig",
    "AnchorGrid",
    "AnchorLevel",
    "EncodeConfig",
    "MatchConfig",
    "SparseTargets",
    "TargetConfig",
    "Targets",
    "assign",
    "assign_sparse",
    "box_iof",
    "box_iou",
    "decode",
    "encode",
    "generate_anchors",
    "keep_freed_memory",
    "level_slices",
    "presets",
    "resolve_grid",
]
