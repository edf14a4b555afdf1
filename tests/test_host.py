"""Host decisions (repacking, threads) on CPU fixtures, and the one model loader everyone uses.

The AMX segfault cannot be reproduced on a machine without AMX, so the decision is tested on
/proc/cpuinfo and llama.cpp system-info fixtures of machines we do not have, the patch that
carries it into llama.cpp is checked directly, and llama.cpp's own load log shows that no
repacked (CPU_REPACK or AMX) weight buffer is made when repacking is off.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from rs_local.errors import RsLocalError
from rs_local.runtime import host
from rs_local.runtime.host import BF16_ENV, REPACK_ENV, decide_bf16, decide_repack

REPO = Path(__file__).resolve().parent.parent

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
ZEN_LAPTOP = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c

processor\t: 1
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx avx2 fma f16c

processor\t: 2
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c

processor\t: 3
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm
CPU implementer\t: 0x41
"""
ZEN4_VM = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni

processor\t: 1
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni
"""
ICE_LAKE = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni
"""
SYSTEM_INFO_AMX = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 |"
SYSTEM_INFO_PLAIN = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 |"


def test_cpu_flags_read_x86_and_arm_fixtures():
    assert {"amx_tile", "amx_int8", "avx512f"} <= host.cpu_flags(SAPPHIRE_RAPIDS)
    assert "amx_int8" not in host.cpu_flags(ZEN_LAPTOP)
    assert {"asimd", "sve"} <= host.cpu_flags(GRAVITON)
    assert host.cpu_flags("") == frozenset()


def test_system_info_parsed():
    info = host.parse_system_info(SYSTEM_INFO_AMX)
    assert info["AMX_INT8"] == "1" and info["AVX2"] == "1" and info["OPENMP"] == "1"
    assert "AMX_INT8" not in host.parse_system_info(SYSTEM_INFO_PLAIN)


@pytest.mark.parametrize(
    "cpuinfo, system_info, expected",
    [
        (SAPPHIRE_RAPIDS, SYSTEM_INFO_PLAIN, False),  # AMX CPU, even with a build that does not say so
        (ZEN_LAPTOP, SYSTEM_INFO_AMX, False),  # a build compiled for AMX (moved between machines)
        (ZEN_LAPTOP, SYSTEM_INFO_PLAIN, True),
        (GRAVITON, "CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 |", True),
    ],
)
def test_repack_off_exactly_where_amx_is(cpuinfo, system_info, expected):
    decision = decide_repack(env={}, flags=host.cpu_flags(cpuinfo), build=host.parse_system_info(system_info))
    assert decision.enabled is expected
    if not expected:
        assert "AMX" in decision.reason


def test_repack_overrides_take_precedence():
    amx = dict(flags=host.cpu_flags(SAPPHIRE_RAPIDS), build=host.parse_system_info(SYSTEM_INFO_AMX))
    plain = dict(flags=host.cpu_flags(ZEN_LAPTOP), build=host.parse_system_info(SYSTEM_INFO_PLAIN))
    assert decide_repack(env={REPACK_ENV: "0"}, **plain).enabled is False
    assert decide_repack(env={REPACK_ENV: "1"}, **amx).enabled is True  # the user asked for it
    assert decide_repack(env={REPACK_ENV: "auto"}, **amx).enabled is False
    assert decide_repack(True, env={REPACK_ENV: "0"}, **plain).enabled is True  # flag beats env
    assert decide_repack(False, env={REPACK_ENV: "1"}, **plain).reason == "--no-repack"
    with pytest.raises(RsLocalError, match=REPACK_ENV):
        decide_repack(env={REPACK_ENV: "maybe"}, **plain)


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (SAPPHIRE_RAPIDS, True),  # AMX and AVX-512 BF16
        (ZEN4_VM, True),  # AVX-512 BF16 without AMX (the CPU the speed-up was measured on)
        (ICE_LAKE, False),  # AVX-512 without BF16: bfloat16 measured no faster there
        (ZEN_LAPTOP, False),
        (GRAVITON, False),  # not measured on ARM: float32 stays
    ],
)
def test_bf16_gradients_exactly_where_the_cpu_does_bfloat16(cpuinfo, expected):
    decision = decide_bf16(env={}, flags=host.cpu_flags(cpuinfo))
    assert decision.enabled is expected
    assert ("bf16" in decision.reason) is expected


