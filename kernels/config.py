"""Configuration of a target assignment: anchors, matching and encoding.

Every config is a frozen dataclass, validated on construction (a bad field raises
``ValueError``/``TypeError`` naming the field), hashable (so anchors can be cached
per config and canvas) and serialisable to and from a plain ``dict`` (the service
sends configs as JSON-like structures).

Conventions shared by every layout:

* aspect ratio is height / width (torchvision, detectron2, mmdet and keras all use h/w);
* strides and sizes are in pixels of the padded batch canvas;
* anchors are ``(x1, y1, x2, y2)`` float32.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ANCHOR_LAYOUTS",
    "LOW_QUALITY_MODES",
    "BORDER_ORDERS",
    "AnchorLevel",
    "AnchorConfig",
    "MatchConfig",
    "EncodeConfig",
    "TargetConfig",
]

# How each peer lays out and computes its anchors; see tritarget.kernels.anchors.
ANCHOR_LAYOUTS = ("torchvision", "detectron2", "mmdet", "ssd", "d2l", "yolo", "keras")

# Low-quality matching rules; see tritarget.kernels.reference.match_image.
LOW_QUALITY_MODES = ("none", "torchvision", "detectron2", "mmdet", "ssd_forced")

# When anchors crossing the image border are taken out: before matching (mmdet, they
# do not count for a box's best anchor) or after it (detectron2 RPN).
BORDER_ORDERS = ("pre_match", "post_match")

# detectron2's reasoning: a box may not grow more than 1000/16 times its anchor in one
# decode step, which keeps exp() finite for wild network outputs.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# Bounds on what an anchor config may ask for. Real detectors use at most 6 levels and a
# handful of sizes and ratios; a config from the wire could ask for millions of shapes
# per cell (built before any anchor count is checked) or for sizes whose anchors overflow
# float32 (every anchor then infinite, every label negative).
MAX_LEVELS = 16
MAX_LEVEL_VALUES = 64
MAX_ANCHOR_MAGNITUDE = 1e6  # pixels, or fractions of the canvas, or multiples of base_size

# Bound on the encoding's weights and stds (within [1/M, M]) and means (|m| <= M), so
# that no delta overflows float32, the precision every backend encodes in. A delta is
# (w * r - m) / s, where r is a raw term of a box against its anchor: a centre offset over
# the anchor's side (for a box on the canvas, about the canvas side over the anchor's at
# most) or the log of their sides' ratio (under 200 for any two float32 sides). With
# M = 1e6, |delta| <= 1e12 * (r + 1): finite while r < 3e26, where a 2**31-pixel canvas
# against a 1e-9-pixel anchor is r = 2e18. The lower bound keeps weights and stds nonzero
# in float32 (encoding divides by a std, decoding by a weight). Peers use weights up to
# ~30 and stds down to ~0.03 (cascade stages).
MAX_ENCODE_MAGNITUDE = 1e6


def _fail(owner: str, name: str, message: str) -> ValueError:
    return ValueError(f"{owner}.{name}: {message}")


def _check_sequence(owner: str, name: str, values: Any) -> None:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{owner}.{name}: expected a sequence, got {values!r}")


def _as_float_tuple(owner: str, name: str, values: Any) -> tuple[float, ...]:
    _check_sequence(owner, name, values)
    return tuple(_check_number(owner, name, v) for v in values)


# Numbers, ints and bools are taken in every Python and numpy type (a threshold read from
# an array, np.float32(0.5); a sample size from np.int64) and kept as Python's own, which
# the configs' JSON, hashes and wire form need. bool is no number here, nor a number a bool.


def _check_number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name}: expected a number, got {value!r}")
    try:
        number = float(value)  # an int of hundreds of digits (JSON has no bound) overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _fail(owner, name, f"must be finite, got {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    """A value for an error message: an int of thousands of digits by its size (Python
    refuses to print ints past 4,300 digits)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


_INT32_MAX = 2**31 - 1


def _check_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}.{name}: expected an integer, got {value!r}")
    return int(value)


