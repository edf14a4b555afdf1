"""The default recipe for removing political refusals while keeping harmful ones.

A plain mean difference "political minus harmless" carries two things: the topic (politics)
and the refusal the topic triggers. Part of that refusal component is the model's generic
refusal direction, the one harmful requests use too, so subtracting it at a useful strength
also removes harmful refusals (measured: on Qwen2.5-Coder-0.5B, blocks 8-20 at -0.5 removed
every harmful refusal). The recipe therefore

1. fits a *harmful-refusal* direction the same way (harmful requests minus harmless ones),
2. fits the political direction (political questions minus harmless ones) and removes, block
   by block, its component along the harmful direction (``orthogonalize_to``), so steering
   against it leaves the shared refusal machinery alone, and
3. restricts both to a band of middle blocks, where the decision to refuse is formed; late
   blocks mostly shape the wording and steering them costs fluency (KL) fast.

The scale is not part of the vector: choose it with ``rs-local sweep`` (or take the
recipe's suggested value, measured on the reference model). Everything here is a thin layer
over :func:`rs_local.vectors.fit.fit_vector`, so each step is also a plain ``rs-local fit``
command (see :func:`Recipe.commands`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Say = Callable[[str], None]


@dataclass
class Recipe:
    """Settings of the two fits; defaults are the ones measured to work on the default model."""

    method: str = "md"
    layers: str = "8-16"
    orthogonalize: bool = True
    lam: float | str = 0.1
    holdout: float = 0.2
    seed: int = 0
    #: Scale suggested for the default model (a sweep finds it for others).
    suggested_scale: float = -1.0
    suggested_scales: tuple[float, ...] = (-0.5, -1.0, -1.5)

    def commands(self, political: str, harmful: str, harmless: str, model: str = "qwen2.5-coder-0.5b") -> list[str]:
        """The same recipe as ``rs-local fit`` command lines."""
        common = f"--model {model} --method {self.method} --layers {self.layers}"
        harm = f"rs-local fit {common} -p {harmful} -n {harmless} -o harmful.gguf"
        pol = f"rs-local fit {common} -p {political} -n {harmless} -o political.gguf"
        if self.orthogonalize:
            pol += " --orthogonalize-to harmful.gguf"
        return [harm, pol] if self.orthogonalize else [pol]


@dataclass
class RecipeResult:
    """The political vector, and the harmful vector it was made orthogonal to (if any)."""

    vector: Any  # ControlVector
    harmful: Any | None
    info: dict[str, Any] = field(default_factory=dict)


def fit_political(
    model: Any,
    political: Sequence[str],
    harmful: Sequence[str],
    harmless: Sequence[str],
    recipe: Recipe | None = None,
    say: Say | None = None,
    cache: Any = True,
) -> RecipeResult:
    """Fit the recipe's political-refusal vector (needs Transformers; the model is a name, path or FitModel)."""
    from rs_local.vectors.fit import FitOptions, fit_vector

    recipe = recipe or Recipe()
    say = say or (lambda _m: None)

    def options(ortho=None) -> FitOptions:
        return FitOptions(method=recipe.method, lam=recipe.lam, layers=recipe.layers, holdout=recipe.holdout,
                          seed=recipe.seed, orthogonalize_to=ortho, cache=cache)

    harm = None
    if recipe.orthogonalize:
        say(f"fitting the harmful-refusal direction: {len(harmful)} harmful vs {len(harmless)} harmless prompts")
        harm = fit_vector(model, list(harmful), list(harmless), options=options(), say=say).vector
        harm.metadata["source_file"] = "harmful-refusal direction (recipe step 1)"
    say(f"fitting the political direction: {len(political)} political vs {len(harmless)} harmless prompts"
        + (", orthogonal to the harmful one" if harm is not None else ""))
    pol = fit_vector(model, list(political), list(harmless), options=options(harm), say=say).vector
    pol.metadata["recipe"] = (f"{recipe.method}, blocks {recipe.layers}"
                              + (", orthogonalised to harmful-vs-harmless" if recipe.orthogonalize else ""))
    pol.metadata["suggested_scale"] = recipe.suggested_scale
    return RecipeResult(pol, harm, {"method": recipe.method, "layers": recipe.layers, "orthogonalize": recipe.orthogonalize})
