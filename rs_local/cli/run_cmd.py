"""`rs-local generate` (one shot) and `rs-local chat` (REPL) with steering vectors applied."""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console

from rs_local.cli.options import (
    err_console, load_runner, load_vectors, model_option, note_system, runtime_options, sampling_from,
    sampling_options, say, utf8_text, vector_options,
)
from rs_local.cli.terminal import plain, styled
from rs_local.errors import RsLocalError
from rs_local.files import dumps
from rs_local.runtime.runner import Generation
from rs_local.runtime.vector_specs import parse_scale, vector_name
from rs_local.templating import one_turn

#: A second Ctrl-C at the prompt within this many seconds leaves the chat (one alone says how to leave).
LEAVE_WINDOW_S = 2.0

REPL_HELP = """commands:
  /scale X          set the scale that multiplies every vector (0 = off)
  /vector PATH[:S]  replace the vector; /vector off removes it, /vector alone shows it
  /system TEXT      set the system prompt (empty: none) and start over
  /reset            forget the conversation
  /policy off|on    (with --policy) switch the per-prompt gate off (plain model) or back on
  //TEXT            send /TEXT as a message (a line that starts with a slash)
  /help, /quit      (Ctrl-C stops a reply; Ctrl-C twice, Ctrl-D or /quit leaves)"""


def policy_option(f):
    """``--policy``: generate and chat take a policy wherever they take a vector."""
    return click.option("--policy", "policy_path", default=None, metavar="POLICY.gguf",
                        help="A policy (`rs-local policy fit`): its probes pick, per prompt, which vector applies.")(f)


def _load_policy(path, vectors, scale: float = 1.0, layers: str | None = None):
    """Read the policy before any model loads (a bad file fails at once); --vector, --scale and
    --layers cannot join it (the policy holds each category's scale and blocks; taken silently, they
    would do nothing)."""
    if path is None:
        return None
    if vectors:
        raise RsLocalError("--policy chooses the vector per prompt; it cannot be combined with --vector")
    if scale != 1.0 or layers is not None:
        raise RsLocalError("--policy holds each category's scale and blocks; it cannot be combined with "
                           + ("--scale" if scale != 1.0 else "--layers"))
    from rs_local.runtime.policy_file import read_policy

    return read_policy(path)


def _gate(runner, policy, path):
    from rs_local.runtime.policy import PolicyRunner

    return PolicyRunner(runner, policy, path) if policy is not None else None


@click.command()
@click.argument("prompt", callback=utf8_text)
@model_option
@vector_options
@sampling_options
@runtime_options
@click.option("--raw", is_flag=True, help="Send PROMPT as-is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the text.")
@policy_option
def generate(prompt: str, model: str, vectors, scale, layers, raw: bool, as_json: bool, n_ctx, n_gpu_layers, n_threads,
             policy_path=None, **kw) -> None:
    """Answer PROMPT once, with the given vectors applied (or the vector a --policy picks for it)."""
    policy = _load_policy(policy_path, vectors, scale, layers)
    if policy is None and not vectors and (layers is not None or scale != 1.0):  # they did nothing, exit 0
        raise click.UsageError(f"{'--layers' if layers is not None else '--scale'} applies to a --vector; none was given")
    parts, layer_range = load_vectors(vectors, scale, layers)
    note_system(parts, kw["system"], policy, policy_path)
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    runner.set_vectors(parts, layer_range)
    gate = _gate(runner, policy, policy_path)
    messages = one_turn(prompt, kw["system"])
    sampling = sampling_from(kw)
    decision = gate.prepare(prompt if raw else messages) if gate is not None else None
    if decision is not None and not as_json:
        err_console.print(plain(f"policy: {decision.describe()}", "dim"))  # category names come from the policy file
    if as_json:
        gen = runner.generate(prompt if raw else messages, max_tokens=kw["max_tokens"], sampling=sampling)
        click.echo(dumps({
            "model": str(runner.path), "prompt": prompt, "text": gen.text, "finish_reason": gen.finish_reason,
            "context_full": context_full(gen, runner, kw["max_tokens"]),
            "tokens": len(gen.tokens), "mean_logprob": gen.mean_logprob,
            "vectors": [{"path": vector_name(v), "scale": s} for v, s in parts],
            "layers": list(layer_range) if layer_range else None,
            **({"policy": {"path": str(policy_path), **decision.to_dict()}} if decision is not None else {}),
        }))
        return
    gen = Generation()
    for event in runner.stream(prompt if raw else messages, max_tokens=kw["max_tokens"], sampling=sampling, result=gen):
        click.echo(event.text, nl=False)
    click.echo()
    if context_full(gen, runner, kw["max_tokens"]):
        say(f"stopped: the context is full ({runner.n_ctx} tokens); a larger --ctx lets the answer go on")


