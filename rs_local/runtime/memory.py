"""How much memory this process can still allocate, on Linux, macOS and Windows.

Why: a fit dequantizes the GGUF into Transformers at 4 bytes a weight, so a 7B model a laptop
chats with in 4-5 GB needs 30 GB to fit; past what the machine has, the kernel's OOM killer ends
the process without a word, minutes in (or the machine swaps until the user gives up).
``rs_local.recipes.memory_check`` compares this figure with the model before any work, and sizes
the gradient passes by it.

Facts only, every source an argument (tests give fixture text): Linux's ``MemAvailable`` (plus
the ZFS ARC, which it leaves out although the ARC shrinks under pressure) and every cgroup limit
on the way to this process (:mod:`rs_local.runtime.cgroups`); macOS's free and inactive pages
(``vm_stat``); Windows' ``GlobalMemoryStatusEx``. Elsewhere the physical memory, the bound a model
larger than the whole machine still cannot pass.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

from rs_local.runtime import cgroups


def available_memory(*, meminfo: str | None = None, cgroup: Path | None = None, self_cgroup: str | None = None,
                     physical: int | None = None, arcstats: str | None = None, platform: str | None = None,
                     vm_stat: str | None = None, windows: Callable[[], "int | None"] | None = None) -> int | None:
    """Bytes this process can still allocate without swapping or meeting the OOM killer; None if unknown.

    Linux: the least of ``MemAvailable`` (``meminfo``, its text; plus what the ZFS ARC can give
    back, half of it, from ``arcstats``) and the room under every cgroup memory limit of this process
    (``cgroup``: the cgroup filesystem's root; ``self_cgroup``: the text of /proc/self/cgroup).
    macOS: free plus inactive pages (``vm_stat``, the command's output). Windows: available physical
    memory (``windows``, a reader). Where none is readable, the physical memory (``physical``).
    """
    if platform is None:  # given /proc/meminfo text is Linux's, whatever machine the tests run on
        platform = "linux" if meminfo is not None else sys.platform
    bounds: list[int | None] = []
    if platform == "darwin":
        bounds.append(darwin_available(vm_stat))
    elif platform == "win32":
        bounds.append((windows or _windows_available)())
    else:
        meminfo = cgroups.read_text("/proc/meminfo") if meminfo is None else meminfo
        arcstats = cgroups.read_text("/proc/spl/kstat/zfs/arcstats") if arcstats is None else arcstats
        linux = _meminfo_available(meminfo)
        bounds.append(None if linux is None else linux + zfs_arc_reclaimable(arcstats) // 2)
        bounds.append(cgroups.room_left(cgroup, self_cgroup))
    known = [b for b in bounds if b is not None]
    if known:
        return min(known)
    return physical if physical is not None else physical_memory()


def _meminfo_available(text: str) -> int | None:
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def zfs_arc_reclaimable(arcstats: str) -> int:
    """Bytes the ZFS ARC holds above its floor, which it gives back under pressure; 0 without ZFS.

    Linux counts the ARC as used, not as cache, so on a ZFS machine (Proxmox, TrueNAS, Ubuntu on
    ZFS) ``MemAvailable`` alone refused fits that had the memory. The ARC shrinks slowly, though (a
    large one has let processes meet the OOM killer first), so :func:`available_memory` counts half."""
    values = dict(re.findall(r"^(size|c_min)\s+\d+\s+(\d+)", arcstats, re.MULTILINE))
    try:
        return max(0, int(values["size"]) - int(values["c_min"]))
    except (KeyError, ValueError):
        return 0


def darwin_available(vm_stat: str | None = None) -> int | None:
    """Free plus inactive pages from macOS's ``vm_stat`` output (run when not given); None if unreadable."""
    if vm_stat is None:
        try:
            vm_stat = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    page = re.search(r"page size of (\d+) bytes", vm_stat)
    pages = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)\.?", vm_stat, re.MULTILINE))
    if not page or len(pages) < 2:
        return None
    return (int(pages["free"]) + int(pages["inactive"])) * int(page.group(1))


class _MemoryStatusEx(ctypes.Structure):
    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                ("ullAvailExtendedVirtual", ctypes.c_uint64)]


def _windows_available() -> int | None:
    try:
        status = _MemoryStatusEx()
        status.dwLength = ctypes.sizeof(_MemoryStatusEx)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None
        return int(status.ullAvailPhys) or None
    except (AttributeError, OSError):
        return None


def physical_memory() -> int | None:
    """The machine's physical memory (``sysconf``); None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
