"""`rs-local eval`, `rs-local sweep` and `rs-local demo`: measure a vector, choose its scale, show it working."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from rs_local.cli.judge_cmd import judge_options, make_judge_from
from rs_local.cli.options import (
    bf16_option, check_output, err_console, integer, layer_range_callback, load_runner, model_option, number, parse_number_list,
    note_system, runtime_options, say, utf8_text,
)
from rs_local.cli.terminal import plain, styled
from rs_local.errors import RsLocalError
from rs_local.files.figures import require_pyplot

DEFAULT_SETS = ("political", "harmful", "harmless")
#: Most scale points the outward walk of one band may take (the default walk takes 12).
MAX_SWEEP_POINTS = 200
#: Rates default to keywords: the probe judge, better on answers like its training labels, called
#: 47% of plain answers to held-out Alpaca tasks refusals (benchmarks/refusal_steering.py --judge
#: probe), and a rate that wrong would mislead a sweep. `--judge probe` adds its soft-refusal view.
RATE_JUDGE = "keywords"


def _count(n: float) -> str:
    """A count for a message: 1,000,000, but 1e+300 rather than three hundred digits."""
    return f"{n:,.0f}" if n < 1e12 else f"{n:.3g}"


def _scales(text: str) -> list[float]:
    """``--scales``: comma-separated plain decimal scales, each finite and within the scale limit."""
    return parse_number_list(text, "--scales")


def eval_options(f: Callable) -> Callable:
    """Prompt sets, generation and metric settings shared by `eval` and `sweep`."""
    for opt in reversed([
        click.option("--vector", "--control-vector", "vectors", multiple=True, metavar="PATH[:WEIGHT]",
                     help="Control vector (repeatable; several are summed, each times its WEIGHT). Required "
                          "(for eval: unless --policy is given)."),
        click.option("--set", "sets", multiple=True, metavar="NAME=PATH",
                     help="Prompt set to evaluate (repeatable); a bare built-in name (political, harmful, harmless, "
                          "alarming, gambling) uses the set shipped with rs-local. Default: political, harmful, "
                          "harmless."),
        click.option("--field", "--column", "field", default=None,
                     help="JSON field / CSV column holding the prompt in the --set files (default: text, prompt, goal, "
                          "instruction or question, in any case)."),
        click.option("--limit", "-N", type=integer(1), default=None, help="At most N prompts per set (seeded sample)."),
        click.option("--kl-set", default="harmless", show_default=True, help="Set on which KL and coherence are measured."),
        click.option("--max-tokens", "-n", type=integer(1), default=48, show_default=True,
                     help="Answer length; refusals show in the first few dozen tokens."),
        click.option("--kl-tokens", type=integer(1), default=16, show_default=True, help="Answer tokens the KL is averaged over."),
        click.option("--system", default=None, callback=utf8_text, help="System prompt."),
        click.option("--batch", type=integer(1, 4096), default=None,
                     help="Sequences per llama.cpp batch (1 = one at a time, exactly as `rs-local chat`; "
                          "default: as many as fit 1 GiB of KV cache, at most 32)."),
        click.option("--exact", is_flag=True,
                     help="A KV stream per sequence (about 0.6x the speed): no prompt shares a KV pool with another, "
                          "so answers do not depend on --batch where llama.cpp computes each sequence the same "
                          "whatever the batch (not on every CPU and quantization; --batch 1 is exact everywhere). "
                          "Without it the batch shares one KV pool: repeatable, but a near-tied token can differ "
                          "between batch sizes."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the baseline/verdict cache."),
        click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Output directory."),
        click.option("--force", is_flag=True, help="Write into an existing output directory."),
    ]):
        f = opt(f)
    return f


def _typed(option: str) -> bool:
    """Whether the user gave ``option`` on the command line (not its default)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(option) == click.core.ParameterSource.COMMANDLINE


def _check_kl_set(name: str, names: list[str]) -> None:
    """A --kl-set the user typed must name one of the sets; the default, absent, only drops the KL column
    (a typo used to drop it silently too)."""
    if _typed("kl_set") and name not in names:
        raise click.BadParameter(f"'{name}' is not one of the sets ({', '.join(names)})", param_hint="'--kl-set'")


