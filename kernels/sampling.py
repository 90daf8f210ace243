"""Balanced positive/negative sampling (torchvision/detectron2 RPN: 256 anchors, half positive).

It runs after matching, on the labels, identically for every backend: the random
draws come from a CPU ``torch.Generator`` seeded per image, so a request gives the
same sample whichever backend or batch it runs in. Without a seed, each call draws a
fresh one from torch's global generator (as torchvision's sampler draws from it), so
every batch samples anew while ``torch.manual_seed`` and a DataLoader's per-worker
seeding still make a run repeatable.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from .config import MatchConfig
from .targets import IGNORED, NEGATIVE, POSITIVE, Targets

__all__ = ["fresh_seed", "image_seeds", "sample"]

# What torch.Generator.manual_seed takes.
_SEED_RANGE = range(-(2**63), 2**64)


def fresh_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator`` (default: torch's global CPU generator), one draw."""
    return int(torch.randint(2**62, (), generator=generator, device="cpu"))


def _one_seed(value) -> int | None:
    """``value`` as an int if it is one (Python, numpy or a 0-d integer tensor), else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def image_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int] | None:
    """One seed per image: ``seed + i`` for an int, or the given list; None stays None
    (``sample`` then draws a fresh one)."""
    if seed is None:
        return None
    if type(seed) is int and seed in _SEED_RANGE and seed + batch - 1 in _SEED_RANGE:  # the usual case
        return list(range(seed, seed + batch))
    first = _one_seed(seed)
    if first is not None:
        seeds = list(range(first, first + batch))
    elif isinstance(seed, (torch.Tensor, np.ndarray)) and seed.ndim == 0:  # a float or bool: not iterable
        raise TypeError(f"seed: expected an int or {batch} ints (one per image), got a 0-d {seed.dtype} "
                        f"{type(seed).__name__}")  # fmt: skip
    elif isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, torch.Tensor, np.ndarray)):
        raise TypeError(f"seed: expected an int or {batch} ints (one per image), got {type(seed).__name__}")
    else:
        seeds = [_one_seed(s) for s in seed]
        if len(seeds) != batch or None in seeds:
            raise ValueError(f"seed: expected an int or {batch} ints (one per image), got {seed!r}")
    outside = [s for s in seeds if s not in _SEED_RANGE]
    if outside:
        raise ValueError(f"seed: {outside[0]} is outside what a torch.Generator takes [-2**63, 2**64)")
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
        return np.flatnonzero(members)[torch.randperm(available, generator=generator, device="cpu")[:count].numpy()]
    kept: dict[int, None] = {}  # insertion-ordered: the order drawn
    while len(kept) < count:
        # Members are at least a quarter of the row: 8x the draws still needed all but
        # never fall short, and when they do the next round draws again.
        draws = torch.randint(size, (8 * (count - len(kept)),), generator=generator, device="cpu").numpy()
        for index in draws[members[draws]].tolist():
            kept.setdefault(index)
            if len(kept) == count:
                break
    return np.fromiter(kept, dtype=np.int64, count=count)


def sample(targets: Targets, config: MatchConfig, seeds: list[int] | None) -> Targets:
    """Keep ``sample_size`` anchors per image (at most ``positive_fraction`` positive),
    image i drawing with ``seeds[i]`` (None: from a ``fresh_seed()``).

    Positives beyond the quota are drawn at random, negatives fill the rest; every
    anchor not drawn becomes ignored (matched_gt -1, except in the detectron2 mode, which
    keeps every anchor's argmax box; zero deltas; background class).
    Modifies ``targets`` in place and returns it.

    Work per image: a few passes over its labels, in numpy on the calling thread (on a
    copy of a GPU row, written back): torch's passes would be OpenMP regions, which wait a
    scheduler quantum for their threads whenever other work holds a core (8 RPN images,
    2 threads on a busy 2-core machine: 176-236 ms, against 52-66 ms on one thread). The
    other outputs are written only at the dropped positives (a few hundred), by index.
    """
    positive_quota = int(config.sample_size * config.positive_fraction)
    if seeds is None:
        seeds = image_seeds(fresh_seed(), targets.labels.shape[0])
    for i, row in enumerate(targets.labels):
        generator = torch.Generator().manual_seed(seeds[i])
        labels = row.cpu().numpy()  # a view of a CPU row
        positives = np.flatnonzero(labels == POSITIVE)
        negative = labels == NEGATIVE
        negatives = int(np.count_nonzero(negative))
        num_pos = min(positives.size, positive_quota)
        num_neg = min(negatives, config.sample_size - num_pos)
        dropped = positives[torch.randperm(positives.size, generator=generator, device="cpu")[num_pos:].numpy()]
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
