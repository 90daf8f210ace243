"""argparse types the ``tritarget`` commands share: a value out of range is a one-line
usage error (exit 2) that names the flag, before anything runs; and their parser."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

__all__ = ["Parser", "batch_seed", "integer", "number", "target_address", "timeout_seconds"]


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose help on stdout is written or fails aloud:
    argparse drops a write's OSError, so with stdout unbuffered (PYTHONUNBUFFERED) ``--help >
    /dev/full`` exited 0 having written nothing. The error now reaches the command's
    ``exit_status`` (one line, status 1; a reader gone, 141). Usage errors on stderr keep
    argparse's way: with stderr gone there is no one left to tell."""

    def _print_message(self, message: str, file=None) -> None:
        if message and file is not None and file is sys.stdout:
            file.write(message)
        else:
            super()._print_message(message, file)


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


def number(low: float, above: bool = False, high: float = math.inf) -> Callable[[str], float]:
    """A finite number >= low (> low with ``above``) and <= high: NaN passes every
    comparison, and an infinite duration or rate never ends."""
    wanted = f"a finite number {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


# Seconds a call may wait: gRPC's deadline overflows past ~1e9 s from now (1e10 failed at
# once, DEADLINE_EXCEEDED) and a thread's join past ~9e9 (OverflowError).
timeout_seconds = number(0, above=True, high=1e6)
# A seed for the demo and load-test batches (torch.Generator), with room for the index
# each request adds.
batch_seed = integer(0, 2**62, "an integer in 0 .. 2**62")


def target_address(text: str) -> str:
    """A server address the client can dial (``tritarget.clients.client.check_target``)."""
    from tritarget.clients.client import check_target  # grpc: loaded only when a command parses one

    try:
        check_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("target: ")) from None
    return text