def _setup(kw: dict[str, Any]):
    """Everything `eval` and `sweep` share: sets, vector, settings, cache (checked before loading models)."""
    from rs_local.eval.baseline_cache import EvalCache
    from rs_local.eval.evaluate import EvalSettings
    from rs_local.eval.prompt_sets import load_sets
    from rs_local.runtime.vector_specs import check_layer_range, load_vector_specs, parse_layer_range
    from rs_local.vectors.control_vector import ControlVector

    policy = kw.get("policy")
    if policy is not None and kw["vectors"]:
        raise click.UsageError("--policy brings its own vectors: give --policy or --vector, not both")
    if policy is None and not kw["vectors"]:
        raise click.UsageError("Missing option '--vector'" + (" (or --policy)" if "policy" in kw else ""))
    check_output(Path(kw["output"]), kw["force"], directory=True)  # before any model loads; parents are not created
    sets = load_sets(kw["sets"] or DEFAULT_SETS, limit=kw["limit"], field=kw["field"])
    _check_kl_set(kw["kl_set"], [s.name for s in sets])
    settings = EvalSettings(max_tokens=kw["max_tokens"], kl_tokens=kw["kl_tokens"], kl_set=kw["kl_set"],
                            system=kw["system"], batch=kw["batch"], exact=kw["exact"])
    cache = EvalCache(None if kw["no_cache"] else "default")
    if policy is not None:
        from rs_local.runtime.policy_file import read_policy

        gate = read_policy(policy)
        note_system([], kw["system"], gate, policy)
        _check_inputs_kept(kw["output"], sets, [policy])
        return sets, gate, None, settings, cache
    parts = load_vector_specs(kw["vectors"], default_scale=1.0)
    note_system(parts, kw["system"])
    vector = ControlVector.merge(parts) if len(parts) > 1 or parts[0][1] != 1.0 else parts[0][0]
    vector.source = vector.source or ", ".join(kw["vectors"])
    vector.metadata.setdefault("path", vector.source)
    layers = parse_layer_range(kw["layers"]) if kw.get("layers") is not None else None
    check_layer_range([(vector, 1.0)], layers)
    _check_inputs_kept(kw["output"], sets, [v.source for v, _ in parts])
    return sets, vector, layers, settings, cache


def _check_inputs_kept(output: Path, sets, others: list) -> None:
    """No file the command writes into ``--output`` may be one it reads.

    Why: ``--set a=out/answers.jsonl -o out --force`` replaced the user's prompt set with the answers,
    exit 0 (``--force`` only means "write into an existing directory")."""
    from rs_local.eval.report import OUTPUTS
    from rs_local.files import check_distinct

    inputs = [s.source for s in sets if not s.source.startswith("built-in:")] + [o for o in others if o]
    check_distinct([Path(output) / name for name in OUTPUTS], inputs)


# ----------------------------------------------------------------------------- eval


@click.command("eval")
@model_option
@eval_options
@click.option("--scales", default="0,-0.5,-1,-1.5", show_default=True, help="Comma-separated scales (0 = plain model, always included).")
@click.option("--layers", default=None, metavar="START-END", callback=layer_range_callback,
              help="Apply the vector only to these blocks.")
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot.")
@click.option("--policy", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Evaluate a conditional-steering policy instead of a vector: plain vs gated refusal per set, "
                   "where the gate routed each set, KL on the KL set.")
@judge_options(default=RATE_JUDGE, why=" (--judge probe to count soft refusals)")
@runtime_options
def eval_(model, scales, no_plot, n_ctx, n_gpu_layers, n_threads, **kw) -> None:
    """Refusal rate per prompt set and scale (judge and keywords), KL and degeneration on the KL set.

    Writes report.json, answers.jsonl and refusal_vs_scale.png into --output and prints the table.
    With --policy: the plain model and the gated one side by side (report.json, answers.jsonl).
    """
    from rs_local.eval.evaluate import evaluate
    from rs_local.eval.report import summary_table, write_report

    scale_list = _scales(scales)
    if not no_plot and kw["policy"] is None:
        require_pyplot(", or --no-plot")  # before the evaluation, not after it
    if kw["policy"] is not None:  # the gate picks each category's vector, scale and blocks: nothing to vary
        fixed = [f"--{n}" for n in ("scales", "layers") if _typed(n)]
        if fixed:
            raise click.UsageError(f"--policy sets the scales and blocks per category; drop {' and '.join(fixed)}")
    sets, vector, layers, settings, cache = _setup(kw)
    if kw["policy"] is not None:
        _eval_policy(model, kw, sets, vector, settings, cache, (n_ctx, n_gpu_layers, n_threads))
        return
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    judge = make_judge_from(kw, n_ctx, n_gpu_layers, n_threads, share=runner)
    try:
        report = evaluate(runner, sets, scale_list, vector=vector, layers=layers, judge=judge, settings=settings,
                          cache=cache, say=say)
    finally:
        judge.close()
    paths = write_report(report, kw["output"], force=kw["force"], plot=not no_plot)
    Console().print(summary_table(report, title=plain(f"{runner.path.name}: refusal rate by {report.meta['judge'].get('backend')} "
                                                      "judge (keywords)")))
    _wrote(paths)


