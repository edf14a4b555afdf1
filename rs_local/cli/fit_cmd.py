"""``rs-local fit`` and ``rs-local layers``: fit a control vector, and show its per-layer signal.

Thin: prompt loading is :mod:`rs_local.prompts`, fitting :mod:`rs_local.vectors.fit`,
writing :mod:`rs_local.converters.gguf_io`. This module parses options, wires the three
together and prints with rich. Torch/Transformers are imported only when ``fit`` runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rs_local import models
from rs_local.callbacks import Progress
from rs_local.cli.options import SEED, Number, check_output, integer, number, prompt_file_callback, utf8_text
from rs_local.cli.terminal import terminal_safe
from rs_local.errors import VectorFileError
from rs_local.files import check_distinct
from rs_local.files.figures import require_pyplot
from rs_local.prompts import NEUTRAL_THRESHOLD, check_disjoint, load_prompts, load_scores, split_by_scores
from rs_local.runtime.vector_specs import band_label
from rs_local.vectors.layers import LayerRow, table_from_metadata

err = Console(stderr=True)
out = Console()
_FILE = click.Path(dir_okay=False, path_type=Path)


# ----------------------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def layer_table(rows: Sequence[LayerRow], title: str = "per-layer signal (held-out)") -> Table:
    """Rich table of the layer analysis; selected blocks are marked and bold."""
    has_r = any(r.pearson_r is not None for r in rows)
    table = Table(title=title)
    for col in ["block", "Cohen's d", "AUROC"] + (["|r| score"] if has_r else []) + ["act norm", "exported", "use"]:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [str(r.layer), _fmt(r.cohen_d), _fmt(r.auroc, 3)]
        if has_r:
            cells.append(_fmt(abs(r.pearson_r) if r.pearson_r is not None else None, 3))
        cells += [_fmt(r.act_norm, 1), _fmt(r.exported_norm, 3) if r.selected else "", "*" if r.selected else ""]
        table.add_row(*cells, style="bold" if r.selected else None)
    return table


# ----------------------------------------------------------------------------- inputs


def _lambda(value: str) -> float | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        lam = Number().convert(value, None, None)
    except click.BadParameter:
        raise click.BadParameter(f"'{value}' is not a number or 'auto'", param_hint="--lambda") from None
    if not 0 < lam <= 1e6:
        raise click.BadParameter("must be > 0 (relative to the mean eigenvalue of the complied covariance) and at most 1e6",
                                 param_hint="--lambda")
    return lam


def _scored_sets(positive, negative, prompts_file, scores_file, field) -> dict[str, Any]:
    """Build the two sets (and their scores) from the options given."""
    if scores_file is None:
        if positive is None or negative is None:
            raise click.UsageError("give --positive and --negative, or --scores (optionally with --prompts)")
        if prompts_file is not None:
            raise click.UsageError("--prompts needs --scores (it is split into refused/complied by score)")
        pos, neg = load_prompts(positive, field), load_prompts(negative, field)
        return {"pos": pos, "neg": neg, "pos_s": None, "neg_s": None, "sources": {"positive": str(positive), "negative": str(negative)}}
    scores = load_scores(scores_file)
    if positive is None and negative is None:
        prompts = load_prompts(prompts_file, field) if prompts_file is not None else None
        split = split_by_scores(scores, prompts, path=scores_file)
        if split.neutral:
            err.print(f"[dim]{len(split.neutral)} neutral prompt(s) (|score| <= {NEUTRAL_THRESHOLD}) left out[/]")
        src = {"scores": str(scores_file)} | ({"prompts": str(prompts_file)} if prompts_file else {})
        return {"pos": split.refused, "neg": split.complied, "pos_s": split.refused_scores, "neg_s": split.complied_scores, "sources": src}
    if positive is None or negative is None or prompts_file is not None:
        raise click.UsageError("with --scores give either --prompts (or nothing), or both --positive and --negative")
    pos, ps = _with_scores(load_prompts(positive, field), scores, +1.0)
    neg, ns = _with_scores(load_prompts(negative, field), scores, -1.0)
    return {"pos": pos, "neg": neg, "pos_s": ps, "neg_s": ns, "sources": {"positive": str(positive), "negative": str(negative), "scores": str(scores_file)}}


def _with_scores(prompts: list[str], scores: dict[str, float], default: float) -> tuple[list[str], list[float]]:
    """Scores for a user-labelled set: unscored prompts count as fully confident, neutral ones drop out."""
    kept, values, missing = [], [], 0
    for p in prompts:
        c = scores.get(p)
        if c is None:
            missing += 1
            c = default
        if abs(c) <= NEUTRAL_THRESHOLD:
            continue
        kept.append(p)
        values.append(c)
    if missing:
        err.print(f"[dim]{missing} prompt(s) without a score: weight 1, score {default:+g}[/]")
    return kept, values


def _routing(kw: dict[str, Any]) -> tuple[Any, list[int]] | None:
    """The experts report and the blocks it chooses, checked before the model loads (see vectors/routing_blocks.py)."""
    if kw["routing"] is None:
        if kw["routing_top"] is not None:
            raise click.UsageError("--routing-top needs --routing")
        return None
    if kw["layers"].strip().lower() != "auto":
        raise click.UsageError("give --routing or --layers, not both")
    from rs_local.vectors.routing_blocks import DEFAULT_TOP, check_model_file, choose_blocks, read_routing

    report = read_routing(kw["routing"])
    check_model_file(report, kw["model"])
    return report, choose_blocks(report, kw["routing_top"] or DEFAULT_TOP)


def _ortho(path: Path | None):
    if path is None:
        return None
    from rs_local.converters.gguf_io import read_control_vector

    cv = read_control_vector(path)
    cv.metadata["source_file"] = str(path)
    return cv


# ----------------------------------------------------------------------------- commands


@click.command()
@click.option("--model", "-m", default=models.DEFAULT_MODEL, show_default=True, help="Built-in model name, a .gguf file or a Hugging Face model directory.")
@click.option("--positive", "-p", type=_FILE, callback=prompt_file_callback,
              help="Prompts the model refuses (R): .txt, .jsonl, .json or .csv, or a shipped set's name (harmful).")
@click.option("--negative", "-n", type=_FILE, callback=prompt_file_callback,
              help="Prompts the model answers (C); a file or a shipped set's name (harmless).")
@click.option("--prompts", "prompts_file", type=_FILE, help="One prompt set split by --scores into refused (c>0.1) / complied (c<-0.1).")
@click.option("--scores", "scores_file", type=_FILE, help='Judge scores JSONL, rows {"prompt": ..., "score": c} with c in [-1, 1].')
@click.option("--field", "--column", "field", default=None, help="JSON field / CSV column holding the prompt (default: text, prompt, goal, instruction or question).")
@click.option("--method", type=click.Choice(["md", "pca", "rmd", "wrmd"]), default="wrmd", show_default=True, help="Mean difference, PCA of differences, ridge MD, score-weighted ridge MD.")
@click.option("--lambda", "lam", default="0.1", show_default=True, help="Ridge strength relative to the mean eigenvalue of Sigma_C, or 'auto' (best held-out separation).")
@click.option("--layers", default="auto", show_default=True, help="'auto' (band around the strongest blocks), 'all', '8-20' or '8,10,12'.")
@click.option("--routing", type=_FILE, default=None, help="MoE: an `rs-local experts -o` report; write the vector only on the blocks whose routing differs most (instead of --layers).")
@click.option("--routing-top", type=integer(1, 4096), default=None, help="With --routing: how many blocks (default 3).")
@click.option("--position", type=click.Choice(["last", "post-instruction"]), default="last", show_default=True, help="Last prompt token, or mean over the template suffix after the user's text.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--batch-size", type=integer(1, 65536), default=16, show_default=True)
@click.option("--holdout", type=number(0, 0.9), default=0.2, show_default=True, help="Share of each set held out for the layer statistics.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--system", default=None, callback=utf8_text, help="System prompt used when formatting prompts (use the same one when chatting).")
@click.option("--orthogonalize-to", type=_FILE, default=None, help="Remove each layer's component along this control vector (e.g. keep harmful refusals).")
@click.option("--plot", type=_FILE, default=None, help="Write per-layer curves to this PNG and a PCA scatter to <name>-pca.png.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the activation cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table.")
@click.option("--output", "-o", type=_FILE, required=True, help="GGUF control vector to write.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def fit(**kw: Any) -> None:
    """Fit a refusal-steering control vector and write it as a llama.cpp GGUF.

    Use it with a NEGATIVE scale to remove the refusal, positive to induce it
    (`rs-local chat --vector OUT.gguf:-1`, or llama.cpp's --control-vector-scaled OUT.gguf:-1;
    `rs-local inspect OUT.gguf --llama-cpp` prints the full llama.cpp command).
    """
    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.vectors.fit import FitOptions, fit_vector

    check_output(kw["output"], kw["force"])
    if kw["plot"] is not None:
        require_pyplot()  # before the fit, not after it
        check_output(kw["plot"], kw["force"])
        check_output(_scatter_path(kw["plot"]), kw["force"])
    check_distinct([kw["output"], kw["plot"], kw["plot"] and _scatter_path(kw["plot"])],
                   [kw[k] for k in ("positive", "negative", "prompts_file", "scores_file", "orthogonalize_to", "routing")])
    sets = _scored_sets(kw["positive"], kw["negative"], kw["prompts_file"], kw["scores_file"], kw["field"])
    routing = _routing(kw)
    opts = FitOptions(
        method=kw["method"], lam=_lambda(kw["lam"]), layers=kw["layers"], position=kw["position"].replace("-", "_"),
        holdout=kw["holdout"], seed=kw["seed"], batch_size=kw["batch_size"], system=kw["system"],
        orthogonalize_to=_ortho(kw["orthogonalize_to"]), cache=not kw["no_cache"],
    )
    check_disjoint([(f"{kw['positive'] or kw['scores_file']} (refused)", sets["pos"]),  # before the model loads
                    (f"{kw['negative'] or kw['scores_file']} (complied)", sets["neg"])])
    say = (lambda _m: None) if kw["quiet"] else (lambda m: err.print(Text(m, style="dim")))
    if kw["method"] == "wrmd" and sets["pos_s"] is None:
        say("wrmd without --scores: every prompt weighs 1 (same as rmd)")
    if not kw["quiet"]:
        err.print(f"fitting {kw['method']} on {len(sets['pos'])} positive / {len(sets['neg'])} negative prompts")
    provenance = {"sources": sets["sources"]}
    from rs_local.recipes.memory_check import DTYPE_OPTION_HINT, check_fit_memory

    check_fit_memory(kw["model"], kw["dtype"], say, hint=DTYPE_OPTION_HINT)
    with err.status("loading model", spinner="dots") if not kw["quiet"] else nullcontext():
        from rs_local.vectors.hf_model import load_model

        fm = load_model(kw["model"], dtype=kw["dtype"], progress=say)
    if routing is not None:
        from rs_local.vectors.routing_blocks import check_model, provenance as routing_provenance

        check_model(routing[0], fm.model_hint, fm.n_layer)
        opts.layers = routing[1]
        provenance.update(routing_provenance(routing[0], routing[1], len(routing[1])))
    with _capture_bar(kw["quiet"]) as progress:
        result = fit_vector(fm, sets["pos"], sets["neg"], pos_scores=sets["pos_s"], neg_scores=sets["neg_s"], options=opts,
                            provenance=provenance, say=say, progress=progress)
    write_control_vector(result.vector, kw["output"], force=kw["force"])
    if kw["plot"] is not None:
        _write_plots(result, kw["plot"])
    if not kw["quiet"]:
        out.print(layer_table(result.table))
    lam = f", lambda {result.lam:g}" if result.lam is not None else ""
    click.echo(terminal_safe(f"wrote {kw['output']}: {kw['method']}{lam}, blocks {band_label(result.layers)}, "
                             f"{len(sets['pos'])} vs {len(sets['neg'])} prompts (apply with a negative scale to remove refusal)"))


@contextmanager
def _capture_bar(quiet: bool) -> Iterator[Progress | None]:
    """A bar for the prompts going through the model (prompts/s), restarted for each captured set."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    class Rate(ProgressColumn):
        def render(self, task):  # noqa: D102 - rich API
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} prompts/s" if speed else "- prompts/s")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn())
    with Bar(*columns, console=err) as bar:
        task = bar.add_task("capturing", total=None)
        last = 0

        def update(done: int, total: int) -> None:
            nonlocal last
            if done < last:  # the next set started
                bar.reset(task, total=total, completed=done)
            else:
                bar.update(task, completed=done, total=total)
            last = done

        yield update


