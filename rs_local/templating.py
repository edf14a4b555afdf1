"""Applying a model's chat template, the same way on the llama.cpp and the Transformers side.

Why a module of its own: the template is the model's code, run by Jinja, and it can fail.
Gemma-2's raises "System role not supported" for any system message; a hand-edited one may
not parse at all. Both the Runner (llama.cpp) and the capture (Transformers) apply it, and
activations only match when both render the same text, so both go through
:func:`apply_template`: a template that refuses a system message gets it as the opening of the
first user turn (what such models' authors advise), and any other template failure is one
:class:`~rs_local.errors.ModelError` line naming the model, never a Jinja traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from rs_local.errors import ModelError

Message = dict[str, str]


def one_turn(prompt: str, system: str | None = None) -> list[Message]:
    """A chat of one user message, after ``system`` when there is one: how every prompt set is read."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def is_template_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from Jinja (parsing or rendering a template) or from the template's own
    code: llama-cpp-python's ``raise_exception`` raises a plain ValueError, seen here by the
    ``<template>`` frame Jinja puts in the traceback."""
    if type(exc).__module__.split(".")[0] == "jinja2":
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            return True
        tb = tb.tb_next
    return False


def system_merged(messages: Sequence[Message]) -> list[Message] | None:
    """The messages with a leading system message folded into the first user turn; None without one."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def template_problem(exc: BaseException) -> str:
    """The first line of a Jinja error, short enough for a one-line message."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:200]


def apply_template(apply: Callable[[list[Message]], Any], messages: Sequence[Message], model: str | Path) -> Any:
    """``apply(messages)``; a template that refuses the system role is retried with it merged into
    the first user turn, and any other Jinja failure becomes one line naming ``model``."""
    try:
        return apply(list(messages))
    except Exception as exc:  # Jinja's TemplateError, or whatever the template's own code raised
        if not is_template_error(exc):
            raise
        error = exc
    merged = system_merged(messages)
    if merged is not None:
        try:
            return apply(merged)
        except Exception as exc:
            if not is_template_error(exc):
                raise
            error = exc
    raise ModelError(f"{model}: the model's chat template failed: {template_problem(error)}")
