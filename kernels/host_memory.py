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
    host's (``MemAvailable`` and free swap) or, where lower, what its memory cgroups' limits
    leave (a container's or a Kubernetes pod's limit, a Slurm job's, which ``/proc/meminfo``
    does not show: ``cgroup_available``). None where neither can be read."""
    host = _host_meminfo()
    try:
        with open("/proc/self/cgroup", encoding="ascii") as cgroups:
            group = cgroup_available(cgroups.read().splitlines(), swap_free=host[1] if host else 0)
    except OSError:
        group = None
    if host is None or group is None:
        return group if host is None else sum(host)
    return min(sum(host), group)


def _host_meminfo() -> tuple[int, int] | None:
    """The host's ``MemAvailable`` and ``SwapFree``, in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        # Values are in kB (KiB).
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["SwapFree"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


# The files of a memory cgroup, v2 then v1: its limit, its usage, the memory.stat fields
# of its page cache and of the shared memory within it (tmpfs, /dev/shm: where DataLoader
# workers hand their batches over), which cannot be reclaimed, and the limit and usage
# that bound its swap (v2: swap alone; v1: memory and swap together).
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "file", "shmem", "memory.swap.max", "memory.swap.current"),
    "v1": (
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "total_cache",
        "total_shmem",
        "memory.memsw.limit_in_bytes",
        "memory.memsw.usage_in_bytes",
    ),
}


def cgroup_available(proc_self_cgroup: list[str], root: str = "/sys/fs/cgroup", swap_free: int = 0) -> int | None:
    """What the limits of the memory cgroup that the lines of ``/proc/self/cgroup`` name,
    and of its parents, leave (read under ``root``): the least of them, each the limit less
    what the cgroup holds beyond reclaimable page cache, plus the swap it may still use, at
    most ``swap_free`` (the host's). None where none has a limit or none can be read."""
    for line in proc_self_cgroup:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            version, mount = "v2", root
        elif "memory" in controllers.split(","):
            version, mount = "v1", f"{root}/memory"
        else:
            continue
        # Inside a container's own cgroup namespace the path is "/" and the mount is the
        # container's cgroup; where the path is not mounted, the directories that do not
        # exist read as nothing and the mount's root is read. A limit may be set on a
        # parent alone (a Slurm job's, above its steps' cgroups; a systemd slice's).
        directory, lefts = mount + path.rstrip("/"), []
        while True:
            left = _cgroup_left(directory, *_CGROUP_FILES[version], swap_free=swap_free)
            if left is not None:
                lefts.append(left)
            if len(directory) <= len(mount):
                break
            directory = directory.rsplit("/", 1)[0]
        if lefts:
            return min(lefts)
    return None


def _cgroup_left(
    directory: str,
    limit_file: str,
    usage_file: str,
    cache_field: str,
    shared_field: str,
    swap_limit_file: str,
    swap_usage_file: str,
    swap_free: int,
) -> int | None:
    try:
        limit = _read_limit(f"{directory}/{limit_file}")
        if limit is None:
            return None
        usage = _read_int(f"{directory}/{usage_file}")
        with open(f"{directory}/memory.stat", encoding="ascii") as f:
            stat = dict(line.split() for line in f if line.strip())
        reclaimable = int(stat[cache_field]) - int(stat.get(shared_field, 0))
    except (OSError, KeyError, ValueError):
        return None  # a field missing: nothing refused rather than all page cache counted as held
    return max(0, limit - usage + reclaimable) + _swap_left(
        directory, limit, usage, swap_limit_file, swap_usage_file, swap_free
    )


def _swap_left(directory: str, limit: int, usage: int, limit_file: str, usage_file: str, swap_free: int) -> int:
    """The swap the cgroup may still use, at most the host's free swap; none where its
    files cannot be read (swap not accounted there: the figure then errs toward refusing
    what only swap would have held, rather than toward the OOM killer)."""
    try:
        swap_limit = _read_limit(f"{directory}/{limit_file}")
        swap_usage = _read_int(f"{directory}/{usage_file}")
    except (OSError, ValueError):
        return 0
    if swap_limit is None:
        return swap_free
    if limit_file == "memory.memsw.limit_in_bytes":  # v1 counts memory and swap together
        swap_limit, swap_usage = swap_limit - limit, swap_usage - usage
    return min(swap_free, max(0, swap_limit - swap_usage))


def _read_limit(path: str) -> int | None:
    """A cgroup limit in bytes, None for none ("max"; v1 writes a page-rounded 2**63 - 1)."""
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    return None if text == "max" or int(text) >= 1 << 60 else int(text)


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read())
