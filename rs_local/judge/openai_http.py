"""A judge behind any OpenAI-compatible chat endpoint (llama-server, llama-cpp-python's server, vLLM, Ollama).

Standard library only (urllib), so judging through a server adds no dependency. Servers on a
laptop are flaky (restarted, overloaded, still loading), so each request has a timeout and
is retried with exponential backoff and jitter on connection errors, timeouts, 429 and 5xx.
Errors that retrying cannot fix (wrong URL, wrong key, unknown model) stop the run at once
with :class:`JudgeConfigError`; a row that still fails after its retries raises
:class:`JudgeUnavailable` and is left for the next run.

When the server returns ``logprobs``/``top_logprobs``, the verdict's confidence is read at the
token that follows ``VERDICT:`` in the judge's own output. A server that rejects the
``logprobs`` field gets the request again without it, and is not asked again.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from rs_local.errors import RsLocalError
from rs_local.files import is_json_number
from rs_local.judge.rubric import _THINK, judge_messages, rubric_version
from rs_local.judge.verdict import Verdict, label_probs, make_verdict

#: Statuses worth retrying: the server is busy or broken right now, not the request.
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
#: Statuses that mean the whole configuration is wrong.
FATAL_STATUSES = {401, 403, 404}
MAX_BACKOFF_S = 30.0
TOP_LOGPROBS = 10


class JudgeUnavailable(RsLocalError):
    """One request failed after all retries (server down, timing out, or answering errors)."""


class JudgeConfigError(RsLocalError):
    """The endpoint cannot work at all (bad URL, bad key, unknown model): stop, don't retry."""


