"""Block outputs read from llama.cpp itself, at the last token of a text.

Probes (the refusal judge, and per-prompt gating) classify a model's residual stream. Reading
it from llama.cpp rather than Transformers keeps them torch-free and on the quantised weights
the user actually runs. llama.cpp exposes every graph tensor through the context's eval
callback (``cb_eval``): the scheduler first asks whether we want a tensor (``ask``), then
calls again once it is computed. Block N's output is named ``l_out-N``; it holds every
position of the micro-batch as rows of ``n_embd`` floats, so the last row of the last
micro-batch is the last token's. (The final block's output is cut to the rows that produce
logits, which is the last token's row too.)

The reader owns its own context on the Runner's model (callbacks are fixed at context
creation) and keeps the tokens of the previous text in its KV cache, so texts that share a
prefix — a judge instruction, a chat template's system part — only evaluate what differs.

Nothing after the last wanted block is needed (no text is generated from this context), so
once that block's output is read the callback returns false, which tells ggml's scheduler to
skip the rest of the graph: the later blocks and the output head (on Qwen2.5-0.5B, a probe on
block 14 of 24 leaves out ~40% of the blocks and the 136M-parameter vocabulary projection).
Their KV cache is never filled, which is harmless because this context never reads it.

``tail`` > 1 returns the mean of the last ``tail`` tokens' rows instead of the last one: the
policy gate reads the chat template's tokens after the user's message (``<|im_end|>`` ...
``assistant``), which all attend to the whole request; pooled, they classify prompts better
than the last token alone (measured in benchmarks/RESULTS.md, conditional steering).
:meth:`BlockReader.read_span` is the general form, the mean over any span of positions (the
probe judge averages over the answer's tokens); the tail is the span that ends the text.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import Callable, Iterable, Sequence

import numpy as np

from rs_local.errors import PromptTooLong, RsLocalError
from rs_local.runtime.interrupts import deferred, hold
from rs_local.runtime.owned_context import OwnedContext
from rs_local.runtime.runner import PromptCancelled, Runner

#: Asked between batches of a long read: True ends it (a server's client that left).
Cancelled = Callable[[], bool]

_GGML_TYPE_F32 = 0


#: ggml-base's file names: Linux, macOS, MSVC and MinGW builds.
GGML_BASE_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml-base.dll")


def ggml_base_path(dirs: Iterable[str | os.PathLike] | None = None) -> str:
    """The ggml-base library beside the libllama llama-cpp-python loaded.

    Why not always the wheel's ``llama_cpp/lib``: ``LLAMA_CPP_LIB_PATH`` makes llama-cpp-python load
    another build (a CUDA or Metal one), and reading its tensors with the wheel's ggml-base, whose
    structures may differ, gives garbage or a crash. ``dirs`` defaults to that library's directory,
    then the wheel's."""
    if dirs is None:
        import llama_cpp
        import llama_cpp.llama_cpp as low

        dirs = [getattr(low, "_base_path", None), os.path.join(os.path.dirname(llama_cpp.__file__), "lib")]
    searched = [os.fspath(d) for d in dirs if d is not None]
    for libdir in searched:
        for name in GGML_BASE_NAMES:
            if os.path.exists(os.path.join(libdir, name)):
                return os.path.join(libdir, name)
    raise RsLocalError(f"{' or '.join(searched)}: no ggml-base library found (needed to read activations)")


def _ggml_base():
    """ggml's tensor helpers, which the Python bindings do not wrap."""
    lib = ctypes.CDLL(ggml_base_path())
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _weak_callback(reader: "BlockReader") -> Callable[[int, bool, int], bool]:
    """``reader._on_tensor`` without a strong reference to the reader.

    Why: the ctypes callback is kept on the reader, so a bound method made a reference cycle, and a
    reader dropped without ``close()`` kept its llama.cpp context (hundreds of MB at a 2048-token
    context) until the cyclic collector ran: 60 readers grew RSS by 1.2 GB."""
    method = weakref.WeakMethod(reader._on_tensor)

    def call(tensor: int, ask: bool, user: int) -> bool:
        bound = method()
        return bound(tensor, ask, user) if bound is not None else False

    return call


