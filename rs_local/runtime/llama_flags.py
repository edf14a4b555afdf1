"""Ready-to-paste llama.cpp command lines for a control vector.

Why this exists: llama.cpp's own command line changed under users' feet. Builds from before
llama.cpp PR 18056 (about December 2025) took
``--control-vector-scaled FNAME SCALE`` (two arguments, repeatable); the llama.cpp that
llama-cpp-python 0.3.36 vendors, which rs-local pins, takes one argument,
``FNAME:SCALE[,FNAME:SCALE...]``, and rejects the old form. Its parser splits each item on
``:`` and the list on ``,``, so a vector path that contains either character cannot be
passed at all. And on CPUs with AMX, llama.cpp's weight repacking crashes unless ``-nr``
(``--no-repack``) is given, exactly as it would inside rs-local. Two defaults of llama.cpp's
tools also differ from rs-local's and change greedy answers: llama-completion's built-in chat
template (``--jinja`` uses the model's own) and flash attention "auto" (``-fa off``).

So every hint rs-local prints (``inspect --llama-cpp``, the demo's closing lines) is built
here, from the same repack decision rs-local itself uses
(:func:`rs_local.runtime.host.decide_repack`), with quoting for the user's shell (POSIX, or
cmd.exe/PowerShell on Windows), and with the paths llama.cpp cannot parse refused up front instead
of failing later inside llama.cpp. Nothing here imports llama.cpp unless the repack decision needs to ask the build.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rs_local.errors import FileProblem, RsLocalError
from rs_local.runtime.host import RepackDecision, decide_repack

#: Characters that the pinned llama.cpp's ``--control-vector-scaled`` parser splits on.
UNPARSABLE_CHARS = (":", ",")
#: The binaries the hints name: the one-shot / terminal chat tool and the HTTP server.
BINARIES = ("llama-completion", "llama-server")
#: Flags that make llama.cpp's tools compute what rs-local computes. Flash attention: rs-local
#: (llama-cpp-python) runs with it off, llama.cpp's tools default to "auto", which is on for
#: CPUs; the different summation order moves logits enough to flip a greedy token after a
#: dozen or so (measured by benchmarks/llama_cpp_interop.py).
COMMON_ARGS = ("-fa", "off")
#: Per binary. llama-completion renders chats with a built-in template matched by name unless
#: ``--jinja`` is given (llama-server uses Jinja by default); the built-in ChatML drops what
#: the GGUF's own template adds, e.g. SmolLM2's and Qwen2.5's default system message, so
#: without it the prompt tokens differ from rs-local's.
BINARY_ARGS = {"llama-completion": ("--jinja",)}


def tool_args(binary: str) -> list[str]:
    """The flags above that apply to ``binary`` (a name or a path)."""
    return [*COMMON_ARGS, *BINARY_ARGS.get(Path(binary).name, ())]


class LlamaCppPathError(FileProblem):
    """A vector path that the pinned llama.cpp cannot take on its command line."""


@dataclass(frozen=True)
class LlamaCppFlags:
    """The flags that make llama.cpp's own tools steer exactly as ``rs-local`` does.

    ``model`` is shell text (already quoted, or a ``$(rs-local models path NAME)``
    substitution when the built-in model is not pulled yet), so that every rendering below
    pastes as is.
    """

    model: str
    vectors: tuple[tuple[str, float], ...]
    layer_range: tuple[int, int] | None
    repack: RepackDecision
    notes: tuple[str, ...] = field(default_factory=tuple)

    def vector_args(self) -> list[str]:
        """``--control-vector-scaled A:S[,B:S]`` and the layer range, unquoted argv items."""
        spec = ",".join(f"{path}:{_format_scale(scale)}" for path, scale in self.vectors)
        args = ["--control-vector-scaled", spec]
        if self.layer_range is not None:
            args += ["--control-vector-layer-range", str(self.layer_range[0]), str(self.layer_range[1])]
        if not self.repack.enabled:
            args.append("-nr")
        return args

    def argv(self, binary: str, model_path: str | Path) -> list[str]:
        """A full argv (for subprocess) given a real model path; the script and tests use it."""
        return [binary, "-m", str(model_path), *self.vector_args(), *tool_args(binary)]

    def command(self, binary: str = "llama-completion") -> str:
        """One shell line: ``BINARY -m MODEL --control-vector-scaled ... -fa off [--jinja]``."""
        rest = [*self.vector_args(), *tool_args(binary)]
        return " ".join([shell_quote(binary), "-m", self.model, shell_join(rest)])

    def render(self, binaries: Sequence[str] = BINARIES) -> str:
        """What ``rs-local inspect --llama-cpp`` prints: ``#`` notes, then one line per binary."""
        lines = [f"# {note}" for note in self.notes]
        lines += [self.command(b) for b in binaries]
        return "\n".join(lines)


