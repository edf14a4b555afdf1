"""`rs-local generate` (one shot) and `rs-local chat` (REPL) with steering vectors applied."""

from __future__ import annotations

import json

import click
from rich.console import Console

from rs_local.cli.options import (
    err_console, load_runner, load_vectors, model_option, runtime_options, sampling_from,
    sampling_options, vector_options,
)
from rs_local.errors import RsLocalError

REPL_HELP = """commands:
  /scale X          set the scale that multiplies every vector (0 = off)
  /vector PATH[:S]  replace the vector(s); /vector off removes them
  /system TEXT      set the system prompt (empty: none) and start over
  /reset            forget the conversation
  /help, /quit      (Ctrl-C stops a reply; Ctrl-D or /quit leaves)"""


@click.command()
@click.argument("prompt")
@model_option
@vector_options
@sampling_options
@runtime_options
@click.option("--raw", is_flag=True, help="Send PROMPT as-is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the text.")
def generate(prompt: str, model: str, vectors, scale, layers, raw: bool, as_json: bool, n_ctx, n_gpu_layers, n_threads, **kw) -> None:
    """Answer PROMPT once, with the given vectors applied."""
    parts, layer_range = load_vectors(vectors, scale, layers)
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    runner.set_vectors(parts, layer_range)
    messages = ([{"role": "system", "content": kw["system"]}] if kw["system"] else []) + [{"role": "user", "content": prompt}]
    sampling = sampling_from(kw)
    if as_json:
        gen = runner.generate(prompt if raw else messages, max_tokens=kw["max_tokens"], sampling=sampling)
        click.echo(json.dumps({
            "model": str(runner.path), "prompt": prompt, "text": gen.text, "finish_reason": gen.finish_reason,
            "tokens": len(gen.tokens), "mean_logprob": gen.mean_logprob,
            "vectors": [{"path": v.metadata.get("path"), "scale": s} for v, s in parts],
            "layers": list(layer_range) if layer_range else None,
        }, ensure_ascii=False))
        return
    for event in runner.stream(prompt if raw else messages, max_tokens=kw["max_tokens"], sampling=sampling):
        click.echo(event.text, nl=False)
    click.echo()


@click.command()
@model_option
@vector_options
@sampling_options
@runtime_options
def chat(model: str, vectors, scale, layers, n_ctx, n_gpu_layers, n_threads, **kw) -> None:
    """Talk to the model with vectors applied; change the vector or scale as you go."""
    from rs_local.runtime.session import ChatSession

    parts, layer_range = load_vectors(vectors, 1.0, layers)
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    session = ChatSession(runner, system=kw["system"], sampling=sampling_from(kw), max_tokens=kw["max_tokens"],
                          vectors=parts, scale=scale, layer_range=layer_range)
    session.apply()
    console = Console()
    console.print(f"[dim]{runner.path.name}: {_steer_state(session)}. /help for commands.[/]")
    while True:
        try:
            line = console.input("[bold green]> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(session, line.strip(), console) == "quit":
                return
            continue
        _reply(session, line, console)


def _reply(session, line: str, console: Console) -> None:
    try:
        for event in session.reply(line):
            console.out(event.text, end="", highlight=False)
    except KeyboardInterrupt:
        console.print(" [dim]\\[stopped][/]", end="")
    console.print()


def _command(session, line: str, console: Console) -> str | None:
    """Run one /command; errors are printed and the session goes on."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            console.print(REPL_HELP)
        elif name == "/scale":
            session.set_scale(float(arg))
        elif name == "/vector":
            session.set_vectors([] if arg in ("", "off", "none") else load_vectors((arg,), 1.0, None)[0])
        elif name == "/system":
            session.system = arg or None
            session.reset()
        elif name == "/reset":
            session.reset()
        else:
            console.print(f"[red]unknown command {name}[/] (/help)")
            return None
        if name in ("/scale", "/vector"):
            console.print(f"[dim]{_steer_state(session)}[/]")
    except (RsLocalError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
    return None


def _steer_state(session) -> str:
    if not session.vectors or session.scale == 0:
        return "no vector"
    names = ", ".join(f"{v.metadata.get('path', 'vector')}x{s:g}" for v, s in session.vectors)
    rng = f", blocks {session.layer_range[0]}-{session.layer_range[1]}" if session.layer_range else ""
    return f"steering with {names} at scale {session.scale:g}{rng}"


COMMANDS = [generate, chat]
