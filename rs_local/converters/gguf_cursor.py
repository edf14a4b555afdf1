"""Bounded reading primitives for GGUF files: opening only regular files, a cursor that
checks every length against the bytes left, and printable labels for names and values.

Split from :mod:`gguf_check` (the parser) so each stays small; the parser re-exports what
other modules import from it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from rs_local.converters.gguf_limits import DIRECTION_NAME, GGUF_MAX_STRING_LENGTH, MAX_STRINGS
from rs_local.errors import VectorFileError
from rs_local.files.reading import READ_FLAGS


def _pad(x: int, n: int) -> int:
    """GGML_PAD for a power-of-two ``n``."""
    return (x + n - 1) & ~(n - 1)


def show(raw: bytes | str) -> str:
    """A name or key as it may appear in a one-line message: quoted, control characters escaped.

    ``repr`` escapes newlines, ESC, C1 controls, bidi overrides and lone surrogates, so a
    hostile name cannot break the message onto a second line or drive the terminal.
    """
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
    return repr(text)


def label(raw: bytes | str) -> str:
    """A key or name for a message: as is when plainly printable, else quoted like ``show``."""
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
    plain = text and text.isprintable() and text.strip() == text and not set(text) & set("'\"\\")
    return text if plain else show(text)


def tensor_label(name: bytes) -> str:
    """A tensor name as a message shows it: plain when canonical ``direction.N``, else quoted."""
    return name.decode("ascii") if DIRECTION_NAME.fullmatch(name) else show(name)


def ggml_type_name(ggml_type: int) -> str:
    """``F16``, ``Q4_0`` ... from the gguf package's enum, or ``type <n>`` for an unknown id."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


# --------------------------------------------------------------------------- opening


def open_regular_file(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading only if it is a regular file; return the handle and its size.

    Opened with O_NONBLOCK and checked with fstat, so a FIFO or a device given as a vector
    is refused at once instead of blocking forever (FIFO) or reading without end (/dev/zero),
    and the check cannot race with a rename between stat and open.
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        raise VectorFileError(path, "file not found") from None
    except IsADirectoryError:
        raise VectorFileError(path, "not a file (a directory)") from None
    except OSError as exc:
        raise VectorFileError(path, f"cannot read: {os.strerror(exc.errno or errno.EIO)}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise VectorFileError(path, "not a file (a directory)")
        if not stat.S_ISREG(info.st_mode):
            raise VectorFileError(path, "not a regular file (a pipe, socket or device)")
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


class _Cursor:
    """Reads from a file where every length is first checked against the bytes left.

    Nothing is read or allocated for a count until the file is known to hold that much, so
    the memory spent is bounded by the file's size, whatever its header declares.
    """

    def __init__(self, fh: BinaryIO, path: Path, size: int):
        self.fh, self.path, self.size, self.pos = fh, path, size, 0
        self.strings_left = MAX_STRINGS

    @property
    def left(self) -> int:
        return self.size - self.pos

    def truncated(self, detail: str) -> VectorFileError:
        return VectorFileError(self.path, f"truncated or corrupt GGUF file: {detail}")

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.truncated(f"{what} needs {n} bytes but only {self.left} are left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.fh.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise self.truncated(f"{what} is cut short")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.fh.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str, *, keep: bool = True, limit: int | None = None) -> bytes | None:
        """A GGUF string (u64 length + bytes), refused like gguf_reader::read(std::string)."""
        self.strings_left -= 1
        if self.strings_left < 0:
            raise VectorFileError(self.path, f"more than {MAX_STRINGS} strings, far more than a control vector holds")
        n = self.unpack("<Q", f"length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            raise VectorFileError(self.path, f"corrupt GGUF file: {what} declares {n} bytes, over llama.cpp's limit of 2^30")
        self.need(n, what)
        if not keep:
            self.skip(n, what)
            return None
        if limit is not None and n > limit:
            raise VectorFileError(self.path, f"{what} is {n} bytes, more than rs-local reads ({limit})")
        return self.take(n, what)
