"""The benchmark scripts' shared pieces (benchmarks/recording.py, benchmarks/serving.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import recording  # noqa: E402
import serving  # noqa: E402


def test_a_benchmark_without_matplotlib_skips_its_picture(monkeypatch, capsys):
    """matplotlib is an extra: bench_cpu.py and bench_client_cpu.py died at their plot, after
    minutes of measuring, before writing the rest of their results."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now fails, as when not installed
    assert recording.pyplot() is None
    assert "matplotlib is not installed: no PNG" in capsys.readouterr().out


def test_a_server_that_cannot_start_says_why():
    """The server's own refusal was read and thrown away; the benchmark then failed with
    "'NoneType' object is not iterable" from the client it gave no address."""
    with pytest.raises(RuntimeError, match=r"(?s)the server exited \(2\) before it was ready:.*--max-batch-images"):
        serving.start_server("--max-batch-images", "0")


def test_a_started_server_is_serving_with_its_metrics():
    process, address, metrics = serving.start_server("--backend", "cpu", metrics=True)
    try:
        assert address.startswith("127.0.0.1:") and metrics.startswith("http://") and metrics.endswith("/metrics")
    finally:
        process.terminate()
        process.wait(30)
