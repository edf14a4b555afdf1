"""The two ways an evaluation runs the model: batched (fast) or the Runner's own loop.

Both are :class:`rs_local.runtime.engine.Engine` (``set_vectors``, ``generate_many``,
``forced_logprobs``), so the evaluator does not care which it drives. ``batch=1`` selects the Runner's sequential
path, which is what ``rs-local chat`` and ``generate`` run, token for token; the batched
engine is several times faster on a CPU and agrees with it up to near-ties (see
:mod:`rs_local.runtime.batched`). Each engine has a ``kind`` that enters cache keys, so answers
produced by one are never served as the other's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rs_local.callbacks import Progress
from rs_local.runtime.engine import Engine, RunnerModel
from rs_local.runtime.runner import Generation, Prompt, Runner, longest_prompt
from rs_local.runtime.sampling import SamplingParams
from rs_local.vectors.control_vector import ControlVector


class SequentialEngine(RunnerModel):
    """One prompt at a time through :class:`Runner` (exactly what the chat commands do)."""

    kind = "sequential"

    def __init__(self, runner: Runner):
        self.runner = runner

    def set_vectors(self, parts: Sequence[tuple[ControlVector, float]], layer_range: tuple[int, int] | None = None) -> None:
        self.runner.set_vectors(parts, layer_range)

    def generate_many(self, prompts: Sequence[Prompt], *, max_tokens: int = 48,
                      sampling: SamplingParams | None = None, progress: Progress | None = None) -> list[Generation]:
        out = []
        for p in prompts:
            out.append(self.runner.generate(p, max_tokens=max_tokens, sampling=sampling))
            if progress:
                progress(len(out), len(prompts))
        return out

    def forced_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[int]],
                        reduce: Callable[[int, np.ndarray], object] | None = None,
                        progress: Progress | None = None) -> list:
        out = []
        for i, (p, cont) in enumerate(zip(prompts, continuations)):
            rows = self.runner.forced_logprobs(p, cont) if len(cont) else np.zeros((0, self.runner.n_vocab))
            out.append(reduce(i, rows) if reduce else rows)
            if progress:
                progress(len(out), len(prompts))
        return out

    def close(self) -> None:
        """The Runner belongs to the caller."""


def slot_size(runner: Runner, prompts: Sequence[tuple[str, Sequence]], max_tokens: int, floor: int) -> int:
    """Tokens one batch slot must hold for every prompt and its answer: ``floor``, or more, in steps of 256.

    ``prompts``: ``(where, [prompt, ...])`` per set, where a prompt is what the engine gets (text or
    messages). Why: slots were a fixed 1024 (512 in ``policy fit``'s check), so one long prompt (a
    jailbreak template, a pasted document) stopped ``isolate``, ``eval`` or ``policy fit`` with "one
    batch slot holds 1024" although the context held 4096; a prompt too long for the context is now
    one line naming its set and position, before any answer."""
    room = f"the context holds {runner.n_ctx:,} (use --ctx, or shorten it)"
    longest = max((longest_prompt(runner, items, runner.n_ctx - 2, room, where) for where, items in prompts), default=0)
    need = longest + max_tokens + 1
    return floor if need <= floor else min(runner.n_ctx, -(-need // 256) * 256)


def make_engine(runner: Runner, batch: int | None = None, seq_ctx: int = 1024, exact: bool = False) -> Engine:
    """``batch`` sequences per llama.cpp batch (None: chosen from the model's KV size,
    :func:`rs_local.runtime.batched.default_batch`); 1 = the Runner's sequential path.

    ``exact`` False (default): the sequences share one KV pool, so each step is one graph pass
    (labelling 1.6x faster on 2 cores); a row then moves slightly with which prompts share
    the batch (mean KL 0.0003 nats per token), enough to tip a near-tied greedy token: isolate's
    133 labelling answers both ways gave 132 same verdicts, 130 same first two tokens. Runs are
    still repeatable: the same prompts and batch give the same answers. ``exact`` True: a KV
    stream per sequence (``--exact``), every answer independent of the batch where llama.cpp
    computes a sequence's rows the same whatever else the batch holds: SmolLM2's Q4_1 everywhere
    we measured, Qwen2.5's Q4_K_M on AVX2 (its tests passed) but not on an AVX-512 EPYC (KL up to
    0.002 per token between batch sizes, repacking on or off). ``batch=1`` is the one mode that
    is exact on every CPU. The kind names the mode, so the cache never serves one mode's answers
    to the other.
    """
    from rs_local.runtime.batched import DEFAULT_KV_BUDGET, BatchEngine, default_batch, kv_bytes_per_token

    if batch is None:
        per_token = kv_bytes_per_token(runner)
        # two slots of a long prompt's size over the KV budget (a 7B model's 16k-token prompt: 16 GB
        # beside its own context): answer one at a time in the Runner's context instead
        batch = default_batch(per_token, seq_ctx) if 2 * per_token * seq_ctx <= DEFAULT_KV_BUDGET else 1
    if batch <= 1:
        return SequentialEngine(runner)

    engine = BatchEngine(runner, n_seq=batch, seq_ctx=seq_ctx, kv_unified=not exact)
    engine.kind = f"batched-{seq_ctx}" + ("" if exact else "-pooled")
    return engine
