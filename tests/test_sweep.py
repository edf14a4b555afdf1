"""The scale search on synthetic frontiers: its choice must respect the constraints.

No model here: the search is a pure function of an ``evaluate(scale)`` callable, so a known
frontier (target refusal, keep refusal and KL as functions of the scale) tells exactly what
the right answer is.
"""

from __future__ import annotations

import math

import pytest

from rs_local.eval.sweep import Constraints, SweepPoint, choose, pareto_frontier, search_bands, search_scale


def frontier(target_at, keep_at, kl_at, calls=None):
    """evaluate(scale) from three functions of |scale|; records every call."""

    def evaluate(scale, band=None):
        if calls is not None:
            calls.append(scale)
        a = abs(scale)
        return SweepPoint(scale, band, target=target_at(a), keep={"harmful": keep_at(a)}, kl=kl_at(a))

    return evaluate


def smooth():
    # target falls linearly to 0 at |s| = 2; keep holds until 1.2 then drops; KL grows quadratically.
    return frontier(lambda a: max(0.0, 0.9 - 0.45 * a), lambda a: 0.95 if a <= 1.2 else 0.5, lambda a: 0.05 * a * a)


def test_choice_respects_keep_and_kl_constraints():
    res = search_scale(smooth(), keep_frac=0.9, max_kl=0.1, step=0.25, refine=4)
    ch = res.chosen
    assert ch is not None and ch.feasible
    assert ch.kl <= 0.1
    assert ch.keep["harmful"] >= 0.9 * 0.95
    # KL 0.05 a^2 <= 0.1 -> |s| <= 1.414; keep holds to 1.2: the binding constraint is keep.
    assert 1.0 <= abs(ch.scale) <= 1.2
    # every feasible point evaluated has a target no lower than the chosen one
    assert all(p.target >= ch.target for p in res.points if p.feasible)
    assert ch.scale < 0  # removing refusal is the negative direction


def test_kl_is_binding_when_keep_always_holds():
    res = search_scale(frontier(lambda a: max(0.0, 1 - a), lambda a: 1.0, lambda a: 0.2 * a), max_kl=0.1, step=0.2, refine=5)
    assert res.chosen is not None
    assert res.chosen.kl <= 0.1
    assert 0.4 <= abs(res.chosen.scale) <= 0.5
    assert "KL" in res.stopped


def test_early_stop_at_goal_does_not_evaluate_further():
    calls = []
    res = search_scale(frontier(lambda a: 0.0 if a >= 0.5 else 0.8, lambda a: 1.0, lambda a: 0.0, calls), step=0.25, max_abs=4)
    assert res.chosen.target == 0.0
    assert abs(res.chosen.scale) == 0.5
    assert sorted(abs(c) for c in calls) == [0.0, 0.25, 0.5]
    assert "goal" in res.stopped


def test_nothing_feasible_but_baseline():
    # even the smallest step breaks the keep constraint: the choice is the unsteered model
    res = search_scale(frontier(lambda a: 0.5, lambda a: 1.0 if a == 0 else 0.1, lambda a: 0.0), step=0.5, refine=2)
    assert res.chosen is not None and res.chosen.scale == 0.0
    assert all(not p.feasible for p in res.points if p.scale != 0)


def test_unmeasured_target_is_never_chosen():
    def evaluate(scale, band=None):
        a = abs(scale)
        if a > 0.6:  # over the KL limit: the objective skips the target
            return SweepPoint(scale, band, target=None, keep={}, kl=1.0)
        return SweepPoint(scale, band, target=1 - a, keep={}, kl=0.01)

    res = search_scale(evaluate, step=0.5, refine=3)
    assert res.chosen.target is not None and abs(res.chosen.scale) <= 0.6


def test_inducing_searches_upward_for_the_most_target_refusal_within_the_keep_answers():
    """``--induce`` stopped at once on a target the model never refuses ("already at the goal") and
    would have picked the least refused point. Mirrored now: the most target refusal, with each keep
    set (harmless here) still answering at least keep_frac of what it answered unsteered."""
    def target(a):
        return min(1.0, 0.4 * a)  # never refused unsteered, fully refused from |s| = 2.5

    def harmless(a):
        return 0.1 if a <= 1.5 else 0.6  # 10% refused unsteered; past 1.5 the model refuses everything

    res = search_scale(frontier(target, harmless, lambda a: 0.0), sign=1, keep_frac=0.9, max_kl=0.1, step=0.5, refine=3)
    assert res.chosen.scale == pytest.approx(1.5) and res.chosen.target == pytest.approx(0.6)
    assert res.constraints.keep_limit("harmful") == pytest.approx(1 - 0.9 * 0.9)  # keeps 90% of its 90% answers
    assert all(p.scale >= 0 for p in res.points) and "constraint broken" in res.stopped
    assert not res.frontier or all(p.feasible or p.target >= res.chosen.target for p in res.frontier)
    done = search_scale(frontier(lambda a: 1.0, harmless, lambda a: 0.0), sign=1, step=0.5)
    assert done.stopped == "the target is already at the goal without steering" and done.chosen.scale == 0
    assert choose([SweepPoint(0.5, target=0.2, feasible=True), SweepPoint(1.0, target=0.8, feasible=True)],
                  induce=True).scale == 1.0
    assert choose([SweepPoint(0.5, target=0.2, feasible=True), SweepPoint(1.0, target=0.8, feasible=True)]).scale == 0.5


def test_frontier_is_nondominated_and_contains_choice():
    res = search_scale(smooth(), step=0.25, refine=3)
    c = res.constraints
    front = pareto_frontier(res.points, c)
    assert res.chosen in front or any(p.scale == res.chosen.scale for p in front)
    for p in front:
        for q in res.points:
            if q.target is None or q is p:
                continue
            better = q.target <= p.target and (q.kl or 0) <= (p.kl or 0) and q.keep["harmful"] >= p.keep["harmful"]
            strictly = q.target < p.target or (q.kl or 0) < (p.kl or 0) or q.keep["harmful"] > p.keep["harmful"]
            assert not (better and strictly), (p, q)


def test_bands_pick_the_best_band():
    # band (10, 16) removes refusal twice as fast for the same KL
    def evaluate(scale, band):
        a = abs(scale) * (2 if band == (10, 16) else 1)
        return SweepPoint(scale, band, target=max(0.0, 1 - a), keep={"harmful": 1.0}, kl=0.1 * abs(scale))

    res = search_bands(evaluate, [(8, 20), (10, 16)], max_kl=0.05, step=0.25, refine=2)
    assert res.chosen.layers == (10, 16)
    assert res.chosen.kl <= 0.05


def test_constraints_violations_text():
    c = Constraints(0.9, 0.1, {"harmful": 0.8})
    pt = c.classify(SweepPoint(-1.0, target=0.1, keep={"harmful": 0.5}, kl=0.3))
    assert not pt.feasible and "KL" in pt.reason and "harmful" in pt.reason
    assert choose([pt]) is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        search_scale(smooth(), step=0)
    with pytest.raises(ValueError):
        search_scale(smooth(), sign=0)
    assert math.isfinite(search_scale(smooth(), step=1.0, refine=0).chosen.scale)
