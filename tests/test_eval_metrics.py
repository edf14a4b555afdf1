"""KL and degeneration metrics, prompt-set specs and the eval cache, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from rs_local.errors import RsLocalError
from rs_local.eval import metrics
from rs_local.eval.baseline_cache import EvalCache
from rs_local.eval.prompt_sets import BUILTIN_SETS, builtin_set, load_sets, parse_set_spec
from rs_local.runtime.runner import Generation
from rs_local.runtime.sampling import log_softmax


def rows(rng, n_pos=5, vocab=400, temp=3.0):
    return np.stack([log_softmax(rng.normal(size=vocab) * temp) for _ in range(n_pos)])


def exact_kl(p_rows: np.ndarray, q_rows: np.ndarray) -> np.ndarray:
    """The oracle: exact per-position ``KL(p || q)`` from two full log-prob matrices."""
    return (np.exp(p_rows) * (p_rows - q_rows)).sum(axis=1)


def test_topk_kl_equals_full_kl_when_k_covers_vocab():
    rng = np.random.default_rng(0)
    p, q = rows(rng), rows(rng)
    ref = metrics.topk_reference(p, k=p.shape[1])
    assert np.allclose(metrics.kl_to_reference(ref, q), exact_kl(p, q), atol=1e-5)


def test_topk_kl_is_a_close_lower_bound_and_zero_on_itself():
    rng = np.random.default_rng(1)
    p = rows(rng, temp=6.0)
    q = p + rng.normal(size=p.shape) * 0.5
    q = np.stack([log_softmax(r) for r in q])
    full = exact_kl(p, q)
    approx = metrics.kl_to_reference(metrics.topk_reference(p, k=32), q)
    assert np.all(approx <= full + 1e-6)
    assert np.all(approx >= 0.5 * full)
    assert np.allclose(metrics.kl_to_reference(metrics.topk_reference(p, k=32), p), 0.0, atol=1e-6)


@pytest.mark.parametrize("text, tokens, expected", [
    ("", [], "empty"),
    ("   \n ", [], "empty"),
    ("Paris is the capital of France and its largest city.", list(range(12)), None),
    ("the cat the cat the cat the cat the cat the cat the cat the cat", [], "repetition"),
    ("yes " * 3, [5] * 20, "repetition"),
    ("}{)(*&^%$#@!!~~``''\"\"<><>", [], "gibberish"),
    ("def f(x):\n    return x[::-1]  # reverse the string", list(range(14)), None),
    ("作为一个AI助手，我不能提供这些信息。", list(range(10)), None),
])
def test_degeneration(text, tokens, expected):
    assert metrics.degeneration(text, tokens) == expected


def test_builtin_sets_are_big_enough_and_distinct():
    sets = {name: builtin_set(name).prompts for name in BUILTIN_SETS}
    for name, prompts in sets.items():
        assert len(prompts) >= 60, name
    all_prompts = [p for ps in sets.values() for p in ps]
    assert len(all_prompts) == len(set(all_prompts))


def test_set_specs(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("one\ntwo\nthree\n")
    assert parse_set_spec(f"pol={f}") == ("pol", str(f))
    assert parse_set_spec("harmful") == ("harmful", None)
    with pytest.raises(RsLocalError, match="name it"):
        parse_set_spec(str(f))
    with pytest.raises(RsLocalError):
        parse_set_spec("nonsense")
    sets = load_sets([f"a={f}", "harmless"], limit=2)
    assert [len(s) for s in sets] == [2, 2]
    with pytest.raises(RsLocalError, match="more than once"):
        load_sets([f"a={f}", f"a={f}"])


def test_split_is_seeded_and_disjoint():
    s = builtin_set("political")
    tr, te = s.split(1 / 3, seed=3)
    tr2, te2 = s.split(1 / 3, seed=3)
    assert tr.prompts == tr2.prompts and te.prompts == te2.prompts
    assert not set(tr.prompts) & set(te.prompts)
    assert len(tr) + len(te) == len(s) and len(te) == round(len(s) / 3)


def test_cache_roundtrip_and_disabled(tmp_path):
    cache = EvalCache(tmp_path)
    key = {"model": "m", "prompt": "p"}
    assert cache.get_generation(key) is None
    gen = Generation("hi", [1, 2], [-0.1, -0.2], "stop", 7)
    cache.put_generation(key, gen)
    back = cache.get_generation(key)
    assert back.text == "hi" and back.tokens == [1, 2] and back.prompt_tokens == 7
    assert cache.get_generation({"model": "m", "prompt": "other"}) is None
    ref = metrics.topk_reference(rows(np.random.default_rng(2)), k=8)
    cache.put_reference(key, ref)
    got = cache.get_reference(key)
    assert np.array_equal(got.ids, ref.ids) and np.allclose(got.logprobs, ref.logprobs)
    assert cache.hits == 2 and cache.misses == 2
    off = EvalCache(None)
    off.put_generation(key, gen)
    assert off.get_generation(key) is None
