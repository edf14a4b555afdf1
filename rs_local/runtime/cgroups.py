"""The limits a Linux cgroup puts on this process: memory left, and CPUs' worth of time.

Why both: a container (``docker --memory 8g --cpus 2``), a Kubernetes pod, a systemd scope or a
Slurm job sees the whole machine in /proc (every CPU, all the memory) while the kernel holds it to
much less. Reading only /proc, rs-local started 16 llama.cpp threads on a 2-CPU quota (each waits
for the others at every operation, and the kernel throttles the lot) and sized a fit for memory the
process could not have.

A limit can sit at any level from the cgroup filesystem's root down to the process's own cgroup
(the root is what a container with a cgroup namespace sees; the levels below are where a systemd
scope or a Slurm job sets it), and the tightest one applies. Both cgroup versions are read: v2's
unified tree and v1's per-controller mounts. Everything takes its files as arguments, so tests give
fixture directories; :mod:`rs_local.runtime.host` makes the decisions from what these return.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

#: Where the cgroup filesystem is mounted.
ROOT = Path("/sys/fs/cgroup")
#: A cgroup limit at or above this means "no limit" (cgroup v1 writes a huge number instead of "max").
_NO_LIMIT = 1 << 60
#: v1 mount directories of each controller, in the order tried (Docker links cpu and cpuacct together).
_V1_MOUNTS = {"memory": ("memory",), "cpu": ("cpu,cpuacct", "cpu")}
#: Per cgroup version: memory limit, usage and stat files, and the stat key of reclaimable file cache.
_MEMORY_FILES = {2: ("memory.max", "memory.current", "memory.stat", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")}


def read_text(path: str | Path) -> str:
    """A small system file's text, or "" where it cannot be read (another OS, no permission)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def levels(controller: str, root: Path | None = None, self_cgroup: str | None = None) -> list[tuple[Path, int]]:
    """(directory, version) of each ``controller`` cgroup from the root down to this process's own.

    The root of both versions is always included (a container with a cgroup namespace sees its own
    cgroup there, and /proc/self/cgroup may be unreadable); then every level of the path that
    ``self_cgroup`` (the text of /proc/self/cgroup) names: ``0::/a/b`` (v2), or ``N:cpu,cpuacct:/a/b``
    (v1, under that controller's mount)."""
    root = ROOT if root is None else root
    self_cgroup = read_text("/proc/self/cgroup") if self_cgroup is None else self_cgroup
    mount = _v1_mount(root, controller)
    dirs = [(root, 2), (mount, 1)]
    for line in self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            base, version = root, 2
        elif controller in controllers.split(","):
            base, version = mount, 1
        else:
            continue
        steps = [s for s in rel.strip().split("/") if s and s not in (".", "..")]
        dirs += [(base.joinpath(*steps[:i]), version) for i in range(1, len(steps) + 1)]
    return dirs


def _v1_mount(root: Path, controller: str) -> Path:
    """Where cgroup v1 mounts ``controller`` under ``root`` (the first of its usual names that exists)."""
    names = _V1_MOUNTS[controller]
    return next((root / n for n in names if (root / n).is_dir()), root / names[0])


def memory_room(where: Path, version: int) -> int | None:
    """Limit minus usage plus inactive file cache in one cgroup directory; None without a limit there.

    Inactive file cache counts as free because the kernel drops it before killing anything."""
    limit_file, usage_file, stat_file, key = _MEMORY_FILES[version]
    try:
        raw = (where / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= _NO_LIMIT:
            return None
        limit, usage = int(raw), int((where / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    match = re.search(rf"^{key}\s+(\d+)", read_text(where / stat_file), re.MULTILINE)
    return max(0, limit - usage + (int(match.group(1)) if match else 0))


def cpu_limit(where: Path, version: int) -> float | None:
    """CPUs' worth of time one cgroup directory allows (quota / period); None without a quota there.

    v2: ``cpu.max`` holds ``QUOTA PERIOD`` or ``max PERIOD``; v1: ``cpu.cfs_quota_us`` (-1: none)
    and ``cpu.cfs_period_us``."""
    try:
        if version == 2:
            quota, _, period = (where / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            q, p = int(quota), int(period or 100000)
        else:
            q = int((where / "cpu.cfs_quota_us").read_text().strip())
            p = int((where / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def room_left(root: Path | None = None, self_cgroup: str | None = None) -> int | None:
    """The least memory room under any cgroup level of this process; None where none sets a limit."""
    rooms = [r for d, v in levels("memory", root, self_cgroup) if (r := memory_room(d, v)) is not None]
    return min(rooms) if rooms else None


def cpu_quota(root: Path | None = None, self_cgroup: str | None = None) -> int | None:
    """Whole CPUs the tightest cgroup quota of this process allows (rounded up, at least 1); None: no quota."""
    limits = [c for d, v in levels("cpu", root, self_cgroup) if (c := cpu_limit(d, v)) is not None]
    return max(1, math.ceil(min(limits) - 1e-9)) if limits else None
