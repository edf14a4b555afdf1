"""The one seam between "run the model on many prompts" and the code that measures answers.

Two engines stand behind it: :class:`rs_local.runtime.batched.BatchEngine` (several
sequences per llama.cpp decode, the fast path) and :class:`rs_local.eval.engines.SequentialEngine`
(one prompt at a time through the Runner, token for token what ``chat`` and ``generate`` do).
The evaluator, the sweep and the recipes take an :class:`Engine`, so they can be tested with a
small deterministic engine and no model (``tests/fake_engine.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from rs_local.callbacks import Progress
from rs_local.runtime.runner import Generation, Prompt, Runner
from rs_local.runtime.sampling import SamplingParams
from rs_local.vectors.control_vector import ControlVector


@runtime_checkable
class Engine(Protocol):
    """Answers and teacher-forced log-probs for many prompts, with vectors applied.

    ``kind`` enters cache keys, so answers produced by one engine are never served as
    another's; ``model_path`` and ``n_layer`` name the model that answers (cache keys and the
    vector buffer length).
    """

    kind: str

    @property
    def model_path(self) -> Path: ...

    @property
    def n_layer(self) -> int: ...

    def set_vectors(self, parts: Sequence[tuple[ControlVector, float]],
                    layer_range: tuple[int, int] | None = None) -> None:
        """Apply ``sum(scale * vector)`` (inclusive block range); ``[]`` clears."""

    def generate_many(self, prompts: Sequence[Prompt], *, max_tokens: int = 48,
                      sampling: SamplingParams | None = None,
                      progress: Progress | None = None) -> list[Generation]:
        """One answer per prompt, in prompt order."""

    def forced_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[int]],
                        reduce: Callable[[int, np.ndarray], object] | None = None,
                        progress: Progress | None = None) -> list:
        """Log-prob rows ``[len(continuation), n_vocab]`` per pair, or ``reduce(index, rows)`` of them."""

    def close(self) -> None:
        """Free what the engine owns (never the Runner it was given)."""


class RunnerModel:
    """For engines that drive a :class:`Runner`: the model they run is the Runner's."""

    runner: Runner

    @property
    def model_path(self) -> Path:
        return self.runner.path

    @property
    def n_layer(self) -> int:
        return self.runner.n_layer