def test_bf16_overrides_take_precedence():
    native, plain = host.cpu_flags(ZEN4_VM), host.cpu_flags(ZEN_LAPTOP)
    assert decide_bf16(env={BF16_ENV: "0"}, flags=native).enabled is False
    assert decide_bf16(env={BF16_ENV: "yes"}, flags=plain).enabled is True
    assert decide_bf16(env={BF16_ENV: "auto"}, flags=native).enabled is True
    assert decide_bf16(False, env={BF16_ENV: "1"}, flags=native).reason == "--no-bf16"  # flag beats env
    with pytest.raises(RsLocalError, match=BF16_ENV):
        decide_bf16(env={BF16_ENV: "fast"}, flags=plain)


def test_threads_from_physical_cores_and_affinity():
    assert host.physical_cores(ZEN_LAPTOP) == 2  # 4 logical CPUs, 2 cores
    assert host.physical_cores(SAPPHIRE_RAPIDS) == 1
    assert host.physical_cores(GRAVITON) is None  # ARM cpuinfo has no core ids
    assert host.default_threads(cpus=4, cores=host.physical_cores(ZEN_LAPTOP)) == 2
    assert host.default_threads(cpus=1, cores=host.physical_cores(ZEN_LAPTOP)) == 1  # a container limited to 1 CPU
    assert host.default_threads(cpus=8, cores=host.physical_cores(GRAVITON), read=False) == 8


#: A Xen-era cloud VM: every vCPU listed as core 0 of package 0 (flat topology, not 8-way SMT).
FLAT_VM = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu sse2 avx avx2\n\n" for i in range(8))


def test_cores_among_the_cpus_this_process_may_use():
    """Two hyperthreads of one core are one core; a flat VM topology is no SMT count at all."""
    assert host.physical_cores(ZEN_LAPTOP, allowed={0, 2}) == 1  # siblings of core 0
    assert host.physical_cores(ZEN_LAPTOP, allowed={0, 1}) == 2
    assert host.physical_cores(FLAT_VM) is None  # 8 vCPUs "on one core": unknown, so the CPU count is used
    assert host.default_threads(cpus=8, cores=host.physical_cores(FLAT_VM), read=False) == 8


def test_a_container_cpu_quota_caps_the_threads(tmp_path):
    """`docker --cpus 2` on a 32-CPU host: 2 threads, not 16 (cgroup v2 and v1, any level)."""
    from rs_local.runtime import cgroups
    from rs_local.runtime.cpus import usable_cpus

    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cgroups.cpu_quota(tmp_path, "") == 2
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads, one of them part-time
    assert cgroups.cpu_quota(tmp_path, "") == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroups.cpu_quota(tmp_path, "") is None
    scope = tmp_path / "user.slice" / "job.scope"  # a quota set below the root, on the process's own path
    scope.mkdir(parents=True)
    (scope / "cpu.max").write_text("100000 100000\n")
    assert cgroups.cpu_quota(tmp_path, "0::/user.slice/job.scope\n") == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroups.cpu_quota(v1, "4:cpu,cpuacct:/\n") == 3
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroups.cpu_quota(v1, "") is None
    assert usable_cpus(allowed=set(range(32)), quota=2, read=False) == 2
    assert usable_cpus(allowed={0}, quota=4, read=False) == 1
    assert usable_cpus(allowed=None, quota=None, total=6, read=False) == 6  # no affinity call (macOS)


def test_cores_on_macos_and_windows_from_their_own_sources():
    """macOS: the performance cores (efficiency cores would make every thread wait for them);
    Windows: one GetLogicalProcessorInformationEx core record per core, whatever its SMT."""
    import struct

    from rs_local.runtime.cpus import count_core_records, physical_cores

    m3_pro = {"hw.perflevel0.physicalcpu": 6, "hw.physicalcpu": 12}.get
    assert physical_cores(platform="darwin", sysctl=m3_pro) == 6
    assert physical_cores(platform="darwin", sysctl={"hw.physicalcpu": 4}.get) == 4  # an Intel Mac
    assert physical_cores(platform="darwin", sysctl={}.get) is None
    record = struct.pack("<II", 0, 48) + bytes(40)  # RelationProcessorCore, 48 bytes
    assert count_core_records(record * 8) == 8
    assert count_core_records(struct.pack("<II", 0, 2)) is None  # a damaged buffer: unknown, not a hang
    assert physical_cores(platform="win32", windows_cores=lambda: 8) == 8
    assert host.default_threads(cpus=16, cores=8, read=False) == 8


