"""Cross-runtime parity: ``direction.N`` in llama.cpp does what a hook at block N does in Transformers.

The exported convention (block N = output of decoder layer N = ``hidden_states[N+1]``) is the
one thing that silently ruins every vector if it is off by one, so it is checked end to end:
a random vector is added at block N's output in Transformers (forward hook on
``blocks[N]``) and exported as ``direction.N`` to llama.cpp through
``llama_set_adapter_cvec`` with ``ControlVector.to_buffer``. The change in next-token
log-probs it causes in llama.cpp must correlate best with the Transformers change at N, not
at N-1 or N+1. Quantisation noise keeps the correlation below 1 (measured on SmolLM2-135M Q4_1: 0.81-0.87
at N, 0.55-0.82 at the neighbours for one prompt; ARCHITECTURE.md, "The layer convention"), so several prompts and all positions are pooled
and the test compares against the neighbours rather than a fixed threshold alone.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from rs_local.runtime.loading import load_llama
from rs_local.vectors.control_vector import ControlVector
from rs_local.vectors.hf_model import load_model

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea, there lived",
    "Water boils at a temperature of",
]
BLOCKS = (6, 15)
NORM = 8.0


@pytest.fixture(scope="module")
def llama(smollm2_path):
    model, _ = load_llama(smollm2_path, n_ctx=128, logits_all=True, n_threads=2)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf(smollm2_path):
    return load_model(str(smollm2_path))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def set_cvec(llama, cv: ControlVector | None) -> None:
    n_layer = int(llama_cpp.llama_model_n_layer(llama.model))
    n_embd = int(llama_cpp.llama_model_n_embd(llama.model))
    if cv is None:
        rc = llama_cpp.llama_set_adapter_cvec(llama.ctx, None, 0, n_embd, -1, -1)
    else:
        buf = np.ascontiguousarray(cv.to_buffer(n_layer), dtype=np.float32)
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(llama.ctx, ptr, buf.size, n_embd, 1, n_layer - 1)
    assert rc == 0


def llama_logprobs(llama, tokens: list[int]) -> np.ndarray:
    llama.reset()  # the KV cache was computed with the previous vector
    llama.eval(tokens)
    return log_softmax(np.array(llama.scores[: len(tokens)]))


def hf_logprobs(hf, tokens: list[int], block: int | None, vec: np.ndarray) -> np.ndarray:
    shift = torch.tensor(vec, dtype=hf.model.dtype)

    def add(_m, _i, out):
        return (out[0] + shift,) + tuple(out[1:]) if isinstance(out, tuple) else out + shift

    handle = hf.blocks[block].register_forward_hook(add) if block is not None else None
    try:
        with torch.inference_mode():
            logits = hf.model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()
    finally:
        if handle is not None:
            handle.remove()
    return log_softmax(logits)


def pooled_correlations(llama, hf, export: dict[int, np.ndarray], compare: list[int], vec: np.ndarray) -> dict[int, float]:
    """corr(llama.cpp delta with ``export``, Transformers delta with a hook at each block in ``compare``)."""
    token_lists = [llama.tokenize(p.encode(), add_bos=True) for p in PROMPTS]
    set_cvec(llama, None)
    base_l = [llama_logprobs(llama, t) for t in token_lists]
    set_cvec(llama, ControlVector(export))
    steer_l = [llama_logprobs(llama, t) for t in token_lists]
    set_cvec(llama, None)
    d_llama = np.concatenate([(s - b).ravel() for s, b in zip(steer_l, base_l)])
    base_h = [hf_logprobs(hf, t, None, vec) for t in token_lists]
    out = {}
    for block in compare:
        d_hf = np.concatenate([(hf_logprobs(hf, t, block, vec) - b).ravel() for t, b in zip(token_lists, base_h)])
        out[block] = float(np.corrcoef(d_llama, d_hf)[0, 1])
    return out


@pytest.mark.parametrize("block", BLOCKS)
def test_direction_n_matches_hook_at_block_n(llama, hf, block):
    rng = np.random.default_rng(block)
    vec = rng.normal(size=hf.n_embd).astype(np.float32)
    vec *= NORM / np.linalg.norm(vec)
    corr = pooled_correlations(llama, hf, {block: vec}, [block - 1, block, block + 1], vec)
    print(f"direction.{block}: correlation with a Transformers hook at", {k: round(v, 3) for k, v in corr.items()})
    assert corr[block] > 0.6, corr
    assert corr[block] > corr[block - 1] + 0.05, corr
    assert corr[block] > corr[block + 1] + 0.05, corr


def test_off_by_one_export_is_detected(llama, hf):
    """Exporting the vector one block late (cvector-generator style) must show up as N+1, not N."""
    block = BLOCKS[0]
    rng = np.random.default_rng(block)
    vec = rng.normal(size=hf.n_embd).astype(np.float32)
    vec *= NORM / np.linalg.norm(vec)
    corr = pooled_correlations(llama, hf, {block + 1: vec}, [block, block + 1], vec)
    print(f"off-by-one export direction.{block + 1}:", {k: round(v, 3) for k, v in corr.items()})
    assert corr[block + 1] > corr[block] + 0.05, corr
