"""llama.cpp block outputs (read through ``cb_eval``) match Transformers at the same block.

The policy gate and the probe judge read ``l_out-N`` from llama.cpp; vectors and the older
probes were fitted on Transformers' ``hidden_states[N+1]``. If the two disagreed by a block,
a probe would read the wrong layer silently. Quantisation (SmolLM2 Q4_1 in llama.cpp, the
dequantised weights in Transformers) keeps the match below 1, so, as in test_parity.py, the
check is that block N of one correlates best with block N of the other, not with N-1 or N+1.
Rows are centred over prompts first: the residual stream's few huge constant dimensions would
otherwise make every block correlate with every other.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

PROMPTS = [
    "How long should I boil an egg for a soft yolk?", "What is the derivative of x squared?",
    "Write a Python function that reverses a list.", "What spices go well with roasted carrots?",
    "Is 91 a prime number?", "How do I read a file line by line in Python?",
]
BLOCKS = (5, 10, 20)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_llama_cpp_block_outputs_match_transformers(smollm2_path):
    from rs_local.runtime.activations import BlockReader
    from rs_local.runtime.runner import Runner
    from rs_local.vectors.capture import capture
    from rs_local.vectors.hf_model import load_model

    runner = Runner(smollm2_path, n_ctx=512, n_threads=2)
    wanted = sorted({b + d for b in BLOCKS for d in (-1, 0, 1)})
    with BlockReader(runner, wanted, n_ctx=512) as reader:
        rows = [reader.read([{"role": "user", "content": p}]) for p in PROMPTS]
    ll = {b: np.stack([r[b] for r in rows]) for b in wanted}
    hf = capture(load_model(str(smollm2_path)), PROMPTS, keep_raw=True)
    for b in BLOCKS:
        same = _corr(ll[b], hf.layer(b))
        neighbours = [_corr(ll[b], hf.layer(b + d)) for d in (-1, 1)]
        assert same > 0.9 and same > max(neighbours) + 0.05, (b, same, neighbours)


def test_ggml_base_is_found_beside_the_loaded_llama_library(tmp_path):
    """A build loaded through LLAMA_CPP_LIB_PATH (CUDA, Metal) must be read with its own ggml-base,
    not the wheel's; MinGW's file name counts too."""
    from rs_local.errors import RsLocalError
    from rs_local.runtime.activations import ggml_base_path

    custom, wheel = tmp_path / "cuda", tmp_path / "wheel"
    custom.mkdir()
    wheel.mkdir()
    (wheel / "libggml-base.so").write_bytes(b"")
    assert ggml_base_path([custom, wheel]) == str(wheel / "libggml-base.so")
    (custom / "libggml-base.dll").write_bytes(b"")  # MinGW
    assert ggml_base_path([custom, wheel]) == str(custom / "libggml-base.dll")
    with pytest.raises(RsLocalError, match="no ggml-base library found"):
        ggml_base_path([tmp_path / "none"])
    assert ggml_base_path().endswith(("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"))  # this install's