def _scatter_path(plot: Path) -> Path:
    return plot.with_name(plot.stem + "-pca" + (plot.suffix or ".png"))


def _write_plots(result, plot: Path) -> None:
    import numpy as np

    from rs_local.vectors.fit import concat_raw
    from rs_local.vectors.layers import best_layer
    from rs_local.vectors.layers_plot import plot_layer_table, plot_scatter

    plot_layer_table(result.table, plot, title=f"{result.vector.metadata.get('method')}: per-layer signal")
    pos, neg = concat_raw(result.positive), concat_raw(result.negative)
    if pos is not None and neg is not None:
        layer = best_layer(result.table)
        plot_scatter(np.asarray(pos[:, layer]), np.asarray(neg[:, layer]), _scatter_path(plot), layer, ("refused (positive)", "complied (negative)"))


@click.command()
@click.argument("file", type=_FILE)
@click.option("--plot", type=_FILE, default=None, help="Write the per-layer curves to this PNG.")
@click.option("--force", is_flag=True, help="Overwrite the PNG if it exists.")
def layers(file: Path, plot: Path | None, force: bool) -> None:
    """Show the per-layer signal table stored in a vector fitted by `rs-local fit`."""
    from rs_local.converters.gguf_io import read_control_vector

    cv = read_control_vector(file)
    raw = cv.metadata.get("layer_table")
    if raw is None:
        raise VectorFileError(file, "has no layer table (only vectors fitted by `rs-local fit` carry one)")
    try:
        rows = table_from_metadata(raw)
    except (ValueError, TypeError) as exc:
        raise VectorFileError(file, f"layer table is damaged ({exc})") from None
    meta = cv.metadata
    out.print(Text(f"{file}: {meta.get('method', '?')}, lambda {meta.get('lambda', '-')}, blocks {band_label(cv.layers)}, "
                   f"model {meta.get('model', '?')}, position {meta.get('position', '?')}"))
    if meta.get("layer_rule") == "routing":
        out.print(Text(f"blocks chosen by routing (top {meta.get('routing_top', '?')} by max |Cohen's d|, "
                       f"{meta.get('routing_report', '?')}): {meta.get('routing_strength', {})}"))
    out.print(layer_table(rows))
    if plot is not None:
        from rs_local.vectors.layers_plot import plot_layer_table

        require_pyplot()
        check_output(plot, force)
        check_distinct([plot], [file])  # `layers v.gguf --plot v.gguf --force` turned the vector into a PNG
        plot_layer_table(rows, plot, title=f"{file.name}: per-layer signal")
        click.echo(terminal_safe(f"wrote {plot}"))


COMMANDS = [fit, layers]

__all__ = ["COMMANDS", "fit", "layers", "layer_table"]
