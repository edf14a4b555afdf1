"""llama.cpp's own tools and rs-local: the flags we print, and (opt-in) the real binaries.

The flag tests always run: they need no llama.cpp build, only a vector file. The interop test
runs only when ``LLAMA_CPP_BIN_DIR`` names a directory with ``llama-completion`` and
``llama-server`` built from the pinned llama.cpp (see benchmarks/llama_cpp_interop.py); it
checks that those binaries, given the flags rs-local prints, answer as rs-local does.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters import write_control_vector
from rs_local.errors import FileProblem, RsLocalError
from rs_local.runtime.host import REPACK_ENV, RepackDecision
from rs_local.runtime.llama_flags import LlamaCppPathError, llama_cpp_flags
from rs_local.vectors.control_vector import ControlVector

REPO = Path(__file__).resolve().parent.parent
ON = RepackDecision(True, "test")


@pytest.fixture
def vector(tmp_path) -> Path:
    """A tiny vector on blocks 3-5 (the span the flags must report)."""
    rng = np.random.default_rng(0)
    cv = ControlVector({k: rng.standard_normal(8).astype(np.float32) for k in (3, 4, 5)}, "llama")
    return write_control_vector(cv, tmp_path / "v.gguf")


@pytest.fixture
def model(tmp_path) -> Path:
    """A stand-in model file: the flags only need a path that exists."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(16))
    return path


def test_flags_for_a_vector(vector, model):
    flags = llama_cpp_flags([(vector, -1.0)], model=model, repack=ON)
    assert flags.vector_args() == ["--control-vector-scaled", f"{vector}:-1", "--control-vector-layer-range", "3", "5"]
    assert flags.argv("llama-completion", model)[:3] == ["llama-completion", "-m", str(model)]
    line = flags.command("llama-server")
    assert shlex.split(line) == ["llama-server", "-m", str(model), *flags.vector_args(), "-fa", "off"]
    assert "-nr" not in line


def test_scales_are_written_as_people_type_them(vector, model, tmp_path):
    other = write_control_vector(ControlVector({2: np.ones(8, np.float32)}, "llama"), tmp_path / "w.gguf")
    flags = llama_cpp_flags([(vector, 0.5), (other, -1.25)], model=model, repack=ON)
    assert flags.vector_args()[1] == f"{vector}:0.5,{other}:-1.25"
    assert flags.layer_range == (2, 5)  # the span of both files


def test_user_layer_range_wins(vector, model):
    flags = llama_cpp_flags([(vector, -1.0)], model=model, layer_range=(4, 4), repack=ON)
    assert flags.vector_args()[-3:] == ["--control-vector-layer-range", "4", "4"]
    with pytest.raises(RsLocalError):
        llama_cpp_flags([(vector, -1.0)], model=model, layer_range=(0, 4), repack=ON)


def test_no_repack_follows_rs_locals_decision(vector, model, monkeypatch):
    monkeypatch.setenv(REPACK_ENV, "0")
    flags = llama_cpp_flags([(vector, -1.0)], model=model)
    assert flags.vector_args()[-1] == "-nr"
    assert any("-nr" in note and REPACK_ENV in note for note in flags.notes)
    monkeypatch.setenv(REPACK_ENV, "1")
    assert "-nr" not in llama_cpp_flags([(vector, -1.0)], model=model).vector_args()


@pytest.mark.parametrize("name", ["a:b.gguf", "a,b.gguf"])
def test_paths_llama_cpp_cannot_parse_are_refused(tmp_path, model, vector, name):
    bad = tmp_path / name
    bad.write_bytes(vector.read_bytes())
    with pytest.raises(LlamaCppPathError, match="ln -s"):
        llama_cpp_flags([(bad, -1.0)], model=model, repack=ON)


def test_a_colon_above_the_working_directory_is_left_out(tmp_path, model, vector, monkeypatch):
    """Windows: every absolute path has a drive's ':', which llama.cpp splits on; the path relative
    to where the user is (where the hint is printed) passes."""
    drive = tmp_path / "C:" / "work"
    drive.mkdir(parents=True)
    (drive / "v.gguf").write_bytes(vector.read_bytes())
    monkeypatch.chdir(drive)
    flags = llama_cpp_flags([(drive / "v.gguf", -1.0)], model=model, repack=ON)
    assert flags.vector_args()[:2] == ["--control-vector-scaled", "v.gguf:-1"]
    monkeypatch.chdir(tmp_path)  # from above the colon only the full path would do: refused
    with pytest.raises(LlamaCppPathError, match="ln -s"):
        llama_cpp_flags([(drive / "v.gguf", -1.0)], model=model, repack=ON)


def test_hints_are_quoted_for_the_users_shell():
    """Single quotes mean nothing to cmd.exe; Windows hints use double quotes."""
    from rs_local.runtime.llama_flags import shell_join, shell_quote

    assert shell_quote(r"C:\my models\m.gguf", windows=True) == r'"C:\my models\m.gguf"'
    assert shell_quote("/my models/m.gguf", windows=False) == "'/my models/m.gguf'"
    assert shell_join(["-fa", "off"], windows=True) == "-fa off"


