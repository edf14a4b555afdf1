"""`rs-local policy fit` gives steered categories refusal-gradient vectors (no keep set), on Qwen.

Behind the gate nothing else needs protecting, so a remove category's vector is the mean refusal
gradient of its own refused prompts, and a refuse category's the gradient of the model's stock
refusal of the refusal source (harmful) on the category's own prompts.
The checks are behavioural: held-out prompts of the remove category that the plain model refuses
are routed to it and refused less often under the policy; held-out prompts of the refuse category
that the plain model answers are refused under it.
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


def test_steered_categories_get_gradient_vectors(qwen_path, tmp_path):
    sets = {n: load_prompts(DATA / f"{n}.jsonl") for n in ("political", "harmless", "harmful", "gambling")}
    files = {n: _write(tmp_path / f"{n}.jsonl", ps[:12]) for n, ps in sets.items()}
    out = tmp_path / "policy.gguf"
    res = CliRunner().invoke(cli, ["policy", "fit", "--category", f"political={files['political']}:remove",
                                   "--category", f"harmless={files['harmless']}:keep",
                                   "--category", f"harmful={files['harmful']}:keep",
                                   "--category", f"gambling={files['gambling']}:refuse",
                                   "--probe-layers", "12,14", "--folds", "3",
                                   "--model", str(qwen_path), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "political: fitting its vector" in res.output and "gambling: fitting its vector" in res.output
    cats = {c.name: c for c in read_policy(out).categories}
    assert cats["political"].vector_source == "refusal gradient of political's refusals (no keep set)"
    # the refusal text comes from the model's answers to harmful prompts; Qwen's stock one starts "I'm"
    assert cats["gambling"].vector_source.startswith("harmful's stock refusal, induced on gambling: I'm")
    meta = cats["gambling"].vector.metadata  # how it was fitted travels in the policy file
    assert meta["method"] == "induced-refusal gradient" and cats["gambling"].vector_source.endswith(meta["refusal_text"])
    assert cats["political"].vector.layers == list(range(8, 17)) and cats["political"].scale == -1.0
    assert cats["gambling"].scale == 1.0
    show = CliRunner().invoke(cli, ["policy", "show", str(out)])
    assert "refusal gradient of political" in show.output, show.output

    held_out = [p for p in sets["political"][12:24] if find_refusal_phrase(_answer(qwen_path, p)["text"])][:3]
    assert len(held_out) == 3  # the plain model refuses these
    gated = [_answer(qwen_path, p, "--policy", str(out)) for p in held_out]
    assert all(g["policy"]["category"] == "political" and g["policy"]["action"] == "remove" for g in gated)
    assert sum(find_refusal_phrase(g["text"]) is not None for g in gated) <= 1, [g["text"] for g in gated]

    answered = [p for p in sets["gambling"][12:24] if not find_refusal_phrase(_answer(qwen_path, p)["text"])][:3]
    assert len(answered) == 3  # the plain model answers these
    gated = [_answer(qwen_path, p, "--policy", str(out)) for p in answered]
    assert all(g["policy"]["category"] == "gambling" and g["policy"]["action"] == "refuse" for g in gated)
    assert sum(find_refusal_phrase(g["text"]) is not None for g in gated) >= 2, [g["text"] for g in gated]
    # the model's own refusal of harmful requests, not the political one the source's gradient drifted into
    assert not any("politic" in g["text"].lower() for g in gated), [g["text"] for g in gated]


def test_first_sentence_is_what_refusals_share():
    from rs_local.recipes.induce import first_sentence

    assert first_sentence("I'm sorry, but I can't assist with that. If you have other questions") == \
        "I'm sorry, but I can't assist with that."
    assert first_sentence("  As an AI\nlanguage model, I cannot vote!  Ask me") == "As an AI language model, I cannot vote!"
    assert first_sentence("No stop at all") == "No stop at all"
    assert first_sentence("Version 2.5 is out. Next") == "Version 2.5 is out."  # a decimal point is not an end


def test_a_stock_refusal_found_once_is_not_labelled_again(smollm2_path):
    """Several refuse categories share the source's stock refusal: given it, ``fit_induced`` labels
    nothing (an empty source would otherwise stop with "refuses none") and fits on it directly."""
    from rs_local.recipes.induce import fit_induced
    from rs_local.recipes.isolate import Recipe

    vec = fit_induced(str(smollm2_path), ["Name a card game.", "How do dice work?"], [],
                      ["Name a river.", "How do I boil an egg?"], Recipe(layers="4-6"), refusal="I'm sorry.")
    assert vec.metadata["refusal_text"] == "I'm sorry." and vec.layers == [4, 5, 6]
    assert vec.metadata["n_gradients"] == 2
