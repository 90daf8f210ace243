"""A ``tritarget serve`` process for a benchmark: started on a free port, ready (health
SERVING) when returned, and, when it exits before that, a ``RuntimeError`` holding what
it printed (a benchmark that could not start its server said only that it had none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

_KEPT_LINES = 40  # of the server's output, for the error


def start_server(*flags: str, metrics: bool = False) -> tuple[subprocess.Popen, str, str | None]:
    """``tritarget serve --port 0 FLAGS`` (``--metrics-port 0`` with ``metrics``): the
    process, its address and its metrics URL (None without ``metrics``), once every front
    end is SERVING (``serve`` first prints how many it starts, then each says so when
    ready: a load test started at the first one's sent its first connections to the few
    that were ready, and kept them there)."""
    command = [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", *flags]
    if metrics:
        command += ["--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    address, url, printed, ready = until_ready(process.stdout)
    if not ready:
        process.wait()
        raise RuntimeError(f"the server exited ({process.returncode}) before it was ready:\n{''.join(printed)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # its access log must not block it
    return process, address, url


def until_ready(lines: Iterator[str]) -> tuple[str | None, str | None, list[str], bool]:
    """Reads a ``serve`` process's output until every front end it starts is SERVING:
    (address, metrics URL, the last lines read, whether they all were before the end)."""
    address = url = None
    printed: list[str] = []
    front_ends = 1
    for line in lines:
        printed = [*printed[-_KEPT_LINES + 1 :], line]
        if match := re.search(r"serving on (\S+:\d+)", line):
            address = match.group(1)
        if match := re.search(r"metrics on (\S+)", line):
            url = match.group(1)
        if match := re.search(r"(\d+) front-end process\(es\)", line):
            front_ends = int(match.group(1))
        if "health is SERVING" in line and address is not None:
            front_ends -= 1
            if front_ends <= 0:
                return address, url, printed, True
    return address, url, printed, False
