"""Evaluator, sweep and baseline-cache logic on a deterministic engine (no model loaded).

The engine (tests/fake_engine.py) refuses a ``[T]``-tagged prompt while the steering is above
``T``, so every rate below is known in advance. The model file only names the model in cache
keys (the real SmolLM2 GGUF, whose identity is its published sha256; it is never loaded).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from fake_engine import FakeEngine, tagged
from rs_local.eval.baseline_cache import EvalCache
from rs_local.eval.engines import SequentialEngine
from rs_local.eval.evaluate import EvalSettings, Evaluator, evaluate
from rs_local.eval.prompt_sets import PromptSet
from rs_local.eval.sweep import evaluator_objective, search_scale
from rs_local.runtime.batched import BatchEngine
from rs_local.runtime.engine import Engine
from rs_local.vectors.control_vector import ControlVector

TARGET = PromptSet("target", [tagged(-0.5, "t1"), tagged(-1.5, "t2"), tagged(-3.0, "t3"), tagged(-3.5, "t4")])
KEEP = PromptSet("keep", [tagged(-2.2, "k1"), tagged(-5, "k2"), tagged(-5, "k3"), tagged(-5, "k4")])
HARMLESS = PromptSet("harmless", ["h1", "h2", "h3"])
SETTINGS = EvalSettings(max_tokens=16, kl_tokens=4, batch=1)


def vector(seed: int = 0) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector({layer: rng.normal(size=576).astype(np.float32) for layer in range(8, 12)}, "llama")


@pytest.fixture
def engine(smollm2_path):
    return FakeEngine(smollm2_path)


def test_both_engines_and_the_fake_have_the_protocols_calls(engine):
    assert isinstance(engine, Engine)
    for name in ("set_vectors", "generate_many", "forced_logprobs", "close"):
        want = list(inspect.signature(getattr(Engine, name)).parameters)
        for cls in (SequentialEngine, BatchEngine, FakeEngine):
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
    for cls in (SequentialEngine, BatchEngine):
        assert isinstance(cls.model_path, property) and isinstance(cls.n_layer, property), cls.__name__


def test_bad_sets_scales_and_bands_are_errors_not_rates(engine):
    """An empty set read 0% refused; a string was taken letter by letter; a band missing the vector measured
    the plain model under a steered label."""
    from rs_local.errors import RsLocalError

    for sets, scales, layers, message in (
            ([PromptSet("a", [])], [-1.0], None, "set a has no prompts"),
            ([PromptSet("a", "hi")], [-1.0], None, "prompts must be a list of strings"),
            ([TARGET], [float("nan")], None, "must be finite"),
            ([TARGET], [-1.0], (25, 28), "selects none of them")):
        with pytest.raises(RsLocalError, match=message):
            evaluate(None, sets, scales, engine=engine, vector=vector(), layers=layers, settings=SETTINGS,
                     cache=EvalCache(None))


def test_rates_and_kl_follow_the_steering(engine):
    report = evaluate(None, [TARGET, KEEP, HARMLESS], [-2.0, -0.5], engine=engine, vector=vector(),
                      settings=SETTINGS, cache=EvalCache(None))
    plain, strong, weak = report.points  # scale 0 is added first
    assert plain.scale == 0 and plain.rate("target") == 1.0 and plain.rate("keep") == 1.0
    assert plain.kl == pytest.approx(0.0, abs=1e-9)
    assert weak.rate("target") == 0.75 and strong.rate("target") == 0.5 and strong.rate("keep") == 1.0
    assert 0 < weak.kl < strong.kl
    assert report.meta["model"] == engine.model_path.name and report.meta["engine"] == "fake"
    # the engine is the caller's: left without steering, not closed
    assert engine.steering == 0.0 and not engine.closed


def test_baseline_cache_is_reused_and_a_new_vector_is_not_served_old_answers(tmp_path, smollm2_path):
    sets = [TARGET, HARMLESS]
    n_prompts = len(TARGET) + len(HARMLESS)
    first = FakeEngine(smollm2_path)
    evaluate(None, sets, [-1.0], engine=first, vector=vector(0), settings=SETTINGS, cache=EvalCache(tmp_path))
    assert len(first.generated) == 2 * n_prompts  # plain and steered
    again = FakeEngine(smollm2_path)
    evaluate(None, sets, [-1.0], engine=again, vector=vector(0), settings=SETTINGS, cache=EvalCache(tmp_path))
    assert again.generated == []  # every answer came from the cache
    other = FakeEngine(smollm2_path)
    report = evaluate(None, sets, [-1.0], engine=other, vector=vector(1), settings=SETTINGS, cache=EvalCache(tmp_path))
    assert len(other.generated) == n_prompts  # the plain answers are shared, the steered ones are new
    steered = [a.answer for a in report.points[1].answers if not a.refusal]
    assert steered and all(other.vector_digest in a for a in steered)


def test_sweep_picks_the_gentlest_scale_with_the_lowest_target_rate_within_the_keep_floor(engine):
    ev = Evaluator(None, [TARGET, KEEP], engine=engine, vector=vector(), settings=SETTINGS, cache=EvalCache(None))
    objective = evaluator_objective(ev, "target", ["keep"], max_kl=None, keep_frac=0.9)
    result = search_scale(objective, max_kl=None, keep_frac=0.9, step=0.5, max_abs=4.0, refine=3)
    # keep k1 stops being refused at -2.2 (3/4 < 0.9 of the baseline); target is 50% from -1.5 to there
    assert result.chosen is not None and result.chosen.scale == -1.5 and result.chosen.target == 0.5
    broken = {p.scale: p for p in result.points if not p.feasible}
    assert -2.5 in broken and "keep refusal 75%" in broken[-2.5].reason
    assert all(p.scale > -2.2 for p in result.points if p.feasible)


def test_sweep_stops_at_the_kl_limit_and_skips_generation_there(engine):
    ev = Evaluator(None, [TARGET, KEEP, HARMLESS], engine=engine, vector=vector(), settings=SETTINGS, cache=EvalCache(None))
    limit = float(np.mean(ev.kl(-1.0))) * 1.01  # -1.0 is allowed, anything stronger is not
    objective = evaluator_objective(ev, "target", ["keep"], max_kl=limit, keep_frac=0.9)
    result = search_scale(objective, max_kl=limit, keep_frac=0.9, step=0.5, max_abs=4.0, refine=0)
    by_scale = {p.scale: p for p in result.points}
    assert by_scale[-1.0].feasible and not by_scale[-1.5].feasible and "KL" in by_scale[-1.5].reason
    # -0.5 and -1.0 both leave 75% of the target refused: the tie goes to the lower KL
    assert result.chosen.scale == -0.5 and result.chosen.target == by_scale[-1.0].target == 0.75
    over = [p for p in result.points if p.kl is not None and p.kl > limit]
    assert over and all(not p.feasible and p.target is None for p in over)
    answered_at = {steering for _q, steering in engine.generated}
    assert answered_at and not answered_at & {p.scale for p in over}  # KL first: nothing generated there


def test_damaged_cache_entries_are_misses(tmp_path):
    """A cut, emptied or foreign entry in the baseline/verdict cache is recomputed, never a traceback."""
    from rs_local.eval.metrics import Reference
    from rs_local.runtime.runner import Generation

    cache = EvalCache(tmp_path)
    gen = Generation("Sure: xs[::-1].", [5, 6, 7], [-0.1, -0.2, -0.3], "stop", 12)
    ref = Reference(np.arange(6, dtype=np.int32).reshape(3, 2), np.full((3, 2), -1.0, np.float32))
    verdict = {"verdict": 1, "confidence": 0.5}
    cache.put_generation("g", gen)
    cache.put_reference("r", ref)
    cache.put_verdict("v", verdict)
    assert cache.get_generation("g") == gen and cache.get_verdict("v") == verdict
    np.testing.assert_array_equal(cache.get_reference("r").ids, ref.ids)
    files = {kind: next((tmp_path / kind).rglob("*.*")) for kind in ("generation", "reference", "verdict")}
    good = {kind: f.read_bytes() for kind, f in files.items()}
    for kind, damaged in [("generation", b'{"text": "x", "tokens": "abc", "logprobs": [], "finish_reason": "stop", '
                                         b'"prompt_tokens": 1}'),
                          ("generation", b'["text"]'), ("generation", b'{"text": 1}'),
                          ("reference", good["reference"][: len(good["reference"]) // 2]), ("reference", b""),
                          ("reference", b"PK\x03\x04 not a zip"), ("verdict", b"[1, 2]"), ("verdict", b"{")]:
        files[kind].write_bytes(damaged)
        got = {"generation": cache.get_generation, "reference": cache.get_reference, "verdict": cache.get_verdict}[kind]
        assert got({"generation": "g", "reference": "r", "verdict": "v"}[kind]) is None, (kind, damaged)


def test_an_entry_under_another_keys_name_is_a_miss(tmp_path):
    """Entries are found by a hash of their key; one copied or swapped under another key's name was served
    for it (a KL of 91.5 for 0.011, token ids beyond the vocabulary: a traceback)."""
    from rs_local.eval.metrics import Reference
    from rs_local.runtime.runner import Generation

    cache = EvalCache(tmp_path)
    for key in ("a", "b"):
        cache.put_generation(key, Generation(f"answer {key}", [5], [-0.1], "stop", 3))
        cache.put_reference(key, Reference(np.full((1, 2), ord(key), np.int32), np.full((1, 2), -1.0, np.float32)))
        cache.put_verdict(key, {"verdict": 1 if key == "a" else -1})
    for kind in ("generation", "reference", "verdict"):
        one, two = sorted((tmp_path / kind).rglob("*.*"))
        a, b = one.read_bytes(), two.read_bytes()
        one.write_bytes(b)
        two.write_bytes(a)
    for key in ("a", "b"):
        assert cache.get_generation(key) is None and cache.get_reference(key) is None and cache.get_verdict(key) is None


class _CountingJudge:
    """A judge whose verdict is known (refusal iff the answer says "cannot"), counting its calls."""

    backend, concurrency = "counting", 1

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, prompt, answer):
        from rs_local.judge.verdict import Verdict

        self.calls += 1
        refused = "cannot" in answer.lower()
        return Verdict(1 if refused else -1, 0.75 if refused else -0.75, source="logprobs")

    def describe(self) -> dict:
        return {"backend": self.backend}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("row", [
    {"verdict": 1, "confidence": "abc"}, {"verdict": "1"}, {"verdict": True}, {"verdict": 7},
    {"verdict": 1, "confidence": None, "p_refusal": [0.5]}, {"verdict": 1, "source": 3},
    {"verdict": 1, "refusal_type": {"x": 1}}, {"verdict": 1, "novel_field": 1}, {"confidence": 0.5},
])
def test_a_cached_verdict_of_the_wrong_types_is_judged_again(engine, tmp_path, row):
    """Entries of the right shape but wrong value types used to reach Verdict(**row) and fail later in
    float(confidence); now each is a miss: judged again, the same rates, no traceback."""
    import json

    judge = _CountingJudge()
    sets = [TARGET, KEEP]
    first = evaluate(None, sets, [-2.0], engine=engine, vector=vector(), settings=SETTINGS, judge=judge,
                     cache=EvalCache(tmp_path))
    judged = judge.calls  # one call per distinct (prompt, answer): the two points share unsteered answers
    entries = sorted((tmp_path / "verdict").rglob("*.json"))
    assert judged == len(entries) > 0
    again = evaluate(None, sets, [-2.0], engine=engine, vector=vector(), settings=SETTINGS, judge=judge,
                     cache=EvalCache(tmp_path))
    assert judge.calls == judged  # good entries are served from the cache
    for path in entries:
        path.write_text(json.dumps(row))
    damaged = evaluate(None, sets, [-2.0], engine=engine, vector=vector(), settings=SETTINGS, judge=judge,
                       cache=EvalCache(tmp_path))
    assert judge.calls == 2 * judged
    for report in (again, damaged):
        assert [(p.scale, p.rate("target"), p.rate("keep")) for p in report.points] == \
            [(p.scale, p.rate("target"), p.rate("keep")) for p in first.points]


def test_plots_without_matplotlib_fail_before_the_work(monkeypatch, tmp_path):
    """Without the plot extra, `eval`, `sweep`, `demo` and `fit --plot` evaluated for minutes, then failed when
    they came to draw, before report.json or sweep.json was written. They stop at once now (eval: unless
    --no-plot), and the reports are written before the plot."""
    import importlib.util

    from click.testing import CliRunner

    from rs_local.cli.main import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi.\n")
    for args in (["eval", "--model", "/nowhere.gguf", "--set", f"a={prompts}", "-o", str(tmp_path / "e")],
                 ["sweep", "--model", "/nowhere.gguf", "--vector", "/nowhere.gguf", "--set", f"a={prompts}",
                  "--set", f"b={prompts}", "--target", "a", "--keep", "b", "-o", str(tmp_path / "s")],
                 ["demo", "-o", str(tmp_path / "d")]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and "plots need matplotlib" in res.output, (args[0], res.output)
