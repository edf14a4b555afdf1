"""One llama.cpp context, one worker thread, one queue: how requests with different steering stay apart.

A control vector belongs to a llama.cpp context, not to a sequence, so two requests with
different steering cannot share a decode. Two designs keep them apart: a batched context per
steering group, or one context that switches vector between requests. This module is the
second: a single worker thread owns the :class:`~rs_local.runtime.runner.Runner` and takes jobs
first-in first-out; before a job whose steering differs from the current one it calls
``set_vectors`` (which also drops the KV cache, whose keys and values were computed with the
old vector). Nothing else touches the Runner, so no request can see another's vector or cache.

Why this design first: on a laptop CPU one context already uses every core, a switch costs
microseconds (one buffer copy; the stats below measure it), and the answer of a request does
not depend on what ran before it. By default the worker re-applies the steering before *every*
job and never reuses "whatever is cached": a prompt evaluated partly from a cached prefix is not
bit-identical to one evaluated whole, and greedy decoding turns that into different words now and
then (4 of 24 answers of 24 tokens in a check on SmolLM2). What it does reuse is the chat
template's fixed head (system part and the last turn's opening), split off at a boundary that
depends on the prompt alone and kept per steering (:mod:`rs_local.serve.prefix`): every prompt
is evaluated as the same two batches, so a cached head gives bit-identical answers.
``prefix_cache=True`` also reuses the longest cached prefix between jobs with the same steering
(multi-turn chats gain most), at the cost above. Batching by steering group is the option for
later, for GPUs, where one decode of many sequences is nearly as cheap as one.

A request that names a policy is gated here, on the worker thread: the policy's gate
(:class:`~rs_local.runtime.policy.PolicyRunner`, whose reader has its own llama.cpp context
without a vector) reads the probe block at the prompt's last token, the decision becomes an
ordinary :class:`Steering` (the category's vector, or none), and the job runs as if it had asked
for that. The extra unsteered prompt evaluation is in ``timings.gate_ms`` and ``stats.gate_s``.

The worker talks to the asyncio side only through each job's ``sink`` callback, which the web
layer wires to ``loop.call_soon_threadsafe``; a job's ``cancelled`` event (set when its client
goes away) stops generation at the next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rs_local.errors import PromptTooLong, RsLocalError
from rs_local.runtime.runner import EvalCounters, Generation, Prompt, PromptCancelled, Runner
from rs_local.runtime.sampling import SamplingParams
from rs_local.serve.errors import ApiError, bad_request, client_closed
from rs_local.serve.prefix import HEAD_CACHE_BYTES, PrefixStore, load_prompt, template_boundary
from rs_local.serve.steering import Steering, VectorLibrary

log = logging.getLogger("rs_local.serve")


# ----------------------------------------------------------------------------- events


@dataclass
class Started:
    """The prompt fitted and generation began (the web layer may now send a 200)."""

    prompt_tokens: int
    steering: Steering


@dataclass
class Delta:
    """Text safe to show (never the start of a stop string)."""

    text: str


@dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]


@dataclass
class Failed:
    error: ApiError


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    """One request for the worker; ``sink`` receives its events in order, from the worker thread."""

    prompt: Prompt
    steering: Steering
    sampling: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------- stop strings


class StopFilter:
    """Cuts text at the first stop string while streaming, holding back what could start one.

    Without the hold-back a client would see ``"</"`` of a ``"</end>"`` stop before the server
    knew it was a stop.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return the part that can be sent now."""
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """At the end of generation nothing more can complete a stop string."""
        return "" if self.stopped else self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out


# ----------------------------------------------------------------------------- worker


class Worker:
    """The only thread that touches the Runner; jobs run one at a time, in arrival order."""

    def __init__(self, runner: Runner, library: VectorLibrary, *, prefix_cache: bool = False,
                 max_waiting: int = 64, gates: dict[str, Any] | None = None, head_cache_bytes: int = HEAD_CACHE_BYTES):
        self.runner, self.library = runner, library
        self.gates = dict(gates or {})  # policy name -> PolicyRunner (its own reader context)
        self.prefix_cache = prefix_cache
        self.heads = PrefixStore(head_cache_bytes)  # template heads' KV by steering; 0 bytes: off
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rs-local-serve-worker", daemon=True)
        self._current: tuple | None = None
        self._running: Job | None = None  # the job the worker thread is on (for end_all)
        self._ended: ApiError | None = None  # set by end_all: every job from then on fails with it
        self._stats_lock = threading.Lock()
        self.busy = False
        self.stats: dict[str, Any] = {"requests": 0, "cancelled": 0, "failed": 0, "switches": 0,
                                      "switch_s": 0.0, "busy_s": 0.0, "generated_tokens": 0, "gated": 0,
                                      "gate_s": 0.0, "queue_s": 0.0, "prompt_tokens": 0,
                                      "prompt_tokens_evaluated": 0, "prompt_s": 0.0, "decodes": 0,
                                      "decode_s": 0.0, "head_hits": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running job's current token and end the thread (jobs still queued are dropped)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            for gate in self.gates.values():
                gate.reader.close()

    def end_all(self, error: ApiError) -> None:
        """Answer every job now with ``error``: the queued ones are dropped, the running one stops at
        its next token (a second Ctrl-C: clients get an OpenAI-shaped error, not a cut connection)."""
        self._ended = error  # before reading _running: a job the worker takes meanwhile sees it (see _loop)
        with self._queue.mutex:
            queued = [j for j in self._queue.queue if j is not None]
            self._queue.queue = deque(j for j in self._queue.queue if j is None)
        running = self._running
        for job in ([running] if running is not None else []) + queued:
            job.cancelled.set()
            job.sink(Failed(error))

    @property
    def waiting(self) -> int:
        """Queued jobs whose clients are still there."""
        with self._queue.mutex:
            return sum(1 for j in self._queue.queue if j is not None and not j.cancelled.is_set())

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse at once (503) when the queue is full rather than let latency grow unbounded.

        Jobs whose clients left while they waited are dropped first (told so, as the loop would):
        counted, 64 clients that timed out behind one long answer shut every live client out."""
        with self._queue.mutex:
            left = [j for j in self._queue.queue if j is not None and j.cancelled.is_set()]
            if left:
                self._queue.queue = deque(j for j in self._queue.queue if j is None or not j.cancelled.is_set())
        for gone in left:
            self._client_left(gone)
        if self._queue.qsize() >= self.max_waiting:
            raise ApiError(503, f"the server is busy ({self.max_waiting} requests waiting); retry later",
                           code="overloaded", headers={"Retry-After": "5"})
        self._queue.put(job)

    def _client_left(self, job: Job) -> None:
        """Tell a job whose client has gone that it ended (its request coroutine is still waiting)."""
        self._count_cancelled()
        job.sink(Failed(client_closed()))

    def _count_cancelled(self) -> None:
        with self._stats_lock:  # the only counter both the worker and the event loop (submit) change
            self.stats["cancelled"] += 1

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._running = job
            if self._ended is not None:  # taken just as end_all ran: it may not have seen this job
                self._running = None
                job.cancelled.set()
                job.sink(Failed(self._ended))
                continue
            if job.cancelled.is_set():  # its client left while it waited
                self._running = None
                self._client_left(job)
                continue
            self.busy = True
            started = time.perf_counter()
            try:
                last: Event = self._run(job)
            except ApiError as exc:
                self.stats["failed"] += 1
                last = Failed(exc)
            except PromptCancelled:  # its client left while the prompt was evaluated
                self._count_cancelled()
                last = Failed(client_closed())
            except RsLocalError as exc:  # the request's own doing, e.g. a scale so large the output is NaN
                self.stats["failed"] += 1
                last = Failed(bad_request(self._public(str(exc)), "steering", code="generation_failed"))
            except Exception as exc:  # noqa: BLE001 - one broken request must not stop the server
                log.exception("request failed")
                self.stats["failed"] += 1
                last = Failed(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))
            finally:
                self.stats["busy_s"] += time.perf_counter() - started
                self.busy, self._running = False, None
            job.sink(last)  # after the stats: a client that reads /health on its answer sees this job counted

    def _apply(self, steering: Steering) -> float:
        """Make llama.cpp's control vector match ``steering`` (dropping the KV cache); return the seconds it took.

        Skipped only when the prefix cache is on and the steering is unchanged.
        """
        if steering.key == self._current and self.prefix_cache:
            return 0.0
        t0 = time.perf_counter()
        self._current = None  # if setting fails half-way, nothing is assumed about the context
        if steering.active:
            self.runner.set_vectors(self.library.parts(steering), steering.layers)
        else:
            self.runner.clear_vectors()
        self._current = steering.key
        return time.perf_counter() - t0

    def _public(self, message: str) -> str:
        """An error message for a client: the model's file name, never the server's path to it."""
        return message.replace(str(self.runner.path), self.runner.path.name)

    def _tokens(self, job: Job) -> list[int]:
        """The prompt's tokens, refusing a prompt that leaves no room to answer."""
        param = "messages" if not isinstance(job.prompt, str) else "prompt"
        try:
            tokens = self.runner.tokenize(job.prompt)
        except PromptTooLong:  # too many bytes to tokenize at all: the same answer as too many tokens
            raise bad_request(f"the prompt is longer than this server's context of {self.runner.n_ctx} tokens "
                              "(start it with a larger --ctx)", param, "context_length_exceeded") from None
        except RsLocalError as exc:
            raise bad_request(self._public(str(exc)), param) from None
        except Exception as exc:  # noqa: BLE001 - the model's own Jinja template can raise anything
            raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
        n = len(tokens)
        if n > self.runner.n_ctx - 2:
            raise bad_request(f"the prompt is {n} tokens; this server's context holds {self.runner.n_ctx} "
                              "(start it with a larger --ctx)", param, "context_length_exceeded")
        return tokens

    def _decide(self, job: Job) -> tuple[Steering, float]:
        """A policy's steering for this prompt (its gate reads the prompt in its own context, and stops
        reading when the client leaves); others as they are."""
        steering = job.steering
        if steering.policy is None:
            return steering, 0.0
        decision = self.gates[steering.policy].decide(job.prompt, job.cancelled.is_set)
        self.stats["gated"] += 1
        self.stats["gate_s"] += decision.read_s
        return steering.decided(decision), decision.read_s

    def _run(self, job: Job) -> Finished:
        """Run one job, streaming its Started and Delta events; its Finished event is returned for the loop to send."""
        t0 = time.perf_counter()
        tokens = self._tokens(job)
        steering, gate_s = self._decide(job)
        previous = self._current
        apply_s = self._apply(steering)
        if steering.key != previous:
            self.stats["switches"] += 1
            self.stats["switch_s"] += apply_s
        self.stats["requests"] += 1
        before = self.runner.counters.copy()
        reused_whole = self.prefix_cache and steering.key == previous  # the runner's own longest-prefix reuse
        head_hit = not reused_whole and self._load_head(steering, job.prompt, tokens)
        job.sink(Started(len(tokens), steering))
        result = self._generate(job, tokens)
        spent = self.runner.counters.since(before)
        total = time.perf_counter() - t0
        timings = {"queue_ms": (t0 - job.enqueued) * 1e3, "gate_ms": gate_s * 1e3, "apply_ms": apply_s * 1e3,
                   "prompt_ms": spent.prompt_s * 1e3, "prompt_evaluated": spent.prompt_tokens,
                   "decode_ms": spent.decode_s * 1e3, "total_ms": total * 1e3}
        self._count(t0 - job.enqueued, len(tokens), spent, head_hit, len(result.tokens))
        return Finished(result.finish_reason, len(tokens), len(result.tokens), timings)

    def _load_head(self, steering: Steering, prompt: Prompt, tokens: list[int]) -> bool:
        """Put the template's head in the context (cached or evaluated as its own batch); True on a cache hit."""
        if not self.heads.max_bytes:
            return False
        try:
            boundary = template_boundary(self.runner, prompt, tokens)
        except Exception:  # noqa: BLE001 - a template that chokes on the stand-in text: no split
            boundary = 0
        return bool(boundary) and load_prompt(self.runner, self.heads, steering.key, tokens, boundary)

    def _count(self, queued_s: float, prompt_tokens: int, spent: EvalCounters, head_hit: bool,
               generated: int) -> None:
        """The running totals ``/health`` reports (``benchmarks/serve_load.py`` prints their breakdown)."""
        stats = self.stats
        stats["queue_s"] += queued_s
        stats["prompt_tokens"] += prompt_tokens
        stats["prompt_tokens_evaluated"] += spent.prompt_tokens
        stats["prompt_s"] += spent.prompt_s
        stats["decodes"] += spent.decodes
        stats["decode_s"] += spent.decode_s
        stats["head_hits"] += int(head_hit)
        stats["generated_tokens"] += generated

    def _generate(self, job: Job, tokens: list[int]) -> Generation:
        """Stream tokens to the job's sink until done, a stop string, or the client leaving."""
        result = Generation()
        budget = self.runner.n_ctx - len(tokens) - 1
        max_tokens = budget if job.max_tokens is None else min(job.max_tokens, budget)
        stops = StopFilter(job.stop)
        stream = self.runner.stream(job.prompt, max_tokens=max_tokens, sampling=job.sampling, result=result,
                                    tokens=tokens, cancelled=job.cancelled.is_set)
        try:
            for event in stream:
                text = stops.feed(event.text)
                if text:
                    job.sink(Delta(text))
                if stops.stopped:
                    result.finish_reason = "stop"
                    return result
                if job.cancelled.is_set():
                    self._count_cancelled()
                    return result
        finally:
            stream.close()
        tail = stops.flush()
        if tail:
            job.sink(Delta(tail))
        if result.finish_reason == "interrupted":
            result.finish_reason = "length"
        return result
