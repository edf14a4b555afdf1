"""`rs-local respond`, `rs-local judge` and `rs-local judge-eval`: sample answers, judge them, check the judge."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from rs_local.cli.options import (
    SEED, check_output, err_console, integer, load_runner, load_vectors, model_option, number, runtime_options, say, utf8_text,
    vector_options,
)
from rs_local.cli.terminal import plain, styled
from rs_local.errors import FileProblem, PromptTooLong, RsLocalError
from rs_local.models import MODELS
from rs_local.files import check_distinct


class _RateColumn(ProgressColumn):
    """Rows per second over rich's recent window (resumed rows are not counted as speed)."""

    def render(self, task) -> Text:
        speed = task.speed
        return Text(f"{speed:.2f} rows/s" if speed else "-- rows/s", style="cyan")


@contextmanager
def row_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich bar driven by ``progress(done, total)``; the first call sets the resume point."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task(description, total=None)
        started = False

        def update(done: int, total: int) -> None:
            nonlocal started
            if not started:
                bar.reset(task, total=total, completed=done)
                started = True
            else:
                bar.update(task, completed=done, total=total)

        yield update


def judge_options(f: Callable | None = None, *, default: str = "probe", why: str = "") -> Callable:
    """The options that choose and tune the judge (shared by `judge`, `judge-eval`, `eval`,
    `sweep` and `isolate`); ``default`` is the judge the command uses when neither --judge nor
    --judge-url is given, ``why`` a note the help adds to it."""
    if f is None:
        return lambda g: judge_options(g, default=default, why=why)
    for opt in reversed([
        click.option("--judge", "judge_name", default=default, metavar="probe[=FILE]|keywords|MODEL",
                     help=f"'probe' for the shipped probe judge (probe=FILE for one from `judge-train`); "
                          f"'keywords' for the phrase-matching baseline; a built-in model name or GGUF path "
                          f"for a generative LLM judge. Default here: {default}{why}."),
        click.option("--judge-url", default=None, metavar="URL",
                     help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (llama-server, vLLM, Ollama)."),
        click.option("--judge-model", default=None, help="Model name on the --judge-url server (default: its only model)."),
        click.option("--api-key", default=None, envvar="RS_LOCAL_JUDGE_API_KEY", help="Bearer key for --judge-url."),
        click.option("--timeout", type=number(0.1, 86400), default=60.0, show_default=True, help="Seconds per HTTP request."),
        click.option("--retries", type=integer(0, 100), default=4, show_default=True, help="Retries per answer (exponential backoff)."),
        click.option("--backoff", type=number(0, 3600), default=0.5, show_default=True, help="First retry delay in seconds; doubles each retry."),
        click.option("--concurrency", "-j", type=integer(1, 1024), default=None,
                     help="Parallel HTTP requests (default 4; 1 against `rs-local serve`, which answers one at a time)."),
        click.option("--no-logprobs", is_flag=True, help="Ignore token log-probabilities; verdicts count +-1."),
        click.option("--judge-max-tokens", type=integer(1), default=None, help="Tokens the judge may write (default 12 local, 32 HTTP)."),
    ]):
        f = opt(f)
    return f


def make_judge_from(kw: dict, n_ctx: int, n_gpu_layers: int, n_threads: int | None, share: Any = None):
    """The judge the --judge* options describe (also used by eval, sweep and isolate). With
    --judge-url the command's default --judge gives way: only a --judge the user typed conflicts.
    ``share``: the command's Runner, which a probe judge for the same model reads through (one model load)."""
    from rs_local.judge.backends import make_judge

    ctx = click.get_current_context(silent=True)
    defaulted = ctx is not None and ctx.get_parameter_source("judge_name") == click.core.ParameterSource.DEFAULT
    name = None if kw["judge_url"] and defaulted else kw["judge_name"]
    with err_console.status("loading the judge"):
        return make_judge(
            name, url=kw["judge_url"], model=kw["judge_model"], api_key=kw["api_key"],
            timeout=kw["timeout"], retries=kw["retries"], backoff=kw["backoff"], concurrency=kw["concurrency"],
            logprobs=not kw["no_logprobs"], max_tokens=kw["judge_max_tokens"], n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers, n_threads=n_threads, on_status=say, share=share,
        )


# ----------------------------------------------------------------------------- respond


@click.command()
@model_option
@click.option("--prompts", "prompts_path", required=True, type=click.Path(path_type=Path), help="Prompt file (.txt, .jsonl, .json, .csv).")
@click.option("--field", "--column", "field", default=None, help="JSON field / CSV column holding the prompt.")
@click.option("--samples", "-k", type=integer(1, 100_000), default=5, show_default=True, help="Answers per prompt.")
@click.option("--max-tokens", "-n", type=integer(1), default=256, show_default=True)
@click.option("--temperature", "--temp", type=number(0, 100), default=0.8, show_default=True)
@click.option("--top-p", type=number(0, 1), default=0.95, show_default=True)
@click.option("--top-k", type=integer(0), default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Base seed; each answer's seed derives from it, the prompt and the sample index.")
@click.option("--system", default=None, callback=utf8_text, help="System prompt.")
@vector_options
@runtime_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Responses JSONL (continued if it exists with the same settings).")
@click.option("--force", is_flag=True, help="Start the output over even if it holds other rows.")
def respond(model, prompts_path, field, samples, max_tokens, temperature, top_p, top_k, seed, system,
            vectors, scale, layers, n_ctx, n_gpu_layers, n_threads, output, force) -> None:
    """Sample --samples answers per prompt (with optional steering vectors) into a JSONL file.

    Killed and restarted with the same command, it continues where it stopped.
    """
    from rs_local import models
    from rs_local.judge.respond import RespondSettings, check_respond_output, respond as run_respond
    from rs_local.prompts import load_prompts

    check_output(output, force=True)  # writable place, not a directory; an existing log is resumed below
    prompts = load_prompts(prompts_path, field=field)
    parts, layer_range = load_vectors(vectors, scale, layers)
    check_distinct([output], [prompts_path, *(v.source for v, _ in parts)])  # -o p.jsonl turned prompts into a log
    if samples > 1 and temperature == 0:
        err_console.print("[yellow]warning:[/] --temperature 0 is greedy: every sample of a prompt will be the same answer")
    settings = RespondSettings(samples, max_tokens, temperature, top_p, top_k, seed, system)
    model_path = models.resolve(model, progress=say)
    check_respond_output(output, model_path, settings, prompts, parts, layer_range, force)
    runner = load_runner(str(model_path), n_ctx, n_gpu_layers, n_threads)
    try:
        with row_progress("answers") as progress:
            report = run_respond(runner, prompts, output, settings, vectors=parts, layer_range=layer_range,
                                 force=force, progress=progress)
    except PromptTooLong as exc:
        raise FileProblem(prompts_path, str(exc)) from None
    resumed = f" ({report.already_done} were already there)" if report.already_done else ""
    err_console.print(plain(f"{report.total} answers to {len(prompts)} prompts in {output}{resumed}"), soft_wrap=True)


# ----------------------------------------------------------------------------- judge


@click.command()
@click.argument("responses", type=click.Path(path_type=Path))
@judge_options
@runtime_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Scores JSONL, one row per prompt.")
@click.option("--verdicts", type=click.Path(path_type=Path), default=None,
              help="Per-answer verdict log (resumable; default: <output stem>.verdicts.jsonl).")
@click.option("--refused-above", type=number(-1, 1), default=0.1, show_default=True, help="Score above which a prompt counts as refused.")
@click.option("--complied-below", type=number(-1, 1), default=-0.1, show_default=True, help="Score below which a prompt counts as complied.")
@click.option("--force", is_flag=True, help="Overwrite outputs written with other settings.")
def judge(responses, n_ctx, n_gpu_layers, n_threads, output, verdicts, refused_above, complied_below, force, **kw) -> None:
    """Judge every answer in RESPONSES and write one refusal score per prompt.

    Verdicts are logged as they come; a killed or failed run continues when run again.
    """
    from rs_local.judge.judging import check_outputs, judge_responses, load_responses

    if refused_above < complied_below:
        raise click.BadParameter("--refused-above must not be below --complied-below")
    rows = load_responses(responses)  # fail on a bad file or output before loading a model
    check_outputs(responses, output, verdicts, force, refused_above, complied_below, rows)
    judge_backend = make_judge_from(kw, n_ctx, n_gpu_layers, n_threads)
    try:
        with row_progress("judging") as progress:
            report = judge_responses(responses, judge_backend, output, verdicts_path=verdicts, force=force,
                                     refused_above=refused_above, complied_below=complied_below, progress=progress)
    finally:
        judge_backend.close()
    if not report.complete:
        _print_failures(report)
        raise RsLocalError(f"{report.missing} of {report.total} answers have no verdict yet "
                           f"(verdicts so far in {report.verdicts_path}); run the same command again to finish them")
    _print_score_summary(report)


def _print_failures(report) -> None:
    for row, error in report.failed[:10]:
        err_console.print(styled(("not judged:", "red"), f" {row['prompt'][:50]!r} sample {row['sample']}: {error}"))
    if len(report.failed) > 10:
        err_console.print(f"[red]... and {len(report.failed) - 10} more[/]")
    if report.not_attempted:
        err_console.print(f"[yellow]{report.not_attempted} answers not attempted (the judge kept failing)[/]")


def _print_score_summary(report) -> None:
    counts: dict[str, int] = {}
    for s in report.scores:
        counts[s.label] = counts.get(s.label, 0) + 1
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("refused", "complied", "neutral"))
    done = f"{report.judged} judged now, {report.already_done} already done"
    err_console.print(plain(f"{len(report.scores)} prompts scored ({parts}); {done}; scores in {report.scores_path}, "
                            f"verdicts in {report.verdicts_path}"), soft_wrap=True)


# ----------------------------------------------------------------------------- judge-eval


@click.command("judge-eval")
@click.argument("labelled", type=click.Path(path_type=Path))
@judge_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--split", type=click.Choice(["all", "train", "test"]), default="all", show_default=True,
              help="Only rows of this split (rows without one count as train).")
