"""``rs-local inspect`` and ``rs-local convert``: look into and translate vector files.

Thin on purpose: reading, summarising and writing live in ``rs_local.converters``; errors
(RsLocalError) are turned into one-line messages by the command group in ``cli/main.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rs_local.cli.options import scale_number
from rs_local.cli.terminal import terminal_safe
from rs_local.converters import describe, load_vector, save_vector
from rs_local.converters.formats import json_safe
from rs_local.errors import FileProblem

_PATH = click.Path(dir_okay=False, path_type=Path)
MAX_SHOWN = 2000  # characters of one metadata value in the table view


def json_text(value: object) -> str:
    """Standard JSON (non-finite floats as strings, see json_safe) that is also terminal safe.

    Non-ASCII text stays readable; only characters that are not printable are written as
    JSON \\u escapes (they can occur only inside strings, where the escape is valid JSON).
    """
    text = json.dumps(json_safe(value), indent=2, ensure_ascii=False, allow_nan=False)
    return "".join(ch if ch.isprintable() or ch == "\n" else _json_escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _print_summary(path: Path, info: dict) -> None:
    console = Console()
    # Text(), not markup strings: file names and metadata may contain "[...]".
    console.print(Text(terminal_safe(str(path)), style="bold"), soft_wrap=True)  # a path is not wrapped
    hint = terminal_safe(info["model_hint"], MAX_SHOWN) or "(none)"
    console.print(Text(f"model hint: {hint}   n_embd: {info['n_embd']}   layer count: {info['layer_count']}"))
    table = Table("block", "norm")
    for row in info["layers"]:
        table.add_row(str(row["block"]), f"{row['norm']:.4f}")
    console.print(table)
    if info["metadata"]:
        meta = Table("key", "value", title="provenance")
        for key, value in info["metadata"].items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            meta.add_row(Text(terminal_safe(key, MAX_SHOWN)), Text(terminal_safe(text, MAX_SHOWN)))
        console.print(meta)


@click.command()
@click.argument("file", type=_PATH)
@click.option("--json", "as_json", is_flag=True,
              help="Print standard JSON instead of tables (NaN/Infinity values as the strings \"NaN\", \"Infinity\", \"-Infinity\").")
@click.option("--llama-cpp", "llama_cpp", is_flag=True,
              help="Print ready-to-paste llama-completion / llama-server command lines for this vector instead.")
@click.option("--scale", type=scale_number(), default=-1.0, show_default=True, help="Scale for --llama-cpp.")
@click.option("--model", "-m", default=None, metavar="NAME|PATH",
              help="Model for --llama-cpp: built-in name (not downloaded) or GGUF path [default: the default model].")
def inspect(file: Path, as_json: bool, llama_cpp: bool = False, scale: float = -1.0, model: str | None = None) -> None:
    """Show a vector file's layers (block, norm), n_embd, model hint and provenance.

    A conditional-steering policy file shows its categories, probe block, held-out accuracy,
    actions, thresholds and model instead; a probe judge (`judge-train`'s output, or the shipped
    one) its model, block, threshold, training rows and measured figures.

    Control characters and escape sequences from the file are shown escaped, never sent to
    the terminal.
    """
    from rs_local.converters.gguf_check import file_architecture
    from rs_local.judge.probe import ARCH as JUDGE_ARCH
    from rs_local.runtime.policy_file import ARCH as POLICY_ARCH

    arch = file_architecture(file)
    if arch == POLICY_ARCH:
        if llama_cpp:
            raise FileProblem(file, "is a conditional-steering policy, which llama.cpp's tools cannot gate; "
                                    "use rs-local generate/chat/serve --policy")
        _print_policy(file, as_json)
        return
    if arch == JUDGE_ARCH:
        if llama_cpp:
            raise FileProblem(file, "is a probe judge, not a control vector; use it with rs-local judge --judge probe=FILE")
        _print_judge(file, as_json)
        return
    if llama_cpp:
        _print_llama_cpp(file, scale, model)
        return
    info = describe(load_vector(file))
    if as_json:
        click.echo(json_text({"path": str(file), **info}))
    else:
        _print_summary(file, info)


def _print_policy(file: Path, as_json: bool) -> None:
    """A conditional-steering policy: categories, probe block, held-out accuracy, actions, thresholds, model."""
    from rs_local.runtime.policy_file import read_policy, training_notes

    summary = read_policy(file).summary()
    if as_json:
        click.echo(json_text({"path": str(file), **summary}))
        return
    console = Console()
    console.print(Text(terminal_safe(str(file)), style="bold"), soft_wrap=True)
    console.print(Text(f"conditional-steering policy for {terminal_safe(summary['model'], MAX_SHOWN) or '?'}   "
                       f"model hint: {terminal_safe(summary['model_arch'], MAX_SHOWN) or '(none)'}   "
                       f"n_embd: {summary['n_embd']}   blocks: {summary['n_layer']}   "
                       f"probe block: {summary['probe_block']}"), soft_wrap=True)
    for c in summary["categories"]:  # one line each, soft-wrapped: a table would cut columns on narrow terminals
        acc = "-" if c["heldout_accuracy"] is None else f"{c['heldout_accuracy']:.1%}"
        steer = f"   blocks {c['blocks']} ({c['vector'] or 'vector'})" if c["blocks"] else ""
        line = (f"  {c['name']}: {c['action']}   scale {c['scale']:g}   threshold {c['threshold']:.2f}   "
                f"held-out accuracy {acc}   {c['prompts']} prompts{steer}")
        console.print(Text(terminal_safe(line, MAX_SHOWN)), soft_wrap=True)
    for note in training_notes(summary):
        console.print(Text(terminal_safe(f"  {note}", MAX_SHOWN), style="yellow"), soft_wrap=True)


def _print_judge(file: Path, as_json: bool) -> None:
    """A probe judge: the model it reads with, its block and rule, and the figures recorded at training."""
    from rs_local.judge.probe import read_probe
    from rs_local.judge.probe_train import summary

    pf = read_probe(file)
    info = {**summary(pf), "model_arch": pf.model_arch, "n_embd": pf.n_embd, "n_layer": pf.n_layer,
            "training": pf.training}
    if as_json:
        click.echo(json_text({"path": str(file), **info}))
        return
    console = Console()
    console.print(Text(terminal_safe(str(file)), style="bold"), soft_wrap=True)
    for line in judge_lines(info):
        console.print(Text(terminal_safe(line, MAX_SHOWN)), soft_wrap=True)


def judge_lines(info: dict) -> list[str]:
    """The probe judge's facts as short lines; figures a file does not record are left out, not shown as 0."""
    t = info["training"]
    lines = [f"probe judge for {info['model'] or '?'}   model hint: {info['model_arch'] or '(none)'}   "
             f"n_embd: {info['n_embd']}   blocks: {info['n_layer']}",
             f"  reads block {info['layer']} ({info['pooling']} pooling)   threshold {info['threshold']:.2f}   "
             f"rule: {info['combine']}"]
    if t.get("rows") is not None:
        lines.append(f"  trained on {t['rows']} labelled answers ({t.get('refusals', '?')} refusals) from "
                     f"{t.get('source') or '?'}; {t.get('test_rows_excluded', 0)} test rows kept out")
    if isinstance(t.get("cv_accuracy"), (int, float)):
        lines.append(f"  cross-validated agreement {t['cv_accuracy']:.1%} ({t.get('folds', '?')} folds)")
    test = t.get("test_figures")
    if isinstance(test, dict) and isinstance(test.get("agreement"), (int, float)):
        extra = "".join(f"   {k} {test[k]:.1%}" for k in ("precision", "recall") if isinstance(test.get(k), (int, float)))
        lines.append(f"  test split: agreement {test['agreement']:.1%} on {test.get('rows', '?')} answers{extra}")
    return lines


def _print_llama_cpp(file: Path, scale: float, model: str | None) -> None:
    """``inspect --llama-cpp``: the flags for llama.cpp's own tools, from rs_local.runtime.llama_flags."""
    from rs_local.models import DEFAULT_MODEL
    from rs_local.runtime.llama_flags import llama_cpp_flags

    flags = llama_cpp_flags([(file, scale)], model=model or DEFAULT_MODEL)
    for line in flags.render().splitlines():
        click.echo(terminal_safe(line))


@click.command()
@click.argument("source", type=_PATH)
@click.argument("target", type=_PATH)
@click.option("--force", is_flag=True, help="Overwrite TARGET if it exists.")
def convert(source: Path, target: Path, force: bool) -> None:
    """Convert between .gguf, .npz and .safetensors (format chosen by suffix)."""
    cv = load_vector(source)
    save_vector(cv, target, force=force)
    click.echo(terminal_safe(f"wrote {target} ({len(cv.directions)} directions, n_embd {cv.n_embd})"))


COMMANDS = [inspect, convert]
