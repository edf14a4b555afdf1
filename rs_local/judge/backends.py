"""Pick a judge backend from what the user named: a local GGUF, an HTTP endpoint, or keywords.

All three share one interface (``judge(prompt, answer) -> Verdict``, ``describe()``,
``concurrency``, ``close()``), so the judging loop, resume logic and judge-eval never care
which one they drive. Changing the judge model is one flag: any built-in model name or GGUF
path works as a local judge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol

from rs_local.errors import ModelError, RsLocalError
from rs_local.judge.verdict import Verdict

KEYWORDS = "keywords"
#: ``--judge probe`` (the shipped probe on the default model) or ``--judge probe=FILE.gguf``.
PROBE = "probe"
#: The probe judge rs-local ships, trained on benchmarks/data/judge_labelled.jsonl (train split).
SHIPPED_PROBE = Path(__file__).resolve().parent.parent / "data" / "judge-probe-qwen2.5-coder-0.5b.gguf"
API_KEY_ENV = ("RS_LOCAL_JUDGE_API_KEY", "OPENAI_API_KEY")


class Judge(Protocol):
    backend: str
    concurrency: int

    def judge(self, prompt: str, answer: str) -> Verdict: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def make_judge(
    judge: str | None = None,
    *,
    url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 0.5,
    concurrency: int | None = None,
    logprobs: bool = True,
    max_tokens: int | None = None,
    n_ctx: int | None = None,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    on_status: Callable[[str], None] | None = None,
    share: Any = None,
) -> Judge:
    """Build the judge: ``url`` -> OpenAI-compatible HTTP; ``'keywords'`` -> baseline; ``None`` or
    ``'probe[=FILE]'`` -> the probe judge (the default: 81.7% agreement with our 219 held-out labels
    against 63.9% for keywords and ~59% for the 0.5B model writing a verdict); else a local GGUF
    as a generative judge. ``share``: the command's own Runner; a probe judge for the same model file
    reads through it instead of loading the model a second time (a generative judge never shares: it
    would generate under the command's vectors)."""
    if url and judge:
        raise RsLocalError("give either --judge (a local model or 'keywords') or --judge-url, not both")
    if url:
        from rs_local.judge.openai_http import OpenAIJudge

        key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        return OpenAIJudge(url, model, api_key=key, timeout=timeout, retries=retries, backoff=backoff,
                           concurrency=concurrency, logprobs=logprobs, max_tokens=max_tokens or 32)
    if model:
        raise RsLocalError("--judge-model names the model on a --judge-url server; for a local judge use --judge")
    if judge == KEYWORDS:
        from rs_local.judge.keywords import KeywordJudge

        return KeywordJudge()
    if judge is None or judge == PROBE or judge.startswith(PROBE + "="):
        return load_probe_judge((judge or "").partition("=")[2] or None, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                n_threads=n_threads, on_status=on_status, share=share)
    return load_local_judge(judge, logprobs=logprobs, max_tokens=max_tokens or 12,
                            n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads, on_status=on_status)


def load_local_judge(name_or_path: str, *, logprobs: bool = True, max_tokens: int = 12, n_ctx: int | None = None,
                     n_gpu_layers: int = 0, n_threads: int | None = None,
                     on_status: Callable[[str], None] | None = None):
    """Resolve a built-in name or GGUF path (pulling if needed) and wrap it as a judge."""
    from rs_local import models
    from rs_local.judge.local import LocalJudge
    from rs_local.runtime.runner import Runner

    path = models.resolve(name_or_path, progress=on_status)
    runner = Runner(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads)
    return LocalJudge(runner, max_tokens=max_tokens, logprobs=logprobs)


def load_probe_judge(probe_path: str | None = None, *, n_ctx: int | None = None, n_gpu_layers: int = 0,
                     n_threads: int | None = None, on_status: Callable[[str], None] | None = None, share: Any = None):
    """A probe judge: the probe file plus the judge model it was trained for (pulled if built in).

    When ``share`` (a Runner) holds that very model file, the judge reads through it: its reader is a
    context of its own on the same weights, so the runner's control vectors never reach the verdicts,
    and a command that evaluates and judges loads llama.cpp's model once, not twice."""
    from rs_local import models
    from rs_local.judge.probe import ProbeJudge, read_probe
    from rs_local.runtime.runner import Runner

    path = Path(probe_path) if probe_path else SHIPPED_PROBE
    pf = read_probe(path)
    model_ref = str(pf.training.get("model_ref") or models.DEFAULT_MODEL)
    try:
        model_path = models.resolve(model_ref, progress=on_status)
    except ModelError as exc:
        if model_ref in models.MODELS:  # a failed pull says why itself
            raise
        beside = path.parent / Path(model_ref).name  # the probe moved (another directory, another machine) with its model
        if not beside.is_file():
            raise ModelError(f"{path}: trained for model {model_ref!r}, which cannot be found ({exc}); put the model "
                             f"file beside the probe") from None
        model_path = beside
    if share is not None and Path(share.path).resolve() == Path(model_path).resolve():
        return ProbeJudge(share, pf, path)
    runner = Runner(model_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads)
    try:
        judge = ProbeJudge(runner, pf, path)
    except BaseException:
        runner.close()
        raise
    judge.owns_runner = True
    return judge
