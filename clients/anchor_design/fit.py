"""``fit``: anchor shapes for a dataset, judged by the matcher itself.

Two steps, deterministic for a seed:

1. **k-means with 1 - IoU on (w, h)** (the classic recipe: boxes compared as if they
   shared a centre, so only their shapes count). FPN layouts (torchvision, detectron2,
   mmdet, keras) place sizes x aspect ratios at every cell: the aspect ratios are the
   k-means centres of the boxes scaled to one area (1 - IoU then depends on the aspect
   alone), shared by every level as in those frameworks; each level's sizes are the
   k-means centres of the boxes made square (1 - IoU then depends on the size alone)
   among the boxes nearest that level's current sizes, so the strides keep their role.
   YOLO layouts take the k-means centres of the raw (w, h), smallest area to the finest
   level, as YOLOv5 does.
2. **Refinement by evolution** on the objective that matters: the matcher's own BPR at
   IoU >= ``match.high`` without the low-quality rule, plus a little for boxes with
   several positives (``fitness``), both computed with the real backend over the
   dataset (a fixed random subset of ``fit_images`` images with boxes). A (1+1) evolution: each
   generation multiplies a random half of the sizes and ratios by ``exp(sigma * N(0,
   1))`` and keeps the child only when it is strictly fitter. A parameter that no box
   depends on (a shape with no positive) still moves along with the others of a child
   that is kept, as in YOLOv5's evolution: harmless to the objective, but such a shape
   in the written config is not one the data asked for. It starts from the fitter of the
   k-means shapes and the config's own.

The number of shapes per cell never changes, so a fitted config fits the same head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tritarget.kernels import AnchorLevel, TargetConfig

from .check import count_positives, strict_config
from .dataset import BoxDataset, require_integer

__all__ = ["FIT_LAYOUTS", "FitResult", "check_fittable", "fit_anchors", "fitness", "kmeans_iou"]

FIT_LAYOUTS = ("torchvision", "detectron2", "mmdet", "keras", "yolo")
# Layouts whose generators take one set of scales for every level (times a per-level size).
_SHARED_SCALE_LAYOUTS = ("mmdet", "keras")

# The objective: BPR first; then up to POSITIVES_WEIGHT more for boxes with several
# positives, counted up to POSITIVES_TARGET each (a box with 3 positives is served; more
# are not worth losing a box for: 0.1 caps what the second term can buy at 10% of boxes).
POSITIVES_WEIGHT = 0.1
POSITIVES_TARGET = 3

# Mutation scale in log space: starts at ~20% steps, ends at ~3% for fine tuning.
_SIGMA_START, _SIGMA_END = 0.2, 0.03

# Bounds on fitted shapes, in pixels and h/w: anchors stay boxes a grid can hold.
_MIN_SIDE, _MAX_SIDE = 2.0, 4096.0
_MAX_RATIO = 16.0


def _wh_iou(wh: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """IoU of (w, h) pairs sharing a centre: wh [N, 2], centres [K, 2] -> [N, K]."""
    inter = torch.minimum(wh[:, None, 0], centres[None, :, 0]) * torch.minimum(wh[:, None, 1], centres[None, :, 1])
    union = wh[:, None, 0] * wh[:, None, 1] + centres[None, :, 0] * centres[None, :, 1] - inter
    return inter / union


def _distinct_shapes(wh: torch.Tensor) -> int:
    """How many different shapes wh (Tensor[N, 2]) holds, shapes within ~0.1% of each other
    counting as one: float32 coordinates leave square boxes 1e-6 to 1e-4 off square (with
    1e-6 three k-means "ratios" of squares came out 1, 1, 1)."""
    return torch.unique((wh.log() * 1e3).round(), dim=0).shape[0]


def kmeans_iou(wh: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """k-means of box shapes with distance 1 - IoU (boxes aligned at their centres).

    wh (Tensor[N, 2] positive, with at least k distinct shapes: fewer would force repeated
    centres) -> Tensor[k, 2] float64 centres (the mean (w, h) of their members), smallest
    area first. k-means++ seeding from ``seed``; a cluster left empty restarts at the point
    farthest from its centre.
    """
    wh = wh.to(torch.float64)
    if wh.dim() != 2 or wh.shape[1] != 2 or not bool(((wh > 0) & wh.isfinite()).all()):
        raise ValueError(f"wh: expected a [N, 2] tensor of finite positive widths and heights, got shape "
                         f"{tuple(wh.shape)}")  # fmt: skip
    distinct = _distinct_shapes(wh)
    if not 0 < k <= distinct:
        raise ValueError(f"kmeans_iou: need 1 <= k <= {distinct}, the distinct shapes among {wh.shape[0]}; got k={k}")
    generator = torch.Generator().manual_seed(seed)
    centres = wh[torch.randint(wh.shape[0], (1,), generator=generator)]
    while centres.shape[0] < k:
        distance = (1 - _wh_iou(wh, centres)).amin(1)
        pick = torch.multinomial(distance**2, 1, generator=generator)  # k <= distinct: some weight is > 0
        centres = torch.cat([centres, wh[pick]])
    assignment = None
    for _ in range(iterations):
        distance = 1 - _wh_iou(wh, centres)
        new_assignment = distance.argmin(1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(k):
            members = assignment == c
            if members.any():
                centres[c] = wh[members].mean(0)
            else:
                centres[c] = wh[distance.gather(1, assignment[:, None]).squeeze(1).argmax()]
    return centres[torch.argsort(centres[:, 0] * centres[:, 1])]


def _fill_shapes(wh: torch.Tensor, current: torch.Tensor, seed: int) -> torch.Tensor:
    """As many k-means centres of ``wh`` (Tensor[N, 2]) as ``current`` (Tensor[K, 2], the
    config's shapes) has rows, smallest area first. When the boxes have fewer than K
    distinct shapes, their centres are completed with the current shapes farthest (1 - IoU)
    from the shapes chosen so far, so no shape is repeated."""
    if wh.shape[0] == 0:
        return current
    centres = kmeans_iou(wh, min(current.shape[0], _distinct_shapes(wh)), seed=seed)
    while centres.shape[0] < current.shape[0]:
        distance = (1 - _wh_iou(current, centres)).amin(1)
        centres = torch.cat([centres, current[distance.argmax()][None]])
    return centres[torch.argsort(centres[:, 0] * centres[:, 1])]


def check_fittable(config: TargetConfig) -> None:
    """Raise ``ValueError`` naming the reason when ``fit_anchors`` cannot fit ``config``'s
    anchors (checked before any data is loaded)."""
    _Parameters(config)


def fitness(positives: torch.Tensor) -> float:
    """The refinement's objective from positives per box on the high threshold alone (Tensor[N] int):
    ``BPR + POSITIVES_WEIGHT * mean(min(positives, POSITIVES_TARGET) / POSITIVES_TARGET)``."""
    if positives.numel() == 0:
        return 0.0
    served = positives.clamp(max=POSITIVES_TARGET).double().mean() / POSITIVES_TARGET
    return float((positives > 0).double().mean() + POSITIVES_WEIGHT * served)


class _Parameters:
    """A layout's shapes as one vector of logs, and back to a config.

    torchvision / detectron2: [log size of (level, j) for every level and size j] +
    [log ratio r] (a level's sizes are free in those frameworks' generators);
    keras: [log size of each level] + [log scale j] + [log ratio r] (keras-retinanet's
    ``AnchorParameters``: one size per level times scales shared by every level);
    mmdet: [log scale j] + [log ratio r] (``AnchorGenerator(scales=..., ratios=...)``: scales
    shared by every level, times each level's own base size, kept);
    yolo: [log w, log h] of every shape, levels in order.
    Ratios are shared by every level in every FPN layout. A fitted config is one the
    framework's own generator can build, for the model to decode its predictions with.
    """

    def __init__(self, config: TargetConfig):
        anchors = config.anchors
        if anchors.layout not in FIT_LAYOUTS:
            raise ValueError(
                f"fit supports the {', '.join(FIT_LAYOUTS)} anchor layouts; this config's is {anchors.layout!r} "
                "(its sizes are fractions of a fixed canvas)"
            )
        self.config = config
        self.layout = anchors.layout
        if self.layout == "yolo":
            return
        levels = anchors.levels
        for i, lv in enumerate(levels):
            if lv.aspect_ratios != levels[0].aspect_ratios:
                raise ValueError(f"fit: every level must have the same aspect ratios (they are fitted shared); "
                                 f"level {i} has {lv.aspect_ratios}, level 0 {levels[0].aspect_ratios}")  # fmt: skip
        self.num_ratios = len(levels[0].aspect_ratios)
        if self.layout in _SHARED_SCALE_LAYOUTS:
            scales = [self._scales(lv) for lv in levels]
            for i, level_scales in enumerate(scales):
                if len(level_scales) != len(scales[0]) or any(
                    abs(a / b - 1) > 1e-6 for a, b in zip(level_scales, scales[0])
                ):
                    what = "scales" if self.layout == "mmdet" else "sizes as multiples of its first"
                    raise ValueError(f"fit: the {self.layout} layout shares scales across levels; level {i}'s "
                                     f"{what} {tuple(level_scales)} differ from level 0's "
                                     f"{tuple(scales[0])}")  # fmt: skip

    def base(self, level: AnchorLevel) -> float:
        """A level's base size: mmdet's (an anchor's size is scale x base), keras's the level's first size."""
        if self.layout == "keras":
            return min(level.sizes)
        return level.base_size if level.base_size is not None else float(level.stride)

    def _scales(self, level: AnchorLevel) -> list[float]:
        if self.layout == "mmdet":
            return sorted(level.scales)
        return sorted(s / self.base(level) for s in level.sizes)

    def sizes(self, config: TargetConfig) -> list[list[float]]:
        """Each level's sizes in pixels (sqrt of the anchor area)."""
        if self.layout == "mmdet":
            return [[s * self.base(lv) for s in lv.scales] for lv in config.anchors.levels]
        if self.layout == "yolo":
            return [[math.sqrt(w * h) for w, h in lv.shapes] for lv in config.anchors.levels]
        return [list(lv.sizes) for lv in config.anchors.levels]

    def encode(self, config: TargetConfig) -> torch.Tensor:
        levels = config.anchors.levels
        if self.layout == "yolo":
            return torch.tensor([[w, h] for lv in levels for w, h in lv.shapes], dtype=torch.float64).log().flatten()
        ratios = list(levels[0].aspect_ratios)
        if self.layout == "mmdet":
            return torch.tensor(self._scales(levels[0]) + ratios, dtype=torch.float64).log()
        if self.layout == "keras":
            bases = [self.base(lv) for lv in levels]
            return torch.tensor(bases + self._scales(levels[0]) + ratios, dtype=torch.float64).log()
        sizes = [s for level_sizes in self.sizes(config) for s in level_sizes]
        return torch.tensor(sizes + ratios, dtype=torch.float64).log()

    def decode(self, vector: torch.Tensor) -> TargetConfig:
        levels = self.config.anchors.levels
        values = vector.exp().tolist()
        new_levels, at = [], 0
        if self.layout == "yolo":
            # Smallest area to the finest level across all levels, as YOLOv5's autoanchor
            # orders its evolved anchors (sorted per level, a stride-32 level kept an anchor
            # smaller than a stride-8 one).
            shapes = sorted(
                ((_side(w), _side(h)) for w, h in zip(values[::2], values[1::2])), key=lambda wh: wh[0] * wh[1]
            )
            for lv in levels:
                new_levels.append(_replace_level(lv, shapes=tuple(shapes[at : at + len(lv.shapes)])))
                at += len(lv.shapes)
            return self._with_levels(new_levels)
        ratios = tuple(sorted(min(max(r, 1 / _MAX_RATIO), _MAX_RATIO) for r in values[-self.num_ratios :]))
        # A size is sqrt(w x h); the ratios stretch it into sides up to `stretch` times
        # shorter or longer, which must stay within the bounds too (a size held at 2 px made
        # 0.5 px sides at ratio 16: zero-area anchors once torchvision rounds them).
        stretch = math.sqrt(max(max(r, 1 / r) for r in ratios))
        low, high = _MIN_SIDE * stretch, _MAX_SIDE / stretch
        if self.layout in _SHARED_SCALE_LAYOUTS:
            count = len(self._scales(levels[0]))
            scales = sorted(values[-self.num_ratios - count : -self.num_ratios])
            if self.layout == "mmdet":  # bases kept: the scales keep every level's anchors within bounds
                bases = [self.base(lv) for lv in levels]
                scales = [min(max(s, low / min(bases)), high / max(bases)) for s in scales]
                new_levels = [_replace_level(lv, scales=tuple(scales), aspect_ratios=ratios) for lv in levels]
                return self._with_levels(new_levels)
            # keras: scales kept, each level's size keeps its anchors within bounds
            bases = [min(max(b, low / scales[0]), high / scales[-1]) for b in values[: len(levels)]]
            for lv, base in zip(levels, bases):
                new_levels.append(_replace_level(lv, sizes=tuple(base * s for s in scales), aspect_ratios=ratios))
            return self._with_levels(new_levels)
        for lv in levels:
            sizes = sorted(min(max(v, low), high) for v in values[at : at + len(lv.sizes)])
            at += len(lv.sizes)
            new_levels.append(_replace_level(lv, sizes=tuple(sizes), aspect_ratios=ratios))
        return self._with_levels(new_levels)

    def _with_levels(self, levels: list[AnchorLevel]) -> TargetConfig:
        return self.config.replace(**{"anchors.levels": [_level_dict(lv) for lv in levels]})

    def too_small(self, wh: torch.Tensor) -> torch.Tensor:
        """The boxes (wh: Tensor[N, 2]) under the smallest anchor the fit makes, left out of
        the k-means sizes: their centres would fall below it and the bounds would clamp them
        into repeated shapes. yolo: both sides under 2 px (as yolov5's autoanchor); the FPN
        layouts, whose ratios take the aspect alone: sqrt(w x h) under 2 px."""
        if self.layout == "yolo":
            return (wh < _MIN_SIDE).all(1)
        return wh[:, 0] * wh[:, 1] < _MIN_SIDE**2

    def kmeans(self, wh: torch.Tensor, seed: int) -> torch.Tensor:
        """Step 1: the k-means shapes as a parameter vector (``_fill_shapes``: the config's
        own shapes complete them where the boxes have too few distinct shapes). The boxes'
        shapes are held within ``decode``'s bounds first: centres beyond a bound came out
        of it as one repeated anchor (three ratios of boxes 20-50 times wider than tall,
        all 1/16), the distinct shapes counted before the bound."""
        levels = self.config.anchors.levels
        if self.layout == "yolo":
            current = torch.tensor([wh for lv in levels for wh in lv.shapes], dtype=torch.float64)
            bounded = wh[~self.too_small(wh)].clamp(_MIN_SIDE, _MAX_SIDE)
            return _fill_shapes(bounded, current, seed).log().flatten()
        side = (wh[:, 0] * wh[:, 1]).sqrt()
        box_ratio = (wh[:, 1] / wh[:, 0]).clamp(1 / _MAX_RATIO, _MAX_RATIO)
        # One area: 1 - IoU depends on the aspect alone.
        unit = torch.stack([box_ratio.rsqrt(), box_ratio.sqrt()], dim=1)
        current_ratios = torch.tensor(levels[0].aspect_ratios, dtype=torch.float64)
        current_unit = torch.stack([current_ratios.rsqrt(), current_ratios.sqrt()], dim=1)  # h / w = ratio
        ratio_centres = _fill_shapes(unit, current_unit, seed)
        ratios = (ratio_centres[:, 1] / ratio_centres[:, 0]).log().tolist()
        current = self.sizes(self.config)
        centre_of_level = torch.tensor([sum(math.log(s) for s in sizes) / len(sizes) for sizes in current])
        stretch = math.exp(max(abs(r) for r in ratios) / 2)  # as decode bounds the sizes for these ratios
        side = side[~self.too_small(wh)].clamp(_MIN_SIDE * stretch, _MAX_SIDE / stretch)
        level_of_box = (side.log()[:, None] - centre_of_level[None, :]).abs().argmin(1)
        log_sizes = []  # [level][j], each level's k-means sizes, smallest first
        for i, level_sizes in enumerate(current):
            members = side[level_of_box == i]
            square = torch.stack([members, members], dim=1)  # one aspect: 1 - IoU depends on the size alone
            current_square = torch.tensor(level_sizes, dtype=torch.float64)[:, None].expand(-1, 2)
            log_sizes.append(_fill_shapes(square, current_square, seed)[:, 0].log().sort().values)
        if self.layout not in _SHARED_SCALE_LAYOUTS:
            return torch.cat([*log_sizes, torch.tensor(ratios, dtype=torch.float64)])
        log_sizes = torch.stack(log_sizes)  # [level, j]: as many per level (__init__)
        # One set of scales: the levels' own, averaged in logs weighted by their boxes (a
        # level without boxes holds the start's scales, which would outvote the data).
        members = torch.bincount(level_of_box, minlength=len(levels)).to(torch.float64)
        weights = members / members.sum() if members.sum() > 0 else torch.full_like(members, 1 / len(levels))
        if self.layout == "mmdet":  # each level's sizes over its base, which is kept
            log_bases = torch.tensor([math.log(self.base(lv)) for lv in levels], dtype=torch.float64)
            log_scales = weights @ (log_sizes - log_bases[:, None])
            return torch.cat([log_scales, torch.tensor(ratios, dtype=torch.float64)])
        # keras: level sizes x shared scales, the least-squares fit in logs
        log_scales = weights @ (log_sizes - log_sizes.mean(1, keepdim=True))
        log_scales = log_scales - log_scales[0]  # the first scale is 1: a level's size is its smallest anchor's
        log_bases = (log_sizes - log_scales[None, :]).mean(1)
        return torch.cat([log_bases, log_scales, torch.tensor(ratios, dtype=torch.float64)])


def _side(value: float) -> float:
    return min(max(value, _MIN_SIDE), _MAX_SIDE)


def _replace_level(level: AnchorLevel, **fields) -> AnchorLevel:
    return AnchorLevel(**{**_level_dict(level), **fields})


def _level_dict(level: AnchorLevel) -> dict:
    return {name: getattr(level, name) for name in level.__dataclass_fields__}


@dataclass
class FitResult:
    """What ``fit_anchors`` found.

    config: the fitted config (the given one with new anchor shapes).
    start, kmeans: the given config and the k-means shapes (step 1).
    fitness_*: the objective (``fitness``) of each on the fit images.
    boxes, small_boxes: the fit images' boxes, and those smaller than any anchor the fit
        makes (left out of the k-means sizes: ``_Parameters.too_small``).
    history: (generation, fitness) at every improvement of the refinement.
    """

    config: TargetConfig
    start: TargetConfig
    kmeans: TargetConfig
    fitness_start: float
    fitness_kmeans: float
    fitness: float
    fit_images: int
    boxes: int
    small_boxes: int
    generations: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def overrides(self) -> dict:
        """The change as ``TargetConfig.replace`` overrides: ``start.replace(**overrides) == config``."""
        return {"anchors.levels": self.config.to_dict()["anchors"]["levels"]}


def fit_anchors(
    dataset: BoxDataset,
    config: TargetConfig,
    *,
    seed: int = 0,
    generations: int = 300,
    fit_images: int = 1000,
    backend: str = "auto",
    device: str | torch.device | None = None,
    batch_images: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Anchor shapes for ``dataset`` in ``config``'s layout (see the module docstring).

    fit_images: images the objective is computed on (a random subset of the images with
        boxes, fixed by ``seed``; all of them when fewer). progress(generation, generations).
    Raises ``ValueError`` for a layout that cannot be fitted (ssd, d2l) or a dataset
    without boxes.
    """
    start_time = time.perf_counter()
    parameters = _Parameters(config)
    if dataset.num_boxes == 0:
        raise ValueError("fit: the dataset has no boxes")
    require_integer("fit: generations", generations)
    require_integer("fit: fit_images", fit_images)
    if generations < 0 or fit_images <= 0:
        raise ValueError(f"fit: need generations >= 0 and fit_images > 0, got {generations}, {fit_images}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"fit: seed must be in 0 .. 2**64 - 1 (a torch.Generator seed), got {seed}")
    generator = torch.Generator().manual_seed(seed)
    # Images without boxes add nothing to the objective: a sample of mostly empty images
    # could hold no box at all and "fit" on nothing.
    with_boxes = (dataset.box_counts > 0).nonzero().flatten()
    if with_boxes.numel() > fit_images:
        with_boxes = with_boxes[torch.randperm(with_boxes.numel(), generator=generator)[:fit_images].sort().values]
    dataset = dataset.subset(with_boxes)
    boxes = dataset.boxes.to(torch.float64)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)

    def evaluate(candidate: TargetConfig) -> float:
        (counts,) = count_positives(
            dataset, [strict_config(candidate)], backend=backend, device=device, batch_images=batch_images
        )
        return fitness(counts.positives)

    kmeans_vector = parameters.kmeans(wh, seed)
    kmeans_config = parameters.decode(kmeans_vector)
    fitness_start, fitness_kmeans = evaluate(config), evaluate(kmeans_config)
    if fitness_kmeans > fitness_start:
        best_vector, best = kmeans_vector, fitness_kmeans
    else:  # the start as the refinement sees it (its bounds may move a shape of the given config)
        best_vector = parameters.encode(config)
        best = evaluate(parameters.decode(best_vector))
    history = [(0, best)]
    for generation in range(1, generations + 1):
        sigma = _SIGMA_START + (_SIGMA_END - _SIGMA_START) * (generation - 1) / max(generations - 1, 1)
        mask = torch.rand(best_vector.shape, generator=generator, dtype=torch.float64) < 0.5
        if not mask.any():
            mask[torch.randint(mask.numel(), (1,), generator=generator)] = True
        noise = torch.randn(best_vector.shape, generator=generator, dtype=torch.float64) * sigma * mask
        child = best_vector + noise
        score = evaluate(parameters.decode(child))
        if score > best:
            best_vector, best = child, score
            history.append((generation, best))
        if progress is not None:
            progress(generation, generations)
    fitted = parameters.decode(best_vector)
    if best <= fitness_start:  # nothing beats the config as given: it comes back as given
        fitted, best, history = config, fitness_start, [(0, fitness_start)]
    return FitResult(
        config=fitted,
        start=config,
        kmeans=kmeans_config,
        fitness_start=fitness_start,
        fitness_kmeans=fitness_kmeans,
        fitness=best,
        small_boxes=int(parameters.too_small(wh).sum()),
        boxes=wh.shape[0],
        fit_images=dataset.num_images,
        generations=generations,
        seconds=time.perf_counter() - start_time,
        history=history,
    )
