"""Writing an evaluation out: report.json, answers.jsonl, the plot, and the table to print.

The output directory is all-or-nothing from the user's point of view: it must not exist
(or ``force`` is given) and its parent must (no parents are created behind the user's
back), every file is written atomically by :mod:`rs_local.files`, and report.json is
written last, so a directory holding a report.json holds a whole report.
"""

from __future__ import annotations

from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from rs_local.eval.evaluate import EvalPoint, EvalReport
from rs_local.errors import FileProblem
from rs_local.files import atomic_write_text, check_output_path, dumps, make_output_dir

REPORT = "report.json"
ANSWERS = "answers.jsonl"
PLOT = "refusal_vs_scale.png"
SWEEP = "sweep.json"
#: Every file `eval`, `sweep` and `eval --policy` write into their output directory.
OUTPUTS = (ANSWERS, REPORT, SWEEP, PLOT)


def prepare_dir(out: str | Path, force: bool) -> Path:
    """Create the output directory; an existing one is an error unless ``force``, a missing parent always."""
    return make_output_dir(out, force)


@contextmanager
def output_dir(out: str | Path, force: bool) -> Iterator[Path]:
    """:func:`prepare_dir`; when this call made the directory and writing into it fails, the report's
    files and then the directory are removed again (a directory that is not empty then stays).

    Why: a full disk left an empty ``-o`` directory behind, so the same command, run again once there
    was room, stopped on "output directory exists (use --force)". Only what an evaluation writes is
    removed, by name, so a directory another process made meanwhile keeps anything else in it."""
    path = check_output_path(out, force, directory=True)
    try:
        path.mkdir()
        made = True
    except FileExistsError:
        made = False
        prepare_dir(path, force)  # appeared meanwhile: the usual checks
    except OSError as exc:
        raise FileProblem(path, f"cannot be created ({exc.strerror or exc})") from None
    try:
        yield path
    except BaseException:
        if made:
            for name in OUTPUTS:
                with suppress(OSError):
                    (path / name).unlink()
            with suppress(OSError):
                path.rmdir()
        raise


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file beside it, umask mode, ``os.replace``)."""
    return atomic_write_text(path, text, force=True)


def point_dict(pt: EvalPoint) -> dict[str, Any]:
    return {
        "scale": pt.scale,
        "layers": pt.layers_label,
        "kl": pt.kl,
        "seconds": round(pt.seconds, 2),
        "sets": {name: asdict(s) for name, s in pt.sets.items()},
    }


def report_dict(report: EvalReport) -> dict[str, Any]:
    """The JSON-able summary: settings, meta, and per point the rates of every set."""
    base = report.baseline
    out: dict[str, Any] = {
        "settings": report.settings.as_dict(),
        "meta": report.meta,
        "points": [point_dict(p) for p in report.points],
    }
    if base is not None:
        out["baseline"] = {name: s.refusal_rate for name, s in base.sets.items()}
    return out


def write_report(report: EvalReport, out: str | Path, force: bool = False, plot: bool = True) -> dict[str, Path]:
    """Write answers.jsonl, the PNG plot and report.json into ``out``; returns their paths."""
    paths: dict[str, Path] = {}
    lines = [dumps(asdict(a)) for p in report.points for a in p.answers]
    with output_dir(out, force) as out:
        paths["answers"] = write_atomic(out / ANSWERS, "\n".join(lines) + ("\n" if lines else ""))
        paths["report"] = write_atomic(out / REPORT, dumps(report_dict(report), indent=2) + "\n")  # before the plot
    if plot:
        from rs_local.eval.plot import plot_report

        paths["plot"] = plot_report(report, out / PLOT)
    return paths


def summary_table(report: EvalReport, title=None):
    """A rich Table: one row per point, refusal rate per set (keyword rate beside), KL, degenerate.

    Set names (and a str ``title``) are rich Text, not markup: a name like ``a[/x]`` would raise
    MarkupError when the table prints, after the evaluation; ``title`` may also be a Text.
    """
    from rich.table import Table
    from rich.text import Text

    names = report.set_names()
    table = Table(title=Text(title) if isinstance(title, str) else title, show_lines=False)
    table.add_column("scale", justify="right")
    if any(p.layers for p in report.points):
        table.add_column("blocks", justify="right")
    for name in names:
        table.add_column(Text.assemble(name, "\nrefusal (kw)"), justify="right")
    table.add_column("KL", justify="right")
    table.add_column("degenerate", justify="right")
    base = report.baseline
    for pt in report.points:
        row = [f"{pt.scale:+g}" if pt.scale else "0 (plain)"]
        if any(p.layers for p in report.points):
            row.append(pt.layers_label or "-")
        for name in names:
            s = pt.sets.get(name)
            if s is None:
                row.append("-")
                continue
            cell = f"{s.refusal_rate:.0%} ({s.keyword_rate:.0%})"
            if base is not None and pt is not base and name in base.sets:
                delta = s.refusal_rate - base.sets[name].refusal_rate
                color = "green" if delta < 0 else ("red" if delta > 0 else "dim")
                cell = f"[{color}]{cell}[/]"
            row.append(cell)
        row.append("-" if pt.kl is None else f"{pt.kl:.3f}")
        degen = [s.degenerate_rate for s in pt.sets.values()]
        row.append(f"{max(degen):.0%}" if degen else "-")
        table.add_row(*row)
    return table
