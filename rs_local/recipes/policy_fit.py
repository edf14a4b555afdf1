"""Fitting a policy: category probes on llama.cpp activations, and a direction per steered category.

Torch-free on purpose: the activations come from llama.cpp itself (the GGUF the user runs,
through :class:`rs_local.runtime.activations.BlockReader`), so what the probe learns is what
the gate will read at run time, quantisation included.

Probes: one-vs-rest ridge probes (the estimator, calibration and grouped folds of
:mod:`rs_local.judge.probe_fit`, the judge's own fitting code) on one shared block; the block and penalty are chosen by grouped k-fold accuracy of the
argmax decision (balanced over categories, so a small category counts as much as a big one),
and the accuracy reported per category is the out-of-fold accuracy of the gate's decision
(argmax that clears the threshold): every prompt is classified by probes that never saw it.

What the probes read: the mean of the block's output over the chat template's tokens after the
user's message (``<|im_end|>\n<|im_start|>assistant\n`` on ChatML: 5 tokens), not the last
token alone; the probabilities are divided by their sum before the threshold (``normalised``).
Measured on the conditional-steering benchmark's fitting split (Qwen2.5-Coder-0.5B, 5
categories, grouped 5-fold), the best block and penalty reached 95.7% mean per-category
accuracy (worst category 91%) with the last token, 94.5% with the mean over the user's tokens,
96.9% (worst 95%) with the template tail; with raw one-vs-rest probabilities at threshold 0.5,
3-7% of prompts abstained because every probe, calibrated on the rows it was fitted on, was
unsure; normalised, none did.

Directions: by default the steered categories get refusal-gradient vectors, fitted before
:func:`fit_policy` with Transformers (:mod:`rs_local.recipes.policy_vectors`): a ``remove``
category the gradient of its own refused prompts, a ``refuse`` category the refusal source's
(a category the model refuses, e.g. ``harmful``). What :func:`fit_policy` itself fits for a
category still without a vector (``--fit-vectors mean-difference``) is torch-free: for
``refuse`` the difference of means between the refusal source and the baseline, the model's
general refusal direction applied on the chosen topic only; for ``remove`` the difference of
means between the category and the baseline (on the default model that one steers into
looping nonsense at -1; see benchmarks/RESULTS.md). Any of them can be replaced by an existing vector
file (``--vector NAME=PATH``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rs_local.callbacks import Say

import numpy as np

from rs_local.errors import RsLocalError
from rs_local.judge.probe_fit import calibrate, group_folds, ridge_solve
from rs_local.runtime.policy_file import ACTION_SIGN, ACTIONS, Category, Policy, advice_line, normalised
from rs_local.templating import one_turn
from rs_local.vectors.control_vector import ControlVector

LAMS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}")


@dataclass
class CategorySpec:
    """A category as the user gives it: ``NAME=FILE:ACTION``, its prompts, optionally a vector and scale."""

    name: str
    path: Path
    action: str
    prompts: list[str] = field(default_factory=list)
    vector: ControlVector | None = None
    scale: float | None = None


def parse_category(text: str) -> CategorySpec:
    """``political=pol.jsonl:remove`` -> CategorySpec (prompts not loaded yet).

    A shipped prompt set may be named instead of a file (``gambling:refuse``, as ``eval --set
    gambling``), so the quickstart runs from any directory, not only from a checkout.
    """
    from rs_local.eval.prompt_sets import BUILTIN_SETS, builtin_path

    name, sep, rest = text.partition("=")
    if not sep:
        builtin, colon, action = text.rpartition(":")
        if colon and builtin in BUILTIN_SETS:
            name, sep, rest = builtin, "=", f"{builtin_path(builtin)}:{action}"
    path, colon, action = rest.rpartition(":")
    if not sep or not colon or not path:
        raise RsLocalError(f"bad --category '{text[:80]}': expected NAME=FILE:ACTION (e.g. political=pol.jsonl:remove) "
                           f"or BUILTIN:ACTION ({', '.join(BUILTIN_SETS)})")
    if not _NAME.fullmatch(name):
        raise RsLocalError(f"bad category name '{name[:48]}': letters, digits, _ . - only")
    if action not in ACTIONS:
        raise RsLocalError(f"--category {name}: unknown action '{action[:20]}' (expected {', '.join(ACTIONS)})")
    return CategorySpec(name, Path(path), action)


def load_category_prompts(specs: Sequence[CategorySpec]) -> None:
    """Read every category's prompts; refuse duplicate names, empty files and overlapping files."""
    from rs_local.prompts import check_disjoint, load_prompts

    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RsLocalError(f"category {dup[0]} is given twice")
    if len(specs) < 2:
        raise RsLocalError("a policy needs at least two categories (one of them the prompts to leave alone)")
    for spec in specs:
        spec.prompts = load_prompts(spec.path)  # PromptSetError (file: no prompts) when empty
    check_disjoint([(f"{spec.path} (category {spec.name})", spec.prompts) for spec in specs])


