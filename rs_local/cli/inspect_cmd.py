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

from rs_local.converters import describe, load_vector, save_vector

_PATH = click.Path(dir_okay=False, path_type=Path)


def _print_summary(path: Path, info: dict) -> None:
    console = Console()
    # Text(), not markup strings: file names and metadata may contain "[...]".
    console.print(Text(str(path), style="bold"))
    console.print(Text(f"model hint: {info['model_hint'] or '(none)'}   n_embd: {info['n_embd']}   "
                       f"layer count: {info['layer_count']}"))
    table = Table("block", "norm")
    for row in info["layers"]:
        table.add_row(str(row["block"]), f"{row['norm']:.4f}")
    console.print(table)
    if info["metadata"]:
        meta = Table("key", "value", title="provenance")
        for key, value in info["metadata"].items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            meta.add_row(Text(key), Text(text))
        console.print(meta)


@click.command()
@click.argument("file", type=_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def inspect(file: Path, as_json: bool) -> None:
    """Show a vector file's layers (block, norm), n_embd, model hint and provenance."""
    info = describe(load_vector(file))
    if as_json:
        click.echo(json.dumps({"path": str(file), **info}, indent=2, ensure_ascii=False))
    else:
        _print_summary(file, info)


@click.command()
@click.argument("source", type=_PATH)
@click.argument("target", type=_PATH)
@click.option("--force", is_flag=True, help="Overwrite TARGET if it exists.")
def convert(source: Path, target: Path, force: bool) -> None:
    """Convert between .gguf, .npz and .safetensors (format chosen by suffix)."""
    cv = load_vector(source)
    save_vector(cv, target, force=force)
    click.echo(f"wrote {target} ({len(cv.directions)} directions, n_embd {cv.n_embd})")


COMMANDS = [inspect, convert]
