"""Malformed control vectors (issue 10, items 1, 3, 5, 7, 9): a few hundred seeded cases.

Every case must end in a ControlVector or a one-line VectorFileError naming the file, in
bounded time and memory; every GGUF file we accept must be one that llama.cpp's own parser
and control-vector loader accept with the same values; ``inspect`` must print nothing that
drives a terminal and ``--json`` must be standard JSON. ``benchmarks/fuzz.py`` runs the same
classes at 10,000+ cases.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ggml_oracle
import vector_cases
from rs_local.cli.main import cli
from rs_local.converters.cvec_loader import direction_layer
from rs_local.converters.gguf_check import TensorInfo
from rs_local.converters.gguf_limits import DIRECTION_NAME
from rs_local.errors import VectorFileError

SEED = 20260
PER_CLASS = 20
TIME_LIMIT_S = 10.0
GROWTH_LIMIT_MB = 200  # a case reads kilobytes; any real growth means a declared size was trusted


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[vector_cases.Case]:
    work = tmp_path_factory.mktemp("fuzz")
    return vector_cases.generate(PER_CLASS * len(vector_cases.CLASSES), SEED, work)


@pytest.fixture(scope="module")
def outcomes(cases) -> list[tuple[vector_cases.Outcome, float]]:
    results = []
    for case in cases:
        start = time.perf_counter()
        outcome = vector_cases.classify(case.path)
        results.append((outcome, time.perf_counter() - start))
    return results


def test_generator_is_seeded_and_covers_every_class(tmp_path, cases):
    assert {c.cls for c in cases} == set(vector_cases.CLASSES)
    again = vector_cases.make_case("names", SEED, 14, tmp_path)
    same = next(c for c in cases if c.index == 14)
    assert same.cls == "names" and again.path.read_bytes() == same.path.read_bytes()
    assert {c.expect for c in cases} == {"accept", "reject", "any"}


def test_every_case_ends_in_a_vector_or_a_one_line_error(cases, outcomes):
    failures = []
    for case, (outcome, seconds) in zip(cases, outcomes):
        where = f"{case.cls} #{case.index} ({case.path.name})"
        if outcome.kind not in ("accepted", "clean error"):
            failures.append(f"{where}: {outcome.kind}: {outcome.detail}")
        elif seconds > TIME_LIMIT_S:
            failures.append(f"{where}: took {seconds:.1f} s")
        elif case.expect == "accept" and outcome.kind != "accepted":
            failures.append(f"{where}: must be accepted, got {outcome.detail}")
        elif case.expect == "reject" and outcome.kind == "accepted":
            failures.append(f"{where}: must be rejected, was accepted")
    assert not failures, "\n".join(failures[:30])
    kinds = {o.kind for o, _ in outcomes}
    assert kinds == {"accepted", "clean error"}  # both verdicts occur: the check above is not vacuous


_MEMORY_PROBE = r"""
import json, pathlib, resource, sys
sys.path.insert(0, sys.argv[1])
import vector_cases
from rs_local.converters import load_vector  # the readers are imported before the baseline
def peak_mb():
    # VmHWM can be reset (clear_refs 5) after the imports, whose transient peak would otherwise
    # hide growth below it; ru_maxrss, which cannot be reset, is the fallback.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
base = peak_mb()
worst = ("", 0.0)
for line in sys.stdin:
    path = json.loads(line)
    kind = vector_cases.classify(pathlib.Path(path)).kind
    grown = float("inf") if kind == "memory" else peak_mb() - base
    if grown > worst[1]:
        worst = (f"{path} ({kind})", grown)
