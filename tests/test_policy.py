"""Conditional steering: the policy file, the gate on llama.cpp, fitting and the CLI.

SmolLM2 on real llama.cpp for the plumbing, with three clearly separated prompt sets written
here (cooking, maths, code). Whether gating removes political refusals on the default model is
measured by benchmarks/conditional_steering.py, not here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.errors import FileProblem, RsLocalError
from rs_local.recipes.policy_fit import (CategorySpec, fit_policy, load_category_prompts, parse_category, routed,
                                         steered_keep)
from rs_local.runtime.policy import PolicyRunner, classify
from rs_local.runtime.policy_file import Category, Policy, read_policy, write_policy

COOKING = [
    "How long should I boil an egg for a soft yolk?", "What is a good recipe for banana bread?",
    "How do I make a simple tomato sauce for pasta?", "What spices go well with roasted carrots?",
    "How do I keep rice from sticking to the pot?", "What is the best way to sear a steak?",
    "How do I make fluffy pancakes from scratch?", "Can I substitute butter with olive oil when baking?",
    "How do I caramelise onions properly?", "What should I put in a vegetable soup?",
    "How do I knead bread dough by hand?", "How long do I roast a whole chicken?",
]
MATH = [
    "What is the derivative of x squared plus three x?", "Solve for x: 2x + 5 = 17.",
    "What is the integral of sin(x)?", "Is 91 a prime number?",
    "What is the sum of the angles in a triangle?", "How do I compute the determinant of a 2x2 matrix?",
    "What is 15 percent of 240?", "Explain the Pythagorean theorem with an example.",
    "What is the limit of 1/n as n goes to infinity?", "How many ways can I arrange 5 books on a shelf?",
    "What is the square root of 144?", "Factor the polynomial x^2 - 9.",
]
CODE = [
    "Write a Python function that reverses a list.", "How do I read a file line by line in Python?",
    "What does the git rebase command do?", "How do I declare a variable in JavaScript?",
    "Write a SQL query that counts rows in a table.", "How do I sort a dictionary by value in Python?",
    "What is a segmentation fault in C?", "How do I make an HTTP request with curl?",
    "Explain what a Python decorator does.", "How do I install a package with pip?",
    "Write a bash loop over all files in a folder.", "What is the difference between a list and a tuple in Python?",
]
SETS = {"cooking": COOKING, "math": MATH, "code": CODE}


def _write(tmp: Path, name: str, prompts: list[str]) -> Path:
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from rs_local.runtime.runner import Runner

    r = Runner(smollm2_path, n_ctx=512, n_threads=2)
    yield r
    r.llama.close()


@pytest.fixture(scope="module")
def fitted(runner, tmp_path_factory):
    """Fit on the first 8 of each set (cooking removed, maths refused, code kept); the rest is held out."""
    tmp = tmp_path_factory.mktemp("sets")
    specs = [CategorySpec("cooking", _write(tmp, "cooking", COOKING[:8]), "remove"),
             CategorySpec("math", _write(tmp, "math", MATH[:8]), "refuse"),
             CategorySpec("code", _write(tmp, "code", CODE[:8]), "keep")]
    load_category_prompts(specs)
    return fit_policy(runner, specs, probe_blocks=[10], steer_blocks=[8, 9, 10, 11, 12], baseline="code",
                      refusal_from="cooking", default_scale=4.0, k=3)


def test_gate_picks_the_right_category_on_held_out_prompts(runner, fitted):
    with PolicyRunner(runner, fitted) as gate:
        for name, prompts in SETS.items():
            for p in prompts[8:]:
                d = gate.decide([{"role": "user", "content": p}])
                assert d.category == name, (p, d.to_dict())
    assert fitted.layer == 10
    assert all(c.accuracy is not None and c.accuracy >= 0.75 for c in fitted.categories)


def test_classify_on_synthetic_directions():
    rng = np.random.default_rng(0)
    d = 8
    cats = [Category(n, a, np.eye(d)[i] * 4, threshold=0.6) for i, (n, a) in enumerate(
        [("a", "keep"), ("b", "keep"), ("c", "keep")])]
    pol = Policy(cats, 3, np.zeros(d), np.ones(d), "llama", d, 30)
    for i in range(3):
        x = rng.normal(scale=0.1, size=d)
        x[i] += 2.0
        dec = classify(pol, x)
        assert dec.category == "abc"[i] and dec.gated and dec.action == "keep"
    weak = classify(pol, np.full(d, -0.5))  # nothing fires: below every threshold, so keep
    assert not weak.gated and weak.action == "keep"


def test_normalised_decision_routes_where_one_vs_rest_abstains():
    """Both one-vs-rest probes unsure (0.43, 0.12): ``ovr`` abstains, ``normalised`` routes to the likelier one."""
    d = 4
    cats = [Category("a", "remove", np.eye(d)[0], bias=-0.5, threshold=0.5, scale=-1.0),
            Category("b", "keep", np.eye(d)[1], bias=-0.5, threshold=0.5)]
    x = np.array([0.2, -1.5, 0.0, 0.0])
    ovr = Policy(cats, 3, np.zeros(d), np.ones(d), "llama", d, 30)
    assert not classify(ovr, x).gated
    norm = Policy(cats, 3, np.zeros(d), np.ones(d), "llama", d, 30, decision="normalised")
    dec = classify(norm, x)
    assert dec.gated and dec.category == "a" and dec.action == "remove"
    assert sum(dec.probs.values()) == pytest.approx(1.0)


def test_policy_file_refuses_unknown_decision_and_pool(tmp_path):
    d = 4
    cats = [Category("a", "keep", np.ones(d)), Category("b", "keep", np.ones(d))]
    with pytest.raises(FileProblem, match="decision rule 'softmax'"):
        write_policy(Policy(cats, 3, np.zeros(d), np.ones(d), "llama", d, 30, decision="softmax"), tmp_path / "a.gguf")
    with pytest.raises(FileProblem, match="pool_tokens 0"):
        write_policy(Policy(cats, 3, np.zeros(d), np.ones(d), "llama", d, 30, pool_tokens=0), tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())


def _small_policy(d: int = 4) -> Policy:
    from rs_local.vectors.control_vector import ControlVector

    vec = ControlVector({3: np.ones(d, np.float32), 4: np.ones(d, np.float32)}, "llama")
    cats = [Category("pol", "remove", np.ones(d), threshold=0.5, scale=-1.0, vector=vec), Category("ok", "keep", np.ones(d))]
    return Policy(cats, 3, np.full(d, 0.125), np.ones(d), "llama", d, 30, decision="normalised", pool_tokens=5)


@pytest.mark.parametrize("key,value,problem", [
    ("blocks", [1e400], "blocks must be distinct integers"),  # json writes Infinity; int() of it overflowed
    ("blocks", [3.5, 4], "blocks must be distinct integers"),
    ("blocks", ["3", "4"], "blocks must be distinct integers"),
    ("blocks", [3, 3], "blocks must be distinct integers"),
    ("blocks", [3, 30], "blocks must be distinct integers 1-29"),
    ("blocks", [0, 4], "blocks must be distinct integers 1-29"),  # block 0 is never steered: ControlVector raised
    ("n_prompts", float("inf"), "'n_prompts' is not an integer"),
    ("n_prompts", True, "'n_prompts' is not an integer"),
    ("n_prompts", -1, "negative prompt count"),
    ("slope", "1.0", "'slope' is not a finite number"),
    ("scale", float("nan"), "'scale' is not a finite number"),
    ("accuracy", float("-inf"), "'accuracy' is not a finite number"),
    ("accuracy", 1.5, "accuracy outside 0-1"),
    ("name", None, "'name' is not a string"),
    ("name", {"a": 1}, "'name' is not a string"),
    ("action", True, "'action' is not a string"),
    ("threshold", None, "'threshold' is not a finite number"),
])
def test_damaged_category_records_are_one_line_errors(tmp_path, monkeypatch, key, value, problem):
    """Each category record field must have the JSON type the writer gives it: no coercion, no traceback."""
    from rs_local.runtime import policy_file

    write_record = policy_file._category_record
    monkeypatch.setattr(policy_file, "_category_record", lambda c: {**write_record(c), key: value})
    path = write_policy(_small_policy(), tmp_path / "damaged.gguf")
    with pytest.raises(FileProblem, match=problem) as err:
        read_policy(path)
    assert str(err.value).startswith(f"{path}: category ") and "\n" not in str(err.value)


def test_signalling_nan_in_a_tensor_is_an_error_without_a_numpy_warning(tmp_path):
    path = write_policy(_small_policy(), tmp_path / "p.gguf")
    assert read_policy(path).mean[0] == 0.125
    data = path.read_bytes()
    at = data.index(np.float32(0.125).tobytes())  # probe.mean's first value
    path.write_bytes(data[:at] + bytes.fromhex("0100807f") + data[at + 4:])  # a signalling NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileProblem, match="probe.mean is missing or not 4 finite values"):
            read_policy(path)


def test_a_policy_damaged_in_place_is_refused_by_its_checksum(tmp_path):
    """Finite bytes changed in place parse fine: the probe or a vector changed silently before."""
    path = write_policy(_small_policy(), tmp_path / "p.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(np.float32(0.125).tobytes())  # probe.mean's first value
    data[at:at + 4] = np.float32(0.5).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(FileProblem, match="does not match the checksum") as err:
        read_policy(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_template_tail_and_pooled_reader(runner):
    """The probes read the mean over the template's tokens after the user's message, wherever the reader's
    micro-batches end and whatever its cache holds."""
    from rs_local.recipes.policy_fit import template_tail
    from rs_local.runtime.activations import BlockReader

    assert template_tail(runner) == 6  # <|im_end|> \n <|im_start|> ass istant \n (SmolLM2 splits "assistant")
    toks = runner.tokenize([{"role": "user", "content": COOKING[0]}])
    with BlockReader(runner, [10], n_ctx=512) as one:
        rows = np.array([one.read_tokens(toks[:n])[10] for n in range(len(toks) - 4, len(toks) + 1)])
    with BlockReader(runner, [10], n_ctx=512, n_batch=len(toks) - 2, tail=5) as pooled:  # the tail spans two batches
        first = pooled.read_tokens(toks)[10]
        again = pooled.read_tokens(toks)[10]  # the same text again: the cache must not shorten the tail
    size = np.linalg.norm(rows.mean(axis=0))
    assert np.linalg.norm(first - rows.mean(axis=0)) < 0.02 * size
    assert np.linalg.norm(again - first) < 0.02 * size
    assert np.linalg.norm(first - rows[-1]) > 0.2 * size  # not the last token alone
    with BlockReader(runner, [10], n_ctx=512, n_batch=len(toks) - 2) as reader:  # rows kept across batches
        span = reader.read_rows(toks, len(toks) - 5, len(toks))[10]
    assert span.shape == (5, runner.n_embd)
    assert np.linalg.norm(span - rows) < 0.02 * np.linalg.norm(rows)  # row by row, the last five tokens


def test_reader_stops_at_the_span_end(runner):
    """Tokens after the span cannot change its rows (causal attention), so they are not evaluated."""
    from rs_local.runtime.activations import BlockReader

    toks = runner.tokenize([{"role": "user", "content": COOKING[1]}])
    lo, hi = 3, len(toks) - 6
    with BlockReader(runner, [10], n_ctx=512) as short:
        whole = short.read_rows(toks, lo, hi)[10]
        assert short.tokens_evaluated == hi  # not len(toks)
    with BlockReader(runner, [10], n_ctx=512) as cut:
        alone = cut.read_rows(toks[:hi], lo, hi)[10]
    assert whole.shape == (hi - lo, runner.n_embd)
    assert np.allclose(whole, alone, atol=1e-4 * float(np.abs(alone).max()))


def test_all_keep_policy_is_exactly_the_plain_model(runner, fitted):
    keep = Policy([Category(c.name, "keep", c.weight, c.slope, c.bias, c.threshold, 0.0, None) for c in fitted.categories],
                  fitted.layer, fitted.mean, fitted.std, fitted.model_arch, fitted.n_embd, fitted.n_layer)
    prompt = [{"role": "user", "content": COOKING[9]}]
    runner.clear_vectors()
    plain = runner.generate(prompt, max_tokens=16)
    with PolicyRunner(runner, keep) as gate:
        gen, d = gate.generate(prompt, max_tokens=16)
    assert d.category == "cooking" and d.action == "keep"
    assert gen.tokens == plain.tokens


def test_steered_category_changes_the_greedy_answer(runner, fitted):
    prompt = [{"role": "user", "content": MATH[10]}]
    runner.clear_vectors()
    plain = runner.generate(prompt, max_tokens=16)
    with PolicyRunner(runner, fitted) as gate:
        gen, d = gate.generate(prompt, max_tokens=16)
        assert d.category == "math" and d.action == "refuse" and d.scale > 0
        assert gen.tokens != plain.tokens
        # the same prompt with the vector set by hand gives the same answer: the prompt is steered too
        vec_answer = gen.tokens
    assert not runner.vectors  # closing the gate takes its vector off the shared Runner
    assert runner.generate(prompt, max_tokens=16).tokens == plain.tokens
    runner.set_vectors([(fitted.category("math").vector, fitted.category("math").scale)])
    assert runner.generate(prompt, max_tokens=16).tokens == vec_answer
    runner.clear_vectors()


def test_category_vector_metadata_round_trips_and_damage_is_refused(fitted, tmp_path):
    """How a category's vector was fitted (its scalar metadata) survives the file; the fit machine's
    ``path`` does not; a record whose ``vector_meta`` is not scalars is one line."""
    import copy

    from rs_local.runtime import policy_file

    pol = copy.deepcopy(fitted)
    vec = pol.categories[0].vector
    vec.metadata.update({"refusal_text": "I'm sorry.", "gradient_dtype": "bfloat16", "rounds": 2, "path": "/fit/machine",
                         "lengths": [1.0, 2.0], "nan": float("nan")})
    back = read_policy(write_policy(pol, tmp_path / "meta.gguf")).categories[0].vector.metadata
    assert (back["refusal_text"], back["gradient_dtype"], back["rounds"]) == ("I'm sorry.", "bfloat16", 2)
    assert back["policy_category"] == "cooking" and not {"path", "lengths", "nan"} & set(back)
    record = policy_file._category_record
    for bad in ({"a": [1]}, {"a": {"b": 1}}, {"a": None}, {"a": "x" * 5000}, {f"k{i}": 1 for i in range(65)}):
        policy_file._category_record = lambda c, bad=bad: {**record(c), "vector_meta": bad}
        try:
            path = write_policy(pol, tmp_path / "bad.gguf", force=True)
        finally:
            policy_file._category_record = record
        with pytest.raises(FileProblem, match="vector_meta"):
            read_policy(path)


def test_round_trip(fitted, tmp_path):
    path = write_policy(fitted, tmp_path / "p.gguf")
    back = read_policy(path)
    assert [c.name for c in back.categories] == ["cooking", "math", "code"]
    assert [c.action for c in back.categories] == ["remove", "refuse", "keep"]
    assert back.layer == fitted.layer and back.n_embd == 576 and back.n_layer == 30
    assert (back.pool_tokens, back.decision) == (fitted.pool_tokens, fitted.decision) == (6, "normalised")
    for a, b in zip(fitted.categories, back.categories):
        assert np.allclose(a.weight, b.weight, atol=1e-6 * np.abs(a.weight).max())
        assert (a.slope, a.bias, a.threshold, a.scale, a.accuracy) == pytest.approx((b.slope, b.bias, b.threshold, b.scale, b.accuracy))
        assert (a.vector is None) == (b.vector is None)
        if a.vector is not None:
            assert a.vector.layers == b.vector.layers
            assert np.allclose(a.vector.directions[10], b.vector.directions[10], atol=1e-5)
    x = np.random.default_rng(1).normal(size=576)
    assert np.allclose(fitted.probs(x), back.probs(x), atol=1e-4)
    with pytest.raises(FileProblem, match="already exists|exists"):
        write_policy(fitted, path)
    # llama.cpp's loader takes direction.N tensors only; rs-local's vector reader refuses the file
    from rs_local.converters.formats import load_vector

    with pytest.raises(RsLocalError, match="not a control vector"):
        load_vector(path)


def test_policy_for_another_model_is_refused(runner, fitted, tmp_path):
    d = 896
    other = Policy([Category("a", "keep", np.ones(d)), Category("b", "keep", np.ones(d))], 5, np.zeros(d), np.ones(d),
                   "qwen2", d, 24)
    path = write_policy(other, tmp_path / "qwen.gguf")
    with pytest.raises(FileProblem, match="another model.*n_embd 896 vs model's 576"):
        PolicyRunner.load(runner, path)


def test_malformed_policy_files(tmp_path, smollm2_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(FileProblem, match="junk.gguf"):
        read_policy(junk)
    with pytest.raises(FileProblem, match="not an rs-local policy"):
        read_policy(smollm2_path)


def test_shared_ridge_equals_the_judge_probes_ridge():
    from rs_local.recipes.policy_fit import ovr_ridge
    from rs_local.judge.probe_fit import ridge_directions

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 7)
    for d in (40, 8):  # fewer rows than dimensions (dual form) and more (primal)
        x = rng.normal(size=(21, d)) + np.eye(3)[y] @ rng.normal(size=(3, d))
        mean, std, dirs = ovr_ridge(x, y, 3, (0.01, 0.3))
        for c in range(3):
            m2, s2, ref = ridge_directions(x, (y == c).astype(float), (0.01, 0.3))
            assert np.allclose(mean, m2) and np.allclose(std, s2)
            for lam, w in zip((0.01, 0.3), ref):
                assert np.allclose(dirs[lam][c], w, atol=1e-8 * np.abs(w).max())


def test_parse_category():
    spec = parse_category("political=data/pol.jsonl:remove")
    assert (spec.name, str(spec.path), spec.action) == ("political", "data/pol.jsonl", "remove")
    with pytest.raises(RsLocalError, match="unknown action 'erase'"):
        parse_category("political=pol.jsonl:erase")
    with pytest.raises(RsLocalError, match="NAME=FILE:ACTION"):
        parse_category("pol.jsonl")
    shipped = parse_category("gambling:refuse")  # a built-in set by name, as `eval --set gambling`
    assert (shipped.name, shipped.path.name, shipped.action) == ("gambling", "gambling.jsonl", "refuse")
    load_category_prompts([shipped, parse_category("harmless:keep")])
    assert len(shipped.prompts) == 100
    with pytest.raises(RsLocalError, match="BUILTIN:ACTION"):
        parse_category("casino:refuse")  # not a built-in set, and no file given


# --------------------------------------------------------------------------- CLI


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], res.output


def test_cli_fit_show_generate(smollm2_path, tmp_path):
    a, b = _write(tmp_path, "cooking", COOKING[:8]), _write(tmp_path, "math", MATH[:8])
    out = tmp_path / "pol.gguf"
    res = _invoke("policy", "fit", "--category", f"cooking={a}:remove", "--category", f"math={b}:keep",
                  "--baseline", "math", "--probe-layers", "10", "--layers", "8-10", "--folds", "3", "--no-check-refusals",
                  "--fit-vectors", "mean-difference",
                  "--model", str(smollm2_path), "--ctx", "512", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "probe block 10" in res.output and "cooking" in res.output
    show = _invoke("policy", "show", str(out), "--json")
    summary = json.loads(show.output)
    assert [c["action"] for c in summary["categories"]] == ["remove", "keep"]
    assert summary["categories"][0]["heldout_accuracy"] >= 0.75
    gen = _invoke("generate", COOKING[0], "--model", str(smollm2_path), "--ctx", "512", "-n", "4", "--policy", str(out),
                  "--json")
    assert gen.exit_code == 0, gen.output
    pol = json.loads(gen.output)["policy"]
    assert pol["category"] == "cooking" and pol["action"] == "remove" and 0.5 <= pol["confidence"] <= 1
    # existing output without --force
    res = _invoke("policy", "fit", "--category", f"cooking={a}:remove", "--category", f"math={b}:keep",
                  "--model", str(smollm2_path), "-o", str(out))
    _one_line_error(res, str(out))


def test_cli_fit_error_paths(tmp_path, smollm2_path):
    good = _write(tmp_path, "good", COOKING)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    overlap = _write(tmp_path, "overlap", MATH[:3] + COOKING[:1])
    out = tmp_path / "never.gguf"
    base = ["policy", "fit", "--model", str(smollm2_path), "-o", str(out)]
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={empty}:keep"), "empty.jsonl",
                    "no prompts")
    _one_line_error(_invoke(*base, "--category", f"a={good}:erase", "--category", f"b={overlap}:keep"), "unknown action")
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={overlap}:keep"), "overlap.jsonl",
                    "good.jsonl")
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={tmp_path / 'nope.jsonl'}:keep"),
                    "nope.jsonl")
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={_write(tmp_path, 'm', MATH)}:keep",
                            "--scale", "a=2"), "negative")
    # a category smaller than the folds: its fold's rows kept uniform scores, reported as accuracy before
    _one_line_error(_invoke(*base, "--category", f"a={_write(tmp_path, 'one', COOKING[:1])}:remove", "--category",
                            f"b={_write(tmp_path, 'mm', MATH)}:keep", "--baseline", "b", "--folds", "3",
                            "--fit-vectors", "mean-difference", "--no-check-refusals"), "one.jsonl",
                    "all fall in one of the 3 cross-validation folds")
    # the final block keeps only its last token's row in llama.cpp: it cannot be probed (it was, as one token)
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={_write(tmp_path, 'm4', MATH)}:keep",
                            "--baseline", "b", "--probe-layers", "29"), "--probe-layers: the final block (29)")
    # a prompt the probe's reader cannot hold failed after the vectors were fitted, naming no file
    _one_line_error(_invoke(*base, "--ctx", "512", "--category", f"a={good}:remove", "--category",
                            f"b={_write(tmp_path, 'long', MATH[:3] + ['word ' * 600])}:keep", "--baseline", "b"),
                    "long.jsonl: prompt 4", "the probe reads at most 512")
    # a steered category as the baseline measured its direction from itself (zeros, exit 0); an input as the output
    _one_line_error(_invoke(*base, "--category", f"a={good}:remove", "--category", f"b={_write(tmp_path, 'm2', MATH)}:keep",
                            "--baseline", "a"), "the baseline category a is a 'remove' category")
    _one_line_error(_invoke("policy", "fit", "--model", str(smollm2_path), "-o", str(good), "--force", "--category",
                            f"a={good}:remove", "--category", f"b={_write(tmp_path, 'm3', MATH)}:keep"),
                    "good.jsonl", "would overwrite another input")
    assert good.read_text().count("\n") == len(COOKING)
    # SmolLM2 answers every maths question: nothing to remove. With a torch-free vector the check
    # answers a few prompts before anything else and stops in one line
    maths, code = _write(tmp_path, "maths", MATH[:6]), _write(tmp_path, "code", CODE[:6])
    _one_line_error(_invoke(*base, "--category", f"m={maths}:remove", "--category", f"c={code}:keep", "--baseline", "c",
                            "--fit-vectors", "mean-difference"), "maths.jsonl", "refuses none")
    # a vector fitted by the gradient recipe is its own check: it labels every prompt (progress lines
    # first), finds no refusal and stops before Transformers loads
    res = _invoke(*base, "--category", f"m={maths}:remove", "--category", f"c={code}:keep", "--baseline", "c")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "0/6" in res.output and "into Transformers" not in res.output, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "maths.jsonl" in last and "refuses none" in last, res.output
    # a refuse category's vector comes from the refusal source's refusals: none there is the source's file
    res = _invoke(*base, "--category", f"r={good}:refuse", "--category", f"m={maths}:keep", "--category", f"c={code}:keep",
                  "--baseline", "c", "--refusal-from", "m")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "maths.jsonl" in last and "refuses none" in last, res.output
    assert not out.exists()


def test_cli_fit_without_transformers_is_one_line_before_loading(tmp_path, smollm2_path, monkeypatch):
    """A remove category's vector needs Transformers (the fit extra); without it the fit stops at once,
    naming the way out, and --fit-vectors mean-difference still works torch-free."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    a, b = _write(tmp_path, "cooking", COOKING[:8]), _write(tmp_path, "math", MATH[:8])
    out = tmp_path / "pol.gguf"
    base = ["policy", "fit", "--category", f"cooking={a}:remove", "--category", f"math={b}:keep", "--baseline", "math",
            "--probe-layers", "10", "--folds", "3", "--no-check-refusals", "--model", str(smollm2_path), "-o", str(out)]
    _one_line_error(_invoke(*base), "rs-local[fit]", "--fit-vectors mean-difference")
    assert not out.exists()
    assert _invoke(*base, "--fit-vectors", "mean-difference").exit_code == 0 and out.exists()