def test_non_gguf_vectors_are_refused_with_the_convert_command(tmp_path, model):
    with pytest.raises(FileProblem, match="rs-local convert"):
        llama_cpp_flags([(tmp_path / "v.npz", -1.0)], model=model, repack=ON)


def test_paths_with_spaces_are_quoted(tmp_path, vector, model):
    spaced = tmp_path / "my vectors" / "v.gguf"
    spaced.parent.mkdir()
    spaced.write_bytes(vector.read_bytes())
    line = llama_cpp_flags([(spaced, -1.0)], model=model, repack=ON).command()
    assert f"{spaced}:-1" in shlex.split(line)


def test_a_built_in_model_is_named_without_downloading(vector, tmp_path, monkeypatch):
    monkeypatch.setenv("RS_LOCAL_HOME", str(tmp_path / "empty-home"))
    flags = llama_cpp_flags([(vector, -1.0)], model="smollm2-135m", repack=ON)
    assert flags.model == '"$(rs-local models path smollm2-135m)"'
    assert any("rs-local models pull smollm2-135m" in n for n in flags.notes)
    assert not (tmp_path / "empty-home").exists()


def test_cli_inspect_llama_cpp(vector, model, monkeypatch):
    monkeypatch.chdir(vector.parent)
    monkeypatch.setenv(REPACK_ENV, "0")
    result = CliRunner().invoke(cli, ["inspect", "v.gguf", "--llama-cpp", "--model", str(model), "--scale", "-1.5"])
    assert result.exit_code == 0, result.output
    commands = [shlex.split(ln) for ln in result.stdout.splitlines() if not ln.startswith("#")]
    assert [c[0] for c in commands] == ["llama-completion", "llama-server"]
    common = ["-m", str(model), "--control-vector-scaled", "v.gguf:-1.5", "--control-vector-layer-range", "3", "5", "-nr"]
    # flash attention off as in rs-local; --jinja: the GGUF's own template, as rs-local and llama-server use
    assert commands[0][1:] == common + ["-fa", "off", "--jinja"]
    assert commands[1][1:] == common + ["-fa", "off"]


def test_cli_inspect_llama_cpp_refuses_a_colon_path(vector, model, monkeypatch):
    monkeypatch.chdir(vector.parent)
    Path("x:y.gguf").write_bytes(vector.read_bytes())
    result = CliRunner().invoke(cli, ["inspect", "x:y.gguf", "--llama-cpp", "--model", str(model)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot take a path containing ':'" in lines[0] and "Traceback" not in result.output


def test_demo_hint_names_the_real_model_and_the_colon_syntax(vector, model, monkeypatch):
    from rs_local.recipes.demo import _next_steps

    monkeypatch.setenv(REPACK_ENV, "1")
    line = next(s for s in _next_steps(vector, -1.5, model) if s.startswith("in llama.cpp:"))
    argv = shlex.split(line.split(":", 1)[1])
    assert argv[:5] == ["llama-completion", "-m", str(model), "--control-vector-scaled", f"{vector}:-1.5"]
    assert "MODEL.gguf" not in line
    bad = vector.with_name("a:b.gguf")
    bad.write_bytes(vector.read_bytes())
    line = next(s for s in _next_steps(bad, -1.0, model) if s.startswith("in llama.cpp:"))
    assert "cannot take a path containing ':'" in line  # said, not crashed at the end of a long demo


# -- opt-in: the real llama.cpp binaries -------------------------------------------------------

BIN_DIR = os.environ.get("LLAMA_CPP_BIN_DIR")


@pytest.mark.skipif(not BIN_DIR, reason="set LLAMA_CPP_BIN_DIR to llama-completion/llama-server built from the pinned llama.cpp")
def test_llama_cpp_binaries_answer_as_rs_local(tmp_path, smollm2_path):
    """SmolLM2, 2 prompts, raw and chat mode: 16 greedy tokens as rs-local; the server steered."""
    out = tmp_path / "interop.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llama_cpp_interop.py"), "--quick",
                           "--tokens", "16", "--json", str(out)], capture_output=True, text=True, timeout=1800)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = [r for case in report["cases"] for r in case["rows"] if r["mode"] in ("raw", "chat")]
    builtin = [r for case in report["cases"] for r in case["rows"] if r["mode"] == "chat-builtin"]
    server = [r for case in report["cases"] for r in case["server_rows"]]
    assert len(rows) == 4 and len(server) == 2, proc.stdout
    # why the printed flags carry --jinja: without it llama-completion drops SmolLM2's system message
    assert builtin and not any(r["same_prompt_tokens"] for r in builtin), builtin
    for row in rows + server:
        assert row["matched"] == row["of"] and (row["of"] == 16 or "both stopped" in row["divergence"]), row
    assert all(r["same_prompt_tokens"] for r in rows), rows
    assert any(r["steered_differs"] for r in server), server  # unlike the plain server ...
    assert all(r["plain_matched"] == r["plain_of"] for r in server), server  # ... which answers as plain rs-local
    assert report["summary"]["server_steered"]
    assert report["summary"]["vectors_loaded"]
    assert proc.returncode == 0, proc.stdout[-2000:]
