"""The llama.cpp runner: load a GGUF model, apply control vectors, generate and chat.

Vectors go in through llama.cpp's C API (``llama_set_adapter_cvec``), the same path
``llama-cli --control-vector`` uses, so what you hear in ``rs-local chat`` is what any llama.cpp
app will produce with the exported file. The KV cache is reused between calls (a chat turn
only evaluates the new tokens) but dropped whenever the vector changes, because cached keys
and values were computed with the old vector.
"""

from __future__ import annotations

import codecs
import ctypes
import operator
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from rs_local.converters.moe_arch import check_vector_arch, expert_count
from rs_local.errors import ModelError, PromptTooLong, RsLocalError
from rs_local.runtime.interrupts import release
from rs_local.runtime.kv_state import read_seq_state, write_seq_state
from rs_local.runtime.loading import context_size, load_llama
from rs_local.runtime.steer import push_vectors
from rs_local.runtime.vector_specs import vector_pairs
from rs_local.runtime.sampling import Sampler, SamplingParams, log_softmax
from rs_local.vectors.control_vector import ControlVector
from rs_local.vectors.layers import check_steerable

Message = dict[str, str]
Prompt = str | Sequence[Message]


class PromptCancelled(RsLocalError):
    """A prompt's evaluation stopped because its caller said so (a server's client left)."""


def longest_prompt(runner: "Runner", prompts: Sequence[Prompt], limit: int, room: str, where: str = "") -> int:
    """Tokens of the longest of ``prompts`` (text or chat messages) as ``runner`` reads them.

    Why: a prompt past what its context holds used to stop a run where it came, naming neither the
    prompt nor its file. The first over ``limit`` is a :class:`PromptTooLong` giving its position and
    opening, ``room`` (what holds ``limit``), after ``where`` (its file or set) when given."""
    from rs_local.prompts import prompt_opening

    longest = 0
    def named(i: int, prompt: Prompt) -> str:  # called once tokenize has accepted the prompt's shape
        text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        return f"{where + ': ' if where else ''}{prompt_opening(i, text)}"

    for i, prompt in enumerate(prompts):
        try:
            n = len(runner.tokenize(prompt))
        except PromptTooLong as exc:  # too many bytes to tokenize at all (Runner.max_text_bytes)
            raise PromptTooLong(f"{named(i, prompt)}: {exc}") from None
        if n > limit:
            raise PromptTooLong(f"{named(i, prompt)} is {n:,} tokens with the chat template; {room}")
        longest = max(longest, n)
    return longest


@dataclass
class TokenEvent:
    """One generated token as it streams out."""

    token: int
    text: str
    logprob: float


