"""Anchors: each peer's layout, reproduced to the bit.

Every layout reduces to the same closed form, which the CPU path and the Triton
kernels evaluate from an anchor's index instead of reading an [A, 4] tensor:

    level, then cell (y, x) and shape k from the index within the level
    cx = (x + offset) * fx      (center_op "mul")   or   (x + offset) / fx   ("div")
    cy = (y + offset) * fy                          or   (y + offset) / fy
    anchor = ((cx, cy, cx, cy) + cell[k]) * (sx, sy, sx, sy)   (scale only for ssd/d2l)

all in float32, one rounding per operation, in exactly the order each peer's code
rounds. ``AnchorGrid`` holds the per-level numbers; ``AnchorGrid.materialize()``
builds the [A, 4] tensor with the same formula.

Orders: anchors are grouped by level; within a level they are location-major
(row-major cells, then shapes) except yolo, which is shape-major (YOLOv5's
``[na, ny, nx]`` output order).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .config import AnchorConfig, AnchorLevel
from .host_memory import check_host_fits
from .streams import stream_key

__all__ = [
    "AnchorGrid",
    "GridLevel",
    "check_canvas",
    "feature_map_size",
    "fixed_canvas",
    "resolve_grid",
    "generate_anchors",
    "level_slices",
]


@dataclass(frozen=True, eq=False)
class GridLevel:
    """One level of a resolved anchor grid (see the module docstring for the formula).

    cells (Tensor[K, 4]): float32 offsets of the K cell anchors, x1 y1 x2 y2.
    """

    height: int
    width: int
    offset: float
    factor_x: float
    factor_y: float
    center_op: str  # "mul" or "div"
    cells: torch.Tensor
    scale_x: float | None = None
    scale_y: float | None = None

    @property
    def num_anchors(self) -> int:
        return self.height * self.width * self.cells.shape[0]


# Host memory ``AnchorGrid.materialize`` takes at its peak, per anchor: every level's
# anchors (float32 xyxy, 16 bytes), then all of them concatenated (16 more), and the
# largest level's cell centers: 32.1-32.5 bytes measured on sets of 7-9M anchors, the
# sizes the check reads (tests/test_host_memory.py; smaller sets add a few fixed MB).
_BUILD_BYTES_PER_ANCHOR = 34


@dataclass(frozen=True, eq=False)
class AnchorGrid:
    """Anchors of one (config, canvas), as per-level tables instead of [A, 4] boxes."""

    levels: tuple[GridLevel, ...]
    shape_major: bool
    canvas: tuple[int, int]

    @property
    def num_anchors(self) -> int:
        return self.level_starts[-1]

    @functools.cached_property  # read by every assign call (Targets.level_starts)
    def level_starts(self) -> tuple[int, ...]:
        """Index of each level's first anchor, plus the total at the end."""
        starts = [0]
        for lv in self.levels:
            starts.append(starts[-1] + lv.num_anchors)
        return tuple(starts)

    def materialize(self) -> torch.Tensor:
        """All anchors, Tensor[A, 4] float32, in the documented order; ``MemoryError``
        first where the host could not hold them while they are built (``host_memory``)."""
        height, width = self.canvas
        check_host_fits(
            _BUILD_BYTES_PER_ANCHOR * self.num_anchors,
            f"anchors: the {self.num_anchors:,} anchors of the {height} x {width} canvas",
            "a smaller canvas (in pixels), or fewer anchor shapes",
        )
        return torch.cat([_level_anchors(lv, self.shape_major) for lv in self.levels]).contiguous()


def _centers(count: int, offset: float, factor: float, op: str) -> torch.Tensor:
    position = torch.arange(count, dtype=torch.float32, device="cpu") + offset
    factor32 = torch.tensor(factor, dtype=torch.float32, device="cpu")
    return position * factor32 if op == "mul" else position / factor32


