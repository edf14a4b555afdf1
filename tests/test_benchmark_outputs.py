"""Benchmarks write outputs like every rs-local command: no silent overwrite without --force.

``benchmarks/refusal_steering.py --save-vector`` is checked before the fit (minutes on 2
cores), so a wrong path costs nothing. The runs below point ``--data`` at a missing folder:
a run that gets past the output check stops there at once with its own message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "refusal_steering.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "no-data"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_save_vector_refuses_an_existing_file(tmp_path):
    vec = tmp_path / "v.gguf"
    vec.write_bytes(b"keep me")
    res = _run(tmp_path, "--save-vector", str(vec))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(vec) in lines[0] and "already exists" in lines[0] and "--force" in lines[0], res.stderr
    assert "not found" not in res.stdout  # stopped before anything else
    assert vec.read_bytes() == b"keep me"


def test_save_vector_with_force_passes_the_check(tmp_path):
    vec = tmp_path / "v.gguf"
    vec.write_bytes(b"keep me")
    res = _run(tmp_path, "--save-vector", str(vec), "--force")
    assert res.returncode == 2 and "not found" in res.stdout, (res.stdout, res.stderr)  # got as far as --data
    assert "already exists" not in res.stderr and "Traceback" not in res.stderr
    assert vec.read_bytes() == b"keep me"


def test_save_vector_in_a_missing_folder_is_one_line(tmp_path):
    vec = tmp_path / "nowhere" / "v.gguf"
    res = _run(tmp_path, "--save-vector", str(vec))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_json_and_out_refuse_what_exists(tmp_path):
    """--json and --out were overwritten silently after the run; now checked before it, like --save-vector."""
    figures = tmp_path / "figures.json"
    figures.write_text("keep me")
    res = _run(tmp_path, "--json", str(figures))
    assert res.returncode == 2 and "--json" in res.stderr and "already exists" in res.stderr, res.stderr
    assert figures.read_text() == "keep me"
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("keep me")
    res = _run(tmp_path, "--out", str(report))
    assert res.returncode == 2 and "--out" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert (report / "report.json").read_text() == "keep me"
    res = _run(tmp_path, "--json", str(figures), "--force")
    assert "not found" in res.stdout, (res.stdout, res.stderr)  # past the check, to --data
