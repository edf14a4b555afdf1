"""Bounded, strict reading of text and JSON inputs (see :mod:`rs_local.files`)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator

from rs_local.errors import FileProblem

#: Largest text or JSON input read (a prompt set of a million prompts is far below it).
MAX_INPUT_BYTES = 256 * 1024 * 1024
#: Deepest JSON nesting accepted; real rows are 2-4 deep, Python's parser fails near 1000.
MAX_JSON_DEPTH = 100
#: Longest integer literal accepted in JSON (Python refuses > 4300 digits with a traceback).
MAX_INT_DIGITS = 100

#: Flags of every raw read: O_BINARY so Windows does not translate CRLF or stop at a Ctrl-Z byte
#: (``os.open`` is text mode there), O_NONBLOCK so a FIFO given as a file cannot block (it is
#: refused after ``fstat``), O_CLOEXEC so no child inherits it. Each is 0 where the OS lacks it:
#: ``os.O_NONBLOCK`` alone made every vector read an AttributeError on Windows.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"))
_KIND = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonProblem(ValueError):
    """JSON text that is not acceptable input; ``line`` is its line within the text when known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


# ----------------------------------------------------------------------------- reading


def _kind(mode: int) -> str:
    return _KIND.get(stat.S_IFMT(mode), "not a regular file")


def is_cached_file(path: Path) -> bool:
    """Whether a cache entry is there to read; one that cannot even be looked at is a miss.

    Why: ``Path.is_file`` raises on a permission error, so one cache directory made unreadable (or
    created under ``umask 777``) failed every later fit and eval, though their caches are best effort."""
    try:
        return path.is_file()
    except OSError:
        return False


def stat_regular(path: str | Path, what: str = "file", error: type[FileProblem] = FileProblem) -> os.stat_result:
    """``os.stat`` of an existing regular file; anything else is a one-line ``error`` naming ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(path, "no such file") from None
    except NotADirectoryError:
        raise error(path, "no such file (a parent is not a directory)") from None
    except OSError as exc:
        raise error(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(path, f"is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(path, f"is {_kind(st.st_mode)}, expected a regular {what}")
    return st


def read_bytes(path: str | Path, *, what: str = "file", limit: int = MAX_INPUT_BYTES,
               error: type[FileProblem] = FileProblem) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Checked with ``stat`` before opening, and opened non-blocking and checked again with
    ``fstat``, so a FIFO swapped in between can neither block nor be read.
    """
    st = stat_regular(path, what, error)
    if st.st_size > limit:
        raise error(path, f"is {_size(st.st_size)}, over the {_size(limit)} limit for a {what}")
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        raise error(path, f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(path, f"is not a regular file, expected a {what}")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(path, f"is over the {_size(limit)} limit for a {what}")
    return data


#: Bytes read at each end of a file by :func:`edge_digest`.
EDGE_BYTES = 1 << 20


def edge_digest(path: str | Path) -> str:
    """A hash of a large file's size, first and last MiB: what tells two model files apart cheaply.

    Why not size and mtime alone: a model copied over another with ``cp -p``, ``rsync -a`` or ``tar``
    keeps both, and caches keyed by them served the old model's results. A GGUF's first MiB holds its
    metadata and its last MiB tensor data, so different weights differ there (reads ~2 MiB: milliseconds).
    """
    import hashlib

    size = os.stat(path).st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            f.seek(-EDGE_BYTES, os.SEEK_END)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()[:24]


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def decode_utf8(path: str | Path, raw: bytes, error: type[FileProblem] = FileProblem) -> str:
    """Strict UTF-8 text of ``raw``: a UTF-8 BOM is dropped; UTF-16/32, NUL bytes and bad bytes are errors."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            raise error(path, f"is {name} text; re-save it as UTF-8")
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise error(path, f"line {line}: contains a NUL byte (a binary or UTF-16 file?); re-save it as UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(path, f"not valid UTF-8 (byte {exc.start}, line {line}); re-save the file as UTF-8") from None


def read_text(path: str | Path, *, what: str = "file", limit: int = MAX_INPUT_BYTES,
              error: type[FileProblem] = FileProblem) -> str:
    """A regular file's strict UTF-8 text (see the module notes for what is refused)."""
    return decode_utf8(path, read_bytes(path, what=what, limit=limit, error=error), error)


def split_lines(text: str) -> list[str]:
    """Lines split at ``\\n`` only (``\\r\\n`` too); a final newline adds no empty line.

    Unlike ``str.splitlines`` this never cuts at U+2028, U+2029, U+0085, ``\\v``, ``\\f``
    or a lone ``\\r``, which are ordinary characters inside a prompt or a JSON string.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _reject_constant(name: str) -> Any:
    raise JsonProblem(f"{name} is not a JSON number")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonProblem(f"integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonProblem(f"number {text[:24]} is too large for a float")
    return value


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text``, strings ignored (cheap pre-check, no recursion)."""
    opens = text.count("[") + text.count("{")
    if opens <= MAX_JSON_DEPTH:
        return opens
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def is_json_int(value: Any) -> bool:
    """A parsed JSON integer: Python's ``bool`` is an ``int`` too, but ``true`` is not a number in JSON."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_json_number(value: Any) -> bool:
    """A parsed JSON number (integer or float, never ``true``/``false``); finiteness is the caller's rule."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    """A parsed value's type for messages: ``null`` for JSON null (not "NoneType"), else the Python name."""
    return "null" if value is None else type(value).__name__


def _check_strings(value: Any) -> None:
    """Raise on a lone surrogate anywhere in the parsed value (depth is bounded by the pre-check)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            raise JsonProblem(f"lone surrogate \\u{code:04x} in a string (not valid Unicode)") from None
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)


