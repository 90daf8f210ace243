"""Checking a user's batch and turning it into the ``Problem`` every backend solves.

A backend never sees raw user input: ``build_problem`` checks types, shapes, counts
and every box, drops invalid boxes when asked (remembering where each kept box came
from), and fills in defaults (valid sizes = canvas, no ignore boxes), and turns padded sizes into
each image's valid feature-map cells.

Invalid boxes are degenerate (x2 <= x1 or y2 <= y1), not finite, wholly outside
the canvas, or reach beyond ±2**31 pixels (``BOX_REACH``). They are refused rather than
matched because a box with IoU 0 against every anchor would, under torchvision's and
mmdet's low-quality rule, turn every zero-IoU anchor positive; a box reaching farther
could be matched and encoded into infinite deltas.

A call costs little besides the backend: generated anchors come from a cache (one
copy per config, canvas and device), and the small integers (offsets, image sizes) stay
on the host, packed as the CPU kernel reads them, until a backend first asks for them as
device tensors (then in one copy). Boxes on the CPU are checked by the cpu backend's
compiled loop when that backend will solve them (``host_check``), else, a few of them,
with plain Python floats (cheaper than any torch op); other boxes are checked where they
live with one read-back per call, and looked at one by one on the host only when some box
may be invalid. A backend that reads every gt box anyway can take their check over
(``check_gt_boxes=False``): it tests each box as it reads it and raises
``CheckBoxesFirst`` on a box that may be invalid, and the caller builds the problem again
with the check here, which raises or drops as it always does. Classes and crowd regions
given on a device go with them (on the host they are checked there, cheaply), unless
explicit anchors on the device are read back here anyway. That spares the cpu backend a
pass over the boxes and the triton backend its read-back of the boxes before the launches
(it reads one flag back after them, and the classes' extremes, with the lists' lengths on
the sparse path).
"""

from __future__ import annotations

import array
import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch

from .anchors import AnchorGrid, check_canvas, grid_and_anchors
from .boxes import plain_xyxy
from .config import _INT32_MAX, TargetConfig
from .streams import stream_key
from .targets import check_strided, nothing_dropped

__all__ = ["CheckBoxesFirst", "HostInts", "Problem", "build_problem", "canvas_limits", "integer_dtype", "valid_cells"]


class CheckBoxesFirst(Exception):
    """Raised by a backend given a problem whose gt boxes it was to check
    (``Problem.gt_boxes_checked`` False) when some box may be invalid, or when it cannot
    check them: the caller builds the problem again with ``check_gt_boxes=True``."""


class HostInts:
    """A batch's small integers on the host: int64 gt offsets [B + 1], ignore offsets [B + 1]
    and (height, width) of each image [B, 2], packed in one buffer, each part starting at a
    multiple of 16 bytes as a tensor of its own would (the Triton backend specialises its
    kernels on pointer alignment). The CPU kernel reads the offsets in place."""

    __slots__ = ("batch", "ints", "stride", "gt_offsets_address", "ignore_offsets_address")

    def __init__(self, gt_counts: list[int], ignore_counts: list[int] | None, sizes: list[int]):
        """From the boxes per image (``ignore_counts`` None: no ignore boxes) and the sizes."""
        batch = self.batch = len(gt_counts)
        padding = [0] * ((batch + 1) % 2)
        stride = self.stride = batch + 1 + len(padding)  # each offsets part
        ignore = [0] * (batch + 1) if ignore_counts is None else accumulate(ignore_counts, initial=0)
        self.ints = array.array("q", [*accumulate(gt_counts, initial=0), *padding, *ignore, *padding, *sizes])
        # Where the CPU kernel reads the offsets; valid while this lives.
        self.gt_offsets_address = self.ints.buffer_info()[0]
        self.ignore_offsets_address = self.gt_offsets_address + 8 * stride

    @property
    def sizes(self) -> list[int]:
        """Every image's (height, width), flattened."""
        return self.ints[2 * self.stride :].tolist()

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gt_offsets, ignore_offsets, image_sizes [B, 2]): views of one tensor on ``device``,
        made in one copy (none on the CPU: views of this buffer)."""
        # From an array's bytes: several times cheaper than torch.tensor parsing a list.
        # non_blocking: CUDA has copied pageable memory out before the call returns, so this
        # is safe, and it skips the stream synchronisation torch adds to a blocking copy.
        return self.views(torch.frombuffer(self.ints, dtype=torch.int64).to(device, non_blocking=True))

    def views(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gt_offsets, ignore_offsets, image_sizes [B, 2]) of ``packed``, int64 laid out
        as ``ints``."""
        stride, batch = self.stride, self.batch
        gt, _, ignore, _, sizes = packed.split_with_sizes((batch + 1, stride - batch - 1) * 2 + (2 * batch,))
        return gt, ignore, sizes.view(batch, 2)


