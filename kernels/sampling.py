"""Balanced positive/negative sampling (torchvision/detectron2 RPN: 256 anchors, half positive).

It runs after matching, on the labels, identically for every backend: the random
draws come from a CPU ``torch.Generator`` seeded per image, so a request gives the
same sample whichever backend or batch it runs in.
"""

from __future__ import annotations

import torch

from .config import MatchConfig
from .targets import IGNORED, NEGATIVE, POSITIVE, Targets

__all__ = ["image_seeds", "sample"]


def image_seeds(seed: int | list[int] | tuple[int, ...], batch: int) -> list[int]:
    """One seed per image: ``seed + i`` for an int, or the given list."""
    if isinstance(seed, bool):
        raise TypeError(f"seed: expected an int or a list of ints, got {seed!r}")
    if isinstance(seed, int):
        return [seed + i for i in range(batch)]
    seeds = list(seed)
    if len(seeds) != batch or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed: expected an int or {batch} ints (one per image), got {seed!r}")
    return seeds


def _draw(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[order.to(candidates.device)]


def sample(targets: Targets, config: MatchConfig, seeds: list[int]) -> Targets:
    """Keep ``sample_size`` anchors per image (at most ``positive_fraction`` positive).

    Positives beyond the quota are drawn at random, negatives fill the rest; every
    anchor not drawn becomes ignored (matched_gt -1, zero deltas, background class).
    Modifies ``targets`` in place and returns it.
    """
    for i, row in enumerate(targets.labels):
        generator = torch.Generator().manual_seed(seeds[i])
        positives = torch.nonzero(row == POSITIVE).flatten()
        negatives = torch.nonzero(row == NEGATIVE).flatten()
        num_pos = min(positives.numel(), int(config.sample_size * config.positive_fraction))
        num_neg = min(negatives.numel(), config.sample_size - num_pos)
        keep = torch.zeros_like(row, dtype=torch.bool)
        keep[_draw(positives, num_pos, generator)] = True
        keep[_draw(negatives, num_neg, generator)] = True
        dropped = ~keep & (row != IGNORED)
        dropped_positive = dropped & (row == POSITIVE)
        row[dropped] = IGNORED
        if config.low_quality != "detectron2":  # detectron2 keeps the argmax box of every anchor
            targets.matched_gt[i, dropped_positive] = -1
        targets.deltas[i, dropped_positive] = 0
        if targets.classes is not None:
            targets.classes[i, dropped_positive] = targets.background_class
    return targets
