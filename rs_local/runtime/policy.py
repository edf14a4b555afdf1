"""Conditional steering on llama.cpp: a policy's probes pick, per prompt, which vector applies.

One vector on every prompt must be selective by construction, and it is not (it moves harmful
and everyday prompts too). A gate only steers the prompts it recognises: llama.cpp evaluates
the prompt, the output of the policy's probe block at the last prompt tokens (the mean over the
chat template's tokens after the user's message, ``Policy.pool_tokens``) is read through
the eval callback (:class:`rs_local.runtime.activations.BlockReader`), the category probes
classify it, and the Runner generates with that category's vector, or with none.

Decision rule: the one-vs-rest calibrated probabilities of all categories are compared (divided
by their sum first when the policy says ``decision = normalised``, as fitted policies do); the
highest wins if it reaches its category's threshold, otherwise the gate abstains and the
plain model answers (``keep``): an unsure gate must not steer.

Why the prompt is evaluated twice. The reader has its own llama.cpp context without any
vector (the probes were fitted on unsteered activations, and callbacks are fixed when a
context is created), and once the category is known the Runner evaluates the prompt again
under the chosen vector. Steering the prompt tokens too is what ``llama-cli --control-vector``
does, so a gated answer is exactly the answer the category's vector gives on its own (and a
``keep`` decision gives exactly the plain model's answer). The alternative, reusing the
unsteered prompt cache and steering only generated tokens, would save one prompt evaluation
but produce answers no exported vector reproduces. The cost is one extra unsteered prompt
evaluation per turn, of the system prompt and the new user message only (see :func:`probe_view`;
the reader keeps the shared template prefix in its cache);
``Decision.read_s`` records it and benchmarks/conditional_steering.py reports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rs_local.errors import RsLocalError
from rs_local.runtime.policy_file import Policy, read_policy
from rs_local.runtime.runner import Generation, Prompt, Runner, TokenEvent


@dataclass
class Decision:
    """What the gate decided for one prompt."""

    category: str | None  # the most probable category (even when below its threshold)
    confidence: float  # its calibrated probability
    action: str  # remove / refuse / keep (keep when below threshold or the gate is off)
    scale: float = 0.0
    gated: bool = True  # False: below threshold, or the policy is switched off
    probs: dict[str, float] = field(default_factory=dict)
    read_s: float = 0.0  # seconds spent reading the probe block (the extra prompt evaluation)

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "confidence": round(self.confidence, 6), "action": self.action,
                "scale": self.scale, "gated": self.gated, "probs": {k: round(v, 6) for k, v in self.probs.items()},
                "read_s": round(self.read_s, 4)}

    def describe(self) -> str:
        """One line for the chat."""
        if self.category is None:
            return "policy off"
        what = f"{self.category} ({self.confidence:.2f})"
        if not self.gated:
            return f"{what}: below threshold, keep"
        return f"{what}: {self.action}" + (f" at scale {self.scale:g}" if self.action != "keep" else "")


def classify(policy: Policy, row: np.ndarray) -> Decision:
    """Apply the decision rule to one activation row of the probe block."""
    probs = policy.probs(row)
    best = int(np.argmax(probs))
    cat = policy.categories[best]
    conf = float(probs[best])
    gated = conf >= cat.threshold
    action = cat.action if gated else "keep"
    return Decision(cat.name, conf, action, cat.scale if action != "keep" else 0.0, gated,
                    {c.name: float(p) for c, p in zip(policy.categories, probs)})


def probe_view(prompt: Prompt) -> Prompt:
    """What the probes read: the system prompt and the last user message, as they were fitted.

    In a chat, classifying the whole conversation let earlier turns outvote the new one (a
    cooking question after a coding turn was read as code on SmolLM2), so each turn is
    classified on its own; a raw string is read as it is.
    """
    if isinstance(prompt, str):
        return prompt
    msgs = list(prompt)
    system = [m for m in msgs[:1] if m.get("role") == "system"]
    users = [m for m in msgs if m.get("role") == "user"]
    return system + users[-1:] if users else msgs


class PolicyRunner:
    """A Runner whose vector is chosen per prompt by a policy.

    ``enabled = False`` turns the gate off (the plain model answers, no activation is read).
    The Runner's vector is only changed when the decision changes, so a chat that stays in
    one category keeps its KV cache between turns.
    """

    def __init__(self, runner: Runner, policy: Policy, path: str | Path = "<policy>"):
        from rs_local.runtime.activations import BlockReader

        policy.check_model(runner, path)
        self.runner, self.policy, self.path = runner, policy, str(path)
        self.reader = BlockReader(runner, [policy.layer], n_ctx=runner.n_ctx, tail=policy.pool_tokens)
        self.enabled = True
        runner.clear_vectors()

    @classmethod
    def load(cls, runner: Runner, path: str | Path) -> "PolicyRunner":
        return cls(runner, read_policy(path), path)

    def decide(self, prompt: Prompt, cancelled: Callable[[], bool] | None = None) -> Decision:
        """Classify ``prompt`` (a chat or a raw string) without changing the Runner; ``cancelled`` is asked
        between batches of a long prompt's read (see :meth:`BlockReader.read_rows`)."""
        self.reader.live()  # closed, or on a closed Runner: one line, not a segfault
        if not self.enabled:
            return Decision(None, 0.0, "keep", gated=False)
        start = time.perf_counter()
        row = self.reader.read(probe_view(prompt), cancelled)[self.policy.layer]
        decision = classify(self.policy, row)
        decision.read_s = time.perf_counter() - start
        return decision

    def apply(self, decision: Decision) -> None:
        """Put the decided category's vector (or none) on the Runner.

        Compared with what the Runner holds now (not with the last decision), so a vector
        changed behind the gate's back is corrected; an unchanged one keeps the KV cache.
        """
        current = self.runner.vectors
        if decision.action == "keep" or decision.category is None:
            if current:
                self.runner.clear_vectors()
            return
        cat = self.policy.category(decision.category)
        if len(current) == 1 and current[0][0] is cat.vector and current[0][1] == cat.scale:
            return
        self.runner.set_vectors([(cat.vector, cat.scale)])

    def prepare(self, prompt: Prompt) -> Decision:
        """Decide and apply: the Runner is then ready to answer ``prompt``."""
        decision = self.decide(prompt)
        self.apply(decision)
        return decision

    def stream(self, prompt: Prompt, *, result: Generation | None = None, **kwargs) -> Iterator[TokenEvent | Decision]:
        """The decision first, then the tokens (as :meth:`Runner.stream`)."""
        yield self.prepare(prompt)
        yield from self.runner.stream(prompt, result=result, **kwargs)

    def generate(self, prompt: Prompt, **kwargs) -> tuple[Generation, Decision]:
        """Answer ``prompt`` under the gate; returns the answer and the decision."""
        decision = self.prepare(prompt)
        return self.runner.generate(prompt, **kwargs), decision

    def chat(self, messages: Sequence[dict[str, str]], **kwargs) -> tuple[Generation, Decision]:
        if isinstance(messages, (str, bytes)):
            raise RsLocalError("chat takes a list of messages ({'role': ..., 'content': ...}); "
                               "generate takes a plain prompt")
        return self.generate(list(messages), **kwargs)

    def close(self) -> None:
        self.reader.close()
        if not self.runner.closed:
            self.runner.clear_vectors()

    def __enter__(self) -> "PolicyRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
