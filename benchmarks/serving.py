"""A ``tritarget serve`` process for a benchmark: started on a free port, ready (health
SERVING) when returned, and, when it exits before that, a ``RuntimeError`` holding what
it printed (a benchmark that could not start its server said only that it had none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

_KEPT_LINES = 40  # of the server's output, for the error


def start_server(*flags: str, metrics: bool = False) -> tuple[subprocess.Popen, str, str | None]:
    """``tritarget serve --port 0 FLAGS`` (``--metrics-port 0`` with ``metrics``): the
    process, its address and its metrics URL (None without ``metrics``)."""
    command = [sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", *flags]
    if metrics:
        command += ["--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    address = url = None
    printed: list[str] = []
    for line in process.stdout:
        printed = [*printed[-_KEPT_LINES + 1 :], line]
        if match := re.search(r"serving on (\S+:\d+)", line):
            address = match.group(1)
        if match := re.search(r"metrics on (\S+)", line):
            url = match.group(1)
        if "health is SERVING" in line and address is not None:
            break
    else:
        process.wait()
        raise RuntimeError(f"the server exited ({process.returncode}) before it was ready:\n{''.join(printed)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # its access log must not block it
    return process, address, url