# Problem and Kept are read-only by contract, not frozen: a frozen dataclass sets each field
# through object.__setattr__, which costs ~3 us per call, twice the rest of their construction.
# Slotted: no instance dict to make and free on every call.
@dataclass(eq=False, slots=True)
class Problem:
    """A checked, ragged batch; what ``backend.solve(problem) -> Targets`` receives.

    grid: per-level anchor tables, or None when explicit anchors were given.
    anchors (Tensor[A, 4] float32): every anchor, on ``device`` (generated or explicit).
        Generated anchors are shared by every call with the same config and canvas
        (``anchors.grid_and_anchors``): read-only.
    gt_boxes (Tensor[N, 4] float32), gt_offsets (Tensor[B + 1] int64): image i owns rows
        ``gt_offsets[i]:gt_offsets[i + 1]``.
    gt_classes (Tensor[N] int32 or int64, or None): int64 as given (torchvision's, detectron2's
        and mmdet's labels are), not converted on every call; backends write int32 classes.
    ignore_boxes (Tensor[M, 4] float32), ignore_offsets (Tensor[B + 1] int64): crowd
        regions, possibly none.
    image_sizes (Tensor[B, 2] int64): valid (height, width) of each image.
    host_ints: the offsets and sizes on the host, where the CPU kernel reads them.
    valid_cells (Tensor[B, L, 2] int32 on the host, or None): per image and level, the
        feature-map rows and columns inside the image's padded size (``pad_sizes``);
        anchors of the other cells are excluded (see ``valid_cells``). None when no image
        excludes any anchor.
    gt_boxes_checked: False when ``build_problem`` left the gt boxes' values to the
        backend (``check_gt_boxes=False``), which must then test them by
        ``_invalid_on_host``'s rule (or the device rule of ``_margins``) and raise
        ``CheckBoxesFirst`` if one may be invalid, before returning any targets.
    gt_classes_checked: False when it left the gt classes too (given on a device, with
        ``check_gt_boxes=False``, where no other input was read back from the device):
        the backend raises ``CheckBoxesFirst`` if one lies outside [0, 2^31), or if it
        cannot check them.
    ignore_boxes_checked: False when it left the ignore boxes too (on a device, with
        ``check_gt_boxes=False``, where no explicit anchors were read back from it): the
        backend tests them as it tests the gt boxes.
    Every tensor is contiguous. gt_offsets, ignore_offsets and image_sizes are views of one
    buffer, made on first use from ``host_ints``: read-only.
    """

    config: TargetConfig
    canvas: tuple[int, int]
    grid: AnchorGrid | None
    anchors: torch.Tensor
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor | None
    ignore_boxes: torch.Tensor
    host_ints: HostInts
    want_max_iou: bool = False
    valid_cells: torch.Tensor | None = None
    gt_boxes_checked: bool = True
    gt_classes_checked: bool = True
    ignore_boxes_checked: bool = True
    _on_device: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _device_ints(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._on_device is None:
            self._on_device = self.host_ints.to(self.device)
        return self._on_device

    @property
    def gt_offsets(self) -> torch.Tensor:
        return self._device_ints()[0]

    @property
    def ignore_offsets(self) -> torch.Tensor:
        return self._device_ints()[1]

    @property
    def image_sizes(self) -> torch.Tensor:
        return self._device_ints()[2]

    @property
    def batch_size(self) -> int:
        return self.host_ints.batch

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gt_boxes.device


@dataclass(eq=False, slots=True)
class Kept:
    """Which given boxes survived ``drop_invalid``.

    original_index (Tensor[N_kept] int64): index within its image of each kept box;
        None when no box was dropped.
    dropped (list of B Tensor[D_i] int64): indices within each image of dropped boxes.
    dropped_ignore (list of B Tensor[E_i] int64): likewise of dropped ignore regions
        (set by ``build_problem``).
    """

    original_index: torch.Tensor | None
    dropped: list[torch.Tensor]
    dropped_ignore: list[torch.Tensor] = field(default_factory=list)


# How far from the origin a gt box or crowd region may reach, in pixels (in float32,
# exactly): with boxes that only have to touch a canvas of at most 2**31 pixels a side,
# a side of ~1e37 pixels was matched and its centre offset overflowed into an infinite
# delta. Within this, config.MAX_ENCODE_MAGNITUDE keeps every delta finite.
BOX_REACH = 2.0**31


class _Boxes(NamedTuple):
    """An input whose box values are checked: ``counts`` per image, or None for anchors
    (explicit anchors may lie outside the canvas, and are never dropped)."""

    name: str
    boxes: torch.Tensor
    counts: list[int] | None
    given: torch.dtype = torch.float32  # as passed: a float64 box is checked, and shown, rounded to float32


class _Dropped(NamedTuple):
    """What ``drop_invalid`` left of one input."""

    counts: list[int]
    rows: torch.Tensor  # int64, on the host: the kept rows
    kept: Kept


@functools.lru_cache(maxsize=8)
def _no_boxes(device: torch.device) -> torch.Tensor:
    return torch.empty(0, 4, dtype=torch.float32, device=device)


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name}: a tensor on the meta device has no values")
    check_strided(name, value)
    return value


