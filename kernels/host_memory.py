"""Refusing, by name, a call whose host memory cannot fit.

A canvas in the wrong unit (100,000 pixels a side: 1.9 billion RetinaNet anchors) or a
dense batch far too large asks for tens of gigabytes of host memory. Linux does not fail
such an allocation: it lets the process touch its pages until the OOM killer ends it,
which in a data-loader worker reads as "worker killed by signal", with nothing naming
the call. Before the few allocations that can be that large (the anchors of a large
canvas, dense targets on the host), the size is compared with what the host and the
process's cgroup can still give, and a ``MemoryError`` names both.

Only sizes of ``_CHECKED_FROM`` and above are checked: reading ``/proc`` costs tens of
microseconds, a tenth of a one-image call's budget, and a smaller allocation is not what
kills a process. Where the figures cannot be read (not Linux), nothing is refused.
"""

from __future__ import annotations

__all__ = ["available_bytes", "cgroup_available", "check_host_fits"]

_CHECKED_FROM = 256 << 20

_GIB = float(1 << 30)


def check_host_fits(needed: int, what: str, advice: str) -> None:
    """Raise ``MemoryError`` if ``needed`` bytes are more than the host can still give this
    process (``available_bytes``): "``what`` take(s) ~N GiB ..., and M GiB is available:
    ``advice``"."""
    if needed < _CHECKED_FROM:
        return
    available = available_bytes()
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} take ~{needed / _GIB:,.1f} GiB of host memory, and {available / _GIB:,.1f} GiB is "
            f"available: {advice}"
        )


def available_bytes() -> int | None:
    """The memory this process can still allocate without being killed, in bytes: the
    host's (``MemAvailable`` and free swap) or, where lower, what its memory cgroup's limit
    leaves (the limit less what the cgroup holds beyond reclaimable page cache: a
    container's or a Kubernetes pod's limit, which ``/proc/meminfo`` does not show). None
    where neither can be read. Limits of the cgroup's parents are not read, nor the
    cgroup's own swap."""
    host = _host_available()
    try:
        with open("/proc/self/cgroup", encoding="ascii") as cgroups:
            group = cgroup_available(cgroups.read().splitlines())
    except OSError:
        group = None
    if host is None or group is None:
        return group if host is None else host
    return min(host, group)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        # Values are in kB (KiB).
        return sum(int(fields[name].split()[0]) for name in ("MemAvailable", "SwapFree")) * 1024
    except (OSError, KeyError, ValueError):
        return None


# The files of a memory cgroup, v2 then v1: its limit, its usage, and the memory.stat
# fields of its page cache and of the shared memory within it (tmpfs, /dev/shm: where
# DataLoader workers hand their batches over), which cannot be reclaimed.
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "file", "shmem"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem"),
}


def cgroup_available(proc_self_cgroup: list[str], root: str = "/sys/fs/cgroup") -> int | None:
    """What the limit of the memory cgroup that the lines of ``/proc/self/cgroup`` name
    leaves, read under ``root``; None where it has no limit or cannot be read."""
    for line in proc_self_cgroup:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            version, mount = "v2", root
        elif "memory" in controllers.split(","):
            version, mount = "v1", f"{root}/memory"
        else:
            continue
        # Inside a container's own cgroup namespace the path is "/" and the mount is the
        # container's cgroup; where the path is not mounted, the mount's root is read.
        for directory in dict.fromkeys((mount + path.rstrip("/"), mount)):
            available = _cgroup_left(directory, *_CGROUP_FILES[version])
            if available is not None:
                return available
    return None


def _cgroup_left(directory: str, limit_file: str, usage_file: str, cache_field: str, shared_field: str) -> int | None:
    try:
        with open(f"{directory}/{limit_file}", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= 1 << 60:  # no limit (v1 writes a page-rounded 2**63 - 1)
            return None
        with open(f"{directory}/{usage_file}", encoding="ascii") as f:
            usage = int(f.read())
        with open(f"{directory}/memory.stat", encoding="ascii") as f:
            stat = dict(line.split() for line in f if line.strip())
        reclaimable = int(stat[cache_field]) - int(stat.get(shared_field, 0))
        return max(0, int(limit) - usage + reclaimable)
    except (OSError, KeyError, ValueError):
        return None  # a field missing: nothing refused rather than all page cache counted as held