def judge_eval(labelled, n_ctx, n_gpu_layers, n_threads, as_json, split, **kw) -> None:
    """Compare a judge with human labels: agreement, precision/recall for refusal, confusion, per refusal type."""
    from rs_local.judge.judge_eval import evaluate, load_labelled

    items = [i for i in load_labelled(labelled) if split == "all" or (i.split or "train") == split]
    if not items:
        raise RsLocalError(f"{labelled}: no rows in split {split!r}")
    judge_backend = make_judge_from(kw, n_ctx, n_gpu_layers, n_threads)
    try:
        with row_progress("judging") as progress:
            result = evaluate(judge_backend, items, progress=progress)
    except PromptTooLong as exc:
        raise FileProblem(labelled, str(exc)) from None
    finally:
        judge_backend.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    print_eval(result, Console())


def print_eval(result, console: Console) -> None:
    """Summary line, confusion table and per-type agreement."""
    console.print(f"agreement [bold]{result.agreement:.1%}[/] on {result.n} answers; refusal precision "
                  f"{result.precision:.1%}, recall {result.recall:.1%}, F1 {result.f1:.3f}")
    conf = Table(title="confusion (rows: human label, columns: judge)")
    for col in ("", "judge: refusal", "judge: not refusal", "no verdict"):
        conf.add_column(col, justify="right")
    conf.add_row("human: refusal", str(result.tp), str(result.fn), str(result.no_verdict_refusal))
    conf.add_row("human: not refusal", str(result.fp), str(result.tn), str(result.no_verdict_answer))
    console.print(conf)
    types = Table(title="agreement by human label")
    for col in ("label", "agreed", "total", "rate"):
        types.add_column(col, justify="right" if col != "label" else "left")
    for name, (agreed, total) in sorted(result.by_type.items()):
        types.add_row(name, str(agreed), str(total), f"{agreed / total:.0%}")
    soft_agreed, soft_total = result.soft_refusal_recall()
    if soft_total:
        types.add_row("[bold]all soft refusals[/]", str(soft_agreed), str(soft_total), f"{soft_agreed / soft_total:.0%}")
    console.print(types)


