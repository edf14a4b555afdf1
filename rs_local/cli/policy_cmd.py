"""`rs-local policy fit` and `rs-local policy show`: conditional steering policies."""

from __future__ import annotations

from pathlib import Path

import click

from rs_local.cli.options import check_output, load_runner, model_option, runtime_options, say, utf8_text
from rs_local.cli.terminal import terminal_safe
from rs_local.errors import RsLocalError
from rs_local.files import check_distinct, dumps


@click.group()
def policy() -> None:
    """Per-prompt steering: category probes decide which vector (if any) applies."""


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise RsLocalError(f"bad {option} '{v[:80]}': expected CATEGORY=VALUE")
        if name in out:
            raise RsLocalError(f"{option} {name} is given twice")
        out[name] = rest
    return out


def _specs(categories: tuple[str, ...], vectors: tuple[str, ...], scales: tuple[str, ...]):
    """Parse everything that needs no model: categories, their files, vectors and scales."""
    from rs_local.recipes.policy_fit import check_scale_sign, load_category_prompts, parse_category
    from rs_local.runtime.vector_specs import load_vector_specs, parse_scale

    specs = [parse_category(c) for c in categories]
    by_name = {s.name: s for s in specs}
    for option, pairs in (("--vector", _pairs(vectors, "--vector")), ("--scale", _pairs(scales, "--scale"))):
        for name, value in pairs.items():
            spec = by_name.get(name)
            if spec is None:
                raise RsLocalError(f"{option} {name}: no such category ({', '.join(by_name)})")
            if spec.action == "keep":
                raise RsLocalError(f"{option} {name}: a keep category is never steered")
            if option == "--vector":
                spec.vector = load_vector_specs([value])[0][0]
            else:
                spec.scale = parse_scale(value, f"scale for {name}")
                check_scale_sign(spec)
    load_category_prompts(specs)
    return specs


def _thresholds(values: tuple[str, ...], names: list[str]) -> tuple[float, dict[str, float]]:
    """``--threshold`` values: one bare ``P`` for every category, ``NAME=P`` for one (0.01-0.99)."""
    from rs_local.runtime.vector_specs import parse_decimal

    def value(text: str, what: str) -> float:
        p = parse_decimal(text, what)
        if not 0.01 <= p <= 0.99:
            raise RsLocalError(f"bad {what} '{text[:20]}': a probe confidence between 0.01 and 0.99")
        return p

    shared = [v for v in values if "=" not in v]
    if len(shared) > 1:
        raise RsLocalError("--threshold without a category name is given twice")
    default = value(shared[0], "--threshold") if shared else 0.5
    own = _pairs(tuple(v for v in values if "=" in v), "--threshold")
    for name in own:
        if name not in names:
            raise RsLocalError(f"--threshold {name}: no such category ({', '.join(names)})")
    return default, {name: value(text, f"--threshold {name}") for name, text in own.items()}


def _blocks(spec: str | None, n_layer: int, option: str) -> list[int] | None:
    from rs_local.vectors.layers import parse_layers

    if spec is None:
        return None
    try:
        blocks = parse_layers(spec, n_layer)
    except ValueError as exc:
        raise RsLocalError(f"{option}: {exc}") from None
    if blocks is None:  # auto: the policy's own defaults (default_probe_blocks / default_steer_blocks)
        return None
    if option == "--probe-layers" and spec.strip().lower() == "all":  # every block that can be probed
        blocks = [b for b in blocks if b != n_layer - 1]
    if option == "--probe-layers" and n_layer - 1 in blocks:  # llama.cpp keeps only its last token's row
        raise RsLocalError(f"{option}: the final block ({n_layer - 1}) cannot be probed: llama.cpp keeps only its last "
                           "token's output there, and the probe averages the prompt's last tokens")
    return blocks


@policy.command("fit")
@click.option("--category", "categories", multiple=True, required=True, metavar="NAME=FILE:ACTION|SET:ACTION",
              help="A category: its prompt file and action (remove / refuse / keep), or a shipped set by name "
                   "(e.g. gambling:refuse). Repeat for each.")
@click.option("--vector", "vectors", multiple=True, metavar="NAME=PATH",
              help="Use this vector file for a steered category instead of fitting one.")
@click.option("--fit-vectors", type=click.Choice(("gradient", "mean-difference")), default="gradient", show_default=True,
              help="How a steered category without --vector gets one: refusal gradients (remove: of its own refused "
                   "prompts; refuse: of the model's stock refusal of --refusal-from's prompts, on its own; needs "
                   "Transformers) or mean differences from the baseline (torch-free).")
@click.option("--scale", "scales", multiple=True, metavar="NAME=X",
              help="Scale for a category (default: -1 for remove, +1 for refuse).")
@click.option("--baseline", default=None, help="The benign category directions are measured from (default: benign/harmless).")
@click.option("--refusal-from", default=None,
              help="Category the model refuses; a refuse category gets its stock refusal (default: harmful).")
