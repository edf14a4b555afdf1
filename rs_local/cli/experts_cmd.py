"""``rs-local experts``: which experts of an MoE model route refused prompts differently.

Thin: routing capture and statistics are :mod:`rs_local.vectors.experts`; this module parses
options, prints a rich table and writes the JSON report and the heat map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from rs_local import models
from rs_local.cli.options import check_output, integer, say, utf8_text
from rs_local.cli.terminal import terminal_safe
from rs_local.files import check_distinct
from rs_local.files.figures import require_pyplot
from rs_local.prompts import load_prompts

err = Console(stderr=True)
out = Console()
_FILE = click.Path(dir_okay=False, path_type=Path)


def report_table(report: dict[str, Any]) -> Table:
    """One row per (MoE block, top expert): effect size and routing share in each set."""
    table = Table(title=f"experts whose routing differs most (refused {report['n_refused']} vs answered {report['n_answered']})")
    for col in ("block", "expert", "Cohen's d", "P refused", "P answered", "top-k refused", "top-k answered"):
        table.add_column(col, justify="right")
    for block in report["blocks"]:
        for i, row in enumerate(block["top"]):
            table.add_row(str(block["block"]) if i == 0 else "", str(row["expert"]), f"{row['cohen_d']:+.2f}",
                          f"{row['mean_prob_refused']:.3f}", f"{row['mean_prob_answered']:.3f}",
                          f"{row['selected_refused']:.2f}", f"{row['selected_answered']:.2f}")
    return table


@click.command()
@click.option("--model", "-m", default=models.DEFAULT_MODEL, show_default=True, help="An MoE .gguf file or Hugging Face model directory.")
@click.option("--refused", "-r", type=_FILE, required=True, help="Prompts the model refuses: .txt, .jsonl, .json or .csv.")
@click.option("--answered", "-a", type=_FILE, required=True, help="Prompts the model answers.")
@click.option("--field", "--column", "field", default=None, help="JSON field / CSV column holding the prompt.")
@click.option("--position", type=click.Choice(["last", "post-instruction", "prompt"]), default="last", show_default=True,
              help="Routing at the last prompt token, over the template suffix, or over the whole prompt.")
@click.option("--top", type=integer(1, 1024), default=3, show_default=True, help="Experts listed per block.")
@click.option("--system", default=None, callback=utf8_text, help="System prompt used when formatting prompts.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--output", "-o", type=_FILE, default=None, help="Write the full report (every block and expert) as JSON.")
@click.option("--plot", type=_FILE, default=None, help="Write a block x expert heat map of Cohen's d (PNG).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def experts(**kw: Any) -> None:
    """Report per MoE block the experts whose routing differs most between refused and answered prompts."""
    from rs_local.files import atomic_write_text
    from rs_local.files.writing import dumps
    from rs_local.vectors.experts import capture_routing, expert_report, plot_report, require_moe_file, top_k
    from rs_local.vectors.hf_model import load_model

    for path in (kw["output"], kw["plot"]):
        if path is not None:
            check_output(path, kw["force"])
    check_distinct([kw["output"], kw["plot"]], [kw["refused"], kw["answered"]])
    if kw["plot"] is not None:
        require_pyplot()  # before the routing capture, not after it
    refused, answered = load_prompts(kw["refused"], kw["field"]), load_prompts(kw["answered"], kw["field"])
    position = kw["position"].replace("-", "_")
    require_moe_file(models.resolve(kw["model"]))
    from rs_local.recipes.memory_check import DTYPE_OPTION_HINT, check_fit_memory

    check_fit_memory(kw["model"], kw["dtype"], say, hint=DTYPE_OPTION_HINT)
    fm = load_model(kw["model"], dtype=kw["dtype"])
    routing = [capture_routing(fm, prompts, position=position, system=kw["system"]) for prompts in (refused, answered)]
    meta = {"model": str(fm.path), "arch": fm.model_hint, "n_layer": fm.n_layer, "top_k": top_k(fm), "position": position,
            "refused": str(kw["refused"]), "answered": str(kw["answered"])}
    report = expert_report(*routing, top=kw["top"], meta=meta)
    out.print(report_table(report))
    if kw["output"] is not None:
        atomic_write_text(kw["output"], dumps(report, indent=1) + "\n", force=kw["force"])
        click.echo(terminal_safe(f"wrote {kw['output']}"))
    if kw["plot"] is not None:
        plot_report(report, kw["plot"])
        click.echo(terminal_safe(f"wrote {kw['plot']}"))


COMMANDS = [experts]

__all__ = ["COMMANDS", "experts", "report_table"]
