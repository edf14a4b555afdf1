"""The local judge: a GGUF model run through our llama.cpp Runner.

The judge's turn is pre-filled with ``VERDICT:`` so the very next token is the verdict word,
and its full next-token distribution there gives the confidence (no need for a server that
reports log-probabilities). A few greedy tokens are then generated for the text verdict and
refusal type. The rubric is the system turn and identical for every answer, so the Runner's
prefix reuse evaluates it once; each answer only costs its own tokens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rs_local.judge.rubric import VERDICT_PREFIX, judge_messages, rubric_version
from rs_local.judge.verdict import Verdict, label_probs, make_verdict

#: How many of the most likely next tokens are inspected for verdict-word beginnings.
TOP_K = 40


class LocalJudge:
    """Judge answers with a loaded :class:`rs_local.runtime.runner.Runner`."""

    backend = "local"
    concurrency = 1

    def __init__(self, runner, *, max_tokens: int = 12, logprobs: bool = True,
                 nonce_factory: Callable[[], str] | None = None):
        self.runner = runner
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.nonce_factory = nonce_factory

    def describe(self) -> dict:
        """The judge's identity in verdict caches and judge logs: the model's contents, not its name
        (two judges with one file name and size shared cached verdicts and resumed each other's logs)."""
        from rs_local.models import file_identity

        weights = file_identity(self.runner.path)  # milliseconds; described a few times a command
        return {
            "backend": self.backend,
            "model": self.runner.path.name,
            "model_bytes": weights.get("size"),  # kept: logs written before "weights" compare it
            "weights": weights,
            "rubric": rubric_version(),
            "logprobs": self.logprobs,
        }

    def prompt_text(self, prompt: str, answer: str) -> str:
        """The judge's full input: chat template, rubric, fenced answer, and the pre-filled verdict key."""
        messages, _ = judge_messages(prompt, answer, self.nonce_factory() if self.nonce_factory else None)
        return self._format(messages) + VERDICT_PREFIX

    def _format(self, messages: list[dict[str, str]]) -> str:
        """Apply the chat template; templates without a system role (Gemma's) get the rubric in the
        first user turn (``rs_local.templating``, inside ``format_chat``)."""
        return self.runner.format_chat(messages)

    def judge(self, prompt: str, answer: str) -> Verdict:
        text = self.prompt_text(prompt, answer)
        probs = self._label_probs(text) if self.logprobs else None
        gen = self.runner.generate(text, max_tokens=self.max_tokens, stop=["\n\n"])
        return make_verdict(VERDICT_PREFIX + gen.text, probs)

    def _label_probs(self, text: str) -> tuple[float, float]:
        logp = self.runner.next_token_logprobs(text)
        top = np.argpartition(-logp, TOP_K)[:TOP_K]
        pieces = [(self._token_text(int(t)), float(logp[t])) for t in top]
        return label_probs(pieces)

    def _token_text(self, token: int) -> str:
        return self.runner.llama.detokenize([token]).decode("utf-8", errors="ignore")

    def close(self) -> None:
        """The runner belongs to the caller; nothing to free here."""
