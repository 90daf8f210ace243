"""A call whose host memory cannot fit is refused by name, before it allocates (the OOM
killer would end the process instead: a data-loader worker "killed by signal")."""

import os
import subprocess
import sys

import pytest
import torch

from support import triton_runs_here
from tritarget.kernels import anchors as anchors_module
from tritarget.kernels import assign, assign_sparse, host_memory, presets
from tritarget.kernels.host_memory import available_bytes, cgroup_available, check_host_fits
from tritarget.kernels.targets import Targets

RETINANET = presets.get("retinanet_torchvision")
# Where the host's figures cannot be read, nothing is refused: these tests need them.
readable = pytest.mark.skipif(available_bytes() is None, reason="the memory available cannot be read here")

# Explicit anchors of 1M boxes (16 MB) in batches of 16,384 empty images: 336 GiB of dense
# targets, more than any machine the suite runs on (checked below).
MANY_IMAGES = 1 << 14
ANCHOR_COUNT = 1 << 20
TOO_MANY = pytest.mark.skipif(
    (available_bytes() or 0) >= MANY_IMAGES * ANCHOR_COUNT * 21, reason="this machine could hold 336 GiB of targets"
)


def _host_backends() -> list[str]:
    backends = ["reference", "cpu"]
    if triton_runs_here() and not torch.cuda.is_available():
        backends.append("triton")  # the interpreter: its dense targets are on the host too
    return backends


@readable
def test_the_memory_available_is_read_from_the_host():
    available = available_bytes()
    with open("/proc/meminfo") as meminfo:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    assert 0 < available <= (kib["MemTotal"] + kib.get("SwapTotal", 0)) * 1024


def _cgroup(directory, limit: str, usage: int, stat: str, files=("memory.max", "memory.current")) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / files[0]).write_text(limit + "\n")
    (directory / files[1]).write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(stat)


MIB = 1 << 20