class _HttpFailure(Exception):
    def __init__(self, message: str, retry: bool, status: int | None = None, body: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.retry, self.status, self.body, self.retry_after = retry, status, body, retry_after


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value else None
    except ValueError:  # an HTTP date, or junk: our own backoff applies
        return None
    # "nan" or a negative number would reach time.sleep, which raises on both
    return min(seconds, MAX_BACKOFF_S) if seconds is not None and seconds >= 0 else None


#: Parallel requests to a server that is not ``rs-local serve``.
DEFAULT_CONCURRENCY = 4
#: The one try that sizes the default concurrency when the model is named.
QUICK_TIMEOUT_S = 5.0


class OpenAIJudge:
    """Judge answers through ``POST {base_url}/chat/completions``."""

    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        concurrency: int | None = 4,
        logprobs: bool = True,
        max_tokens: int = 32,
        nonce_factory: Callable[[], str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.logprobs = logprobs
        self.max_tokens = max_tokens
        self.nonce_factory = nonce_factory
        self._sleep = sleep
        self._lock = threading.Lock()
        listed = None
        if model is None:
            listed = self._listed_models()
        elif concurrency is None:  # only to size the default: a server that is down is found out later
            listed = self._listed_models(quick=True)
        self.model = model or self._only_model(listed or [])
        self.concurrency = max(1, concurrency if concurrency is not None else self._default_concurrency(listed))

    # -- configuration -------------------------------------------------------------------

    def describe(self) -> dict:
        """The settings that decide verdicts (the URL is left out: a server moved to another port is the same judge)."""
        return {"backend": self.backend, "model": self.model, "rubric": rubric_version(), "logprobs": self.logprobs}

    def _listed_models(self, quick: bool = False) -> list[dict] | None:
        """The server's ``/models`` entries; None when it did not answer with a list. ``quick``: one try
        of at most 5 s, a failure being None (the retries held a silent server's start for minutes)."""
        if quick:
            try:
                data = self._once("GET", "/models", None, timeout=min(self.timeout, QUICK_TIMEOUT_S))
            except _HttpFailure:
                return None
        else:
            data = self._request("GET", "/models", None)
        listed = data.get("data") if isinstance(data, dict) else None  # a reply of another shape lists no model
        return [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else None

    @staticmethod
    def _default_concurrency(listed: list[dict] | None) -> int:
        """4 parallel requests, but 1 against ``rs-local serve``: it answers one request at a time, so
        the others waited in its queue and their 60 s timeouts ran out there (4 of 12 verdicts in 200 s
        with 4 against 10 of 12 in 150 s with 1, each timed-out request retried from the start)."""
        if listed and any(m.get("owned_by") == "rs-local" for m in listed):
            return 1
        return DEFAULT_CONCURRENCY

    def _only_model(self, entries: list[dict]) -> str:
        """The model the server serves, when it serves exactly one (so --judge-model can be left out)."""
        ids = [m["id"] for m in entries if isinstance(m.get("id"), str) and m["id"]]
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise JudgeConfigError(f"{self.base_url}: the server lists no model; name one with --judge-model")
        raise JudgeConfigError(f"{self.base_url}: the server has {len(ids)} models ({', '.join(ids[:5])}); pick one with --judge-model")

    # -- judging -------------------------------------------------------------------------

    def request_body(self, prompt: str, answer: str) -> dict:
        messages, _ = judge_messages(prompt, answer, self.nonce_factory() if self.nonce_factory else None)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                "max_tokens": self.max_tokens, "stream": False}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def judge(self, prompt: str, answer: str) -> Verdict:
        body = self.request_body(prompt, answer)
        data = self._request("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):  # e.g. a list of content parts: not a chat completion we can read
                raise TypeError(type(content).__name__)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeUnavailable(f"{self.base_url}: unexpected reply shape: {json.dumps(data)[:200]}") from None
        probs = verdict_probs(choice.get("logprobs")) if self.logprobs else None
        return make_verdict(content, probs)

    def close(self) -> None:
        """urllib keeps no pool; nothing to free."""

    # -- transport -----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        """One call with retries; switches logprobs off once if the server rejects them."""
        last: _HttpFailure | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, path, body)
            except _HttpFailure as exc:
                last = exc
                if exc.status == 400 and body is not None and "logprobs" in body:
                    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
                    with self._lock:
                        self.logprobs = False
                    continue
                if exc.status in FATAL_STATUSES:
                    raise JudgeConfigError(f"{self.base_url}{path}: HTTP {exc.status} {exc.body[:200]}".strip()) from None
                if not exc.retry or attempt == self.retries:
                    break
                delay = exc.retry_after or min(self.backoff * 2**attempt, MAX_BACKOFF_S)
                self._sleep(delay * (1 + 0.25 * random.random()))
        raise JudgeUnavailable(f"{self.base_url}{path}: {last} (after {self.retries + 1} tries)")

    def _once(self, method: str, path: str, body: dict | None, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", errors="replace") if exc.fp else ""
            raise _HttpFailure(f"HTTP {exc.code}", exc.code in RETRY_STATUSES, exc.code, text, _retry_after(exc.headers)) from None
        except urllib.error.URLError as exc:
            raise _HttpFailure(f"cannot reach the server ({exc.reason})", True) from None
        except (socket.timeout, TimeoutError):
            raise _HttpFailure(f"no reply within {timeout:g}s", True) from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise _HttpFailure(f"connection failed ({exc.__class__.__name__}: {exc})", True) from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _HttpFailure(f"reply is not JSON: {raw[:120]!r}", True) from None


def _logprob(value: Any) -> float | None:
    """A log-probability as a server should send it: a finite real number, clipped at 0 (rounding can put
    a certain token a hair above). Anything else (a string, null, NaN, 1e999, a list) is no probability,
    so a server that sends it is judged by its verdict text instead of by a traceback or by exp() overflowing."""
    if not is_json_number(value) or not math.isfinite(value):
        return None
    return min(float(value), 0.0)


def verdict_probs(logprobs: Any) -> tuple[float, float] | None:
    """Label probabilities at the first word token after ``VERDICT:`` in an OpenAI ``logprobs`` object.

    Returns None when the reply has no token log-probabilities or no verdict key. Tokens with
    no letters (spaces, ``**`` of markdown bold) between the key and the word are skipped.
    """
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    text = ""
    after_key = False
    for entry in logprobs["content"]:
        if not isinstance(entry, dict):
            return None
        token = str(entry.get("token", ""))
        if after_key:
            if not any(ch.isalnum() for ch in token):
                continue
            tops = entry.get("top_logprobs") or [{"token": token, "logprob": entry.get("logprob")}]
            if not isinstance(tops, list):
                return None
            pairs = [(str(t.get("token", "")), _logprob(t.get("logprob"))) for t in tops if isinstance(t, dict)]
            pairs = [(text_, lp) for text_, lp in pairs if lp is not None]
            return label_probs(pairs) if pairs else None
        text += token
        visible = _THINK.sub("", text).upper()
        if "VERDICT" in visible:
            tail = visible[visible.index("VERDICT") + len("VERDICT"):]
            if any(ch.isalnum() for ch in tail):
                return None  # the verdict word shares a token with the key: no clean position
            after_key = True
    return None
