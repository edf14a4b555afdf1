"""Writing a sweep out: sweep.json (every point, the choice, the frontier), answers, plot, table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rs_local.eval.evaluate import EvalReport, Evaluator
from rs_local.eval.report import ANSWERS, PLOT, SWEEP, output_dir, point_dict, write_atomic
from rs_local.eval.sweep import SweepPoint, SweepResult
from rs_local.files import dumps


def sweep_point_dict(p: SweepPoint) -> dict[str, Any]:
    out = {"scale": p.scale, "layers": None if p.layers is None else list(p.layers), "target": p.target,
           "keep": p.keep, "kl": p.kl, "feasible": p.feasible, "reason": p.reason}
    if p.detail is not None and hasattr(p.detail, "sets"):
        out["sets"] = point_dict(p.detail)["sets"]
    return out


def sweep_dict(result: SweepResult, target: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    c = result.constraints
    return {
        "target": target,
        "constraints": {"keep_frac": c.keep_frac, "max_kl": c.max_kl, "baseline_keep": c.baseline_keep, "induce": c.induce,
                        ("keep_ceiling" if c.induce else "keep_floor"): {n: c.keep_limit(n) for n in c.baseline_keep}},
        "baseline": sweep_point_dict(result.baseline),
        "chosen": None if result.chosen is None else sweep_point_dict(result.chosen),
        "frontier": [sweep_point_dict(p) for p in result.frontier],
        "points": [sweep_point_dict(p) for p in result.points],
        "stopped": result.stopped,
        "meta": meta or {},
    }


def write_sweep(result: SweepResult, evaluator: Evaluator, target: str, out: str | Path, force: bool = False, plot: bool = True) -> dict[str, Path]:
    """sweep.json, answers.jsonl (every generated answer) and the plot of the chosen band."""
    paths: dict[str, Path] = {}
    details = [p.detail for p in result.points if p.detail is not None]
    lines = [dumps(asdict(a)) for d in details for a in d.answers]
    band = result.chosen.layers if result.chosen is not None else None
    shown = sorted((d for d in details if d.layers == band or d.scale == 0), key=lambda d: d.scale)
    meta = {"model": evaluator.engine.model_path.name, "judge": evaluator.judge.describe(), "settings": evaluator.settings.as_dict(),
            "sets": {n: len(s) for n, s in evaluator.sets.items()}}
    with output_dir(out, force) as out:
        paths["answers"] = write_atomic(out / ANSWERS, "\n".join(lines) + ("\n" if lines else ""))
        paths["sweep"] = write_atomic(out / SWEEP, dumps(sweep_dict(result, target, meta), indent=2) + "\n")  # before the plot
    if plot and len(shown) > 1:
        from rs_local.eval.plot import plot_report

        report = EvalReport(shown, evaluator.settings, {"model": evaluator.engine.model_path.name})
        title = f"sweep on {evaluator.engine.model_path.name}" + (f", blocks {band[0]}-{band[1]}" if band else "")
        paths["plot"] = plot_report(report, out / PLOT, title=title)
    return paths


def sweep_table(result: SweepResult, target: str, title=None):
    """Every point in evaluation order; the chosen one bold, frontier points marked.

    Set names, reasons (which name sets) and a str ``title`` are rich Text, not markup: a set
    named ``a[/x]`` would raise MarkupError when the table prints, after the sweep.
    """
    from rich.table import Table
    from rich.text import Text

    keep_names = list(result.constraints.baseline_keep)
    goal = "maximise" if result.constraints.induce else "minimise"
    table = Table(title=Text(title or f"sweep: {goal} {target} refusal") if not isinstance(title, Text) else title)
    table.add_column("scale", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column(Text(target), justify="right")
    for n in keep_names:
        bound = "<=" if result.constraints.induce else ">="
        table.add_column(Text(f"{n} ({bound} {result.constraints.keep_limit(n):.0%})"), justify="right")
    table.add_column("KL" + (f" (<= {result.constraints.max_kl:g})" if result.constraints.max_kl is not None else ""), justify="right")
    table.add_column("", justify="left")
    frontier = {(p.scale, p.layers) for p in result.frontier}
    for p in result.points:
        mark = []
        if p is result.chosen:
            mark.append(Text("chosen", "bold green"))
        if (p.scale, p.layers) in frontier:
            mark.append(Text("frontier"))
        if not p.feasible and p.reason:
            mark.append(Text(p.reason, "red"))
        row = [f"{p.scale:+g}", "all" if p.layers is None else f"{p.layers[0]}-{p.layers[1]}",
               "-" if p.target is None else f"{p.target:.0%}"]
        row += ["-" if n not in p.keep else f"{p.keep[n]:.0%}" for n in keep_names]
        row += ["-" if p.kl is None else f"{p.kl:.3f}", Text(", ").join(mark)]
        style = "bold" if p is result.chosen else None
        table.add_row(*row, style=style)
    return table
