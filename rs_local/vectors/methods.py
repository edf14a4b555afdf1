"""Direction-fitting methods: pure numpy functions on one layer's activations.

Notation: ``pos`` are the refused (R) activations, ``neg`` the complied (C)
ones, each ``[n, d]``; weights are the judge's ``|c_i|``. Every method returns a direction
``[d]`` oriented so that positives project higher than negatives (adding it pushes toward
refusal; a negative scale removes refusal). Magnitudes are not meaningful here: the export
rule in :mod:`rs_local.vectors.fit` sets each layer's length.

Why ridge: with a few hundred prompts and ``d`` in the thousands the complied covariance is
singular, and directions of large compliant variance (topic, length, formatting) leak into a
plain mean difference. ``(Sigma_C + lambda I)^-1`` damps exactly those directions. We never
form an inverse: the covariance is eigendecomposed once (symmetric, so ``eigh``) and any
lambda is then a diagonal rescale, which also makes ``lambda=auto`` cheap.

Lambda is *relative*: the ridge added is ``lambda * trace(Sigma_C) / d`` (``lambda`` times
the mean eigenvalue of Sigma_C), so ``0.1`` means the same amount of shrinkage at every layer
and on every model even though residual norms grow with depth and differ between models.
``lambda -> inf`` gives back the mean difference's direction; ``lambda -> 0`` whitens fully.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("md", "pca", "rmd", "wrmd")
#: Relative lambdas tried by ``lambda=auto``.
LAMBDA_GRID = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0)


@dataclass
class Moments:
    """Weighted mean and (population) covariance of one prompt set at one layer."""

    mean: np.ndarray
    cov: np.ndarray | None
    weight: float
    n: int


def _as_weights(w: np.ndarray | None, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} activations")
    if np.any(w < 0) or not np.any(w > 0):
        raise ValueError("weights must be >= 0 and not all zero")
    return w


def moments(x: np.ndarray, w: np.ndarray | None = None, with_cov: bool = True) -> Moments:
    """Weighted mean and covariance ``sum w (x - mu)(x - mu)^T / sum w`` of ``x [n, d]``."""
    x = np.asarray(x, dtype=np.float64)
    w = _as_weights(w, x.shape[0])
    total = float(w.sum())
    mean = (w @ x) / total
    cov = None
    if with_cov:
        xc = x - mean
        cov = (xc * w[:, None]).T @ xc / total
    return Moments(mean, cov, total, x.shape[0])


def orient(direction: np.ndarray, pos: np.ndarray | Moments, neg: np.ndarray | Moments) -> np.ndarray:
    """Flip ``direction`` if needed so the positive set projects higher on average."""
    mp = pos.mean if isinstance(pos, Moments) else np.mean(pos, axis=0)
    mn = neg.mean if isinstance(neg, Moments) else np.mean(neg, axis=0)
    return direction if float(direction @ (mp - mn)) >= 0 else -direction


def mean_difference(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray | None = None, w_neg: np.ndarray | None = None) -> np.ndarray:
    """MD: ``mean(R) - mean(C)`` (weighted means when weights are given)."""
    return moments(pos, w_pos, with_cov=False).mean - moments(neg, w_neg, with_cov=False).mean


def pca_direction(pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA: first principal component of paired differences ``r_i - c_i``.

    Pairs are drawn by a seeded shuffle of both sets (truncated to the smaller one), so the
    result is reproducible. The component is taken *uncentered* (top right singular vector of
    the difference matrix): centering would remove the shared shift, which is the signal.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    rng = np.random.default_rng(seed)
    m = min(len(pos), len(neg))
    diffs = pos[rng.permutation(len(pos))[:m]] - neg[rng.permutation(len(neg))[:m]]
    _, _, vt = np.linalg.svd(diffs, full_matrices=False)
    return orient(vt[0], pos, neg)


def pca_from_moments(pos: Moments, neg: Moments) -> np.ndarray:
    """PCA without raw activations: top eigenvector of the expected second moment of random pairs.

    For independent pairs, ``E[(r-c)(r-c)^T] = Sigma_R + Sigma_C + delta delta^T``; this is
    what :func:`pca_direction` estimates, used when only streaming statistics were kept.
    """
    if pos.cov is None or neg.cov is None:
        raise ValueError("pca from moments needs both covariances")
    delta = pos.mean - neg.mean
    second = pos.cov + neg.cov + np.outer(delta, delta)
    _, vecs = np.linalg.eigh(second)
    return orient(vecs[:, -1], pos, neg)


class RidgeSolver:
    """Solves ``(Sigma + lam * tr(Sigma)/d * I) v = delta`` for many lambdas from one eigh.

    Symmetric eigendecomposition instead of an inverse: numerically stable for the
    rank-deficient covariances we always have (n < d), and every extra lambda costs one
    matrix-vector product.
    """

    def __init__(self, cov: np.ndarray):
        cov = np.asarray(cov, dtype=np.float64)
        cov = 0.5 * (cov + cov.T)
        vals, vecs = np.linalg.eigh(cov)
        self._set(np.clip(vals, 0.0, None), vecs, cov.shape[0])  # round-off can make null eigenvalues negative

    @classmethod
    def from_data(cls, x: np.ndarray, w: np.ndarray | None = None) -> "RidgeSolver":
        """Same solver from the complied activations themselves, in ``O(n^2 d)`` instead of ``O(d^3)``.

        With n prompts < d dimensions the covariance has rank < n: a thin SVD of the weighted,
        centred data gives its non-zero eigenpairs, and the ridge acts alone on the rest.
        """
        x = np.asarray(x, dtype=np.float64)
        w = _as_weights(w, x.shape[0])
        mean = (w @ x) / w.sum()
        scaled = (x - mean) * np.sqrt(w / w.sum())[:, None]
        _, s, vt = np.linalg.svd(scaled, full_matrices=False)
        obj = cls.__new__(cls)
        obj._set(s**2, vt.T, x.shape[1])
        return obj

    def _set(self, vals: np.ndarray, vecs: np.ndarray, d: int) -> None:
        self.vals, self.vecs = vals, vecs
        self.mean_eig = float(vals.sum()) / d  # trace / d: null eigenvalues count too
        self.complete = vecs.shape[1] == d

    def absolute_lambda(self, lam: float) -> float:
        """The ridge actually added for relative ``lam`` (lam times the mean eigenvalue)."""
        return lam * self.mean_eig

    def solve(self, delta: np.ndarray, lam: float) -> np.ndarray:
        ridge = self.absolute_lambda(lam)
        if ridge <= 0:
            if lam <= 0:
                raise ValueError("lambda must be > 0: the covariance is singular with fewer prompts than dimensions")
            ridge = lam  # a zero covariance (a single complied prompt): plain mean difference
        proj = self.vecs.T @ delta
        out = self.vecs @ (proj / (self.vals + ridge))
        if not self.complete:  # the part of delta outside the data's span sees only the ridge
            out += (delta - self.vecs @ proj) / ridge
        return out


def ridge_mean_difference(
    pos: np.ndarray,
    neg: np.ndarray,
    lam: float,
    w_pos: np.ndarray | None = None,
    w_neg: np.ndarray | None = None,
) -> np.ndarray:
    """RMD / WRMD: ``(Sigma_C + lambda' I)^-1 (mean R - mean C)`` with relative ``lambda``.

    Without weights this is RMD; with the judge's ``|c_i|`` as weights (weighted means and
    weighted complied covariance) it is WRMD.
    """
    mp = moments(pos, w_pos, with_cov=False)
    mn = moments(neg, w_neg, with_cov=False)
    return RidgeSolver.from_data(neg, w_neg).solve(mp.mean - mn.mean, lam)


def rmd(pos: np.ndarray, neg: np.ndarray, lam: float = 0.1) -> np.ndarray:
    """Ridge mean difference with equal weights."""
    return ridge_mean_difference(pos, neg, lam)


def wrmd(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, lam: float = 0.1) -> np.ndarray:
    """Weighted ridge mean difference (the paper's method); weights are ``|c_i|``."""
    return ridge_mean_difference(pos, neg, lam, w_pos, w_neg)


def unit(v: np.ndarray) -> np.ndarray:
    """``v / |v|`` (zero stays zero)."""
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def orthogonalize(v: np.ndarray, against: np.ndarray) -> np.ndarray:
    """Remove from ``v`` its component along ``against`` (e.g. keep harmful refusal intact)."""
    u = unit(np.asarray(against, dtype=np.float64))
    return v - float(v @ u) * u


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
