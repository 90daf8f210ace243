"""A call whose host memory cannot fit is refused by name, before it allocates (the OOM
killer would end the process instead: a data-loader worker "killed by signal")."""

import os
import subprocess
import sys

import pytest
import torch

from support import triton_runs_here
from tritarget.kernels import anchors as anchors_module
from tritarget.kernels import assign, assign_sparse, presets
from tritarget.kernels.host_memory import _cgroup_left, available_bytes, check_host_fits
from tritarget.kernels.targets import Targets

RETINANET = presets.get("retinanet_torchvision")
linux_only = pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo")

# Explicit anchors of 1M boxes (16 MB) in batches of 16,384 empty images: 336 GiB of dense
# targets, more than any machine the suite runs on.
MANY_IMAGES = 1 << 14
ANCHOR_COUNT = 1 << 20


def _host_backends() -> list[str]:
    backends = ["reference", "cpu"]
    if triton_runs_here() and not torch.cuda.is_available():
        backends.append("triton")  # the interpreter: its dense targets are on the host too
    return backends


@linux_only
def test_the_memory_available_is_read_from_the_host():
    available = available_bytes()
    with open("/proc/meminfo") as meminfo:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    assert 0 < available <= (kib["MemTotal"] + kib.get("SwapTotal", 0)) * 1024


def test_a_cgroup_limit_leaves_the_limit_less_what_is_held_beyond_page_cache(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text(f"{900 << 20}\n")
    (tmp_path / "memory.stat").write_text(f"anon {700 << 20}\nfile {200 << 20}\n")
    assert _cgroup_left(str(tmp_path), "memory.max", "memory.current", "file") == (1024 - 900 + 200) << 20
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_left(str(tmp_path), "memory.max", "memory.current", "file") is None
    (tmp_path / "memory.max").write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert _cgroup_left(str(tmp_path), "memory.max", "memory.current", "file") is None
    assert _cgroup_left(str(tmp_path / "absent"), "memory.max", "memory.current", "file") is None


@linux_only
def test_a_size_beyond_the_host_is_refused_with_both_figures():
    with pytest.raises(MemoryError, match=r"^the thing take ~4,194,304.0 GiB of host memory, and [\d,.]+ GiB is "
                                          r"available: make it smaller$"):  # fmt: skip
        check_host_fits(1 << 52, "the thing", "make it smaller")
    check_host_fits(1 << 20, "a small thing", "never said")


@linux_only
@pytest.mark.parametrize("backend", _host_backends())
def test_dense_targets_beyond_the_host_are_refused_before_they_are_built(backend):
    explicit = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(ANCHOR_COUNT, 1)
    boxes, counts = torch.zeros(0, 4), torch.zeros(MANY_IMAGES, dtype=torch.int64)
    message = r"^dense targets: 16,384 images x 1,048,576 anchors take ~336.0 GiB of host memory, .*assign_sparse"
    with pytest.raises(MemoryError, match=message):
        assign(boxes, counts, (800, 800), RETINANET, anchors=explicit, backend=backend)
    # Sampling densifies first: the same refusal, with classes (25 bytes an anchor).
    sampled = presets.get("fasterrcnn_rpn_torchvision")
    with pytest.raises(MemoryError, match=r"^dense targets: 16,384 images x 1,048,576 anchors take ~400.0 GiB"):
        no_classes = torch.zeros(0, dtype=torch.int64)
        assign_sparse(boxes, counts, (800, 800), sampled, anchors=explicit, gt_classes=no_classes, backend=backend)


@linux_only
def test_sparse_targets_of_the_same_batch_are_not_refused():
    explicit = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(ANCHOR_COUNT, 1)
    sparse = assign_sparse(torch.zeros(0, 4), [0] * MANY_IMAGES, (800, 800), RETINANET, anchors=explicit, backend="cpu")
    assert sparse.batch_size == MANY_IMAGES and sparse.positive_anchors.numel() == 0
    with pytest.raises(MemoryError, match=r"^dense targets: 16,384 images x 1,048,576 anchors .*keep the sparse form"):
        sparse.to_dense()


@linux_only
@pytest.mark.parametrize("call", ["assign_sparse", "generate_anchors"])
def test_anchors_beyond_the_host_are_refused_by_canvas(call):
    canvas = (100_000, 100_000)  # 1.87 billion RetinaNet anchors: a canvas given in the wrong unit
    count = anchors_module.resolve_grid(RETINANET.anchors, canvas).num_anchors
    if anchors_module._BUILD_BYTES_PER_ANCHOR * count <= available_bytes():
        pytest.skip(f"this machine could build the {count:,} anchors")
    # In a process whose address space is capped at 16 GiB: were the anchors built, the
    # allocator would fail there instead of the OOM killer ending the suite's worker.
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
import torch
from tritarget.kernels import assign_sparse, generate_anchors, presets
config = presets.get("retinanet_torchvision")
try:
    if {call!r} == "generate_anchors":
        generate_anchors(config.anchors, {canvas})
    else:
        assign_sparse(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), [1], {canvas}, config, backend="cpu")
except Exception as error:
    print(type(error).__name__, error)
"""
    refusal = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert refusal.startswith(f"MemoryError anchors: the {count:,} anchors of the 100000 x 100000 canvas take ~")


def test_dense_bytes_per_anchor_are_what_assign_allocates():
    boxes, counts = torch.tensor([[10.0, 10.0, 90.0, 70.0]] * 2), [1, 1]
    classes = torch.tensor([3, 4])
    for with_classes in (False, True):
        for max_iou in (False, True):
            targets = assign(boxes, counts, (128, 128), RETINANET, gt_classes=classes if with_classes else None,
                             return_max_iou=max_iou, backend="cpu")  # fmt: skip
            tensors = [targets.labels, targets.matched_gt, targets.deltas, targets.classes, targets.max_iou]
            held = sum(t.nbytes for t in tensors if t is not None)
            per_anchor = Targets.bytes_per_anchor(with_classes, max_iou)
            assert held == per_anchor * targets.batch_size * targets.num_anchors


@linux_only
def test_building_anchors_peaks_within_the_bytes_counted_per_anchor():
    # A fresh process; its resident high-water mark reset (clear_refs) before the build.
    script = """
import torch
from tritarget.kernels import presets
from tritarget.kernels.anchors import resolve_grid

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

grid = resolve_grid(presets.get("retinanet_torchvision").anchors, (6000, 6000))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = kib("VmRSS")
grid.materialize()
print((kib("VmHWM") - before) * 1024 / grid.num_anchors)
"""
    peak = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 30 < peak <= anchors_module._BUILD_BYTES_PER_ANCHOR
