"""Many answers at once: several sequences per llama.cpp batch through the low-level API.

An evaluation generates hundreds of short answers, and one token of one sequence per
``llama_decode`` leaves the CPU waiting on memory: every step streams all the weights (and,
for a 150k-token vocabulary, the largest matrix, the output head) to compute a single row.
Decoding ``n_seq`` sequences in one batch streams the weights once for all of them, so the
cost per token falls several-fold on a laptop CPU, and more on a GPU.

The engine owns its own llama.cpp context on the Runner's model (the Runner's context holds
one sequence), with a KV cache split into ``n_seq`` slots. Finished sequences free their slot
at once and the next prompt moves in (continuous batching), so a batch is never waiting on
its longest answer. A caller that reads answers only up to some point stops each one there
(:meth:`BatchEngine.generate_until`), which frees its slot just the same. The same steering
vector is pushed into this context with ``llama_set_adapter_cvec``, exactly as the Runner does.
The chat template's head that every prompt of a call shares (its system text) is evaluated once
per call and copied into each slot (:func:`shared_head`), not evaluated once per prompt.

Results match the Runner's sequential answers up to floating-point reordering in batched
matrix products; greedy answers are nearly always token-identical (tested), and where two
tokens are almost tied the answers can diverge, the same as between two llama.cpp builds.
"""

from __future__ import annotations

import codecs
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rs_local.callbacks import Progress
from rs_local.errors import RsLocalError
from rs_local.runtime.engine import RunnerModel
from rs_local.runtime.interrupts import deferred, release
from rs_local.runtime.kv_state import read_seq_state, write_seq_state
from rs_local.runtime.owned_context import OwnedContext
from rs_local.runtime.runner import Generation, Prompt, Runner
from rs_local.runtime.steer import push_vectors
from rs_local.runtime.sampling import Sampler, SamplingParams, log_softmax
from rs_local.vectors.control_vector import ControlVector

#: Logit rows per prompt returned by :meth:`BatchEngine.forced_logprobs` callbacks.
Rows = np.ndarray

#: ``stop_when(text) -> bool``: called on an answer's decoded text after each token.
StopWhen = Callable[[str], bool]

#: A head shared by every prompt of a call shorter than this is evaluated with each prompt.
MIN_SHARED_HEAD = 8

#: Sequences per batch when the caller does not say. With one KV pool a 2-core CPU still gains
#: from 16 to 32 (Qwen2.5-Coder-0.5B, benchmarks/eval_throughput.py: 41 -> 45-49 tok/s); more
#: sequences than a prompt set holds buy nothing, and the KV budget below caps larger models.
MAX_DEFAULT_BATCH = 32
#: KV cache the default batch may take (f16 keys and values of every slot at full length).
DEFAULT_KV_BUDGET = 1 << 30