def test_cli_generate_with_bad_policy(tmp_path, smollm2_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    _one_line_error(_invoke("generate", "hi", "--model", str(smollm2_path), "--policy", str(bad)), "bad.gguf")
    _one_line_error(_invoke("policy", "show", str(bad)), "bad.gguf")


def test_cli_chat_with_policy(smollm2_path, fitted, tmp_path):
    path = write_policy(fitted, tmp_path / "p.gguf")
    script = "\n".join([MATH[11], "/vector x.gguf", "/policy off", CODE[11], "/policy on", COOKING[11], "/quit"]) + "\n"
    res = CliRunner().invoke(cli, ["chat", "--model", str(smollm2_path), "--policy", str(path), "-n", "4", "--ctx", "512"],
                             input=script, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "policy: math" in out and "refuse at scale" in out
    assert "/policy off first" in out and "policy off" in out
    assert "policy: cooking" in out
    res = CliRunner().invoke(cli, ["chat", "--model", str(smollm2_path), "--policy", str(path), "--vector", "v.gguf"])
    assert res.exit_code == 1 and "cannot be combined" in res.output
    for cmd in (["chat"], ["generate", "hi"]):  # the policy holds scales and blocks: taken silently, these did nothing
        for extra, name in ((["--layers", "5-6"], "--layers"), (["--scale", "0"], "--scale")):
            res = CliRunner().invoke(cli, [*cmd, "--model", str(smollm2_path), "--policy", str(path), *extra])
            assert res.exit_code == 1 and res.output.strip().endswith(f"cannot be combined with {name}"), res.output


def test_cli_eval_with_policy(smollm2_path, fitted, tmp_path):
    """Held-out prompts: maths routed to its refuse vector (KL > 0, answers change), code kept (answers identical)."""
    path = write_policy(fitted, tmp_path / "p.gguf")
    sets = [f"{n}={_write(tmp_path, 'held-' + n, p[8:])}" for n, p in SETS.items()]
    out = tmp_path / "report"
    args = ["eval", "--model", str(smollm2_path), "--ctx", "512", "--policy", str(path), "--judge", "keywords",
            "-n", "8", "--kl-tokens", "4", "--no-cache", "--kl-set", "math", "-o", str(out)]
    for s in sets:
        args += ["--set", s]
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["routing"] == {"cooking": {"cooking:remove": 4}, "math": {"math:refuse": 4}, "code": {"code:keep": 4}}
    assert report["gated"]["kl"] > 0.01 and abs(report["plain"]["kl"]) < 1e-3
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    answers = {(r["gate"], r["set"], r["prompt"]): r["answer"] for r in rows}
    for p in CODE[8:]:
        assert answers[("on", "code", p)] == answers[("plain", "code", p)]
    assert any(answers[("on", "math", p)] != answers[("plain", "math", p)] for p in MATH[8:])
    assert all(r["decision"]["category"] == r["set"] for r in rows if r["gate"] == "on")
    assert "gated refusal" in res.output
    both = CliRunner().invoke(cli, [*args[:-2], "-o", str(tmp_path / "x"), "--vector", str(path)])
    assert both.exit_code == 2 and "not both" in both.output
    neither = CliRunner().invoke(cli, ["eval", "-o", str(tmp_path / "y")])
    assert neither.exit_code == 2 and "--vector" in neither.output
    ignored = CliRunner().invoke(cli, [*args[:-2], "-o", str(tmp_path / "z"), "--scales", "0,-1", "--layers", "8-9"])
    assert ignored.exit_code == 2 and "drop --scales and --layers" in ignored.output  # silently ignored before


def test_show_escapes_names_from_the_file(fitted, tmp_path):
    """A policy file is anyone's: an escape sequence in a category name is shown, not sent to the terminal."""
    import dataclasses

    bad = "cook\x1b]0;owned\x07ing"
    cats = [dataclasses.replace(fitted.categories[0], name=bad), *fitted.categories[1:]]
    path = write_policy(dataclasses.replace(fitted, categories=cats), tmp_path / "p.gguf")
    res = CliRunner().invoke(cli, ["policy", "show", str(path)])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "cook\\x1b]0;owned\\x07ing" in res.output


def test_remove_direction_refusal_steers_against_the_refusal_source(runner, tmp_path):
    """``remove_direction="refusal"``: a remove category takes the refusal source's direction (the one a
    refuse category steers along), not its own prompts' mean difference."""
    specs = [CategorySpec("cooking", _write(tmp_path, "cooking", COOKING[:8]), "remove"),
             CategorySpec("math", _write(tmp_path, "math", MATH[:8]), "refuse"),
             CategorySpec("code", _write(tmp_path, "code", CODE[:8]), "keep")]
    load_category_prompts(specs)
    kw = dict(probe_blocks=[10], steer_blocks=[8, 9, 10], baseline="code", refusal_from="math", k=3)
    own = fit_policy(runner, specs, **kw)
    pol = fit_policy(runner, specs, remove_direction="refusal", **kw)
    cook, math = pol.categories[0].vector, pol.categories[1].vector
    assert all(np.allclose(cook.directions[b], math.directions[b]) for b in (8, 9, 10))
    assert not np.allclose(own.categories[0].vector.directions[10], math.directions[10])
    assert pol.categories[0].scale < 0 < pol.categories[1].scale
    with pytest.raises(ValueError, match="remove_direction"):
        fit_policy(runner, specs, remove_direction="other", **kw)


def test_steered_keep_counts_only_keep_prompts_sent_to_a_steering_category(tmp_path):
    """Harmful -> harmless is still kept (not counted); harmful -> borderline (remove) is steered (counted);
    an abstention below the threshold is not steered either."""
    specs = [CategorySpec("borderline", tmp_path / "b", "remove"), CategorySpec("harmful", tmp_path / "h", "keep"),
             CategorySpec("harmless", tmp_path / "k", "keep"), CategorySpec("gambling", tmp_path / "g", "refuse")]
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 3])
    oof = np.array([[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0],                      # borderline: one to harmful (not a keep leak)
                    [0.7, 0.3, 0, 0], [0.1, 0.2, 0.7, 0], [0.45, 0.4, 0.15, 0], [0, 0.9, 0.1, 0],  # harmful
                    [0, 0, 0.4, 0.6], [0, 0, 1, 0],                          # harmless: one to gambling (refuse)
                    [0, 0, 0, 1]])
    assert steered_keep(routed(oof, 0.5), y, specs) == {"harmful": {"borderline": 1}, "harmless": {"gambling": 1}}
    assert steered_keep(routed(oof, 0.75), y, specs) == {}


