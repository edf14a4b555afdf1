"""`PATH[:SCALE]` vector specs and `START-END` layer ranges, as llama.cpp users write them.

Strict on purpose: a scale is a plain decimal literal (``-0.8``, ``1e-1``), never Python's
wider ``float()`` syntax (``1_0`` is ten, ``nan`` and ``inf`` are floats there), and finite
and at most :data:`MAX_SCALE` in size; a layer range is ``START-END`` or one block, digits
only, so ``-1``, ``8-``, ``""`` and the list ``8,20`` are errors, not ranges nobody meant.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from rs_local.errors import RsLocalError
from rs_local.vectors.control_vector import ControlVector

#: Largest |scale| accepted: far beyond any useful steering, well inside float32 after scaling.
MAX_SCALE = 1000.0
#: Largest block index accepted in a range (models have tens to a few hundred blocks).
MAX_BLOCK = 100_000

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse_decimal(text: str, what: str = "number") -> float:
    """A finite number written as a plain decimal literal; ``RsLocalError`` otherwise.

    ``float()`` alone would take ``1_0`` (ten), ``nan``, ``inf`` and ``1e999`` (infinity).
    """
    s = text.strip()
    if len(s) > 64 or not _DECIMAL.fullmatch(s):
        raise RsLocalError(f"bad {what} '{text[:64]}': expected a plain decimal number, e.g. -0.5")
    value = float(s)
    if not math.isfinite(value):
        raise RsLocalError(f"bad {what} '{text[:64]}': out of range")
    return value


def parse_scale(text: str, what: str = "scale") -> float:
    """A steering scale: a plain decimal number with |scale| <= :data:`MAX_SCALE`."""
    value = parse_decimal(text, what)
    if abs(value) > MAX_SCALE:
        raise RsLocalError(f"bad {what} '{text[:64]}': |scale| must be at most {MAX_SCALE:g}")
    return value


def check_scale(value: float, what: str = "scale") -> float:
    """A scale given as a number (library callers): finite and at most :data:`MAX_SCALE` in size.
    Anything ``float()`` takes but text counts (numpy and torch scalars, fractions, decimals)."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise RsLocalError(f"bad {what} {value!r}: expected a number") from None
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise RsLocalError(f"bad {what} {value!r}: must be finite with |scale| <= {MAX_SCALE:g}")
    return float(value)


def parse_vector_spec(spec: str, default_scale: float = 1.0) -> tuple[Path, float]:
    """Split ``a.gguf:0.8`` into (path, 0.8); a bare path takes ``default_scale``.

    Only a suffix that is a decimal literal is a scale, so paths containing colons still
    work; a suffix that is not one after an existing file (``a.gguf:1_0``, ``a.gguf:nan``)
    is an error rather than a file name nobody has.
    """
    if not spec.strip():
        raise RsLocalError("empty --vector: expected PATH[:SCALE]")
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        if _DECIMAL.fullmatch(tail.strip()):
            return Path(head), parse_scale(tail, f"scale in '{spec}'")
        if not Path(spec).exists() and Path(head).is_file():
            raise RsLocalError(f"bad scale '{tail[:64]}' in '{spec}': expected a plain decimal number, e.g. {head}:-0.8")
    return Path(spec), check_scale(default_scale)


def parse_layer_range(text: str) -> tuple[int, int]:
    """``8-20`` -> (8, 20), inclusive like ``--control-vector-layer-range``; ``12`` -> (12, 12)."""
    m = _RANGE.fullmatch(text.strip())
    if m is None:
        hint = " (a list is not a range here)" if "," in text else ""
        raise RsLocalError(f"bad layer range '{text[:64]}'{hint}: expected START-END, e.g. 8-20, or one block, e.g. 12")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo > hi:
        raise RsLocalError(f"bad layer range '{text}': START must not be above END")
    if hi > MAX_BLOCK:
        raise RsLocalError(f"bad layer range '{text[:64]}': blocks go up to a few hundred, not {hi}")
    return lo, hi


def band_label(layers: Sequence[int] | tuple[int, int]) -> str:
    """``8-16`` for a contiguous run (or a range tuple), ``8,10,12`` otherwise."""
    layers = sorted(set(range(layers[0], layers[1] + 1))) if isinstance(layers, tuple) else sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def vector_name(vec: ControlVector) -> str:
    """The file a vector came from (never a path taken from its own metadata)."""
    return vec.source or "<vector>"


def check_layer_range(parts: Iterable[tuple[ControlVector, float]], layer_range: tuple[int, int] | None,
                      option: str = "--layers") -> None:
    """Refuse a layer range that selects none of a vector's directions (it would steer nothing, silently)."""
    if layer_range is None:
        return
    lo, hi = layer_range
    for vec, _ in parts:
        if not any(lo <= layer <= hi for layer in vec.layers):
            raise RsLocalError(f"vector {vector_name(vec)} has directions for blocks {band_label(vec.layers)}; "
                               f"{option} {lo}-{hi} selects none of them")


def system_prompt_notes(vectors: Iterable[ControlVector], system: str | None) -> list[str]:
    """One line per vector fitted under a system prompt other than ``system`` (the run's).

    A system prompt moves the activations a vector is added to, so a vector fitted under one
    steers less predictably without it. Only vectors that record one (``system_prompt``, written
    by ``fit`` and ``isolate --system``) are checked: a file from another tool says nothing
    about how it was fitted.
    """
    notes = (system_prompt_note(vector_name(v), v.metadata.get("system_prompt"), system) for v in vectors)
    return [n for n in notes if n]


def system_prompt_note(name: str, fitted: object, system: str | None) -> str | None:
    """The line for one file (a vector, or a policy whose probe read prompts under ``fitted``), or None."""
    if not isinstance(fitted, str) or not fitted or fitted == (system or ""):
        return None
    now = f"this run's is {_short(system)}" if system else "this run has none"
    return (f"note: {name} was fitted under the system prompt {_short(fitted)} ({now}; "
            "give the same --system for the steering it was fitted for)")


def _short(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def load_vector_specs(specs: Iterable[str], default_scale: float = 1.0) -> list[tuple[ControlVector, float]]:
    """Read every ``PATH[:SCALE]``; each vector remembers the path it was read from.

    The path goes to ``vec.source`` and overwrites ``metadata["path"]`` (where older code
    looks), so a ``path`` in the file's own metadata cannot make an error name another file.
    """
    from rs_local.converters.formats import load_vector

    out = []
    for spec in specs:
        path, scale = parse_vector_spec(spec, default_scale)
        vec = load_vector(path)
        vec.source = str(path)
        vec.metadata["path"] = str(path)
        out.append((vec, scale))
    return out


def vector_pairs(parts: Any) -> list[tuple[ControlVector, float]]:
    """``[(ControlVector, scale), ...]`` from a library caller, or a one-line error saying that shape is
    expected (a bare vector, or a list of vectors, was a TypeError from deep inside)."""
    if isinstance(parts, ControlVector) or isinstance(parts, (str, bytes, dict)):
        raise RsLocalError(f"vectors are given as [(vector, scale), ...], not a {type(parts).__name__}")
    try:
        parts = list(parts)
    except TypeError:
        raise RsLocalError(f"vectors are given as [(vector, scale), ...], not a {type(parts).__name__}") from None
    for part in parts:
        if not (isinstance(part, (tuple, list)) and len(part) == 2 and isinstance(part[0], ControlVector)):
            raise RsLocalError(f"vectors are given as [(vector, scale), ...]; got a {type(part).__name__} in the list")
    return [(vec, check_scale(scale)) for vec, scale in parts]
