"""Induced refusal: a vector that makes the model decline one topic with its own stock refusal.

A policy's ``refuse`` category needs a direction that, added on that topic's prompts only (the
gate keeps it off everything else), makes the model refuse them. The first version reused the
refusal source's gradient: the direction that raises the openings of the model's refusals of
harmful requests. It does get the topic refused, but in whatever refusal the model drifts into:
on the conditional-steering benchmark's 38 held-out gambling prompts, Qwen2.5-Coder-0.5B at +1
refused all 38, and 14 of those answers declined to discuss "political matters".

Here the objective sits on the category's own prompts: per prompt, the gradient of the
log-probability of the model's most common refusal of the source prompts (its first sentence,
"I'm sorry, but I can't assist with that." on Qwen, every token of it) with respect to a vector
added to each block's output; averaged over the category's prompts, nothing projected out.
Measured the same way: 38 of 38 refused at +0.75, +1 and +1.5, none of them about politics (with
only the first two tokens, "I'm", as the target, 1 to 6 answers still drifted there).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from rs_local.callbacks import Say
from rs_local.errors import RsLocalError
from rs_local.recipes.isolate import Recipe, fit_dtype, label_refusals, runner_for, sample_for_gradients

#: answer tokens the gradient scores: the whole stock refusal sentence, not only its opening word
INDUCED_TOKENS = 16


def first_sentence(text: str) -> str:
    """An answer's first sentence (whitespace collapsed): the part of a refusal that is the same every time."""
    flat = " ".join(text.split())
    end = re.search(r"[.!?](\s|$)", flat)
    return flat[: end.end()].strip() if end else flat


def stock_refusal(runner: Any, prompts: Sequence[str], system: str | None = None, max_tokens: int = 32) -> str | None:
    """The model's most common refusal of ``prompts`` (its first sentence, keyword judge), or None if it refuses none."""
    rows = label_refusals(runner, {"source": list(prompts)}, max_tokens=max_tokens, system=system)["source"]
    counts = Counter(first_sentence(answer) for _p, answer, refused in rows if refused and answer.strip())
    return counts.most_common(1)[0][0] if counts else None


def fit_induced(model: Any, target: Sequence[str], source: Sequence[str], harmless: Sequence[str],
                recipe: Recipe | None = None, say: Say | None = None, *, runner: Any = None,
                names: tuple[str, str] = ("target", "source"), refusal: str | None = None) -> Any:
    """A ControlVector that, at a positive scale, makes ``target`` prompts get the model's stock refusal.

    The refusal text comes from the plain model's answers to ``source`` (a set it refuses, e.g.
    harmful requests; llama.cpp, ``runner``); the gradients and the length per block
    (``||mean(target) - mean(harmless)||`` over the band, as for every recipe vector) come from
    Transformers on the same GGUF. ``recipe`` gives the band, the prompt cap, bfloat16 and the
    system prompt. A source the model never refuses is a one-line error. ``refusal``: the stock
    refusal already found for this source (several refuse categories share it; it is labelled once).
    """
    from rs_local.recipes.memory_check import check_fit_memory, gradient_memory
    from rs_local.runtime.host import decide_bf16
    from rs_local.vectors.hf_model import fit_blocks, load_model
    from rs_local.vectors.refusal_gradient import GradientContrast, RefusedPrompt, band_lengths

    recipe = recipe or Recipe()
    recipe.check()
    say = say or (lambda _m: None)
    bf16 = decide_bf16(recipe.bf16)
    check_fit_memory(model, fit_dtype(bf16), say=say)  # before the labelling, not minutes in
    recipe.blocks(fit_blocks(model))  # so is a model Transformers cannot read, or a band it lacks
    if refusal is None:
        with runner_for(model, runner, say) as answering:
            refusal = stock_refusal(answering, source, recipe.system)
    if refusal is None:
        raise RsLocalError(f"the plain model refuses none of the {names[1]} prompts: there is no refusal to induce")
    say(f"the model's stock refusal of the {names[1]} prompts: {refusal!r}")
    fm = load_model(model, fit_dtype(bf16), progress=say) if not hasattr(model, "blocks") else model
    band = recipe.blocks(fm.n_layer)
    lengths = band_lengths(fm, target, harmless, system=recipe.system, upto=max(band, default=None), bf16=bf16.enabled)
    fit = GradientContrast(fm, band, INDUCED_TOKENS, system=recipe.system, bf16=bf16.enabled, keep_free=True,
                           memory=gradient_memory())
    fit.add([RefusedPrompt(p, refusal) for p in sample_for_gradients(list(target), recipe)], [], say=say)
    vec = fit.vector(lengths)
    for key in ("n_refused_target", "n_refused_keep"):  # the contrast's counts; here every target prompt is used
        vec.metadata.pop(key, None)
    vec.metadata.update({"method": "induced-refusal gradient", "n_gradients": fit.counts()[0], "refusal_text": refusal,
                         "target_set": names[0], "refusal_from": names[1], "n_target": len(target),
                         "n_harmless": len(harmless),
                         "recipe": f"gradient of the stock refusal on the {names[0]} prompts, blocks {recipe.layers}",
                         **({"system_prompt": recipe.system} if recipe.system else {})})
    return vec
