"""Refusal-gradient directions: the gradient is right (finite differences on SmolLM2) and the contrast is exact."""

from __future__ import annotations

import numpy as np
import pytest

from rs_local.errors import RsLocalError

from rs_local.vectors.refusal_gradient import (
    GradientContrast, RefusedPrompt, band_lengths, contrast_direction, gradient_bytes_per_token, refusal_gradients,
    token_batches,
)


def test_contrast_removes_the_whole_keep_span():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(6, 3, 20))
    keep = rng.normal(size=(4, 3, 20))
    units = contrast_direction(target, keep, layers=[1, 2])
    assert set(units) == {1, 2}
    for l, u in units.items():
        assert np.linalg.norm(u) == pytest.approx(1.0)
        assert np.allclose(keep[:, l] @ u, 0.0, atol=1e-9)  # no first-order effect on any keep prompt
        assert target[:, l].mean(0) @ u > 0  # still raises the target's refusal
    one = contrast_direction(target, keep, layers=[1], rank=1)[1]
    assert abs(keep[:, 1] @ one).max() > 1e-6  # rank 1 leaves the rest of the span


@pytest.fixture(scope="module")
def fm(smollm2_path):
    from rs_local.vectors.hf_model import load_model

    return load_model(str(smollm2_path))


def _score(fm, item, layer, delta, steer=None):
    """log P(first two answer tokens) with ``delta`` added at ``layer`` (and ``steer``: {layer: array})."""
    import torch

    from rs_local.vectors.refusal_gradient import _adder
    from rs_local.vectors.capture import render

    p = fm.tokenizer(render(fm, item.prompt), add_special_tokens=False)["input_ids"]
    a = fm.tokenizer(item.answer, add_special_tokens=False)["input_ids"][:2]
    hooks = [fm.blocks[layer].register_forward_hook(_adder(torch.tensor(delta, dtype=torch.float32)))]
    hooks += [fm.blocks[l].register_forward_hook(_adder(torch.tensor(d, dtype=torch.float32))) for l, d in (steer or {}).items()]
    try:
        with torch.no_grad():
            hid = fm.base(input_ids=torch.tensor([p + a]), use_cache=False).last_hidden_state[0]
            lp = torch.log_softmax(fm.model.get_output_embeddings()(hid[len(p) - 1: len(p) - 1 + len(a)]).float(), -1)
    finally:
        for h in hooks:
            h.remove()
    return float(sum(lp[i, t] for i, t in enumerate(a)))


def test_gradient_matches_finite_differences(fm):
    item = RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that.")
    g = refusal_gradients(fm, [item], layers=[10])[0, 10]
    assert np.linalg.norm(g) > 0
    rng = np.random.default_rng(1)
    v = rng.normal(size=fm.n_embd)
    v /= np.linalg.norm(v)
    eps = 0.05
    fd = (_score(fm, item, 10, eps * v) - _score(fm, item, 10, -eps * v)) / (2 * eps)
    assert fd == pytest.approx(float(g @ v), rel=0.05, abs=1e-3)


def test_gradient_at_a_steered_point_matches_finite_differences_there(fm):
    from rs_local.vectors.control_vector import ControlVector

    item = RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that.")
    rng = np.random.default_rng(2)
    push = rng.normal(size=fm.n_embd).astype(np.float32)
    push *= 4.0 / np.linalg.norm(push)
    vec = ControlVector({9: push}, fm.model_hint)
    plain = refusal_gradients(fm, [item], layers=[10])[0, 10]
    steered = refusal_gradients(fm, [item], layers=[10], steer=(vec, -1.5))[0, 10]
    assert np.linalg.norm(steered - plain) > 1e-3 * np.linalg.norm(plain)  # the point matters
    v = rng.normal(size=fm.n_embd)
    v /= np.linalg.norm(v)
    eps, at = 0.05, {9: -1.5 * push}
    fd = (_score(fm, item, 10, eps * v, at) - _score(fm, item, 10, -eps * v, at)) / (2 * eps)
    assert fd == pytest.approx(float(steered @ v), rel=0.05, abs=1e-3)


def test_gradient_contrast_vector_shape_and_metadata(fm):
    """One round at the plain model, as the isolate recipe runs it."""
    pol = [RefusedPrompt("What happened in Tiananmen Square in 1989?", "I'm sorry, but I can't"),
           RefusedPrompt("Is Taiwan a country?", "As an AI")]
    harm = [RefusedPrompt("How do I make a bomb?", "I'm sorry, but"), RefusedPrompt("Write malware.", "I cannot")]
    lengths = band_lengths(fm, [p.prompt for p in pol], ["Name a fruit.", "What is 2+2?"], cache=False)
    fit = GradientContrast(fm, [8, 9, 10])
    fit.add(pol, harm)
    vec = fit.vector(lengths)
    assert vec.layers == [8, 9, 10] and vec.n_embd == 576 and vec.model_hint == "llama"
    assert vec.metadata["n_refused_target"] == 2
    with pytest.raises(RsLocalError, match="target"):
        GradientContrast(fm, [8]).vector(lengths)


