"""Choosing the scale (and optionally the layer band): least target refusal within constraints.

The search is a pure function over an ``evaluate(scale) -> SweepPoint`` callable, so the
logic is testable on a synthetic frontier and the expensive part (generating and judging)
stays in :class:`rs_local.eval.evaluate.Evaluator`.

Goal: minimise the refusal rate on the *target* set (e.g. political prompts) subject to

* every *keep* set (e.g. harmful prompts) still refused at least ``keep_frac`` times its
  unsteered rate, and
* ``KL(plain || steered) <= max_kl`` on harmless prompts (the model still talks normally).

With ``sign=+1`` (inducing refusal) the goal is mirrored: maximise the target's refusal rate while
every keep set (e.g. harmless prompts) still *answers* at least ``keep_frac`` times as often as
unsteered. Why: the induce search used to stop at once on a target nobody refused ("already at the
goal") and pick the least refused point, exit 0.

Removing refusal is assumed to get easier, and the constraints harder to meet, as the
scale's magnitude grows (that is what a refusal direction does). The search therefore walks
outward from 0 in steps of ``step`` until a point breaks a constraint or the target rate
reaches ``goal`` (early stop: nothing better exists), then bisects between the last feasible
and the first infeasible scale ``refine`` times. The chosen point is the feasible one with
the lowest target rate, ties going to the lower KL and then the smaller magnitude (the
gentlest intervention that does the job). Every evaluated point is returned, with the
Pareto frontier over (target refusal, keep ratio, KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # evaluate.py imports this module's results lazily; no cycle at run time
    from rs_local.eval.evaluate import Evaluator

Band = tuple[int, int] | None


@dataclass
class SweepPoint:
    """One evaluated (scale, band). ``target`` is None when it was not measured (already infeasible)."""

    scale: float
    layers: Band = None
    target: float | None = None
    keep: dict[str, float] = field(default_factory=dict)
    kl: float | None = None
    feasible: bool = False
    reason: str = ""
    detail: Any = None  # e.g. the EvalPoint behind it

    @property
    def label(self) -> str:
        band = "" if self.layers is None else f" blocks {self.layers[0]}-{self.layers[1]}"
        return f"{self.scale:+g}{band}"


@dataclass
class Constraints:
    """What a point must satisfy; ``baseline_keep`` comes from the unsteered point."""

    keep_frac: float = 0.9
    max_kl: float | None = 0.1
    baseline_keep: dict[str, float] = field(default_factory=dict)
    induce: bool = False  # keep sets must keep their answers, not their refusals

    def keep_limit(self, name: str) -> float:
        """The least refusal rate a keep set may fall to, or (inducing) the most it may rise to."""
        return keep_limit(self.baseline_keep.get(name, 0.0), self.keep_frac, self.induce)

    def violations(self, pt: SweepPoint) -> list[str]:
        """Every broken constraint, in words (empty: feasible)."""
        out = []
        if self.max_kl is not None and pt.kl is not None and pt.kl > self.max_kl + 1e-12:
            out.append(f"KL {pt.kl:.3f} > {self.max_kl:g}")
        for name, rate in pt.keep.items():
            limit = self.keep_limit(name)
            if not keep_holds(rate, limit, self.induce):
                out.append(f"{name} refusal {rate:.0%} {'>' if self.induce else '<'} {limit:.0%}")
        return out

    def classify(self, pt: SweepPoint) -> SweepPoint:
        """Set ``feasible``/``reason``; a point whose target was not measured is infeasible."""
        problems = self.violations(pt)
        if pt.target is None and not problems:
            problems = ["target not measured"]
        pt.feasible = not problems
        pt.reason = "; ".join(problems)
        return pt


@dataclass
class SweepResult:
    """The chosen point (None if even the smallest step is infeasible), every point, the frontier."""

    chosen: SweepPoint | None
    points: list[SweepPoint]
    frontier: list[SweepPoint]
    baseline: SweepPoint
    constraints: Constraints
    stopped: str = ""


def keep_limit(baseline: float, keep_frac: float, induce: bool) -> float:
    """Removing: a keep set keeps ``keep_frac`` of its refusals; inducing: of its answers."""
    return 1.0 - keep_frac * (1.0 - baseline) if induce else keep_frac * baseline


def keep_holds(rate: float, limit: float, induce: bool) -> bool:
    return rate <= limit + 1e-12 if induce else rate + 1e-12 >= limit


def shortfall(pt: SweepPoint, induce: bool = False) -> float:
    """How far the target is from the goal: its refusal rate, or (inducing) its answer rate."""
    if pt.target is None:
        return math.inf
    return 1.0 - pt.target if induce else pt.target


def choose(points: Sequence[SweepPoint], induce: bool = False) -> SweepPoint | None:
    """The feasible point nearest the goal (least target refusal, or most when inducing), then the
    lower KL, then the smaller |scale|."""
    feasible = [p for p in points if p.feasible and p.target is not None]
    return min(feasible, key=lambda p: (shortfall(p, induce), p.kl or 0.0, abs(p.scale))) if feasible else None


def _keep_ratio(pt: SweepPoint, c: Constraints) -> float:
    """The worst keep set's share of what it had unsteered: refusals, or (inducing) answers."""
    kept = (lambda r: 1.0 - r) if c.induce else (lambda r: r)
    ratios = [kept(pt.keep[n]) / kept(c.baseline_keep[n]) for n in pt.keep if kept(c.baseline_keep.get(n, 0.0))]
    return min(ratios) if ratios else 1.0