def default_probe_blocks(n_layer: int) -> list[int]:
    """Candidates for the probe block: every other block of the middle half (where decisions form)."""
    step = max(1, n_layer // 12)
    return list(range(max(1, n_layer // 4), min(n_layer - 1, 3 * n_layer // 4) + 1, step))


def default_steer_blocks(n_layer: int) -> list[int]:
    """The middle third (8-16 on the 24-block default model, the recipe's band)."""
    return list(range(max(1, round(n_layer / 3)), min(n_layer - 1, round(2 * n_layer / 3)) + 1))


def template_tail(runner: Any, system: str | None = None) -> int:
    """How many tokens the chat template puts after the user's message (at least 1).

    Those tokens (end of turn, the assistant header) attend to the whole request and are the
    same for every prompt, so their mean is what the probes read. Found by formatting a chat
    around a marker and tokenising what follows it.
    """
    marker = "\u2063rs-local-marker\u2063"
    text = runner.format_chat(one_turn(marker, system))
    if text.count(marker) != 1:
        return 1
    suffix = text.split(marker, 1)[1]
    n = len(runner.llama.tokenize(suffix.encode("utf-8"), add_bos=False, special=True)) if suffix else 0
    return max(1, min(n, 16))


#: Tokens the probe's reader holds at most (its own llama.cpp context beside the model's).
READER_CTX = 4096


def check_prompt_lengths(runner: Any, specs: Sequence[CategorySpec], system: str | None = None) -> None:
    """Every category prompt must fit the probe's reader; checked after the model loads, before any
    reading. A longer one failed after the vectors were fitted, in a line naming neither file nor prompt."""
    from rs_local.runtime.runner import longest_prompt

    limit = min(runner.n_ctx, READER_CTX)
    for spec in specs:
        longest_prompt(runner, [one_turn(p, system) for p in spec.prompts], limit, f"the probe reads at most {limit:,}",
                       str(spec.path))


def read_features(runner: Any, prompts: Sequence[str], blocks: Sequence[int], *, system: str | None = None,
                  pool_tokens: int = 1, say: Say | None = None) -> dict[int, np.ndarray]:
    """``{block: float64[len(prompts), n_embd]}``: the mean of each prompt's last ``pool_tokens``
    tokens' rows, read from llama.cpp.

    Prompts are read as the gate will read them: one user message under the model's chat
    template (with ``system`` if given).
    """
    from rs_local.runtime.activations import BlockReader

    out = {b: np.zeros((len(prompts), runner.n_embd)) for b in blocks}
    with BlockReader(runner, blocks, n_ctx=min(runner.n_ctx, READER_CTX), tail=pool_tokens) as reader:
        for i, p in enumerate(prompts):
            rows = reader.read(one_turn(p, system))
            for b in blocks:
                out[b][i] = rows[b]
            if say and (i + 1) % 50 == 0:
                say(f"read {i + 1}/{len(prompts)} prompts")
    return out


@dataclass
class ProbeChoice:
    """The chosen block and penalty, out-of-fold predictions and the table they were chosen from."""

    layer: int
    lam: float
    oof: np.ndarray  # [n, K] out-of-fold calibrated probabilities at the chosen setting
    table: list[dict]


def ovr_ridge(x: np.ndarray, y: np.ndarray, k_classes: int, lams: Sequence[float]):
    """One-vs-rest ridge directions for every class and penalty from one eigendecomposition.

    The estimator of :func:`rs_local.judge.probe_fit.ridge_directions` (standardised features,
    +-1 centred targets, penalty ``lam * n``), with the decomposition shared by the K targets
    through :func:`rs_local.judge.probe_fit.ridge_solve`. Returns (mean, std, {lam: [K directions]}).
    """
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    t = np.stack([np.where(y == c, 1.0, -1.0) for c in range(k_classes)], axis=1)
    return mean, std, ridge_solve((x - mean) / std, t - t.mean(axis=0), lams)


def _fit_ovr(x: np.ndarray, y: np.ndarray, k_classes: int, lams: Sequence[float]):
    """One-vs-rest probes for each penalty: (mean, std, {lam: [(w, slope, bias) per class]})."""
    mean, std, dirs = ovr_ridge(x, y, k_classes, lams)
    z = (x - mean) / std
    per_lam = {lam: [(w, *calibrate(z @ w, (y == c).astype(float))) for c, w in enumerate(dirs[lam])] for lam in lams}
    return mean, std, per_lam


def _probs(x: np.ndarray, mean, std, probes) -> np.ndarray:
    """Calibrated one-vs-rest probabilities, normalised to sum to 1 (the ``normalised`` decision)."""
    z = (x - mean) / std
    return normalised(np.stack([1 / (1 + np.exp(-np.clip(a * (z @ w) + b, -60, 60))) for w, a, b in probes], axis=1))


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, k_classes: int) -> list[float]:
    """Accuracy within each class (a category's held-out accuracy)."""
    return [float(np.mean(pred[y == c] == c)) if np.any(y == c) else float("nan") for c in range(k_classes)]


def _check_fold_spread(specs: Sequence[CategorySpec], k: int) -> None:
    """Refuse, before any reading, a category whose prompts all fall in one cross-validation fold.

    That fold's training part has no example of the category, so its rows cannot be scored: they
    kept uniform scores and were reported as held-out accuracy (and as keep prompts "steered")."""
    folds = group_folds([p for s in specs for p in s.prompts], k)
    at = 0
    for spec in specs:
        if len(set(folds[at:at + len(spec.prompts)].tolist())) < 2:
            raise RsLocalError(f"{spec.path}: category {spec.name}'s {len(spec.prompts)} distinct prompt(s) all fall in "
                               f"one of the {k} cross-validation folds, which then cannot score it: add prompts "
                               "or change --folds")
        at += len(spec.prompts)


def choose_probe(features: dict[int, np.ndarray], y: np.ndarray, groups: list[str], k_classes: int,
                 lams: Sequence[float] = LAMS, k: int = 5) -> ProbeChoice:
    """Pick block and penalty by grouped k-fold accuracy of the argmax (mean of per-category accuracies)."""
    folds = group_folds(groups, k)
    best: tuple | None = None
    table = []
    for layer, x in sorted(features.items()):
        oof = {lam: np.full((len(y), k_classes), 1.0 / k_classes) for lam in lams}
        for f in range(k):
            train, test = folds != f, folds == f
            if not test.any():
                continue
            if len(set(y[train])) < k_classes:  # its rows would keep uniform scores: made-up accuracy
                raise RsLocalError(f"a category has too few prompts for {k}-fold cross-validation (one fold "
                                   "holds all of them): add prompts or lower --folds")
            mean, std, per_lam = _fit_ovr(x[train], y[train], k_classes, lams)
            for lam in lams:
                oof[lam][test] = _probs(x[test], mean, std, per_lam[lam])
        for lam in lams:
            accs = balanced_accuracy(oof[lam].argmax(axis=1), y, k_classes)
            score = float(np.nanmean(accs))
            table.append({"layer": layer, "lambda": lam, "cv_accuracy": round(score, 4)})
            key = (score, lam, -layer)  # ties: stronger penalty, then the earlier block
            if best is None or key > best[0]:
                best = (key, layer, lam, oof[lam])
    assert best is not None
    return ProbeChoice(best[1], best[2], best[3], table)


def routed(oof: np.ndarray, threshold: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Each row's decision from out-of-fold probabilities: the likeliest category, -1 when its
    probability is below its threshold (one for all, or one per category as the gate applies them)."""
    best = oof.argmax(axis=1)
    thr = np.broadcast_to(np.asarray(threshold, np.float64), (oof.shape[1],))
    return np.where(oof.max(axis=1) >= thr[best], best, -1)


#: thresholds :func:`threshold_advice` tries for a steering category that takes ``keep`` prompts
ADVICE_THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def threshold_advice(oof: np.ndarray, y: np.ndarray, specs: Sequence[CategorySpec],
                     thresholds: np.ndarray) -> dict[str, list[dict[str, float | int]]]:
    """For each steering category that cross-validation sends ``keep`` prompts to, what raising its
    threshold would have done: ``{category: [{threshold, keep_steered, routed}, ...]}``, the current
    threshold first, then each of :data:`ADVICE_THRESHOLDS` above it that lets fewer ``keep`` prompts
    in than the one before (``routed``: the share of the category's own prompts still sent to it).

    Why a frontier and not one number: the threshold that keeps every keep prompt out may cost most
    of the category (0.99 routed 65% of the alarming benchmark's gambling prompts); the user weighs
    that, on the same out-of-fold decisions the warning comes from.
    """
    keep = np.array([s.action == "keep" for s in specs])
    out: dict[str, list[dict[str, float | int]]] = {}
    for j, spec in enumerate(specs):
        if spec.action == "keep":
            continue

        def at(t: float) -> dict[str, float | int]:
            thr = thresholds.copy()
            thr[j] = t
            picked = routed(oof, thr)
            share = float(np.mean(picked[y == j] == j)) if np.any(y == j) else 0.0
            return {"threshold": t, "keep_steered": int(np.sum(keep[y] & (picked == j))), "routed": round(share, 4)}

        points = [at(float(thresholds[j]))]
        for t in ADVICE_THRESHOLDS:
            if t > thresholds[j] and points[-1]["keep_steered"] > 0:
                point = at(t)
                if point["keep_steered"] < points[-1]["keep_steered"]:
                    points.append(point)
        if len(points) > 1:
            out[spec.name] = points
    return out


def steered_keep(picked: np.ndarray, y: np.ndarray, specs: Sequence[CategorySpec]) -> dict[str, dict[str, int]]:
    """``{keep category: {steering category: prompts}}``: the ``keep`` prompts cross-validation
    routed (``picked``, from :func:`routed`) to a category that steers (``remove`` or ``refuse``).

    Why it is reported apart from accuracy: a harmful request routed to ``harmless`` is still
    kept, but one routed to a ``remove`` category is steered away from refusal. An over-refusal
    category whose prompts share words with harmful requests ("kill a process") is where this
    happens, and the fit should say so before the policy is used.
    """
    out: dict[str, dict[str, int]] = {}
    for i, spec in enumerate(specs):
        if spec.action != "keep":
            continue
        went = {specs[j].name: int(np.sum((y == i) & (picked == j)))
                for j in range(len(specs)) if specs[j].action != "keep"}
        went = {name: n for name, n in went.items() if n}
        if went:
            out[spec.name] = went
    return out


def mean_difference_vector(features: dict[int, np.ndarray], pos: np.ndarray, neg: np.ndarray,
                           blocks: Sequence[int], hint: str, meta: dict) -> ControlVector:
    """Per block, mean(pos rows) - mean(neg rows): the direction from ``neg`` toward ``pos``."""
    dirs = {b: features[b][pos].mean(axis=0) - features[b][neg].mean(axis=0) for b in blocks}
    return ControlVector(dirs, hint, meta)


def _pick(specs: Sequence[CategorySpec], name: str | None, fallbacks: Sequence[str], what: str) -> int | None:
    names = [s.name for s in specs]
    if name is not None:
        if name not in names:
            raise RsLocalError(f"{what} '{name}' is not one of the categories ({', '.join(names)})")
        return names.index(name)
    for cand in fallbacks:
        if cand in names:
            return names.index(cand)
    return None


#: What a ``remove`` category without a vector file steers against (see :func:`fit_policy`).
REMOVE_DIRECTIONS = ("category", "refusal")


def check_roles(specs: Sequence[CategorySpec], baseline: str | None, refusal_from: str | None) -> tuple[int | None, int | None]:
    """Indices of the baseline and refusal-source categories; an error when a fitted direction needs one that is missing.

    Cheap, so the CLI calls it before loading the model.
    """
    needs_md = [s for s in specs if s.action != "keep" and s.vector is None]
    base = _pick(specs, baseline, ("benign", "harmless", "ok"), "--baseline")
    if needs_md and base is None:
        raise RsLocalError("name the benign category the directions are measured from with --baseline")
    if needs_md and base is not None and specs[base].action != "keep":  # a steered category measured from itself
        raise RsLocalError(f"the baseline category {specs[base].name} is a '{specs[base].action}' category; the "
                           "baseline is prompts the model answers as they are (a 'keep' category; --baseline)")
    source = _pick(specs, refusal_from, ("harmful",), "--refusal-from")
    if any(s.action == "refuse" for s in needs_md) and source is None:
        raise RsLocalError("a refuse category needs a category the model refuses: name it with --refusal-from")
    return base, source


def fit_policy(runner: Any, specs: Sequence[CategorySpec], *, probe_blocks: Sequence[int] | None = None,
               steer_blocks: Sequence[int] | None = None, baseline: str | None = None, refusal_from: str | None = None,
               threshold: float = 0.5, default_scale: float = 1.0, system: str | None = None, k: int = 5,
               pool_tokens: int | None = None, remove_direction: str = "category", say: Say | None = None,
               thresholds: dict[str, float] | None = None) -> Policy:
    """Fit a policy on the categories' prompts (loaded into ``specs``) with ``runner``'s model.

    ``pool_tokens``: how many final prompt tokens the probes read (default: the chat template's
    tokens after the user's message, :func:`template_tail`). ``thresholds``: a category's own
    confidence threshold where it differs from ``threshold``. ``remove_direction``: what a ``remove``
    category without a vector file steers against: ``"category"`` (its own prompts' mean minus the
    baseline's) or ``"refusal"`` (the refusal source's mean minus the baseline's, the direction a
    ``refuse`` category steers along; the gate keeps it off the refusal source's own prompts).
    """
    if remove_direction not in REMOVE_DIRECTIONS:
        raise ValueError(f"remove_direction must be one of {', '.join(REMOVE_DIRECTIONS)}")
    say = say or (lambda _m: None)
    probe_blocks = list(probe_blocks or default_probe_blocks(runner.n_layer))
    steer_blocks = list(steer_blocks or default_steer_blocks(runner.n_layer))
    needs_md = [s for s in specs if s.action != "keep" and s.vector is None]
    base, source = check_roles(specs, baseline, refusal_from)
    _check_fold_spread(specs, k)
    prompts = [p for s in specs for p in s.prompts]
    y = np.array([i for i, s in enumerate(specs) for _ in s.prompts])
    blocks = sorted(set(probe_blocks) | (set(steer_blocks) if needs_md else set()))
    pool = pool_tokens if pool_tokens is not None else template_tail(runner, system)
    say(f"reading blocks {blocks[0]}-{blocks[-1]} (mean of the last {pool} tokens) for {len(prompts)} prompts in llama.cpp")
    feats = read_features(runner, prompts, blocks, system=system, pool_tokens=pool, say=say)
    choice = choose_probe({b: feats[b] for b in probe_blocks}, y, prompts, len(specs), k=k)
    thr = np.array([(thresholds or {}).get(s.name, threshold) for s in specs], np.float64)
    gated = routed(choice.oof, thr)
    accs = balanced_accuracy(gated, y, len(specs))
    say(f"probe block {choice.layer} (lambda {choice.lam:g}): held-out accuracy "
        + ", ".join(f"{s.name} {a:.0%}" for s, a in zip(specs, accs)))
    leaks = steered_keep(gated, y, specs)
    by_name = {s.name: s for s in specs}
    for keep, went in leaks.items():
        say(f"warning: in cross-validation {sum(went.values())} of {len(by_name[keep].prompts)} '{keep}' (keep) "
            "prompts went to " + ", ".join(f"'{name}' ({by_name[name].action})" for name in went)
            + ": the policy would steer prompts like them; add prompts that mark the boundary, or raise that "
            "category's threshold")
    advice = threshold_advice(choice.oof, y, specs, thr)
    for name, points in advice.items():
        say(f"  {advice_line(name, points)}")
    x = feats[choice.layer]
    mean, std, per_lam = _fit_ovr(x, y, len(specs), [choice.lam])
    hint = str(runner.llama.metadata.get("general.architecture", ""))
    cats = []
    for i, (spec, (w, slope, bias)) in enumerate(zip(specs, per_lam[choice.lam])):
        vec, origin = spec.vector, (spec.vector.source or "") if spec.vector is not None else ""
        if spec.action != "keep" and vec is None:
            pos = source if spec.action == "refuse" or (remove_direction == "refusal" and source is not None) else i
            vec = mean_difference_vector(feats, y == pos, y == base, steer_blocks, hint,
                                         {"method": "mean difference", "from": specs[base].name, "to": specs[pos].name})
            origin = f"mean difference {specs[pos].name} - {specs[base].name}"
        scale = 0.0 if spec.action == "keep" else (spec.scale if spec.scale is not None
                                                   else ACTION_SIGN[spec.action] * abs(default_scale))
        cats.append(Category(spec.name, spec.action, w, slope, bias, float(thr[i]), scale,
                             vec if spec.action != "keep" else None, accs[i], len(spec.prompts), origin))
    below = gated < 0
    training = {"probe_lambda": choice.lam, "folds": k, "probe_table": choice.table,
                "heldout_below_threshold": round(float(below.mean()), 4), "keep_steered": leaks,
                "threshold_advice": advice, "system": system,
                "steer_blocks": steer_blocks, "files": {s.name: str(s.path) for s in specs}}
    return Policy(cats, choice.layer, mean, std, hint, runner.n_embd, runner.n_layer, runner.path.name, training,
                  pool_tokens=pool, decision="normalised")


def check_refuses(runner: Any, spec: CategorySpec, *, sample: int = 16, max_tokens: int = 24,
                  system: str | None = None) -> int:
    """Refuse a ``remove`` category the model does not refuse: there would be nothing to remove.

    Answers up to ``sample`` of its prompts (short, greedy, batched, with the Runner's steering, which
    ``policy fit`` leaves off: the plain model) and counts
    keyword refusals; none at all is a one-line error naming the file. Returns the count.
    ``system``: the system prompt the gate will run under (a refusal may depend on it).
    """
    from rs_local.judge.keywords import find_refusal_phrase
    from rs_local.runtime.batched import BatchEngine

    from rs_local.eval.engines import slot_size

    asks = [one_turn(p, system) for p in spec.prompts[:sample]]
    with BatchEngine(runner, n_seq=8, seq_ctx=slot_size(runner, [(str(spec.path), asks)], max_tokens, 512)) as engine:
        gens = engine.generate_many(asks, max_tokens=max_tokens)
    n = sum(find_refusal_phrase(g.text) is not None for g in gens)
    if n == 0:
        raise RsLocalError(f"{spec.path}: the model refuses none of {len(asks)} of these prompts (keyword judge): "
                           f"nothing for '{spec.name}:remove' to remove")
    return n


def check_scale_sign(spec: CategorySpec) -> None:
    """A scale must point the way the action says (negative removes refusal, positive induces it)."""
    if spec.scale is None or spec.action == "keep":
        return
    if spec.scale == 0 or np.sign(spec.scale) != ACTION_SIGN[spec.action]:
        want = "negative" if spec.action == "remove" else "positive"
        raise RsLocalError(f"--scale {spec.name}={spec.scale:g}: a {spec.action} category takes a {want} scale")
