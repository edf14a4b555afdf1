"""The default recipe for removing political refusals while keeping harmful ones.

Default (``method="gradient"``), measured on Qwen2.5-Coder-0.5B:

1. answer the training prompts with the plain model (llama.cpp, short greedy answers) and
   judge them: which political and which harmful prompts does it refuse, and how does each
   refusal open;
2. for each refused prompt, take the gradient of the log-probability of that opening with
   respect to a vector added to each block's output (Transformers, the same GGUF dequantised):
   the direction a control vector would have to take to make that refusal more likely;
3. per block of the band (default 8-16, the middle blocks, where the decision to refuse
   forms; late blocks mostly shape wording and cost fluency fast), the political direction
   is the mean political gradient with the whole span of the harmful gradients projected
   out, so to first order no harmful refusal seen in training moves;
4. the length per block is ``||mean(political) - mean(harmless)|| / k`` (comparable to a
   mean-difference vector of the band);
5. a second round: steer with that vector at ``probe_scale`` (-1), label the training
   prompts again, take the gradients of the prompts still refused *at that steered point*
   (political and harmful), pool them with the first round's and contrast again. The few
   political prompts the first vector leaves refused fall back to the generic "Sorry, but I
   can't assist" opening, which round 1 never saw; on the demo's held-out prompts the second
   round took political refusal at scale -1 from 18% to 5% and KL from 0.052 to 0.030, with
   harmful refusal at 93% of its baseline.

The scale is chosen by ``rs-local sweep`` (suggested for the default model: -1).

Why: every mean-difference variant (political - harmless, orthogonalised to harmful -
harmless, to refused-minus-complied harmful, political-refused - harmful-refused, bands from
2-6 to 16-22, ridge) removed harmful refusals at least as fast as political ones on this
model; see :mod:`rs_local.vectors.refusal_gradient`. The older recipe is kept as ``method="md"``
(mean difference orthogonalised to the harmful direction, through ``rs-local fit``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from rs_local.callbacks import Say

if TYPE_CHECKING:
    from rs_local.judge.backends import Judge
    from rs_local.runtime.host import HostDecision

METHODS = ("gradient", "md")
OBJECTIVES = ("opening", "judge")


@dataclass
class Recipe:
    """Settings of the fit; defaults are the ones measured to work on the default model."""

    method: str = "gradient"
    layers: str = "8-16"
    #: gradient method: tokens of each refusal opening, prompts per set, answer length for labelling
    answer_tokens: int = 2
    max_prompts: int = 40
    label_tokens: int = 32
    #: gradient method: rounds (2 = once more at the steered point), and the scale of that point
    rounds: int = 2
    probe_scale: float = -1.0
    #: what the rounds at the steered point aim at: "opening" (the gradient of each still-refused
    #: answer's opening, as in round 1) or "judge" (every target answer's gradient weighted by the
    #: judge's centred refusal confidence, so soft refusals count; see GradientContrast.add_weighted)
    objective: str = "opening"
    #: judge objective: answer tokens each weighted gradient covers
    objective_tokens: int = 32
    #: md method
    orthogonalize: bool = True
    lam: float | str = 0.1
    holdout: float = 0.2
    seed: int = 0
    #: gradient method: passes under bfloat16 autocast (True/False), or None: decided by the CPU
    #: (on where it does bfloat16 natively; see rs_local.runtime.host.decide_bf16)
    bf16: bool | None = None
    #: system prompt every pass runs under (labelling, gradients, lengths): the one the vector
    #: will be used with, since a system prompt moves the activations the vector is added to
    system: str | None = None
    #: Scale suggested for the default model (a sweep finds it for others).
    suggested_scale: float = -1.0
    suggested_scales: tuple[float, ...] = (-0.5, -1.0, -1.5)

    def check(self) -> None:
        """Fail on bad settings before any model loads (a bad band would otherwise surface minutes in)."""
        from rs_local.vectors.layers import parse_layers

        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown recipe objective '{self.objective}' (choose from {', '.join(OBJECTIVES)})")
        if self.method not in METHODS:
            raise ValueError(f"unknown recipe method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.layers.strip().lower() == "auto" or parse_layers(self.layers, 1 << 20) is None:
            raise ValueError("the recipe needs an explicit band (e.g. 8-16), not 'auto'")

    def blocks(self, n_layer: int) -> list[int]:
        """The band on a model of ``n_layer`` blocks (:meth:`check` vetted the syntax; the range needs
        the model), or a one-line error."""
        from rs_local.errors import RsLocalError
        from rs_local.vectors.layers import parse_layers

        try:
            return parse_layers(self.layers, n_layer) or []
        except ValueError as exc:
            raise RsLocalError(f"--layers: {exc}") from None

    def describe(self, keep_free: bool = False) -> str:
        if self.method == "gradient":
            aim = ", later rounds judge-weighted" if self.objective == "judge" else ""
            what = "mean target gradient, no keep set" if keep_free else "target minus keep span"
            return f"refusal-gradient contrast ({what}{aim}), blocks {self.layers}"
        return f"mean difference, blocks {self.layers}" + (", orthogonalised to the keep direction" if self.orthogonalize else "")


@dataclass
class RecipeResult:
    """The political vector, plus what the fit saw (refused counts, the harmful vector for md)."""

    vector: Any  # ControlVector
    harmful: Any | None = None
    info: dict[str, Any] = field(default_factory=dict)


def label_refusals(runner, sets: dict[str, Sequence[str]], *, judge: Judge | None = None, max_tokens: int = 32, batch: int | None = None,
                   cache: Any = None, vector: Any = None, scale: float = 0.0, settle: int = 0,
                   system: str | None = None) -> dict[str, list[tuple[str, str, bool]]]:
    """Per named set, (prompt, answer, refused) for each prompt: the model's short greedy answer
    (steered by ``vector`` at ``scale`` if given), judged. ``settle`` > 0: with the keyword judge an
    answer stops once its verdict and first ``settle`` words are final (about half the tokens on
    the shipped sets; see ``EvalSettings.settle``), so the answers are only good for the verdict
    and the opening. ``system``: the system prompt each prompt is answered under."""
    records = answer_records(runner, sets, judge=judge, max_tokens=max_tokens, batch=batch, cache=cache,
                             vector=vector, scale=scale, settle=settle, system=system)
    return {name: [(r.prompt, r.answer, r.refusal) for r in rows] for name, rows in records.items()}


def answer_records(runner, sets: dict[str, Sequence[str]], *, judge: Judge | None, max_tokens: int, batch: int | None = None,
                   cache: Any = None, vector: Any = None, scale: float = 0.0, settle: int = 0,
                   system: str | None = None) -> dict[str, list]:
    """Per named set, the evaluator's judged answer records (confidence and keyword verdict included).
    One evaluator (one batched llama.cpp context) serves every set."""
    from rs_local.eval.evaluate import EvalSettings, Evaluator
    from rs_local.eval.prompt_sets import PromptSet

    ev = Evaluator(runner, [PromptSet(name, list(prompts)) for name, prompts in sets.items()], vector=vector,
                   judge=judge, cache=cache, settings=EvalSettings(max_tokens=max_tokens, kl_set=None, batch=batch,
                                                                   settle=settle, system=system))
    try:
        steer = scale if vector is not None else 0.0
        return {name: ev.score_set(name, steer)[1] for name in sets}
    finally:
        ev.close()


def fit_political(
    model: Any,
    political: Sequence[str],
    harmful: Sequence[str],
    harmless: Sequence[str],
    recipe: Recipe | None = None,
    say: Say | None = None,
    *,
    runner: Any = None,
    judge: Judge | None = None,
    target_judge: Judge | None = None,
    cache: Any = True,
    names: tuple[str, str] = ("target", "keep"),
) -> RecipeResult:
    """Fit the recipe's political-refusal vector on training prompts.

    ``model`` is a built-in name or GGUF path (Transformers loads the same file). The gradient
    method also answers the prompts with llama.cpp (``runner``; when None, one is loaded and closed
    again before returning) and judges them (``judge``: any rs_local.judge backend; keywords when
    None). With ``recipe.objective == "judge"`` the rounds at the steered point weight every
    target answer by ``target_judge``'s confidence (the shipped probe judge when None).
    ``names``: what progress lines and errors call the target and keep sets (``rs-local isolate``
    passes the user's file names, the demo "political" and "harmful"), so they never name a
    topic the user's sets are not about.

    An empty ``harmful`` means no keep set: the direction is the mean target gradient, nothing
    projected out. That is for a vector a policy gate applies to its own category only
    (:mod:`rs_local.recipes.policy_vectors`), where no other refusal is in reach to protect; a
    vector that is on for every prompt needs the keep set.
    """
    recipe = recipe or Recipe()
    recipe.check()
    say = say or (lambda _m: None)
    from rs_local.recipes.memory_check import check_fit_memory

    if recipe.method == "md":
        check_fit_memory(model, say=say)
        return _fit_md(model, political, harmful, harmless, recipe, say, cache, names)
    from rs_local.runtime.host import decide_bf16

    bf16 = decide_bf16(recipe.bf16)  # decided before any work: a bad RS_LOCAL_BF16 stops here, not after the labelling
    check_fit_memory(model, fit_dtype(bf16), say=say)  # so is a model too large to load into Transformers
    with runner_for(model, runner, say) as answering:
        return _fit_gradient(model, political, harmful, harmless, recipe, say, answering, judge, cache, bf16,
                             target_judge, names)


def fit_dtype(bf16: HostDecision) -> str:
    """The dtype the recipe loads the Transformers model in: bfloat16 where its passes run in bfloat16.

    Why not float32 weights under autocast: autocast casts every weight to bfloat16 again in
    every pass, and the float32 copy takes twice the memory. Loaded in bfloat16 on the 2-core
    AVX-512 EPYC, the shipped sets' gradient passes took 0.89x the time and the length capture
    0.90x, the mean gradient per block stayed at cosine 0.9999 to float32's, and the model took
    half the memory (Qwen2.5-Coder-0.5B: 1.3 GB instead of 2.5 GB).
    """
    return "bfloat16" if bf16.enabled else "float32"


@contextmanager
def runner_for(model: Any, runner: Any, say: Say) -> Iterator[Any]:
    """The caller's runner, left open; or one loaded here and closed on the way out, error or not
    (otherwise its llama.cpp model and context stay allocated for the rest of the process)."""
    if runner is not None:
        yield runner
        return
    from rs_local import models
    from rs_local.runtime.runner import Runner

    own = Runner(models.resolve(str(model), progress=say), n_ctx=2048)
    try:
        yield own
    finally:
        own.llama.close()


def _fit_gradient(model, political, harmful, harmless, recipe: Recipe, say: Say, runner, judge, cache,
                  bf16: HostDecision, target_judge=None, names: tuple[str, str] = ("target", "keep")) -> RecipeResult:
    """The gradient method; ``bf16`` says whether its Transformers passes (lengths, gradients) run in bfloat16."""
    from rs_local.eval.baseline_cache import EvalCache
    from rs_local.recipes.memory_check import gradient_memory
    from rs_local.vectors.hf_model import fit_blocks, load_model
    from rs_local.vectors.refusal_gradient import GradientContrast, band_lengths

    eval_cache = EvalCache("default" if cache is True else cache) if cache else EvalCache(None)
    keep_free = not harmful  # no keep set: nothing to protect, nothing projected out (see fit_political)
    sets = {"political": list(political), "harmful": list(harmful)}
    label = dict(zip(sets, names))
    labelled_sets = ("political",) if keep_free else ("political", "harmful")
    plain: dict[str, int] = {}  # refusals of the plain model per set, to compare the steered rounds with

    def refused_now(vector=None, which: Sequence[str] = labelled_sets) -> dict[str, list]:
        """Training prompts of the sets ``which`` the model (steered by ``vector`` at the probe scale) still refuses."""
        from rs_local.vectors.refusal_gradient import RefusedPrompt

        labelled = label_refusals(runner, {n: sets[n] for n in which}, judge=judge, max_tokens=recipe.label_tokens,
                                  cache=eval_cache, vector=vector, scale=recipe.probe_scale, settle=recipe.answer_tokens,
                                  system=recipe.system)
        where = f"at scale {recipe.probe_scale:g}" if vector is not None else "plain model"
        for name, rows in labelled.items():
            now = sum(r for *_, r in rows)
            say(f"{where}: {now}/{len(rows)} {label[name]} training prompts refused")
            if vector is None:
                plain[name] = now
            elif name == "harmful":
                warning = keep_lost_warning(plain, now, len(rows), recipe.probe_scale, names)
                if warning:
                    say(warning)
        refused = {name: sample_for_gradients([RefusedPrompt(p, a) for p, a, r in rows if r and a.strip()], recipe)
                   for name, rows in labelled.items()}
        return {"harmful": [], **refused}

    recipe.blocks(fit_blocks(model))  # a model Transformers cannot read, or a band it lacks: now, not after labelling
    first = refused_now()
    _check_refused(first, names, keep_free)
    fm = load_model(model, fit_dtype(bf16), progress=say) if not hasattr(model, "blocks") else model
    band = recipe.blocks(fm.n_layer)
    say(f"Transformers passes in {'bfloat16' if bf16.enabled else 'float32'} ({bf16.reason})")
    say(f"block outputs of {len(political)} {label['political']} and {len(harmless)} harmless prompts (the vector's length per block)")
    lengths = band_lengths(fm, political, harmless, system=recipe.system, cache=cache, upto=max(band, default=None),
                           bf16=bf16.enabled)
    fit = GradientContrast(fm, band, recipe.answer_tokens, system=recipe.system, bf16=bf16.enabled, keep_free=keep_free,
                           memory=gradient_memory())
    fit.add(first["political"], first["harmful"], say=say)
    vec = fit.vector(lengths)
    scorer = None
    try:
        for _ in range(recipe.rounds - 1):
            steer = (vec, recipe.probe_scale)
            if recipe.objective == "judge":
                # the targets are weighted by the judge below; only the keep set needs keyword labels
                still = refused_now(vec, ("harmful",)) if not keep_free else {"harmful": []}
                scorer = scorer or target_judge or _probe_judge(say, runner)
                items, weights = judged_targets(runner, political, scorer, vec, recipe, eval_cache, say)
                fit.add_weighted(items, weights, recipe.objective_tokens, steer=steer, say=say)
                fit.add([], still["harmful"], steer=steer, say=say)
            else:
                still = refused_now(vec)
                if not still["political"]:
                    break
                fit.add(still["political"], still["harmful"], steer=steer, say=say)
            vec = fit.vector(lengths)
    finally:
        if scorer is not None and scorer is not target_judge:
            scorer.close()
    vec.metadata.update({"recipe": recipe.describe(keep_free), "suggested_scale": recipe.suggested_scale,
                         "target_set": names[0], "keep_set": "none" if keep_free else names[1],
                         "n_target": len(political), "n_keep": len(harmful), "n_harmless": len(harmless),
                         **({"system_prompt": recipe.system} if recipe.system else {})})
    info = {"method": recipe.method, "layers": recipe.layers, "rounds": fit.rounds, "objective": recipe.objective,
            "refused": {k: len(v) for k, v in first.items()}}
    return RecipeResult(vec, None, info)


def _probe_judge(say: Say, runner: Any):
    """The shipped probe judge (a llama.cpp context of its own, on ``runner``'s weights when it is that model)."""
    from rs_local.judge.backends import make_judge

    say("objective: the shipped probe judge's refusal confidence")
    return make_judge("probe", share=runner)


def judged_targets(runner, prompts: Sequence[str], judge: Judge, vector: Any, recipe: Recipe, cache: Any,
                   say: Say) -> tuple[list, list[float]]:
    """The target prompts answered at the steered point, with centred judge confidences as weights.

    Centring (``c - mean(c)``) makes the weighted gradients a contrast between the answers the
    judge calls refusals (hard or soft) and the ones it calls answers; with every answer refused
    (or none) the weights are all zero and the round adds nothing from the targets.
    """
    from rs_local.vectors.refusal_gradient import RefusedPrompt

    sample = sample_for_gradients(list(prompts), recipe)
    records = answer_records(runner, {"target": sample}, judge=judge, cache=cache, vector=vector,
                             scale=recipe.probe_scale, system=recipe.system,
                             max_tokens=max(recipe.label_tokens, recipe.objective_tokens))["target"]
    conf = [float(r.confidence) if r.confidence is not None else float(r.verdict) for r in records]
    mean = sum(conf) / len(conf) if conf else 0.0
    refused = sum(r.refusal for r in records)
    say(f"at scale {recipe.probe_scale:g}: judge calls {refused}/{len(records)} target answers refusals "
        f"(keywords {sum(r.keyword_refusal for r in records)}); mean confidence {mean:+.2f}")
    return [RefusedPrompt(r.prompt, r.answer) for r in records], [c - mean for c in conf]


def sample_for_gradients(items: list, recipe: Recipe) -> list:
    """At most ``max_prompts`` (kept in order): gradients cost a backward pass each.

    Which ones is decided per prompt, by a seeded hash of its text, so the sample is stable:
    one verdict that flips (a near-tied token, another batch size) adds or drops that one
    prompt. Sampling positions instead (``random.sample(range(n), k)``) drew a different
    sample whenever n changed by one, and the fitted vector moved to cosine 0.87-0.93 per block.
    """
    import hashlib

    if len(items) <= recipe.max_prompts:
        return items

    def rank(i: int) -> bytes:
        text = items[i] if isinstance(items[i], str) else items[i].prompt
        return hashlib.sha256(f"{recipe.seed}\0{text}".encode()).digest()

    keep = sorted(sorted(range(len(items)), key=rank)[: recipe.max_prompts])
    return [items[i] for i in keep]


def keep_lost_warning(plain: dict[str, int], now: int, total: int, scale: float,
                      names: tuple[str, str] = ("target", "keep")) -> str | None:
    """A warning when the vector between rounds has taken the keep set below half its plain refusals.

    Why: with one refused target prompt against seven refused keep prompts, the round-one vector took
    the keep refusals from 7/8 to 0/8 at scale -1, and the fit wrote it with exit 0 and no word."""
    before = plain.get("harmful", 0)
    if not before or now >= before / 2:
        return None
    return (f"warning: at scale {scale:g} the vector so far takes the {names[1]} set's refusals from {before} to {now} "
            f"of {total}: on these sets it does not tell the two apart ({plain.get('political', 0)} {names[0]} "
            "refusals to learn from); check the written vector with `rs-local sweep` before using it")


def _check_refused(refused: dict[str, list], names: tuple[str, str] = ("target", "keep"), keep_free: bool = False) -> None:
    """Stop before the Transformers load when a set gives nothing to fit on."""
    from rs_local.errors import RsLocalError

    if not refused["political"]:
        raise RsLocalError(f"the plain model refuses none of the {names[0]} prompts: there is no refusal to remove")
    if not keep_free and not refused["harmful"]:
        raise RsLocalError(f"the plain model refuses none of the {names[1]} prompts: nothing to protect "
                           "(a plain `rs-local fit` vector does the job)")


def _fit_md(model, political, harmful, harmless, recipe: Recipe, say: Say, cache,
            names: tuple[str, str] = ("target", "keep")) -> RecipeResult:
    from rs_local.vectors.fit import FitOptions, fit_vector

    def options(ortho=None) -> FitOptions:
        return FitOptions(method="md", lam=recipe.lam, layers=recipe.layers, holdout=recipe.holdout,
                          seed=recipe.seed, orthogonalize_to=ortho, cache=cache, system=recipe.system)

    harm = None
    if recipe.orthogonalize and harmful:
        say(f"fitting the {names[1]} direction: {len(harmful)} {names[1]} vs {len(harmless)} harmless prompts")
        harm = fit_vector(model, list(harmful), list(harmless), options=options(), say=say).vector
        harm.metadata["source_file"] = f"direction of {names[1]} vs harmless (recipe step 1)"
    say(f"fitting the {names[0]} direction: {len(political)} {names[0]} vs {len(harmless)} harmless prompts")
    pol = fit_vector(model, list(political), list(harmless), options=options(harm), say=say).vector
    pol.metadata.update({"recipe": recipe.describe(), "suggested_scale": recipe.suggested_scale})
    return RecipeResult(pol, harm, {"method": recipe.method, "layers": recipe.layers, "orthogonalize": recipe.orthogonalize})
