"""``check``: what the real matcher does with a config's anchors over a whole dataset.

The scan runs ``assign_sparse`` (the sparse-first path: only positives and ignored
anchors come back) on batches of images that share a canvas, once with the config's
own rules and once without its low-quality rule, and counts per box:

* positives with the config's rules and without the low-quality rule. "BPR" (best
  possible recall) is the fraction of boxes with at least one positive; without the
  low-quality rule it says which boxes earn a positive on IoU >= ``match.high`` alone,
  the number that tells whether anchors fit the data (with the torchvision rule every
  box with a non-zero IoU gets its best anchor, fit or not);
* positives per pyramid level, and positives per anchor shape (which shapes are dead);
* the IoU of the box's best anchor over all anchors of the canvas (geometry only:
  ignore and border rules do not apply), found from the grid without a [G, A] matrix
  (see ``best_anchor_iou``).

Balanced sampling (RPN presets) is switched off for the scan: it draws among the
positives at random, and the question here is what the matcher gives it to draw from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tritarget.kernels import TargetConfig, assign_sparse, generate_anchors, resolve_grid

from .dataset import BoxDataset, ragged_rows, require_integer

__all__ = [
    "SIZE_NAMES",
    "CheckResult",
    "MatchCounts",
    "best_anchor_iou",
    "check",
    "count_positives",
    "format_check_table",
    "format_missing",
    "scan_config",
    "strict_config",
]

# COCO's size classes, by box area in the model's pixels: below 32², below 96², above.
SIZE_NAMES = ("small", "medium", "large")
_SIZE_EDGES = (32.0**2, 96.0**2)

# Histogram bins of positives per box: 0, 1, 2-3, 4-7, 8-15, 16+.
_POSITIVE_EDGES = (0, 1, 2, 4, 8, 16)

ProgressFn = Callable[[int, int], None]


def scan_config(config: TargetConfig) -> TargetConfig:
    """The config as the scan runs it: balanced sampling off (see the module docstring)."""
    return config if config.match.sample_size == 0 else config.replace(**{"match.sample_size": 0})


def strict_config(config: TargetConfig) -> TargetConfig:
    """The config without its low-quality rule: positives on IoU >= ``match.high`` only."""
    config = scan_config(config)
    return config if config.match.low_quality == "none" else config.replace(**{"match.low_quality": "none"})


@dataclass
class MatchCounts:
    """Positives of every box of a dataset under one config (N boxes, L levels, S shapes).

    positives (Tensor[N] int64): positive anchors matched to each box.
    by_level (Tensor[N, L] int64): the same, split by the level of the anchor.
    by_shape (Tensor[S] int64): positives of each anchor shape, levels in order, shapes in
        the config's order within a level (all images together).
    ignored_anchors, total_anchors: ignored anchors and anchors, summed over images.
    """

    positives: torch.Tensor
    by_level: torch.Tensor
    by_shape: torch.Tensor
    ignored_anchors: int
    total_anchors: int


@dataclass
class CheckResult:
    """Everything ``check`` measured, per box where it can (N boxes of the dataset).

    box_image_ids (Tensor[N] int64), annotation_ids (Tensor[N] int64, -1 when unknown),
    boxes (Tensor[N, 4] float32, model pixels), areas (Tensor[N] float32).
    matched: positives with the config's rules; strict: without its low-quality rule.
    best_iou (Tensor[N] float32): IoU of each box's best anchor; best_level (Tensor[N]
    int64): the level of that anchor.
    anchors_per_cell: shapes per level (to split ``matched.by_shape``).
    seconds: wall time of the scan (both rules, best IoU and counting).
    """

    name: str
    config: TargetConfig
    num_images: int
    num_ignore_boxes: int
    box_image_ids: torch.Tensor
    annotation_ids: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    matched: MatchCounts
    strict: MatchCounts
    best_iou: torch.Tensor
    best_level: torch.Tensor
    anchors_per_cell: tuple[int, ...]
    seconds: float

    @property
    def num_boxes(self) -> int:
        return self.boxes.shape[0]

    @property
    def bpr(self) -> float | None:
        """Boxes with a positive on the high threshold alone (IoU >= high, > with
        ``strict_high``; no low-quality rule), as a fraction (``None`` without boxes)."""
        return _fraction(self.strict.positives > 0)

    @property
    def bpr_low_quality(self) -> float | None:
        """Boxes with a positive under the config's own rules, as a fraction (``None`` without boxes)."""
        return _fraction(self.matched.positives > 0)

    @property
    def size_class(self) -> torch.Tensor:
        """Tensor[N] int64: 0 small, 1 medium, 2 large (``SIZE_NAMES``)."""
        return torch.bucketize(self.areas, torch.tensor(_SIZE_EDGES), right=True)

    @property
    def missing(self) -> torch.Tensor:
        """Tensor[K] int64: rows of the boxes without any positive under the config's rules."""
        return torch.nonzero(self.matched.positives == 0).flatten()

    @property
    def missing_strict(self) -> torch.Tensor:
        """Tensor[K] int64: rows of the boxes without a positive on the high threshold alone."""
        return torch.nonzero(self.strict.positives == 0).flatten()

    def shapes_ever_positive(self) -> list[tuple[int, int]]:
        """Per level: (shapes with at least one positive, shapes) under the config's rules."""
        out, start = [], 0
        for count in self.anchors_per_cell:
            used = int((self.matched.by_shape[start : start + count] > 0).sum())
            out.append((used, count))
            start += count
        return out

    def positive_histogram(self) -> list[tuple[str, int]]:
        """Boxes per bin of positives per box under the config's rules: [(label, boxes)] for
        0, 1, 2-3, 4-7, 8-15, 16+."""
        bins = torch.bucketize(self.matched.positives, torch.tensor(_POSITIVE_EDGES[1:]), right=True)
        totals = torch.bincount(bins, minlength=len(_POSITIVE_EDGES)).tolist()
        return list(zip(_bin_labels(), totals))

    def summary(self) -> dict:
        """The table's numbers as a JSON-compatible dict; ``None`` where there is no value
        (a share or a mean over no boxes), which JSON writes as null."""
        sizes = self.size_class
        by_size = {}
        for k, size in enumerate(SIZE_NAMES):
            rows = sizes == k
            by_size[size] = {
                "boxes": int(rows.sum()),
                "bpr": _fraction(self.strict.positives[rows] > 0),
                "bpr_low_quality": _fraction(self.matched.positives[rows] > 0),
                "mean_positives": _mean(self.matched.positives[rows]),
            }
        level_totals = self.matched.by_level.sum(0)
        iou, high = self.best_iou, self.config.match.high
        return {
            "name": self.name,
            "images": self.num_images,
            "boxes": self.num_boxes,
            "ignore_boxes": self.num_ignore_boxes,
            "anchors_per_image": self.matched.total_anchors / max(self.num_images, 1),
            "high": self.config.match.high,
            "strict_high": self.config.match.strict_high,
            "low_quality": self.config.match.low_quality,
            "bpr": self.bpr,
            "bpr_low_quality": self.bpr_low_quality,
            "mean_positives": _mean(self.matched.positives),
            "mean_positives_strict": _mean(self.strict.positives),
            "by_size": by_size,
            "positive_histogram": dict(self.positive_histogram()),
            "level_share": [float(v) / max(int(level_totals.sum()), 1) for v in level_totals],
            "shapes_ever_positive": self.shapes_ever_positive(),
            "best_iou": {
                "mean": _mean(iou),
                "p10": _quantile(iou, 0.1),
                "p50": _quantile(iou, 0.5),
                "p90": _quantile(iou, 0.9),
                # short of a positive: IoU <= high where positives need IoU > high
                "below_high": _fraction(iou <= high if self.config.match.strict_high else iou < high),
            },
            "ignored_fraction": self.matched.ignored_anchors / max(self.matched.total_anchors, 1),
            "boxes_without_positive": int(self.missing.numel()),
            "boxes_without_positive_strict": int(self.missing_strict.numel()),
            "seconds": self.seconds,
            "images_per_second": self.num_images / self.seconds if self.seconds > 0 else None,
        }


