"""A tiny Qwen3-MoE model with seeded random weights, written as a GGUF both runtimes load.

No Mixture-of-Experts model can be had offline, so the MoE tests build one: llama.cpp's
``qwen3moe`` architecture (tensor names and shapes from its ``src/models/qwen3moe.cpp``), f32
weights (f16 for the token embedding), and the tokenizer and chat template of the cached
Qwen2.5-Coder GGUF (Qwen3 uses the same BPE vocabulary; Transformers converts it with the same
Qwen2 converter for both). ``qwen3moe`` is read by both llama.cpp (llama-cpp-python 0.3.36)
and Transformers' GGUF loader (``qwen3_moe``).

The expert width (``expert_feed_forward_length``) is deliberately not Transformers' default
(768): its GGUF config mapping ignores that key, and rs-local's loader has to pass it on.

Weights are scaled so that every block changes the residual stream by about as much as it
holds, which keeps neighbouring blocks distinguishable in the parity test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TinyMoE:
    """Dimensions of the generated model (defaults: the tests' tiny model)."""

    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 32
    context: int = 2048
    seed: int = 0

    @property
    def arch(self) -> str:
        return "qwen3moe"


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Sequential reads from a GGUF header (the gguf package's reader takes ~25 s on 300k strings)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub, n = self.unpack("<I"), self.unpack("<Q")
            if sub in _SCALARS:  # numeric arrays in one go
                dtype = np.dtype(_SCALARS[sub])
                arr = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos)
                self.pos += n * dtype.itemsize
                return sub, arr.tolist()
            return sub, [self.value(sub) for _ in range(n)]
        return self.unpack(_SCALARS[vtype])


def _tokenizer_fields(source: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, sub_type) of every ``tokenizer.*`` field of ``source``."""
    from gguf import GGUFValueType

    with open(source, "rb") as fh:
        data = fh.read(64 << 20)  # the header (tokenizer included) sits at the start
    cur = _Cursor(data)
    if data[:4] != b"GGUF":
        raise ValueError(f"{source}: not a GGUF file")
    cur.pos = 8
    cur.unpack("<Q")  # tensor count
    n_kv = cur.unpack("<Q")
    out = []
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.unpack("<I")
        value = cur.value(vtype)
        if not key.startswith("tokenizer."):
            continue
        if vtype == 9:
            sub, items = value
            out.append((key, items, GGUFValueType.ARRAY, GGUFValueType(sub)))
        else:
            out.append((key, value, GGUFValueType(vtype), None))
    return out


def _tensors(spec: TinyMoE, n_vocab: int) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> numpy array (numpy shape = ggml ne reversed)."""
    rng = np.random.default_rng(spec.seed)
    d, hd, e, f = spec.n_embd, spec.head_dim, spec.n_expert, spec.n_ff_exp

    def w(*shape: int, fan_in: int, gain: float = 1.0) -> np.ndarray:
        return (rng.normal(size=shape) * gain / np.sqrt(fan_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.normal(size=n)).astype(np.float32)

    out = {"token_embd.weight": rng.normal(size=(n_vocab, d)).astype(np.float16), "output_norm.weight": norm(d)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out |= {
            p + "attn_norm.weight": norm(d),
            p + "attn_q.weight": w(spec.n_head * hd, d, fan_in=d),
            p + "attn_k.weight": w(spec.n_head_kv * hd, d, fan_in=d),
            p + "attn_v.weight": w(spec.n_head_kv * hd, d, fan_in=d),
            p + "attn_output.weight": w(d, spec.n_head * hd, fan_in=spec.n_head * hd),
            p + "attn_q_norm.weight": norm(hd),
            p + "attn_k_norm.weight": norm(hd),
            p + "ffn_norm.weight": norm(d),
            p + "ffn_gate_inp.weight": w(e, d, fan_in=d, gain=2.0),  # peaked routing: experts differ per token
            p + "ffn_gate_exps.weight": w(e, f, d, fan_in=d),
            p + "ffn_up_exps.weight": w(e, f, d, fan_in=d),
            p + "ffn_down_exps.weight": w(e, d, f, fan_in=f, gain=2.0),
        }
    return out


def _small_vocabulary(fields: list, n_base: int) -> list:
    """Keep the byte tokens, the first ``n_base - 256`` merges and every special token.

    In Qwen's vocabulary token ``256 + k`` is the result of merge ``k``, so the first tokens and
    merges form a complete smaller BPE; the special tokens (chat template markers, end of text)
    move down to ids ``n_base...``. A 151k-token vocabulary would cost Transformers' GGUF reader
    ~20 s per load and make the embedding the bulk of the model.
    """
    by_key = {k: (v, t, s) for k, v, t, s in fields}
    tokens, types = by_key["tokenizer.ggml.tokens"][0], by_key["tokenizer.ggml.token_type"][0]
    first_special = min(i for i, kind in enumerate(types) if i >= 256 and kind != 1)
    out = []
    for key, value, vtype, sub in fields:
        if key == "tokenizer.ggml.tokens":
            value = tokens[:n_base] + tokens[first_special:]
        elif key == "tokenizer.ggml.token_type":
            value = types[:n_base] + types[first_special:]
        elif key == "tokenizer.ggml.merges":
            value = value[: n_base - 256]
        elif key.endswith("_token_id") and isinstance(value, int) and value >= first_special:
            value = value - first_special + n_base
        out.append((key, value, vtype, sub))
    return out


def write_tiny_moe(path: Path, tokenizer_source: Path, spec: TinyMoE = TinyMoE(), n_base_vocab: int = 4096) -> Path:
    """Write the tiny model to ``path`` (tokenizer and chat template from ``tokenizer_source``)."""
    import gguf

    fields = _small_vocabulary(_tokenizer_fields(tokenizer_source), n_base_vocab)
    n_vocab = len(next(v for k, v, _t, _s in fields if k == "tokenizer.ggml.tokens"))
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name("tiny-qwen3moe-random")
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff_exp * spec.n_expert_used)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in _tensors(spec, n_vocab).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
