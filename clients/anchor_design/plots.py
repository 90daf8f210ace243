"""Pictures of anchors and assignments (PNG), drawn with matplotlib (the ``plot`` extra).

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no global
state and no GUI backend, so this works in scripts, servers and tests alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from tritarget.kernels import IGNORED, POSITIVE, TargetConfig, assign, generate_anchors
from tritarget.service.output import write_atomically

from .check import SIZE_NAMES, CheckResult, _bin_labels, _level_tables, scan_config
from .dataset import BoxDataset

__all__ = ["plot_anchor_shapes", "plot_assignment", "plot_check", "plot_image_assignment"]

# Ignored anchors are drawn at most this many (a crowd region can ignore thousands; the
# picture only needs to show where they are).
_MAX_IGNORED_DRAWN = 3000


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the anchor pictures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _rectangle(x1: float, y1: float, x2: float, y2: float, **style):
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, **style)


def _colour(index: int):
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def _save(figure, path: str | os.PathLike) -> str:
    return write_atomically(path, figure.savefig)


def plot_anchor_shapes(config: TargetConfig, canvas: tuple[int, int], path: str | os.PathLike, title: str = "") -> str:
    """Each level's anchor shapes drawn at one cell (the cell nearest the canvas centre),
    with the cell's stride square dashed. Returns the path written."""
    tables = _level_tables(config, canvas)
    figure = _figure(3.2 * len(tables), 3.6)
    axes = figure.subplots(1, len(tables), squeeze=False)[0]
    for level, (axis, table) in enumerate(zip(axes, tables)):
        height, width = table.shape[:2]
        cell = table[height // 2, width // 2]  # [K, 4]
        centre_x = float((cell[:, 0] + cell[:, 2]).mean() / 2)
        centre_y = float((cell[:, 1] + cell[:, 3]).mean() / 2)
        stride = config.anchors.levels[level].stride
        axis.add_patch(_rectangle(-stride / 2, -stride / 2, stride / 2, stride / 2, fill=False, ls="--", ec="0.5"))
        extent = stride / 2
        for k, (x1, y1, x2, y2) in enumerate(cell.tolist()):
            box = (x1 - centre_x, y1 - centre_y, x2 - centre_x, y2 - centre_y)
            axis.add_patch(_rectangle(*box, fill=False, ec=_colour(k), lw=1.5))
            extent = max(extent, *(abs(v) for v in box))
        axis.set_xlim(-1.05 * extent, 1.05 * extent)
        axis.set_ylim(1.05 * extent, -1.05 * extent)  # image coordinates: y down
        axis.set_aspect("equal")
        axis.set_title(f"level {level}: stride {stride}, {cell.shape[0]} shapes", fontsize=9)
        axis.tick_params(labelsize=7)
    figure.suptitle(title or f"anchor shapes at one cell ({config.anchors.layout} layout, pixels)")
    return _save(figure, path)


def plot_image_assignment(
    boxes: torch.Tensor,
    canvas: tuple[int, int],
    config: TargetConfig,
    path: str | os.PathLike,
    *,
    ignore_boxes: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
    backend: str = "auto",
    title: str = "",
) -> str:
    """One image's assignment: its boxes, the positive anchors in the colour of their box,
    ignored anchors in grey, crowd regions hatched.

    boxes (Tensor[G, 4]) and ignore_boxes (Tensor[M, 4]): xyxy canvas pixels.
    image_size: the valid (height, width) (default: the canvas). Sampling is off, as in ``check``.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.zeros(0, 4) if ignore_boxes is None else torch.as_tensor(ignore_boxes, dtype=torch.float32)
    size = tuple(image_size) if image_size is not None else tuple(canvas)
    targets = assign(
        boxes, [boxes.shape[0]], canvas, scan_config(config), ignore_boxes=ignore.reshape(-1, 4),
        ignore_counts=[ignore.reshape(-1, 4).shape[0]], image_sizes=[size], backend=backend,
    )  # fmt: skip
    anchors = generate_anchors(config.anchors, canvas)
    labels, matched = targets.labels[0].cpu(), targets.matched_gt[0].cpu()
    # At most 8 inches on the longer side: a tall image (400,000 x 20 pixels) asked for a
    # figure past matplotlib's 2^23-pixel limit, and a 60,000 x 40 one made a 14 MB PNG.
    width, height = (8, 8 * canvas[0] / canvas[1]) if canvas[1] >= canvas[0] else (8 * canvas[1] / canvas[0], 8)
    figure = _figure(max(width, 3.0), max(height, 1.0) + 0.6)
    axis = figure.subplots()
    axis.add_patch(_rectangle(0, 0, canvas[1], canvas[0], fill=False, ec="0.7", ls=":"))
    axis.add_patch(_rectangle(0, 0, size[1], size[0], fill=False, ec="0.4"))
    ignored = torch.nonzero(labels == IGNORED).flatten()
    for a in ignored[:: max(1, ignored.numel() // _MAX_IGNORED_DRAWN)].tolist():
        axis.add_patch(_rectangle(*anchors[a].tolist(), fill=False, ec="0.75", lw=0.4))
    positive = torch.nonzero(labels == POSITIVE).flatten()
    for a in positive.tolist():
        axis.add_patch(_rectangle(*anchors[a].tolist(), fill=False, ec=_colour(int(matched[a])), lw=0.8, alpha=0.7))
    for g, box in enumerate(boxes.tolist()):
        axis.add_patch(_rectangle(*box, fill=False, ec=_colour(g), lw=2.5))
    for box in ignore.reshape(-1, 4).tolist():
        axis.add_patch(_rectangle(*box, fill=False, ec="k", hatch="//", lw=1))
    axis.set_xlim(-4, canvas[1] + 4)
    axis.set_ylim(canvas[0] + 4, -4)
    axis.set_aspect("equal")
    counts = targets.summary()[0]
    axis.set_title(
        (title + "\n" if title else "") + f"{boxes.shape[0]} boxes (thick), {counts['positive']} positive anchors "
        f"(box colour), {counts['ignored']} ignored (grey), crowd hatched",
        fontsize=9,
    )
    return _save(figure, path)


def plot_assignment(
    dataset: BoxDataset, image_id: int, config: TargetConfig, path: str | os.PathLike, *, backend: str = "auto"
) -> str:
    """``plot_image_assignment`` for one image of a dataset, by its image id."""
    row = dataset.row_of(image_id)
    start, end = dataset.box_offsets[row : row + 2].tolist()
    ignore_start, ignore_end = dataset.ignore_offsets[row : row + 2].tolist()
    canvas = tuple(dataset.canvases[row].tolist())
    return plot_image_assignment(
        dataset.boxes[start:end], canvas, config, path, ignore_boxes=dataset.ignore_boxes[ignore_start:ignore_end],
        image_size=tuple(dataset.image_sizes[row].tolist()), backend=backend, title=f"image {image_id}",
    )  # fmt: skip


def plot_check(results: Sequence[CheckResult], path: str | os.PathLike) -> str:
    """The check histograms, configs side by side: positives per box, best-anchor IoU,
    BPR by size class (the high threshold alone), and the share of positives per level."""
    figure = _figure(12, 8)
    (hist, iou), (sizes, levels) = figure.subplots(2, 2)
    width = 0.8 / max(len(results), 1)
    labels = _bin_labels()
    for i, result in enumerate(results):
        offset = (i - (len(results) - 1) / 2) * width
        counts = [n for _, n in result.positive_histogram()]
        share = [n / max(result.num_boxes, 1) for n in counts]
        hist.bar([x + offset for x in range(len(labels))], share, width, label=result.name, color=_colour(i))
        iou.hist(result.best_iou.numpy(), bins=50, range=(0, 1), histtype="step", lw=1.5, color=_colour(i),
                 label=result.name, density=True)  # fmt: skip
        summary = result.summary()
        bpr = [summary["by_size"][s]["bpr"] for s in SIZE_NAMES]
        bpr = [math.nan if value is None else value for value in bpr]  # no boxes of that size: no bar
        sizes.bar([x + offset for x in range(3)], bpr, width, label=result.name, color=_colour(i))
        level_share = summary["level_share"]
        levels.bar([x + offset for x in range(len(level_share))], level_share, width, label=result.name,
                   color=_colour(i))  # fmt: skip
    hist.set_xticks(range(len(labels)), labels)
    hist.set(xlabel="positives per box (config's rules)", ylabel="share of boxes", title="positives per box")
    if results:
        iou.axvline(results[0].config.match.high, color="k", ls="--", lw=1, label="match.high")
    iou.set(xlabel="IoU of the box's best anchor", ylabel="density", title="best-anchor IoU")
    sizes.set_xticks(range(3), list(SIZE_NAMES))
    sizes.set(ylim=(0, 1.05), ylabel="BPR", title="BPR at the high threshold alone, by box size")
    if results:
        levels.set_xticks(range(len(results[0].anchors_per_cell)))
    levels.set(xlabel="level", ylabel="share of positives", title="positives by level")
    for axis in (hist, iou, sizes, levels):
        axis.legend(fontsize=8)
    return _save(figure, path)
