"""``rs-local doctor``: the machine, the llama.cpp build and the choices rs-local made for them.

What a user pastes into a bug report. The facts and decisions come from
:func:`rs_local.runtime.host.host_report`; this module only prints them.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rs_local.runtime.host import host_report


def _cell(value: object) -> Text:
    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, list):
        value = " ".join(str(v) for v in value) or "(none)"
    return Text("(not installed)" if value is None else str(value))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor(as_json: bool) -> None:
    """Show the CPU, the llama.cpp build (features, backends) and rs-local's repack/thread choices."""
    report = host_report()
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    table = Table("item", "value", show_header=False)
    for key, value in report.items():
        if key == "llama_cpp_build_features":
            continue  # the raw system-info line above says the same
        table.add_row(key, _cell(value))
    Console().print(table)


COMMANDS = [doctor]