def context_full(gen: Generation, runner, max_tokens: int) -> bool:
    """Whether the answer stopped because the context ran out, not at --max-tokens: both are "length",
    and an answer cut mid-word (or empty, for a prompt that filled the context) came with no word."""
    return (gen.finish_reason == "length" and len(gen.tokens) < max_tokens
            and gen.prompt_tokens + len(gen.tokens) >= runner.n_ctx - 1)


@click.command()
@model_option
@vector_options
@sampling_options
@runtime_options
@policy_option
def chat(model: str, vectors, scale, layers, n_ctx, n_gpu_layers, n_threads, policy_path=None, **kw) -> None:
    """Talk to the model with vectors applied; change the vector or scale as you go."""
    from rs_local.runtime.session import ChatSession

    policy = _load_policy(policy_path, vectors, scale, layers)
    parts, layer_range = load_vectors(vectors, 1.0, layers)
    note_system(parts, kw["system"], policy, policy_path)
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    session = ChatSession(runner, system=kw["system"], sampling=sampling_from(kw), max_tokens=kw["max_tokens"],
                          vectors=parts, scale=scale, layer_range=layer_range)
    session.apply()
    gate = _gate(runner, policy, policy_path)
    console = Console()
    state = f"policy {policy_path}" if gate is not None else _steer_state(session)
    console.print(plain(f"{runner.path.name}: {state}. /help for commands.", "dim"))
    last_interrupt = float("-inf")
    while True:
        try:
            line = _read_line(console, runner)
        except KeyboardInterrupt:  # at the prompt: a second one soon after leaves, one alone does not
            if time.monotonic() - last_interrupt < LEAVE_WINDOW_S:
                console.print()
                return
            last_interrupt = time.monotonic()
            console.print(plain("\n(Ctrl-C again, Ctrl-D or /quit leaves)", "dim", multiline=True))
            continue
        except (EOFError, RuntimeError):  # RuntimeError: stdin was closed before the chat began
            console.print()
            return
        if not line.strip():
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # undecodable input bytes arrive as lone surrogates
            console.print(styled(("error:", "red"), " the line is not valid UTF-8 text"), soft_wrap=True)
            continue
        if line.startswith("//"):  # "//etc/passwd is what?": text that starts with a slash
            line = line[1:]
        elif line.startswith("/"):
            if _command(session, line.strip(), console, gate) == "quit":
                return
            continue
        _reply(session, line, console, gate)


#: How many characters of one over-long piped line are skipped before the chat stops reading.
SKIP_LIMIT = 64 << 20


def _read_line(console: Console, runner) -> str:
    """The next chat line; from a pipe or file, at most what the context could hold is kept.

    Why: ``chat < /dev/zero`` read one endless "line" until the kernel's OOM killer ended the
    process (21 GB), and a 20 MB line aborted llama.cpp's tokenizer under a memory limit. A terminal
    is read as before (its line editor bounds what a person types). An over-long line is reported at
    once and skipped ("" comes back); one with no end in sight (``SKIP_LIMIT`` characters, or 16
    times the longest prompt) stops the chat with an error rather than reading on forever."""
    if sys.stdin is None or sys.stdin.isatty():
        return console.input("[bold green]> [/]")
    console.print(plain("> ", "bold green"), end="")
    cheap = runner.unscanned_text_bytes()  # up to this, no vocabulary scan
    line = sys.stdin.readline(cheap + 1)
    if len(line) > cheap and not line.endswith("\n"):
        limit = runner.max_text_bytes()  # characters are at least one byte each
        line += sys.stdin.readline(max(limit + 1 - len(line), 0))
    else:
        limit = cheap
    if not line:
        raise EOFError
    if len(line) <= limit or line.endswith("\n"):
        return line.rstrip("\n")
    console.print(styled(("error:", "red"), f" standard input: a line of over {limit:,} characters, more than the "
                         f"context's {runner.n_ctx} tokens can hold (use --ctx); skipping it"), soft_wrap=True)
    skipped = len(line)
    while (rest := sys.stdin.readline(1 << 20)) and not rest.endswith("\n"):
        skipped += len(rest)  # nothing of it is kept
        if skipped > max(SKIP_LIMIT, 16 * limit):
            raise RsLocalError(f"standard input: no end of line in {skipped:,} characters; the chat stops")
    return ""