@click.option("--threshold", "thresholds", multiple=True, metavar="[NAME=]P",
              help="Below this probe confidence the gate abstains and the plain model answers (default 0.5); "
                   "NAME=P sets one category's (repeatable).")
@click.option("--layers", default=None, metavar="BLOCKS", help="Blocks the fitted directions steer (default: middle third).")
@click.option("--probe-layers", default=None, metavar="BLOCKS", help="Candidate probe blocks (default: middle half).")
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True,
              help="Grouped cross-validation folds for choosing the probe and reporting held-out accuracy.")
@click.option("--check-refusals/--no-check-refusals", default=True, show_default=True,
              help="Refuse a remove category the model never refuses (answers up to 16 of its prompts first; "
                   "a category whose vector is fitted here is checked by its fit).")
@click.option("--system", default=None, callback=utf8_text,
              help="System prompt the gate will see (the probe reads the whole chat; the vectors are fitted "
                   "under it too).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite the output.")
@model_option
@runtime_options
def fit(categories, vectors, fit_vectors: str, scales, baseline, refusal_from, thresholds, layers, probe_layers, folds,
        check_refusals: bool, system, output: Path, force: bool, model: str, n_ctx, n_gpu_layers, n_threads) -> None:
    """Fit category probes and per-category vectors into one policy file."""
    from rs_local.recipes.policy_fit import (
        check_prompt_lengths, check_refuses, check_roles, default_steer_blocks, fit_policy,
    )
    from rs_local.recipes.policy_vectors import check_fit_extra, fit_category_vectors, needs_gradient
    from rs_local.runtime.policy_file import write_policy

    check_output(output, force)
    specs = _specs(categories, vectors, scales)
    check_distinct([output], [s.path for s in specs] + [s.vector.source for s in specs if s.vector is not None])
    threshold, per_category = _thresholds(thresholds, [s.name for s in specs])
    base, source = check_roles(specs, baseline, refusal_from)
    to_fit = needs_gradient(specs, fit_vectors)
    if to_fit:
        check_fit_extra()
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    steer = _blocks(layers, runner.n_layer, "--layers")  # a typo in a block list costs no labelling pass
    probe_blocks = _blocks(probe_layers, runner.n_layer, "--probe-layers")
    check_prompt_lengths(runner, specs, system)
    for spec in specs:  # a given vector must fit the model before anything is read
        if spec.vector is not None:
            runner.check_vector(spec.vector, spec.vector.source or spec.name)
    if check_refusals:
        for spec in specs:  # a vector fitted below labels every prompt of its category and checks this itself
            if spec.action == "remove" and all(spec is not f for f in to_fit):
                n = check_refuses(runner, spec, system=system)
                say(f"{spec.name}: {n} of its first {min(16, len(spec.prompts))} prompts refused by the plain model")
    if to_fit:
        fit_category_vectors(str(runner.path), runner, to_fit, specs[base], None if source is None else specs[source],
                             steer or default_steer_blocks(runner.n_layer), say=say, system=system)
    pol = fit_policy(runner, specs, probe_blocks=probe_blocks,
                     steer_blocks=steer, baseline=baseline,
                     refusal_from=refusal_from, threshold=threshold, thresholds=per_category, system=system, k=folds,
                     say=say)
    write_policy(pol, output, force=force)
    _print_summary(pol.summary(), str(output))


@policy.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def show(path: Path, as_json: bool) -> None:
    """Categories, probe block, held-out accuracy, actions and thresholds of a policy file."""
    from rs_local.runtime.policy_file import read_policy

    summary = read_policy(path).summary()
    if as_json:
        click.echo(dumps(summary))
        return
    _print_summary(summary, str(path))


def _print_summary(s: dict, path: str) -> None:
    """The table; every string read from the file (model name, category names, vector notes) is
    escaped for the terminal: a policy file is anyone's, and an escape sequence in a category name
    would otherwise rewrite the user's terminal."""
    from rs_local.runtime.policy_file import training_notes

    t = terminal_safe
    click.echo(t(f"{path}: policy for {s['model'] or '?'} ({s['model_arch']}, n_embd {s['n_embd']}, "
                 f"{s['n_layer']} blocks); probe block {s['probe_block']} (mean of the last {s['pool_tokens']} "
                 f"prompt tokens), decision {s['decision']}"))
    click.echo(f"  {'category':<16} {'action':<7} {'scale':>6} {'thresh':>6} {'held-out':>8} {'prompts':>7}  vector")
    for c in s["categories"]:
        acc = "-" if c["heldout_accuracy"] is None else f"{c['heldout_accuracy']:.1%}"
        vec = "" if c["blocks"] is None else f"blocks {c['blocks']}: {c['vector'] or ''}"
        click.echo(t(f"  {c['name']:<16} {c['action']:<7} {c['scale']:>6g} {c['threshold']:>6.2f} {acc:>8} "
                     f"{c['prompts']:>7}  {vec}"))
    for line in training_notes(s):
        click.echo(t(f"  {line}"))

COMMANDS = [policy]
