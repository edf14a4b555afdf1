"""Evaluating a conditional-steering policy: refusal rates with the gate on, beside the plain model.

``rs-local eval --policy p.gguf``. The gate reads every prompt as ``rs-local chat --policy``
would (system prompt and user message, through llama.cpp), and each prompt is answered under
the vector of the category it was routed to, or by the plain model when the gate keeps or
abstains. So a set's gated refusal rate is what users of the policy will see, and the routing
table (how many prompts of each set went to each category) shows where it comes from: a harmful
prompt routed to ``remove`` is a gate error, not a vector's.

KL on the KL set (harmless prompts) is ``KL(plain || gated)`` per prompt over the plain
answer's first tokens: exactly 0 for prompts the gate leaves alone (the same model answers), the
steered vector's KL for those it routes to a vector. That is the cost an everyday user pays.

Everything else (batching, judge, keyword rule, degeneration, caches) is the
:class:`~rs_local.eval.evaluate.Evaluator`'s: prompts routed to one category are scored as a
sub-set under that category's vector, so cached plain answers and references are reused.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rs_local.eval import metrics
from rs_local.eval.evaluate import AnswerRecord, EvalPoint, Evaluator, SetScore, Say
from rs_local.eval.prompt_sets import PromptSet
from rs_local.files import dumps


@dataclass
class GatedReport:
    """The plain model and the gated model on the same sets, and where the gate sent each set's prompts."""

    plain: EvalPoint
    gated: EvalPoint
    routing: dict[str, dict[str, int]] = field(default_factory=dict)  # set -> "category:action" -> prompts
    decisions: list[dict[str, Any]] = field(default_factory=list)  # one per answer of the gated point
    policy: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    gate_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        from rs_local.eval.report import point_dict

        return {"policy": self.policy, "meta": self.meta, "plain": point_dict(self.plain),
                "gated": point_dict(self.gated), "routing": self.routing,
                "gate_seconds": round(self.gate_seconds, 3)}


def _route_label(decision: Any) -> str:
    return f"{decision.category}:{decision.action}" if decision.category is not None else "off:keep"


def _score_group(ev: Evaluator, set_name: str, prompts: list[str], vector: Any, scale: float,
                 with_kl: bool) -> list[AnswerRecord]:
    """Answers of the prompts routed to one vector (or none), scored as a temporary sub-set."""
    tmp = f"{set_name}\x00{len(prompts)}:{scale}"
    ev.sets[tmp] = PromptSet(tmp, prompts)
    try:
        ev.use_vector(vector)
        kl_values = None
        if with_kl:  # the plain model against itself is exactly 0: no need to measure it
            kl_values = ev.kl(scale, None, set_name=tmp) if scale != 0 else [0.0] * len(prompts)
        _score, records = ev.score_set(tmp, scale, None, kl_values)
    finally:
        del ev.sets[tmp]
    for r in records:
        r.set = set_name
    return records


def _set_score(name: str, records: Sequence[AnswerRecord]) -> SetScore:
    kls = [r.kl for r in records if r.kl is not None]
    return SetScore(set=name, n=len(records), refusal_rate=metrics.rate(r.refusal for r in records),
                    keyword_rate=metrics.rate(r.keyword_refusal for r in records),
                    degenerate_rate=metrics.rate(r.degenerate is not None for r in records),
                    unparsed=sum(r.verdict == 0 for r in records), kl=float(np.mean(kls)) if kls else None)