def _from_numpy(name: str, value: object) -> object:
    """A numpy array as a tensor (any strides; numbers only), anything else as it is."""
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected integers, got a numpy array of {value.dtype}")
    return torch.from_numpy(np.ascontiguousarray(value))  # torch refuses negative strides ([::-1])


def _boxes(name: str, value: object, device: torch.device | None) -> tuple[torch.Tensor, torch.dtype]:
    """A box input, float32 and contiguous, on ``device`` (None: the gt boxes, which decide
    it), and the dtype it was given in."""
    boxes = plain_xyxy(name, _tensor(name, value))
    if not boxes.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32 xyxy), got {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if boxes.shape[0] > _INT32_MAX:  # before any copy: an expanded tensor may hold them in 16 bytes
        raise ValueError(f"{name}: {boxes.shape[0]:,} boxes, more than {_INT32_MAX:,} (box and anchor indices are "
                         "int32)")  # fmt: skip
    if device is not None and boxes.device != device:
        raise ValueError(f"{name}: on {boxes.device}, but gt_boxes are on {device}")
    if boxes.dtype is torch.float32 and boxes.is_contiguous():
        return boxes, boxes.dtype  # what the conversions would return, without their dispatch
    return boxes.to(torch.float32).contiguous(), boxes.dtype


def check_flags(**flags) -> None:
    """``TypeError`` for a flag that is not a bool (numpy's included): a "false" from a YAML
    or a CLI would read as True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")


def integer_dtype(dtype: torch.dtype) -> bool:
    """Whether a tensor of ``dtype`` holds integers (bool and complex do not count)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def checked_real(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
                 note: str = "") -> float:  # fmt: skip
    """``value``, a real number in [low, high] (NaN is in no range), as a number: a
    one-element tensor's value (its dimensions would broadcast into what it weighs)."""
    real = isinstance(value, torch.Tensor) and (value.is_floating_point() or integer_dtype(value.dtype))
    if real and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        limits = ((">=", low), ("<=", high))
        bounds = " and ".join(f"{sign} {bound:g}" for sign, bound in limits if math.isfinite(bound))
        raise ValueError(f"{name}: expected a number{' ' + bounds if bounds else ''}{note}, got {value!r}")
    return value


def checked_counts(name: str, value: object, total: int, total_name: str, batch: int | None) -> list[int]:
    """``value`` (a list, 1-D integer tensor or numpy array of per-image counts) as ints, checked: integers,
    ``batch`` of them (if given), none negative, summing to ``total`` (the rows of ``total_name``)."""
    # A list's checks run in C where they can (map, min, sum): every call makes them, and
    # for one image they take ~2 us where a generator and a Python loop took ~3.5 us.
    if isinstance(value, (list, tuple)):
        counts = list(value)
        kinds = set(map(type, counts))
        if kinds - {int}:  # numpy's ints too (np.int64 is no int subclass), not bools
            if any(issubclass(kind, bool) or not issubclass(kind, numbers.Integral) for kind in kinds):
                raise TypeError(f"{name}: expected integers, got {value!r}")
            counts = [int(count) for count in counts]
    else:
        if not isinstance(value, (torch.Tensor, np.ndarray)):  # an int, a range: one count per image is wanted
            raise TypeError(f"{name}: expected a list, 1-D integer tensor or numpy array of per-image counts, "
                            f"got {type(value).__name__}")  # fmt: skip
        tensor = _tensor(name, _from_numpy(name, value))
        if not integer_dtype(tensor.dtype):
            raise TypeError(f"{name}: expected an integer tensor, got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name}: expected shape [B], got {list(tensor.shape)}")
        counts = tensor.tolist()  # the offsets are built on the host: a CUDA tensor syncs here
    if batch is not None and len(counts) != batch:
        raise ValueError(f"{name}: has {len(counts)} images, but gt_counts has {batch}")
    if not counts:
        raise ValueError(f"{name}: the batch is empty (need at least one image)")
    if min(counts) < 0:
        image = next(i for i, count in enumerate(counts) if count < 0)
        raise ValueError(f"{name}[{image}]: negative count {counts[image]}")
    if sum(counts) != total:
        raise ValueError(f"{name}: counts sum to {sum(counts)}, but {total_name} has {total} rows")
    return counts


@functools.lru_cache(maxsize=64)
def canvas_limits(canvas: tuple[int, int], device: torch.device, stream: int | None) -> torch.Tensor:
    """(width, height) float32 on ``device`` (one copy per CUDA stream: see ``streams``),
    compared with (x1, y1) as torch compares them with Python ints: in float32."""
    return torch.tensor([canvas[1], canvas[0]], dtype=torch.float32, device=device)


def _margins(item: _Boxes, canvas: tuple[int, int]) -> torch.Tensor:
    """Every quantity a valid box keeps in (0, inf): width and height, and for boxes (not
    anchors) x2, y2, canvas width - x1, canvas height - y1, BOX_REACH - x2, BOX_REACH - y2,
    x1 + BOX_REACH and y1 + BOX_REACH (each with the exact sign in float32: 2**31 is a
    float32, and a difference of two float32 values rounds to 0 only where it is 0).

    A NaN or infinite coordinate makes its box's width or height NaN or infinite, so the
    range also catches those. A finite anchor whose width overflows float32 falls outside
    it too, and the host then finds the anchor valid (a box reaching that far is invalid).
    """
    low, high = item.boxes[:, :2], item.boxes[:, 2:]
    if item.counts is None:
        return high - low
    device = item.boxes.device
    canvas_margins = canvas_limits(canvas, device, stream_key(device)) - low
    return torch.cat([high - low, high, canvas_margins, BOX_REACH - high, low + BOX_REACH], dim=1)


# An input of up to this many boxes on the CPU is checked with Python floats: below ~100
# boxes that costs less than the few torch ops that check a tensor of boxes.
_HOST_CHECK_MAX_BOXES = 128

# ``host_check(boxes, low, width, height, reach)``: whether every box of a contiguous
# float32 CPU tensor is valid against ``_host_limits`` -- the rule of ``_invalid_on_host``,
# offered by a backend that checks faster than Python (the cpu backend's ``boxes_valid``).
HostCheck = Callable[[torch.Tensor, float, float, float, float], bool]


def _host_limits(item: _Boxes, canvas: tuple[int, int]) -> tuple[float, float, float, float]:
    """(low, width, height, reach): a valid box's x2 and y2 exceed low, its x1 stays below
    width and its y1 below height, and every coordinate within (-reach, reach)."""
    if item.counts is None:  # anchors may lie anywhere: limits no finite box reaches
        return -math.inf, math.inf, math.inf, math.inf
    # torch compares float32 coordinates with the canvas's Python ints in float32
    width, height = array.array("f", (canvas[1], canvas[0]))
    return 0.0, width, height, BOX_REACH


def _invalid_on_host(item: _Boxes, canvas: tuple[int, int], host_check: HostCheck | None) -> bool:
    """Whether some box of a CPU input is invalid, as ``_invalid_reasons`` decides.

    In float64 the difference of two float32 coordinates has the exact sign and never
    overflows, and ``0 < d < inf`` fails for a NaN: it holds exactly when both coordinates
    are finite and the box is not degenerate along that axis.
    """
    low, width, height, reach = _host_limits(item, canvas)
    if host_check is not None:
        return not host_check(item.boxes, low, width, height, reach)
    inf = math.inf
    for x1, y1, x2, y2 in item.boxes.tolist():
        if not (0 < x2 - x1 < inf and 0 < y2 - y1 < inf and x2 > low and y2 > low and x1 < width and y1 < height
                and -reach < x1 and -reach < y1 and x2 < reach and y2 < reach):  # fmt: skip
            return True
    return False


def _reads_back(items: list[_Boxes]) -> bool:
    """Whether ``_may_be_invalid`` reads some of ``items`` back from a device."""
    return any(not item.boxes.is_cpu and item.boxes.shape[0] for item in items)


def _may_be_invalid(items: list[_Boxes], canvas: tuple[int, int], host_check: HostCheck | None,
                    classes: torch.Tensor | None) -> bool:  # fmt: skip
    """Whether some box (or a device tensor of classes) may be invalid: CPU inputs are
    decided on the host (small ones in Python, any with ``host_check``), the others with the
    one read-back from the device in a call."""
    extremes: list[torch.Tensor] = []  # min and max of each input's margins
    if classes is not None and not classes.is_cpu and classes.numel():
        low, high = torch.aminmax(classes)  # in range: low + 1 > 0 and high <= _INT32_MAX
        extremes += [(low + 1).float(), torch.where(high > _INT32_MAX, math.inf, 0.0)]
    for item in items:
        count = item.boxes.shape[0]
        if count == 0:
            continue
        if item.boxes.is_cpu and (count <= _HOST_CHECK_MAX_BOXES or host_check is not None):
            if _invalid_on_host(item, canvas, host_check):
                return True
        else:
            extremes += torch.aminmax(_margins(item, canvas))
    if not extremes:
        return False
    values = torch.stack([value.float() for value in extremes]).tolist()
    # Each value compared on its own: a NaN (a box with a NaN coordinate) fails its
    # comparison, where Python's min() and max() skip a NaN that is not listed first.
    return not (all(low > 0 for low in values[::2]) and all(high < math.inf for high in values[1::2]))


# Unsigned integer types whose values int32 cannot hold (torch has few operations for them).
_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint32", "uint64") if hasattr(torch, name))


def _check_classes(classes: torch.Tensor, counts: list[int]) -> None:
    """``Targets.classes`` is int32: a class outside [0, 2^31) would wrap silently, and
    a negative one collides with the conventions for unmatched anchors. A bad one is named
    by image and box, as a bad box is (a data loader's error names the image's id after
    "image i")."""
    if classes.dtype is not torch.int32 and classes.dtype is not torch.int64:
        # Compared in int64: int8 and int16 comparisons wrap the bound 2^31 - 1 to -1, and
        # torch's aminmax has no kernel for uint16-64 (wider ones were checked as given).
        classes = classes.long()
    if classes.is_cpu and classes.numel() <= _HOST_CHECK_MAX_BOXES:
        listed = classes.tolist()
        if not listed or (min(listed) >= 0 and max(listed) <= _INT32_MAX):
            return
    elif classes.is_cpu:
        low, high = torch.aminmax(classes)
        if low >= 0 and high <= _INT32_MAX:
            return
    bad = torch.nonzero((classes < 0) | (classes > _INT32_MAX)).flatten().tolist()
    if bad:
        image, box = image_and_box(bad[0], counts)
        raise ValueError(f"gt_classes: image {image}, box {box}: class {int(classes[bad[0]])} is outside "
                         f"[0, {_INT32_MAX}]")  # fmt: skip


def image_and_box(row: int, counts: list[int]) -> tuple[int, int]:
    """The image of the row-th box of a batch of ``counts`` boxes per image, and its index there."""
    for image, count in enumerate(counts):
        if row < count:
            return image, row
        row -= count
    raise IndexError("row past the batch's boxes")


def _invalid_reasons(boxes: torch.Tensor, canvas: tuple[int, int] | None) -> list[tuple[int, str]]:
    """(row, reason) for every invalid box, in row order; ``canvas=None`` skips the canvas check."""
    x1, y1, x2, y2 = boxes.unbind(1)
    checks = [
        (~torch.isfinite(boxes).all(dim=1), "coordinates are not finite"),
        (~(x2 > x1), "degenerate box (x2 <= x1)"),
        (~(y2 > y1), "degenerate box (y2 <= y1)"),
    ]
    if canvas is not None:
        height, width = canvas
        outside = (x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height)
        checks.append((outside, f"wholly outside the {height}x{width} canvas"))
        far = (x1 <= -BOX_REACH) | (y1 <= -BOX_REACH) | (x2 >= BOX_REACH) | (y2 >= BOX_REACH)
        checks.append((far, f"reaches beyond ±{BOX_REACH:.0f} pixels"))
    reasons: dict[int, str] = {}
    for bad, reason in checks:
        for row in torch.nonzero(bad).flatten().tolist():
            reasons.setdefault(row, reason)
    return sorted(reasons.items())


def _examine(items: list[_Boxes], canvas: tuple[int, int], drop: bool) -> dict[str, _Dropped]:
    """Look at every box on the host, input by input: raise for the first invalid one or,
    with ``drop``, drop invalid boxes (an invalid anchor still raises).

    Returns what is left of each input that lost boxes, by name.
    """
    dropped = {}
    for item in items:
        boxes = item.boxes.cpu()
        if item.counts is None:
            # A degenerate anchor has no centre to encode against (log of a zero width) and
            # NaN coordinates order differently on GPU and CPU: refuse both.
            invalid = _invalid_reasons(boxes, None)
            if invalid:
                row, reason = invalid[0]
                raise ValueError(f"{item.name}: anchor {row}: {reason}: {boxes[row].tolist()}{_rounded(item)}")
        else:
            reasons = _invalid_reasons(boxes, canvas)
            if reasons:
                dropped[item.name] = _drop_or_raise(item, boxes, reasons, drop)
    return dropped


def _rounded(item: _Boxes) -> str:
    """What an error adds to the values it shows of boxes not given in float32."""
    return "" if item.given is torch.float32 else f" (given as {item.given}, checked rounded to float32)"


def _drop_or_raise(item: _Boxes, boxes: torch.Tensor, reasons: list[tuple[int, str]], drop: bool) -> _Dropped:
    counts = item.counts
    if not drop:
        row, reason = reasons[0]
        image, box = image_and_box(row, counts)
        more = f" ({len(reasons) - 1} more invalid boxes)" if len(reasons) > 1 else ""
        raise ValueError(
            f"{item.name}: image {image}, box {box}: {reason}: {boxes[row].tolist()}{_rounded(item)}{more}; "
            "pass drop_invalid=True to drop invalid boxes instead"
        )
    batch = len(counts)
    counts_t = torch.tensor(counts, dtype=torch.int64, device="cpu")
    offsets = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)])
    image_of_row = torch.repeat_interleave(torch.arange(batch, device="cpu"), counts_t)
    bad = torch.zeros(boxes.shape[0], dtype=torch.bool, device="cpu")
    bad[[row for row, _ in reasons]] = True
    within = torch.arange(boxes.shape[0], device="cpu") - offsets[image_of_row]
    keep = ~bad
    return _Dropped(
        counts=torch.bincount(image_of_row[keep], minlength=batch).tolist(),
        rows=torch.nonzero(keep).flatten(),
        kept=Kept(within[keep], [within[bad & (image_of_row == i)] for i in range(batch)]),
    )


