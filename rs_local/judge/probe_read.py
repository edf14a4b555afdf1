"""What the probe judge reads: one block's output averaged over the answer's tokens.

The first probe read the last token only (after "Reply REFUSAL or ANSWERED"), which has to
carry everything about a long answer in one position. Averaging the block output over the
answer's own tokens keeps what each part of the answer looked like to the model; in grouped
cross-validation on the labelled train rows it beat the last token at every block tried
(block 14: 89.6% against 87.8%; see the README's judge section), so probes are trained and
read this way (``pooling = "answer-mean"``); files made before record no pooling and keep
the last token.

The span is found on the exact text the model reads (its chat template applied): the bytes
of each token are laid end to end, so the tokens covering the answer are known without
tokenising the answer on its own (which can merge differently at its edges).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rs_local.errors import RsLocalError
from rs_local.runtime.activations import BlockReader

def answer_span(runner: Any, messages: list[dict[str, str]], marker: str, answer: str) -> tuple[list[int], int, int]:
    """Tokens of the chat and the [lo, hi) token range of ``answer``, which follows ``marker`` in it."""
    text = runner.format_chat(messages).encode("utf-8")
    tokens = runner.tokenize(messages)
    at = text.find(marker.encode("utf-8"))
    if at < 0 or not answer:
        return tokens, len(tokens) - 1, len(tokens)  # nothing to average: the last token, as before
    start = at + len(marker.encode("utf-8"))
    end = start + len(answer.encode("utf-8"))
    lo = hi = None
    pos = 0
    for i, tok in enumerate(tokens):
        pos += len(runner.llama.detokenize([tok], special=True))
        if lo is None and pos > start:
            lo = i
        if hi is None and pos >= end:
            hi = i + 1
    if lo is None or hi is None or hi <= lo:
        return tokens, len(tokens) - 1, len(tokens)
    return tokens, lo, hi


class SpanReader(BlockReader):
    """A :class:`BlockReader` that also returns each block's mean over a span of positions."""

    def __init__(self, runner: Any, layers: Sequence[int], n_ctx: int = 2048, n_batch: int = 512):
        super().__init__(runner, layers, n_ctx=n_ctx, n_batch=n_batch)
        if self.layers and self.layers[-1] >= runner.n_layer - 1:
            # llama.cpp cuts the final block's output to the rows that make logits: no span there
            raise RsLocalError(f"an averaged probe cannot read the final block ({runner.n_layer - 1})")
        self._chunks: dict[int, list[np.ndarray]] = {}

    def _on_tensor(self, tensor: int, ask: bool, user: int) -> bool:
        layer = self._names.get(self._ggml.ggml_get_name(tensor))
        if layer is not None and not ask:
            n = int(self._ggml.ggml_nelements(tensor))
            rows = np.empty((n // self.n_embd, self.n_embd), dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, n * 4)
            self._chunks.setdefault(layer, []).append(rows)
        return super()._on_tensor(tensor, ask, user)

    def read_span(self, tokens: list[int], lo: int, hi: int) -> dict[int, np.ndarray]:
        """Evaluate ``tokens`` and return each block's output averaged over positions [lo, hi)."""
        self._cached = self._cached[:lo]  # the span's rows must be computed now, not taken from the cache
        self._chunks = {}
        self.read_tokens(tokens)
        out = {}
        for layer, chunks in self._chunks.items():
            rows = np.concatenate(chunks)
            first = len(tokens) - len(rows)  # position of the first row evaluated (after the reused prefix)
            out[layer] = rows[lo - first:hi - first].mean(axis=0)
        return out


__all__ = ["SpanReader", "answer_span"]