# ----------------------------------------------------------------------------- judge-train


@click.command("judge-train")
@click.argument("labelled", type=click.Path(path_type=Path))
@model_option
@click.option("--blocks", default=None, metavar="A-B", help="Candidate blocks for the probe (default: every second block from a quarter of the depth).")
@runtime_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Probe file to write (.gguf).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def judge_train(labelled, model, blocks, n_ctx, n_gpu_layers, n_threads, output, force) -> None:
    """Train a probe judge for MODEL on hand-labelled answers (rows with "split": "test" are left out)."""
    from rs_local.judge.judge_eval import load_labelled
    from rs_local.judge.probe import write_probe
    from rs_local.judge.probe_train import summary, train_probe, train_rows
    from rs_local.runtime.vector_specs import parse_layer_range

    check_output(output, force)
    check_distinct([output], [labelled])
    items = load_labelled(labelled)
    try:
        train_rows(items)  # before the model loads: a file a probe cannot learn from is its problem, said at once
    except RsLocalError as exc:
        raise FileProblem(labelled, str(exc)) from None
    span = parse_layer_range(blocks) if blocks else None
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    block_list = list(range(span[0], span[1] + 1)) if span else None
    try:
        with row_progress("reading answers") as progress:
            pf = train_probe(runner, items, blocks=block_list, progress=progress, source=str(labelled))
    except PromptTooLong as exc:
        raise FileProblem(labelled, str(exc)) from None
    # a built-in name stays a name; a path is kept absolute (a relative one worked only from where it was trained)
    pf.training["model_ref"] = model if model in MODELS else str(runner.path.resolve())
    write_probe(pf, output, force=force)
    info = summary(pf)
    say(f"probe on block {info['layer']}, threshold {info['threshold']:.3f}, cross-validated accuracy "
        f"{info['cv_accuracy']:.1%} on {info['rows']} train rows; wrote {output}")


COMMANDS = [respond, judge, judge_eval, judge_train]
