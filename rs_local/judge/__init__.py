"""Refusal scoring: sample answers, judge them (local GGUF, OpenAI-compatible HTTP or keywords), score prompts.

Pipeline: :func:`respond` samples k answers per prompt into a resumable JSONL log;
:func:`judge_responses` gives each answer a verdict (resumable too) and aggregates the
per-prompt refusal score c in [-1, 1] that ``rs-local fit`` reads; :func:`evaluate` measures a
judge against human labels. Names are imported lazily so ``import rs_local.judge`` loads
neither llama.cpp nor a network stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "respond": "rs_local.judge.respond",
    "RespondSettings": "rs_local.judge.respond",
    "judge_responses": "rs_local.judge.judging",
    "load_responses": "rs_local.judge.judging",
    "JudgeReport": "rs_local.judge.judging",
    "make_judge": "rs_local.judge.backends",
    "LocalJudge": "rs_local.judge.local",
    "OpenAIJudge": "rs_local.judge.openai_http",
    "KeywordJudge": "rs_local.judge.keywords",
    "Verdict": "rs_local.judge.verdict",
    "aggregate": "rs_local.judge.scores",
    "weighted_score": "rs_local.judge.scores",
    "evaluate": "rs_local.judge.judge_eval",
    "load_labelled": "rs_local.judge.judge_eval",
    "REFUSAL_TYPES": "rs_local.judge.rubric",
    "parse_verdict": "rs_local.judge.rubric",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rs_local.judge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