@dataclass
class EvalCounters:
    """What the Runner has evaluated so far: prompt tokens (computed or taken from the KV cache) and decodes.

    Cumulative, so a caller (the server's per-request timings, a benchmark) takes the difference
    around the work it wants to measure; ``prompt_s`` and ``decode_s`` are llama.cpp's time for them.
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_s: float = 0.0
    decodes: int = 0
    decode_s: float = 0.0

    def since(self, before: "EvalCounters") -> "EvalCounters":
        return EvalCounters(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))

    def copy(self) -> "EvalCounters":
        return EvalCounters(**vars(self))


@dataclass
class Generation:
    """A finished (or interrupted) answer with what the judge and evals need."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-probability (0.0 for an empty answer)."""
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def checked_logits(row: np.ndarray, vectors: Sequence[tuple[ControlVector, float]] = ()) -> np.ndarray:
    """``row``, or a one-line error where llama.cpp's logits are not numbers or all equal.

    Why: a steering whose values are far too large (a vector saved with a wrong unit, a typo in a
    scale) overflows the block norms; llama.cpp then gives NaN or flat logits, and the answer came
    back empty with exit 0 and no word why. No working model gives every token the same logit.
    An overflow spoils every logit at once, so ~256 of them, evenly spaced, are checked (~2 us a
    token instead of ~40 for all of Qwen's 151,936, which a batched step would pay 32 times)."""
    sample = row[:: max(1, len(row) // 256)]
    if np.isnan(sample).any() or sample.max() == sample.min():
        steering = ", ".join(f"{Path(v.source).name if v.source else 'a vector'} at {s:g}" for v, s in vectors)
        raise RsLocalError("the model's output is degenerate (NaN or all logits equal)" + (
            f" under the steering {steering}: its values are too large for the model" if steering else ""))
    return row


class Runner:
    """A loaded GGUF model with an optional steering vector.

    ``n_gpu_layers`` is passed straight to llama.cpp: -1 offloads everything on a Metal or
    CUDA build and is ignored on a CPU build. ``repack`` None lets the host decide (off on
    AMX CPUs, where llama.cpp's repacked weights crash); ``repack_decision`` says what was
    chosen and why.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        repack: bool | None = None,
        verbose: bool = False,
    ):
        self.path = Path(model_path)
        self.llama, self.repack_decision = load_llama(
            self.path, n_ctx=context_size(self.path, n_ctx), n_batch=n_batch, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
            repack=repack, verbose=verbose,
        )
        import llama_cpp  # after load_llama, which sets up OpenMP before llama.cpp's first import

        self._lib = llama_cpp
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.llama.model))
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.llama.model))
        self.n_vocab = int(self.llama.n_vocab())
        try:
            check_steerable(self.path, self.n_layer)
        except ModelError:
            self.llama.close()
            raise
        # llama.cpp rounds the context up (to 256), but llama-cpp-python's token buffer keeps the size
        # asked for: the smaller one is what a prompt and its answer may fill (--ctx 128 overflowed it)
        self.n_ctx = min(int(self.llama.n_ctx()), len(self.llama.input_ids))
        self.model_hint = str(self.llama.metadata.get("general.architecture", ""))
        self.n_expert = expert_count(self.llama.metadata)  # 0: dense
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self._formatter = self._make_formatter()
        self._kv_valid = False
        self.vectors: list[tuple[ControlVector, float]] = []
        self.layer_range: tuple[int, int] | None = None
        self.counters = EvalCounters()
        self._guard = threading.RLock()  # protects the two fields below (re-entrant: a GC finalizer may run inside)
        self._owner: int | None = None  # the thread in a llama.cpp call on this context now, None when idle
        self._depth = 0
        self._epoch = 0  # bumped whenever the KV cache is re-based (a prompt, a prefix, a snapshot, a vector)
        self._longest_token: int | None = None  # bytes of the vocabulary's longest token: max_text_bytes
        self._lent = 0  # contexts of this model (readers, batch engines) in a llama.cpp call now: see _lend
        #: bumped by every set_vectors / clear_vectors: a batch engine compares it to follow the Runner's vector
        self.steering_version = 0
        self.closed = False

    def mismatches(self, arch: str, n_embd: int, n_layer: int) -> list[str]:
        """How a file made for (arch, n_embd, n_layer) differs from this model; [] when it fits.

        Probes and policies read this model's activations: made for another model, they mean nothing.
        """
        mine = str(self.llama.metadata.get("general.architecture", ""))
        return [f"{what} {theirs} vs model's {ours}" for what, theirs, ours in (
            ("architecture", arch, mine), ("n_embd", n_embd, self.n_embd), ("blocks", n_layer, self.n_layer))
            if theirs != ours]

    # -- lifetime and threads ------------------------------------------------------------

    def close(self) -> None:
        """Free the model and its context now (not at garbage collection); later use is an error."""
        with self._guard:
            if self._owner not in (None, threading.get_ident()):
                raise RsLocalError("this Runner is in use by another thread; close it there")
            if self._depth:  # from a callback of its own call (a stream's ``cancelled``): freed mid-decode
                raise RsLocalError("this Runner is in a call; close it when the call has returned")
            if self._lent:
                raise RsLocalError("this Runner's model is in use by a reader or batch engine; let it finish first")
            was_open, self.closed = not self.closed, True
        if was_open:  # outside the lock: freeing runs Python (and maybe a GC finalizer that takes it)
            self.llama.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _use(self) -> Iterator[None]:
        """Hold the context for this thread while llama.cpp works on it.

        Why: one llama.cpp context serves one call at a time; two threads decoding on it abort the
        process inside ggml (GGML_ASSERT), and a closed one is freed memory (a segfault). So a
        second thread gets a one-line error instead, and so does any use after :meth:`close`. It is
        held for each llama.cpp call only: a ``stream`` may be advanced from any thread (a thread
        pool's), one at a time, and checks :attr:`_epoch` instead, so a call that re-based the KV
        cache between two of its tokens is an error rather than a wrong answer.
        """
        me = threading.get_ident()
        with self._guard:
            if self.closed:
                raise RsLocalError(f"{self.path.name}: this Runner is closed")
            if self._owner not in (None, me):
                raise RsLocalError("this Runner is in use by another thread: a llama.cpp context serves one "
                                   "call at a time (make a Runner per thread, or take turns with a lock)")
            self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._guard:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    @contextmanager
    def _lend(self) -> Iterator[None]:
        """The model is in use by another context on it (a BlockReader, a BatchEngine) for one call.

        Why: those contexts run on this Runner's model, so a :meth:`close` from another thread in
        the middle of their decode freed the weights under it (a segfault); it is refused instead."""
        with self._guard:
            if self.closed:
                raise RsLocalError(f"{self.path.name}: this Runner is closed")
            self._lent += 1
        try:
            yield
        finally:
            with self._guard:
                self._lent -= 1

    # -- vectors -------------------------------------------------------------------------

    def set_vectors(
        self,
        parts: Sequence[tuple[ControlVector, float]],
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        """Apply ``sum(scale * vector)`` to blocks in ``layer_range`` (inclusive); [] clears.

        Every vector is checked against the model first, so a wrong width or layer count is a
        clear error here instead of an abort inside llama.cpp.
        """
        parts = vector_pairs(parts)
        if not parts:
            self.clear_vectors()
            return
        for vec, _scale in parts:
            self.check_vector(vec)
        lo, hi = self._check_range(layer_range)
        if layer_range is not None and not any(lo <= layer <= hi for vec, _s in parts for layer in vec.directions):
            raise RsLocalError(f"layer range {lo}-{hi} misses every direction of the vectors: nothing would be steered")
        with self._use():
            push_vectors(self._lib, self.llama.ctx, parts, n_embd=self.n_embd, n_layer=self.n_layer, layer_range=(lo, hi))
        self.vectors, self.layer_range = parts, layer_range
        self.steering_version += 1
        self._kv_valid = False
        self._epoch += 1

    def check_vector(self, vec: ControlVector, path: str | Path | None = None) -> None:
        """Refuse a vector that does not fit this model: width, block count, or the dense / MoE divide.

        The one check for every place a vector meets a model (applying it here, ``policy fit
        --vector``), so each gives the same one-line error naming the file.
        """
        from rs_local.converters.gguf_io import validate_for_model

        where = path or vec.source or "<vector>"
        validate_for_model(vec, n_embd=self.n_embd, n_layer=self.n_layer, path=where)
        check_vector_arch(vec.model_hint, self.model_hint, self.n_expert, where)

    def clear_vectors(self) -> None:
        """Remove any vector; the next reply is the plain model's."""
        with self._use():
            push_vectors(self._lib, self.llama.ctx, [], n_embd=self.n_embd, n_layer=self.n_layer)
        self.vectors, self.layer_range = [], None
        self.steering_version += 1
        self._kv_valid = False
        self._epoch += 1

    def _check_range(self, layer_range: tuple[int, int] | None) -> tuple[int, int]:
        if layer_range is None:
            return 1, self.n_layer - 1
        try:
            lo, hi = (int(x) for x in layer_range)
            if (lo, hi) != tuple(layer_range):
                raise ValueError
        except (TypeError, ValueError):
            raise RsLocalError(f"layer range must be two whole numbers (first, last), got {layer_range!r}") from None
        if not (1 <= lo <= hi <= self.n_layer - 1):
            raise RsLocalError(f"layer range {lo}-{hi} is outside 1-{self.n_layer - 1} for this model")
        return lo, hi

    # -- prompts -------------------------------------------------------------------------

    def _make_formatter(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self.llama._model
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    def format_chat(self, messages: Sequence[Message]) -> str:
        """The model's own chat template applied, with the generation prompt appended."""
        from rs_local.templating import apply_template

        if self._formatter is None:
            raise ModelError(f"{self.path}: the model has no chat template (`generate --raw` sends a plain prompt)")
        return apply_template(lambda m: self._formatter(messages=m).prompt, messages, self.path)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Tokens for a chat (list of messages) or a raw prompt string."""
        if not isinstance(prompt, str) and not (
                isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)):
            raise RsLocalError(f"a prompt is a string or a list of chat messages (dicts), not {type(prompt).__name__}")
        text = prompt if isinstance(prompt, str) else self.format_chat(prompt)
        add_bos = isinstance(prompt, str)
        data = text.encode("utf-8")
        if len(data) > self.unscanned_text_bytes() and len(data) > self.max_text_bytes():
            raise PromptTooLong(f"the prompt is {len(data):,} bytes: over {self.n_ctx} tokens (this model's are at most "
                               f"{self._longest_token} bytes), and the context holds {self.n_ctx} (use --ctx)")
        with self._use():
            tokens = self.llama.tokenize(data, add_bos=add_bos, special=True)
        if not tokens:
            raise RsLocalError("the prompt is empty")
        return tokens

    def unscanned_text_bytes(self) -> int:
        """Bytes of text that need no vocabulary scan to be let through to the tokenizer (16 per token of
        context: far below any real vocabulary's longest token times ``n_ctx``, and cheap to tokenize)."""
        return 16 * self.n_ctx

    def max_text_bytes(self) -> int:
        """The most bytes a text that fits the context can have: ``n_ctx`` times the longest token.

        Why: llama.cpp's tokenizer allocates for the whole text before anything counts tokens; a 20 MB
        prompt under a memory limit ended in ``std::bad_alloc`` and an abort. The vocabulary scan takes
        about 0.4 s for 150k tokens, once per Runner, and only texts longer than
        :meth:`unscanned_text_bytes` ask for it (see :meth:`tokenize`)."""
        if self._longest_token is None:
            buf = ctypes.create_string_buffer(256)
            with self._use():
                longest = max(abs(self._lib.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, True))
                              for t in range(self.n_vocab))
            self._longest_token = max(longest, 1)
        return self.n_ctx * self._longest_token

    # -- evaluation ----------------------------------------------------------------------

    def _logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llama.ctx, -1)
        return checked_logits(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy(), self.vectors)

    def _eval_prompt(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Evaluate ``tokens``, reusing the cached prefix when the vector is unchanged (``cancelled``:
        see :meth:`_timed_prompt_eval`)."""
        if len(tokens) >= self.n_ctx:
            raise PromptTooLong(f"the prompt is {len(tokens)} tokens, the context holds {self.n_ctx} (use --ctx)")
        with self._use():  # to the logits: a close() or another thread's prompt in between read freed or foreign rows
            keep = 0
            if self._kv_valid:
                cached = self.llama.input_ids[: self.llama.n_tokens]
                limit = min(len(cached), len(tokens) - 1)
                while keep < limit and cached[keep] == tokens[keep]:
                    keep += 1
            self.llama.n_tokens = keep
            self._epoch += 1
            try:
                self._timed_prompt_eval(tokens[keep:], cancelled)
            except PromptCancelled:
                self._kv_valid = True  # the slices evaluated extend the kept prefix: valid for the next prompt
                raise
            except BaseException:
                self._kv_valid = False  # a failed decode leaves the cache's contents unknown
                raise
            self.counters.reused_tokens += keep
            self._kv_valid = True
            return self._logits()

    def check_tokens(self, tokens: Sequence[int]) -> list[int]:
        """``tokens`` as ints, or a one-line error for an empty list or an id outside the vocabulary
        (llama.cpp aborts the process on one, or fails its decode)."""
        ids = [self._vocab_id(t) for t in tokens]  # operator.index: 5.7 or "5" is not a token id
        if not ids:
            raise RsLocalError("no tokens to evaluate")
        return ids

    def _timed_prompt_eval(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        """Evaluate ``tokens`` after the cached ones. With ``cancelled``, in slices of the batch size
        (llama.cpp's own slicing, so the same numbers), asking before each whether to go on: a server's
        client that left during an 8000-token prompt held the worker for a minute more. Raises
        :class:`PromptCancelled`; the tokens evaluated so far stay valid for prefix reuse."""
        t0 = time.perf_counter()
        step = max(1, len(tokens)) if cancelled is None else max(1, self.llama.n_batch)
        epoch = self._epoch
        try:
            with self._use():  # held across the slices: no other thread's prompt between two of them
                for start in range(0, len(tokens), step):
                    if cancelled is not None and cancelled():
                        raise PromptCancelled("the prompt's evaluation was cancelled")
                    if self._epoch != epoch:  # ``cancelled`` itself used this Runner (same thread: _use lets it in)
                        raise RsLocalError("the Runner was used for another prompt in the middle of this one")
                    self.llama.eval(tokens[start:start + step])
                    self.counters.prompt_tokens += len(tokens[start:start + step])
        finally:
            self.counters.prompt_s += time.perf_counter() - t0
            release()  # a Ctrl-C the log filter caught during the decode

    def _eval_token(self, token: int) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            with self._use():
                self.llama.eval([token])
                self.counters.decode_s += time.perf_counter() - t0
                self.counters.decodes += 1
                return self._logits()
        finally:
            release()

    # -- prompt prefixes kept outside the context ---------------------------------------------

    def prefill(self, tokens: Sequence[int]) -> None:
        """Drop the KV cache and evaluate ``tokens`` as one batch from position 0.

        The first half of a prompt evaluated in two fixed batches (see :mod:`rs_local.serve.prefix`):
        a later :meth:`stream` of the whole prompt reuses these positions and evaluates the rest.
        """
        tokens = self.check_tokens(tokens)
        if not 0 < len(tokens) < self.n_ctx:
            raise RsLocalError(f"a prefix of {len(tokens)} tokens does not fit the context ({self.n_ctx})")
        self.llama.n_tokens = 0
        self._epoch += 1
        self._timed_prompt_eval(tokens)
        self._kv_valid = True

    def kv_snapshot(self, max_bytes: int | None = None) -> bytes | None:
        """The KV cache of the evaluated tokens (llama.cpp's per-sequence state), to restore later.

        Keys and values depend on the vector that was active when they were computed: whoever
        keeps a snapshot must key it by that vector. None when it would exceed ``max_bytes``.
        """
        with self._use():
            return read_seq_state(self._lib, self.llama.ctx, 0, max_bytes)

    def kv_restore(self, tokens: Sequence[int], data: bytes) -> None:
        """Put back a :meth:`kv_snapshot` taken after evaluating exactly ``tokens`` (under the current vector)."""
        tokens = self.check_tokens(tokens)
        if len(tokens) >= self.n_ctx:
            raise RsLocalError(f"a snapshot of {len(tokens)} tokens does not fit the context ({self.n_ctx})")
        self._epoch += 1
        with self._use():
            if not write_seq_state(self._lib, self.llama.ctx, 0, data):
                self._kv_valid = False
                self.llama.n_tokens = 0
                raise RsLocalError("llama.cpp refused a KV cache snapshot")
            self.llama.input_ids[: len(tokens)] = tokens
            self.llama.n_tokens = len(tokens)
            self.counters.reused_tokens += len(tokens)
            self._kv_valid = True

    def next_token_logprobs(self, prompt: Prompt) -> np.ndarray:
        """Log-probabilities of the token that would follow ``prompt`` (float64, [n_vocab])."""
        return log_softmax(self._eval_prompt(self.tokenize(prompt)))

    def forced_logprobs(self, prompt: Prompt, continuation: Sequence[int]) -> np.ndarray:
        """Next-token log-prob rows at each position of a given continuation ([k, n_vocab]).

        Row i is the distribution the model gives before continuation token i; used to compare a
        steered model with the plain one on the same answer (KL).
        """
        continuation = list(continuation)
        continuation = self.check_tokens(continuation) if continuation else []
        rows = [log_softmax(self._eval_prompt(self.tokenize(prompt)))]
        for token in continuation[:-1]:
            rows.append(log_softmax(self._eval_token(token)))
        return np.stack(rows)

    # -- generation ----------------------------------------------------------------------

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes (the binding's own helper returns a NUL-padded buffer)."""
        token = self._vocab_id(token)
        buf = ctypes.create_string_buffer(64)
        with self._use():  # the vocabulary is the model's: a close() from another thread frees it
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def is_end_token(self, token: int) -> bool:
        """End of generation (EOS, EOT and the like, as the vocabulary marks them)."""
        token = self._vocab_id(token)
        with self._use():
            return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def _vocab_id(self, token: int) -> int:
        """``token`` as an id of this vocabulary, or a one-line error: llama.cpp throws std::out_of_range
        (aborting the process) on one outside it, and ctypes wraps a huge one around to a valid id."""
        if self.closed:
            raise RsLocalError(f"{self.path.name}: this Runner is closed")
        try:
            token = operator.index(token)
        except TypeError:
            raise RsLocalError(f"a token id is a whole number, not {type(token).__name__}") from None
        if not 0 <= token < self.n_vocab:
            raise RsLocalError(f"token id {token} is outside this model's vocabulary (0-{self.n_vocab - 1})")
        return token

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        result: Generation | None = None,
        tokens: Sequence[int] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they are generated; fills ``result`` (if given) as it goes.

        Stopping the iteration early (Ctrl-C in the chat) leaves ``result`` holding what was
        produced so far with ``finish_reason == "interrupted"``. ``tokens``: the prompt already
        tokenised by the caller (the server counts them first), saving a second template render.
        The last token of the budget is not evaluated: nothing would read its logits. ``cancelled``
        (the server's "has the client left?") is asked between slices of a long prompt.
        """
        yield from self._stream(prompt, max_tokens, sampling, stop, result, tokens, cancelled)

    def _stream(self, prompt: Prompt, max_tokens: int, sampling: SamplingParams | None, stop: Sequence[str],
                result: Generation | None, tokens: Sequence[int] | None,
                cancelled: Callable[[], bool] | None = None) -> Iterator[TokenEvent]:
        try:
            max_tokens = operator.index(max_tokens)
        except TypeError:
            raise RsLocalError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}") from None
        if max_tokens < 0:
            raise RsLocalError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise RsLocalError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        out = result if result is not None else Generation()
        tokens = self.check_tokens(tokens) if tokens is not None else self.tokenize(prompt)
        out.prompt_tokens = len(tokens)
        budget = min(max_tokens, self.n_ctx - len(tokens) - 1)
        sampler = Sampler(sampling or SamplingParams())
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        logits = self._eval_prompt(tokens, cancelled)
        epoch = self._epoch
        out.finish_reason = "interrupted"
        for i in range(max(budget, 0)):
            token, logprob = sampler.pick(logits)
            if self.is_end_token(token):
                out.finish_reason = "stop"
                return
            piece = decoder.decode(self.token_bytes(token))
            out.tokens.append(token)
            out.logprobs.append(logprob)
            out.text += piece
            if stop and any(s in out.text for s in stop):
                out.text = _cut_at_stop(out.text, stop)
                out.finish_reason = "stop"
                return
            yield TokenEvent(token, piece, logprob)
            if i + 1 < budget:
                if self._epoch != epoch:  # another call re-based the KV cache between two tokens
                    raise RsLocalError("the Runner was used for another prompt in the middle of this answer")
                logits = self._eval_token(token)
        out.finish_reason = "length"
        # the decoder is never flushed: a character's first bytes at the end (a token budget or a stop string
        # cut there, or an end token after them) are not a character, and "😀\ufffd" was stored

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Run to completion and return the answer with its per-token log-probs."""
        out = Generation()
        for _ in self.stream(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, result=out):
            pass
        return out

    def chat(self, messages: Sequence[Message], **kwargs) -> Generation:
        """Answer the last user message of a conversation (the model's chat template applies)."""
        if isinstance(messages, (str, bytes)):
            raise RsLocalError("chat takes a list of messages ({'role': ..., 'content': ...}); "
                               "generate takes a plain prompt")
        return self.generate(list(messages), **kwargs)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]
