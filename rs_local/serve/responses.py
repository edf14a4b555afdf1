"""Response objects and stream chunks in OpenAI's shapes, with the applied steering added.

Kept apart from the routes so the shapes can be read in one place. Every object carries a
top-level ``steering`` field (``{"vectors": [...], "layers": ..., "source": ...}``): OpenAI
clients ignore unknown fields, and a user can check what a request actually got.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rs_local.serve.steering import Steering


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """Builds the objects of one answer; ``chat`` picks chat.completion over text_completion shapes."""

    chat: bool
    model: str
    steering: Steering
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "steering": self.steering.describe()}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
        """The non-streaming response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        out = self._envelope("chat.completion" if self.chat else "text_completion", choice)
        out["usage"] = usage(prompt_tokens, completion_tokens)
        if timings is not None:
            out["timings"] = {k: round(v, 3) for k, v in timings.items()}
        return out

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        """One streamed chunk: text, or the opening role (chat), or the closing finish_reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choice)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", {})
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out