def default_batch(kv_bytes_per_token: int, seq_ctx: int, budget: int = DEFAULT_KV_BUDGET) -> int:
    """Sequences per batch for a model whose KV cache takes ``kv_bytes_per_token``: as many as fit
    ``budget`` at ``seq_ctx`` tokens each, between 2 and :data:`MAX_DEFAULT_BATCH`.

    Why from the model: a 0.5B model with grouped KV heads takes 12 KB per token (16 slots of
    1024 tokens: 200 MB), a 7B model without them 512 KB (16 slots: 8 GB, more than a laptop has).
    """
    per_seq = max(1, kv_bytes_per_token * seq_ctx)
    return max(2, min(MAX_DEFAULT_BATCH, budget // per_seq))


def kv_bytes_per_token(runner: Runner) -> int:
    """Bytes of f16 keys and values one token takes in ``runner``'s model (all blocks)."""
    import llama_cpp

    model = runner.llama.model
    heads = max(1, int(llama_cpp.llama_model_n_head(model)))
    kv_heads = max(1, int(llama_cpp.llama_model_n_head_kv(model)))
    return runner.n_layer * 2 * (runner.n_embd // heads) * kv_heads * 2


def shared_head(token_lists: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every list shares, leaving each at least one token of its own; 0 below
    :data:`MIN_SHARED_HEAD` or with fewer than two lists.

    A chat template puts the same system text before every user message (24 tokens on Qwen, two
    thirds of a short question), and on a CPU prompt evaluation is compute-bound: evaluating that
    head once per call instead of once per prompt took isolate's labelling pass from 248 s to 199 s
    (``benchmarks/speed_profile.py --labelling --head``). The restored keys and values are
    bit-identical to evaluated ones; answers can still differ where two tokens nearly tie, because
    the prompts' remaining tokens share decodes with other sequences differently.
    """
    if len(token_lists) < 2:
        return 0
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1
    for t in token_lists[1:]:
        k = 0
        while k < n and t[k] == first[k]:
            k += 1
        n = k
    return n if n >= MIN_SHARED_HEAD else 0


@dataclass
class _Slot:
    """One running sequence: where it is in the KV cache and what it produced so far."""

    index: int  # position in the caller's list
    seq: int  # llama.cpp sequence id (the KV slot)
    pos: int  # next position to write
    out: Generation
    sampler: Sampler
    decoder: codecs.IncrementalDecoder
    budget: int
    stop_when: StopWhen | None = None
    pending: int | None = None  # token to feed at the next step


class BatchEngine(OwnedContext, RunnerModel):
    """Batched generation and teacher-forced scoring on a Runner's model.

    ``n_seq`` sequences share each decode; ``seq_ctx`` is the KV room of one sequence (prompt
    plus answer). Apply vectors with :meth:`set_vectors` (validated by the Runner first); a vector
    set on the Runner itself is followed too, at the start of each call.
    """

    kind = "batched"

    def __init__(self, runner: Runner, n_seq: int = 8, seq_ctx: int = 1024, n_batch: int = 1024,
                 kv_unified: bool = False):
        import llama_cpp

        if n_seq < 1:
            raise ValueError("n_seq must be >= 1")
        self._lib = llama_cpp
        self.runner = runner
        self.n_seq = n_seq
        self.seq_ctx = seq_ctx
        self.n_batch = max(n_batch, n_seq, seq_ctx)
        self.n_vocab = runner.n_vocab
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * seq_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = min(512, self.n_batch)
        params.n_seq_max = n_seq
        params.n_outputs_max = 0
        params.n_outputs_max_per_seq = 0
        # kv_unified False: a KV stream per sequence; its rows were independent of the rest of the
        # batch on every CPU and quantization measured but one (Qwen2.5's Q4_K_M on an AVX-512 EPYC;
        # see make_engine). True: one pool, where
        # a step that admits prompts is one graph pass instead of llama.cpp's equal per-sequence split,
        # faster but with rows that move with the batch's composition; the measured trade and the
        # choice are at rs_local.eval.engines.make_engine.
        params.kv_unified = kv_unified
        # Batches run on n_threads_batch; llama-cpp-python defaults it to every core, which
        # on a busy machine makes OpenMP threads spin against each other. Use the Runner's count.
        threads = runner.llama.context_params.n_threads
        params.n_threads = threads
        params.n_threads_batch = threads
        with deferred():  # a Ctrl-C while the context is made is raised after it
            self.ctx = llama_cpp.llama_init_from_model(runner.llama.model, params)
        if not self.ctx:
            raise RsLocalError(f"llama.cpp could not create a {n_seq}-sequence context (try a smaller batch)")
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        #: prompt tokens not evaluated because a shared head was restored instead (see :func:`shared_head`)
        self.head_tokens_reused = 0
        self._steering_version = -1  # the Runner's steering_version last pushed here: none yet
        self._follow_runner()

    # -- vectors -------------------------------------------------------------------------

    def set_vectors(self, parts: Sequence[tuple[ControlVector, float]], layer_range: tuple[int, int] | None = None) -> None:
        """Apply ``sum(scale * vector)`` here and on the Runner (which validates it); [] clears."""
        with self.busy():
            self.runner.set_vectors(parts, layer_range)
            self._follow_runner()

    def clear_vectors(self) -> None:
        self.set_vectors([])

    def _follow_runner(self) -> None:
        """Push the Runner's vector here when it changed since the last push.

        Why: the engine answers for the Runner (its answers are compared with the Runner's, and
        errors name the Runner's vectors), but a vector set on the Runner directly, before the engine
        was made or after, was not in this context: answers came out plain under a steered Runner."""
        runner = self.runner
        version, vectors, layer_range = runner.steering_version, runner.vectors, runner.layer_range  # read once
        if self._steering_version == version:
            return
        push_vectors(self._lib, self.ctx, vectors, n_embd=runner.n_embd, n_layer=runner.n_layer,
                     layer_range=layer_range if vectors else None)
        self._steering_version = version

    # -- batch plumbing ------------------------------------------------------------------

    def _reset_batch(self) -> None:
        self._batch.n_tokens = 0

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token to the batch; returns its index (where its logits will be)."""
        b = self._batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0
        b.n_tokens = i + 1
        return i

    def _decode(self) -> None:
        if self._batch.n_tokens == 0:
            return
        self.live()
        rc = self._lib.llama_decode(self.ctx, self._batch)
        release()  # a Ctrl-C the log filter caught during the decode
        if rc != 0:
            raise RsLocalError(f"llama.cpp batch decode failed (code {rc}); try a smaller --batch")

    def _logits(self, i: int) -> np.ndarray:
        from rs_local.runtime.runner import checked_logits

        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        return checked_logits(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy(), self.runner.vectors)

    def _free_seq(self, seq: int) -> None:
        self.live()
        self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def _clear(self) -> None:
        self.live()  # a freed context's memory handle is freed memory: a segfault, not an error
        self._lib.llama_memory_clear(self._mem, True)

    def _head_state(self, head: Sequence[int]) -> bytes | None:
        """Evaluate ``head`` once (sequence 0, current vector) and keep its keys and values as
        llama.cpp's per-sequence state; None when llama.cpp cannot copy it (every prompt is then
        evaluated whole, as before)."""
        self._clear()
        self._prefill([(0, list(head), 0)])
        try:
            return read_seq_state(self._lib, self.ctx, 0)
        except RsLocalError:
            return None
        finally:
            self._free_seq(0)

    def _restore_head(self, state: bytes | None, seq: int) -> bool:
        """Put the shared head into ``seq``'s (empty) slot; False when llama.cpp refuses it."""
        if state is None:
            return False
        if write_seq_state(self._lib, self.ctx, seq, state):
            return True
        self._free_seq(seq)
        return False

    def _start(self, head: int, state: bytes | None, seq: int) -> int:
        """Where ``seq``'s prompt evaluation starts: after the shared head if it was restored, else 0."""
        if head and self._restore_head(state, seq):
            self.head_tokens_reused += head
            return head
        return 0

    def _tokens(self, prompt: Prompt) -> list[int]:
        tokens = self.runner.tokenize(prompt)
        if len(tokens) >= self.seq_ctx:
            raise RsLocalError(f"a prompt is {len(tokens)} tokens; one batch slot holds {self.seq_ctx}")
        return tokens

    def _prefill(self, items: list[tuple[int, list[int], int]]) -> dict[int, np.ndarray]:
        """Evaluate runs of tokens (seq id, tokens, first position), several per decode; logits of each run's last token.

        One call carries both new prompts and the next token of every running sequence, so
        admitting a prompt never costs the running ones a pass of their own. A run longer than
        the free room in the batch is split across decodes; only its last token asks for logits.
        """
        out: dict[int, np.ndarray] = {}
        wanted: list[tuple[int, int]] = []
        self._reset_batch()
        for seq, tokens, start in items:
            for k, tok in enumerate(tokens):
                if self._batch.n_tokens >= self.n_batch:
                    self._decode()
                    for s, idx in wanted:
                        out[s] = self._logits(idx)
                    wanted = []
                    self._reset_batch()
                last = k == len(tokens) - 1
                idx = self._add(tok, start + k, seq, last)
                if last:
                    wanted.append((seq, idx))
        self._decode()
        for s, idx in wanted:
            out[s] = self._logits(idx)
        self._reset_batch()
        return out

    # -- generation ----------------------------------------------------------------------

    def generate_many(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int = 48,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """Answer every prompt (chat message lists or raw strings), ``n_seq`` at a time.

        ``sampling`` may be one setting for all or one per prompt (e.g. per-prompt seeds).
        Returns :class:`Generation` objects in prompt order, like ``Runner.generate``.
        """
        return self._generate(prompts, max_tokens, sampling, progress, None)

    def generate_until(
        self,
        prompts: Sequence[Prompt],
        stop_when: StopWhen,
        *,
        max_tokens: int = 48,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """:meth:`generate_many`, but a sequence also ends as soon as ``stop_when(text)`` is True.

        Answers that are only read up to some point (a keyword verdict, see
        ``rs_local.judge.keywords.settled``) free their slot there, and the next prompt moves in.
        The check runs after each token whose bytes decode completely, so the text of a stopped
        answer (``finish_reason == "settled"``) is exactly the beginning of the full answer's.
        It is a method of its own, not a ``generate_many`` argument, because ``generate_many``
        is the :class:`~rs_local.runtime.engine.Engine` call every engine shares.
        """
        return self._generate(prompts, max_tokens, sampling, progress, stop_when)

    def _generate(self, prompts: Sequence[Prompt], max_tokens: int, sampling, progress: Progress | None,
                  stop_when: StopWhen | None) -> list[Generation]:
        prompts = _prompt_list(prompts)
        max_tokens = _token_count(max_tokens)
        with self.busy():
            self._follow_runner()
            return self._generate_held(prompts, max_tokens, sampling, progress, stop_when)

    def _generate_held(self, prompts: list[Prompt], max_tokens: int, sampling, progress: Progress | None,
                       stop_when: StopWhen | None) -> list[Generation]:
        n = len(prompts)
        params = _per_prompt(sampling, n)
        tokens = [self._tokens(p) for p in prompts]
        results: list[Generation | None] = [None] * n
        queue = list(range(n))
        free = list(range(self.n_seq))
        running: dict[int, _Slot] = {}
        head = shared_head(tokens)
        state = self._head_state(tokens[0][:head]) if head else None
        self._clear()
        while queue or running:
            admitted = []
            while queue and free:
                i = queue.pop(0)
                seq = free.pop(0)
                gen = Generation(prompt_tokens=len(tokens[i]), finish_reason="length")
                budget = min(max_tokens, self.seq_ctx - len(tokens[i]) - 1)
                slot = _Slot(i, seq, len(tokens[i]), gen, Sampler(params[i]),
                             codecs.getincrementaldecoder("utf-8")(errors="replace"), budget, stop_when)
                running[seq] = slot
                admitted.append(slot)
            # one decode: the running sequences' next tokens and the new prompts together
            stepping = [s for s in running.values() if s.pending is not None]
            items = [(s.seq, [int(s.pending)], s.pos) for s in stepping]
            for s in admitted:
                start = self._start(head, state, s.seq)
                items.append((s.seq, tokens[s.index][start:], start))
            for s in stepping:
                s.pos += 1
            logits = self._prefill(items)
            for seq, row in logits.items():
                slot = running[seq]
                if self._advance(slot, row):
                    results[slot.index] = slot.out
                    del running[seq]
                    self._free_seq(seq)
                    free.append(seq)
                    if progress:
                        progress(n - len(queue) - len(running), n)
        return [r if r is not None else Generation() for r in results]

    def _advance(self, slot: _Slot, logits: np.ndarray) -> bool:
        """Sample the next token of one sequence; True when it has finished."""
        out = slot.out
        if len(out.tokens) >= slot.budget:  # a character cut short is left out (see Runner.stream)
            out.finish_reason = "length"
            return True
        token, logprob = slot.sampler.pick(logits)
        if self.runner.is_end_token(token):  # a character's first bytes before it are left out, as in Runner.stream
            out.finish_reason = "stop"
            return True
        out.tokens.append(token)
        out.logprobs.append(logprob)
        out.text += slot.decoder.decode(self.runner.token_bytes(token))
        if len(out.tokens) >= slot.budget:
            out.finish_reason = "length"
            return True
        if slot.stop_when is not None and not slot.decoder.getstate()[0] and slot.stop_when(out.text):
            out.finish_reason = "settled"
            return True
        slot.pending = token
        return False

    # -- teacher forcing -----------------------------------------------------------------

    def forced_logprobs(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[Sequence[int]],
        reduce: Callable[[int, np.ndarray], object] | None = None,
        progress: Progress | None = None,
    ) -> list:
        """Log-prob rows before each continuation token, for many (prompt, continuation) pairs.

        Same rows as ``Runner.forced_logprobs`` (row i: the distribution before token i), but
        each pair is one prefill with several outputs instead of one decode per token. Full
        rows are ``[k, n_vocab]`` float64 (1.2 MB per row for a 150k vocabulary), so pass
        ``reduce(index, rows)`` to keep only what you need (e.g. a KL) per pair.
        """
        prompts = _prompt_list(prompts)
        if len(prompts) != len(continuations):
            raise ValueError("one continuation per prompt is needed")
        continuations = [self.runner.check_tokens(c) if len(c) else [] for c in continuations]
        with self.busy():
            self._follow_runner()
            return self._forced_held(prompts, continuations, reduce, progress)

    def _forced_held(self, prompts: list[Prompt], continuations: list[list[int]],
                     reduce: Callable[[int, np.ndarray], object] | None, progress: Progress | None) -> list:
        results: list = [None] * len(prompts)
        tokens = [self._tokens(p) for p in prompts]
        head = shared_head(tokens)
        state = self._head_state(tokens[0][:head]) if head else None
        self._clear()
        order = list(range(len(prompts)))
        while order:
            group, used = [], 0
            while order and len(group) < self.n_seq:
                i = order[0]
                toks = tokens[i]
                cont = continuations[i]
                need = len(toks) + max(len(cont) - 1, 0)
                if need > self.seq_ctx:
                    raise RsLocalError(f"prompt plus continuation is {need} tokens; one batch slot holds {self.seq_ctx}")
                if group and used + need > self.n_batch:
                    break
                group.append((i, toks, cont))
                used += need
                order.pop(0)
            self._forced_group(group, results, reduce, head, state)
            if progress:
                progress(len(prompts) - len(order), len(prompts))
        return results

    def _forced_group(self, group, results, reduce, head: int = 0, state: bytes | None = None) -> None:
        self._reset_batch()
        rows_at: dict[int, list[int]] = {}
        for seq, (i, toks, cont) in enumerate(group):
            if not cont:
                results[i] = reduce(i, np.zeros((0, self.n_vocab))) if reduce else np.zeros((0, self.n_vocab))
                continue
            seq_tokens = toks + cont[:-1]
            first_out = len(toks) - 1
            start = self._start(head, state, seq)  # < first_out: the head leaves every prompt a token
            idxs = []
            for pos in range(start, len(seq_tokens)):
                tok = seq_tokens[pos]
                want = pos >= first_out
                idx = self._add(tok, pos, seq, want)
                if want:
                    idxs.append(idx)
            rows_at[seq] = idxs
        if self._batch.n_tokens > self.n_batch:  # pragma: no cover - guarded by the grouping
            raise RsLocalError("internal: batch overflow")
        self._decode()
        for seq, (i, _toks, _cont) in enumerate(group):
            if seq not in rows_at:
                continue
            rows = np.stack([log_softmax(self._logits(j)) for j in rows_at[seq]])
            results[i] = reduce(i, rows) if reduce else rows
        self._reset_batch()
        for seq in range(len(group)):
            self._free_seq(seq)


def _per_prompt(sampling, n: int) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    params = list(sampling)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling settings for {n} prompts")
    return params


def _prompt_list(prompts: Sequence[Prompt]) -> list[Prompt]:
    """A list of prompts; a lone string is refused (iterating it answered each of its characters)."""
    if isinstance(prompts, (str, bytes)):
        raise RsLocalError("prompts is a list of prompts; for one prompt pass [prompt]")
    return list(prompts)


def _token_count(max_tokens: object) -> int:
    """``max_tokens`` as a whole number >= 0, or a one-line error ("3" was a TypeError deep inside)."""
    try:
        count = operator.index(max_tokens)  # type: ignore[arg-type]
    except TypeError:
        count = -1
    if count < 0:
        raise RsLocalError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    return count