def _check_bool(owner: str, name: str, value: Any) -> bool:
    """A bool, or numpy's (a "false" from a YAML or a CLI would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}.{name}: expected a bool, got {value!r}")
    return bool(value)


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(owner, name, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class AnchorLevel:
    """One pyramid level: its stride and the anchor shapes placed at every cell.

    Which fields a level uses depends on the layout (``AnchorConfig.layout``):

    * torchvision, detectron2, keras: ``sizes`` (side of the ratio-1 anchor, pixels)
      and ``aspect_ratios``;
    * mmdet: ``scales`` (multiples of ``base_size``, which defaults to the stride)
      and ``aspect_ratios``;
    * ssd: ``sizes = (s_k, s_k+1)`` as fractions of the canvas and the extra
      ``aspect_ratios`` (e.g. ``(2, 3)``, each giving a w/h and an h/w box);
    * d2l: ``sizes`` as fractions of the canvas and ``aspect_ratios`` (n + m - 1
      shapes per cell);
    * yolo: ``shapes``, explicit ``(w, h)`` pairs in pixels.

    ``feature_size`` fixes the feature map ``(height, width)``; when ``None`` it is
    ``ceil(canvas / stride)``, which is what a ResNet/FPN backbone of stride-2
    convolutions with "same" padding produces.
    """

    stride: int
    sizes: tuple[float, ...] = ()
    aspect_ratios: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()
    shapes: tuple[tuple[float, float], ...] = ()
    base_size: float | None = None
    feature_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        owner = "AnchorLevel"
        stride = _check_int(owner, "stride", self.stride)
        object.__setattr__(self, "stride", stride)
        if not 0 < stride <= MAX_ANCHOR_MAGNITUDE:  # mmdet's base size is the stride
            raise _fail(owner, "stride", f"must be in [1, {MAX_ANCHOR_MAGNITUDE:g}], got {_shown(stride)}")
        for name in ("sizes", "aspect_ratios", "scales", "shapes"):
            _check_sequence(owner, name, getattr(self, name))
            if len(getattr(self, name)) > MAX_LEVEL_VALUES:  # shapes per cell grow with their product
                raise _fail(owner, name, f"at most {MAX_LEVEL_VALUES} values, got {len(getattr(self, name))}")
        # Bounded below as above: a size of 1e-300 made anchors of zero area in float32 (no
        # positive ever), which explicit anchors are refused for.
        low = 1 / MAX_ANCHOR_MAGNITUDE
        for name in ("sizes", "aspect_ratios", "scales"):
            values = _as_float_tuple(owner, name, getattr(self, name))
            if any(not low < v <= MAX_ANCHOR_MAGNITUDE for v in values):
                raise _fail(owner, name, f"values must be in ({low:g}, {MAX_ANCHOR_MAGNITUDE:g}], got {values}")
            object.__setattr__(self, name, values)
        shapes = []
        for pair in self.shapes:
            wh = _as_float_tuple(owner, "shapes", pair)
            if len(wh) != 2 or not all(low < v <= MAX_ANCHOR_MAGNITUDE for v in wh):
                raise _fail(owner, "shapes", f"each shape is a (w, h) pair in ({low:g}, {MAX_ANCHOR_MAGNITUDE:g}], "
                                             f"got {pair!r}")  # fmt: skip
            shapes.append(wh)
        object.__setattr__(self, "shapes", tuple(shapes))
        if self.base_size is not None:
            base = _check_number(owner, "base_size", self.base_size)
            if not low < base <= MAX_ANCHOR_MAGNITUDE:
                raise _fail(owner, "base_size", f"must be in ({low:g}, {MAX_ANCHOR_MAGNITUDE:g}], got {base}")
            object.__setattr__(self, "base_size", base)
        if self.feature_size is not None:
            _check_sequence(owner, "feature_size", self.feature_size)
            fs = tuple(self.feature_size)
            if len(fs) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in fs):
                raise _fail(owner, "feature_size", f"must be two positive ints (h, w), got {self.feature_size!r}")
            fs = tuple(int(v) for v in fs)
            if max(fs) > MAX_ANCHOR_MAGNITUDE:
                raise _fail(owner, "feature_size", f"at most {MAX_ANCHOR_MAGNITUDE:g} cells a side, got {fs!r}")
            object.__setattr__(self, "feature_size", fs)


def _hash_once(cls: type) -> type:
    """Hash each config object once. Configs key the anchor caches and the server's batch
    groups on every request, and hashing one walks every nested field (microseconds).
    The cached hash stays out of pickles and copies: string hashes differ between
    processes."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def __hash__(self) -> int:  # noqa: N807
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, name) for name in names))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:  # noqa: N807
        return {key: value for key, value in self.__dict__.items() if key != "_hash"}

    cls.__hash__ = __hash__
    cls.__getstate__ = __getstate__
    return cls


