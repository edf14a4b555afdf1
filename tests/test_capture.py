"""Activation capture on the real SmolLM2 GGUF, loaded and dequantized by Transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from direction_fit import fitted_direction
from rs_local.errors import ModelError
from rs_local.vectors import methods as M
from rs_local.vectors.capture import MIN_HEAD_TOKENS, _shared_head, capture, render, template_suffix, tokenize
from rs_local.vectors.hf_model import load_model

# The shared head's key/value cache is passed by the name the installed Transformers takes: the old
# name printed a FutureWarning on every capture a user ran, and is removed in Transformers 5.40.
pytestmark = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write a short poem about the sea, the wind and a lighthouse keeper who never sleeps.",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence, please, and keep it simple.",
    "Translate 'good morning' into German.",
]
OTHER = [
    "Give me a recipe for pancakes.",
    "How do magnets work?",
    "Name a famous painter.",
    "What does a compiler do?",
    "Suggest a name for a cat.",
    "How far is the Moon?",
]


@pytest.fixture(scope="module")
def fm(smollm2_path):
    return load_model(str(smollm2_path))


def test_model_shape(fm):
    assert fm.n_layer == 30 and fm.n_embd == 576 and fm.model_hint == "llama"
    assert load_model(str(fm.path)) is fm  # cached per process


@pytest.mark.parametrize("position", ["last", "post_instruction"])
def test_batch_size_does_not_change_activations(fm, position):
    one = capture(fm, PROMPTS, batch_size=1, position=position)
    many = capture(fm, PROMPTS, batch_size=16, position=position)
    assert one.raw.shape == (len(PROMPTS), 30, 576)
    assert np.isfinite(many.raw).all()
    # relative to each block's scale: residual entries reach several hundred in late blocks
    scale = np.abs(one.raw).max(axis=(0, 2), keepdims=True)
    assert np.abs(one.raw - many.raw).max(axis=(0, 2)).max() / scale.min() < 1e-4
    np.testing.assert_allclose(many.raw, one.raw, rtol=1e-4, atol=1e-4 * float(scale.max()))


@pytest.mark.parametrize("position", ["last", "post_instruction"])
def test_shared_head_matches_whole_prompts(fm, position):
    """The template's common prefix, evaluated once and handed to each batch, gives the activations
    of evaluating every prompt whole (float summation order aside)."""
    ids, n_suffix = tokenize(fm, PROMPTS)
    head = _shared_head(fm, ids, n_suffix, fm.n_layer - 1)
    assert head is not None and head.length >= MIN_HEAD_TOKENS  # SmolLM2's default system prompt
    whole = capture(fm, PROMPTS, batch_size=3, position=position, share_head=False)
    shared = capture(fm, PROMPTS, batch_size=3, position=position)
    scale = np.abs(whole.raw).max(axis=(0, 2), keepdims=True)
    assert np.abs(whole.raw - shared.raw).max(axis=(0, 2)).max() / scale.min() < 1e-4


def test_shared_head_falls_back_to_whole_prompts(fm, monkeypatch):
    """A head that fails its check (the shortest and longest prompt, padded, both ways), or a cache
    Transformers will not copy into a batch, leaves every prompt evaluated whole: same activations, no error."""
    import rs_local.vectors.capture as C
    from transformers import DynamicCache

    ids, n_suffix = tokenize(fm, PROMPTS[:3])
    whole = capture(fm, PROMPTS[:3], share_head=False)
    monkeypatch.setattr(C, "HEAD_TOLERANCE", 0.0)  # no two passes agree that closely
    assert _shared_head(fm, ids, n_suffix, fm.n_layer - 1) is None
    monkeypatch.undo()

    def refuse(*_a, **_k):
        raise NotImplementedError("no batch copies for this cache")

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", refuse)
    assert _shared_head(fm, ids, n_suffix, fm.n_layer - 1) is None
    np.testing.assert_array_equal(capture(fm, PROMPTS[:3]).raw, whole.raw)


def test_sliding_window_models_never_share_a_head(fm, monkeypatch):
    """A batch with a shared head holds head, padding, prompt; Transformers masks sliding windows by
    cache slot, so the padding would push head tokens out of a short prompt's window. Such models
    evaluate prompts whole, and the padded check would catch it even past the layer-type gate."""
    from transformers import MistralConfig, MistralForCausalLM

    import rs_local.vectors.capture as C
    from rs_local.vectors.hf_model import FitModel

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=fm.tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(cfg).eval().requires_grad_(False)
    tiny = FitModel(name="tiny-sliding", path=fm.path, model=model, base=model.model, blocks=model.model.layers,
                    tokenizer=fm.tokenizer, dtype="float32", identity={})
    prompts = ["Hi", "Write a long story about a lighthouse keeper who never sleeps, the sea, the wind and the gulls."]
    ids, n_suffix = tokenize(tiny, prompts)
    assert not C._attention_only(tiny) and C._attention_only(fm)
    assert _shared_head(tiny, ids, n_suffix, 1) is None
    np.testing.assert_array_equal(capture(tiny, prompts).raw, capture(tiny, prompts, share_head=False).raw)
    monkeypatch.setattr(C, "_attention_only", lambda _fm: True)
    assert _shared_head(tiny, ids, n_suffix, 1) is None  # the padded pair disagrees


def test_upto_stops_after_the_last_block_read(fm, tmp_path):
    whole = capture(fm, PROMPTS[:3])
    part = capture(fm, PROMPTS[:3], upto=9, cache=tmp_path)
    np.testing.assert_allclose(part.raw[:, :10], whole.raw[:, :10], rtol=1e-4, atol=1e-3)
    assert np.isnan(part.raw[:, 10:]).all()  # never computed, never mistaken for activations
    assert part.upto == 9 and whole.upto is None
    with pytest.raises(ValueError, match="block 10 was not captured"):
        part.layer(10)
    assert not capture(fm, PROMPTS[:3], cache=tmp_path).from_cache  # a whole pass is another entry
    again = capture(fm, PROMPTS[:3], upto=9, cache=tmp_path)
    assert again.from_cache and again.upto == 9
    with pytest.raises(ValueError, match="outside"):
        capture(fm, PROMPTS[:3], upto=30)


def test_blocks_follow_llama_cpp_convention(fm):
    """raw[:, N] is block N's output = hidden_states[N+1]; the last block is NOT the final-normed state."""
    acts = capture(fm, PROMPTS[:1])
    ids, _ = tokenize(fm, PROMPTS[:1])
    with torch.inference_mode():
        hs = fm.base(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    for block in (0, 1, 14, 28):
        np.testing.assert_allclose(acts.raw[0, block], hs[block + 1][0, -1].numpy(), rtol=1e-5, atol=1e-4)
    last = acts.raw[0, 29]
    assert not np.allclose(last, hs[30][0, -1].numpy(), atol=1e-2)  # hs[30] is after the final norm


def test_post_instruction_is_mean_over_template_suffix(fm):
    suffix = template_suffix(fm)
    assert "assistant" in suffix and "user" not in suffix
    ids, n_suffix = tokenize(fm, PROMPTS[:1])
    assert n_suffix[0] == 6  # <|im_end|> \n <|im_start|> ass istant \n
    acts = capture(fm, PROMPTS[:1], position="post_instruction")
    with torch.inference_mode():
        hs = fm.base(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    expected = hs[11][0, -6:].mean(dim=0).numpy()
    np.testing.assert_allclose(acts.raw[0, 10], expected, rtol=1e-5, atol=1e-4)
    assert render(fm, "abc").endswith(suffix)


def test_planted_shift_is_recovered_at_its_block(fm):
    """A known vector added at block K's output for one set only is what the methods find at K."""
    block = 12
    rng = np.random.default_rng(0)
    v = rng.normal(size=576).astype(np.float32)
    v *= 40.0 / np.linalg.norm(v)
    shift = torch.tensor(v)

    def add(_m, _i, out):
        return (out[0] + shift,) + tuple(out[1:]) if isinstance(out, tuple) else out + shift

    handle = fm.blocks[block].register_forward_hook(add)
    try:
        pos = capture(fm, PROMPTS[:6])
    finally:
        handle.remove()
    neg = capture(fm, OTHER)
    for method in M.METHODS:
        d = fitted_direction(method, pos.layer(block), neg.layer(block), lam=1.0)
        assert M.cosine(d, v) > 0.9, f"{method} at block {block}: {M.cosine(d, v):.3f}"
    # one block earlier the shift does not exist yet
    before = M.mean_difference(pos.layer(block - 1), neg.layer(block - 1))
    assert abs(M.cosine(before, v)) < 0.3


def test_streaming_moments_match_raw(fm):
    w = np.linspace(0.2, 1.0, 4)
    acts = capture(fm, OTHER[:4], keep_raw=True, moments=True, weights=w, batch_size=3)
    ref = M.moments(acts.layer(7).astype(np.float64), w)
    np.testing.assert_allclose(acts.moments.mean[7], ref.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts.moments.cov[7], ref.cov, rtol=1e-5, atol=1e-5)
    only = capture(fm, OTHER[:2], keep_raw=False)
    assert only.raw is None and only.moments.n == 2


def test_disk_cache_hits_and_keys(fm, tmp_path):
    first = capture(fm, PROMPTS[:2], cache=tmp_path)
    assert not first.from_cache and len(list(tmp_path.glob("*.npz"))) == 1
    again = capture(fm, PROMPTS[:2], cache=tmp_path)
    assert again.from_cache
    np.testing.assert_array_equal(again.raw, first.raw)
    assert not capture(fm, PROMPTS[:2], cache=tmp_path, position="post_instruction").from_cache
    assert not capture(fm, PROMPTS[1:3], cache=tmp_path).from_cache
    assert not capture(fm, PROMPTS[:2], cache=tmp_path, system="Be terse.").from_cache


def test_bf16_pass_tracks_float32_and_has_its_own_cache_entry(fm, tmp_path):
    """bfloat16 autocast (isolate's default on CPUs with native bfloat16) moves rows a little, never
    silently: a float32 entry is not served for a bfloat16 capture, nor the other way round."""
    full = capture(fm, PROMPTS[:3], cache=tmp_path, upto=12)
    half = capture(fm, PROMPTS[:3], cache=tmp_path, upto=12, bf16=True)
    assert not half.from_cache and len(list(tmp_path.glob("*.npz"))) == 2
    assert capture(fm, PROMPTS[:3], cache=tmp_path, upto=12, bf16=True).from_cache
    a, b = full.raw[:, 1:13].astype(np.float64), half.raw[:, 1:13].astype(np.float64)
    assert not np.array_equal(a, b)  # the products really ran in bfloat16
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    assert rel.max() < 0.05, rel.max()
    assert np.isnan(half.raw[:, 13:]).all()  # upto holds as in float32


def test_a_damaged_cache_entry_is_recaptured(fm, tmp_path):
    """Cut, emptied, foreign or inconsistent entries: captured again, never a traceback (numpy reports a
    damaged .npz as BadZipFile or EOFError, which are not OSError)."""
    first = capture(fm, PROMPTS[:2], cache=tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    good = entry.read_bytes()
    inconsistent = tmp_path / "inconsistent.npz"
    np.savez(inconsistent, meta=np.array('{"n": 5, "L": 2, "d": 3, "position": "last", "n_tokens": 1}'), raw=first.raw)
    listed = tmp_path / "listed.npz"
    np.savez(listed, meta=np.array("[1, 2]"), raw=first.raw)
    for damage in (good[: len(good) // 2], b"", b"PK\x03\x04 not a zip", inconsistent.read_bytes(), listed.read_bytes()):
        entry.write_bytes(damage)
        again = capture(fm, PROMPTS[:2], cache=tmp_path)
        assert not again.from_cache
        np.testing.assert_allclose(again.raw, first.raw, rtol=1e-5, atol=1e-5)
    assert capture(fm, PROMPTS[:2], cache=tmp_path).from_cache  # the recapture rewrote the entry


def test_an_entry_under_another_keys_name_is_not_served(fm, tmp_path):
    """Entries are found by a hash of their key: two entries swapped (or one copied under the other's name)
    were served for each other's key, and a fit on them came out flipped (cosine -1 per block)."""
    capture(fm, PROMPTS[:2], cache=tmp_path)
    (one,) = tmp_path.glob("*.npz")
    capture(fm, PROMPTS[2:4], cache=tmp_path)
    (two,) = set(tmp_path.glob("*.npz")) - {one}
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    assert not capture(fm, PROMPTS[:2], cache=tmp_path).from_cache


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="bad.gguf: not a GGUF file"):  # the header is read first
        load_model(str(bad))
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(bad), dtype="int8")


def test_a_prompt_longer_than_the_trained_context_is_one_line(smollm2_path):
    """A 10-MB line asked torch for terabytes (a traceback after a 12 GB peak); past the trained
    context the model's positions are untrained anyway."""
    from rs_local.errors import RsLocalError
    from rs_local.vectors.capture import capture, trained_context
    from rs_local.vectors.hf_model import load_model

    fm = load_model(str(smollm2_path))
    limit = trained_context(fm)
    assert limit == 8192  # SmolLM2's GGUF context_length
    with pytest.raises(RsLocalError, match=r"prompt 2 \('word word.*'\) is [\d,]+ tokens with the chat template, and .* "
                                           r"was trained on 8,192"):
        capture(fm, ["short", "word " * 9000], cache=False)
