"""Fit a refusal-steering ControlVector from two prompt sets: capture, fit, choose layers, scale.

The pipeline, and why each step is there:

1. **Split** each set into train and held-out parts (seeded). Directions are fitted on the
   train part and judged on the held-out part, because with a few hundred prompts in
   hundreds of dimensions any direction separates its own training data.
2. **Capture** activations after every block (:mod:`rs_local.vectors.capture`), raw when
   they fit in memory, streaming moments otherwise.
3. **Fit** one direction per block with the chosen method (:mod:`rs_local.vectors.methods`),
   optionally orthogonalised to another vector (e.g. a harmful-refusal vector to keep).
4. **Analyse** each block on the held-out split (:mod:`rs_local.vectors.layers`) and choose
   the band (``auto``) or take the user's layers; ``lambda=auto`` picks the relative ridge
   with the best held-out separation.
5. **Refit** the chosen blocks on all prompts and **scale** them (rule below).

Scale rule (``scale_rule = "gap/cos/k"``): block ``l`` is exported as ``u_l * g_l / k``
with ``u_l`` the unit direction, ``k`` the number of exported blocks and
``g_l = |md_l| / cos(u_l, md_l)``, where ``md_l = mean R - mean C`` at that block (weighted
means for WRMD). ``g_l`` is the length along ``u_l`` whose component along the mean
difference equals the whole refused-vs-complied gap, so ``--scale -1`` pushes the
activations, along the direction in which refused and complied prompts actually differ, by
one mean gap in total, summed over the band, whichever method chose ``u_l``.

Why this rule, from measurements on Qwen2.5-Coder-0.5B (China-political vs harmless
prompts; first-token refusal probability 0.67 unsteered, greedy answers checked too):

* The model responds to the component along the mean difference: MD and WRMD removed the
  refusal at a similar size of that component although the WRMD direction is only ~0.3
  cosine to MD (its other components point along low-variance directions, by design, and
  matter little). A rule based on the residual norm alone made one scale ~4x stronger for
  MD than for WRMD; one based on the gap along ``u_l`` itself made WRMD do nothing even at
  ``-10``.
* Additions at successive blocks stack, but less than linearly, so longer bands need
  somewhat larger scales: WRMD on blocks 14-16 was partial at -0.8, removed the refusal at
  -1 with fluent answers, degraded at -1.25 and was gibberish at -1.6; over blocks 8-20, MD was partial at -1 and WRMD
  partial at -1.2, removing at about -2.3 while keeping most harmful-request refusals.
* ``cos`` is floored at 0.1 so a direction nearly orthogonal to the mean difference (e.g.
  after ``orthogonalize_to``) is not blown up without bound.

So useful scales lie around ``-0.5`` to ``-2`` (sweep them: ``rs-local sweep``); positive
scales induce refusal. The layer table records each block's mean activation norm next to
the exported norm, to show how large the push is relative to the residual stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from rs_local.callbacks import Progress, Say
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.prompts import check_disjoint
from rs_local.vectors import methods as M
from rs_local.vectors.capture import Activations, StreamingMoments, capture
from rs_local.vectors.control_vector import ControlVector
from rs_local.vectors.hf_model import FitModel, load_model
from rs_local.vectors.layers import LayerRow, auroc, cohens_d, parse_layers, pearson, select_band, table_to_metadata

SCALE_RULE = "gap/cos/k"
MIN_COS = 0.1
MAX_HOLDOUT = 256
MIN_PER_SIDE = 2  # below this per split, evaluate in-sample
TOP_SHARE = 1 / 3  # lambda=auto scores a lambda by its top third of blocks

class FitOptionError(RsLocalError):
    """An option that cannot work with this model or these prompts (bad layers, lambda ...)."""


@dataclass
class FitOptions:
    """Everything that decides the fitted vector (all of it goes into the provenance)."""

    method: str = "wrmd"
    lam: float | str = 0.1  # relative ridge, or "auto"
    layers: str | Sequence[int] = "auto"
    position: str = "last"
    holdout: float = 0.2
    seed: int = 0
    batch_size: int = 16
    system: str | None = None
    orthogonalize_to: ControlVector | None = None
    cache: Any = True  # False, True (rs-local home) or a directory

    def check(self) -> None:
        if self.method not in M.METHODS:
            raise FitOptionError(f"unknown method '{self.method}' (choose from {', '.join(M.METHODS)})")
        if isinstance(self.lam, str) and self.lam != "auto":
            raise FitOptionError(f"lambda must be a number > 0 or 'auto', not '{self.lam}'")
        if not isinstance(self.lam, str) and not float(self.lam) > 0:
            raise FitOptionError("lambda must be > 0 (it is relative to the mean eigenvalue of Sigma_C) or 'auto'")
        if not 0 <= self.holdout < 1:
            raise FitOptionError("holdout must be in [0, 1)")


@dataclass
class SetData:
    """One prompt set's activations, split, with weights and judge scores."""

    train: Activations
    test: Activations | None
    w_train: np.ndarray
    w_test: np.ndarray
    s_train: np.ndarray | None
    s_test: np.ndarray | None
    train_moments: StreamingMoments = field(init=False)