def _wrote(paths: dict[str, Path]) -> None:
    """``wrote PATH, PATH`` on stderr, the paths as text and on one line (a wrapped path cannot be copied)."""
    err_console.print(plain("wrote " + ", ".join(str(p) for p in paths.values())), soft_wrap=True)


def _eval_policy(model, kw: dict[str, Any], sets, policy, settings, cache, runtime: tuple) -> None:
    """``eval --policy``: the gate on llama.cpp decides per prompt; plain and gated side by side."""
    from rs_local.eval.policy_eval import evaluate_policy, policy_table, write_policy_report
    from rs_local.runtime.policy import PolicyRunner

    runner = load_runner(model, *runtime)
    gate = PolicyRunner(runner, policy, kw["policy"])
    judge = make_judge_from(kw, *runtime, share=runner)
    try:
        report = evaluate_policy(runner, sets, gate, judge=judge, settings=settings, cache=cache, say=say)
    finally:
        judge.close()
        gate.close()
    paths = write_policy_report(report, kw["output"], force=kw["force"])
    Console().print(policy_table(report, title=plain(f"{runner.path.name}: refusal rate by {report.meta['judge'].get('backend')} "
                                                     f"judge (keywords), plain vs gated by {Path(kw['policy']).name}")))
    _wrote(paths)


# ----------------------------------------------------------------------------- sweep


def _bands(text: str | None, layers: str | None, vector=None):
    """``--bands A-B,C-D`` (a list of ranges is meant here) or the one ``--layers`` range; each must hit the vector."""
    from rs_local.runtime.vector_specs import check_layer_range, parse_layer_range

    if text is not None:
        items = [b.strip() for b in text.split(",")]
        if any(not b for b in items):
            raise click.BadParameter(f"'{text}': expected layer ranges separated by commas, e.g. 8-12,10-16", param_hint="--bands")
        bands = [parse_layer_range(b) for b in items]
    else:
        bands = [parse_layer_range(layers) if layers is not None else None]
    for band in bands:
        if vector is not None:
            check_layer_range([(vector, 1.0)], band, "--bands" if text is not None else "--layers")
    return bands


@click.command()
@model_option
@eval_options
@click.option("--target", required=True, help="Set whose refusals should go (e.g. political).")
@click.option("--keep", multiple=True, help="Set whose refusals must stay (repeatable, e.g. harmful); with --induce, "
                                             "whose answers must stay (e.g. harmless).")
@click.option("--keep-frac", type=number(0, 1), default=0.9, show_default=True,
              help="Keep-set refusal rate (with --induce: answer rate) must stay >= this fraction of its unsteered rate.")
@click.option("--max-kl", type=number(0, min_open=True), default=0.1, show_default=True,
              help="Largest KL(plain || steered) in nats allowed on the KL set.")
@click.option("--step", type=number(0, 1000, min_open=True), default=0.25, show_default=True, help="Scale step of the outward walk.")
@click.option("--max-scale", type=number(0, 1000, min_open=True), default=3.0, show_default=True, help="Largest |scale| tried.")
@click.option("--refine", type=integer(0, 60), default=3, show_default=True, help="Bisection steps after a constraint breaks.")
@click.option("--induce", is_flag=True, help="Search positive scales for the most target refusal (induce it) instead of "
                                               "negative ones for the least.")
@click.option("--layers", default=None, metavar="START-END", callback=layer_range_callback,
              help="Apply the vector only to these blocks.")