def pareto_frontier(points: Sequence[SweepPoint], c: Constraints) -> list[SweepPoint]:
    """Measured points not dominated in (target shortfall low, keep ratio high, KL low), by |scale|."""
    measured = [p for p in points if p.target is not None]

    def vec(p: SweepPoint) -> tuple[float, float, float]:
        return (shortfall(p, c.induce), -_keep_ratio(p, c), p.kl or 0.0)

    def dominates(a, b) -> bool:
        va, vb = vec(a), vec(b)
        return all(x <= y for x, y in zip(va, vb)) and any(x < y for x, y in zip(va, vb))

    front = [p for p in measured if not any(dominates(q, p) for q in measured if q is not p)]
    unique: dict[tuple, SweepPoint] = {}
    for p in front:
        unique.setdefault((p.scale, p.layers), p)
    return sorted(unique.values(), key=lambda p: (p.layers or (0, 0), abs(p.scale)))


def search_scale(
    evaluate: Callable[[float], SweepPoint],
    *,
    keep_frac: float = 0.9,
    max_kl: float | None = 0.1,
    sign: int = -1,
    step: float = 0.25,
    max_abs: float = 4.0,
    refine: int = 3,
    goal: float = 0.0,
    baseline: SweepPoint | None = None,
) -> SweepResult:
    """Walk out from scale 0 by ``step`` (direction ``sign``), then bisect; see the module doc.

    ``evaluate(scale)`` must return a :class:`SweepPoint` with ``target``, ``keep`` and ``kl``
    filled in as far as it measured them (it may leave ``target`` None once a constraint is
    already broken, to save work). ``baseline`` (the scale-0 point) is evaluated if not given.
    """
    if step <= 0 or max_abs <= 0:
        raise ValueError("step and max_abs must be > 0")
    if sign not in (-1, 1):
        raise ValueError("sign must be -1 (remove refusal) or +1 (induce it)")
    base = baseline if baseline is not None else evaluate(0.0)
    induce = sign > 0
    c = Constraints(keep_frac, max_kl, dict(base.keep), induce)
    c.classify(base)
    points = [base]
    seen: dict[float, SweepPoint] = {0.0: base}

    def visit(magnitude: float) -> SweepPoint:
        s = round(sign * magnitude, 6)
        if s not in seen:
            pt = c.classify(evaluate(s))
            seen[s] = pt
            points.append(pt)
        return seen[s]

    good, bad, stopped = 0.0, None, ""
    if base.target is not None and shortfall(base, induce) <= goal:
        stopped = "the target is already at the goal without steering"
    k = 1
    while not stopped and k * step <= max_abs + 1e-9:
        pt = visit(k * step)
        if not pt.feasible:
            bad = k * step
            break
        good = k * step
        if shortfall(pt, induce) <= goal:
            stopped = f"goal reached at scale {pt.scale:+g}"
        k += 1
    else:
        if not stopped:
            stopped = f"reached |scale| {max_abs:g} without breaking a constraint"
    if bad is not None:
        stopped = f"constraint broken at scale {sign * bad:+g} ({seen[round(sign * bad, 6)].reason})"
        for _ in range(refine):
            mid = (good + bad) / 2
            pt = visit(mid)
            if pt.feasible:
                good = mid
                if shortfall(pt, induce) <= goal:
                    break
            else:
                bad = mid
    return SweepResult(choose(points, induce), points, pareto_frontier(points, c), base, c, stopped)


