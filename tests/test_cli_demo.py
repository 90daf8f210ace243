"""`tritarget demo` prints a per-image summary of real targets."""

import os
import re
import subprocess
import sys

import pytest

from support import run_into_a_closed_pipe, without_stdout


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


def test_a_demo_batch_of_exactly_a_requests_bound_is_accepted():
    """The bound is images x anchors <= the service's limit: a batch that reaches it exactly
    is one the server takes, one image more is refused (one anchor per 8 x 8 cell on an
    8192 x 4096 canvas: 524,288 anchors, 64 images = 2**25 rows)."""
    import dataclasses

    from tritarget.kernels import AnchorConfig, AnchorLevel, presets
    from tritarget.service.cli import _check_demo_batch

    level = AnchorLevel(stride=8, sizes=(32.0,), aspect_ratios=(1.0,))
    anchors = AnchorConfig(layout="torchvision", levels=(level,))
    config = dataclasses.replace(presets.get("retinanet_torchvision"), anchors=anchors)
    assert _check_demo_batch(64, config, (8192, 4096)) == 524_288
    with pytest.raises(ValueError, match="65 images x 524,288 anchors is over 33,554,432"):
        _check_demo_batch(65, config, (8192, 4096))


def test_demo_names_a_cpu_kernel_that_cannot_be_built_in_one_line(monkeypatch, capsys):
    """No C compiler for the cpu backend's kernel (a RuntimeError): one line and exit 2, not a
    traceback."""
    from tritarget.kernels import cpu, cpu_build
    from tritarget.service.cli import main

    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    cpu._library.cache_clear()
    cpu_build.load_library.cache_clear()
    try:
        assert main(["demo", "--backend", "cpu", "--batch", "1", "--canvas", "64", "64"]) == 2
    finally:
        cpu._library.cache_clear()
        cpu_build.load_library.cache_clear()
    assert capsys.readouterr().err.startswith("tritarget demo: the CPU backend compiles a small C kernel on first use")


@pytest.mark.parametrize("canvas", [(1, 1), (1, 9), (2, 2), (2, 5), (3, 3), (800, 1344)])
def test_the_synthetic_boxes_are_valid_on_any_canvas(canvas, capsys):
    """On a canvas of 1 or 2 pixels a side the boxes' sides were clamped to 2 .. 0: no area,
    and `tritarget demo --canvas 1 1` failed on its own boxes, naming a library argument."""
    from tritarget.kernels.workload import coco_like_batch
    from tritarget.service.cli import main

    boxes, counts, _ = coco_like_batch(8, seed=1, canvas=canvas)
    height, width = canvas
    assert sum(counts) == boxes.shape[0] > 0
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert main(["demo", "--canvas", *map(str, canvas), "--batch", "2", "--backend", "cpu"]) == 0
    assert "assigned in" in capsys.readouterr().out


def test_the_synthetic_counts_average_about_7_with_empty_images_and_a_cap_of_100():
    """The module docstring's counts: log-normal, mean ~7 (floored: COCO's 7.3 less the
    fractions), an empty image now and then, a long tail cut at 100 boxes."""
    import torch

    from tritarget.kernels.workload import coco_like_counts

    counts = torch.tensor(coco_like_counts(20_000, torch.Generator().manual_seed(0)), dtype=torch.float64)
    assert 6.5 < float(counts.mean()) < 7.1
    assert 0.03 < float((counts == 0).double().mean()) < 0.08
    assert float(counts.max()) == 100.0
    assert (counts == counts.floor()).all()


