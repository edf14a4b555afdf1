"""Token sampling from raw logits, in numpy.

We sample ourselves instead of through llama.cpp's sampler chain because we need the
log-probability of every chosen token (the judge weights answers by it, evals compare
distributions) and llama-cpp-python only exposes those with ``logits_all=True``, which keeps
an ``n_ctx x n_vocab`` float matrix alive (over 1 GB for Qwen's 151k vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax of a 1-D float array."""
    x = logits.astype(np.float64, copy=False)
    return x - _log_sum_exp(x)


def _log_sum_exp(x: np.ndarray) -> np.float64:
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


@dataclass
class SamplingParams:
    """What decides the next token. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    #: False: greedy picks skip the log-prob (reported as NaN); the server, which never returns
    #: log-probs, saves a pass over the vocabulary per token
    logprobs: bool = True

    def validate(self) -> None:
        """One-line errors for values numpy would choke on deep inside sampling (NaN, a negative seed)."""
        from rs_local.errors import RsLocalError

        def number(x: object) -> bool:
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        if not number(self.temperature) or not 0 <= self.temperature <= 1e6:
            raise RsLocalError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 <= self.top_p <= 1:
            raise RsLocalError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise RsLocalError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            raise RsLocalError(f"seed must be a whole number in [0, 2^64), got {self.seed!r}")


class Sampler:
    """Picks tokens and reports each one's log-probability under the model (temperature 1)."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def pick(self, logits: np.ndarray) -> tuple[int, float]:
        """Return (token id, model log-prob of that token).

        Greedy needs one entry of the log-softmax, so it skips building the whole array (one
        pass over the vocabulary less per token; the same value to the bit).
        """
        if self.params.temperature == 0:
            token = int(np.argmax(logits))
            if not self.params.logprobs:
                return token, float("nan")
            x = logits.astype(np.float64, copy=False)
            return token, float(x[token] - _log_sum_exp(x))
        logp = log_softmax(logits)
        token = self._sample(logp)
        return token, float(logp[token])

    def _sample(self, logp: np.ndarray) -> int:
        """Temperature, then top-k, then top-p (0 keeps the most likely token alone, as in OpenAI's API).

        The log-probs are shifted so the most likely token sits at 0 before dividing: a temperature
        near the smallest float sends every other token to -inf instead of all of them (-inf minus
        -inf was NaN, and a 500 from the server).
        """
        with np.errstate(over="ignore"):  # the overflow to -inf is the point, not a fault to print
            scaled = (logp - logp.max()) / self.params.temperature
        order = np.argsort(-scaled)
        if self.params.top_k:
            order = order[: self.params.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.params.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
