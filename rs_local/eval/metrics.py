"""Coherence metrics: KL against the unsteered model, and a repetition/gibberish check.

Refusal rates say whether steering worked; these say what it cost. A vector strong enough to
remove refusals can also wreck the model, so every evaluation measures, on harmless
prompts, how far the steered next-token distribution moved from the plain model's.

KL is taken on the *plain* model's own answer (teacher forcing): both models are scored
on the same tokens, so the number measures the distribution shift itself and not the fact
that two free-running answers went different ways after one token. Direction
``KL(plain || steered)``: large when the steered model puts little mass where the plain
model was confident, which is what breaks fluent text.

The plain model's rows are kept as their top-k entries plus one "everything else" bucket
(a 150k-entry row per token would make the baseline cache hundreds of MB). The KL between
these coarse-grained distributions is a lower bound of the full KL (coarse-graining never
increases KL) and, with k=256 covering all but a sliver of the mass, equal to it for
practical purposes; it is exactly 0 when nothing changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: How many of the plain model's most likely tokens are kept per position.
TOP_K = 256
_TINY = 1e-12


@dataclass
class Reference:
    """The plain model's next-token distributions on its own answer, top-k per position."""

    ids: np.ndarray  # [n_pos, k] int32
    logprobs: np.ndarray  # [n_pos, k] float32

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])


def topk_reference(rows: np.ndarray, k: int = TOP_K) -> Reference:
    """Keep the ``k`` most likely entries of each log-prob row ``[n_pos, n_vocab]``."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError("expected [positions, vocab] log-prob rows")
    if rows.shape[0] == 0:
        return Reference(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    k = min(k, rows.shape[1])
    ids = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    lps = np.take_along_axis(rows, ids, axis=1)
    return Reference(ids.astype(np.int32), lps.astype(np.float32))


def _log1mexp_sum(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(logprobs))) per row, floored at log(_TINY)."""
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
    return np.log(np.clip(1.0 - mass, _TINY, None))


def kl_to_reference(ref: Reference, rows: np.ndarray) -> np.ndarray:
    """Per-position ``KL(plain || steered)`` over the reference's top-k plus a tail bucket.

    ``rows`` are the steered model's log-prob rows ``[n_pos, n_vocab]`` at the same positions.
    """
    rows = np.asarray(rows, dtype=np.float64)
    n = min(ref.n_pos, rows.shape[0])
    if n == 0:
        return np.zeros(0)
    p_lp = ref.logprobs[:n].astype(np.float64)
    q_lp = np.take_along_axis(rows[:n], ref.ids[:n].astype(np.int64), axis=1)
    head = (np.exp(p_lp) * (p_lp - q_lp)).sum(axis=1)
    p_tail, q_tail = _log1mexp_sum(p_lp), _log1mexp_sum(q_lp)
    tail = np.exp(p_tail) * (p_tail - q_tail)
    return np.clip(head + tail, 0.0, None)


# ----------------------------------------------------------------------------- degeneration

_WORD = re.compile(r"\w+", re.UNICODE)
#: An answer is "repetitive" when fewer than this share of its word 4-grams are distinct.
MIN_DISTINCT_4GRAMS = 0.5
#: ... or one token makes up more than this share of a long answer.
MAX_TOKEN_SHARE = 0.4
#: An answer is "gibberish" when letters are fewer than this share of its visible characters.
MIN_LETTER_SHARE = 0.45
_MIN_WORDS = 8


def degeneration(text: str, tokens: Sequence[int] = ()) -> str | None:
    """Why an answer is degenerate (``empty``, ``repetition``, ``gibberish``), or None if fine.

    Deliberately coarse: it catches what a too-strong vector produces (loops, a token spammed,
    symbol soup, no answer at all), not style. A short but sensible answer passes.
    """
    visible = "".join(text.split())
    if not visible:
        return "empty"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= _MIN_WORDS:
        grams = list(zip(words, words[1:], words[2:], words[3:]))
        if grams and len(set(grams)) / len(grams) < MIN_DISTINCT_4GRAMS:
            return "repetition"
    if len(tokens) >= 16:
        _, counts = np.unique(np.asarray(tokens), return_counts=True)
        if counts.max() / len(tokens) > MAX_TOKEN_SHARE:
            return "repetition"
    letters = sum(ch.isalpha() for ch in visible)
    if len(visible) >= 12 and letters / len(visible) < MIN_LETTER_SHARE:
        return "gibberish"
    return None


def rate(flags: Iterable[bool]) -> float:
    """Share of true flags (0.0 for none)."""
    flags = list(flags)
    return float(sum(bool(f) for f in flags)) / len(flags) if flags else 0.0