def search_bands(
    evaluate: Callable[[float, Band], SweepPoint],
    bands: Sequence[Band],
    **kwargs: Any,
) -> SweepResult:
    """:func:`search_scale` in each layer band (baseline shared); the best feasible point overall."""
    if not bands:
        raise ValueError("no layer bands to search")
    baseline = kwargs.pop("baseline", None) or evaluate(0.0, None)
    results = [search_scale(lambda s, b=band: evaluate(s, b), baseline=baseline, **kwargs) for band in bands]
    points = [results[0].baseline] + [p for r in results for p in r.points if p is not r.baseline]
    c = results[0].constraints
    stopped = "; ".join(f"{_band_label(b)}: {r.stopped}" for b, r in zip(bands, results))
    return SweepResult(choose(points, c.induce), points, pareto_frontier(points, c), results[0].baseline, c, stopped)


def _band_label(band: Band) -> str:
    return "all blocks" if band is None else f"blocks {band[0]}-{band[1]}"


# ----------------------------------------------------------------------------- with the model


def evaluator_objective(evaluator: Evaluator, target: str, keep: Sequence[str], max_kl: float | None, keep_frac: float,
                        full: bool = False, induce: bool = False) -> Callable[[float, Band], SweepPoint]:
    """``evaluate(scale, band)`` over an :class:`Evaluator`, cheapest check first.

    KL (a teacher-forced pass on harmless prompts, no generation) is measured first; when it
    is over ``max_kl`` the point is infeasible and nothing is generated. Then the keep sets;
    the target set is generated only for a point that still satisfies the constraints
    (``full=True`` measures everything at every point, for a complete frontier).
    """
    baseline_keep: dict[str, float] = {}

    def evaluate(scale: float, band: Band = None) -> SweepPoint:
        from rs_local.eval.evaluate import EvalPoint

        pt = EvalPoint(float(scale), band if scale != 0 else None)
        sp = SweepPoint(float(scale), pt.layers, detail=pt)
        if evaluator.settings.kl_set is not None and max_kl is not None:
            kl_values = evaluator.kl(scale, pt.layers)
            sp.kl = pt.kl = float(sum(kl_values) / len(kl_values)) if kl_values else 0.0
            if not full and scale != 0 and sp.kl > max_kl:
                evaluator.say(f"scale {scale:+g}: KL {sp.kl:.3f} > {max_kl:g}, skipped generation")
                return sp
        for name in keep:
            score, records = evaluator.score_set(name, scale, pt.layers)
            pt.sets[name], sp.keep[name] = score, score.refusal_rate
            pt.answers += records
            if scale == 0:
                baseline_keep[name] = score.refusal_rate
            elif not full and not keep_holds(score.refusal_rate, keep_limit(baseline_keep.get(name, 0.0), keep_frac, induce),
                                             induce):
                evaluator.say(f"scale {scale:+g}: {name} refusal {score.refusal_rate:.0%} past its limit, skipped {target}")
                return sp
        score, records = evaluator.score_set(target, scale, pt.layers)
        pt.sets[target], sp.target = score, score.refusal_rate
        pt.answers += records
        evaluator.say(_line(sp, target))
        return sp

    return evaluate


def _line(sp: SweepPoint, target: str) -> str:
    keep = ", ".join(f"{n} {r:.0%}" for n, r in sp.keep.items())
    kl = "" if sp.kl is None else f", KL {sp.kl:.3f}"
    return f"scale {sp.label}: {target} {sp.target:.0%}" + (f", {keep}" if keep else "") + kl
