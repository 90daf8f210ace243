"""`tritarget demo` prints a per-image summary of real targets."""

import re
import subprocess
import sys


def test_demo_prints_a_summary():
    result = subprocess.run(
        [sys.executable, "-m", "tritarget.service.cli", "demo", "--backend", "reference", "--batch", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "201,600 anchors on a 800x1344 canvas" in out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", out, flags=re.M)
    assert len(rows) == 3
    for _, boxes, pos, neg, ign in rows:
        total = sum(int(v.replace(",", "")) for v in (pos, neg, ign))
        assert total == 201_600
        assert (int(pos.replace(",", "")) > 0) == (int(boxes) > 0)
    assert re.search(r"assigned in [\d.]+ ms", out)


def test_demo_rejects_unknown_preset():
    result = subprocess.run(
        [sys.executable, "-m", "tritarget.service.cli", "demo", "--preset", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_demo_refuses_a_batch_over_a_requests_bound_at_once(capsys):
    """20000 x 20000 (75 M anchors per image) ran for minutes in 9 GB; --batch 100000 failed
    allocating 80 GB."""
    from tritarget.service.cli import main

    assert main(["demo", "--canvas", "20000", "20000"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tritarget demo: 4 images x 74,931,687 anchors is over 33,554,432 (a request's bound in the service); "
        "use a smaller --batch or --canvas"
    )
