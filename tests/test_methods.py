"""The fitting math on synthetic activations with a planted direction (numpy only, fast)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from direction_fit import fitted_direction
from rs_local.vectors import methods as M
from rs_local.vectors.capture import StreamingMoments
from rs_local.vectors.fit import FitOptionError, FitOptions
from rs_local.vectors.layers import LayerRow, auroc, cohens_d, parse_layers, pearson, select_band

D = 64


def planted(n_pos=80, n_neg=120, shift=3.0, seed=0, nuisance=0.0, spread=(12.0, 8.0)):
    """Complied ~ N(0, Sigma) with two high-variance nuisance axes; refused = same + shift * v.

    ``nuisance`` also moves the refused mean along a high-variance axis, the confound a
    ridge should discount.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    v, n1, n2 = basis[:, 0], basis[:, 1], basis[:, 2]
    scales = np.ones(D)
    scales[1], scales[2] = spread  # by default the variances along n1, n2 dwarf the signal's
    cov_root = basis * scales
    neg = rng.normal(size=(n_neg, D)) @ cov_root.T + 5.0  # common offset, like a residual stream
    pos = rng.normal(size=(n_pos, D)) @ cov_root.T + 5.0 + shift * v + nuisance * n1
    return pos, neg, v, n1


@pytest.mark.parametrize("method", M.METHODS)
def test_every_method_recovers_planted_direction(method):
    # Moderate nuisance spread: PCA of random pairs would otherwise pick the high-variance axis
    # (its known weakness, which the ridge methods are there to fix).
    # Enough prompts per dimension that the covariance estimate is good (n/d ~ 10).
    pos, neg, v, _ = planted(shift=4.0, n_pos=600, n_neg=600, spread=(2.0, 1.5))
    w_pos, w_neg = np.ones(len(pos)), np.ones(len(neg))
    d = fitted_direction(method, pos, neg, lam=0.1, w_pos=w_pos, w_neg=w_neg)
    assert M.cosine(d, v) > 0.9, f"{method}: cosine {M.cosine(d, v):.3f}"
    assert float((pos.mean(0) - neg.mean(0)) @ d) > 0, "positives must project higher"


def test_ridge_discounts_high_variance_confound():
    pos, neg, v, n1 = planted(shift=2.0, nuisance=6.0, n_pos=600, n_neg=600)
    md = M.mean_difference(pos, neg)
    rmd = M.rmd(pos, neg, lam=0.3)
    assert abs(M.cosine(md, n1)) > 0.8  # the plain difference is mostly the confound
    assert M.cosine(rmd, v) > 0.9 > M.cosine(md, v)


def test_wrmd_with_equal_weights_is_rmd():
    pos, neg, _, _ = planted()
    a = M.wrmd(pos, neg, np.full(len(pos), 0.7), np.full(len(neg), 0.7), lam=0.3)
    b = M.rmd(pos, neg, lam=0.3)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_wrmd_weights_change_the_answer():
    pos, neg, v, _ = planted()
    w = np.ones(len(pos))
    w[: len(w) // 2] = 0.2
    assert not np.allclose(M.wrmd(pos, neg, w, np.ones(len(neg)), 0.1), M.rmd(pos, neg, 0.1))


def test_rmd_tends_to_md_as_lambda_grows():
    pos, neg, _, _ = planted(nuisance=4.0)
    md = M.mean_difference(pos, neg)
    cosines = [M.cosine(M.rmd(pos, neg, lam), md) for lam in (0.01, 1.0, 100.0, 1e6)]
    assert cosines == sorted(cosines)
    assert cosines[-1] > 0.99999
    assert cosines[0] < 0.9


def test_lambda_is_relative_to_covariance_scale():
    pos, neg, _, _ = planted(nuisance=3.0)
    a = M.rmd(pos, neg, 0.1)
    b = M.rmd(pos * 50.0, neg * 50.0, 0.1)
    assert M.cosine(a, b) > 0.999999


def test_solver_from_data_matches_covariance_solver():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, D)) * np.linspace(0.1, 5, D)  # n < d: singular covariance
    w = rng.uniform(0.2, 1.0, size=20)
    delta = rng.normal(size=D)
    full = M.RidgeSolver(M.moments(x, w).cov)
    thin = M.RidgeSolver.from_data(x, w)
    assert full.mean_eig == pytest.approx(thin.mean_eig, rel=1e-9)
    for lam in (0.01, 0.1, 10.0):
        np.testing.assert_allclose(thin.solve(delta, lam), full.solve(delta, lam), rtol=1e-6, atol=1e-9)
    # and it really is (Sigma + r I)^-1 delta
    sigma = M.moments(x, w).cov
    r = full.absolute_lambda(0.1)
    np.testing.assert_allclose((sigma + r * np.eye(D)) @ full.solve(delta, 0.1), delta, rtol=1e-6, atol=1e-8)


