"""`respond`: k sampled answers per prompt, deterministic per-answer seeds, resumable after a kill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.judge.respond import RespondSettings, prompt_id, respond, sample_seed

PROMPTS = ["Name a fruit.", "Say hello in French.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from rs_local.runtime.runner import Runner

    return Runner(smollm2_path, n_ctx=512)


def _data(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "rs_local_header" not in r]


def test_seed_is_a_pure_function_of_position():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert len({sample_seed(0, p, s) for p in range(5) for s in range(5)}) == 25
    assert sample_seed(1, 0, 0) != sample_seed(0, 0, 0)


def test_respond_rows_and_resume_are_exact(runner, tmp_path):
    settings = RespondSettings(samples=2, max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    full = tmp_path / "full.jsonl"
    seen = []
    report = respond(runner, PROMPTS, full, settings, progress=lambda d, t: seen.append((d, t)))
    rows = _data(full)
    assert report.generated == 6 and report.total == 6
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    for r in rows:
        assert r["prompt"] == PROMPTS[r["prompt_index"]]
        assert r["prompt_id"] == prompt_id(r["prompt"])
        assert r["seed"] == sample_seed(7, r["prompt_index"], r["sample"])
        assert r["mean_logprob"] < 0 and 0 < r["tokens"] <= 8
    # a run killed after three answers, mid-way through writing the fourth
    partial = tmp_path / "partial.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:4]) + lines[4][:25])
    report = respond(runner, PROMPTS, partial, settings)
    assert report.already_done == 3 and report.generated == 3
    resumed = _data(partial)
    assert [(r["prompt_index"], r["sample"]) for r in resumed] == [(r["prompt_index"], r["sample"]) for r in rows]
    # the redone answers are the same draws (same seed per answer)
    assert [r["seed"] for r in resumed] == [r["seed"] for r in rows]
    assert [r["response"] for r in resumed] == [r["response"] for r in rows]


def test_other_settings_need_force(runner, tmp_path):
    out = tmp_path / "r.jsonl"
    respond(runner, PROMPTS[:1], out, RespondSettings(samples=1, max_tokens=4, seed=1))
    from rs_local.errors import FileProblem

    with pytest.raises(FileProblem, match=r"different settings \(seed\)"):
        respond(runner, PROMPTS[:1], out, RespondSettings(samples=1, max_tokens=4, seed=2))
    respond(runner, PROMPTS[:1], out, RespondSettings(samples=1, max_tokens=4, seed=2), force=True)
    assert len(_data(out)) == 1


def test_another_vector_at_the_same_path_needs_force(runner, tmp_path):
    """The log named the vector by its path as typed: a vector refitted in place (or another one at the same
    relative path) resumed the log, and two vectors' answers were mixed in it."""
    import numpy as np

    from rs_local.errors import FileProblem
    from rs_local.vectors import ControlVector

    out = tmp_path / "r.jsonl"
    one = ControlVector({5: np.full(576, 0.1, np.float32)}, "llama", source="v.gguf")
    other = ControlVector({5: np.full(576, -0.1, np.float32)}, "llama", source="v.gguf")
    settings = RespondSettings(samples=1, max_tokens=2, seed=1)
    respond(runner, PROMPTS[:1], out, settings, vectors=[(one, 1.0)])
    with pytest.raises(FileProblem, match="different settings"):
        respond(runner, PROMPTS[:1], out, settings, vectors=[(other, 1.0)])
    runner.clear_vectors()


def test_cli_respond_errors(smollm2_path, tmp_path):
    cli_runner = CliRunner()
    res = cli_runner.invoke(cli, ["respond", "--model", str(smollm2_path), "--prompts", str(tmp_path / "nope.txt"),
                                  "-o", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 1 and "nope.txt: no such file" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    res = cli_runner.invoke(cli, ["respond", "--model", str(smollm2_path), "--prompts", str(bad), "-o", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 1 and "line 2" in res.output
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"x": 1}\n')
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi.\n")
    res = cli_runner.invoke(cli, ["respond", "--model", str(smollm2_path), "--prompts", str(prompts), "-o", str(foreign)])
    assert res.exit_code == 1 and "use --force" in res.output
    assert foreign.read_text() == '{"x": 1}\n'
    long = tmp_path / "long.txt"
    long.write_text("Hi.\n" + "word " * 600 + "\n")
    res = cli_runner.invoke(cli, ["respond", "--model", str(smollm2_path), "--prompts", str(long), "--ctx", "512",
                                  "-o", str(tmp_path / "r2.jsonl")])
    assert res.exit_code == 1 and f"{long}: prompt 2 ('word word" in res.output, res.output
    over = cli_runner.invoke(cli, ["respond", "--model", str(smollm2_path), "--prompts", str(prompts), "-o", str(prompts),
                                   "--force"])  # the prompts became a response log
    assert over.exit_code == 1 and "would overwrite another input" in over.output and prompts.read_text() == "Hi.\n"


def test_respond_killed_and_restarted_has_every_row_once(smollm2_path, tmp_path, kill_after_rows):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "rs_local.cli.main", "respond", "--model", str(smollm2_path), "--prompts", str(prompts),
           "--samples", "3", "-n", "24", "--ctx", "512", "-o", str(out)]
    killed_at = kill_after_rows(cmd, out, timeout=120)
    assert 2 <= killed_at < 9, "the run should have been killed part-way"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = [(r["prompt_index"], r["sample"]) for r in _data(out)]
    assert sorted(keys) == [(p, s) for p in range(3) for s in range(3)]
    assert len(keys) == len(set(keys))


def test_a_prompt_too_long_for_the_context_stops_before_any_answer(runner, tmp_path):
    """It stopped the run where it came (a header-only log), naming neither the prompt nor the file."""
    from rs_local.errors import RsLocalError

    out = tmp_path / "r.jsonl"
    with pytest.raises(RsLocalError, match=r"prompt 2 \('word word.*'\) is [\d,]+ tokens with the chat template; "
                                           r"the context holds"):
        respond(runner, ["Name a fruit.", "word " * 2000], out, RespondSettings(samples=1, max_tokens=2))
    assert not out.exists()


def test_a_hang_up_ends_a_forced_run_like_sigterm(smollm2_path, tmp_path):
    """SIGHUP (a closed terminal, a dropped SSH session) killed `respond --force` outright: its hidden temp log
    and its lock file stayed behind. It now unwinds as SIGTERM does: exit 129, the old log intact, nothing left."""
    import os
    import signal
    import time

    from conftest import rows_so_far

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Tell me about the number {i}.\n" for i in range(40)))
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "rs_local.cli.main", "respond", "--model", str(smollm2_path), "--prompts", str(prompts),
           "-k", "1", "-n", "32", "--ctx", "512", "-o", str(out)]
    out.write_text("")  # an (empty) earlier log: the forced run writes beside it
    proc = subprocess.Popen(cmd + ["--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    temps: list = []
    while time.time() < deadline and not any(rows_so_far(t) for t in temps):
        temps = list(tmp_path.glob(".r.jsonl.*.tmp"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP, proc.stderr.read()[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "r.jsonl"] and out.read_text() == ""
