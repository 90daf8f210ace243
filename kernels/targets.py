"""The result of an assignment, dense (per anchor) and sparse (positives + ignored).

Dense ``Targets`` hold one row per (image, anchor). ``SparseTargets`` keep only what
is not negative: positive anchors with their matched box, deltas and class, and
ignored anchors; every other anchor is negative. For a RetinaNet batch this is
~100x smaller, which is what the service sends by default.

``Targets.from_sparse(t.to_sparse())`` gives ``t`` back exactly, except two things a
sparse form cannot hold: ``max_iou`` (diagnostic, dense only) and, in the
``detectron2`` low-quality mode, the argmax box of non-positive anchors (it comes
back as -1).
"""

from __future__ import annotations

import math
import mmap
import operator
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .host_memory import check_host_fits

__all__ = ["POSITIVE", "NEGATIVE", "IGNORED", "Targets", "SparseTargets"]

POSITIVE = 1
NEGATIVE = 0
IGNORED = -1


def check_strided(name: str, value: torch.Tensor) -> None:
    """Refuse a sparse, mkldnn or nested tensor by name (torch's own errors, or numpy's
    when read on the host, named neither the field nor the fix)."""
    if value.is_nested or value.layout != torch.strided:
        layout = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a {layout} one (.to_dense() it)")


_NO_INDICES = torch.empty(0, dtype=torch.int64, device="cpu")  # never handed out: new tensors are made from it


def nothing_dropped(batch: int) -> list[torch.Tensor]:
    """``dropped`` of ``batch`` images that lost no box, in-process and in decoded responses:
    an empty int64 tensor each, the caller's own. One shared tensor, resized and filled
    through one result (``resize_``, ``set_``), showed in every later one. ``new_empty``
    makes each in ~0.65 us against ``torch.empty``'s ~0.83 (both lists of a 32-image
    call: 42 against 53 us of host time, on every backend)."""
    return [_NO_INDICES.new_empty(0) for _ in range(batch)]


_INT32_MAX = 2**31 - 1  # matched box indices and classes are int32 in dense targets


def check_dense_fits(batch: int, num_anchors: int, classes: bool, max_iou: bool, advice: str) -> None:
    """``MemoryError`` where dense targets of ``batch`` images x ``num_anchors`` anchors
    (with ``classes``, ``max_iou``) would not fit in the host's memory (``host_memory``)."""
    check_host_fits(
        batch * num_anchors * Targets.bytes_per_anchor(classes, max_iou),
        f"dense targets: {batch:,} images x {num_anchors:,} anchors",
        advice,
    )


def _pinned(value):
    return value.pin_memory() if isinstance(value, torch.Tensor) else value


def _device(device: object) -> torch.device:
    """A device for ``to``: a dtype would turn int8 labels into floats."""
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"device: expected a torch.device or its name (targets keep their dtypes), got {device!r}")
    return torch.device(device)


