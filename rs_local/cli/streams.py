"""The process's standard streams and surroundings, made safe before any command runs.

Why: the work a command does is worth more than its messages, and each of these ended a
finished command with a traceback or lost its output:

* **Encodings.** A terminal or pipe that is not UTF-8 (a latin-1 locale, Windows' ANSI code page
  when output is redirected, ``PYTHONIOENCODING=latin-1``) cannot print the Chinese the default
  model often answers in, nor rich's "…": ``UnicodeEncodeError`` after the answer was generated.
  Redirected output becomes UTF-8 (what JSON and files want); a terminal keeps its encoding and
  shows what it cannot print as ``\\uXXXX``.
* **Input bytes.** With ``PYTHONIOENCODING=utf-8`` (the fix rich itself suggests) stdin decodes
  strictly, and one latin-1 byte in a chat line raised ``UnicodeDecodeError`` and ended the
  session; undecodable bytes now reach the chat's own "not valid UTF-8" check. Redirected input
  is read as UTF-8 whatever the locale.
* **A stderr that cannot be written** (closed, a read-only descriptor, a full disk): a progress
  line raised OSError and the command died without its answer. Messages are best-effort.
* **A width that is not one** (``COLUMNS=0`` printed every table as nothing).
* **A deleted working directory**: torch's loader aborts the process with an MKL fatal error.
* **A closed standard output** (``>&-``): Python sets ``sys.stdout`` to None and every print is
  dropped, so ``generate hi >&-`` exited 0 with its answer lost. Printing to it is now an error.
* **A standard output that cannot be written** (``> /dev/full``, a full disk): the error named no
  stream or file; it now says "standard output".
"""

from __future__ import annotations

import codecs
import errno
import os
import sys
from typing import Any, TextIO

#: Narrowest ``COLUMNS`` kept: below it rich squeezes every table cell to nothing.
MIN_COLUMNS = 20


class BestEffort:
    """A text stream whose writes and flushes never raise OSError (for diagnostics only)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        if name == "_stream":  # an instance made without __init__ (copy.copy): no stream, no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)


def _is_utf8(stream: Any) -> bool:
    try:
        return codecs.lookup(stream.encoding or "ascii").name == "utf-8"
    except (LookupError, AttributeError):
        return False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (OSError, ValueError, AttributeError):
        return False


def safe_output(stream: Any) -> None:
    """Redirected and not UTF-8: make it UTF-8; a terminal that is not: escape what it cannot show."""
    if stream is None or _is_utf8(stream) or not hasattr(stream, "reconfigure"):
        return
    try:
        if _isatty(stream):
            stream.reconfigure(errors="backslashreplace")
        else:
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    except (OSError, ValueError, LookupError):
        pass


def safe_input(stream: Any) -> None:
    """Undecodable input bytes become surrogates (which the chat reports) instead of an exception;
    redirected input (and a terminal said to be ASCII) is read as UTF-8, as redirected output is
    written: under ``LC_ALL=C`` a file of Chinese piped into ``chat`` was "not valid UTF-8 text"."""
    if stream is None or not hasattr(stream, "reconfigure"):
        return
    try:
        ascii_only = codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "ascii"
    except LookupError:
        ascii_only = True
    try:
        if not _is_utf8(stream) and (ascii_only or not _isatty(stream)):
            stream.reconfigure(encoding="utf-8", errors="surrogateescape")
        else:
            stream.reconfigure(errors="surrogateescape")
    except (OSError, ValueError, LookupError):
        pass


def sane_columns(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Drop a ``COLUMNS`` that is not a usable width, so rich measures the terminal instead."""
    raw = env.get("COLUMNS")
    if raw is None:
        return
    try:
        if int(raw) >= MIN_COLUMNS:
            return
    except ValueError:
        pass
    env.pop("COLUMNS", None)


class ClosedOutput:
    """Stands in for a closed ``sys.stdout``: writing the result is a one-line error, not a silent loss."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        from rs_local.errors import RsLocalError

        if not text:
            return 0
        raise RsLocalError("standard output is closed (>&-), so the result cannot be printed; "
                           "redirect it to a file or /dev/null instead")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class NamedOutput:
    """Standard output whose write failures name it: ``rs-local inspect v.gguf > /dev/full`` said only
    "Error: [Errno 28] No space left on device", which names neither the stream nor any file. A
    broken pipe passes through (click ends quietly on it)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _guard(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            from rs_local.errors import RsLocalError

            raise RsLocalError(f"standard output: cannot be written ({exc.strerror or exc})") from None

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        if name == "_stream":  # an instance made without __init__ (copy.copy): no stream, no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)


def missing_cwd() -> str | None:
    """The one-line problem when the working directory was deleted under us, else None."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the current directory no longer exists (it was deleted): cd to one that does and run again"
    except OSError:
        return None
    return None


def prepare() -> str | None:
    """Make the streams and environment safe (see the module doc); a problem to stop on, or None."""
    if sys.stdout is None:
        sys.stdout = ClosedOutput()  # type: ignore[assignment]
    safe_output(sys.stdout)
    if not isinstance(sys.stdout, (ClosedOutput, NamedOutput)):
        sys.stdout = NamedOutput(sys.stdout)  # type: ignore[assignment]
    safe_output(sys.stderr)
    safe_input(sys.stdin)
    if sys.stderr is not None and not isinstance(sys.stderr, BestEffort):
        sys.stderr = BestEffort(sys.stderr)  # type: ignore[assignment]
    sane_columns()
    return missing_cwd()