def _sizes(name: str, value: object, batch: int, canvas: tuple[int, int]) -> list[int]:
    """Every image's (height, width) of a per-image size input, flattened, on the host;
    the canvas when omitted."""
    if value is None:
        return list(canvas) * batch
    if isinstance(value, (list, tuple)):
        try:
            sizes = torch.as_tensor(value, device="cpu")
        except (TypeError, ValueError, RuntimeError) as exc:  # ragged, strings, tensors inside
            raise TypeError(f"{name}: expected {batch} (height, width) pairs of ints, got {value!r} ({exc})") from None
    else:  # numpy's too: mmdet's img_shape / pad_shape often are
        sizes = _tensor(name, _from_numpy(name, value))
    if not integer_dtype(sizes.dtype):
        raise TypeError(f"{name}: expected integers (height, width), got {sizes.dtype}")
    if sizes.shape != (batch, 2):
        raise ValueError(f"{name}: expected shape [{batch}, 2] (height, width), got {list(sizes.shape)}")
    flat = []
    for i, (h, w) in enumerate(sizes.tolist()):
        if not (0 < h <= canvas[0] and 0 < w <= canvas[1]):
            raise ValueError(f"{name}[{i}]: ({h}, {w}) must be positive and fit the {canvas[0]}x{canvas[1]} canvas")
        flat += (h, w)
    return flat