def test_a_cgroup_limit_leaves_the_limit_less_what_is_held_beyond_reclaimable_cache(tmp_path):
    """cgroup v2 in a container's namespace ("0::/"): 1 GiB, 900 MiB used of which 200 MiB
    page cache, 50 MiB of it shared memory (tmpfs: not reclaimable)."""
    _cgroup(tmp_path, str(1024 * MIB), 900 * MIB, f"anon {700 * MIB}\nfile {200 * MIB}\nshmem {50 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path)) == (1024 - 900 + 200 - 50) * MIB
    _cgroup(tmp_path, "max", 900 * MIB, f"file {200 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path)) is None  # no limit
    _cgroup(tmp_path, str(1024 * MIB), 900 * MIB, f"anon {700 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path)) is None  # no page-cache figure: nothing refused


def test_the_cgroup_named_for_memory_is_read_v1_v2_or_hybrid(tmp_path):
    """The process's own cgroup, under its path (a cgroup namespace-less host) or, where
    that is not mounted, the mount's root; v1's "no limit" is no limit; a hybrid host's
    unified line without a memory controller falls through to the v1 memory line."""
    _cgroup(tmp_path / "kubepods/pod1", str(512 * MIB), 100 * MIB, f"file {10 * MIB}\nshmem 0\n")
    assert cgroup_available(["0::/kubepods/pod1"], str(tmp_path)) == (512 - 100 + 10) * MIB
    assert cgroup_available(["0::/not/mounted"], str(tmp_path / "kubepods/pod1")) == (512 - 100 + 10) * MIB
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    _cgroup(tmp_path / "memory/docker/a", str(256 * MIB), 64 * MIB, f"total_cache {8 * MIB}\ntotal_shmem {MIB}\n", v1)
    hybrid = ["12:cpu,cpuacct:/docker/a", "4:memory:/docker/a", "0::/docker/a"]
    assert cgroup_available(hybrid, str(tmp_path)) == (256 - 64 + 8 - 1) * MIB
    _cgroup(tmp_path / "memory/docker/a", "9223372036854771712", 64 * MIB, "total_cache 0\n", v1)
    assert cgroup_available(hybrid, str(tmp_path)) is None
    assert cgroup_available(["1:name=systemd:/"], str(tmp_path)) is None


def test_a_parents_limit_counts_where_it_leaves_less(tmp_path):
    """A Slurm job's limit sits on the job's cgroup, above the step's and the task's, which
    have none; a pod's may be lower than its container's. Each level's own usage counts
    against its own limit, and the least left wins."""
    job = tmp_path / "system.slice/slurmstepd.scope/job_7"
    _cgroup(job, str(4096 * MIB), 3000 * MIB, f"file {100 * MIB}\nshmem 0\n")
    _cgroup(job / "step_0", "max", 500 * MIB, "file 0\nshmem 0\n")
    _cgroup(job / "step_0/user/task_0", "max", 400 * MIB, "file 0\nshmem 0\n")
    lines = ["0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"]
    assert cgroup_available(lines, str(tmp_path)) == (4096 - 3000 + 100) * MIB
    _cgroup(job / "step_0", str(1024 * MIB), 500 * MIB, "file 0\nshmem 0\n")  # the step's is lower
    assert cgroup_available(lines, str(tmp_path)) == (1024 - 500) * MIB
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    _cgroup(tmp_path / "memory/kubepods/pod1", str(512 * MIB), 300 * MIB, "total_cache 0\n", v1)
    _cgroup(tmp_path / "memory/kubepods/pod1/c1", str(1024 * MIB), 200 * MIB, "total_cache 0\n", v1)
    assert cgroup_available(["4:memory:/kubepods/pod1/c1"], str(tmp_path)) == (512 - 300) * MIB


def test_the_swap_a_cgroup_may_use_counts_up_to_the_hosts_free_swap(tmp_path):
    """v2 bounds swap alone (memory.swap.max), v1 memory and swap together (memsw)."""
    stat = f"file {100 * MIB}\nshmem 0\n"
    _cgroup(tmp_path, str(1024 * MIB), 900 * MIB, stat)
    ram_left = (1024 - 900 + 100) * MIB
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=8192 * MIB) == ram_left  # swap not accounted
    (tmp_path / "memory.swap.max").write_text(f"{512 * MIB}\n")
    (tmp_path / "memory.swap.current").write_text(f"{112 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=8192 * MIB) == ram_left + 400 * MIB
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=300 * MIB) == ram_left + 300 * MIB
    assert cgroup_available(["0::/"], str(tmp_path)) == ram_left  # the host has no swap
    (tmp_path / "memory.swap.max").write_text("max\n")
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=8192 * MIB) == ram_left + 8192 * MIB
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    group = tmp_path / "memory/docker/a"
    _cgroup(group, str(1024 * MIB), 900 * MIB, "total_cache 0\n", v1)
    (group / "memory.memsw.limit_in_bytes").write_text(f"{1536 * MIB}\n")  # 512 MiB of swap
    (group / "memory.memsw.usage_in_bytes").write_text(f"{1000 * MIB}\n")  # 100 MiB of it used
    assert cgroup_available(["4:memory:/docker/a"], str(tmp_path), swap_free=8192 * MIB) == (124 + 412) * MIB


def test_the_walk_up_the_cgroup_tree_stops_at_the_mount(tmp_path):
    """The parents read are those under the mount: a tighter limit in a directory above it
    (not part of the cgroup hierarchy) does not count."""
    _cgroup(tmp_path, str(64 * MIB), 0, "file 0\nshmem 0\n")  # above the mount
    mount = tmp_path / "cgroup"
    _cgroup(mount / "pod1", str(512 * MIB), 100 * MIB, "file 0\nshmem 0\n")
    assert cgroup_available(["0::/pod1"], str(mount)) == (512 - 100) * MIB


def test_a_cgroup_over_its_limit_leaves_nothing_not_a_negative_figure(tmp_path):
    """Usage can exceed the limit (a limit lowered under a running job); what is left is
    then none, and the swap it may still use is added to none, not to a negative figure.
    Swap used beyond the swap limit likewise leaves no swap."""
    _cgroup(tmp_path, str(1024 * MIB), 1100 * MIB, "file 0\nshmem 0\n")
    assert cgroup_available(["0::/"], str(tmp_path)) == 0
    (tmp_path / "memory.swap.max").write_text(f"{512 * MIB}\n")
    (tmp_path / "memory.swap.current").write_text(f"{112 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=8192 * MIB) == 400 * MIB
    _cgroup(tmp_path, str(1024 * MIB), 900 * MIB, "file 0\nshmem 0\n")
    (tmp_path / "memory.swap.max").write_text(f"{100 * MIB}\n")
    (tmp_path / "memory.swap.current").write_text(f"{150 * MIB}\n")
    assert cgroup_available(["0::/"], str(tmp_path), swap_free=8192 * MIB) == 124 * MIB


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads Linux's /proc/meminfo")
def test_the_hosts_figures_are_read_in_kib():
    """/proc/meminfo's "kB" are KiB: MemAvailable and SwapFree come back x 1024 bytes."""
    available, swap = host_memory._host_meminfo()
    with open("/proc/meminfo") as meminfo:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    assert abs(available - kib["MemAvailable"] * 1024) < 0.005 * kib["MemAvailable"] * 1024
    assert abs(swap - kib["SwapFree"] * 1024) <= 0.005 * kib["SwapFree"] * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/cgroup"), reason="reads Linux's /proc/self/cgroup")
def test_the_host_and_the_cgroup_figures_combine_to_the_least(monkeypatch):
    """available_bytes: the host's MemAvailable plus free swap, or the cgroups' figure where
    lower; either alone where the other cannot be read. The cgroups' swap is bounded by the
    host's free swap (not its MemAvailable)."""
    gib = 1 << 30
    seen, group = [], {"left": None}

    def cgroups(lines, swap_free=0):
        seen.append(swap_free)
        return group["left"]

    monkeypatch.setattr(host_memory, "cgroup_available", cgroups)
    monkeypatch.setattr(host_memory, "_host_meminfo", lambda: (3 * gib, 1 * gib))
    assert available_bytes() == 4 * gib  # no cgroup limit
    assert seen == [1 * gib]
    group["left"] = 2 * gib
    assert available_bytes() == 2 * gib
    group["left"] = 8 * gib
    assert available_bytes() == 4 * gib
    monkeypatch.setattr(host_memory, "_host_meminfo", lambda: None)
    assert available_bytes() == 8 * gib
    assert seen[-1] == 0


def test_only_large_sizes_are_checked_and_an_exact_fit_is_not_refused(monkeypatch):
    """Below 256 MiB nothing is compared (nor /proc read); from it, a size is refused only
    when it is more than what is available, not when it is exactly that."""
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1 * MIB)
    check_host_fits(256 * MIB - 1, "a small thing", "never said")
    with pytest.raises(MemoryError, match="^a large thing take"):
        check_host_fits(256 * MIB, "a large thing", "make it smaller")
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 512 * MIB)
    check_host_fits(512 * MIB, "an exact fit", "never said")
    with pytest.raises(MemoryError):
        check_host_fits(512 * MIB + 1, "one byte more", "make it smaller")