def test_the_synthetic_boxes_mix_sizes_shapes_and_classes_as_documented():
    """On the COCO canvas: sqrt(area) from 8 to 640 pixels, ~43% / 25% / 32% below 53, below
    160 and above; h / w = exp(0.5 N(0, 1)); classes 1..80; a fixed count per image when
    given, none included."""

    from tritarget.kernels.workload import COCO_CANVAS, coco_like_batch

    boxes, counts, classes = coco_like_batch(200, seed=0)
    assert sum(counts) == boxes.shape[0] == classes.shape[0]
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = (width * height).sqrt()
    assert 8.0 <= float(side.min()) and float(side.max()) <= 640.0
    for share, want in [((side < 53).double().mean(), 0.43), (((side >= 53) & (side < 160)).double().mean(), 0.25),
                        ((side >= 160).double().mean(), 0.32)]:  # fmt: skip
        assert abs(float(share) - want) < 0.05
    assert 0.4 < float((height / width).log().std()) < 0.6
    assert int(classes.min()) == 1 and int(classes.max()) == 80
    assert float(boxes[:, 0::2].max()) > COCO_CANVAS[0]  # x spans the 1344-pixel width
    fixed, fixed_counts, _ = coco_like_batch(3, seed=0, boxes_per_image=5)
    assert fixed_counts == [5, 5, 5] and fixed.shape == (15, 4)
    empty, empty_counts, empty_classes = coco_like_batch(3, seed=0, boxes_per_image=0)
    assert empty_counts == [0, 0, 0] and empty.shape == (0, 4) and empty_classes.shape == (0,)
    # Each side is fitted to its own extent: a strip canvas has wide (or tall) boxes.
    for canvas, long_side, short_side in [((20, 1344), 0, 1), ((1344, 20), 1, 0)]:
        strip, _, _ = coco_like_batch(20, seed=0, canvas=canvas)
        sides = strip[:, 2:] - strip[:, :2]  # (w, h)
        assert float(sides[:, long_side].max()) > 100.0 and float(sides[:, short_side].max()) <= 19.0


def test_the_synthetic_batch_is_fixed_by_its_seed_and_may_be_empty():
    """Deterministic for a seed (the benchmarks and load tests replay a workload by its
    seed), another seed another batch; a batch of no images is empty, not an error."""
    import torch

    from tritarget.kernels.workload import coco_like_batch

    first, again, other = coco_like_batch(4, seed=1), coco_like_batch(4, seed=1), coco_like_batch(4, seed=2)
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2])
    assert first[1] != other[1] or not torch.equal(first[0], other[0])
    boxes, counts, classes = coco_like_batch(0, seed=1)
    assert boxes.shape == (0, 4) and counts == [] and classes.shape == (0,)


def test_the_synthetic_box_sizes_and_shapes_fill_their_documented_ranges():
    """sqrt(area) is log-uniform over [8, 640] canvas pixels: 200 images' ~1,300 boxes come
    within a few percent of each end; log(h / w) has the documented spread of 0.5 (a
    mutation review: a range cut to 600, or a spread of 0.4, passed the looser bounds)."""
    from tritarget.kernels.workload import coco_like_batch

    boxes, _, _ = coco_like_batch(200, seed=0)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = (width * height).sqrt()
    assert float(side.min()) < 8.5 and float(side.max()) > 620.0
    assert 0.46 < float((height / width).log().std()) < 0.56


def test_a_canvas_is_fixed_only_when_every_level_fixes_its_feature_map():
    """One level with a feature_size among levels without one trains on COCO's canvas
    (fixed_canvas would refuse such a config)."""
    from tritarget.kernels import AnchorConfig, AnchorLevel, TargetConfig
    from tritarget.kernels.workload import COCO_CANVAS, default_canvas

    levels = (AnchorLevel(stride=8, sizes=(32.0,), aspect_ratios=(1.0,), feature_size=(100, 168)),
              AnchorLevel(stride=16, sizes=(64.0,), aspect_ratios=(1.0,)))  # fmt: skip
    assert default_canvas(TargetConfig(anchors=AnchorConfig(layout="torchvision", levels=levels))) == COCO_CANVAS


@pytest.mark.parametrize(
    ("preset", "canvas", "anchors"),
    [("ssd300_torchvision", (300, 300), 8_732), ("d2l_multibox", (256, 256), 5_444), ("yolov5", (640, 640), 25_200),
     ("retinanet_mmdet", (800, 1344), 201_600)],
)  # fmt: skip
def test_demo_and_load_tests_use_the_canvas_a_preset_trains_on(preset, canvas, anchors, capsys):
    """SSD300's default boxes were stretched over 800 x 1344 (a canvas SSD never sees, its
    feature maps made for 300 x 300) and YOLOv5 ran on it instead of its 640 x 640."""
    from tritarget.clients.loadtest import Workload
    from tritarget.kernels import presets
    from tritarget.kernels.workload import default_canvas
    from tritarget.service.cli import main

    assert default_canvas(presets.get(preset)) == canvas
    assert Workload(preset=preset).canvas == canvas
    assert main(["demo", "--preset", preset, "--batch", "1", "--backend", "cpu"]) == 0
    assert f"{anchors:,} anchors on a {canvas[0]}x{canvas[1]} canvas" in capsys.readouterr().out


