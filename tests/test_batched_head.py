"""The batch engine evaluates the chat template's shared head once per call (real llama.cpp, SmolLM2).

SmolLM2's template puts a default system message before every user message, so every chat
prompt of a call starts with the same ~20 tokens. Restoring their keys and values into each slot
must give the same rows and answers as evaluating every prompt whole, up to the floating-point
reordering any change of batch composition brings.
"""

from __future__ import annotations

import numpy as np
import pytest

import rs_local.runtime.batched as batched
from rs_local.runtime.batched import BatchEngine, shared_head
from rs_local.runtime.runner import Runner

PROMPTS = ["Name three fruits.", "What is 2 plus 2?", "Say hello in French.", "Write a haiku about rain.",
           "What colour is the sky?"]


def test_shared_head_leaves_every_list_a_token():
    assert shared_head([list(range(20)), list(range(20)) + [7]]) == 19  # the shorter keeps its last token
    assert shared_head([list(range(20)), list(range(12)) + [99] * 5]) == 12
    assert shared_head([list(range(20))]) == 0  # one prompt: nothing to share
    assert shared_head([list(range(20)), list(range(5)) + [99] * 10]) == 0  # below the minimum
    assert shared_head([[1, 2, 3] * 5, [4] + [1, 2, 3] * 5]) == 0


@pytest.fixture(scope="module")
def runner(smollm2_path):
    r = Runner(smollm2_path, n_ctx=512, n_threads=2)
    yield r
    r.llama.close()


def _run(runner, monkeypatch, share: bool, conts=None):
    monkeypatch.setattr(batched, "MIN_SHARED_HEAD", 8 if share else 10**6)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    with BatchEngine(runner, n_seq=2, seq_ctx=256) as engine:
        gens = engine.generate_many(prompts, max_tokens=8)
        rows = engine.forced_logprobs(prompts, conts or [g.tokens for g in gens])
        return gens, rows, engine.head_tokens_reused


def test_shared_head_gives_the_same_answers_and_rows(runner, monkeypatch):
    whole, whole_rows, none = _run(runner, monkeypatch, share=False)
    shared, shared_rows, reused = _run(runner, monkeypatch, share=True, conts=[g.tokens for g in whole])
    assert none == 0
    head = shared_head([runner.tokenize([{"role": "user", "content": p}]) for p in PROMPTS])
    assert head >= 8 and reused == 2 * len(PROMPTS) * head  # every prompt, in generation and in forcing
    assert sum(a.tokens == b.tokens for a, b in zip(whole, shared)) >= len(PROMPTS) - 1
    for a, b in zip(whole_rows, shared_rows):
        assert a.shape == b.shape and np.allclose(np.exp(a), np.exp(b), atol=2e-3)


def test_default_batch_follows_the_models_kv_size(runner):
    """The default batch fits 1 GiB of KV cache: 32 slots (the cap) for small GQA models, few for big ones."""
    assert batched.kv_bytes_per_token(runner) == 30 * 2 * 64 * 3 * 2  # SmolLM2-135M: 30 blocks, 3 KV heads of 64, f16
    assert batched.default_batch(24 * 2 * 64 * 2 * 2, 1024) == 32  # Qwen2.5-0.5B: 12 KB a token, capped
    assert batched.default_batch(32 * 2 * 1024 * 2, 1024) == 8  # Llama-3-8B (8 KV heads): 128 MB a slot
    assert batched.default_batch(32 * 2 * 4096 * 2, 1024) == 2  # Llama-2-7B (no GQA): 512 MB a slot, floor 2
    assert batched.default_batch(32 * 2 * 1024 * 2, 1024, budget=1 << 28) == 2