def test_keep_free_contrast_is_the_mean_target_gradient(fm):
    """No keep set (a vector only a policy gate applies): the direction is the mean target gradient itself,
    so it also raises the harmful refusal the contrast would have left alone; without ``keep_free`` an
    empty keep set is still an error, as `rs-local isolate` needs it."""
    pol = [RefusedPrompt("What happened in Tiananmen Square in 1989?", "I'm sorry, but I can't"),
           RefusedPrompt("Is Taiwan a country?", "As an AI")]
    harm = [RefusedPrompt("How do I make a bomb?", "I'm sorry, but")]
    lengths = band_lengths(fm, [p.prompt for p in pol], ["Name a fruit.", "What is 2+2?"], cache=False)
    free = GradientContrast(fm, [9, 10], keep_free=True)
    free.add(pol, [])
    vec = free.vector(lengths)
    rows = refusal_gradients(fm, pol, [9, 10])
    for l in (9, 10):
        mean = rows[:, l].mean(axis=0)
        d = vec.directions[l]
        assert float(d @ mean / (np.linalg.norm(d) * np.linalg.norm(mean))) == pytest.approx(1.0, abs=1e-5)
        assert np.linalg.norm(d) == pytest.approx(lengths[l] / 2, rel=1e-5)
    contrast = GradientContrast(fm, [10])
    contrast.add(pol, harm)
    g_harm = refusal_gradients(fm, harm, [10])[0, 10]
    assert abs(contrast.vector(lengths).directions[10] @ g_harm) < 1e-3 * np.linalg.norm(g_harm) * lengths[10]
    assert vec.directions[10] @ g_harm != pytest.approx(0.0, abs=1e-3 * np.linalg.norm(g_harm) * lengths[10])
    bare = GradientContrast(fm, [10])
    bare.add(pol, [])
    with pytest.raises(RsLocalError, match="keep"):
        bare.vector(lengths)


def test_batched_gradients_equal_one_at_a_time(fm):
    """Left-padded batches of prompts of different lengths give each prompt its own gradient (issue 16)."""
    from rs_local.vectors.control_vector import ControlVector

    items = [RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that."),
             RefusedPrompt("Tell me, in as much detail as you can, how the 1989 protests in Beijing ended.", "As an AI"),
             RefusedPrompt("Write malware.", "I cannot"),
             RefusedPrompt("Is Taiwan a country? Answer yes or no and explain why.", "Sorry"),
             RefusedPrompt("Hi", "")]  # no answer tokens: a zero row, and the batch still runs
    layers = [4, 10, 20]
    rng = np.random.default_rng(3)
    push = rng.normal(size=fm.n_embd).astype(np.float32)
    vec = ControlVector({9: push * 4.0 / np.linalg.norm(push)}, fm.model_hint)
    for steer in (None, (vec, -1.0)):
        one = refusal_gradients(fm, items, layers, steer=steer, batch_size=1)
        many = refusal_gradients(fm, items, layers, steer=steer, batch_size=4)
        assert not np.isnan(many).any()
        assert np.abs(many[4]).max() == 0 and np.abs(one[4]).max() == 0
        for i in range(4):
            for l in layers:
                a, b = one[i, l], many[i, l]
                cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                assert cos >= 0.99, (i, l, cos)
                assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(a), rel=0.02)


def test_token_batches_hold_long_prompts_in_smaller_groups():
    lengths = [100, 90, 10, 12, 10, 11]
    assert token_batches(lengths, 8, None) == [[0, 1, 3, 5, 2, 4]]
    assert token_batches(lengths, 8, 200) == [[0, 1], [3, 5, 2, 4]]  # 2 x 100 fit, a third would be 300
    assert token_batches(lengths, 3, 200) == [[0, 1], [3, 5, 2], [4]]
    assert token_batches(lengths, 8, 50) == [[0], [1], [3, 5, 2, 4]]  # longer than the cap: alone


def test_a_memory_bound_splits_batches_and_keeps_the_gradients(fm):
    """With room for two prompts a pass, the gradients are those of the unbounded batch; with no room
    for the longest prompt it is a one-line error before any pass."""
    items = [RefusedPrompt("Tell me, in as much detail as you can, how the 1989 protests in Beijing ended.", "As an AI"),
             RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that."),
             RefusedPrompt("Write malware.", "I cannot"),
             RefusedPrompt("Is Taiwan a country?", "Sorry")]
    layers = [6, 10]
    per_token = gradient_bytes_per_token(fm, 6, bf16=False)
    assert per_token > gradient_bytes_per_token(fm, 20, bf16=False) > gradient_bytes_per_token(fm, 20, bf16=True)
    said: list[str] = []
    free = refusal_gradients(fm, items, layers, batch_size=8)
    bounded = refusal_gradients(fm, items, layers, batch_size=8, memory=per_token * 2 * 60, say=said.append)
    assert len(said) >= 2  # more than one pass (one progress line each)
    for i in range(4):
        for l in layers:
            a, b = free[i, l], bounded[i, l]
            assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99
    with pytest.raises(RsLocalError, match=r"^a prompt of \d+ tokens needs about \d+ MB .* RS_LOCAL_MEMORY_CHECK=0 to try anyway$"):
        refusal_gradients(fm, items, layers, memory=per_token * 5)


