"""The vectors of a policy's ``remove`` categories, fitted by the refusal-gradient recipe.

A vector that is on for every prompt must leave harmful refusals alone, so the isolate recipe
projects the span of the harmful prompts' refusal gradients out of the political direction.
Behind a gate that constraint has nothing left to protect: the probe keeps the vector off
every prompt it does not route to the category. Here each ``remove`` category therefore gets
the mean refusal gradient of its own refused prompts, nothing projected out (``fit_political``
with an empty keep set), with the recipe's length rule against the baseline (benign) category.

Measured on the conditional-steering benchmark (Qwen2.5-Coder-0.5B, JailbreakBench's benign
behaviours as the over-refusal category, held-out prompts, one run each, same routing):
political refusal by keywords went 92% -> 0% and borderline 42% -> 0% with these vectors,
against 4% and 12% with the recipe's keep-projected ones (README, conditional steering); the
mean difference of the category and the baseline, the older default, gave looping nonsense.
"""

from __future__ import annotations

from typing import Any, Sequence

from rs_local.callbacks import Say
from rs_local.recipes.policy_fit import CategorySpec

#: what a ``remove`` category without a vector file steers with (``policy fit --remove-vector``)
REMOVE_VECTORS = ("gradient", "mean-difference")


def needs_gradient(specs: Sequence[CategorySpec], how: str) -> list[CategorySpec]:
    """The remove categories the recipe must fit a vector for (none given, ``how`` is gradient)."""
    if how not in REMOVE_VECTORS:
        raise ValueError(f"remove vector must be one of {', '.join(REMOVE_VECTORS)}")
    return [s for s in specs if s.action == "remove" and s.vector is None] if how == "gradient" else []


def check_fit_extra() -> None:
    """Fail before any model loads when Transformers (the ``fit`` extra) is not installed."""
    from importlib.util import find_spec

    from rs_local.errors import RsLocalError

    def missing(name: str) -> bool:
        try:
            return find_spec(name) is None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            return True

    if missing("torch") or missing("transformers"):
        raise RsLocalError("a remove category's vector is fitted with Transformers: pip install 'rs-local[fit]', "
                           "or give it a vector (--vector NAME=PATH) or --remove-vector mean-difference")


def fit_remove_vectors(model: Any, runner: Any, specs: Sequence[CategorySpec], baseline: CategorySpec,
                       layers: Sequence[int], say: Say | None = None, bf16: bool | None = None) -> None:
    """Give every remove category without a vector its own refusal-gradient vector (in place).

    ``model``: what Transformers loads (the runner's GGUF); ``runner``: labels the prompts with
    llama.cpp, as the gate will answer them. A category the plain model never refuses is a
    one-line error naming its file (there is no refusal to take a gradient of).
    """
    from rs_local.errors import RsLocalError
    from rs_local.recipes.isolate import Recipe, fit_political

    say = say or (lambda _m: None)
    blocks = sorted(layers)
    contiguous = blocks == list(range(blocks[0], blocks[-1] + 1))
    band = f"{blocks[0]}-{blocks[-1]}" if contiguous else ",".join(map(str, blocks))
    for spec in specs:
        if spec.action != "remove" or spec.vector is not None:
            continue
        say(f"{spec.name}: fitting its vector (refusal gradients of its refused prompts, blocks {band})")
        try:
            fitted = fit_political(model, spec.prompts, [], baseline.prompts, Recipe(layers=band, bf16=bf16),
                                   say=lambda m, n=spec.name: say(f"  [{n}] {m}"), runner=runner,
                                   names=(spec.name, "keep"))
        except RsLocalError as exc:
            raise RsLocalError(f"{spec.path}: {exc}") from None
        spec.vector = fitted.vector
        spec.vector.source = f"refusal gradient of {spec.name}'s refusals (no keep set)"