# The level fields each layout reads (a level's feature_size: every layout).
_LAYOUT_LEVEL_FIELDS = {
    "torchvision": ("sizes", "aspect_ratios"),
    "detectron2": ("sizes", "aspect_ratios"),
    "keras": ("sizes", "aspect_ratios"),
    "mmdet": ("scales", "aspect_ratios", "base_size"),
    "d2l": ("sizes", "aspect_ratios"),
    "ssd": ("sizes", "aspect_ratios"),
    "yolo": ("shapes",),
}
# Of those, the ones a level may leave out (mmdet: the stride; ssd: no extra ratios).
_OPTIONAL_LEVEL_FIELDS = {"mmdet": ("base_size",), "ssd": ("aspect_ratios",)}
# AnchorConfig fields one layout alone reads.
_LAYOUT_ONLY = {"offset": "detectron2", "center_offset": "mmdet", "scale_major": "mmdet", "clip": "ssd"}


@_hash_once
@dataclass(frozen=True)
class AnchorConfig:
    """Anchors of a detector: a layout convention and its pyramid levels.

    ``offset`` is detectron2's cell-centre offset (a fraction of the stride in [0, 1);
    0.0 and 0.5, detectron2's values, give its anchors bit for bit, another offset with a
    stride that is not a power of two may differ from detectron2's by a float32 ulp: it
    rounds offset * stride + i * stride once, in float64); ``center_offset`` is mmdet's (fraction of the base size);
    ``scale_major`` is mmdet's shape order flag (True: ratio-outer, scale-inner);
    ``clip`` is torchvision SSD's clamp of (w, h) to [0, 1].
    """

    layout: str
    levels: tuple[AnchorLevel, ...]
    offset: float = 0.0
    center_offset: float = 0.0
    scale_major: bool = True
    clip: bool = True

    def __post_init__(self) -> None:
        owner = "AnchorConfig"
        _check_choice(owner, "layout", self.layout, ANCHOR_LAYOUTS)
        _check_sequence(owner, "levels", self.levels)
        levels = tuple(_level(lv, f"{owner}.levels[{i}]") for i, lv in enumerate(self.levels))
        if not 1 <= len(levels) <= MAX_LEVELS:
            raise _fail(owner, "levels", f"between 1 and {MAX_LEVELS} levels, got {len(levels)}")
        object.__setattr__(self, "levels", levels)
        for name in ("offset", "center_offset"):
            value = _check_number(owner, name, getattr(self, name))
            if not 0.0 <= value < 1.0:
                raise _fail(owner, name, f"must be in [0, 1), got {value}")
            object.__setattr__(self, name, value)
        for name in ("scale_major", "clip"):
            object.__setattr__(self, name, _check_bool(owner, name, getattr(self, name)))
        for i, level in enumerate(levels):
            self._check_level(i, level)
        for name, layout in _LAYOUT_ONLY.items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == name)
            if self.layout != layout and getattr(self, name) != default:
                raise ValueError(f"{owner}.{name}: only the {layout} layout uses it, "
                                 f"got {getattr(self, name)!r} with the {self.layout} layout")  # fmt: skip

    def _check_level(self, i: int, level: AnchorLevel) -> None:
        where = f"AnchorConfig.levels[{i}]"
        reads = _LAYOUT_LEVEL_FIELDS[self.layout]
        optional = _OPTIONAL_LEVEL_FIELDS.get(self.layout, ())
        for name in reads:
            if name not in optional and not getattr(level, name):
                raise ValueError(f"{where}.{name}: the {self.layout} layout needs it")
        # A field the layout does not read would change nothing, silently (scales on a
        # torchvision level: the user meant more anchors and gets none).
        for name in ("sizes", "aspect_ratios", "scales", "shapes", "base_size"):
            if name not in reads and getattr(level, name) not in ((), None):
                raise ValueError(f"{where}.{name}: the {self.layout} layout does not use it "
                                 f"(its levels take {', '.join(reads)})")  # fmt: skip
        if self.layout == "ssd" and len(level.sizes) != 2:
            raise ValueError(f"{where}.sizes: the ssd layout takes (s_k, s_k+1), got {level.sizes}")
        if self.layout in ("ssd", "d2l") and level.feature_size is None:
            raise ValueError(f"{where}.feature_size: the {self.layout} layout needs a fixed feature map size")

    @property
    def anchors_per_cell(self) -> tuple[int, ...]:
        """Number of anchor shapes at each cell, per level."""
        out = []
        for lv in self.levels:
            if self.layout in ("torchvision", "detectron2", "keras"):
                out.append(len(lv.sizes) * len(lv.aspect_ratios))
            elif self.layout == "mmdet":
                out.append(len(lv.scales) * len(lv.aspect_ratios))
            elif self.layout == "ssd":
                out.append(2 + 2 * len(lv.aspect_ratios))
            elif self.layout == "d2l":
                out.append(len(lv.sizes) + len(lv.aspect_ratios) - 1)
            else:
                out.append(len(lv.shapes))
        return tuple(out)


