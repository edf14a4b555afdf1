"""Options shared by the commands that load a model and apply vectors, and their validation.

Every numeric option goes through :class:`Number`: a plain decimal literal (click's own
types take ``1_0`` as ten and ``nan``/``inf`` as floats, and ``FloatRange`` lets NaN through
every bound), finite, within the option's range. Output paths are checked by
:func:`check_output` before any model loads.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.text import Text

from rs_local import models
from rs_local.cli.terminal import plain
from rs_local.files import check_output_path
from rs_local.runtime.host import BF16_ENV, REPACK_ENV
from rs_local.runtime.sampling import SamplingParams

err_console = Console(stderr=True)


def say(msg: str) -> None:
    """A dim progress/status line on stderr (stdout stays for results).

    The message is plain text: it often holds the user's paths and set names, which rich would
    otherwise read as markup (``runs/a[/x]/v.gguf`` raises MarkupError, ``a[bold].jsonl`` loses its
    brackets) or emoji codes (``keep:warning:.jsonl`` prints a warning sign). Soft wrap: a long
    path stays one line in a log or pipe (rich would cut it at column 80 with a newline). Control
    characters (an ESC in a file name or a set's text) are shown escaped, not sent to the terminal.
    """
    err_console.print(plain(msg, multiline=True), style="dim", soft_wrap=True)


def note_system(parts: Any, system: str | None, policy: Any = None, policy_path: Any = None) -> None:
    """One dim line per vector in ``parts`` ((vector, scale) pairs) or ``policy`` fitted under another
    system prompt than this run's (``generate``, ``chat`` and ``eval`` alike)."""
    from rs_local.runtime.vector_specs import system_prompt_note, system_prompt_notes

    notes = system_prompt_notes([v for v, _ in parts], system)
    if policy is not None:
        notes.append(system_prompt_note(str(policy_path), (policy.training or {}).get("system"), system))
    for note in filter(None, notes):
        err_console.print(plain(note, "dim"), soft_wrap=True)


def check_output(path: Path, force: bool, *, directory: bool = False) -> None:
    """Refuse an output before minutes of work: see :func:`rs_local.files.check_output_path`."""
    check_output_path(path, force, directory=directory)


# ----------------------------------------------------------------------------- numbers

#: llama.cpp seeds are uint32 and 0xFFFFFFFF means "random", so a reproducible seed is below it.
MAX_SEED = 2**32 - 2
#: Largest --ctx accepted at all; the model's trained context (read from its GGUF header) is checked before loading.
MAX_CTX = 1_048_576
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Number(click.ParamType):
    """A finite int or float written as a plain decimal literal, within optional bounds.

    The one validator for every numeric option: it refuses what ``int()``/``float()`` would
    quietly accept (``1_0``, ``nan``, ``inf``, ``1e999``) and values outside the option's
    range, as a click usage error naming the option.
    """

    def __init__(self, min: float | None = None, max: float | None = None, *, integer: bool = False,
                 min_open: bool = False, max_open: bool = False):
        self.min, self.max, self.integer = min, max, integer
        self.min_open, self.max_open = min_open, max_open
        self.name = "integer" if integer else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        if isinstance(value, (int, float)):
            number = value
        else:
            number = self._parse(str(value), param, ctx)
        if self.integer and (not isinstance(number, int) or isinstance(number, bool)):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        self._check_bounds(number, param, ctx)
        return int(number) if self.integer else float(number)

    def _parse(self, text: str, param, ctx) -> int | float:
        s = text.strip()
        if len(s) > 64:
            self.fail(f"{s[:20]!r}... is too long for a number", param, ctx)
        if self.integer:
            if not _INT.fullmatch(s):
                self.fail(f"{text[:40]!r} is not a whole number", param, ctx)
            return int(s)
        if not _FLOAT.fullmatch(s):
            self.fail(f"{text[:40]!r} is not a plain decimal number (e.g. -0.5)", param, ctx)
        value = float(s)
        if not math.isfinite(value):
            self.fail(f"{text[:40]!r} is out of range", param, ctx)
        return value

    def _check_bounds(self, number: int | float, param, ctx) -> None:
        lo_bad = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        hi_bad = self.max is not None and (number >= self.max if self.max_open else number > self.max)
        if lo_bad or hi_bad:
            self.fail(f"{number} is not in {self._describe()}", param, ctx)

    def _describe(self) -> str:
        show = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        lo = "-inf" if self.min is None else show(self.min)
        hi = "inf" if self.max is None else show(self.max)
        return f"{'(' if self.min_open else '['}{lo}, {hi}{')' if self.max_open else ']'}"


def integer(min: int | None = None, max: int | None = 2**31 - 1) -> Number:
    """A whole-number option (bounded by default to what llama.cpp's int32 fields hold)."""
    return Number(min, max, integer=True)


def number(min: float | None = None, max: float | None = None, *, min_open: bool = False, max_open: bool = False) -> Number:
    """A finite decimal option."""
    return Number(min, max, min_open=min_open, max_open=max_open)


def scale_number() -> Number:
    """A steering scale (finite, |scale| <= MAX_SCALE)."""
    from rs_local.runtime.vector_specs import MAX_SCALE

    return Number(-MAX_SCALE, MAX_SCALE)


SEED = integer(0, MAX_SEED)


def parse_number_list(text: str, param_hint: str, kind: Number | None = None) -> list[float]:
    """Comma-separated numbers (e.g. ``--scales 0,-0.5,-1``), each validated like one option value."""
    kind = kind or scale_number()
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(x == "" for x in items):
        raise click.BadParameter(f"'{text}': expected numbers separated by commas, e.g. 0,-0.5,-1", param_hint=param_hint)
    try:
        return [kind.convert(x, None, None) for x in items]
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint=param_hint) from None