@readable
def test_a_size_beyond_the_host_is_refused_with_both_figures():
    with pytest.raises(MemoryError, match=r"^the thing take ~4,194,304.0 GiB of host memory, and [\d,.]+ GiB is "
                                          r"available: make it smaller$"):  # fmt: skip
        check_host_fits(1 << 52, "the thing", "make it smaller")
    check_host_fits(1 << 20, "a small thing", "never said")


@readable
@TOO_MANY
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


@readable
@TOO_MANY
def test_sparse_targets_of_the_same_batch_are_not_refused():
    explicit = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(ANCHOR_COUNT, 1)
    sparse = assign_sparse(torch.zeros(0, 4), [0] * MANY_IMAGES, (800, 800), RETINANET, anchors=explicit, backend="cpu")
    assert sparse.batch_size == MANY_IMAGES and sparse.positive_anchors.numel() == 0
    with pytest.raises(MemoryError, match=r"^dense targets: 16,384 images x 1,048,576 anchors .*keep the sparse form"):
        sparse.to_dense()


@readable
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


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's /proc/self/status")
@pytest.mark.parametrize(
    "layout",
    [
        ("retinanet_torchvision", (6000, 6000)),  # 9 shapes a cell, 5 levels
        ("yolov5", (12000, 12000)),  # shapes first
        ("d2l_one_shape", (24000, 24000)),  # one shape a cell, scaled to pixels: centers as large as anchors
    ],
    ids=lambda layout: layout[0],
)
def test_building_anchors_peaks_within_the_bytes_counted_per_anchor(layout):
    # A fresh process; its resident high-water mark reset (clear_refs) before the build.
    name, canvas = layout
    script = f"""
import dataclasses, torch
from tritarget.kernels import presets
from tritarget.kernels.anchors import resolve_grid
from tritarget.kernels.config import AnchorLevel

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

if {name!r} == "d2l_one_shape":
    d2l = presets.get("d2l_multibox").anchors
    level = AnchorLevel(stride=8, sizes=(0.2,), aspect_ratios=(1.0,), feature_size=(3000, 3000))
    config = dataclasses.replace(d2l, levels=(level,))
else:
    config = presets.get({name!r}).anchors
grid = resolve_grid(config, {canvas})
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
except OSError:
    raise SystemExit("clear_refs")
before = kib("VmRSS")
grid.materialize()
print((kib("VmHWM") - before) * 1024 / grid.num_anchors)
"""
    measured = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if measured.returncode == 1 and measured.stderr.strip() == "clear_refs":
        pytest.skip("this kernel does not let a process reset its resident high-water mark")
    assert measured.returncode == 0, measured.stderr
    assert 30 < float(measured.stdout) <= anchors_module._BUILD_BYTES_PER_ANCHOR
