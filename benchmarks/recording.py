"""What the benchmarks record: the machine they ran on, and their result files.

Results compare only between machines of one CPU model (this project's 2-core VMs were an
Intel Xeon with AVX-512 one day and an AMD EPYC without it the next, both "x86_64"), so
every script names the model. Result files are
written whole or not at all (``write_atomically``): gpu_check.sh stops the GPU scripts
with SIGINT at its timeouts, and a file rewritten in place would be left truncated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from tritarget.service.output import write_atomically


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line() -> str:
    """Host name, cores and CPU model, in one line."""
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu_model()}"


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda temporary: Path(temporary).write_text(text))


def _git(*arguments: str) -> str | None:
    try:
        run = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), *arguments], capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def recorded() -> dict[str, str | None]:
    """When a result was written (UTC) and from which commit of this repository
    (``-dirty`` with uncommitted changes outside ``benchmarks/results``, which the run
    itself writes; None outside a git checkout, as on a device machine's copy), so that
    a README figure can be traced to its run."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"):
        commit += "-dirty"
    return {"utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": commit}


def write_json(path: str | os.PathLike, value: object) -> None:
    """``value`` as JSON; a dict (every benchmark's record) leads with ``recorded()``."""
    if isinstance(value, dict):
        value = {"recorded": recorded(), **value}
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """``rows`` under a header of ``fieldnames`` (the first row's keys by default)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def save_figure(figure, path: str | os.PathLike, **options) -> None:
    """``figure.savefig`` into a temporary file with ``path``'s extension, then renamed."""
    write_atomically(path, lambda temporary: figure.savefig(temporary, **options))


def pyplot():
    """matplotlib.pyplot on a file backend, or None (with a note) when matplotlib is not
    installed: it is an extra (``plot``, ``dev``), and a benchmark's numbers matter more
    than its picture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    return plt