def parse_json(text: str) -> Any:
    """Parse one JSON document under the input rules; problems raise :class:`JsonProblem`."""
    deepest = json_depth(text)
    if deepest > MAX_JSON_DEPTH:
        raise JsonProblem(f"JSON nested {deepest} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonProblem(f"bad JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise JsonProblem(f"JSON nested too deep (at most {MAX_JSON_DEPTH} levels)") from None
    except JsonProblem:
        raise
    except ValueError as exc:  # e.g. int() digit limits we do not anticipate
        raise JsonProblem(f"bad JSON ({str(exc).splitlines()[0]})") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(value)
    return value


def load_json(path: str | Path, *, what: str = "JSON file", error: type[FileProblem] = FileProblem) -> Any:
    """A whole-file JSON document, read and parsed under the input rules."""
    text = read_text(path, what=what, error=error)
    try:
        return parse_json(text)
    except JsonProblem as exc:
        raise error(path, f"line {exc.line}: {exc.message}" if exc.line else exc.message) from None


def jsonl_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """``(line number, line, terminated)`` for every non-blank line of JSONL ``text``."""
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        terminated = lineno < len(lines)
        if line.endswith("\r"):
            line = line[:-1]
        if line.strip():
            yield lineno, line, terminated


def iter_jsonl(path: str | Path, text: str, *, error: type[FileProblem] = FileProblem,
               tolerate_partial_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` per non-blank JSONL line; a bad line is an ``error`` naming it.

    With ``tolerate_partial_tail`` an unterminated last line that does not parse is skipped
    (what a killed writer leaves); callers decide when that is acceptable.
    """
    for lineno, line, terminated in jsonl_lines(text):
        try:
            value = parse_json(line)
        except JsonProblem as exc:
            if tolerate_partial_tail and not terminated:
                return
            raise error(path, f"line {lineno}: {exc.message}") from None
        yield lineno, value


def partial_tail(text: str) -> bool:
    """True when ``text`` ends in an unterminated line that is not valid JSON (a killed writer's tail)."""
    if not text or text.endswith("\n"):
        return False
    last = text.rsplit("\n", 1)[-1]
    if not last.strip():
        return False
    try:
        parse_json(last)
    except JsonProblem:
        return True
    return False
