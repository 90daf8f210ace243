"""Balanced positive/negative sampling (torchvision/detectron2 RPN: 256 anchors, half positive).

It runs after matching, on the labels, identically for every backend: the random
draws come from a CPU ``torch.Generator`` seeded per image, so a request gives the
same sample whichever backend or batch it runs in.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import MatchConfig
from .targets import IGNORED, NEGATIVE, POSITIVE, Targets

__all__ = ["image_seeds", "sample"]


def image_seeds(seed: int | list[int] | tuple[int, ...], batch: int) -> list[int]:
    """One seed per image: ``seed + i`` for an int, or the given list."""
    if type(seed) is int:  # the usual case, without the checks below
        return list(range(seed, seed + batch))
    if isinstance(seed, bool):
        raise TypeError(f"seed: expected an int or a list of ints, got {seed!r}")
    if isinstance(seed, int):
        return list(range(seed, seed + batch))
    seeds = list(seed)
    if len(seeds) != batch or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed: expected an int or {batch} ints (one per image), got {seed!r}")
    return seeds


def _draw(members: np.ndarray, available: int, count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` distinct indices (int64) drawn uniformly among the ``available`` True
    entries of the mask ``members``, in the order drawn.

    An image has hundreds of thousands of negatives and keeps a few hundred: a permutation
    of all of them (torchvision's ``randperm(n)[:count]``) costs ~13 ms per image here, so
    where members are common, indices are drawn over the whole row and the first distinct
    members kept (each draw is uniform over the row, so the kept ones are a uniform sample
    of the members); where they are rare, a permutation of the list of members.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    size = members.size
    if 4 * available < size or 2 * count > available:
        return np.flatnonzero(members)[torch.randperm(available, generator=generator)[:count].numpy()]
    kept: dict[int, None] = {}  # insertion-ordered: the order drawn
    while len(kept) < count:
        # Members are at least a quarter of the row: 8x the draws still needed all but
        # never fall short, and when they do the next round draws again.
        draws = torch.randint(size, (8 * (count - len(kept)),), generator=generator).numpy()
        for index in draws[members[draws]].tolist():
            kept.setdefault(index)
            if len(kept) == count:
                break
    return np.fromiter(kept, dtype=np.int64, count=count)


def sample(targets: Targets, config: MatchConfig, seeds: list[int]) -> Targets:
    """Keep ``sample_size`` anchors per image (at most ``positive_fraction`` positive).

    Positives beyond the quota are drawn at random, negatives fill the rest; every
    anchor not drawn becomes ignored (matched_gt -1, zero deltas, background class).
    Modifies ``targets`` in place and returns it.

    Work per image: a few passes over its labels, in numpy on the calling thread (on a
    copy of a GPU row, written back): torch's passes would be OpenMP regions, which wait a
    scheduler quantum for their threads whenever other work holds a core (8 RPN images,
    2 threads on a busy 2-core machine: 176-236 ms, against 52-66 ms on one thread). The
    other outputs are written only at the dropped positives (a few hundred), by index.
    """
    positive_quota = int(config.sample_size * config.positive_fraction)
    for i, row in enumerate(targets.labels):
        generator = torch.Generator().manual_seed(seeds[i])
        labels = row.cpu().numpy()  # a view of a CPU row
        positives = np.flatnonzero(labels == POSITIVE)
        negative = labels == NEGATIVE
        negatives = int(np.count_nonzero(negative))
        num_pos = min(positives.size, positive_quota)
        num_neg = min(negatives, config.sample_size - num_pos)
        dropped = positives[torch.randperm(positives.size, generator=generator)[num_pos:].numpy()]
        kept_negatives = _draw(negative, negatives, num_neg, generator)
        np.putmask(labels, negative, IGNORED)
        labels[kept_negatives] = NEGATIVE
        labels[dropped] = IGNORED
        if not row.is_cpu:
            row.copy_(torch.from_numpy(labels))
        dropped = torch.from_numpy(dropped).to(row.device)
        if config.low_quality != "detectron2":  # detectron2 keeps the argmax box of every anchor
            targets.matched_gt[i, dropped] = -1
        targets.deltas[i, dropped] = 0
        if targets.classes is not None:
            targets.classes[i, dropped] = targets.background_class
    return targets