def _format_scale(scale: float) -> str:
    """``-1.0`` -> ``-1``, ``-1.25`` -> ``-1.25``: what a person would type, parsed by ``stof``."""
    text = f"{float(scale):g}"
    return "0" if text == "-0" else text


def check_vector_path(path: str | Path) -> str:
    """The path as llama.cpp will receive it, or an error saying how to work around it.

    The pinned llama.cpp splits ``--control-vector-scaled`` on ``,`` (several vectors) and
    each item on ``:`` (file and scale) with no escape for ``:``; a field that starts with
    ``"`` is read as CSV quoting. None of these can be passed through, so we say so and
    suggest a name that can.
    """
    text = str(path)
    bad = _unparsable(text)
    if bad and Path(text).is_absolute():  # a Windows drive's "C:": the form relative to here may pass
        try:
            near = os.path.relpath(text)
        except ValueError:  # another drive
            near = text
        if not _unparsable(near):
            text, bad = near, []
    if bad:
        resolved = str(Path(text).resolve())
        link = f"copy {shell_quote(resolved)} vector.gguf" if _windows() else f"ln -s {shell_quote(resolved)} vector.gguf"
        raise LlamaCppPathError(
            text, f"llama.cpp's --control-vector-scaled cannot take a path containing {' or '.join(map(repr, bad))} "
            f"(it splits FNAME:SCALE on ':' and the list on ','); copy or link it to a plain name first, "
            f"e.g. {link}",
        )
    if Path(text).suffix.lower() != ".gguf":
        raise FileProblem(text, f"llama.cpp loads only GGUF control vectors; convert it first: "
                                f"rs-local convert {shell_quote(text)} {shell_quote(str(Path(text).with_suffix('.gguf')))}")
    return text


def _unparsable(text: str) -> list[str]:
    """What in ``text`` the pinned llama.cpp's FNAME:SCALE list parser cannot take (empty: nothing)."""
    bad = [c for c in UNPARSABLE_CHARS if c in text]
    if text.startswith('"'):
        bad.append('a leading "')
    if not text.isprintable():
        bad.append("a control character")  # a pasted command line cannot carry it reliably
    return bad


def _windows() -> bool:
    """Hints are for the shell of the machine they are printed on."""
    return os.name == "nt"


def shell_quote(text: str, windows: bool | None = None) -> str:
    """``text`` as one word of a pasted command line: POSIX shell quoting, or on Windows the
    double quotes that both cmd.exe and PowerShell read (single quotes mean nothing to cmd.exe)."""
    if _windows() if windows is None else windows:
        return subprocess.list2cmdline([text])
    return shlex.quote(text)


def shell_join(args: Sequence[str], windows: bool | None = None) -> str:
    """``args`` as words of one pasted command line (see :func:`shell_quote`)."""
    return " ".join(shell_quote(a, windows) for a in args)


def vector_block_span(paths: Sequence[str | Path]) -> tuple[int, int]:
    """The first and last block that any of the vectors steers (read from the files)."""
    from rs_local.converters.formats import load_vector

    layers = [layer for p in paths for layer in load_vector(p).layers]
    return min(layers), max(layers)


