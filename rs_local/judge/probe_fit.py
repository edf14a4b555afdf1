"""Fitting a linear refusal probe: ridge direction, calibration, grouped cross-validation.

Plain numpy on purpose: a few hundred labelled answers and one block's activations (hundreds
of dimensions) are a small problem. A ridge-regression direction is solved for every penalty
from one eigendecomposition per fold (full logistic regression in 896 dimensions was 25x
slower for the same held-out accuracy on our labelled answers), then a one-dimensional
logistic fit turns its score into P(refusal). The runtime stays torch-free.

Cross-validation folds are grouped by prompt: answers to the same question look alike, and a
probe evaluated on a prompt it was trained on would report an accuracy it does not have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rs_local.errors import RsLocalError


@dataclass
class LinearProbe:
    """P(refusal) = sigmoid(a * (w . (x - mean) / scale) + b), decided at ``threshold``.

    ``w`` is a ridge-regression direction on standardised features; ``a`` and ``b`` calibrate
    its score into a probability (a one-dimensional logistic fit), so 2P - 1 can serve as the
    judge's confidence in [-1, 1] the way the paper's scores expect.
    """

    weight: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    slope: float = 1.0
    bias: float = 0.0
    threshold: float = 0.5

    def score(self, x: np.ndarray) -> np.ndarray:
        """The uncalibrated ridge score (positive leans refusal)."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight

    def prob(self, x: np.ndarray) -> np.ndarray:
        """P(refusal) for one row or a matrix of rows."""
        z = self.slope * self.score(x) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    return (x - mean) / scale, mean, scale


def ridge_directions(x: np.ndarray, y: np.ndarray, lams: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Ridge-regression directions for several penalties from one eigendecomposition.

    Targets are +-1 centred; ``lam`` is relative to the number of rows, so it means the same
    for 100 or 1000 answers. Returns (mean, scale, [direction per lam]).
    """
    z, mean, scale = _standardise(np.asarray(x, np.float64))
    t = np.where(np.asarray(y) > 0.5, 1.0, -1.0)
    solved = ridge_solve(z, (t - t.mean())[:, None], lams)
    return mean, scale, [solved[lam][0] for lam in lams]


def ridge_solve(z: np.ndarray, t: np.ndarray, lams) -> dict[float, list[np.ndarray]]:
    """``(Z'Z + lam n I)^-1 Z't`` for every column of ``t`` and every ``lam``, from one eigendecomposition.

    With fewer rows than features (the usual case: a few hundred answers or prompts, 896
    dimensions) the n x n Gram matrix is decomposed instead, using
    ``(Z'Z + aI)^-1 Z't = Z'(ZZ' + aI)^-1 t``: the same directions, far cheaper. Returns
    ``{lam: [direction per column of t]}``.
    """
    n, d = z.shape
    if n < d:
        evals, evecs = np.linalg.eigh(z @ z.T)
        proj = evecs.T @ t
        return {lam: list((z.T @ (evecs @ (proj / (evals + lam * n)[:, None]))).T) for lam in lams}
    evals, evecs = np.linalg.eigh(z.T @ z)
    proj = evecs.T @ (z.T @ t)
    return {lam: list((evecs @ (proj / (evals + lam * n)[:, None])).T) for lam in lams}


def calibrate(score: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Slope and bias of a 1-D logistic fit of labels on scores (Newton, lightly penalised)."""
    y = np.asarray(y, np.float64)
    a = np.stack([score, np.ones_like(score)], axis=1)
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ theta, -60, 60)))
        grad = a.T @ (p - y) + 1e-3 * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + 1e-3 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(theta[0]), float(theta[1])


def fit_probe(x: np.ndarray, y: np.ndarray, lam: float) -> LinearProbe:
    """Ridge direction plus calibration, on all of ``x``."""
    mean, scale, (w,) = ridge_directions(x, y, (lam,))
    probe = LinearProbe(w, mean, scale)
    probe.slope, probe.bias = calibrate(probe.score(x), y)
    return probe


def group_folds(groups: list[str], k: int) -> np.ndarray:
    """Fold index per row; all rows of a group (a prompt) share a fold, assigned by hash."""
    return np.array([int(hashlib.sha256(g.encode("utf-8")).hexdigest(), 16) % k for g in groups])


def check_folds(groups: list[str], y: np.ndarray, k: int) -> None:
    """One line when grouped cross-validation cannot score some rows: their fold's prompts hold every
    row of one class (or every row), so no probe can be fitted without them. Their score stayed 0.5,
    and the accuracy reported was the keywords' alone (24 rows sharing one prompt: "83.3%")."""
    folds = group_folds(groups, k)
    for f in range(k):
        held = folds == f
        if held.any() and len(set(np.asarray(y)[~held])) < 2:
            raise RsLocalError(f"the labelled rows cover {len(set(groups))} distinct prompt(s), and cross-validation "
                               f"by prompt cannot score {int(held.sum())} of the {len(groups)} rows (without their "
                               "prompts the rest lack refusals or answers): label answers to more prompts")


