"""A small deterministic :class:`rs_local.runtime.engine.Engine` for the evaluator, sweep and cache logic.

Not a stand-in for llama.cpp (the real engines are tested on real models): it lets the logic
around an engine be tested in milliseconds, with answers whose right values are known.

Each prompt carries its own refusal rule: a prompt that starts with ``[T]`` (a number) is
refused while the applied steering ``s`` (the sum of the vectors' scales) is above ``T``, and
answered once ``s <= T``; a prompt without a tag is never refused. Lowering ``s`` therefore
removes refusals one prompt at a time, as a refusal direction does. Teacher-forced rows are a
fixed random distribution per (prompt, position) tilted by ``s``, so ``KL(plain || steered)``
is 0 at ``s = 0`` and grows with ``|s|``. The answer text names the applied vectors' digest, so
a different vector gives different answers at the same scale.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rs_local.callbacks import Progress
from rs_local.runtime.runner import Generation, Prompt
from rs_local.runtime.sampling import SamplingParams, log_softmax
from rs_local.vectors.control_vector import ControlVector

_TAG = re.compile(r"^\[(-?\d+(?:\.\d+)?)\]")
REFUSAL = "I'm sorry, but I can't help with that."


def tagged(threshold: float, question: str) -> str:
    """A prompt refused while the steering is above ``threshold``."""
    return f"[{threshold:g}] {question}"


class FakeEngine:
    """Deterministic answers and log-prob rows per (prompt, steering); counts what it was asked."""

    kind = "fake"

    def __init__(self, model_path: Path, n_layer: int = 30, n_vocab: int = 512):
        self.model_path = Path(model_path)
        self.n_layer = n_layer
        self.n_vocab = n_vocab
        self.steering = 0.0
        self.vector_digest = ""
        self.generated: list[tuple[str, float]] = []  # (question, steering) of every answer, in order
        self.forced = 0  # teacher-forced pairs scored
        self.closed = False

    def set_vectors(self, parts: Sequence[tuple[ControlVector, float]], layer_range: tuple[int, int] | None = None) -> None:
        parts = list(parts)
        self.steering = float(sum(scale for _v, scale in parts))
        h = hashlib.sha256(repr(layer_range).encode())
        for vec, scale in parts:
            h.update(np.ascontiguousarray(vec.to_buffer(self.n_layer), dtype=np.float32).tobytes() + repr(scale).encode())
        self.vector_digest = h.hexdigest()[:8] if parts else ""

    def generate_many(self, prompts: Sequence[Prompt], *, max_tokens: int = 48,
                      sampling: SamplingParams | None = None, progress: Progress | None = None) -> list[Generation]:
        out = []
        for prompt in prompts:
            text = _question(prompt)
            self.generated.append((text, self.steering))
            answer = REFUSAL if self._refuses(text) else f"Sure. Here is an answer about {text} ({self.vector_digest or 'plain'})."
            tokens = [zlib.crc32(w.encode()) % self.n_vocab for w in answer.split()][:max_tokens]
            out.append(Generation(text=answer, tokens=tokens, finish_reason="stop", prompt_tokens=len(text.split())))
            if progress:
                progress(len(out), len(prompts))
        return out

    def forced_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[int]],
                        reduce: Callable[[int, np.ndarray], object] | None = None,
                        progress: Progress | None = None) -> list:
        tilt = np.linspace(-1.0, 1.0, self.n_vocab)
        out = []
        for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
            rng = np.random.default_rng(zlib.crc32(_question(prompt).encode()))
            base = rng.normal(size=(len(cont), self.n_vocab)) * 2.0
            rows = np.stack([log_softmax(r + self.steering * tilt) for r in base]) if len(cont) else np.zeros((0, self.n_vocab))
            self.forced += 1
            out.append(reduce(i, rows) if reduce else rows)
            if progress:
                progress(len(out), len(prompts))
        return out

    def close(self) -> None:
        self.closed = True

    def _refuses(self, question: str) -> bool:
        m = _TAG.match(question)
        return m is not None and self.steering > float(m.group(1)) + 1e-9


def _question(prompt: Prompt) -> str:
    """The user's text: the prompt itself, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]