def prompt_file_callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A prompt file, or a shipped set by name (``--target political``, ``fit -p harmful``) when no such
    file exists, as ``eval --set political`` takes it: the quickstart then runs from any directory."""
    from rs_local.eval.prompt_sets import BUILTIN_SETS, builtin_path

    if value is not None and not value.exists() and str(value) in BUILTIN_SETS:
        return builtin_path(str(value))
    return value


def layer_range_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Reject a malformed START-END before anything loads (one-line error, exit 1; the value stays text)."""
    if value is not None:
        from rs_local.runtime.vector_specs import parse_layer_range

        parse_layer_range(value)
    return value


def utf8_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Text given on the command line, as UTF-8; refused where its bytes are not UTF-8.

    Undecodable argv bytes arrive as lone surrogates and would fail later. Under an ASCII locale
    (``LC_ALL=C`` without Python's UTF-8 mode) even valid UTF-8 arrives so: its bytes are decoded
    again as UTF-8 before anything is refused."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return os.fsencode(value).decode("utf-8")
            except (UnicodeError, ValueError):
                raise click.BadParameter("is not valid UTF-8 text") from None
    return value


def _bounded(lo: int, hi: int, why: str) -> Callable:
    """A callback that keeps an int option within [lo, hi] (for options whose type is set elsewhere)."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and not lo <= value <= hi:
            raise click.BadParameter(f"{value} is not in [{lo}, {hi}] ({why})")
        return value

    return check


def _threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """--threads within [1, 4096], and cut to the CPUs this process may use (with a warning)."""
    from rs_local.runtime.host import capped_threads

    value = _bounded(1, 4096, "CPU threads")(ctx, param, value)
    if value is None:
        return None
    threads, why = capped_threads(value)
    if why:
        say(f"warning: {why}")
    return threads


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model", "-m", default=models.DEFAULT_MODEL, show_default=True,
        help="Built-in model name (see `rs-local models list`) or path to a GGUF file.",
    )(f)


def vector_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--vector", "--control-vector", "vectors", multiple=True, metavar="PATH[:SCALE]",
                     help="Control vector to apply (repeatable); :SCALE is that vector's own scale (default 1)."),
        click.option("--scale", type=scale_number(), default=1.0, show_default=True,
                     help="Multiplies every vector's scale. Negative removes refusal, positive induces it."),
        click.option("--layers", "--control-vector-layer-range", "layers", metavar="START-END", default=None,
                     callback=layer_range_callback, help="Apply only to blocks START..END inclusive."),
    ]):
        f = opt(f)
    return f


def runtime_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--ctx", "n_ctx", type=click.IntRange(128), default=None,
                     help="Context size in tokens (default: 4096, or the model's trained context where shorter).",
                     callback=_bounded(128, MAX_CTX, "checked against the model's trained context once it loads")),
        click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="Layers to offload on a Metal/CUDA build of llama.cpp (-1 = all).",
                     callback=_bounded(-1, 100_000, "-1 offloads all")),
        click.option("--threads", "n_threads", type=click.IntRange(1), default=None, callback=_threads,
                     help="CPU threads (default: the physical cores this process may use; at most its CPUs)."),
        click.option("--repack/--no-repack", default=None, expose_value=False, callback=_record_in(REPACK_ENV),
                     help="llama.cpp weight repacking (its --no-repack). Default: on, off on AMX CPUs, "
                          f"where it crashes; also {REPACK_ENV}=0|1|auto."),
    ]):
        f = opt(f)
    return f


def bf16_option(f: Callable) -> Callable:
    """``--bf16/--no-bf16`` for commands that take refusal gradients (isolate, demo)."""
    return click.option("--bf16/--no-bf16", default=None, expose_value=False, callback=_record_in(BF16_ENV),
                        help="isolate's Transformers passes (gradients, block outputs) under bfloat16 autocast. "
                             "Default: on where the CPU does bfloat16 natively (avx512_bf16, amx_bf16), where it is "
                             f"2-2.5x faster; also {BF16_ENV}=0|1|auto.")(f)


def _record_in(name: str) -> Callable:
    """A callback that records an on/off flag (``--repack``, ``--bf16``) in the variable ``name``, which
    rs_local.runtime.host reads: every model load and fit of the command (runner, judge, recipe) follows it."""

    def record(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
        if value is not None:
            os.environ[name] = "1" if value else "0"

    return record


def sampling_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--max-tokens", "-n", type=integer(1), default=256, show_default=True),
        click.option("--temperature", "--temp", type=number(0, 100), default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=number(0, 1), default=1.0, show_default=True),
        click.option("--seed", type=SEED, default=None, help="Sampling seed (reproducible output with --temperature > 0)."),
        click.option("--system", default=None, callback=utf8_text, help="System prompt."),
    ]):
        f = opt(f)
    return f


def sampling_from(kwargs: dict[str, Any]) -> SamplingParams:
    return SamplingParams(temperature=kwargs["temperature"], top_p=kwargs["top_p"], seed=kwargs["seed"])


def load_runner(model: str, n_ctx: int, n_gpu_layers: int, n_threads: int | None):
    """Resolve the model (pulling a built-in one on first use) and load it with a status line.

    ``--ctx`` is checked against the model's trained context first (read from the GGUF's
    metadata, milliseconds), so an absurd value fails at once instead of after allocating it.
    """
    from rs_local.runtime.runner import Runner

    path = models.resolve(model, progress=say)
    check_context(path, n_ctx)
    with err_console.status(Text(f"loading {path.name}")):  # Text: the file name is not markup
        return Runner(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads)


def check_context(path: Path, n_ctx: int | None) -> None:
    """Refuse a --ctx above the model's trained context (llama.cpp would allocate it, then degrade);
    without --ctx the Runner takes the default or the trained context, whichever is smaller."""
    from rs_local.converters.gguf_header import trained_context

    trained = trained_context(path) if n_ctx is not None else None
    if trained and n_ctx > trained:
        raise click.BadParameter(f"{n_ctx} is above the {trained} tokens {path.name} was trained with", param_hint="--ctx")


def load_vectors(specs: tuple[str, ...], scale: float, layers: str | None):
    """Parse --vector/--scale/--layers into (parts, layer_range); a range that misses a vector is an error.

    The one meaning of the steering flags, in every command: ``PATH:SCALE`` is that vector's
    own scale (1 when omitted) and ``--scale`` multiplies all of them, so ``a.gguf:0.5 --scale
    -1.2`` steers at -0.6 wherever it is written.
    """
    from rs_local.runtime.vector_specs import check_layer_range, load_vector_specs, parse_layer_range

    parts = [(vec, own * scale) for vec, own in load_vector_specs(specs, default_scale=1.0)]
    layer_range = parse_layer_range(layers) if layers is not None else None
    check_layer_range(parts, layer_range)
    return parts, layer_range