@dataclass(eq=False)  # tensors have no single truth value: equal only to itself
class SparseTargets:
    """Per-image CSR lists of positive and ignored anchors.

    positive_offsets (Tensor[B + 1] int64): image i's positives are rows
        ``positive_offsets[i]:positive_offsets[i + 1]`` of the positive_* tensors.
    positive_anchors (Tensor[P] int32): anchor index of each positive, ascending per image.
    positive_matched_gt (Tensor[P] int32): matched box within the image.
    positive_deltas (Tensor[P, 4] float32 or float16).
    positive_classes (Tensor[P] int32 or None).
    ignored_offsets (Tensor[B + 1] int64), ignored_anchors (Tensor[I] int32): likewise.
    dropped (list of B Tensor[D_i] int64): boxes dropped from each image (drop_invalid).
    level_starts (tuple of L + 1 ints or None): first anchor of each pyramid level, then A
        (set by ``assign_sparse`` for generated anchors; see ``Targets.levels``).
    dropped_ignore (list of B Tensor[E_i] int64): ignore regions dropped from each image,
        likewise (``Targets.dropped_ignore``).
    """

    num_anchors: int
    positive_offsets: torch.Tensor
    positive_anchors: torch.Tensor
    positive_matched_gt: torch.Tensor
    positive_deltas: torch.Tensor
    ignored_offsets: torch.Tensor
    ignored_anchors: torch.Tensor
    positive_classes: torch.Tensor | None = None
    background_class: int = 0
    dropped: list[torch.Tensor] = field(default_factory=list)
    level_starts: tuple[int, ...] | None = None
    dropped_ignore: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.positive_offsets.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTargets:
        """The lists on ``device`` (a few small copies; the dense form is never built)."""
        device = _device(device)
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return SparseTargets(**moved)

    def pin_memory(self) -> SparseTargets:
        """The lists in pinned host memory, for ``non_blocking`` copies to a GPU (what
        ``DataLoader(pin_memory=True)`` calls; without it the lists came back unpinned)."""
        return SparseTargets(**{f.name: _pinned(getattr(self, f.name)) for f in fields(self)})

    def to_dense(self, device: torch.device | str | None = None) -> Targets:
        """The dense ``Targets``, built on ``device`` (default: where the lists are), e.g.
        on the trainer's GPU from lists that came over the wire: only the lists travel.
        The lists are checked first (``check``), where they are."""
        self.check()
        return Targets.from_sparse(self if device is None else self.to(device), check=False)

    def check(self) -> None:
        """Raise ``ValueError``, naming the field, where these lists break their contract
        (the class docstring), instead of densifying into wrong targets: a positive counted
        in another image, an index wrapped around, one matched box given to every
        positive, an anchor both positive and ignored. Reads the lists on the host (a
        small copy from a GPU)."""
        self.check_shapes()
        count = self.num_anchors
        host = lambda t: t.detach().cpu().numpy()  # noqa: E731
        rows = {}
        for which in ("positive", "ignored"):
            offsets, anchors = host(getattr(self, f"{which}_offsets")), host(getattr(self, f"{which}_anchors"))
            problem = csr_problem(which, offsets.tolist(), anchors, count)
            if problem is not None:
                raise ValueError(problem)
            rows[which] = csr_rows(offsets, anchors, count)
        # Densified as int32 (a wider value would wrap around to another box or class).
        for name, what in (("positive_matched_gt", "matches box"), ("positive_classes", "has class")):
            values = None if getattr(self, name) is None else host(getattr(self, name))
            if values is not None and values.size and (values.min() < 0 or values.max() > _INT32_MAX):
                bad = values.min() if values.min() < 0 else values.max()
                raise ValueError(f"{name}: a positive {what} {bad} (expected 0 to {_INT32_MAX})")
        problem = overlap_problem(rows["positive"], rows["ignored"], count, "ignored")
        if problem is not None:
            raise ValueError(problem)

    def check_shapes(self) -> None:
        """The part of ``check`` that reads no list (no copy, no wait for a GPU): dtypes,
        one offset per image plus one, one matched box / delta / class per positive, the
        level starts. The losses run it on every call; ``check`` the rest where lists were
        made or edited by hand."""
        if not (isinstance(self.num_anchors, int) and not isinstance(self.num_anchors, bool) and self.num_anchors >= 0):
            raise ValueError(f"num_anchors: expected an int >= 0, got {self.num_anchors!r}")
        if isinstance(self.background_class, bool) or not isinstance(self.background_class, int):
            raise TypeError(f"background_class: expected an int, got {self.background_class!r}")
        if not 0 <= self.background_class <= _INT32_MAX:  # as TargetConfig's
            raise ValueError(f"background_class: {self.background_class}, expected 0 to {_INT32_MAX}")
        for name in ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas",
                     "ignored_offsets", "ignored_anchors", "positive_classes"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) and not (value is None and name == "positive_classes"):
                raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
            if value is not None:
                check_strided(name, value)
        if not self.positive_deltas.is_floating_point():
            raise TypeError(f"positive_deltas: expected floats, got {self.positive_deltas.dtype}")
        count, batch = self.num_anchors, self.batch_size
        for name in ("positive_offsets", "ignored_offsets", "positive_anchors", "ignored_anchors",
                     "positive_matched_gt", "positive_classes"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (value.dtype == torch.bool or value.is_floating_point() or value.is_complex()):
                raise TypeError(f"{name}: expected integers, got {value.dtype}")
        for name in ("positive_offsets", "ignored_offsets"):
            dtype = getattr(self, name).dtype
            if dtype is not torch.int64 and dtype is not torch.int32:  # torch's repeat_interleave takes no other
                raise TypeError(f"{name}: expected int64 (or int32) offsets, got {dtype}")
        if self.positive_offsets.dim() != 1 or batch < 0:  # the batch size is read from it
            raise ValueError(f"positive_offsets: shape {list(self.positive_offsets.shape)}, expected [batch_size + 1] "
                             "(at least the one offset of an empty batch)")  # fmt: skip
        for name in ("positive_offsets", "ignored_offsets"):
            offsets = getattr(self, name)
            if offsets.dim() != 1 or offsets.numel() != batch + 1:
                raise ValueError(f"{name}: shape {list(offsets.shape)}, expected [batch_size + 1] = [{batch + 1}]")
        positives = self.positive_anchors.shape[:1]
        for name, shape in (("positive_anchors", positives), ("ignored_anchors", self.ignored_anchors.shape[:1]),
                            ("positive_matched_gt", positives), ("positive_deltas", (*positives, 4)),
                            ("positive_classes", positives)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {list(value.shape)}, expected {list(shape)} (one per anchor listed)")
        for name in ("dropped", "dropped_ignore"):  # to_dense copies them: an int failed there, unnamed
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
                raise TypeError(f"{name}: expected a list of tensors (one per image, or none), got {value!r}")
        starts = self.level_starts
        ends_ok = bool(starts) and starts[0] == 0 and starts[-1] == count
        # Integers: levels() slices by them (10.5 failed there).
        integers = starts is not None and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                              for s in starts)  # fmt: skip
        if starts is not None and not (integers and ends_ok and list(starts) == sorted(starts)):
            raise ValueError(f"level_starts: {starts}, expected ascending integers from 0 to num_anchors ({count})")


@dataclass(eq=False)  # tensors have no single truth value: equal only to itself
class Targets:
    """Dense targets of a batch of B images over A anchors.

    labels (Tensor[B, A] int8): 1 positive, 0 negative, -1 ignored.
    matched_gt (Tensor[B, A] int32): index of the matched box within its image (as
        given, before any dropping), -1 where none.
    deltas (Tensor[B, A, 4] float32): (dx, dy, dw, dh), zeros where not positive.
    classes (Tensor[B, A] int32 or None): class of the matched box for positives,
        ``background_class`` elsewhere; present when classes were given.
    max_iou (Tensor[B, A] float32 or None): each anchor's best IoU with its image's
        boxes (0 for an image without boxes), when asked for.
    dropped (list of B Tensor[D_i] int64): indices of invalid boxes dropped from
        each image (``drop_invalid=True``); empty otherwise.
    level_starts (tuple of L + 1 ints or None): first anchor of each pyramid level, then
        A; set by ``assign`` for generated anchors (None for explicit anchors).
    dropped_ignore (list of B Tensor[E_i] int64): indices of invalid ignore regions
        dropped from each image (``drop_invalid=True``; they would have ignored nothing,
        or only anchors outside the canvas); empty otherwise.
    """

    labels: torch.Tensor
    matched_gt: torch.Tensor
    deltas: torch.Tensor
    classes: torch.Tensor | None = None
    max_iou: torch.Tensor | None = None
    dropped: list[torch.Tensor] = field(default_factory=list)
    background_class: int = 0
    level_starts: tuple[int, ...] | None = None
    dropped_ignore: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def bytes_per_anchor(classes: bool, max_iou: bool) -> int:
        """Bytes per image and anchor of dense targets with (or without) classes and max_iou."""
        return 1 + 4 + 16 + 4 * classes + 4 * max_iou

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.labels.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        """These targets on ``device``; ``dropped`` stays where it is (host bookkeeping)."""
        device = _device(device)
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Targets(
            move(self.labels), move(self.matched_gt), move(self.deltas), move(self.classes),
            move(self.max_iou), list(self.dropped), self.background_class, self.level_starts,
            list(self.dropped_ignore),
        )  # fmt: skip

    def pin_memory(self) -> Targets:
        """These targets in pinned host memory (``DataLoader(pin_memory=True)`` calls it)."""
        return Targets(**{f.name: _pinned(getattr(self, f.name)) for f in fields(self)})

    def levels(self) -> list[Targets]:
        """One ``Targets`` per pyramid level, views of these (no copy): level k holds anchors
        ``level_starts[k]:level_starts[k + 1]``, as a head's level-k outputs flattened
        (cells row-major, then shapes) line up with them. ``level_slices(config.anchors,
        canvas)`` gives the same split as slices.
        """
        if self.level_starts is None:
            raise ValueError(
                "these targets carry no pyramid levels (explicit anchors, or built by hand): "
                "use tritarget.kernels.level_slices(config.anchors, canvas)"
            )
        starts = self.level_starts
        cut = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
        return [
            Targets(
                self.labels[:, a:b],
                self.matched_gt[:, a:b],
                self.deltas[:, a:b],
                cut(self.classes, a, b),
                cut(self.max_iou, a, b),
                list(self.dropped),
                self.background_class,
                (0, b - a),
                list(self.dropped_ignore),
            )  # fmt: skip
            for a, b in zip(starts, starts[1:])
        ]

    def summary(self) -> list[dict[str, int]]:
        """Counts of positive / negative / ignored anchors per image."""
        return [
            {
                "positive": int((row == POSITIVE).sum()),
                "negative": int((row == NEGATIVE).sum()),
                "ignored": int((row == IGNORED).sum()),
            }
            for row in self.labels
        ]

    def to_sparse(self) -> SparseTargets:
        """The sparse form (see the module docstring for what it cannot carry)."""
        positive_offsets, positive_anchors = _listed(self.labels, POSITIVE)
        ignored_offsets, ignored_anchors = _listed(self.labels, IGNORED)
        pos_image, pos_anchor = _rows(positive_offsets), positive_anchors.long()
        return SparseTargets(
            num_anchors=self.num_anchors,
            positive_offsets=positive_offsets,
            positive_anchors=positive_anchors,
            positive_matched_gt=self.matched_gt[pos_image, pos_anchor],
            positive_deltas=self.deltas[pos_image, pos_anchor],
            ignored_offsets=ignored_offsets,
            ignored_anchors=ignored_anchors,
            positive_classes=None if self.classes is None else self.classes[pos_image, pos_anchor],
            background_class=self.background_class,
            dropped=list(self.dropped),
            level_starts=self.level_starts,
            dropped_ignore=list(self.dropped_ignore),
        )

    @classmethod
    def from_sparse(cls, sparse: SparseTargets, *, check: bool = True) -> Targets:
        """Densify: everything not listed is negative with matched_gt -1 and zero deltas.
        ``check``: ``sparse.check()`` first (False for lists this package just made)."""
        if check:
            sparse.check()
        batch, count = sparse.batch_size, sparse.num_anchors
        device = sparse.positive_anchors.device
        if device.type == "cpu":
            check_dense_fits(batch, count, sparse.positive_classes is not None, False,
                             "keep the sparse form, or densify fewer images at a time")  # fmt: skip
        pos_image = _rows(sparse.positive_offsets)
        ign_image = _rows(sparse.ignored_offsets)
        pos_anchor = sparse.positive_anchors.long()
        labels = filled((batch, count), NEGATIVE, torch.int8, device)
        labels[ign_image, sparse.ignored_anchors.long()] = IGNORED
        labels[pos_image, pos_anchor] = POSITIVE
        matched = filled((batch, count), -1, torch.int32, device)
        matched[pos_image, pos_anchor] = sparse.positive_matched_gt.to(torch.int32)
        deltas = filled((batch, count, 4), 0, torch.float32, device)
        deltas[pos_image, pos_anchor] = sparse.positive_deltas.to(torch.float32)
        classes = None
        if sparse.positive_classes is not None:
            classes = filled((batch, count), sparse.background_class, torch.int32, device)
            classes[pos_image, pos_anchor] = sparse.positive_classes.to(torch.int32)
        return cls(
            labels, matched, deltas, classes, dropped=list(sparse.dropped), background_class=sparse.background_class,
            level_starts=sparse.level_starts, dropped_ignore=list(sparse.dropped_ignore),
        )  # fmt: skip


# Zero-filled host outputs from this size up come from an anonymous mapping.
_LAZY_ZEROS_BYTES = 1 << 20
_NUMPY_DTYPES = {
    dtype: torch.empty(0, dtype=dtype, device="cpu").numpy().dtype for dtype in (torch.int8, torch.int32, torch.float32)
}


def filled(shape: tuple[int, ...], value: int | float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.full(shape, value, dtype=dtype, device=device)``, built on the calling thread
    on the host, where dense targets are made from sparse ones (``from_sparse``, the client).

    A torch fill of a large host tensor is an OpenMP region: where the process's other cores
    are busy (a trainer beside its DataLoader workers) it waits a scheduler quantum for its
    threads (201,600 int32s: 3.3 ms, against 0.16 ms for numpy's fill, with one of 2 cores
    busy). Zero-filled outputs of a megabyte or more come from an anonymous mapping: the
    kernel hands out zero pages on first touch, so the mostly-zero deltas of one image cost
    what is written into them, not a 3.2 MB memset.
    """
    if torch.device(device).type != "cpu":
        return torch.full(shape, value, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    if value == 0 and size >= _LAZY_ZEROS_BYTES:
        return torch.frombuffer(_anonymous(size), dtype=dtype).reshape(shape)
    return torch.from_numpy(np.full(shape, value, dtype=_NUMPY_DTYPES[dtype]))


def _anonymous(size: int) -> mmap.mmap:
    """Zero pages on first touch. Private where the platform says so: mmap's default shared
    anonymous mapping is shmem on Linux, whose page faults and unmapping cost more."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)


# Targets saved with ``torch.save`` (precomputed targets cached on disk) load with
# ``torch.load``'s default ``weights_only=True``: they hold only tensors, ints and lists,
# and unpickling them runs no code of ours.
torch.serialization.add_safe_globals([SparseTargets, Targets])


def _listed(labels: torch.Tensor, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [B + 1] int64, anchors int32): where ``labels`` [B, A] equal ``label``,
    image by image in anchor order. On the host in numpy, on the calling thread: its nonzero
    is ~6x torch's (a sampled RPN image lists ~270,000 ignored anchors: 0.5 against 3.8 ms),
    and torch's comparison of a whole batch is an OpenMP region (see ``filled``)."""
    if labels.is_cpu:
        rows = [np.flatnonzero(row == label) for row in labels.numpy()]
        offsets = np.cumsum([0, *map(len, rows)])
        anchors = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
        return torch.from_numpy(offsets.astype(np.int64)), torch.from_numpy(anchors)
    image, anchor = torch.nonzero(labels == label, as_tuple=True)
    counts = torch.bincount(image, minlength=labels.shape[0])
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), anchor.to(torch.int32)


def offsets_problem(which: str, ends: list[int], size: int) -> str | None:
    """What breaks the ``which`` CSR offsets' contract (start at 0, never decrease, end at
    ``size``, the list's length), or None."""
    if ends[0] != 0 or ends[-1] != size or any(map(operator.gt, ends, ends[1:])):
        return f"{which}_offsets: must start at 0, never decrease and end at {size} (the {which} anchors); got {ends}"
    return None


def csr_problem(which: str, ends: list[int], anchors: np.ndarray, count: int) -> str | None:
    """What breaks the contract of the ``which`` CSR list (its offsets, ``ends``, start at 0,
    never decrease and end at its length; its anchors are in [0, count) and ascend within
    each image), or None. A few array operations whatever the list's length: the client
    checks thousands of responses a second."""
    size = anchors.shape[0]
    problem = offsets_problem(which, ends, size)
    if problem is not None or not size:
        return problem
    # An anchor may be at most its predecessor only where an image starts. In [0, A): as
    # unsigned, a negative anchor is out of range too (it would land in another image's
    # row), where the count fits the signed type; past it (int16 lists of 201,600 anchors)
    # a negative one wraps below the count, and the minimum is checked too.
    descents = (anchors[1:] <= anchors[:-1]).nonzero()[0].tolist()
    starts = set(ends[1:-1])
    wraps_out = anchors.dtype.kind == "u" or count <= np.iinfo(anchors.dtype).max + 1
    in_range = anchors.view(_UNSIGNED[anchors.itemsize]).max() < count and (wraps_out or anchors.min() >= 0)
    if in_range and all(i + 1 in starts for i in descents):
        return None
    image = np.repeat(np.arange(len(ends) - 1), np.diff(ends))
    outside = np.flatnonzero((anchors < 0) | (anchors >= count))
    if outside.size:
        i = outside[0]
        return f"{which}_anchors: image {image[i]} lists anchor {anchors[i]}, outside [0, num_anchors={count})"
    i = np.flatnonzero((np.diff(anchors) <= 0) & (image[1:] == image[:-1]))[0] + 1
    return f"{which}_anchors: image {image[i]} lists anchor {anchors[i]} after {anchors[i - 1]} (must ascend)"


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def csr_rows(offsets: np.ndarray, anchors: np.ndarray, count: int) -> np.ndarray:
    """Row (int64) of each entry of a checked CSR list in the flattened [B * A] targets: ascending."""
    if offsets.shape[0] == 2:  # one image: its anchors
        return anchors.astype(np.int64)
    return np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets)) * count + anchors


def overlap_problem(positive_rows: np.ndarray, listed_rows: np.ndarray, count: int, listed: str) -> str | None:
    """An anchor both positive and in the other (``listed``) list, or None: a binary search
    of each positive's row among the other's ascending rows."""
    if not (positive_rows.size and listed_rows.size):
        return None
    at = np.minimum(np.searchsorted(listed_rows, positive_rows), listed_rows.size - 1)
    both = np.flatnonzero(listed_rows[at] == positive_rows)
    if not both.size:
        return None
    image, anchor = divmod(int(positive_rows[both[0]]), count)
    return f"positive_anchors: image {image} lists anchor {anchor} as positive and as {listed}"


def _rows(offsets: torch.Tensor) -> torch.Tensor:
    """Image index of every row of a CSR list."""
    counts = offsets.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