@dataclass(frozen=True)
class MatchConfig:
    """Max-IoU matching of anchors to ground-truth boxes.

    * ``iou >= high`` positive, ``iou < low`` negative, in between ignored
      (torchvision/detectron2 ``[low, high)``). ``strict_high`` flips both comparisons,
      ``iou > high`` positive and ``iou <= low`` negative: DALI/MLPerf SSD's single
      criterion (``low == high``), where an IoU equal to it is background.
    * ``low_quality``: ``none`` | ``torchvision`` | ``detectron2`` | ``mmdet`` |
      ``ssd_forced`` (see ``tritarget.kernels.reference``). A box takes part only
      when its best IoU is ``>= min_pos_iou``.
    * ``ignore_iof_thr``: anchors whose IoF with an ignore (crowd) box exceeds it are
      ignored and left out of matching (mmdet); ``<= 0`` turns it off (mmdet applies
      it only when positive).
      ``ignore_iof_wrt_anchor``: IoF is intersection / anchor area (mmdet's
      ``ignore_wrt_candidates=True``), else intersection / ignore-box area.
    * ``allowed_border``: anchors reaching further than this many pixels outside the
      image's valid size are ignored; ``-1`` turns it off. ``border_order`` says
      whether they are taken out before matching or after it.
    * ``sample_size``/``positive_fraction``: balanced sampling (0 = off) as
      torchvision/detectron2 RPN; anchors not drawn become ignored.
    """

    high: float = 0.5
    low: float = 0.4
    strict_high: bool = False
    low_quality: str = "torchvision"
    min_pos_iou: float = 0.0
    ignore_iof_thr: float = -1.0
    ignore_iof_wrt_anchor: bool = True
    allowed_border: float = -1.0
    border_order: str = "pre_match"
    sample_size: int = 0
    positive_fraction: float = 0.5

    def __post_init__(self) -> None:
        owner = "MatchConfig"
        for name in ("high", "low", "min_pos_iou", "ignore_iof_thr", "allowed_border", "positive_fraction"):
            object.__setattr__(self, name, _check_number(owner, name, getattr(self, name)))
        for name in ("strict_high", "ignore_iof_wrt_anchor"):
            object.__setattr__(self, name, _check_bool(owner, name, getattr(self, name)))
        if not 0.0 <= self.high <= 1.0:
            raise _fail(owner, "high", f"must be in [0, 1], got {self.high}")
        if not 0.0 <= self.low <= self.high:
            raise _fail(owner, "low", f"must be in [0, high={self.high}], got {self.low}")
        _check_choice(owner, "low_quality", self.low_quality, LOW_QUALITY_MODES)
        _check_choice(owner, "border_order", self.border_order, BORDER_ORDERS)
        if self.allowed_border < 0 and self.allowed_border != -1:
            raise _fail(owner, "allowed_border", f"must be >= 0, or -1 for off; got {self.allowed_border}")
        object.__setattr__(self, "sample_size", _check_int(owner, "sample_size", self.sample_size))
        if self.sample_size < 0:
            raise _fail(owner, "sample_size", f"must be >= 0 (0 = no sampling), got {self.sample_size}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise _fail(owner, "positive_fraction", f"must be in [0, 1], got {self.positive_fraction}")


@dataclass(frozen=True)
class EncodeConfig:
    """Box-offset encoding ``(dx, dy, dw, dh)`` of a box w.r.t. its anchor.

    ``dx = wx * (gcx - acx) / aw``, ``dw = ww * log(gw / aw)`` (torchvision/detectron2
    weights), then ``(d - means) / stds`` (mmdet). Decoding clamps dw/dh to at most
    ``scale_clamp`` before ``exp`` (torchvision, detectron2) and, with ``symmetric_clamp``,
    to at least ``-scale_clamp`` too (mmdet's ``delta2bbox`` clamps both ways: a box
    predicted under 16/1000 of its anchor's side decodes to that fraction).
    """

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    scale_clamp: float = DEFAULT_SCALE_CLAMP
    symmetric_clamp: bool = False

    def __post_init__(self) -> None:
        owner = "EncodeConfig"
        object.__setattr__(self, "symmetric_clamp", _check_bool(owner, "symmetric_clamp", self.symmetric_clamp))
        for name in ("weights", "means", "stds"):
            values = _as_float_tuple(owner, name, getattr(self, name))
            if len(values) != 4:
                raise _fail(owner, name, f"needs 4 values (x, y, w, h), got {len(values)}")
            if name == "means":
                if any(abs(v) > MAX_ENCODE_MAGNITUDE for v in values):
                    raise _fail(owner, name, f"values must be in [-{MAX_ENCODE_MAGNITUDE:g}, "
                                             f"{MAX_ENCODE_MAGNITUDE:g}], got {values}")  # fmt: skip
            elif any(not 1 / MAX_ENCODE_MAGNITUDE <= v <= MAX_ENCODE_MAGNITUDE for v in values):
                raise _fail(owner, name, f"values must be in [{1 / MAX_ENCODE_MAGNITUDE:g}, "
                                         f"{MAX_ENCODE_MAGNITUDE:g}], got {values}")  # fmt: skip
            object.__setattr__(self, name, values)
        clamp = _check_number(owner, "scale_clamp", self.scale_clamp)
        if clamp <= 0:
            raise _fail(owner, "scale_clamp", f"must be positive, got {clamp}")
        object.__setattr__(self, "scale_clamp", clamp)


@_hash_once
@dataclass(frozen=True)
class TargetConfig:
    """Everything that decides the targets: anchors, matching, encoding.

    ``background_class`` is written to ``Targets.classes`` for every anchor that is
    not positive (torchvision's two-stage heads use 0; mmdet/detectron2 use the
    number of classes: set it accordingly).
    """

    anchors: AnchorConfig
    match: MatchConfig = field(default_factory=MatchConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    background_class: int = 0

    def __post_init__(self) -> None:
        for name, cls in (("anchors", AnchorConfig), ("match", MatchConfig), ("encode", EncodeConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = _from_dict(cls, value, f"TargetConfig.{name}")
                object.__setattr__(self, name, value)
            if not isinstance(value, cls):
                raise TypeError(f"TargetConfig.{name}: expected {cls.__name__}, got {type(value).__name__}")
        object.__setattr__(
            self, "background_class", _check_int("TargetConfig", "background_class", self.background_class)
        )
        # Classes travel as int32 (Targets.classes, the wire); a negative background would
        # collide with the ignore conventions (-1, -2) of the frameworks' adapters.
        if not 0 <= self.background_class <= _INT32_MAX:
            raise _fail(
                "TargetConfig", "background_class", f"must be in [0, {_INT32_MAX}], got {self.background_class}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-compatible dict; ``TargetConfig.from_dict`` reverses it."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetConfig:
        return _from_dict(cls, data, "TargetConfig")

    def replace(self, **overrides: Any) -> TargetConfig:
        """A copy with fields replaced, named by dotted paths; ``[k]`` picks pyramid level k.

        ``cfg.replace(**{"match.high": 0.6, "background_class": 80,
        "anchors.levels[0].aspect_ratios": (0.5, 1.0), "anchors.levels[4]": AnchorLevel(...)})``
        The copy is validated as a whole, so a bad value names the field it went to.
        """
        data = self.to_dict()
        for key in overrides:
            if not isinstance(key, str) or not key:
                raise ValueError(f"override {key!r}: expected a dotted field name")
        # Every key resolved before any is applied: the fields are disjoint, so none
        # replaces a dict or list that another one's slot lies in.
        slots = {key: _override_slot(data, key) for key in overrides}
        _check_disjoint({key: path for key, (_, _, path) in slots.items()})
        for key, value in overrides.items():
            container, name, _ = slots[key]
            container[name] = plain_value(value)
        return TargetConfig.from_dict(data)


def plain_value(value: Any) -> Any:
    """An override's value as plain data (a config object as its dict): what JSON carries."""
    return _to_plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)


def _check_disjoint(paths: dict[str, tuple]) -> None:
    """No override inside another (``match`` with ``match.high``): which applies last would
    depend on their order, which the wire does not keep (overrides are a map). ``paths``:
    each key's field as resolved (``_override_slot``), a few steps deep, so that checking
    every prefix is linear in the keys (prefixes of the keys' text were quadratic in a
    key's length: a 64 KiB key of dots took a second)."""
    given = {path: key for key, path in paths.items()}
    for key, path in paths.items():
        for end in range(1, len(path)):
            if path[:end] in given:
                raise ValueError(f"overrides {given[path[:end]]!r} and {key!r}: one holds the other; give one of them")


# One step of an override path: a field name, optionally indexed (``levels[2]``), matched
# whole (``$`` would let a trailing newline through) and with one spelling per index (no
# leading zero), so that two keys never name one field unnoticed.
_PATH_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(0|[1-9][0-9]*)\])?")


def _override_slot(data: dict[str, Any], key: str) -> tuple[Any, Any, tuple]:
    """(the dict or list that holds the field named by ``key``, its key or index, the path
    to it: its names and indices)."""
    container: Any = data
    slot: Any = None
    path: tuple = ()
    walked = ""
    for step in key.split("."):
        if slot is not None:
            container = container[slot]
        match = _PATH_STEP.fullmatch(step)
        if match is None or not isinstance(container, dict):
            raise ValueError(f"override {key!r}: cannot address {step!r} after {walked.rstrip('.') or 'the config'!r}")
        name, index = match.group(1), match.group(2)
        if name not in container:
            raise ValueError(f"override {key!r}: unknown config field {walked + name!r}")
        walked += name
        slot = name
        path += (name,)
        if index is not None:
            if not isinstance(container[name], list):
                raise ValueError(f"override {key!r}: {walked!r} is not a list of levels")
            if int(index) >= len(container[name]):
                raise ValueError(f"override {key!r}: {walked!r} has {len(container[name])} entries, no [{index}]")
            container, slot = container[name], int(index)
            path += (slot,)
            walked += f"[{index}]"
        walked += "."
    return container, slot, path


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _level(data: Any, where: str) -> AnchorLevel:
    """A pyramid level from its dict; a bad field is named with the level's place
    (``TargetConfig.anchors.levels[3].sizes``, not ``AnchorLevel.sizes``)."""
    try:
        return _from_dict(AnchorLevel, data, where)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if not message.startswith("AnchorLevel."):
            raise
        raise type(exc)(where + message[len("AnchorLevel") :]) from None


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    # A YAML key may be an int (or None): named as Python writes it, sorted among the names.
    unknown = sorted(key if isinstance(key, str) else repr(key) for key in set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = dict(data)  # sequences become tuples where each config checks its fields
    if cls is AnchorConfig and "levels" in kwargs:
        if not isinstance(kwargs["levels"], (list, tuple)):
            raise TypeError(f"{where}.levels: expected a list of levels, got {kwargs['levels']!r}")
        kwargs["levels"] = tuple(_level(lv, f"{where}.levels[{i}]") for i, lv in enumerate(kwargs["levels"]))
    if cls is TargetConfig and "anchors" not in kwargs:
        raise ValueError(f"{where}.anchors: required")
    return cls(**kwargs)