def _reply(session, line: str, console: Console, gate=None) -> None:
    """One turn; an error (a message too long for the context) is printed and the session goes on."""
    try:
        if gate is not None and gate.enabled:  # each turn is classified on its own (policy.probe_view)
            try:
                decision = gate.prepare(session.messages(line))
            except RsLocalError as exc:  # the gate reads this message alone: /reset would not help
                console.print(styled(("error:", "red"), f" {exc}"), soft_wrap=True)
                return
            console.print(plain(f"[policy: {decision.describe()}]", "dim"))
        gen = Generation()
        for event in session.reply(line, result=gen):
            console.out(event.text, end="", highlight=False)
    except KeyboardInterrupt:
        _say_stopped(console)
        return
    except RsLocalError as exc:  # /reset helps only where earlier turns take the room
        hint = " (/reset starts over)" if session.history else ""
        console.print(styled(("error:", "red"), f" {exc}{hint}"), soft_wrap=True)
        return
    if context_full(gen, session.runner, session.max_tokens):
        console.print(plain(" [the context is full: /reset starts over, a larger --ctx holds more]", "dim"), end="")
    console.print()


def _say_stopped(console: Console) -> None:
    """Mark a reply stopped by Ctrl-C; a second Ctrl-C while saying so must not end the session."""
    try:
        console.print(" [dim]\\[stopped][/]")
    except KeyboardInterrupt:
        console.print()


def _command(session, line: str, console: Console, gate=None) -> str | None:
    """Run one /command; errors are printed and the session goes on."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            console.print(REPL_HELP)
        elif name == "/policy":
            if gate is None or arg not in ("on", "off"):
                raise RsLocalError("/policy on|off needs a chat started with --policy" if gate is None
                                   else "usage: /policy on|off")
            gate.enabled = arg == "on"
            session.apply()  # off: back to the session's own vector (none unless /vector sets one)
            console.print(f"[dim]policy {arg}[/]")
        elif name in ("/scale", "/vector") and gate is not None and gate.enabled:
            raise RsLocalError("the policy picks the vector per prompt: /policy off first")
        elif name == "/scale":
            session.set_scale(parse_scale(arg))
        elif name == "/vector" and not arg:  # shows the steering; it removed it, as /vector off does
            pass
        elif name == "/vector":
            session.set_vectors([] if arg in ("off", "none") else _repl_vectors(arg, session.layer_range))
        elif name == "/system":
            session.system = arg or None
            session.reset()
        elif name == "/reset":
            session.reset()
        else:
            console.print(styled((f"unknown command {name}", "red"), " (/help)"))
            return None
        if name in ("/scale", "/vector"):
            console.print(plain(_steer_state(session), "dim"))
    except (RsLocalError, ValueError, OSError) as exc:
        console.print(styled(("error:", "red"), f" {exc}"), soft_wrap=True)  # exc quotes the user's paths and input
    return None


def _repl_vectors(spec: str, layer_range: tuple[int, int] | None) -> list:
    """``/vector PATH[:S]``, held to the session's --layers as the command line is (a range that
    misses the vector is an error, not steering that does nothing)."""
    from rs_local.runtime.vector_specs import check_layer_range

    parts = load_vectors((spec,), 1.0, None)[0]
    check_layer_range(parts, layer_range)
    return parts


def _steer_state(session) -> str:
    if not session.vectors or session.scale == 0:
        return "no vector"
    names = ", ".join(f"{vector_name(v)}:{s:g}" for v, s in session.vectors)  # as PATH:S is typed
    rng = f", blocks {session.layer_range[0]}-{session.layer_range[1]}" if session.layer_range else ""
    return f"steering with {names} at scale {session.scale:g}{rng}"


COMMANDS = [generate, chat]