@dataclass
class Selection:
    """What cross-validation chose and how well it did (accuracy over held-out folds)."""

    layer: int
    lam: float
    threshold: float
    cv_accuracy: float
    table: list[dict]
    tuned_accuracy: float = 0.0  # a cut tuned on the other folds, judged on each held-out fold


def cross_validate(
    features: dict[int, np.ndarray],
    y: np.ndarray,
    groups: list[str],
    lams: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    k: int = 5,
    forced: np.ndarray | None = None,
) -> Selection:
    """Pick the block and penalty with the best grouped k-fold accuracy; then the threshold.

    ``forced`` marks rows the judge calls refusals whatever the probe says (a stock refusal
    phrase in the opening): every accuracy here is that of the judge as it runs, ``forced or
    P > threshold``, so the threshold is not spent on refusals the keywords already catch.
    Out-of-fold scores are calibrated with the training folds' own calibration, and the
    threshold maximises accuracy over the pooled out-of-fold probabilities of the chosen
    setting, so every choice is made on predictions for prompts the probe did not see.
    """
    y = np.asarray(y, np.float64)
    forced = np.zeros(len(y), bool) if forced is None else np.asarray(forced, bool)
    folds = group_folds(groups, k)
    oof = {(layer, lam): np.full(len(y), 0.5) for layer in features for lam in lams}
    for layer, x in sorted(features.items()):
        for f in range(k):
            train, test = folds != f, folds == f
            if not test.any() or len(set(y[train])) < 2:
                continue
            mean, scale, dirs = ridge_directions(x[train], y[train], lams)
            for lam, w in zip(lams, dirs):
                probe = LinearProbe(w, mean, scale)
                probe.slope, probe.bias = calibrate(probe.score(x[train]), y[train])
                oof[(layer, lam)][test] = probe.prob(x[test])
    table = [{"layer": layer, "lambda": lam, "cv_accuracy": float(np.mean(((p > 0.5) | forced) == (y > 0.5)))}
             for (layer, lam), p in sorted(oof.items())]
    # Ties go to the stronger penalty (smoother probe), then the earlier block.
    best = max(table, key=lambda row: (row["cv_accuracy"], row["lambda"], -row["layer"]))
    chosen = oof[(best["layer"], best["lambda"])]
    threshold, tuned = choose_threshold(chosen, y, forced, folds, k)
    acc = float(np.mean(((chosen > threshold) | forced) == (y > 0.5)))
    return Selection(best["layer"], best["lambda"], threshold, acc, table, tuned)


def choose_threshold(prob: np.ndarray, y: np.ndarray, forced: np.ndarray, folds: np.ndarray, k: int) -> tuple[float, float]:
    """0.5 unless tuning the cut earns its keep on data it was not tuned on.

    A cut tuned on pooled out-of-fold probabilities fits their noise: on our labels it moved to
    0.05-0.12 and called a third of real answers refusals. So each fold is judged at the cut
    tuned on the other folds; only if that beats 0.5 is the cut tuned on all of them used.
    Returns (threshold, held-out accuracy of the tuned cut).
    """
    pred = np.zeros(len(y), bool)
    for f in range(k):
        rest, held = folds != f, folds == f
        if held.any() and rest.any():
            cut = best_threshold(prob[rest], y[rest], forced[rest])
            pred[held] = (prob[held] > cut) | forced[held]
    tuned = float(np.mean(pred == (y > 0.5)))
    natural = float(np.mean(((prob > 0.5) | forced) == (y > 0.5)))
    return (best_threshold(prob, y, forced) if tuned > natural else 0.5), tuned


def best_threshold(prob: np.ndarray, y: np.ndarray, forced: np.ndarray | None = None) -> float:
    """The cut on P(refusal) with the highest accuracy of ``forced or P > cut``: 0.5 if it is
    among the best, else the middle of the best run of cuts."""
    forced = np.zeros(len(prob), bool) if forced is None else np.asarray(forced, bool)
    candidates = np.unique(np.concatenate([[0.5], prob]))
    accs = np.array([np.mean(((prob > c) | forced) == (y > 0.5)) for c in candidates])
    if accs[candidates == 0.5][0] == accs.max():
        return 0.5  # calibrated probabilities: keep the natural cut unless another one does better
    best = np.flatnonzero(accs == accs.max())
    lo, hi = candidates[best[0]], candidates[best[-1]]
    cut = float((lo + hi) / 2)
    return min(max(cut, 0.05), 0.95)