before = peak_mb()
block = bytearray(300 << 20)
block[::4096] = b"x" * len(block[::4096])  # control: touched pages must show in the meter
print(json.dumps({"control": peak_mb() - before, "worst": worst}))
"""


def test_memory_stays_bounded_under_an_address_space_limit(cases):
    """All cases in one child with RLIMIT_AS = 2 GB; the high-water mark may not move by 200 MB.

    The 300 MB control allocation before the baseline proves the meter sees real growth.
    """
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    paths = "".join(json.dumps(str(c.path)) + "\n" for c in cases if c.path.is_file() and not c.path.is_symlink())
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).parent)], input=paths, text=True,
                          capture_output=True, timeout=120, preexec_fn=limit, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["control"] >= 250, report
    assert report["worst"][1] < GROWTH_LIMIT_MB, report


@pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python's libggml-base.so is not installed")
def test_llama_cpp_accepts_every_gguf_we_accept_with_the_same_values(cases, outcomes):
    accepted = [(c, o) for c, (o, _) in zip(cases, outcomes) if o.kind == "accepted" and c.path.suffix == ".gguf"]
    assert len(accepted) >= 50
    verdicts = ggml_oracle.verdicts([c.path for c, _ in accepted])
    problems = [f"{c.cls} #{c.index}: {why}" for (c, o), v in zip(accepted, verdicts)
                if (why := ggml_oracle.disagreement(o.directions, v))]
    assert not problems, "\n".join(problems[:30])


@pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python's libggml-base.so is not installed")
def test_the_oracle_can_say_no(cases):
    """Cases llama.cpp must refuse (big-endian, bad offsets, 5-D, non-F32) are refused by the oracle."""
    must = [c for c in cases if c.cls in ("big_endian", "offsets", "version", "tensor_type") and c.path.is_file()]
    verdicts = ggml_oracle.verdicts([c.path for c in must])
    assert must and not any(v.accepts for v in verdicts)
    valid = [c for c in cases if c.cls == "valid"]
    values_differ = ggml_oracle.Verdict(True, "", {k: v + 1 for k, v in vector_cases.classify(valid[0].path).directions.items()})
    assert ggml_oracle.disagreement(vector_cases.classify(valid[0].path).directions, values_differ) is not None


def _names() -> list[bytes]:
    extra = [b"direction.%d" % n for n in (1, 7, 2**31 - 1, 2**31, 2**32 + 5)]
    return [name for name, _ in vector_cases._NAMES] + extra + [b"direction.0%d" % n for n in range(1, 5)]


@pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("name", _names(), ids=lambda n: n.decode("utf-8", "backslashreplace")[:30])
def test_direction_names_are_a_subset_of_what_std_stoi_reads(tmp_path, name):
    """Where we accept a tensor name, llama.cpp's std::stoi (libc strtol) reads the same block."""
    libc = ggml_oracle._libc()
    prefix, dot, rest = name.partition(b".")
    theirs = ggml_oracle.stoi(libc, rest) if dot and prefix == b"direction" else None
    info = TensorInfo(name, 1, (4, 1, 1, 1), 0, 0)
    try:
        ours = direction_layer(tmp_path / "v.gguf", info)
    except VectorFileError as exc:
        assert str(exc).startswith(f"{tmp_path / 'v.gguf'}: ")
        if DIRECTION_NAME.fullmatch(name):  # canonical but refused: 0, past int, past MAX_BLOCK
            assert theirs is None or theirs == 0 or theirs > 1 << 14
        return
    assert theirs == ours and ours >= 1


_TERMINAL_OK = {"\n"}


def _unsafe_chars(text: str) -> set[str]:
    return {ch for ch in text if not ch.isprintable() and ch not in _TERMINAL_OK}


def test_inspect_escapes_hostile_metadata_and_prints_standard_json(cases, outcomes):
    hostile = [c for c, (o, _) in zip(cases, outcomes)
               if o.kind == "accepted" and c.cls in ("meta_text", "meta_json", "meta_types", "keys", "npz", "safetensors")]
    seen_hostile = 0
    runner = CliRunner()
    for case in hostile:
        table = runner.invoke(cli, ["inspect", str(case.path)])
        assert table.exit_code == 0, table.output
        assert not _unsafe_chars(table.stdout), (case.cls, case.index, _unsafe_chars(table.stdout))
        raw = runner.invoke(cli, ["inspect", "--json", str(case.path)])
        assert raw.exit_code == 0, raw.output
        assert not _unsafe_chars(raw.stdout), (case.cls, case.index)
        info = json.loads(raw.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        seen_hostile += any(_unsafe_chars(str(v)) for v in info["metadata"].values()) or bool(_unsafe_chars(info["model_hint"]))
        _assert_finite(info)
    assert seen_hostile >= 3  # the cases really carried control characters to escape


def _assert_finite(value) -> None:
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _assert_finite(v)
    elif isinstance(value, list):
        for v in value:
            _assert_finite(v)


def test_inspect_escapes_a_hostile_file_name(tmp_path, cases):
    valid = next(c for c in cases if c.cls == "valid" and c.path.suffix == ".gguf")
    hostile = tmp_path / "v\x1b]0;owned\x07\u202e.gguf"
    hostile.write_bytes(valid.path.read_bytes())
    out = CliRunner().invoke(cli, ["inspect", str(hostile)])
    assert out.exit_code == 0, out.output
    assert not _unsafe_chars(out.stdout) and "\\x1b]0;owned\\x07\\u202e.gguf" in out.stdout


@pytest.mark.parametrize("dtype,fragment", [("complex64", "has dtype <c8"), ("complex128", "has dtype <c16"),
                                            ("int64", "has dtype <i8"), ("bool", "has dtype |b1"),
                                            ("object", "needs pickle")])
def test_npz_directions_must_be_real_floats(tmp_path, dtype, fragment):
    import numpy as np

    from rs_local.converters import load_npz

    arr = np.array([1, 2, 3], dtype=dtype) if dtype != "object" else np.array([1.0, None], dtype=object)
    path = tmp_path / "v.npz"
    np.savez(path, layer_1=arr)
    with pytest.raises(VectorFileError) as info:
        load_npz(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


@pytest.mark.parametrize("header_len,fragment", [(2**40, "header length"), (100_000_001, "header length")])
def test_safetensors_header_length_is_bounded_before_reading(tmp_path, header_len, fragment):
    from rs_local.converters import load_safetensors

    path = tmp_path / "v.safetensors"
    path.write_bytes(header_len.to_bytes(8, "little") + b"{}" + b" " * 100)
    with pytest.raises(VectorFileError, match=fragment):
        load_safetensors(path)