@dataclass
class FitResult:
    """The fitted vector plus what a report or plot needs."""

    vector: ControlVector
    table: list[LayerRow]
    layers: list[int]
    lam: float | None
    lam_scores: dict[float, float]
    positive: SetData
    negative: SetData
    in_sample: bool


# ----------------------------------------------------------------------------- splitting


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out index split; no held-out part when the set is too small."""
    n_test = min(MAX_HOLDOUT, int(round(n * holdout)))
    if n_test < MIN_PER_SIDE or n - n_test < MIN_PER_SIDE:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _capture_set(
    fm: FitModel, prompts: Sequence[str], scores, weighted: bool, opts: FitOptions, seed: int, label: str, with_cov: bool,
    watch: tuple[Say, Progress | None],
) -> SetData:
    """Capture one set split into train / held-out; WRMD weights are ``|c_i|`` (1 otherwise)."""
    tr, te = split_indices(len(prompts), opts.holdout, seed)
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    if s is not None and len(s) != len(prompts):
        raise ValueError(f"{len(s)} scores for {len(prompts)} {label} prompts")
    w = np.abs(s) if (weighted and s is not None) else np.ones(len(prompts))
    common = dict(position=opts.position, batch_size=opts.batch_size, system=opts.system, cache=opts.cache, progress=watch[1])
    watch[0](f"capturing {label} prompts: {len(tr)} to fit on, {len(te)} held out")
    # Raw when it fits in memory; otherwise capture() streams weighted moments instead.
    train = capture(fm, [prompts[i] for i in tr], weights=w[tr], with_cov=with_cov, **common)
    test = capture(fm, [prompts[i] for i in te], keep_raw=True, **common) if len(te) else None
    data = SetData(train, test, w[tr], w[te], None if s is None else s[tr], None if s is None else s[te])
    # With raw activations the covariance is never formed (methods work on the data itself).
    data.train_moments = train.moments if train.moments is not None else _moments_from_raw(train.raw, w[tr], False)
    return data


def _moments_from_raw(raw: np.ndarray, w: np.ndarray, with_cov: bool) -> StreamingMoments:
    sm = StreamingMoments(raw.shape[1], raw.shape[2], with_cov=with_cov)
    sm.update(raw, w)
    return sm


def _all_moments(data: SetData) -> StreamingMoments:
    """Moments over train and held-out prompts together (for the final refit)."""
    sm = data.train_moments.copy()
    if data.test is not None and data.test.raw is not None:
        sm.update(data.test.raw, data.w_test)
    return sm


# ----------------------------------------------------------------------------- directions


class _LayerFitter:
    """Fits one block's direction for a method, reusing the ridge eigendecomposition."""

    def __init__(self, method: str, pos: StreamingMoments, neg: StreamingMoments, pos_raw, neg_raw, seed: int, neg_w=None):
        self.method, self.pos, self.neg, self.pos_raw, self.neg_raw, self.seed = method, pos, neg, pos_raw, neg_raw, seed
        self.neg_w = neg_w
        self._solvers: dict[int, M.RidgeSolver] = {}

    def moments(self, sm: StreamingMoments, layer: int) -> M.Moments:
        cov = sm.m2[layer] / sm.weight if sm.m2 is not None else None
        return M.Moments(sm.mean[layer], cov, sm.weight, sm.n)

    def solver(self, layer: int) -> M.RidgeSolver:
        """Ridge solver for a block: from raw data when kept, else from the streamed covariance."""
        if layer not in self._solvers:
            if self.neg_raw is None:
                self._solvers[layer] = M.RidgeSolver(self.moments(self.neg, layer).cov)
            elif self.neg_raw.shape[0] < self.neg_raw.shape[2]:
                self._solvers[layer] = M.RidgeSolver.from_data(self.neg_raw[:, layer], self.neg_w)
            else:
                self._solvers[layer] = M.RidgeSolver(M.moments(self.neg_raw[:, layer], self.neg_w).cov)
        return self._solvers[layer]

    def direction(self, layer: int, lam: float) -> np.ndarray:
        pos, neg = self.moments(self.pos, layer), self.moments(self.neg, layer)
        if self.method == "md":
            return pos.mean - neg.mean
        if self.method == "pca":
            if self.pos_raw is not None and self.neg_raw is not None:
                return M.pca_direction(self.pos_raw[:, layer], self.neg_raw[:, layer], seed=self.seed)
            return M.pca_from_moments(pos, neg)
        return self.solver(layer).solve(pos.mean - neg.mean, lam)