def test_a_fixed_canvas_needs_every_levels_feature_map():
    from tritarget.kernels import AnchorConfig, AnchorLevel
    from tritarget.kernels.anchors import fixed_canvas

    config = AnchorConfig(layout="torchvision", levels=(AnchorLevel(stride=8, sizes=(32.0,), aspect_ratios=(1.0,)),))
    with pytest.raises(ValueError, match="every level needs a feature_size"):
        fixed_canvas(config)


def test_a_fixed_canvas_is_the_largest_each_feature_map_comes_from():
    """Per side: 304 x 504 is the largest canvas whose ceil(canvas / stride) gives both maps;
    one level without a feature map is refused like all of them."""
    from tritarget.kernels import AnchorConfig, AnchorLevel
    from tritarget.kernels.anchors import feature_map_size, fixed_canvas

    levels = (AnchorLevel(stride=8, sizes=(0.1, 0.2), aspect_ratios=(2.0,), feature_size=(38, 63)),
              AnchorLevel(stride=32, sizes=(0.2, 0.4), aspect_ratios=(2.0,), feature_size=(10, 16)))  # fmt: skip
    canvas = fixed_canvas(AnchorConfig(layout="ssd", levels=levels))
    assert canvas == (304, 504)
    assert [feature_map_size(canvas, lv) for lv in levels] == [(38, 63), (10, 16)]
    mixed = (AnchorLevel(stride=8, sizes=(32.0,), aspect_ratios=(1.0,), feature_size=(8, 8)),
             AnchorLevel(stride=16, sizes=(64.0,), aspect_ratios=(1.0,)))  # fmt: skip
    with pytest.raises(ValueError, match="every level needs a feature_size"):
        fixed_canvas(AnchorConfig(layout="torchvision", levels=mixed))


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_read_by_a_reader_that_stops_ends_quietly(buffered):
    """`tritarget demo | head -1`: the reader closes the pipe; the command stops with 141
    (128 + SIGPIPE, as a shell reports it) and no traceback, as Unix tools do. Buffered
    (Python's default), the closed pipe showed only in the flush at exit: status 120 and
    "Exception ignored ... BrokenPipeError"."""
    result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "demo", "--backend", "reference", "--batch", "1"],
                                    buffered)  # fmt: skip
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


# A command that prints a line into a pipe whose reader has gone (buffered: the line is
# still in Python's buffer when the command ends), then ends as ``sys.argv[1]`` says.
_ENDING = """
import sys
import tritarget.service.cli as cli

def demo(args):
    print("a line nobody reads")
    if sys.argv[1] == "interrupted":
        raise KeyboardInterrupt
    if sys.argv[1] == "bug":
        raise RuntimeError("a bug's traceback")
    if sys.argv[1] == "usage":
        raise SystemExit(2)  # as argparse ends a usage error
    if sys.argv[1] == "disk full":
        raise OSError(28, "No space left on device", "report.json")  # a file of its own not written
    return int(sys.argv[1])

cli._demo = demo  # `tritarget demo` runs it
sys.exit(cli.main(["demo"]))
"""


@pytest.mark.parametrize(("ending", "status", "said"), [("0", 141, ""), ("1", 1, ""),
                                                       ("interrupted", 130, "tritarget: interrupted\n")])  # fmt: skip
def test_a_reader_gone_keeps_a_failure_s_status_and_a_success_becomes_141(ending, status, said):
    """Stdout is flushed in the entry point: a success whose reader went is 141, a failure
    or Ctrl-C keeps its status and message (a flush in a `finally` made every one 141)."""
    result = run_into_a_closed_pipe(["-c", _ENDING, ending], buffered=True)
    assert (result.returncode, result.stderr) == (status, said)