def test_bf16_and_repack_where_cpu_flags_cannot_be_read():
    """Windows and macOS have no /proc/cpuinfo: llama.cpp's native build says what the CPU has."""
    off = decide_bf16(env={}, flags=frozenset(), build={"AVX2": "1"})
    assert not off.enabled and "unreadable" in off.reason
    on = decide_bf16(env={}, flags=frozenset(), build={"AVX512_BF16": "1"})
    assert on.enabled and "AVX512_BF16" in on.reason
    assert "unreadable" in decide_repack(env={}, flags=frozenset(), build={}).reason
    assert not decide_repack(env={}, flags=frozenset(), build={"AMX_INT8": "1"}).enabled


def test_quiet_openmp_keeps_a_users_setting():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    host.quiet_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    host.quiet_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


# --------------------------------------------------------------------------- one loader

_LOADERS = {"Llama", "llama_model_load_from_file", "llama_load_model_from_file", "llama_model_load_from_splits"}
# Spelled in two parts so that this file's own scan does not find them here.
_UPSTREAM_SERVER = {"llama_cpp" + ".server", "llama_cpp" + ".server.__main__"}


def _calls_a_loader(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in _LOADERS:
                lines.append(node.lineno)
        if isinstance(node, ast.Constant) and node.value in _UPSTREAM_SERVER:
            lines.append(node.lineno)
    return lines


def test_every_model_load_goes_through_load_llama():
    allowed = {REPO / "rs_local" / "runtime" / "loading.py"}
    offenders = []
    for folder in ("rs_local", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in allowed:
                continue
            for line in _calls_a_loader(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"llama.cpp models loaded outside rs_local.runtime.loading: {offenders}"


def test_the_scan_sees_a_direct_load():
    tree = ast.parse("import llama_cpp\nm = llama_cpp.Llama(model_path='x')\ncmd = ['-m', 'llama_cpp.server']\n")
    assert _calls_a_loader(tree) == [2, 3]


def test_repack_policy_reaches_llama_cpp_model_params():
    low = pytest.importorskip("llama_cpp.llama_cpp")
    from rs_local.runtime.loading import repack_policy

    assert low.llama_model_default_params().use_extra_bufts is True  # llama.cpp's own default
    with repack_policy(host.RepackDecision(False, "test")):
        assert low.llama_model_default_params().use_extra_bufts is False
    assert low.llama_model_default_params().use_extra_bufts is True  # restored afterwards


def _load_log(path: Path, repack: bool, capfd) -> str:
    from rs_local.runtime.loading import load_llama

    capfd.readouterr()
    llama, decision = load_llama(path, n_ctx=256, repack=repack, verbose=True)
    llama.close()
    assert decision.enabled is repack
    return capfd.readouterr().err


def test_no_repack_loads_no_repacked_buffer(qwen_path, capfd):
    """llama.cpp logs a 'CPU_REPACK' (or 'AMX') model buffer when it repacks weights; off means none."""
    off = _load_log(qwen_path, False, capfd)
    assert "model buffer size" in off  # the log was captured at all
    assert not re.search(r"(REPACK|AMX) model buffer", off)
    on = _load_log(qwen_path, True, capfd)
    if "AVX2 = 1" in on or "NEON = 1" in on:  # the CPUs on which llama.cpp repacks these types
        assert "CPU_REPACK model buffer" in on


def test_runner_and_cli_without_repacking(smollm2_path, monkeypatch):
    from rs_local.cli.main import cli
    from rs_local.runtime.runner import Runner

    plain = Runner(smollm2_path, n_ctx=256, repack=False)
    assert plain.repack_decision.enabled is False
    text = plain.generate("The capital of France is", max_tokens=8).text
    assert text.strip()
    monkeypatch.delenv(REPACK_ENV, raising=False)
    res = CliRunner().invoke(cli, ["generate", "--raw", "--model", str(smollm2_path), "--no-repack", "--max-tokens", "8",
                                   "--json", "The capital of France is"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["text"] == text
    assert os.environ.get(REPACK_ENV) == "0"  # what every load in that command followed


def test_doctor_reports_build_and_decision(monkeypatch):
    from rs_local.cli.main import cli

    monkeypatch.setenv(REPACK_ENV, "0")
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["repack"] == {"enabled": False, "reason": f"{REPACK_ENV}=0"}
    monkeypatch.setenv(BF16_ENV, "1")
    assert json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)["bf16_gradients"] == f"on ({BF16_ENV}=1)"
    assert "CPU :" in report["llama_cpp_system_info"]
    assert report["threads"] >= 1
    assert report["available_memory"].endswith(" GB")  # what the fit's memory check compares with
    version = CliRunner().invoke(cli, ["--version"])
    assert "llama-cpp-python" in version.output and "doctor" in version.output


def test_threads_beyond_the_cpus_are_cut_with_a_reason():
    """More llama.cpp threads than CPUs only queue (108 s for 32 tokens with 4096 threads on 2 CPUs)."""
    from rs_local.runtime.host import capped_threads

    assert capped_threads(2, cpus=2) == (2, None)
    assert capped_threads(1, cpus=8) == (1, None)
    threads, why = capped_threads(4096, cpus=2)
    assert threads == 2 and "--threads 4096 is more than the 2 CPUs" in why


def test_the_cli_warns_and_uses_the_cpus(smollm2_path):
    from click.testing import CliRunner

    from rs_local.cli.main import cli
    from rs_local.runtime.host import usable_cpus

    res = CliRunner().invoke(cli, ["generate", "--model", str(smollm2_path), "--max-tokens", "2", "--threads", "4096", "hi"])
    assert res.exit_code == 0, res.output
    assert f"warning: --threads 4096 is more than the {usable_cpus()} CPUs" in res.stderr


def test_the_report_shows_a_bad_switch_instead_of_failing(monkeypatch):
    """doctor is where a user looks when a setting is wrong: it used to exit 1 on RS_LOCAL_BF16=maybe."""
    from rs_local.runtime.host import BF16_ENV, REPACK_ENV, host_report

    monkeypatch.setenv(BF16_ENV, "maybe")
    monkeypatch.setenv(REPACK_ENV, "maybe")
    report = host_report()
    assert report["bf16_gradients"] == f"error: {BF16_ENV}='maybe': expected 0, 1 or auto"
    assert report["repack"] == f"error: {REPACK_ENV}='maybe': expected 0, 1 or auto"


def test_a_typo_in_the_fit_cache_switch_is_an_error_not_on(monkeypatch):
    from rs_local.errors import RsLocalError
    from rs_local.vectors import hf_cache

    for value, on in (("0", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("RS_LOCAL_FIT_CACHE", value)
        assert hf_cache.enabled() is on
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "maybe")
    with pytest.raises(RsLocalError, match="RS_LOCAL_FIT_CACHE='maybe': expected 0 or 1"):
        hf_cache.enabled()


@pytest.mark.parametrize("repack", ["auto", "0"], ids=["decided", "forced"])
def test_a_llama_cpp_library_that_cannot_load_is_one_line(tmp_path, repack, smollm2_path):
    """A CUDA wheel without the driver, or a DLL missing: llama-cpp-python raises a RuntimeError at
    import, which reached the user as a traceback (whether or not the repack decision imports it)."""
    import subprocess
    import sys

    (tmp_path / "libllama.so").write_bytes(b"not a library")
    (tmp_path / "libllama.dylib").write_bytes(b"not a library")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path), REPACK_ENV: repack}
    done = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "generate", "--model", str(smollm2_path), "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: llama-cpp-python cannot be loaded: Failed to load shared library")


def test_torch_is_held_to_the_cpu_quota_only_when_it_would_oversubscribe():
    """torch counts the machine's cores, not a container's quota (16 threads under `--cpus 2`)."""
    assert host.torch_threads(16, env={}, cpus=2, cores=16, read=False) == 2
    assert host.torch_threads(2, env={}, cpus=2, cores=2, read=False) is None  # already right: untouched
    assert host.torch_threads(1, env={}, cpus=8, cores=8, read=False) is None  # a user's lower count stays
    assert host.torch_threads(16, env={"OMP_NUM_THREADS": "4"}, cpus=2, cores=16, read=False) is None


def test_the_python_api_is_cut_to_the_cpus_too(smollm2_path):
    """Only the CLI capped --threads; Runner(n_threads=4096) queued thousands of threads on 2 CPUs."""
    from rs_local.runtime.host import usable_cpus
    from rs_local.runtime.runner import Runner

    with Runner(smollm2_path, n_ctx=256, n_threads=4096) as runner:
        assert runner.llama.n_threads == usable_cpus()
        assert runner.generate("hi", max_tokens=2).tokens