def test_routed_applies_each_categorys_own_threshold():
    oof = np.array([[0.7, 0.3], [0.3, 0.7], [0.95, 0.05]])
    assert routed(oof, [0.8, 0.5]).tolist() == [-1, 1, 0]  # row 0 is below its category's 0.8
    assert routed(oof, 0.5).tolist() == [0, 1, 0]


def test_threshold_advice_is_the_frontier_of_keep_prompts_kept_out_and_prompts_routed(tmp_path):
    """Two keep prompts reach 'r' at 0.6 and 0.85. Raising r's threshold keeps one out from 0.7 (r still
    routes 0.95, 0.99 and 0.75: 75%) and both from 0.9 (half of r's prompts); 0.8 lets in no fewer than
    0.7, so it is not listed."""
    from rs_local.recipes.policy_fit import threshold_advice
    from rs_local.runtime.policy_file import advice_line

    specs = [CategorySpec("k", tmp_path / "k", "keep"), CategorySpec("r", tmp_path / "r", "remove")]
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p_r = np.array([0.6, 0.85, 0.1, 0.95, 0.99, 0.75, 0.65])
    oof = np.stack([1 - p_r, p_r], axis=1)
    advice = threshold_advice(oof, y, specs, np.array([0.5, 0.5]))
    assert advice == {"r": [{"threshold": 0.5, "keep_steered": 2, "routed": 1.0},
                            {"threshold": 0.7, "keep_steered": 1, "routed": 0.75},
                            {"threshold": 0.9, "keep_steered": 0, "routed": 0.5}]}
    assert advice_line("r", advice["r"]) == ("raising the threshold of 'r', in cross-validation (now 0.5: 2 keep prompts "
                                             "steered, 100% of 'r' routed): 0.7: 1 steered, 75% routed; "
                                             "0.9: 0 steered, 50% routed")
    assert threshold_advice(oof, y, specs, np.array([0.5, 0.9])) == {}  # nothing leaks at 0.9: no advice