def test_weighted_moments_match_numpy():
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(30, 5)), rng.uniform(0.1, 1, 30)
    m = M.moments(x, w)
    np.testing.assert_allclose(m.mean, np.average(x, axis=0, weights=w))
    np.testing.assert_allclose(m.cov, np.cov(x.T, aweights=w, bias=True))


def test_pca_is_seeded_and_oriented():
    pos, neg, v, _ = planted(shift=4.0, n_pos=50, n_neg=70, spread=(2.0, 1.5))
    a, b = M.pca_direction(pos, neg, seed=1), M.pca_direction(pos, neg, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, M.pca_direction(pos, neg, seed=2))
    flipped = M.pca_direction(neg, pos, seed=1)
    assert float((neg.mean(0) - pos.mean(0)) @ flipped) > 0


def test_pca_from_moments_agrees_with_raw_pca():
    pos, neg, v, _ = planted(shift=4.0, n_pos=400, n_neg=400, spread=(2.0, 1.5))
    from_m = M.pca_from_moments(M.moments(pos), M.moments(neg))
    assert M.cosine(from_m, v) > 0.9
    assert M.cosine(from_m, M.pca_direction(pos, neg)) > 0.95


def test_orthogonalize_removes_component():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=D), rng.normal(size=D)
    o = M.orthogonalize(a, b)
    assert abs(o @ b) < 1e-9
    np.testing.assert_allclose(o + (a @ M.unit(b)) * M.unit(b), a)


def test_unknown_method():
    with pytest.raises(FitOptionError, match="unknown method"):
        FitOptions(method="lda").check()


# ----------------------------------------------------------------------------- streaming stats


def test_streaming_moments_equal_batch_moments():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(37, 3, 8)) * 4 + 100.0  # large offset: naive sums of squares lose digits
    w = rng.uniform(0.1, 1.0, 37)
    sm = StreamingMoments(3, 8)
    for lo in range(0, 37, 5):
        sm.update(x[lo : lo + 5], w[lo : lo + 5])
    for layer in range(3):
        ref = M.moments(x[:, layer], w)
        np.testing.assert_allclose(sm.mean[layer], ref.mean, rtol=1e-12)
        np.testing.assert_allclose(sm.cov[layer], ref.cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sm.mean_norm, np.linalg.norm(x, axis=2).mean(0))
    again = StreamingMoments.from_arrays(sm.to_arrays())
    np.testing.assert_array_equal(again.cov, sm.cov)


# ----------------------------------------------------------------------------- layer statistics


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 5, 15).astype(float), rng.integers(0, 5, 11).astype(float)  # many ties
    brute = np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a, b)])
    assert auroc(a, b) == pytest.approx(brute)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_cohens_d_and_pearson():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    assert cohens_d(b, a) == pytest.approx(3.0)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)


def rows_from(metric):
    return [LayerRow(layer=i, cohen_d=m, auroc=0.5) for i, m in enumerate(metric)]


def test_band_rule_contiguous_around_peak():
    metric = [9.0, 1, 1, 2, 3, 5, 6, 7, 6.5, 5.8, 3, 1, 1, 1, 1, 1, 1, 1, 1, 20.0]  # 0 and last are not steerable
    band = select_band(rows_from(metric), n_layer=20)
    assert band == [6, 7, 8, 9]  # >= 0.8 * 7 = 5.6, contiguous, block 0 and 19 ignored


def test_band_is_capped():
    band = select_band(rows_from([1.0] * 30), n_layer=30)
    assert len(band) == 12 and band == list(range(band[0], band[0] + 12))


def test_band_uses_score_correlation_when_present():
    rows = rows_from([1, 5, 5, 5, 1, 1, 1, 1, 1, 1])
    for r in rows:
        r.pearson_r = -0.9 if r.layer == 7 else 0.1
    assert 7 in select_band(rows, n_layer=10)


def test_parse_layers():
    assert parse_layers("auto", 24) is None
    assert parse_layers("8-10,12", 24) == [8, 9, 10, 12]
    assert parse_layers("all", 4) == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range: block 0 cannot be steered"):
        parse_layers("0-3", 1 << 20)  # the recipe's syntax check, before the model is known
    with pytest.raises(ValueError, match="out of range: this model's steerable blocks are 1-23"):
        parse_layers("20-24", 24)
    with pytest.raises(ValueError, match="bad layer spec"):
        parse_layers("8-x", 24)
