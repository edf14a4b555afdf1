"""OpenAI request bodies, checked field by field into what the worker needs.

Parsed by hand rather than by a pydantic model so that every refusal names the field in
OpenAI's ``param`` and says what was expected, and so that the JSON rules of
:func:`rs_local.files.parse_json` apply (no ``NaN``/``Infinity``, no number that overflows to
infinity, bounded nesting and integer digits, valid Unicode). Fields that OpenAI clients send
and that do not change what a local model can do (``user``, ``presence_penalty``, ...) are
accepted and ignored, as llama-cpp-python's server does; fields that would silently change
the meaning of the answer if ignored (``n`` > 1, images, token-id prompts, log-probabilities, tools,
a ``tool_choice`` that demands a call, audio output, a JSON response format, a logit bias,
``echo``/``suffix``/``best_of``) are refused, each only when set
to a value that asks for something (``tools: []`` or ``logprobs: false`` pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from rs_local.files import parse_json
from rs_local.files.reading import JsonProblem
from rs_local.runtime.runner import Prompt
from rs_local.runtime.sampling import SamplingParams
from rs_local.serve.errors import bad_request

#: llama.cpp seeds are uint32 and 0xFFFFFFFF means random (as in the CLI's --seed).
MAX_SEED = 2**32 - 2
MAX_STOPS = 4
MAX_MESSAGES = 1024
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ParsedRequest:
    """What a chat or completion request asks for, steering aside (that needs the vector library)."""

    model: str
    prompt: Prompt
    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 400 naming the problem."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark: JSON parsers may skip it (RFC 8259)
    except UnicodeDecodeError as exc:
        raise bad_request(f"the body is not UTF-8 (byte {exc.start})", None, "invalid_json") from None
    if not text.strip():
        raise bad_request("the body is empty; expected a JSON object", None, "invalid_json")
    try:
        body = parse_json(text)
    except JsonProblem as exc:
        raise bad_request(f"malformed JSON: {exc.message}", None, "invalid_json") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise bad_request(f"malformed JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_json")
    return body


# ----------------------------------------------------------------------------- fields


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name} must be a number", name, "invalid_type")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo:
        raise bad_request(f"{name} must be in [{lo:g}, {hi:g}]", name)
    return value


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise bad_request(f"{name} must be an integer", name, "invalid_type")
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}", name)
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", name, "invalid_type")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOPS or any(len(s) > 256 for s in items):
        raise bad_request(f"stop takes at most {MAX_STOPS} strings of at most 256 characters", "stop")
    return tuple(s for s in items if s)


def _model(body: Mapping[str, Any]) -> str:
    value = body.get("model", "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 1024:
        raise bad_request("model must be a string", "model", "invalid_type")
    return value


#: Fields that ask for what this server does not do, with the values that ask for nothing.
_UNSUPPORTED = {
    # legacy completions' logprobs 0 asks for the chosen tokens' log-probs: not harmless
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """400 ``unsupported`` for a field the answer would silently ignore (a client would read null
    log-probs, an answer that is not the JSON or tool call it asked for, as if they were honoured)."""
    for name, harmless in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == h and type(value) is type(h) for h in harmless if h is not None) and value is not None:
            if (name, body.get({"tools": "tool_choice", "functions": "function_call"}.get(name, ""))) in (
                    ("tools", "none"), ("functions", "none")):
                continue  # tools offered but not to be called: the answer is plain text
            raise bad_request(f"{name} is not supported by this server", name, "unsupported")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto"):  # "required" or a named function: a tool call is owed
        raise bad_request("tool_choice other than \"none\" or \"auto\" is not supported by this server (no tool calls)",
                          "tool_choice", "unsupported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"] or body.get("audio") is not None:
        raise bad_request("only text output is supported by this server", "modalities", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise bad_request("response_format other than {\"type\": \"text\"} is not supported by this server",
                          "response_format", "unsupported")


def _common(body: Mapping[str, Any], prompt: Prompt, default_max: int | None) -> ParsedRequest:
    """Fields shared by both endpoints."""
    _refuse_unsupported(body)
    n = _integer(body, "n", 1, 1)
    del n  # only n == 1 is possible on one sequence; anything else was refused above
    seed = body.get("seed")
    seed = None if seed == -1 else _integer(body, "seed", 0, MAX_SEED)
    max_tokens = _integer(body, "max_tokens", 1, 2**31 - 1)  # clamped to the room left in the context
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", 1, 2**31 - 1)
    stream_options = body.get("stream_options")
    stream_options = {} if stream_options is None else stream_options
    if not isinstance(stream_options, Mapping):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 0.0, 100.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=max(0, _integer(body, "top_k", -1, 1_000_000) or 0),  # -1: off, as vLLM and llama.cpp read it
        seed=seed,
        logprobs=False,  # responses carry no log-probs
    )
    return ParsedRequest(
        model=_model(body), prompt=prompt, stream=_bool(body, "stream"),
        include_usage=_bool(stream_options, "include_usage"),
        max_tokens=max_tokens if max_tokens is not None else default_max, sampling=sampling, stop=_stop(body),
    )


# ----------------------------------------------------------------------------- endpoints


def _content(value: Any, param: str) -> str:
    """Message content: a string, or a list of text parts (what newer clients send)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a string or a list of text parts", param, "invalid_type")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{param}[{i}]: only text parts are supported", f"{param}[{i}]", "unsupported")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise bad_request(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, msg in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise bad_request(f"{param} must be an object with role and content", param, "invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad_request(f"{param}.role must be one of {', '.join(_ROLES)}", f"{param}.role")
        out.append({"role": _ROLES[role], "content": _content(msg.get("content"), f"{param}.content")})
    return out


def parse_chat(body: Mapping[str, Any]) -> ParsedRequest:
    """``POST /v1/chat/completions``; without max_tokens the answer may fill the context."""
    return _common(body, _messages(body), None)


def parse_completion(body: Mapping[str, Any]) -> ParsedRequest:
    """``POST /v1/completions`` (one text prompt; 16 tokens by default, as OpenAI's legacy API)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (one prompt per request)", "prompt", "invalid_type")
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    return _common(body, prompt, 16)
