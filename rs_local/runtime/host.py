"""Everything that depends on the user's machine, decided in one place.

rs-local runs on whatever CPU its users have: Sapphire Rapids servers with AMX, laptops
without AVX-512, Apple and other ARM chips. llama.cpp adapts to the CPU it was compiled on,
and some of what it does there is unsafe or slow, so the choices below are made here, from
facts that can be given as fixtures in tests, and nowhere else:

* **Weight repacking** (llama.cpp's "extra buffer types", its ``--no-repack`` switch). On a
  CPU with AMX, llama.cpp's native build moves the weights into an AMX buffer at load and
  the first matrix product on it segfaults (llama.cpp issue 20824). Repacking is therefore
  turned off whenever AMX is present (in the CPU flags or in the llama.cpp build) and on
  elsewhere, where it speeds up some quantisation types (Q4_0, IQ4_NL, Q4_K on AVX2/NEON).
  ``RS_LOCAL_REPACK=0|1|auto`` and ``--repack/--no-repack`` override it.
* **Threads.** llama-cpp-python's default is half the logical CPUs for decoding (one thread
  on a 2-core VM) and every logical CPU for prompt batches, ignoring CPU affinity and
  container limits. We use the physical cores the process may run on, at most its CPU quota
  (the facts: :mod:`rs_local.runtime.cpus`, on Linux, macOS and Windows).
* **OpenMP waiting.** Idle OpenMP threads spin by default, which steals cores from the
  threads that have work on a small or busy machine; we ask them to sleep.
* **bfloat16 passes** (Transformers, when ``isolate`` fits). On a CPU with native bfloat16
  arithmetic (``avx512_bf16`` or ``amx_bf16``) torch's bfloat16 matrix products run 2.5x faster
  than float32, and the refusal gradients come out at cosine 0.999 per prompt against
  float32's; elsewhere bfloat16 gains nothing, so float32 stays. Where it is on, the recipe also
  loads the model in bfloat16 (half the memory; ``rs_local.recipes.isolate.fit_dtype``).
  ``RS_LOCAL_BF16=0|1|auto`` and ``isolate/demo --bf16/--no-bf16`` override it.
* **Memory for a fit.** A fit dequantizes the GGUF into Transformers at 4 bytes a weight, so a
  7B model a laptop chats with comfortably (4-5 GB quantized) needs 30 GB or more to fit. Past
  what the machine has, the kernel's OOM killer ends the process without a word, minutes in.
  :func:`available_memory` says what is left (:mod:`rs_local.runtime.memory`: Linux, its cgroup
  limits, macOS, Windows); ``rs_local.recipes.memory_check`` compares it with the model's weights
  before any work. ``RS_LOCAL_MEMORY_CHECK=0`` skips the check.

Nothing here imports llama.cpp at module import; :func:`llama_build_features` loads it
only when called.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

from rs_local.runtime.cgroups import read_text
from rs_local.runtime.cpus import physical_cores, usable_cpus
from rs_local.runtime.memory import available_memory

#: Environment variable that forces repacking on (1) or off (0); "auto" or unset decides.
REPACK_ENV = "RS_LOCAL_REPACK"
#: CPU flags (Linux /proc/cpuinfo spelling) whose presence turns repacking off.
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
#: Environment variable that forces bfloat16 gradient passes on (1) or off (0); "auto" or unset decides.
BF16_ENV = "RS_LOCAL_BF16"
#: CPU flags (Linux spelling) of native bfloat16 matrix arithmetic, which torch's CPU kernels use.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_AUTO = {"", "auto"}


@dataclass(frozen=True)
class HostDecision:
    """A choice made for this machine (repack the weights, use bfloat16 ...), and why."""

    enabled: bool
    reason: str

    def __str__(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


#: Whether llama.cpp may repack weights into extra buffer types (the name callers know it by).
RepackDecision = HostDecision


def _forced(override: bool | None, option: str, name: str, env: Mapping[str, str] | None) -> HostDecision | None:
    """What the user forced: the ``--option/--no-option`` flag (``override``), else the variable ``name``
    (``0``/``1`` and their spellings); None for auto or unset, where the machine decides."""
    if override is not None:
        return HostDecision(bool(override), f"--{option}" if override else f"--no-{option}")
    env = os.environ if env is None else env
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE or raw in _FALSE:
        return HostDecision(raw in _TRUE, f"{name}={env[name]}")
    if raw not in _AUTO:
        from rs_local.errors import RsLocalError

        raise RsLocalError(f"{name}={env[name]!r}: expected 0, 1 or auto")
    return None


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux names them; empty where they cannot be read.

    ``cpuinfo`` is the text of /proc/cpuinfo (tests pass fixtures); None reads this machine's.
    """
    cpuinfo = read_text("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def parse_system_info(text: str) -> dict[str, str]:
    """llama.cpp's ``llama_print_system_info()`` line as ``{"AVX2": "1", "AMX_INT8": "1", ...}``."""
    out: dict[str, str] = {}
    for name, value in re.findall(r"([A-Za-z0-9_]+)\s*=\s*([^|\s]+)", text):
        out[name] = value
    return out


def import_llama():
    """The ``llama_cpp`` module; a one-line error where its shared library cannot load.

    Why: llama-cpp-python raises a RuntimeError when ``libllama`` or a library it needs is missing
    (a CUDA wheel on a machine without the CUDA driver, a Metal wheel built for a newer macOS, a
    Windows DLL not found), and that reached the user as a traceback from the first command.
    OpenMP's waiting is set first: this may be llama.cpp's first import in the process."""
    quiet_openmp()
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:
        from rs_local.errors import ModelError

        why = " ".join(str(exc).split())
        raise ModelError(f"llama-cpp-python cannot be loaded: {why} (its install or a library it needs is "
                         "broken; `rs-local doctor` shows the build)") from None
    return llama_cpp


def llama_system_info() -> str:
    """llama.cpp's own description of its build and this CPU (features, backends)."""
    llama_cpp = import_llama()
    raw = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def llama_build_features() -> dict[str, str]:
    """The CPU features the installed llama.cpp was compiled for (``AMX_INT8`` among them)."""
    return parse_system_info(llama_system_info())


def _build_or_empty() -> dict[str, str]:
    """llama.cpp's build features, or none where llama-cpp-python cannot load (a fit does not need it)."""
    try:
        return llama_build_features()
    except Exception:  # noqa: BLE001 - a broken llama.cpp install says so where llama.cpp is used
        return {}


def decide_repack(
    override: bool | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: frozenset[str] | None = None,
    build: Mapping[str, str] | None = None,
) -> RepackDecision:
    """Repack weights unless AMX is present or the user said otherwise.

    Precedence: ``override`` (the CLI flag or API argument), then ``RS_LOCAL_REPACK``, then
    the machine. ``flags`` and ``build`` default to this machine's CPU flags and llama.cpp
    build features; tests give fixtures.
    """
    forced = _forced(override, "repack", REPACK_ENV, env)
    if forced is not None:
        return forced
    flags = cpu_flags() if flags is None else flags
    amx = sorted(flags & AMX_FLAGS)
    if amx:
        return RepackDecision(False, f"CPU has {', '.join(amx)}: llama.cpp's AMX repack crashes")
    build = llama_build_features() if build is None else build
    if build.get("AMX_INT8") == "1":
        return RepackDecision(False, "llama.cpp built with AMX_INT8: its AMX repack crashes")
    if not flags:  # macOS, Windows: only the build says, and it has no AMX code to crash in
        return RepackDecision(True, "CPU flags unreadable here; llama.cpp is built without AMX")
    return RepackDecision(True, "no AMX on this CPU")


def decide_bf16(
    override: bool | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: frozenset[str] | None = None,
    build: Mapping[str, str] | None = None,
) -> HostDecision:
    """Run isolate's Transformers passes (gradients, lengths) under bfloat16 autocast where the CPU does it natively.

    Why: the gradients were the largest part of ``isolate``, and on a 2-core AMD EPYC with
    AVX-512 BF16 the shipped sets' gradient passes took 39 s in float32 and 15 s in bfloat16
    (gradients at cosine >= 0.998 per block on the same labels). With torch held to AVX2, or to
    AVX-512 without BF16 (``ONEDNN_MAX_CPU_ISA``), bfloat16 took 0.95-0.98x float32's time: no gain
    worth the rounding, so float32 stays there. Precedence: ``override`` (``--bf16/--no-bf16`` or
    the API), ``RS_LOCAL_BF16``, then the CPU flags; where those cannot be read (Windows, macOS)
    the features llama.cpp was compiled for (``build``), whose native build reports the CPU's own
    (tests give fixtures for both).
    """
    forced = _forced(override, "bf16", BF16_ENV, env)
    if forced is not None:
        return forced
    flags = cpu_flags() if flags is None else flags
    if not flags:
        build = _build_or_empty() if build is None else build
        if build.get("AVX512_BF16") == "1" or build.get("AMX_BF16") == "1":
            return HostDecision(True, "CPU flags unreadable here; llama.cpp's build reports AVX512_BF16: native bfloat16")
        return HostDecision(False, "CPU flags unreadable here and llama.cpp's build reports no AVX512_BF16: float32")
    native = sorted(flags & BF16_FLAGS)
    if native:
        return HostDecision(True, f"CPU has {', '.join(native)}: native bfloat16 matrix products")
    return HostDecision(False, "no native bfloat16 on this CPU: it would not be faster")


#: Environment variable that turns the fit's memory check off (``0``); on when unset.
MEMORY_CHECK_ENV = "RS_LOCAL_MEMORY_CHECK"


def _memory_label(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.1f} GB"


def memory_check_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when ``RS_LOCAL_MEMORY_CHECK`` is 0/false/no/off (the user knows better: swap, a model that
    is mostly empty); a value that is neither is a one-line error, like the other switches."""
    forced = _forced(None, "memory-check", MEMORY_CHECK_ENV, env)
    return forced is None or forced.enabled


def default_threads(*, cpus: int | None = None, cores: int | None = None, read: bool = True) -> int:
    """Threads for llama.cpp: the physical cores we may use (hyperthreads add little to matmuls), at
    most the CPUs (affinity and a container's quota: :mod:`rs_local.runtime.cpus`).

    ``cpus`` and ``cores`` default to this machine's when ``read``; tests give fixtures.
    """
    cpus = usable_cpus(read=read) if cpus is None else cpus
    cores = physical_cores() if cores is None and read else cores
    if cores is None:
        return cpus
    return max(1, min(cpus, cores))


def torch_threads(current: int, *, env: Mapping[str, str] | None = None, cpus: int | None = None,
                  cores: int | None = None, read: bool = True) -> int | None:
    """Fewer threads for torch's fitting passes where its own count (``current``) oversubscribes; else None.

    Why: torch counts the machine's physical cores and ignores a container's CPU quota and the
    process's affinity, so a fit in ``docker --cpus 2`` on a 32-core host ran 16 threads that the
    kernel throttles in turn. Only ever lowered (a count the user set below ours stays), and a
    user's ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, which torch reads itself, wins."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None
    ours = default_threads(cpus=cpus, cores=cores, read=read)
    return ours if ours < current else None


def capped_threads(requested: int, *, cpus: int | None = None) -> tuple[int, str | None]:
    """A thread count asked for, at most the CPUs this process may use, and why it was cut (or None).

    Why: llama.cpp's threads wait for each other at every operation, so more threads than CPUs only
    queue: measured on 2 CPUs, 32 tokens of SmolLM2 took 0.6 s with 2 threads, 12.6 s with 999 and
    108 s with 4096, which looks like a hang on a larger model."""
    cpus = usable_cpus() if cpus is None else cpus
    if requested <= cpus:
        return requested, None
    return cpus, f"--threads {requested} is more than the {cpus} CPUs this process may use; using {cpus}"


def raise_open_files_limit(target: int = 4096) -> int | None:
    """Raise this process's soft limit on open files toward ``target`` (never above the hard limit);
    the new soft limit, or None where there is no such limit (Windows).

    Why: a server holds one descriptor per connection, and macOS starts processes at 256: a burst of
    clients (or a few hundred stalled ones) exhausted it, after which every accept failed."""
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        return soft
    except (OSError, ValueError):
        return None


def quiet_openmp(env: dict[str, str] | None = None) -> None:
    """Let idle OpenMP threads sleep instead of spinning (must happen before llama.cpp loads).

    A user's own ``OMP_WAIT_POLICY`` wins.
    """
    (os.environ if env is None else env).setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: CPU flags worth showing in a bug report (what llama.cpp's kernels choose between).
REPORTED_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                  "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def _shown(decide: Callable[[], object]) -> object:
    """A decision for the report, or the error a bad setting gives: the report is where users look."""
    from rs_local.errors import RsLocalError

    try:
        return decide()
    except RsLocalError as exc:
        return f"error: {exc}"


def host_report() -> dict[str, object]:
    """What a user filing a bug should paste: the machine, the llama.cpp build, our decisions."""
    import platform
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    flags = cpu_flags()
    report: dict[str, object] = {
        "rs_local": version("rs-local"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_flags": [f for f in REPORTED_FLAGS if f in flags],
        "usable_cpus": usable_cpus(),
        "physical_cores": physical_cores(),
        "threads": default_threads(),
        "bf16_gradients": _shown(lambda: str(decide_bf16())),
        "available_memory": _memory_label(available_memory()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: rs-local sets PASSIVE)"),
        "llama_cpp_python": version("llama-cpp-python"),
        "torch": version("torch"),
        "transformers": version("transformers"),
    }
    quiet_openmp()
    try:
        import llama_cpp

        info = llama_system_info()
        report["llama_cpp_system_info"] = info.strip()
        report["llama_cpp_build_features"] = parse_system_info(info)
        report["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        report["repack"] = _shown(lambda: asdict(decide_repack()))
    except Exception as exc:  # noqa: BLE001 - a broken install is exactly what the report is for
        report["llama_cpp_error"] = f"{type(exc).__name__}: {exc}"
    return report