def test_a_reader_gone_keeps_an_exit_status_that_argparse_set():
    """A usage error's exit (SystemExit 2) with stdout's reader gone keeps its status: only
    an exit that succeeded becomes 141."""
    result = run_into_a_closed_pipe(["-c", _ENDING, "usage"], buffered=True)
    assert (result.returncode, result.stderr) == (2, "")


def test_a_reader_gone_does_not_hide_another_files_error():
    """A file the command could not write (its own OSError) is named on stderr, status 1,
    when stdout's reader has gone too: only stdout's own failure goes unsaid there."""
    result = run_into_a_closed_pipe(["-c", _ENDING, "disk full"], buffered=True)
    assert (result.returncode, result.stderr) == (1, "tritarget: report.json: No space left on device\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("buffered", [True, False])
def test_stdout_on_a_full_disk_is_one_line_and_status_1(buffered):
    """`tritarget request > out` with the disk full: a traceback (print's OSError), or, where
    the line waited in Python's buffer, "Exception ignored" at exit and status 120. A
    failure the command returns keeps its own status."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    for ending, status in (("0", 1), ("3", 3 if buffered else 1)):  # unbuffered, the print fails first
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, "-c", _ENDING, ending], stdout=full, stderr=subprocess.PIPE,
                                    text=True, env=env, timeout=120)  # fmt: skip
        # Buffered, the flush tells stdout's error from another; unbuffered, print raised it.
        said = "tritarget: cannot write standard output: " if buffered else "tritarget: "
        assert (result.returncode, result.stderr) == (status, f"{said}No space left on device\n"), result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["--help"], ["anchors", "fit", "--help"]])
def test_help_on_a_full_disk_is_one_line_and_status_1(argv, buffered):
    """`tritarget --help > /dev/full`: argparse drops its writes' errors, and with stdout
    unbuffered (every write at once) that was all of them: status 0, nothing written."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "tritarget.service.cli", *argv], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 1 and result.stderr.endswith(": No space left on device\n"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("buffered", [True, False])
def test_help_whose_reader_has_gone_ends_141_quietly(buffered):
    """`tritarget --help | head -0`: a reader gone is a shell's 141, with nothing said,
    buffered or not (unbuffered, argparse dropped the BrokenPipeError: status 0)."""
    result = run_into_a_closed_pipe(["-m", "tritarget.service.cli", "--help"], buffered=buffered)
    assert (result.returncode, result.stderr) == (141, "")


def test_a_bug_s_traceback_is_shown_when_stdout_s_reader_has_gone():
    """An unexpected error's traceback is not hidden behind the closed pipe."""
    result = run_into_a_closed_pipe(["-c", _ENDING, "bug"], buffered=True)
    assert "RuntimeError: a bug's traceback" in result.stderr


@pytest.mark.parametrize(("argv", "status"), [(["--help"], 0), (["no-such-command"], 2)])
def test_help_and_usage_errors_with_stdout_closed(argv, status):
    """`tritarget --help >&-`: no stdout at all (Python's sys.stdout is None); the flush
    in a `finally` raised AttributeError (status 1)."""
    command = without_stdout(["-m", "tritarget.service.cli", *argv])
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr


def test_version_names_tritarget_and_its_stack(capsys, monkeypatch):
    """``tritarget --version``: one line a bug report can quote; a package not installed
    (triton on a CPU machine) says so."""
    import importlib.metadata
    import platform

    import google.protobuf
    import grpc
    import torch

    from tritarget.service import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    try:  # the GPU check runs the tests from the source tree, never installed there
        version = importlib.metadata.version("tritarget")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    triton, protobuf = importlib.metadata.version("triton"), google.protobuf.__version__
    stack = f"torch {torch.__version__}, triton {triton}, grpcio {grpc.__version__}, protobuf {protobuf}"
    assert capsys.readouterr().out == f"tritarget {version} ({stack}, Python {platform.python_version()})\n"

    installed = importlib.metadata.version

    def without_triton(package: str) -> str:
        if package == "triton":
            raise importlib.metadata.PackageNotFoundError(package)
        return installed(package)

    monkeypatch.setattr(importlib.metadata, "version", without_triton)
    assert f"triton not installed, grpcio {grpc.__version__}" in cli.versions()
