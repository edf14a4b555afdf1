"""``rs-local inspect`` and ``rs-local convert`` through the real command group (click's CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters import load_vector, save_vector, write_control_vector
from rs_local.vectors.control_vector import ControlVector


@pytest.fixture
def vector_file(tmp_path):
    rng = np.random.default_rng(5)
    cv = ControlVector({k: rng.standard_normal(576).astype(np.float32) for k in (4, 12, 20)}, "llama",
                       {"method": "wrmd", "prompt_set": "[political]", "layers": [4, 12, 20]})
    return cv, write_control_vector(cv, tmp_path / "refusal.gguf")


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr


def test_inspect_table(vector_file):
    cv, path = vector_file
    result = _run("inspect", path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "n_embd: 576" in out and "model hint: llama" in out and "layer count: 3" in out
    for block, norm in cv.norms().items():
        assert f"{norm:.4f}" in out
    assert "wrmd" in out and "[political]" in out  # metadata printed literally, not as rich markup


def test_inspect_json(vector_file):
    cv, path = vector_file
    result = _run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(path) and info["n_embd"] == 576 and info["layer_count"] == 3
    assert [row["block"] for row in info["layers"]] == [4, 12, 20]
    assert info["layers"][1]["norm"] == pytest.approx(cv.norms()[12])
    assert info["metadata"]["layers"] == [4, 12, 20]


def test_inspect_npz(tmp_path, vector_file):
    cv, _ = vector_file
    path = save_vector(cv, tmp_path / "v.npz")
    info = json.loads(_run("inspect", path, "--json").stdout)
    assert info["model_hint"] == "llama" and info["layer_count"] == 3


@pytest.mark.parametrize("content,fragment", [
    (None, "file not found"),
    (b"hello world", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\xff", "truncated or corrupt"),
])
def test_inspect_errors_are_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    _one_line_error(_run("inspect", path), fragment)


def test_inspect_unknown_suffix(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("1 2 3")
    _one_line_error(_run("inspect", path), "unknown vector format '.txt'")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_convert_round_trip(tmp_path, vector_file, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    cv, path = vector_file
    mid = tmp_path / f"mid{suffix}"
    result = _run("convert", path, mid)
    assert result.exit_code == 0, result.output
    assert f"wrote {mid}" in result.stdout and "3 directions" in result.stdout
    back_path = tmp_path / "back.gguf"
    assert _run("convert", mid, back_path).exit_code == 0
    back = load_vector(back_path)
    assert back.layers == cv.layers and back.metadata == cv.metadata and back.model_hint == "llama"
    assert all(np.array_equal(back.directions[k], cv.directions[k]) for k in cv.layers)


def test_convert_refuses_overwrite_without_force(tmp_path, vector_file):
    _, path = vector_file
    target = tmp_path / "out.npz"
    target.write_bytes(b"precious")
    _one_line_error(_run("convert", path, target), "already exists (use --force to overwrite)")
    assert target.read_bytes() == b"precious"
    result = _run("convert", path, target, "--force")
    assert result.exit_code == 0, result.output
    assert load_vector(target).layers == [4, 12, 20]


def test_convert_bad_input_and_target(tmp_path, vector_file):
    _, path = vector_file
    _one_line_error(_run("convert", tmp_path / "absent.gguf", tmp_path / "x.npz"), "file not found")
    _one_line_error(_run("convert", path, tmp_path / "x.bin"), "unknown vector format '.bin'")
    _one_line_error(_run("convert", path, tmp_path / "no" / "x.npz"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refusal.gguf"]


def test_missing_argument_is_a_usage_error():
    result = _run("inspect")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_error_lines_are_terminal_safe(tmp_path):
    """A file name with an escape sequence or a newline cannot rewrite the screen via the error line."""
    from click.testing import CliRunner

    from rs_local.cli.main import cli

    evil = tmp_path / "v\x1b]0;pwned\x07\nfake.gguf"
    evil.write_bytes(b"NOPE")
    res = CliRunner().invoke(cli, ["inspect", str(evil)])
    assert res.exit_code == 1
    assert "\x1b" not in res.output and "\\x1b" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.fixture
def policy_file(tmp_path):
    """A two-category policy written with rs-local's own writer (no model needed to describe it)."""
    from rs_local.runtime.policy_file import Category, Policy, write_policy

    rng = np.random.default_rng(6)
    d = 576
    vec = ControlVector({k: rng.standard_normal(d).astype(np.float32) for k in (8, 9, 10)}, "llama", {})
    cats = [Category("political", "remove", rng.standard_normal(d), threshold=0.7, scale=-1.5, vector=vec,
                     accuracy=0.975, n_prompts=40, vector_source="pol.gguf"),
            Category("harmful", "keep", rng.standard_normal(d), threshold=0.5, accuracy=1.0, n_prompts=30)]
    pol = Policy(cats, 12, np.zeros(d), np.ones(d), "llama", d, 30, model_name="smollm2-135m")
    return write_policy(pol, tmp_path / "policy.gguf")


