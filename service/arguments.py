"""argparse types the ``tritarget`` commands share: a value out of range is a one-line
usage error (exit 2) that names the flag, before anything runs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["integer", "number"]


def integer(low: int, high: int | None = None, wanted: str | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when None), refused with "must be {wanted}"."""
    wanted = wanted or (f">= {low}" if high is None else f"in {low} .. {high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def number(low: float, above: bool = False) -> Callable[[str], float]:
    """A finite number >= low (> low with ``above``): NaN passes every comparison, and an
    infinite duration or rate never ends."""
    wanted = f"a finite number {'>' if above else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse
