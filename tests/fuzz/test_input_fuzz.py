"""Malformed text inputs and CLI values (issue 10): one-line errors naming the user's file, no bytes lost.

Each generated case (see ``input_cases.py``) is run through the CLI in-process and, for file
classes, through the library. The oracles: exit code 1 (one ``Error:`` line on stderr) or 2
(a click usage error), the error names the user's file or the option, no traceback, no
hidden temp file named or left behind, every pre-existing file byte-for-byte unchanged, and
each case under 10 seconds (a FIFO or ``/dev/zero`` read would hang or blow up instead).
A few cases also run in a real subprocess. ``RS_LOCAL_FUZZ_N`` / ``RS_LOCAL_FUZZ_SEED`` change
the size and seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import input_cases  # noqa: E402
from input_cases import check_files, run_case, snapshot  # noqa: E402

N = int(os.environ.get("RS_LOCAL_FUZZ_N", "300"))
SEED = int(os.environ.get("RS_LOCAL_FUZZ_SEED", "10"))
PER_CLASS = max(1, N // len(input_cases.CLASSES))


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_LOCAL_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("cls", list(input_cases.CLASSES))
def test_malformed_inputs_fail_cleanly(cls, tmp_path):
    cases = [input_cases.make_case(cls, SEED, i, tmp_path) for i in range(PER_CLASS)]
    failures = []
    for case in cases:
        problems = run_case(case)
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} of {len(cases)} {cls} cases failed:\n" + "\n".join(failures[:10])


def test_generator_is_deterministic(tmp_path):
    a = input_cases.make_case("responses_bad", 3, 7, tmp_path / "a")
    b = input_cases.make_case("responses_bad", 3, 7, tmp_path / "b")
    assert a.name == b.name
    assert (a.workdir / "responses.jsonl").read_bytes() == (b.workdir / "responses.jsonl").read_bytes()


def test_the_oracles_catch_a_wrong_outcome(tmp_path, monkeypatch):
    """An accepted bad value, a traceback and a changed file are each reported (so the fuzz test can fail)."""
    accepted = input_cases.Case("x", "valid temperature", ["generate", "hi", "--model", input_cases.NO_MODEL,
                                                          "--temperature", "0.5"], "--temperature", exits=(2,), workdir=tmp_path)
    assert any("exit 1" in p for p in run_case(accepted))  # failed later, on the model: not what the case expects
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")

    def boom(*a, **k):
        raise RecursionError("deep")

    monkeypatch.setattr("rs_local.prompts.load_prompts", boom)
    crash = input_cases.Case("x", "crash", ["respond", "--prompts", str(prompts), "--model", input_cases.NO_MODEL,
                                            "-o", str(tmp_path / "o.jsonl")], str(prompts), workdir=tmp_path)
    assert any("RecursionError" in p for p in run_case(crash))
    before = snapshot(tmp_path)
    prompts.write_text("changed\n")
    assert check_files(before, snapshot(tmp_path))


# ----------------------------------------------------------------------------- real processes


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rs_local.cli.main", *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(res: subprocess.CompletedProcess, names: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and names in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_fifo_and_dev_zero_prompt_files_in_a_process(tmp_path):
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    start = time.monotonic()
    _one_line_error(_cli("respond", "--prompts", str(fifo), "--model", input_cases.NO_MODEL, "-o", str(tmp_path / "o.jsonl"),
                         timeout=30), str(fifo))
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    _one_line_error(_cli("respond", "--prompts", str(zero), "--model", input_cases.NO_MODEL, "-o", str(tmp_path / "o.jsonl"),
                         timeout=30), str(zero))
    assert time.monotonic() - start < 30


def test_judge_verdicts_file_keeps_every_byte_in_a_process(tmp_path):
    responses = tmp_path / "responses.jsonl"
    responses.write_text('{"prompt": "a?", "response": "I cannot help."}\n')
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\nunterminated last line")
    res = _cli("judge", str(responses), "--judge", "keywords", "-o", str(tmp_path / "s.jsonl"), "--verdicts", str(notes))
    _one_line_error(res, str(notes))
    assert notes.read_bytes() == b"line one\nunterminated last line"
    default = tmp_path / "s.verdicts.jsonl"
    default.write_bytes(b'{"not": "a header"}\n{"half": ')
    res = _cli("judge", str(responses), "--judge", "keywords", "-o", str(tmp_path / "s.jsonl"))
    _one_line_error(res, str(default))
    assert default.read_bytes() == b'{"not": "a header"}\n{"half": '