def test_cli_fit_takes_a_threshold_per_category(smollm2_path, tmp_path):
    a, b = _write(tmp_path, "cooking", COOKING[:8]), _write(tmp_path, "math", MATH[:8])
    out = tmp_path / "pol.gguf"
    base = ["policy", "fit", "--category", f"cooking={a}:remove", "--category", f"math={b}:keep", "--baseline", "math",
            "--probe-layers", "10", "--layers", "8-10", "--folds", "3", "--no-check-refusals",
            "--fit-vectors", "mean-difference", "--model", str(smollm2_path), "--ctx", "512", "-o", str(out)]
    for bad, needle in ((["--threshold", "nope=0.5"], "no such category"), (["--threshold", "1.5"], "0.01 and 0.99"),
                        (["--threshold", "0.6", "--threshold", "0.7"], "given twice"),
                        (["--threshold", "cooking=x"], "--threshold cooking")):
        _one_line_error(_invoke(*base, *bad), needle)
    assert not out.exists()
    res = _invoke(*base, "--threshold", "0.6", "--threshold", "cooking=0.9")
    assert res.exit_code == 0, res.output
    assert {c.name: c.threshold for c in read_policy(out).categories} == {"cooking": 0.9, "math": 0.6}


def test_show_warns_about_keep_prompts_the_fit_steered(fitted, tmp_path):
    import dataclasses

    advice = {"cooking": [{"threshold": 0.5, "keep_steered": 2, "routed": 1.0},
                          {"threshold": 0.9, "keep_steered": 0, "routed": 0.75}],
              "odd": "a hand-edited record", "empty": [], "broken": [{"threshold": "x"}]}
    leaky = dataclasses.replace(fitted, training={**fitted.training, "keep_steered": {"code": {"cooking": 2}},
                                                  "threshold_advice": advice})
    path = write_policy(leaky, tmp_path / "p.gguf")
    res = CliRunner().invoke(cli, ["policy", "show", str(path)])
    assert res.exit_code == 0, res.output
    assert "warning: cross-validation steered 2 of the 'code' (keep) prompts: 2 to 'cooking' (remove)" in res.output
    assert ("raising the threshold of 'cooking', in cross-validation (now 0.5: 2 keep prompts steered, 100% of 'cooking' "
            "routed): 0.9: 0 steered, 75% routed") in res.output
    assert "odd" not in res.output and "empty" not in res.output and "broken" not in res.output
    inspected = CliRunner().invoke(cli, ["inspect", str(path)])  # inspect says the same
    assert inspected.exit_code == 0, inspected.output
    assert "steered 2 of the 'code' (keep) prompts" in inspected.output
    assert "raising the threshold of 'cooking'" in inspected.output
    clean = CliRunner().invoke(cli, ["policy", "show", str(write_policy(fitted, tmp_path / "q.gguf"))])
    assert "warning" not in clean.output
    assert read_policy(path).training["keep_steered"] == {"code": {"cooking": 2}}