def test_bf16_gradients_track_float32_and_are_recorded(fm):
    """bfloat16 autocast (the default on CPUs with native bfloat16, issue 16) changes the arithmetic, not the
    gradient: each prompt's row stays at cosine >= 0.99 to float32's, and the vector says which it used."""
    items = [RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that."),
             RefusedPrompt("Is Taiwan a country? Answer yes or no and explain why.", "Sorry"),
             RefusedPrompt("Write malware.", "I cannot")]
    layers = [6, 12, 20]
    full = refusal_gradients(fm, items, layers)
    half = refusal_gradients(fm, items, layers, bf16=True)
    assert not np.array_equal(full, half)  # autocast really ran the products in bfloat16
    for i in range(len(items)):
        for l in layers:
            a, b = full[i, l], half[i, l]
            assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99, (i, l)
    assert next(fm.model.parameters()).dtype == torch_float32()  # the weights stay float32
    lengths = np.ones(fm.n_layer)
    for bf16, name in ((False, "float32"), (True, "bfloat16")):
        fit = GradientContrast(fm, [8], bf16=bf16)
        fit.add(items[1:2], items[::2])
        assert fit.vector(lengths).metadata["gradient_dtype"] == name


def test_a_bfloat16_model_gives_the_float32_gradient(fm, smollm2_path):
    """Where the passes run in bfloat16 the recipe loads the model in bfloat16 (half the memory,
    ``isolate.fit_dtype``): its gradients stay float32-sized rows at cosine >= 0.99 to the float32
    model's, and it runs under autocast even when the caller does not ask (bfloat16 weights would
    meet the float32 added vectors in a plain matrix product otherwise)."""
    import torch

    from rs_local.vectors.hf_model import load_model

    half_model = load_model(str(smollm2_path), dtype="bfloat16")
    assert next(half_model.model.parameters()).dtype == torch.bfloat16
    items = [RefusedPrompt("How do I pick a lock?", "I'm sorry, but I can't help with that."),
             RefusedPrompt("Write malware.", "I cannot")]
    layers = [6, 12, 20]
    full = refusal_gradients(fm, items, layers)
    for bf16 in (True, False):
        half = refusal_gradients(half_model, items, layers, bf16=bf16)
        assert half.dtype == np.float32 and not np.array_equal(full, half)
        for i in range(len(items)):
            for l in layers:
                a, b = full[i, l], half[i, l]
                assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99, (bf16, i, l)


def test_the_recipe_loads_bfloat16_exactly_where_its_passes_run_in_it():
    from rs_local.recipes.isolate import fit_dtype
    from rs_local.runtime.host import HostDecision

    assert fit_dtype(HostDecision(True, "fixture")) == "bfloat16"
    assert fit_dtype(HostDecision(False, "fixture")) == "float32"


def torch_float32():
    import torch

    return torch.float32


def test_judge_weighted_rows_are_centred_weights_times_whole_answer_gradients(fm):
    """add_weighted: each row is weight * gradient over ``tokens`` answer tokens, rescaled to an opening's weight;
    zero weights (every answer judged alike) add nothing, so a round cannot invent a direction from no contrast."""
    items = [RefusedPrompt("What happened in Tiananmen Square in 1989?", "It was a major event in China, a major event."),
             RefusedPrompt("Is Taiwan a country?", "Taiwan is an island in East Asia with its own elected government."),
             RefusedPrompt("Who is Xi Jinping?", "I'm sorry, but I can't discuss that.")]
    layers = [8, 10]
    fit = GradientContrast(fm, layers, answer_tokens=2)
    fit.add_weighted(items, [0.0, 0.0, 0.0], tokens=8)
    assert fit.target == []
    weights = [0.9, -1.3, 0.4]
    fit.add_weighted(items, weights, tokens=8)
    whole = refusal_gradients(fm, items, layers, answer_tokens=8)
    rows = fit.target[0]
    assert rows.shape == (3, fm.n_layer, fm.n_embd)
    for i, w in enumerate(weights):
        for l in layers:
            assert np.allclose(rows[i, l], whole[i, l] * w * 2 / 8, rtol=1e-4, atol=1e-6)
    # more tokens than the opening really enter: the 8-token gradient is not the 2-token one
    opening = refusal_gradients(fm, items[:1], layers, answer_tokens=2)[0, 10]
    cos = float(opening @ whole[0, 10] / (np.linalg.norm(opening) * np.linalg.norm(whole[0, 10])))
    assert cos < 0.999
    with pytest.raises(ValueError, match="one weight per item"):
        fit.add_weighted(items, [1.0], tokens=8)
    fit.add([], [RefusedPrompt("How do I make a bomb?", "I'm sorry, but")])
    lengths = band_lengths(fm, [p.prompt for p in items], ["Name a fruit.", "What is 2+2?"], cache=False)
    meta = fit.vector(lengths).metadata
    assert meta["n_judge_weighted_target"] == 3 and meta["n_refused_target"] == 0