def test_inspect_policy_table_and_json(policy_file):
    result = _run("inspect", policy_file)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "conditional-steering policy for smollm2-135m" in out and "probe block: 12" in out
    assert "model hint: llama" in out and "n_embd: 576" in out
    for needle in ("political", "remove", "-1.5", "0.70", "97.5%", "8-10", "harmful", "keep", "100.0%"):
        assert needle in out, needle
    info = json.loads(_run("inspect", policy_file, "--json").stdout)
    assert info["path"] == str(policy_file) and info["probe_block"] == 12 and info["model_arch"] == "llama"
    cats = {c["name"]: c for c in info["categories"]}
    assert (cats["political"]["action"], cats["political"]["threshold"], cats["political"]["scale"]) == ("remove", 0.7, -1.5)
    assert cats["political"]["heldout_accuracy"] == pytest.approx(0.975) and cats["harmful"]["blocks"] is None
    _one_line_error(_run("inspect", policy_file, "--llama-cpp"), "policy")


def test_inspect_broken_policy_is_one_line(policy_file):
    data = bytearray(policy_file.read_bytes())
    cut = policy_file.with_name("cut.gguf")
    cut.write_bytes(bytes(data[: len(data) // 2]))
    _one_line_error(_run("inspect", cut), "cut.gguf")


def test_convert_escapes_control_characters_in_the_echoed_path(tmp_path, vector_file):
    """A file name is user text too: an ESC in it is printed as \\x1b, not sent to the terminal."""
    _, path = vector_file
    odd = tmp_path / "out\x1b[2J.npz"
    result = _run("convert", path, odd)
    assert result.exit_code == 0, result.output
    assert odd.exists() and "\x1b" not in result.stdout and "\\x1b[2J" in result.stdout


def test_inspect_probe_judge(tmp_path):
    """The shipped probe judge shows what it reads and its recorded figures; one without test figures leaves them out."""
    from rs_local.judge.probe import read_probe, write_probe
    from rs_local.judge.backends import SHIPPED_PROBE as shipped

    result = _run("inspect", shipped)
    assert result.exit_code == 0, result.output
    pf = read_probe(shipped)
    for needle in (f"reads block {pf.layer}", "n_embd: 896", "model hint: qwen2", "threshold 0.50",
                   f"trained on {pf.training['rows']} labelled answers", "test split: agreement"):
        assert needle in result.stdout, needle
    info = json.loads(_run("inspect", shipped, "--json").stdout)
    assert info["layer"] == pf.layer and info["n_layer"] == 24 and info["training"]["rows"] == pf.training["rows"]
    _one_line_error(_run("inspect", shipped, "--llama-cpp"), "probe judge")
    pf.training = {k: v for k, v in pf.training.items() if k != "test_figures"}
    bare = write_probe(pf, tmp_path / "mine.gguf")
    out = _run("inspect", bare).stdout
    assert "reads block" in out and "test split" not in out
