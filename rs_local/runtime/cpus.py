"""How many CPUs this process may use, and how many of them are separate cores, on any OS.

Why it matters: llama.cpp's threads wait for each other at every operation, so a thread with no
CPU of its own stalls all of them (measured on 2 CPUs: 32 tokens of SmolLM2 took 0.6 s with 2
threads, 12.6 s with 999), and a second hyperthread on a core adds little to matrix products.
``os.cpu_count()`` answers neither question: it ignores affinity, a container's CPU quota and SMT.

Facts only: :func:`rs_local.runtime.host.default_threads` decides from them. Every reader takes
its source as an argument (cpuinfo text, a cgroup directory, a sysctl or Windows reader), so each
platform's path is tested on fixtures here, not only on the developers' machine.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from typing import Callable

from rs_local.runtime import cgroups

#: Reads one integer sysctl by name (macOS); None where it does not exist.
Sysctl = Callable[[str], "int | None"]


def affinity_cpus() -> set[int] | None:
    """The logical CPU ids this process may run on; None where the OS does not say (macOS, Windows)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cpus(*, allowed: set[int] | None = None, quota: int | None = None, total: int | None = None,
                read: bool = True) -> int:
    """Logical CPUs this process may use: its affinity set, cut to its cgroup CPU quota.

    ``allowed``, ``quota`` and ``total`` default to this machine's when ``read`` (tests pass
    ``read=False`` with fixtures): a ``docker --cpus 2`` container on a 32-CPU host uses 2."""
    if read:
        allowed = affinity_cpus() if allowed is None else allowed
        quota = cgroups.cpu_quota() if quota is None else quota
        total = os.cpu_count() if total is None else total
    cpus = len(allowed) if allowed else (total or 1)
    return max(1, min(cpus, quota) if quota else cpus)


def physical_cores(cpuinfo: str | None = None, *, allowed: set[int] | None = None,
                   sysctl: Sysctl | None = None, platform: str | None = None,
                   windows_cores: Callable[[], "int | None"] | None = None) -> int | None:
    """Separate cores among the CPUs this process may use; None where the OS does not say.

    Linux: distinct (package, core) pairs in /proc/cpuinfo (``cpuinfo``), over the processors in
    ``allowed`` only (affinity: two hyperthreads of one core are one core). A listing with more than
    two logical CPUs per core is a hypervisor's flat topology (every vCPU "core id 0"), not SMT:
    None. macOS: the performance cores (``hw.perflevel0.physicalcpu``; llama.cpp counts the same,
    since its threads wait for the slowest), else ``hw.physicalcpu``. Windows: processor cores
    from ``GetLogicalProcessorInformationEx``."""
    if platform is None:  # given /proc/cpuinfo text is Linux's, whatever machine the tests run on
        platform = "linux" if cpuinfo is not None else sys.platform
    if platform == "darwin":
        read = sysctl or _darwin_sysctl
        return read("hw.perflevel0.physicalcpu") or read("hw.physicalcpu")
    if platform == "win32":
        return (windows_cores or _windows_cores)()
    if cpuinfo is None:
        cpuinfo = cgroups.read_text("/proc/cpuinfo")
        allowed = affinity_cpus() if allowed is None else allowed
    return _cpuinfo_cores(cpuinfo, allowed)


def _cpuinfo_cores(cpuinfo: str, allowed: set[int] | None) -> int | None:
    cores: set[tuple[str, str]] = set()
    listed = 0
    proc = package = core = None
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            proc = value.strip()
        elif key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core is not None and (allowed is None or _as_int(proc) in allowed):
                cores.add((package or "0", core))
                listed += 1
            proc = package = core = None
    if not cores or listed > 2 * len(cores):
        return None
    return len(cores)


def _as_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _darwin_sysctl(name: str) -> int | None:
    """One integer sysctl through libc's ``sysctlbyname`` (no subprocess); None if absent."""
    try:
        libc = ctypes.CDLL("/usr/lib/libc.dylib")
        value, size = ctypes.c_int64(0), ctypes.c_size_t(8)
        if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
            return None
        raw = ctypes.string_at(ctypes.byref(value), size.value)
        return int.from_bytes(raw, sys.byteorder) or None
    except (OSError, AttributeError, ValueError):
        return None


#: ``LOGICAL_PROCESSOR_RELATIONSHIP.RelationProcessorCore``: one record per physical core.
_RELATION_PROCESSOR_CORE = 0


def count_core_records(buffer: bytes) -> int | None:
    """Physical cores in a ``GetLogicalProcessorInformationEx(RelationProcessorCore)`` buffer.

    Each record starts with its relationship and its size (two little-endian DWORDs); one record
    is one core, whatever its SMT siblings."""
    cores, offset = 0, 0
    while offset + 8 <= len(buffer):
        relation, size = struct.unpack_from("<II", buffer, offset)
        if size < 8:
            return None
        cores += relation == _RELATION_PROCESSOR_CORE
        offset += size
    return cores or None


def _windows_cores() -> int | None:
    try:
        get = ctypes.windll.kernel32.GetLogicalProcessorInformationEx  # type: ignore[attr-defined]
        size = ctypes.c_uint32(0)
        get(_RELATION_PROCESSOR_CORE, None, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        if not size.value or not get(_RELATION_PROCESSOR_CORE, buf, ctypes.byref(size)):
            return None
        return count_core_records(buf.raw[: size.value])
    except (AttributeError, OSError, ValueError):
        return None