def _bin_labels() -> list[str]:
    labels = []
    for lo, hi in zip(_POSITIVE_EDGES, (*_POSITIVE_EDGES[1:], None)):
        labels.append(f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"))
    return labels


def _fraction(mask: torch.Tensor) -> float | None:
    return float(mask.double().mean()) if mask.numel() else None


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def _quantile(values: torch.Tensor, q: float) -> float | None:
    return float(torch.quantile(values.double(), q)) if values.numel() else None


def _iou_pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of broadcastable [..., 4] xyxy boxes, in torchvision ``box_iou``'s
    formula order (float32), 0 where the union is 0."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def _level_tables(config: TargetConfig, canvas: tuple[int, int]) -> list[torch.Tensor]:
    """Each level's anchors as Tensor[H, W, K, 4] (cell row, cell column, shape)."""
    grid = resolve_grid(config.anchors, canvas)
    anchors = generate_anchors(config.anchors, canvas)
    starts = grid.level_starts
    tables = []
    for i, level in enumerate(grid.levels):
        block = anchors[starts[i] : starts[i + 1]]
        k = level.cells.shape[0]
        if grid.shape_major:
            tables.append(block.view(k, level.height, level.width, 4).permute(1, 2, 0, 3))
        else:
            tables.append(block.view(level.height, level.width, k, 4))
    return tables


def best_anchor_iou(
    boxes: torch.Tensor, config: TargetConfig, canvas: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box's best IoU over every anchor of a config on a canvas, and that anchor's level.

    boxes (Tensor[G, 4] float32, xyxy canvas pixels) -> (Tensor[G] float32, Tensor[G] int64).

    Why no [G, A] matrix is needed: within a level, the anchors of one shape are
    translates of each other on a grid, and their overlap with a box is a product of two
    1-D overlaps, each non-increasing in the distance between the centres along its axis.
    So the best anchor of a shape sits at one of the two grid columns and one of the two
    grid rows nearest the box centre: 4 candidates per (box, level, shape).
    """
    boxes = boxes.to(torch.float32)
    count = boxes.shape[0]
    best = torch.zeros(count, dtype=torch.float32)
    best_level = torch.zeros(count, dtype=torch.int64)
    if count == 0:
        return best, best_level
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    for level, table in enumerate(_level_tables(config, canvas)):
        height, width, shapes, _ = table.shape
        anchor_x = ((table[0, :, :, 0] + table[0, :, :, 2]) / 2).T.contiguous()  # [K, W], ascending
        anchor_y = ((table[:, 0, :, 1] + table[:, 0, :, 3]) / 2).T.contiguous()  # [K, H]
        right = torch.searchsorted(anchor_x, centre_x.expand(shapes, count).contiguous())  # [K, G]
        below = torch.searchsorted(anchor_y, centre_y.expand(shapes, count).contiguous())
        shape = torch.arange(shapes)[:, None].expand(shapes, count)
        for column in ((right - 1).clamp(0, width - 1), right.clamp(max=width - 1)):
            for row in ((below - 1).clamp(0, height - 1), below.clamp(max=height - 1)):
                iou = _iou_pairwise(table[row, column, shape], boxes[None]).amax(0)  # [G]
                better = iou > best
                best = torch.where(better, iou, best)
                best_level = torch.where(better, level, best_level)
    return best, best_level


def _canvas_chunks(dataset: BoxDataset, batch_images: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """(canvas, image rows) batches: images grouped by canvas, at most batch_images each."""
    keys = dataset.canvases[:, 0] * (1 << 32) + dataset.canvases[:, 1]
    order = torch.sort(keys, stable=True).indices
    chunks = []
    for key, rows in zip(*_split_runs(keys[order], order)):
        canvas = (int(key) >> 32, int(key) & 0xFFFFFFFF)
        chunks.extend((canvas, part) for part in rows.split(batch_images))
    return chunks


def _split_runs(sorted_keys: torch.Tensor, values: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    return unique.tolist(), list(values.split(counts.tolist()))


class _Counter:
    """Accumulates one config's ``MatchCounts`` chunk by chunk."""

    def __init__(self, config: TargetConfig, num_boxes: int):
        self.config = config
        self.levels = len(config.anchors.levels)
        self.shape_starts = torch.tensor([0, *config.anchors.anchors_per_cell]).cumsum(0)
        self.positives = torch.zeros(num_boxes, dtype=torch.int64)
        self.by_level = torch.zeros(num_boxes * self.levels, dtype=torch.int64)
        self.by_shape = torch.zeros(int(self.shape_starts[-1]), dtype=torch.int64)
        self.ignored = 0
        self.total = 0

    def add(self, chunk: _Chunk, backend: str, device: torch.device) -> None:
        sparse = assign_sparse(
            chunk.boxes.to(device), chunk.counts, chunk.canvas, self.config,
            ignore_boxes=chunk.ignore.to(device), ignore_counts=chunk.ignore_counts,
            image_sizes=chunk.sizes, backend=backend, drop_invalid=True,
        )  # fmt: skip
        offsets = sparse.positive_offsets.cpu()
        anchor = sparse.positive_anchors.cpu().long()
        matched = sparse.positive_matched_gt.cpu().long()
        image = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff(), output_size=anchor.numel())
        box = chunk.rows[chunk.box_offsets[image] + matched]  # dataset row of each positive's box
        grid = resolve_grid(self.config.anchors, chunk.canvas)
        starts = torch.tensor(grid.level_starts)
        level = torch.searchsorted(starts[1:], anchor, right=True)
        cells = torch.tensor([lv.height * lv.width for lv in grid.levels])
        shapes = torch.tensor([lv.cells.shape[0] for lv in grid.levels])
        within = anchor - starts[level]
        shape = within // cells[level] if grid.shape_major else within % shapes[level]
        ones = torch.ones_like(box)
        self.positives.index_add_(0, box, ones)
        self.by_level.index_add_(0, box * self.levels + level, ones)
        self.by_shape.index_add_(0, self.shape_starts[level] + shape, ones)
        self.ignored += int(sparse.ignored_anchors.numel())
        self.total += sparse.num_anchors * len(chunk.counts)

    def result(self) -> MatchCounts:
        return MatchCounts(self.positives, self.by_level.view(-1, self.levels), self.by_shape, self.ignored, self.total)


@dataclass
class _Chunk:
    canvas: tuple[int, int]
    rows: torch.Tensor  # [n] dataset rows of the chunk's boxes
    boxes: torch.Tensor  # [n, 4]
    counts: list[int]
    box_offsets: torch.Tensor  # [b + 1] chunk-local CSR offsets
    ignore: torch.Tensor
    ignore_counts: list[int]
    sizes: torch.Tensor  # [b, 2]


def _chunks(dataset: BoxDataset, batch_images: int):
    box_offsets, ignore_offsets = dataset.box_offsets, dataset.ignore_offsets
    for canvas, images in _canvas_chunks(dataset, batch_images):
        rows = ragged_rows(box_offsets, images)
        counts = dataset.box_counts[images]
        yield _Chunk(
            canvas=canvas,
            rows=rows,
            boxes=dataset.boxes[rows],
            counts=counts.tolist(),
            box_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            ignore=dataset.ignore_boxes[ragged_rows(ignore_offsets, images)],
            ignore_counts=dataset.ignore_counts[images].tolist(),
            sizes=dataset.image_sizes[images],
        )


def _device_for(backend: str, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    use_cuda = backend in ("auto", "triton") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def count_positives(
    dataset: BoxDataset,
    configs: Sequence[TargetConfig],
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    batch_images: int = 256,
    progress: ProgressFn | None = None,
) -> list[MatchCounts]:
    """Positives of every box under each config, run as given (``strict_config`` and
    ``scan_config`` make a config fit for this: sampling off).

    One pass over the dataset; each batch runs ``assign_sparse`` once per config.
    device: where the boxes go (default: CUDA for ``auto``/``triton`` when present).
    progress(done_images, total_images) is called after every batch.
    """
    counters = [_Counter(c, dataset.num_boxes) for c in configs]
    _run(dataset, counters, backend, _device_for(backend, device), batch_images, progress)
    return [c.result() for c in counters]


def _run(dataset, counters, backend, device, batch_images, progress, on_chunk=None) -> None:
    require_integer("batch_images", batch_images)
    if batch_images <= 0:
        raise ValueError(f"batch_images: must be positive, got {batch_images}")
    done = 0
    for chunk in _chunks(dataset, batch_images):
        for counter in counters:
            counter.add(chunk, backend, device)
        if on_chunk is not None:
            on_chunk(chunk)
        done += len(chunk.counts)
        if progress is not None:
            progress(done, dataset.num_images)


def check(
    dataset: BoxDataset,
    config: TargetConfig,
    *,
    name: str = "config",
    backend: str = "auto",
    device: str | torch.device | None = None,
    batch_images: int = 256,
    progress: ProgressFn | None = None,
) -> CheckResult:
    """What the matcher does with ``config`` over ``dataset`` (see the module docstring).

    backend: ``auto`` | ``cpu`` | ``triton`` | ``reference``, as ``assign``.
    batch_images: images per ``assign_sparse`` call (images of one canvas share a call).
    """
    if not isinstance(config, TargetConfig):
        raise TypeError(f"config: expected TargetConfig, got {type(config).__name__}")
    start = time.perf_counter()
    matched_config, strict = scan_config(config), strict_config(config)
    counters = [_Counter(matched_config, dataset.num_boxes)]
    if strict != matched_config:
        counters.append(_Counter(strict, dataset.num_boxes))
    best = torch.zeros(dataset.num_boxes, dtype=torch.float32)
    best_level = torch.zeros(dataset.num_boxes, dtype=torch.int64)

    def best_of_chunk(chunk: _Chunk) -> None:
        best[chunk.rows], best_level[chunk.rows] = best_anchor_iou(chunk.boxes, config, chunk.canvas)

    _run(dataset, counters, backend, _device_for(backend, device), batch_images, progress, best_of_chunk)
    matched = counters[0].result()
    boxes = dataset.boxes
    return CheckResult(
        name=name,
        config=config,
        num_images=dataset.num_images,
        num_ignore_boxes=dataset.ignore_boxes.shape[0],
        box_image_ids=dataset.image_ids[dataset.box_image],
        annotation_ids=dataset.annotation_ids,
        boxes=boxes,
        areas=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        matched=matched,
        strict=counters[1].result() if len(counters) > 1 else matched,
        best_iou=best,
        best_level=best_level,
        anchors_per_cell=config.anchors.anchors_per_cell,
        seconds=time.perf_counter() - start,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"  # None: no boxes in that class


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _high_rule(strict_high: set[bool]) -> str:
    """How configs of these ``match.strict_high`` compare a box's IoU with their high
    threshold (>= unless strict), for a label."""
    return "the high threshold" if len(strict_high) > 1 else f"IoU {'>' if True in strict_high else '>='} high"


def format_check_table(results: Sequence[CheckResult]) -> str:
    """A plain-text table, one column per result (configs side by side)."""
    summaries = [r.summary() for r in results]
    rows: list[tuple[str, list[str]]] = []
    add = lambda label, values: rows.append((label, [str(v) for v in values]))  # noqa: E731
    add("images", [f"{s['images']:,}" for s in summaries])
    add("boxes (crowd regions)", [f"{s['boxes']:,} ({s['ignore_boxes']:,})" for s in summaries])
    add("anchors per image", [f"{s['anchors_per_image']:,.0f}" for s in summaries])
    add("matching", [f"IoU{'>' if s['strict_high'] else '>='}{s['high']:g}, low-quality {s['low_quality']}"
                     for s in summaries])  # fmt: skip
    add(f"BPR, {_high_rule({s['strict_high'] for s in summaries})} alone", [_pct(s["bpr"]) for s in summaries])
    add("BPR, with low-quality rule", [_pct(s["bpr_low_quality"]) for s in summaries])
    for size in SIZE_NAMES:
        add(f"  {size}: boxes / BPR / pos per box", [
            f"{s['by_size'][size]['boxes']:,} / {_pct(s['by_size'][size]['bpr'])} / "
            f"{_num(s['by_size'][size]['mean_positives'], 1)}"
            for s in summaries
        ])  # fmt: skip
    add("positives per box (mean)", [_num(s["mean_positives"]) for s in summaries])
    add("  without low-quality rule", [_num(s["mean_positives_strict"]) for s in summaries])
    for label in _bin_labels():
        add(f"  boxes with {label} positives", [
            f"{s['positive_histogram'][label]:,} ({_pct(s['positive_histogram'][label] / max(s['boxes'], 1))})"
            for s in summaries
        ])  # fmt: skip
    add("positives by level", [" ".join(f"{100 * v:.0f}" for v in s["level_share"]) + " %" for s in summaries])
    add("shapes ever positive", [" ".join(f"{u}/{n}" for u, n in s["shapes_ever_positive"]) for s in summaries])
    add("best-anchor IoU p10/p50/p90", [
        f"{_num(s['best_iou']['p10'])} / {_num(s['best_iou']['p50'])} / {_num(s['best_iou']['p90'])}"
        for s in summaries
    ])  # fmt: skip
    add("best-anchor IoU short of high", [_pct(s["best_iou"]["below_high"]) for s in summaries])
    add("ignored anchors", [f"{100 * s['ignored_fraction']:.3f}%" for s in summaries])
    add("boxes without positive", [
        f"{s['boxes_without_positive']:,} ({s['boxes_without_positive_strict']:,} at "
        f"IoU{'>' if s['strict_high'] else '>='}high)"
        for s in summaries
    ])  # fmt: skip
    add("scan", [
        f"{s['seconds']:.2f} s, " + ("-" if s["images_per_second"] is None else f"{s['images_per_second']:,.0f}")
        + " img/s" for s in summaries
    ])  # fmt: skip
    header = ("", [r.name for r in results])
    label_width = max(len(label) for label, _ in [header, *rows])
    widths = [max(len(values[i]) for _, values in [header, *rows]) for i in range(len(results))]
    lines = []
    for n, (label, values) in enumerate([header, *rows]):
        lines.append(label.ljust(label_width) + "  " + "  ".join(v.rjust(w) for v, w in zip(values, widths)))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_missing(result: CheckResult, limit: int = 20, strict: bool = False) -> str:
    """The boxes without a positive (under the config's rules, or at its high threshold
    alone with ``strict``), at most ``limit`` of them, with image id, annotation id, box
    and best IoU."""
    rows = result.missing_strict if strict else result.missing
    rule = f"at {_high_rule({result.config.match.strict_high})} alone" if strict else "under the config's rules"
    lines = [f"{result.name}: {rows.numel():,} boxes without a positive {rule}"]
    for row in rows[:limit].tolist():
        x1, y1, x2, y2 = result.boxes[row].tolist()
        lines.append(
            f"  image {int(result.box_image_ids[row])} annotation {int(result.annotation_ids[row])}: "
            f"box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) {x2 - x1:.1f}x{y2 - y1:.1f} px, "
            f"best IoU {float(result.best_iou[row]):.3f} (level {int(result.best_level[row])})"
        )
    if rows.numel() > limit:
        lines.append(f"  ... {rows.numel() - limit:,} more")
    return "\n".join(lines)