def _directions(fitter: _LayerFitter, layers: Sequence[int], lam: float, ortho: ControlVector | None) -> dict[int, np.ndarray]:
    out = {}
    for layer in layers:
        v = fitter.direction(layer, lam)
        if ortho is not None and layer in ortho.directions:
            v = M.orthogonalize(v, ortho.directions[layer].astype(np.float64))
        out[layer] = M.unit(v)
    return out


# ----------------------------------------------------------------------------- evaluation


def _eval_sets(pos: SetData, neg: SetData, in_sample: bool):
    """Activations (and scores) the directions are judged on."""
    if in_sample:
        return pos.train.raw, neg.train.raw, pos.s_train, neg.s_train
    return pos.test.raw, neg.test.raw, pos.s_test, neg.s_test


def _rows(units: dict[int, np.ndarray], pos_x, neg_x, pos_s, neg_s) -> list[LayerRow]:
    rows = []
    for layer, u in units.items():
        pp, pn = pos_x[:, layer] @ u, neg_x[:, layer] @ u
        r = None
        if pos_s is not None and neg_s is not None:
            r = pearson(np.concatenate([pp, pn]), np.concatenate([pos_s, neg_s]))
        rows.append(LayerRow(layer=layer, cohen_d=cohens_d(pp, pn), auroc=auroc(pp, pn), pearson_r=r))
    return rows


def _lambda_score(rows: list[LayerRow]) -> float:
    """Mean held-out Cohen's d over the best third of blocks."""
    ds = sorted((r.cohen_d for r in rows if math.isfinite(r.cohen_d)), reverse=True)
    top = ds[: max(1, int(len(ds) * TOP_SHARE))]
    return float(np.mean(top)) if top else -math.inf


def _choose_lambda(fitter, layers, opts, eval_sets, say: Say) -> tuple[float | None, dict[float, float]]:
    if opts.method not in ("rmd", "wrmd"):
        return None, {}
    if not (isinstance(opts.lam, str) and opts.lam == "auto"):
        return float(opts.lam), {}
    scores = {}
    for lam in M.LAMBDA_GRID:
        scores[lam] = _lambda_score(_rows(_directions(fitter, layers, lam, opts.orthogonalize_to), *eval_sets))
    best = max(scores, key=lambda k: (round(scores[k], 6), k))  # ties: the more regularised
    say(f"lambda=auto: {best} (held-out d of top blocks: " + ", ".join(f"{k:g}:{v:.2f}" for k, v in scores.items()) + ")")
    return best, scores


# ----------------------------------------------------------------------------- main entry


