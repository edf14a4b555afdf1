"""The vectors of a policy's steered categories, fitted by the refusal-gradient recipe.

A vector that is on for every prompt must leave harmful refusals alone, so the isolate recipe
projects the span of the harmful prompts' refusal gradients out of the political direction.
Behind a gate that constraint has nothing left to protect: the probe keeps the vector off
every prompt it does not route to the category. Here each ``remove`` category therefore gets
the mean refusal gradient of its own refused prompts, nothing projected out (``fit_political``
with an empty keep set), with the recipe's length rule against the baseline (benign) category,
applied at a negative scale. Each ``refuse`` category gets the direction that makes its own
prompts open with the model's stock refusal of the refusal source (e.g. ``harmful``), applied at
a positive scale on the category's topic (:mod:`rs_local.recipes.induce`).

Measured on the conditional-steering benchmark (Qwen2.5-Coder-0.5B, JailbreakBench's benign
behaviours as the over-refusal category, held-out prompts, one run each, same routing):
political refusal by keywords went 92% -> 0% and borderline 42% -> 0% with these vectors,
against 4% and 12% with the recipe's keep-projected ones (benchmarks/RESULTS.md, conditional steering); the
mean difference of the category and the baseline, the older default, gave looping nonsense.
For the induced refusal of a gambling category, the refusal source's own gradient gave 91% by
keywords (95% judged) against 86% (95%) for the mean difference of harmful and harmless prompts,
but a third of its refusals declined "political matters"; the induced direction gives the
model's stock refusal ("I'm sorry, but I can't assist with that.") on the topic itself.
"""

from __future__ import annotations

from typing import Any, Sequence

from rs_local.callbacks import Say
from rs_local.recipes.policy_fit import CategorySpec

#: how a steered category without a vector file gets one (``policy fit --fit-vectors``)
FIT_VECTORS = ("gradient", "mean-difference")


def needs_gradient(specs: Sequence[CategorySpec], how: str) -> list[CategorySpec]:
    """The steered categories the recipe must fit a vector for (none given, ``how`` is gradient)."""
    if how not in FIT_VECTORS:
        raise ValueError(f"--fit-vectors must be one of {', '.join(FIT_VECTORS)}")
    return [s for s in specs if s.action != "keep" and s.vector is None] if how == "gradient" else []


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
        raise RsLocalError("a steered category's vector is fitted with Transformers: pip install 'rs-local[fit]', "
                           "or give it a vector (--vector NAME=PATH) or --fit-vectors mean-difference")


def fit_category_vectors(model: Any, runner: Any, specs: Sequence[CategorySpec], baseline: CategorySpec,
                         source: CategorySpec | None, layers: Sequence[int], say: Say | None = None,
                         bf16: bool | None = None, system: str | None = None) -> None:
    """Give every steered category without a vector its refusal-gradient vector (in place).

    ``model``: what Transformers loads (the runner's GGUF); ``runner``: labels the prompts with
    llama.cpp, as the gate will answer them. A ``remove`` category gets the mean refusal gradient
    of its own refused prompts; a ``refuse`` category the gradient of the model's stock refusal of
    ``source`` (a category it refuses) on the category's own prompts
    (:func:`rs_local.recipes.induce.fit_induced`). A set the plain model never refuses is a
    one-line error naming its file. ``system``: the system prompt the gate will run under; every
    pass of the fits runs under it too.
    """
    from rs_local.errors import RsLocalError
    from rs_local.recipes.induce import fit_induced
    from rs_local.recipes.isolate import Recipe, fit_dtype
    from rs_local.recipes.memory_check import check_fit_memory
    from rs_local.runtime.host import decide_bf16
    from rs_local.runtime.vector_specs import band_label

    say = say or (lambda _m: None)
    band = band_label(layers)
    if any(s.action != "keep" and s.vector is None for s in specs):
        # once, before any labelling, and not inside the refuse path's error wrap (which names the source file)
        check_fit_memory(model, fit_dtype(decide_bf16(bf16)), say=say)
        from rs_local.vectors.hf_model import fit_blocks

        fit_blocks(model)  # a model Transformers cannot read stops here, before any labelling
    refusal = None  # the source's stock refusal, labelled for the first refuse category and shared
    for spec in specs:
        if spec.action == "keep" or spec.vector is not None:
            continue
        if spec.action == "remove":
            say(f"{spec.name}: fitting its vector (refusal gradients of its refused prompts, blocks {band})")
            spec.vector = _gradient(model, runner, spec, baseline, band, say, bf16, system, rounds=2)
            spec.vector.source = f"refusal gradient of {spec.name}'s refusals (no keep set)"
            continue
        if source is None:
            raise RsLocalError("a refuse category needs a category the model refuses: name it with --refusal-from")
        say(f"{spec.name}: fitting its vector (the model's stock refusal of {source.name}'s prompts, induced on "
            f"{spec.name}'s, blocks {band})")
        try:
            spec.vector = fit_induced(model, spec.prompts, source.prompts, baseline.prompts,
                                      Recipe(layers=band, bf16=bf16, system=system),
                                      say=lambda m, n=spec.name: say(f"  [{n}] {m}"), runner=runner,
                                      names=(spec.name, source.name), refusal=refusal)
        except RsLocalError as exc:
            raise RsLocalError(f"{source.path}: {exc}") from None
        refusal = spec.vector.metadata["refusal_text"]
        spec.vector.source = f"{source.name}'s stock refusal, induced on {spec.name}: {refusal}"


def _gradient(model: Any, runner: Any, target: CategorySpec, baseline: CategorySpec, band: str, say: Say,
              bf16: bool | None, system: str | None, rounds: int) -> Any:
    """The isolate recipe on ``target``'s refused prompts, no keep set."""
    from rs_local.errors import RsLocalError
    from rs_local.recipes.isolate import Recipe, fit_political

    try:
        recipe = Recipe(layers=band, bf16=bf16, rounds=rounds, system=system)
        return fit_political(model, target.prompts, [], baseline.prompts, recipe,
                             say=lambda m: say(f"  [{target.name}] {m}"), runner=runner,
                             names=(target.name, "keep")).vector
    except RsLocalError as exc:
        raise RsLocalError(f"{target.path}: {exc}") from None
