"""A chat session: history, system prompt and the steering state, independent of any UI.

The REPL in the CLI only reads lines and prints tokens; everything a program embedding
rs-local would also want (switching the vector or the scale mid-conversation, resetting,
keeping a partial reply after an interrupt) lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from rs_local.errors import RsLocalError
from rs_local.runtime.runner import Generation, Runner, TokenEvent
from rs_local.runtime.sampling import SamplingParams
from rs_local.runtime.vector_specs import check_scale, vector_pairs
from rs_local.vectors.control_vector import ControlVector


@dataclass
class ChatSession:
    """Conversation state on top of a Runner. ``scale`` multiplies every vector's own scale."""

    runner: Runner
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    history: list[dict[str, str]] = field(default_factory=list)
    vectors: list[tuple[ControlVector, float]] = field(default_factory=list)
    scale: float = 1.0
    layer_range: tuple[int, int] | None = None

    def apply(self) -> None:
        """Push the current vectors and scale into llama.cpp (clears when none or scale 0)."""
        parts = [(v, s * self.scale) for v, s in self.vectors]
        if parts and self.scale != 0:
            self.runner.set_vectors(parts, self.layer_range)
        else:
            self.runner.clear_vectors()

    def set_scale(self, scale: float) -> None:
        """Change the scale; one llama.cpp refuses leaves the session as it was."""
        previous = self.scale
        self.scale = check_scale(scale)  # "2" multiplied each vector's scale into a TypeError
        try:
            self.apply()
        except Exception:
            self.scale = previous
            raise

    def set_vectors(self, vectors: list[tuple[ControlVector, float]]) -> None:
        """Replace the vectors; validated against the model before anything changes, at scale 0 too
        (a vector for another model taken while the scale was 0 made every later /scale fail)."""
        vectors = vector_pairs(vectors)
        for vec, _scale in vectors:
            self.runner.check_vector(vec)
        previous = self.vectors
        self.vectors = vectors
        try:
            self.apply()
        except Exception:
            self.vectors = previous
            raise

    def reset(self) -> None:
        """Forget the conversation (the vector and scale stay)."""
        self.history.clear()

    def messages(self, user_text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + self.history + [{"role": "user", "content": user_text}]

    def reply(self, user_text: str, result: Generation | None = None) -> Iterator[TokenEvent]:
        """Stream the answer; the exchange joins the history even if the stream is cut short, but not
        when it fails with an error (a message too long for the context): kept, it would make every
        later turn fail the same way."""
        out = result if result is not None else Generation()
        failed = False
        try:
            yield from self.runner.stream(
                self.messages(user_text), max_tokens=self.max_tokens, sampling=self.sampling, result=out
            )
        except RsLocalError:
            failed = True
            raise
        finally:
            if not failed:
                self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": out.text}]