def fit_vector(
    model: str | FitModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    pos_scores: Sequence[float] | None = None,
    neg_scores: Sequence[float] | None = None,
    options: FitOptions | None = None,
    dtype: str = "float32",
    provenance: dict[str, Any] | None = None,
    say: Say | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Fit a refusal direction: ``positive`` (refused, R) versus ``negative`` (complied, C).

    ``pos_scores``/``neg_scores`` are the judge's refusal confidences c in [-1, 1]: WRMD
    weights them by ``|c|`` and the layer table reports ``|r|`` with them. ``say`` gets status
    lines, ``progress(done, total)`` the prompts captured of each set (the CLI draws the bar).
    """
    opts = options or FitOptions()
    opts.check()
    say = say or (lambda _m: None)
    fm = model if isinstance(model, FitModel) else load_model(model, dtype=dtype)
    if len(positive) < 2 or len(negative) < 2:
        raise FitOptionError(f"need at least 2 prompts per set (got {len(positive)} positive, {len(negative)} negative)")
    check_disjoint([("the positive set", positive), ("the negative set", negative)])  # zeros, exit 0, before
    _parse_layers(opts.layers, fm.n_layer)  # fail before the forward passes, not after
    _check_ortho(fm, opts.orthogonalize_to)
    ridge = opts.method in ("rmd", "wrmd")
    pca_cov = opts.method == "pca"
    weighted = opts.method == "wrmd"
    pos = _capture_set(fm, positive, pos_scores, weighted, opts, opts.seed, "positive", pca_cov, (say, progress))
    neg = _capture_set(fm, negative, neg_scores, weighted, opts, opts.seed + 1, "negative", ridge or pca_cov, (say, progress))
    in_sample = pos.test is None or neg.test is None
    if in_sample:
        say("sets too small for a held-out split: layer statistics are in-sample (optimistic)")
        if pos.train.raw is None or neg.train.raw is None:
            raise ValueError("in-sample evaluation needs raw activations")
    candidates = list(range(fm.n_layer))
    fitter = _LayerFitter(opts.method, pos.train_moments, neg.train_moments, pos.train.raw, neg.train.raw, opts.seed, neg.w_train)
    eval_sets = _eval_sets(pos, neg, in_sample)
    lam, lam_scores = _choose_lambda(fitter, candidates, opts, eval_sets, say)
    table = _rows(_directions(fitter, candidates, lam or 0.0, opts.orthogonalize_to), *eval_sets)
    chosen = _choose_layers(opts.layers, table, fm.n_layer)
    vector = _final_vector(fm, pos, neg, opts, lam, chosen, table)
    vector.metadata.update(_provenance(fm, opts, lam, chosen, positive, negative, in_sample, provenance, table))
    return FitResult(vector, table, chosen, lam, lam_scores, pos, neg, in_sample)


def _parse_layers(spec: str | Sequence[int], n_layer: int) -> list[int] | None:
    text = spec if isinstance(spec, str) else ",".join(str(int(x)) for x in spec)
    try:
        return parse_layers(text, n_layer)
    except ValueError as exc:
        raise FitOptionError(str(exc)) from None


def _check_ortho(fm: FitModel, ortho: ControlVector | None) -> None:
    if ortho is not None and ortho.n_embd != fm.n_embd:
        where = ortho.metadata.get("source_file", "--orthogonalize-to vector")
        raise VectorFileError(where, f"has n_embd {ortho.n_embd}, the model has {fm.n_embd}")


def _choose_layers(spec: str | Sequence[int], table: list[LayerRow], n_layer: int) -> list[int]:
    chosen = _parse_layers(spec, n_layer)
    if chosen is None:
        chosen = select_band(table, n_layer)
    for row in table:
        row.selected = row.layer in chosen
    return chosen


def _final_vector(fm, pos: SetData, neg: SetData, opts: FitOptions, lam, chosen, table) -> ControlVector:
    """Refit the chosen blocks on all prompts and apply the ``gap/cos/k`` scale rule."""
    pos_all, neg_all = _all_moments(pos), _all_moments(neg)
    pos_raw = concat_raw(pos)
    neg_raw = concat_raw(neg)
    neg_w = np.concatenate([neg.w_train, neg.w_test])
    fitter = _LayerFitter(opts.method, pos_all, neg_all, pos_raw, neg_raw, opts.seed, neg_w)
    units = _directions(fitter, chosen, lam or 0.0, opts.orthogonalize_to)
    norms = (pos_all.mean_norm * pos_all.n + neg_all.mean_norm * neg_all.n) / (pos_all.n + neg_all.n)
    directions = {}
    by_layer = {r.layer: r for r in table}
    for row in table:
        row.act_norm = float(norms[row.layer])
    for layer, u in units.items():
        vec = u * (_gap_length(pos_all.mean[layer] - neg_all.mean[layer], u) / len(units))
        directions[layer] = vec.astype(np.float32)
        by_layer[layer].exported_norm = float(np.linalg.norm(vec))
    return ControlVector(directions, fm.model_hint, {})


def _gap_length(md: np.ndarray, u: np.ndarray) -> float:
    """Length along unit ``u`` whose component along ``md`` equals ``|md|`` (cos floored at MIN_COS)."""
    gap = float(np.linalg.norm(md))
    cos = float(md @ u) / gap if gap > 0 else 1.0
    return gap / max(cos, MIN_COS)


def concat_raw(data: SetData) -> np.ndarray | None:
    if data.train.raw is None:
        return None
    if data.test is None:
        return data.train.raw
    return np.concatenate([data.train.raw, data.test.raw])


def _provenance(fm: FitModel, opts: FitOptions, lam, chosen, positive, negative, in_sample, extra, table) -> dict[str, Any]:
    from rs_local import __version__

    meta: dict[str, Any] = {
        "method": opts.method,
        "lambda": lam if lam is not None else "n/a",
        "lambda_rule": "relative: ridge = lambda * trace(Sigma_C) / d",
        "layers": ",".join(str(x) for x in chosen),
        "layer_rule": "auto" if opts.layers == "auto" else "manual",
        "position": opts.position,
        "scale_rule": SCALE_RULE,
        "model": fm.name,
        "model_file": fm.path.name,
        "model_id": fm.identity,
        "n_layer": fm.n_layer,
        "dtype": fm.dtype,
        "n_positive": len(positive),
        "n_negative": len(negative),
        "holdout": 0.0 if in_sample else opts.holdout,
        "seed": opts.seed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rs_local_version": __version__,
        "layer_table": table_to_metadata(table),
    }
    if opts.system:
        meta["system_prompt"] = opts.system
    if opts.orthogonalize_to is not None:
        meta["orthogonalized_to"] = str(opts.orthogonalize_to.metadata.get("source_file", "a control vector"))
    meta.update(extra or {})
    return meta