class BlockReader(OwnedContext):
    """Read the last token's output of chosen blocks while llama.cpp evaluates a text.

    ``layers`` are block indices (0-based, as in ``direction.N``). :meth:`read` returns
    ``{layer: float32[n_embd]}``.
    """

    def __init__(self, runner: Runner, layers: Iterable[int], n_ctx: int = 2048, n_batch: int = 512,
                 tail: int = 1):
        import llama_cpp

        self._lib = llama_cpp
        self._ggml = _ggml_base()
        self.runner = runner
        self.layers = sorted(set(int(x) for x in layers))
        bad = [x for x in self.layers if not 0 <= x < runner.n_layer]
        if bad:
            raise RsLocalError(f"blocks {bad} are outside 0-{runner.n_layer - 1} for this model")
        self._names = {f"l_out-{x}".encode(): x for x in self.layers}
        self._last_layer = self.layers[-1] if self.layers else -1
        self.n_embd = runner.n_embd
        self.tail = max(1, int(tail))
        self._span = (0, 0)  # positions [lo, hi) whose rows the current read keeps
        self._chunk_end = 0  # position after the last token of the batch being evaluated
        self._rows: dict[int, list[np.ndarray]] = {}  # layer -> the span's rows, batch by batch
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(_weak_callback(self))  # kept alive here
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        threads = runner.llama.context_params.n_threads
        params.n_threads = threads
        params.n_threads_batch = threads
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        self.n_ctx, self.n_batch = n_ctx, n_batch
        with deferred():  # a Ctrl-C while the context is made is raised after it
            self.ctx = llama_cpp.llama_init_from_model(runner.llama.model, params)
        if not self.ctx:
            raise RsLocalError("llama.cpp could not create a context for reading activations")
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cached: list[int] = []
        self.tokens_evaluated = 0  # tokens llama.cpp has evaluated for reads (cached prefixes not counted)

    def _on_tensor(self, tensor: int, ask: bool, _user: int) -> bool:
        try:
            return self._take(tensor, ask)
        except BaseException as exc:  # Ctrl-C landing here: ctypes would print and drop it
            hold(exc)
            return False  # stop the graph; _decode raises it when llama.cpp returns

    def _take(self, tensor: int, ask: bool) -> bool:
        name = self._ggml.ggml_get_name(tensor)
        layer = self._names.get(name)
        if layer is None:
            return False if ask else True
        if ask:
            return True
        if ctypes.cast(tensor, ctypes.POINTER(ctypes.c_int32))[0] != _GGML_TYPE_F32:
            return True  # not expected for the residual stream; leave the row unset
        # The tensor's rows are the batch's last positions: all of them, except in the final block,
        # which llama.cpp cuts to the rows that make logits (the last token's).
        rows = int(self._ggml.ggml_nelements(tensor)) // self.n_embd
        first = self._chunk_end - rows
        lo, hi = max(self._span[0], first), min(self._span[1], self._chunk_end)
        if hi > lo:
            block = np.empty((hi - lo, self.n_embd), dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(tensor, block.ctypes.data, (lo - first) * self.n_embd * 4, block.nbytes)
            self._rows.setdefault(layer, []).append(block)  # a span split across batches is joined
        return layer != self._last_layer  # false: stop the graph, nothing later is needed

    def read_tokens(self, tokens: Sequence[int], cancelled: Cancelled | None = None) -> dict[int, np.ndarray]:
        """Evaluate ``tokens`` (reusing the cached common prefix) and return the last token's rows
        (the mean of the last ``tail`` tokens' rows)."""
        tokens = list(tokens)
        return self.read_span(tokens, max(0, len(tokens) - self.tail), len(tokens), cancelled)

    def read_span(self, tokens: Sequence[int], lo: int, hi: int, cancelled: Cancelled | None = None) -> dict[int, np.ndarray]:
        """Evaluate ``tokens`` and return each block's output averaged over positions [lo, hi)."""
        rows_of = self.read_rows(tokens, lo, hi, cancelled)
        return {x: rows[0] if len(rows) == 1 else rows.mean(axis=0) for x, rows in rows_of.items()}

    def read_rows(self, tokens: Sequence[int], lo: int, hi: int,
                  cancelled: Cancelled | None = None) -> dict[int, np.ndarray]:
        """Evaluate ``tokens`` and return each block's output at every position in [lo, hi) (``[hi - lo, n_embd]``).

        The cached prefix is reused only up to ``lo``: the span's rows must be computed now. Tokens
        after ``hi`` are not evaluated: attention is causal, so they cannot change the span's rows
        (the probe judge's span ends before its ~17-token verdict request, a fifth of a short answer's cost).
        ``cancelled`` (a server's "has the client left?") is asked before each batch of ``n_batch`` tokens
        and ends the read with :class:`~rs_local.runtime.runner.PromptCancelled`.
        """
        with self.busy():
            return self._read_rows(list(tokens), lo, hi, cancelled)

    def _read_rows(self, tokens: list[int], lo: int, hi: int, cancelled: Cancelled | None) -> dict[int, np.ndarray]:
        if not tokens:
            raise RsLocalError("nothing to read: the text is empty")
        if len(tokens) > self.n_ctx:
            raise PromptTooLong(f"the text is {len(tokens)} tokens, the reader's context holds {self.n_ctx} (use --ctx)")
        if not 0 <= lo < hi <= len(tokens):
            raise RsLocalError(f"internal: span {lo}-{hi} is outside the {len(tokens)} tokens read")
        tokens = tokens[:hi]
        keep = 0
        limit = min(len(self._cached), lo)
        while keep < limit and self._cached[keep] == tokens[keep]:
            keep += 1
        self._lib.llama_memory_seq_rm(self._mem, 0, keep, -1)
        self._cached = tokens[:keep]  # what the context holds if a decode below fails or is interrupted
        self._rows, self._span = {}, (lo, hi)
        for start in range(keep, len(tokens), self.n_batch):
            if cancelled is not None and cancelled():
                raise PromptCancelled("the read was cancelled")
            chunk = tokens[start:start + self.n_batch]
            self._decode(chunk, start, last=start + len(chunk) == len(tokens))
        self.tokens_evaluated += len(tokens) - keep
        self._cached = tokens
        missing = [x for x in self.layers if x not in self._rows]
        if missing:
            raise RsLocalError(f"llama.cpp produced no output for blocks {missing} (no l_out tensor seen)")
        return {x: r[0] if len(r) == 1 else np.concatenate(r) for x, r in self._rows.items()}

    def read(self, prompt, cancelled: Cancelled | None = None) -> dict[int, np.ndarray]:
        """Rows for a chat (list of messages, the model's template applied) or a raw string."""
        return self.read_tokens(self.runner.tokenize(prompt), cancelled)

    def _decode(self, chunk: list[int], start: int, last: bool) -> None:
        b = self._batch
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (last and i == len(chunk) - 1) else 0
        b.n_tokens = len(chunk)
        self._chunk_end = start + len(chunk)
        with deferred():  # Ctrl-C during the decode is raised after it, not inside cb_eval
            rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RsLocalError(f"llama.cpp decode failed (code {rc}) while reading activations")