def gated_point(ev: Evaluator, gate: Any, report: GatedReport) -> EvalPoint:
    """Every set answered under the gate; fills ``report.routing`` and ``report.decisions``."""
    start = time.perf_counter()
    pt = EvalPoint(0.0, None)
    for name, pset in list(ev.sets.items()):
        decisions = [gate.decide(ev._messages(p)) for p in pset.prompts]
        report.gate_seconds += sum(d.read_s for d in decisions)
        report.routing[name] = dict(Counter(_route_label(d) for d in decisions))
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(decisions):
            steered = d.action != "keep" and d.category is not None
            groups.setdefault((d.category, d.scale) if steered else (None, 0.0), []).append(i)
        by_index: dict[int, AnswerRecord] = {}
        for (category, scale), idx in groups.items():
            vector = gate.policy.category(category).vector if category is not None else None
            records = _score_group(ev, name, [pset.prompts[i] for i in idx], vector, scale,
                                   with_kl=name == ev.settings.kl_set)
            by_index.update(zip(idx, records))
        records = [by_index[i] for i in range(len(pset.prompts))]
        pt.sets[name] = _set_score(name, records)
        pt.answers += records
        report.decisions += [d.to_dict() for d in decisions]
    kl_set = ev.settings.kl_set
    pt.kl = pt.sets[kl_set].kl if kl_set in pt.sets else None
    pt.seconds = time.perf_counter() - start
    return pt


def evaluate_policy(runner: Any, sets: Sequence[PromptSet], gate: Any, *, judge: Any = None, settings: Any = None,
                    cache: Any = None, say: Say | None = None) -> GatedReport:
    """The plain model, then the gated one, on every set (the gate is a :class:`PolicyRunner` on ``runner``)."""
    say = say or (lambda _m: None)
    ev = Evaluator(runner, sets, judge=judge, settings=settings, cache=cache, say=say)
    try:
        plain = ev.point(0.0, None)
        report = GatedReport(plain, plain, policy=gate.policy.summary())
        report.gated = gated_point(ev, gate, report)
    finally:
        ev.close()
    rates = ", ".join(f"{n} {s.refusal_rate:.0%}" for n, s in report.gated.sets.items())
    kl = f", KL {report.gated.kl:.4f}" if report.gated.kl is not None else ""
    say(f"gated: refusal {rates}{kl} [{report.gated.seconds:.0f}s, gate {report.gate_seconds:.1f}s]")
    report.meta = {"model": runner.path.name, "judge": ev._judge_key, "engine": ev.engine.kind,
                   "settings": ev.settings.as_dict(), "sets": {s.name: {"n": len(s), "source": s.source} for s in sets},
                   "policy_file": gate.path}
    return report


def write_policy_report(report: GatedReport, out: str | Path, force: bool = False) -> dict[str, Path]:
    """answers.jsonl (plain and gated answers, each gated one with its decision) and report.json, atomically."""
    from rs_local.eval.report import ANSWERS, REPORT, output_dir, write_atomic

    rows = [{"gate": "plain", **asdict(a)} for a in report.plain.answers]
    rows += [{"gate": "on", **asdict(a), "decision": d} for a, d in zip(report.gated.answers, report.decisions)]
    lines = [dumps(r) for r in rows]
    with output_dir(out, force) as out:
        paths = {"answers": write_atomic(out / ANSWERS, "\n".join(lines) + ("\n" if lines else ""))}
        paths["report"] = write_atomic(out / REPORT, dumps(report.as_dict(), indent=2) + "\n")
    return paths


def policy_table(report: GatedReport, title: str | None = None):
    """Rows: sets. Columns: plain and gated refusal (keywords), where the gate sent the prompts, degenerate."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for col in ("set", "plain refusal (kw)", "gated refusal (kw)", "routed to", "degenerate plain/gated"):
        table.add_column(col, justify="left" if col in ("set", "routed to") else "right")
    for name, s in report.gated.sets.items():
        b = report.plain.sets[name]
        routed = ", ".join(f"{k} {v}" for k, v in sorted(report.routing.get(name, {}).items(), key=lambda kv: -kv[1]))
        table.add_row(Text(name), f"{b.refusal_rate:.0%} ({b.keyword_rate:.0%})",
                      f"{s.refusal_rate:.0%} ({s.keyword_rate:.0%})", Text(routed),
                      f"{b.degenerate_rate:.0%} / {s.degenerate_rate:.0%}")
    if report.gated.kl is not None:
        table.caption = Text(f"KL(plain || gated) on {report.meta.get('settings', {}).get('kl_set')}: {report.gated.kl:.4f} nats")
    return table