def check_fits_model(paths: Sequence[str | Path], model: str | Path) -> None:
    """Refuse to print a command llama.cpp would refuse: a vector of another width or with more blocks
    than the model (read from the model's header; a header that cannot be read is left to llama.cpp).

    Why: ``inspect --llama-cpp`` names the default model when none is given, so a SmolLM2 vector got a
    ready-to-paste Qwen command that llama.cpp then rejected."""
    from rs_local import models
    from rs_local.converters.formats import load_vector
    from rs_local.converters.gguf_header import gguf_scalars
    from rs_local.converters.gguf_io import validate_for_model

    try:
        scalars = gguf_scalars(models.resolve(str(model), auto_pull=False))
    except (RsLocalError, OSError):
        return
    arch = scalars.get("general.architecture")
    n_embd, n_layer = scalars.get(f"{arch}.embedding_length"), scalars.get(f"{arch}.block_count")
    if not (isinstance(n_embd, int) and isinstance(n_layer, int)):
        return
    for path in paths:
        try:
            validate_for_model(load_vector(path), n_embd=n_embd, n_layer=n_layer, path=path)
        except RsLocalError as exc:
            raise RsLocalError(f"{exc} ({model}): not the model this vector was made for; name that one "
                               "with --model") from None


def model_shell_text(model: str | Path) -> tuple[str, str | None]:
    """``-m`` as shell text, plus a note when the built-in model still has to be pulled.

    A built-in name resolves to its cached file without downloading anything (printing a
    hint must not start a 500 MB download); if it is not pulled yet the command uses
    ``"$(rs-local models path NAME)"``, which works once it is.
    """
    from rs_local import models
    from rs_local.errors import ModelError

    name = str(model)
    try:
        return shell_quote(str(models.resolve(name, auto_pull=False))), None
    except ModelError:
        if name not in models.MODELS:
            raise
        return f'"$(rs-local models path {name})"', f"model {name} is not pulled yet: rs-local models pull {name}"


def llama_cpp_flags(
    vectors: Sequence[tuple[str | Path, float]],
    *,
    model: str | Path,
    layer_range: tuple[int, int] | None = None,
    repack: RepackDecision | None = None,
) -> LlamaCppFlags:
    """Flags for llama.cpp's own tools that apply ``vectors`` (path, scale) like rs-local does.

    ``model`` is a built-in model name (not pulled by this call) or a GGUF path.
    ``layer_range`` (inclusive, like rs-local's ``--layers``) limits the steered blocks; when
    it is None the span of blocks the vectors carry is written anyway: llama.cpp adds nothing
    where a file has no direction, so it changes nothing, but it shows what is steered.
    ``repack`` defaults to rs-local's own decision for this machine; when it is off (AMX
    CPUs) ``-nr`` is added, without which llama.cpp crashes there.
    """
    if not vectors:
        raise RsLocalError("no control vector given")
    paths = [check_vector_path(p) for p, _ in vectors]
    if layer_range is not None:
        lo, hi = layer_range
        if not 1 <= lo <= hi:
            raise RsLocalError(f"bad layer range {lo}-{hi}: llama.cpp steers blocks 1 and up, START <= END")
    else:
        layer_range = vector_block_span(paths)
    model_text, model_note = model_shell_text(model)
    if model_note is None:
        check_fits_model(paths, model)
    decision = decide_repack() if repack is None else repack
    notes = ["llama.cpp as pinned by rs-local (llama-cpp-python 0.3.36): --control-vector-scaled FNAME:SCALE; "
             "builds older than llama.cpp PR 18056 (about December 2025) take FNAME SCALE as two arguments"]
    if not decision.enabled:
        notes.append(f"-nr (--no-repack) added: repack {decision}")
    if model_note:
        notes.append(model_note)
    return LlamaCppFlags(model_text, tuple((p, float(s)) for p, (_, s) in zip(paths, vectors)), layer_range,
                         decision, tuple(notes))
