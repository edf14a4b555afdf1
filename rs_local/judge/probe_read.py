"""What the probe judge reads: one block's output averaged over the answer's tokens.

The first probe read the last token only (after "Reply REFUSAL or ANSWERED"), which has to
carry everything about a long answer in one position. Averaging the block output over the
answer's own tokens keeps what each part of the answer looked like to the model; in grouped
cross-validation on the labelled train rows it beat the last token at every block tried
(block 14: 89.6% against 87.8%; see benchmarks/RESULTS.md, the probe judge), so probes are trained and
read this way (``pooling = "answer-mean"``); files made before record no pooling and keep
the last token.

The span is found on the exact text the model reads (its chat template applied): the bytes
of each token are laid end to end, so the tokens covering the answer are known without
tokenising the answer on its own (which can merge differently at its edges). The rows are
read and averaged by :meth:`rs_local.runtime.activations.BlockReader.read_span`.
"""

from __future__ import annotations

from typing import Any


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


__all__ = ["answer_span"]