def valid_cells(config: TargetConfig, grid: AnchorGrid, pad_sizes: list[int]) -> torch.Tensor | None:
    """Tensor[B, L, 2] int32: per image and level, the feature-map rows and columns whose
    cells lie inside the image's padded size, or None when every cell of every image does.

    mmdet's ``AnchorGenerator.valid_flags`` (fed with each image's ``pad_shape``):
    ``valid_h = min(ceil(pad_h / stride), feat_h)``, likewise along x, with the level's
    configured stride. A batch of images of different sizes shares one canvas; an
    image's anchors whose cell lies wholly in the canvas padding beyond its own padded
    size see no image at all there, and mmdet leaves them out of training.
    """
    rows = []
    full = True
    for height, width in zip(pad_sizes[::2], pad_sizes[1::2]):
        image = []
        for level, cells in zip(config.anchors.levels, grid.levels):
            stride = level.stride
            valid = (min(-(-height // stride), cells.height), min(-(-width // stride), cells.width))
            full &= valid == (cells.height, cells.width)
            image.append(valid)
        rows.append(image)
    if full:
        return None
    return torch.tensor(rows, dtype=torch.int32, device="cpu").reshape(len(rows), len(grid.levels), 2)


def build_problem(
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor | list[int],
    canvas: tuple[int, int],
    config: TargetConfig,
    *,
    gt_classes: torch.Tensor | None = None,
    ignore_boxes: torch.Tensor | None = None,
    ignore_counts: torch.Tensor | list[int] | None = None,
    image_sizes: torch.Tensor | list | None = None,
    pad_sizes: torch.Tensor | list | None = None,
    anchors: torch.Tensor | None = None,
    drop_invalid: bool = False,
    want_max_iou: bool = False,
    host_check: HostCheck | None = None,
    check_gt_boxes: bool = True,
) -> tuple[Problem, Kept]:
    """Check a batch and build its ``Problem`` (see ``tritarget.kernels.assign``).

    ``host_check`` checks CPU boxes by the same rule as Python would, faster (``assign``
    passes the cpu backend's compiled one when that backend will solve the problem).
    ``check_gt_boxes=False`` leaves the values of the gt boxes, and of gt classes and
    ignore boxes given on a device, to the backend (see the module docstring); every
    other input is checked as always.
    """
    if not isinstance(config, TargetConfig):
        hint = f"; a preset's config is presets.get({config!r})" if isinstance(config, str) else ""
        raise TypeError(f"config: expected TargetConfig, got {type(config).__name__}{hint}")
    canvas = check_canvas(canvas)
    boxes, boxes_given = _boxes("gt_boxes", gt_boxes, None)
    device = boxes.device
    counts = checked_counts("gt_counts", gt_counts, boxes.shape[0], "gt_boxes", None)
    batch = len(counts)

    # Box values are checked after every argument, where the boxes live, with one read-back
    # (``_may_be_invalid``). Each input's boxes used to be checked right after the input, so
    # an invalid box still wins over a bad argument that follows it: ``checked`` holds the
    # inputs before the argument being checked, for ``_examine`` to look at; ``examined`` those
    # of them whose values this call checks (not the gt boxes when the backend checks them).
    checked: list[_Boxes] = []
    examined: list[_Boxes] = []
    if anchors is None:
        grid, anchor_boxes = grid_and_anchors(config.anchors, canvas, device)
    else:
        anchor_boxes, anchors_given = _boxes("anchors", anchors, device)
        grid = None
        checked.append(_Boxes("anchors", anchor_boxes, None, anchors_given))
        examined.append(checked[-1])
    try:
        classes = host_classes = None  # the classes as given, where given on the host: checked there
        left_ignore = False  # crowd regions left to the backend with the gt boxes
        if gt_classes is not None:
            classes = _tensor("gt_classes", gt_classes)
            dtype = classes.dtype
            if dtype is not torch.int32 and not integer_dtype(dtype):
                raise TypeError(f"gt_classes: expected an integer tensor, got {dtype}")
            if classes.shape != (boxes.shape[0],):
                raise ValueError(
                    f"gt_classes: expected shape [{boxes.shape[0]}] (one per box), got {list(classes.shape)}"
                )
            if dtype in _WIDE_UNSIGNED:  # checked as given: int32 would wrap them first
                too_big = next((i for i, c in enumerate(classes.tolist()) if c > _INT32_MAX), None)
                if too_big is not None:
                    image, box = image_and_box(too_big, counts)
                    raise ValueError(f"gt_classes: image {image}, box {box}: class {classes.tolist()[too_big]} is "
                                     f"outside [0, {_INT32_MAX}]")  # fmt: skip
            if dtype is not torch.int32 and dtype is not torch.int64:
                dtype = torch.int32
            host_classes = classes if classes.is_cpu else None
            if classes.dtype is not dtype or classes.device != device or not classes.is_contiguous():
                classes = classes.to(device=device, dtype=dtype).contiguous()
            if host_classes is None and classes.is_cpu:  # given on a device, moved to the boxes' host
                host_classes = classes
        checked.append(_Boxes("gt_boxes", boxes, counts, boxes_given))
        if check_gt_boxes:
            examined.append(checked[-1])

        if (ignore_boxes is None) != (ignore_counts is None):
            raise ValueError("ignore_boxes and ignore_counts must be given together")
        if ignore_boxes is None:
            ignore, ign_counts = _no_boxes(device), None
        else:
            ignore, ignore_given = _boxes("ignore_boxes", ignore_boxes, device)
            ign_counts = checked_counts("ignore_counts", ignore_counts, ignore.shape[0], "ignore_boxes", batch)
            checked.append(_Boxes("ignore_boxes", ignore, ign_counts, ignore_given))
            # Crowd regions on a device go with the gt boxes to the backend (its kernels
            # flag them too), unless explicit anchors are read back from the device here.
            on_device = not ignore.is_cpu and ignore.shape[0] > 0
            left_ignore = on_device and not check_gt_boxes and not _reads_back(examined)
            if not left_ignore:
                examined.append(checked[-1])
        sizes = _sizes("image_sizes", image_sizes, batch, canvas)
        cells = None
        if pad_sizes is not None:
            if grid is None:
                raise ValueError(
                    "pad_sizes: needs the config's generated anchors (it excludes anchors by their feature-map "
                    "cell); explicit anchors have no cells"
                )
            padded = _sizes("pad_sizes", pad_sizes, batch, canvas)
            for i in range(batch if image_sizes is not None else 0):
                if sizes[2 * i] > padded[2 * i] or sizes[2 * i + 1] > padded[2 * i + 1]:
                    raise ValueError(
                        f"pad_sizes[{i}]: ({padded[2 * i]}, {padded[2 * i + 1]}) is smaller than image_sizes[{i}] "
                        f"({sizes[2 * i]}, {sizes[2 * i + 1]}); an image is padded to at least its own size"
                    )
            cells = valid_cells(config, grid, padded)
    except (TypeError, ValueError):
        _examine(checked, canvas, drop_invalid)
        raise

    dropped = {}
    # Classes on the host (the service's, a loader's) are checked there, before they went to
    # the device: not one more read-back. Classes on a device are checked in the read-back
    # of the inputs examined here, or, where none of those is read back from the device,
    # left with the gt boxes to the backend, which reads them back with its flag after its
    # launches.
    device_classes = classes if classes is not None and host_classes is None else None
    left_classes = device_classes is not None and not check_gt_boxes and not _reads_back(examined)
    if left_classes:
        device_classes = None
    may_be_invalid = (examined or device_classes is not None) and _may_be_invalid(
        examined, canvas, host_check, device_classes
    )
    if may_be_invalid:
        dropped = _examine(checked, canvas, drop_invalid)
    if classes is not None and (may_be_invalid or host_classes is not None):
        try:
            _check_classes(classes if host_classes is None else host_classes, counts)
        except ValueError:
            if not may_be_invalid:  # boxes left to the backend: an invalid one still wins, on every backend
                _examine(checked, canvas, drop_invalid)
            raise
    kept = Kept(None, nothing_dropped(batch))
    if "gt_boxes" in dropped:
        gt_dropped = dropped["gt_boxes"]
        counts, kept = gt_dropped.counts, gt_dropped.kept
        rows = gt_dropped.rows.to(device)
        boxes = boxes[rows]
        if classes is not None:
            classes = classes[rows]
    kept.dropped_ignore = nothing_dropped(batch)
    if "ignore_boxes" in dropped:
        ign_counts = dropped["ignore_boxes"].counts
        ignore = ignore[dropped["ignore_boxes"].rows.to(device)]
        kept.dropped_ignore = dropped["ignore_boxes"].kept.dropped

    problem = Problem(
        config=config,
        canvas=canvas,
        grid=grid,
        anchors=anchor_boxes,
        gt_boxes=boxes,
        gt_classes=classes,
        ignore_boxes=ignore,
        host_ints=HostInts(counts, ign_counts, sizes),
        want_max_iou=want_max_iou,
        valid_cells=cells,
        gt_boxes_checked=check_gt_boxes,
        gt_classes_checked=not left_classes or bool(may_be_invalid),
        ignore_boxes_checked=not left_ignore or bool(may_be_invalid),
    )
    return problem, kept