def _level_anchors(lv: GridLevel, shape_major: bool) -> torch.Tensor:
    cx = _centers(lv.width, lv.offset, lv.factor_x, lv.center_op)
    cy = _centers(lv.height, lv.offset, lv.factor_y, lv.center_op)
    grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
    shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 4)  # [HW, 4]
    if shape_major:
        anchors = shifts[None, :, :] + lv.cells[:, None, :]  # [K, HW, 4]
    else:
        anchors = shifts[:, None, :] + lv.cells[None, :, :]  # [HW, K, 4]
    anchors = anchors.reshape(-1, 4)
    if lv.scale_x is not None:
        scale = torch.tensor([lv.scale_x, lv.scale_y, lv.scale_x, lv.scale_y], dtype=torch.float32, device="cpu")
        anchors.mul_(scale)  # in place: a second copy would raise the build's peak by half
    return anchors


def feature_map_size(canvas: tuple[int, int], level: AnchorLevel) -> tuple[int, int]:
    """Feature map (height, width) of a level on a canvas.

    A chain of stride-2 convolutions with "same" padding rounds up at every step
    (ResNet stem, max-pool, stages, FPN P6/P7 and torchvision's "pool" level), and
    nested ceilings of halvings equal one ceiling: ceil(canvas / stride). YOLOv5's stem
    (a 6x6 convolution, stride 2, padding 2) rounds down instead: on the canvases it
    trains on, multiples of 32 (its letterbox pads to them), the two agree.
    """
    if level.feature_size is not None:
        return level.feature_size
    return (-(-canvas[0] // level.stride), -(-canvas[1] // level.stride))


def _float32(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device="cpu").to(torch.float32).reshape(-1, 4)


def fixed_canvas(config: AnchorConfig) -> tuple[int, int]:
    """The canvas fixed feature maps were made for (every level's ``feature_size`` given,
    as SSD's and d2l's): the largest whose ``ceil(canvas / stride)`` is every level's
    feature map (300 x 300 for SSD300)."""
    levels = config.levels
    if any(lv.feature_size is None for lv in levels):
        raise ValueError("fixed_canvas: every level needs a feature_size")
    return (min(lv.feature_size[0] * lv.stride for lv in levels), min(lv.feature_size[1] * lv.stride for lv in levels))


def _torchvision_cells(level: AnchorLevel) -> torch.Tensor:
    # AnchorGenerator.generate_anchors: float32, ratio-outer, halved, then rounded.
    scales = torch.tensor(level.sizes, dtype=torch.float32, device="cpu")
    ratios = torch.tensor(level.aspect_ratios, dtype=torch.float32, device="cpu")
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _detectron2_cells(level: AnchorLevel) -> torch.Tensor:
    # DefaultAnchorGenerator.generate_cell_anchors: Python floats, size-outer.
    cells = []
    for size in level.sizes:
        area = size**2.0
        for ratio in level.aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return _float32(cells)


def _mmdet_cells(level: AnchorLevel, config: AnchorConfig) -> torch.Tensor:
    # AnchorGenerator.gen_single_level_base_anchors: float32 tensors.
    base = level.base_size if level.base_size is not None else float(level.stride)
    w = h = base
    x_center = config.center_offset * w
    y_center = config.center_offset * h
    ratios = torch.tensor(level.aspect_ratios, dtype=torch.float32, device="cpu")
    scales = torch.tensor(level.scales, dtype=torch.float32, device="cpu")
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    if config.scale_major:
        ws = (w * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h * h_ratios[:, None] * scales[None, :]).view(-1)
    else:
        ws = (w * scales[:, None] * w_ratios[None, :]).view(-1)
        hs = (h * scales[:, None] * h_ratios[None, :]).view(-1)
    return torch.stack([x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws, y_center + 0.5 * hs], dim=-1)


def _keras_cells(level: AnchorLevel) -> torch.Tensor:
    # keras-retinanet utils/anchors.generate_anchors: float64, ratio-outer, h = w * ratio.
    cells = []
    for ratio in level.aspect_ratios:
        for size in level.sizes:
            area = size * size
            w = math.sqrt(area / ratio)
            h = w * ratio
            cells.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    return _float32(cells)


def _yolo_cells(level: AnchorLevel) -> torch.Tensor:
    return _float32([[-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h] for w, h in level.shapes])


def _ssd_cells(level: AnchorLevel, clip: bool) -> torch.Tensor:
    # torchvision DefaultBoxGenerator._generate_wh_pairs (Python floats, then float32),
    # clamped to [0, 1], then (cx, cy, w, h) -> corners as cx -/+ 0.5 * w.
    s_k, s_next = level.sizes
    s_prime = math.sqrt(s_k * s_next)
    pairs = [[s_k, s_k], [s_prime, s_prime]]
    for ar in level.aspect_ratios:
        root = math.sqrt(ar)
        w, h = s_k * root, s_k / root
        pairs.extend([[w, h], [h, w]])
    wh = torch.tensor(pairs, dtype=torch.float32, device="cpu")
    if clip:
        wh = wh.clamp(min=0, max=1)
    half = 0.5 * wh
    return torch.cat([-half, half], dim=1)


def _d2l_cells(level: AnchorLevel) -> torch.Tensor:
    # d2l multibox_prior: float32; sizes with the first ratio, then the first size with
    # the other ratios; widths scaled by in_height / in_width; halved.
    fh, fw = level.feature_size
    sizes = torch.tensor(level.sizes, dtype=torch.float32, device="cpu")
    ratios = torch.tensor(level.aspect_ratios, dtype=torch.float32, device="cpu")
    w = torch.cat((sizes * torch.sqrt(ratios[0]), level.sizes[0] * torch.sqrt(ratios[1:]))) * fh / fw
    h = torch.cat((sizes / torch.sqrt(ratios[0]), level.sizes[0] / torch.sqrt(ratios[1:])))
    return torch.stack((-w, -h, w, h)).T / 2


def _resolve_level(config: AnchorConfig, index: int, level: AnchorLevel, canvas: tuple[int, int]) -> GridLevel:
    fh, fw = feature_map_size(canvas, level)
    layout = config.layout
    if layout == "torchvision":
        # torchvision derives the stride from the padded canvas and the feature map,
        # per axis and by integer division (800 // 13 = 61 for P6 at 800 x 1344).
        if fh > canvas[0] or fw > canvas[1]:
            raise ValueError(
                f"anchors.levels[{index}].feature_size: {fh} x {fw} is larger than the "
                f"{canvas[0]} x {canvas[1]} canvas: "
                "torchvision's stride (canvas // feature_size) would be 0, every anchor at the corner"
            )
        return GridLevel(fh, fw, 0.0, canvas[1] // fw, canvas[0] // fh, "mul", _torchvision_cells(level))
    if layout == "detectron2":
        s = level.stride
        return GridLevel(fh, fw, config.offset, s, s, "mul", _detectron2_cells(level))
    if layout == "mmdet":
        s = level.stride
        return GridLevel(fh, fw, 0.0, s, s, "mul", _mmdet_cells(level, config))
    if layout == "keras":
        return GridLevel(fh, fw, 0.5, level.stride, level.stride, "mul", _keras_cells(level))
    if layout == "yolo":
        return GridLevel(fh, fw, 0.5, level.stride, level.stride, "mul", _yolo_cells(level))
    if layout == "ssd":
        # DefaultBoxGenerator: centres (i + 0.5) / (canvas / step) in float32, then the
        # normalised boxes are scaled by the image size.
        return GridLevel(
            fh, fw, 0.5, canvas[1] / level.stride, canvas[0] / level.stride, "div",
            _ssd_cells(level, config.clip), float(canvas[1]), float(canvas[0]),
        )  # fmt: skip
    # d2l multibox_prior: centres (i + 0.5) * (1 / size) in float32, normalised boxes
    # scaled to canvas pixels.
    return GridLevel(fh, fw, 0.5, 1.0 / fw, 1.0 / fh, "mul", _d2l_cells(level), float(canvas[1]), float(canvas[0]))


def _kind(config: object) -> str:
    """What was given for an AnchorConfig, with the hint a whole TargetConfig needs."""
    name = type(config).__name__
    return f"{name} (pass its .anchors)" if name == "TargetConfig" else name


def check_canvas(canvas: object) -> tuple[int, int]:
    """Check a canvas ``(height, width)`` of positive ints."""
    if not isinstance(canvas, (tuple, list)) or len(canvas) != 2:
        raise TypeError(f"canvas: expected (height, width), got {canvas!r}")
    height, width = canvas
    if type(height) is not int or type(width) is not int:  # plain ints need no more than this
        if any(isinstance(side, bool) or not isinstance(side, numbers.Integral) for side in (height, width)):
            raise TypeError(f"canvas: expected two ints (height, width), got {canvas!r}")
        height, width = canvas = int(height), int(width)  # numpy's ints
    if height <= 0 or width <= 0:
        raise ValueError(f"canvas: height and width must be positive, got {tuple(canvas)}")
    if height > _MAX_SIDE or width > _MAX_SIDE:  # 2^63 overflowed int64 tables, SSD's anchors reached inf
        raise ValueError(f"canvas: a side is over {_MAX_SIDE:,} pixels, got {tuple(canvas)}")
    return canvas if type(canvas) is tuple else (height, width)


# A canvas side, as the wire and the kernels' indices hold it (int32).
_MAX_SIDE = 2**31 - 1


# Anchor indices travel as int32 (the sparse lists, the kernels' outputs).
_MAX_ANCHORS = 2**31 - 1


@functools.lru_cache(maxsize=64)
def _resolve_cached(config: AnchorConfig, canvas: tuple[int, int]) -> AnchorGrid:
    levels = tuple(_resolve_level(config, i, lv, canvas) for i, lv in enumerate(config.levels))
    for i, level in enumerate(levels):
        _check_cells(config.layout, i, level.cells)
    return AnchorGrid(levels, shape_major=config.layout == "yolo", canvas=canvas)


@functools.lru_cache(maxsize=64)
def _grid_to_build(config: AnchorConfig, canvas: tuple[int, int]) -> AnchorGrid:
    """The grid of anchors about to be built or assigned: refused past int32 anchor indices
    (an allocator's error for tens of gigabytes, or on a larger machine indices wrapped
    around), then where float32 rounds anchors flat (``_check_placed``). Counting them
    (``resolve_grid``) stays cheap, O(shapes) per level: the service refuses such a request
    by its own limits, as RESOURCE_EXHAUSTED, before anything per cell is computed (the
    placement check, run while counting, took seconds and gigabytes for one level 10^6
    cells wide with 256 shapes)."""
    grid = _resolve_cached(config, canvas)
    if grid.num_anchors > _MAX_ANCHORS:
        raise ValueError(f"anchors: {grid.num_anchors:,} per image on the {canvas[0]} x {canvas[1]} canvas, more "
                         f"than {_MAX_ANCHORS:,} (anchor indices are int32): a smaller canvas or fewer anchor "
                         "shapes")  # fmt: skip
    for i, level in enumerate(grid.levels):
        _check_placed(i, level, canvas)
    return grid


def _check_cells(layout: str, index: int, cells: torch.Tensor) -> None:
    """Refuse anchor shapes of zero width or height, as explicit anchors are refused: no
    box ever matches one (or, with ``match.high`` 0, every box does, with infinite
    deltas). The bounds on sizes and ratios do not rule them out: torchvision's layout
    rounds half sides to whole pixels (size 0.5 makes 0 x 0 anchors)."""
    flat = (cells[:, 2] <= cells[:, 0]) | (cells[:, 3] <= cells[:, 1])
    if flat.any():
        k = int(flat.nonzero()[0])
        width, height = float(cells[k, 2] - cells[k, 0]), float(cells[k, 3] - cells[k, 1])
        raise ValueError(
            f"anchors.levels[{index}]: the {layout} layout makes the level's anchor shape {k} "
            f"{width:g} x {height:g} (a size too small or an aspect ratio too extreme): no box could ever match it"
        )


def _check_placed(index: int, level: GridLevel, canvas: tuple[int, int]) -> None:
    """Refuse a level whose anchors float32 rounds flat where they are placed: far from
    the origin (a 1-pixel shape at x = 2e7, where float32 steps by 2) a centre plus the
    shape's two edges may round to one value. Each axis's edges depend only on that
    axis's centre, so every anchor is checked from the W + H centres, computed as
    ``_level_anchors`` computes them (which is how every backend generates them)."""
    for axis, count, factor, scale in ((0, level.width, level.factor_x, level.scale_x),
                                       (1, level.height, level.factor_y, level.scale_y)):  # fmt: skip
        centers = _centers(count, level.offset, factor, level.center_op)[:, None]
        low, high = centers + level.cells[None, :, axis], centers + level.cells[None, :, axis + 2]
        if scale is not None:
            scale32 = torch.tensor(scale, dtype=torch.float32, device="cpu")
            low, high = low * scale32, high * scale32
        flat = ~(high > low)
        if flat.any():
            cell, shape = (int(i) for i in flat.nonzero()[0])
            raise ValueError(
                f"anchors.levels[{index}]: on the {canvas[0]} x {canvas[1]} canvas, anchor shape {shape} at "
                f"{'column' if axis == 0 else 'row'} {cell} of the feature map has zero "
                f"{'width' if axis == 0 else 'height'} in float32 (its edges round to {float(low[cell, shape]):g}): "
                "a shape too small for coordinates that large"
            )


def resolve_grid(config: AnchorConfig, canvas: tuple[int, int]) -> AnchorGrid:
    """The per-level anchor tables of a config on a canvas (cached): the grid ``assign`` and
    ``generate_anchors`` build anchors from, shared, so read-only (an in-place edit of a
    level's ``cells`` would move the anchors of later calls; clone them to change them)."""
    if not isinstance(config, AnchorConfig):
        raise TypeError(f"config: expected AnchorConfig, got {_kind(config)}")
    return _resolve_cached(config, check_canvas(canvas))


# Anchor sets of more anchors than this are kept apart (``_LargeSets``): each cache below
# keeps 16 sets, and on a server's largest canvas (8192 x 8192: 13M RetinaNet anchors,
# 200 MB) a few small requests with distinct configs would pin gigabytes. 1M anchors
# (16 MB) covers RetinaNet up to ~2,300 x 2,300 (0.98M at 2,048 x 2,560).
_CACHED_ANCHORS_MAX = 1 << 20

# Larger sets are kept while together they take at most this many bytes, the most
# recently used first; a set larger than that is built on each call. Built on each call,
# as all of them were, a one-image cpu call on a 2,304 x 2,560 canvas (1.1M RetinaNet
# anchors) took 13 ms against 0.23 ms at 2,048 x 2,560 (0.98M, cached), and the triton
# backend built the set on the host and copied it to the device every time.
_LARGE_SETS_BYTES = 512 << 20


class _LargeSets:
    """Anchor sets of over ``_CACHED_ANCHORS_MAX`` anchors per (grid, device, CUDA stream),
    kept by bytes (``_LARGE_SETS_BYTES``), least recently used out first. Each stream has
    its copy, as in the caches below (a copy is filled on its stream, and freed memory is
    reused on the stream it was allocated on): N compute workers on one GPU keep N copies
    of a set, so of a server's 8192 x 8192 canvas (200 MB a RetinaNet set) two copies are
    kept and a third is built per call."""

    def __init__(self) -> None:
        self._sets: OrderedDict[tuple[AnchorGrid, torch.device, int | None], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # compute workers share it

    def get(self, grid: AnchorGrid, device: torch.device, stream: int | None) -> torch.Tensor:
        key = (grid, device, stream)  # the grid compares by identity; held here, its id is not reused
        with self._lock:
            anchors = self._sets.get(key)
            if anchors is not None:
                self._sets.move_to_end(key)
                return anchors
        anchors = grid.materialize().to(device)  # outside the lock: the largest take seconds
        if anchors.nbytes > _LARGE_SETS_BYTES:
            return anchors
        evicted = []  # freed after the lock is let go: hundreds of megabytes
        with self._lock:
            kept = self._sets.setdefault(key, anchors)  # another thread's, where it got here first
            if kept is anchors:
                self._bytes += anchors.nbytes
                while self._bytes > _LARGE_SETS_BYTES:
                    evicted.append(self._sets.popitem(last=False)[1])
                    self._bytes -= evicted[-1].nbytes
        return kept


_LARGE_SETS = _LargeSets()


def _new_lock_after_fork() -> None:
    """A forked child (a DataLoader worker) gets a free lock: another thread of the parent
    may have held this one at the fork, and nothing in the child would release it."""
    _LARGE_SETS._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


@functools.lru_cache(maxsize=16)
def _anchors_cached(config: AnchorConfig, canvas: tuple[int, int]) -> torch.Tensor:
    return _resolve_cached(config, canvas).materialize()


@functools.lru_cache(maxsize=16)
def _grid_and_anchors_cached(
    config: AnchorConfig, canvas: tuple[int, int], device: torch.device, stream: int | None
) -> tuple[AnchorGrid, torch.Tensor]:
    return _resolve_cached(config, canvas), _anchors_cached(config, canvas).to(device)  # filled on ``stream``


# (id(config), canvas, device, stream) -> (config, grid, anchors): a per-call lookup by identity in
# front of the cache above, which hashes the frozen config (every field of every level) on
# each call. Holding the config keeps its id from being reused; when full it is emptied
# (no iteration, so no lock), and the cache above still holds what it held.
_IdentityKey = tuple[int, tuple[int, int], torch.device, int | None]
_BY_IDENTITY: dict[_IdentityKey, tuple[AnchorConfig, AnchorGrid, torch.Tensor]] = {}
_BY_IDENTITY_KEPT = 16


def grid_and_anchors(
    config: AnchorConfig, canvas: tuple[int, int], device: torch.device
) -> tuple[AnchorGrid, torch.Tensor]:
    """The grid and the anchors of a checked ``(config, canvas)``, the anchors on ``device``.

    Cached per (config, canvas, device, CUDA stream: ``streams.stream_key``) so that a
    batch pays neither the generation nor the host-to-device copy of its anchors (3.2 MB
    for RetinaNet at 800x1344): every caller shares the tensor and must treat it as
    read-only. Sets of over a million anchors are kept by bytes (``_LargeSets``).
    """
    stream = stream_key(device)
    key = (id(config), canvas, device, stream)
    cached = _BY_IDENTITY.get(key)
    if cached is not None and cached[0] is config:
        return cached[1], cached[2]
    grid = _grid_to_build(config, canvas)
    if grid.num_anchors > _CACHED_ANCHORS_MAX:  # not in _BY_IDENTITY either: its 16 entries would pin them
        return grid, _LARGE_SETS.get(grid, device, stream)
    grid, anchors = _grid_and_anchors_cached(config, canvas, device, stream)
    if len(_BY_IDENTITY) >= _BY_IDENTITY_KEPT:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[key] = (config, grid, anchors)
    return grid, anchors


def level_slices(config: AnchorConfig, canvas: tuple[int, int]) -> list[slice]:
    """The anchors of each pyramid level: ``targets.labels[:, level_slices(...)[k]]`` are
    level k's, in the order ``generate_anchors`` gives them (levels in config order; within a
    level, row-major cells then shapes, or shapes first for yolo). A level's anchors are
    ``height x width x shapes`` of its feature map (``feature_map_size``), which is how a
    head's per-level outputs, flattened the same way, line up with the targets.
    """
    starts = resolve_grid(config, canvas).level_starts
    return [slice(start, end) for start, end in zip(starts, starts[1:])]


def generate_anchors(config: AnchorConfig, canvas: tuple[int, int]) -> torch.Tensor:
    """All anchors of a config on a canvas ``(height, width)``.

    Returns:
        Tensor[A, 4] float32, x1 y1 x2 y2 in canvas pixels, grouped by level: the caller's
        own (a copy of the set ``assign`` caches, so clipping it in place changes nothing else).
    """
    if not isinstance(config, AnchorConfig):
        raise TypeError(f"config: expected AnchorConfig, got {_kind(config)}")
    # From the sets assign keeps on the host, not from a cache of its own: with one, calls on
    # canvases assign was not given kept 16 sets of their own, twice what the caches are
    # sized for (466 MB over 32 canvases of about 2,000 x 2,500).
    _, anchors = grid_and_anchors(config, check_canvas(canvas), torch.device("cpu"))
    return anchors.clone()