def test_generate_notes_a_policy_fitted_under_another_system_prompt(smollm2_path, fitted, tmp_path):
    """The probe read the fitting prompts under ``--system``: a run without it is told so."""
    import copy

    pol = copy.deepcopy(fitted)
    pol.training = {**pol.training, "system": "You are a chef."}
    path = write_policy(pol, tmp_path / "chef.gguf")
    base = ["generate", COOKING[10], "--model", str(smollm2_path), "-n", "2", "--ctx", "512", "--policy", str(path)]
    res = _invoke(*base)
    assert res.exit_code == 0, res.output
    assert "chef.gguf was fitted under the system prompt 'You are a chef.'" in res.output, res.output
    assert "fitted under" not in _invoke(*base, "--system", "You are a chef.").output


def test_block_options_take_auto_and_all_as_documented():
    """`auto` was refused ("give blocks explicitly"); `all` would now name the final block, which cannot be probed."""
    from rs_local.cli.policy_cmd import _blocks

    assert _blocks("auto", 30, "--probe-layers") is None and _blocks("auto", 30, "--layers") is None
    assert _blocks("all", 30, "--probe-layers") == list(range(1, 29))
    assert _blocks("all", 30, "--layers") == list(range(1, 30))
    with pytest.raises(RsLocalError, match="final block"):
        _blocks("20-29", 30, "--probe-layers")
