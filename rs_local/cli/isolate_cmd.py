"""``rs-local isolate``: the default recipe on your own prompt sets.

Fits a vector that removes the refusals of one set (``--target``, e.g. political questions)
while the refusals of another (``--keep``, e.g. harmful requests) stay: the recipe of
:mod:`rs_local.recipes.isolate`, which ``rs-local demo`` runs on the shipped sets. Thin: loads
the prompts, the model and the judge, calls :func:`fit_political`, writes the GGUF.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from rs_local.cli.judge_cmd import judge_options, make_judge_from
from rs_local.cli.options import (
    bf16_option, check_output, integer, load_runner, model_option, prompt_file_callback, runtime_options, say, utf8_text,
)
from rs_local.cli.terminal import terminal_safe

_FILE = click.Path(dir_okay=False, path_type=Path)


@click.command()
@model_option
@click.option("--target", "-t", type=_FILE, required=True, callback=prompt_file_callback,
              help="Prompts whose refusals should go (e.g. political questions); a file or a shipped set's name.")
@click.option("--keep", "-k", type=_FILE, required=True, callback=prompt_file_callback,
              help="Prompts whose refusals must stay (e.g. harmful requests); a file or a shipped set's name.")
@click.option("--harmless", type=_FILE, required=True, callback=prompt_file_callback,
              help="Everyday prompts the model answers (they set the vector's length); a file or a shipped set's name.")
@click.option("--field", "--column", "field", default=None, help="JSON field / CSV column holding the prompt.")
@click.option("--method", type=click.Choice(["gradient", "md"]), default="gradient", show_default=True,
              help="gradient: refusal-gradient contrast (default); md: mean difference orthogonalised to the keep set's.")
@click.option("--layers", default="8-16", show_default=True, help="Block band the vector spans.")
@click.option("--max-prompts", type=integer(1), default=40, show_default=True,
              help="Refused prompts per set whose gradients are taken (seeded sample).")
@click.option("--objective", type=click.Choice(["opening", "judge"]), default="opening", show_default=True,
              help="What the round at the steered point aims at. opening: the opening of each answer still "
                   "refused there. judge: every target answer, weighted by the probe judge's refusal "
                   "confidence (soft refusals count; loads the probe judge).")
@click.option("--objective-judge", default="probe", show_default=True, metavar="probe[=FILE]",
              help="Probe judge whose confidence weights the answers under --objective judge.")
@click.option("--system", default=None, callback=utf8_text,
              help="System prompt every pass runs under (use the same one when chatting and evaluating).")
@click.option("--output", "-o", type=_FILE, required=True, help="GGUF control vector to write.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@judge_options(default="keywords", why=" (the recipe's opening-based target was tuned on it)")
@bf16_option
@runtime_options
def isolate(model, target, keep, harmless, field, method, layers, max_prompts, objective, objective_judge, system, output,
            force, n_ctx, n_gpu_layers, n_threads, **kw: Any) -> None:
    """Fit a vector that removes TARGET refusals and leaves KEEP refusals alone.

    The plain model answers every prompt, a judge (keywords unless --judge/--judge-url is
    given) marks which are refused, and the vector is fitted from the refused ones. Apply it
    with a negative scale; choose the scale with `rs-local sweep`.
    """
    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.judge.backends import PROBE
    from rs_local.recipes.isolate import Recipe
    from rs_local.files import check_distinct
    from rs_local.prompts import check_disjoint, load_prompts

    check_output(output, force)
    check_distinct([output], [target, keep, harmless])
    sets = [load_prompts(p, field) for p in (target, keep, harmless)]
    check_disjoint([(f"{p} (--{role})", prompts) for p, role, prompts in
                    zip((target, keep, harmless), ("target", "keep", "harmless"), sets)])
    recipe = Recipe(method=method, layers=layers, max_prompts=max_prompts, objective=objective, system=system)
    try:
        recipe.check()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None
    if objective == "judge" and method != "gradient":
        raise click.BadParameter("the judge objective weights the gradient method's steered round; "
                                 "use --method gradient", param_hint="--objective")
    if objective == "judge" and objective_judge != PROBE and not objective_judge.startswith(PROBE + "="):
        raise click.BadParameter("expected 'probe' or 'probe=FILE' (the weights need a confidence per answer)",
                                 param_hint="--objective-judge")
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    try:
        fitted = _fit(runner, kw, (n_ctx, n_gpu_layers, n_threads), model, sets, recipe, objective_judge,
                      names=(_named("target", target), _named("keep", keep)))
    finally:
        runner.llama.close()  # the fit is done, well or not: free llama.cpp's model and context now
    path = write_control_vector(fitted.vector, output, force=force)
    refused = fitted.info.get("refused", {})
    counts = (f" from {refused.get('political', '?')} refused {_named('target', target)} / "
              f"{refused.get('harmful', '?')} refused {_named('keep', keep)} prompts") if refused else ""
    click.echo(terminal_safe(f"wrote {path}: {recipe.describe()}{counts}"))
    same_system = f" --system {shlex.quote(system)}" if system else ""
    (t_set, t_name), (k_set, k_name), (h_set, _) = (_set_arg(r, p) for r, p in
                                                    (("target", target), ("keep", keep), ("harmless", harmless)))
    click.echo(terminal_safe(f"next: rs-local sweep --model {model} --vector {path} --set {t_set} --set {k_set} "
                             f"--set {h_set} --target {t_name} --keep {k_name}{same_system} "
                             f"-o {shlex.quote('sweep-' + Path(path).stem)}/"))  # "sweep/" met the README's own sweep/
    click.echo(terminal_safe(f"in llama.cpp: rs-local inspect {path} --llama-cpp --scale -1 --model {model}"))


def _fit(runner, kw: dict[str, Any], runtime: tuple, model: str, sets: list, recipe, objective_judge: str,
         names: tuple[str, str]):
    """Load the judges, run the recipe on ``runner``, close the judges (error or not)."""
    from rs_local.judge.backends import make_judge
    from rs_local.recipes.isolate import fit_political

    n_ctx, n_gpu_layers, n_threads = runtime
    judge = make_judge_from(kw, *runtime, share=runner)
    scorer = None
    try:
        if recipe.objective == "judge":
            scorer = make_judge(objective_judge, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                                share=runner)
        return fit_political(model, *sets, recipe, say=say, runner=runner, judge=judge, target_judge=scorer,
                             names=names)
    finally:
        judge.close()
        if scorer is not None:
            scorer.close()


def _set_arg(role: str, path: Path) -> tuple[str, str]:
    """``(--set argument, set name)`` for a prompt file in the suggested sweep: a shipped set by its
    bare name (as ``eval --set`` takes it), anything else as ``role=path``."""
    from rs_local.eval.prompt_sets import BUILTIN_SETS, builtin_path

    name = path.stem
    if name in BUILTIN_SETS and path == builtin_path(name):
        return name, name
    return f"{role}={path}", role


def _named(role: str, path: Path) -> str:
    """How messages call a set: its role and the user's file name (the sets can be about anything)."""
    return f"{role} ({terminal_safe(path.name)})"


COMMANDS = [isolate]
