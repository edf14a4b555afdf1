"""`rs-local policy fit` gives a remove category its own refusal-gradient vector (no keep set), on Qwen.

Behind the gate nothing else needs protecting, so the vector is the mean refusal gradient of the
category's own refused prompts. The check is behavioural: held-out prompts of the category that
the plain model refuses are routed to it and refused less often under the policy.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.judge.keywords import find_refusal_phrase
from rs_local.prompts import load_prompts
from rs_local.runtime.policy_file import read_policy

DATA = Path(__file__).resolve().parent.parent / "rs_local" / "data"


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _answer(qwen_path, prompt: str, *policy: str) -> dict:
    res = CliRunner().invoke(cli, ["generate", prompt, "--model", str(qwen_path), "-n", "24", "--json", *policy],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_remove_category_gets_its_own_gradient_vector(qwen_path, tmp_path):
    political, harmless = load_prompts(DATA / "political.jsonl"), load_prompts(DATA / "harmless.jsonl")
    pol, ok = _write(tmp_path / "pol.jsonl", political[:12]), _write(tmp_path / "ok.jsonl", harmless[:12])
    out = tmp_path / "policy.gguf"
    res = CliRunner().invoke(cli, ["policy", "fit", "--category", f"political={pol}:remove",
                                   "--category", f"harmless={ok}:keep", "--probe-layers", "12,14", "--folds", "3",
                                   "--model", str(qwen_path), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "political: fitting its vector" in res.output
    cat = next(c for c in read_policy(out).categories if c.name == "political")
    assert cat.vector_source == "refusal gradient of political's refusals (no keep set)"
    assert cat.vector.layers == list(range(8, 17)) and cat.scale == -1.0
    show = CliRunner().invoke(cli, ["policy", "show", str(out)])
    assert "refusal gradient of political" in show.output, show.output

    held_out = [p for p in political[12:24] if find_refusal_phrase(_answer(qwen_path, p)["text"])][:3]
    assert len(held_out) == 3  # the plain model refuses these
    gated = [_answer(qwen_path, p, "--policy", str(out)) for p in held_out]
    assert all(g["policy"]["category"] == "political" and g["policy"]["action"] == "remove" for g in gated)
    assert sum(find_refusal_phrase(g["text"]) is not None for g in gated) <= 1, [g["text"] for g in gated]