@click.option("--bands", default=None, metavar="A-B,C-D", help="Also search over these layer bands (best one wins).")
@click.option("--full", is_flag=True, help="Measure every set at every point (slower; a complete frontier).")
@judge_options(default=RATE_JUDGE, why=" (--judge probe to count soft refusals)")
@runtime_options
def sweep(model, target, keep, keep_frac, max_kl, step, max_scale, refine, induce, bands, full,
          n_ctx, n_gpu_layers, n_threads, **kw) -> None:
    """Find the scale (and band) that removes most --target refusals (with --induce: adds most) within the --keep
    and --max-kl limits."""
    from rs_local.eval.evaluate import Evaluator
    from rs_local.eval.sweep import evaluator_objective, search_bands, shortfall
    from rs_local.eval.sweep_report import sweep_table, write_sweep

    if math.floor(max_scale / step + 1e-9) > MAX_SWEEP_POINTS:  # each point evaluates every set: --step 0.001 --max-scale 1000 ran for days
        raise click.UsageError(f"--max-scale {max_scale:g} in steps of {step:g} is {_count(max_scale / step)} points per band; "
                               f"at most {MAX_SWEEP_POINTS} (raise --step; --refine bisects between steps)")
    if target in keep:
        raise click.UsageError(f"--target {target} is also a --keep set: its refusals cannot both go and stay")
    require_pyplot()  # the sweep's plot, found missing after every point was evaluated

    sets, vector, _layers, settings, cache = _setup(kw)
    names = [s.name for s in sets]
    for name in (target, *keep):
        if name not in names:
            raise RsLocalError(f"--target/--keep '{name}' is not one of the sets ({', '.join(names)})")
    if kw["kl_set"] not in names:  # the column read "KL (<= 0.1)" with "-" everywhere, and nothing said why
        err_console.print(styled(("warning:", "yellow"), f" --max-kl is not applied: the KL set '{kw['kl_set']}' is not one "
                                 f"of the sets (add --set {kw['kl_set']}=FILE, or name one with --kl-set)"), soft_wrap=True)
    band_list = _bands(bands, kw.get("layers"), vector)
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    judge = make_judge_from(kw, n_ctx, n_gpu_layers, n_threads, share=runner)
    ev = Evaluator(runner, sets, vector=vector, judge=judge, settings=settings, cache=cache, say=say)
    try:
        objective = evaluator_objective(ev, target, keep, max_kl, keep_frac, full=full, induce=induce)
        result = search_bands(objective, band_list, keep_frac=keep_frac, max_kl=max_kl, sign=1 if induce else -1,
                              step=step, max_abs=max_scale, refine=refine)
    finally:
        ev.close()
        judge.close()
    paths = write_sweep(result, ev, target, kw["output"], force=kw["force"])
    console = Console()
    console.print(sweep_table(result, target))
    ch = result.chosen
    if result.baseline.target is not None and shortfall(result.baseline, induce) <= 0:
        console.print(plain(f"the {target} set is refused every time without steering: nothing to induce" if induce else
                            f"the {target} set is not refused even without steering: nothing to remove", "yellow"))
    elif ch is None or ch.scale == 0:
        console.print(styled(("no steered point met the constraints", "yellow"), f" ({result.stopped})"))
    else:
        band = f" --layers {ch.layers[0]}-{ch.layers[1]}" if ch.layers else ""
        kl = "" if ch.kl is None else f", KL {ch.kl:.3f}"
        console.print(plain(f"chosen: scale {ch.scale:+g}{band}: {target} refusal {ch.target:.0%} "
                            f"(unsteered {result.baseline.target:.0%}){kl}"))
        console.print(plain(f"use it: rs-local chat --vector {kw['vectors'][0]} --scale {ch.scale:g}{band}"), soft_wrap=True)
    err_console.print(plain(result.stopped, "dim"))
    _wrote(paths)


# ----------------------------------------------------------------------------- demo


@click.command()
@model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("rs-local-demo"), show_default=True,
              help="Directory for the vector, report and plot.")
@click.option("--scales", default=None, help="Scales to show (default: chosen for the model).")
@click.option("--n", "n_eval", type=integer(4), default=None, help="Held-out prompts per set to evaluate (default 20).")
@click.option("--judge", "judge_name", default="keywords", show_default=True, metavar="probe[=FILE]|keywords|MODEL",
              help="Refusal judge: 'keywords' (fast), 'probe' for the shipped probe judge (probe=FILE for one "
                   "from `judge-train`), or a local model name/GGUF for the LLM judge.")
@click.option("--force", is_flag=True, help="Reuse an existing output directory.")
@bf16_option
@runtime_options
def demo(model, output, scales, n_eval, judge_name, force, n_ctx, n_gpu_layers, n_threads) -> None:
    """The whole flow offline: pull the model, fit a political-refusal vector, evaluate it, show before/after."""
    from rs_local.recipes.demo import DemoOptions, run_demo

    require_pyplot()  # the demo's plot comes last, after minutes of work
    opts = DemoOptions(model=model, output=output, force=force, judge=judge_name, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                       n_threads=n_threads)
    if scales is not None:
        opts.scales = _scales(scales)
    if n_eval:
        opts.n_eval = n_eval
    result = run_demo(opts, say=say)
    _print_demo(result)


def _print_demo(result) -> None:
    from rs_local.eval.report import summary_table

    console = Console()
    console.print(summary_table(result.report, title="refusal rate before / after (held-out prompts)"))
    for ex in result.examples:  # prompts and answers are text: a model's '[/INST]' is not markup
        table = Table(title=plain(ex.prompt, "bold"), show_header=True, expand=True)
        table.add_column("plain model", ratio=1)
        table.add_column(f"steered (scale {ex.scale:g})", ratio=1)
        table.add_row(plain(ex.before, multiline=True), plain(ex.after, multiline=True))
        console.print(table)
    console.print(plain(result.summary))
    for step in result.next_steps:
        console.print(plain(step), soft_wrap=True)  # commands to copy: one line each


COMMANDS = [eval_, sweep, demo]
