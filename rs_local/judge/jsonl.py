"""Append-only JSONL logs that survive being killed, and atomic whole-file writes.

Sampling answers and judging them are the slow steps of the pipeline (hours for a real prompt
set on a laptop), so both write one row per finished unit of work, flushed and fsynced before
the next starts. A run that is killed and started again with the same command reads what is
there, skips every key already done and appends the rest: no row twice, none lost.

The first row of such a log is a header ``{"rs_local_header": {"kind", "version", "config"}}``
recording the settings that produced the rows. Continuing a log written with other settings
would mix two experiments in one file, so that is an error unless the caller forces a fresh
start. A kill during a write can leave a partial last line; it is cut off and redone. A broken
line anywhere else is not ours to guess about and is reported with its line number.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from rs_local.errors import FileProblem

HEADER_KEY = "rs_local_header"
FORMAT_VERSION = 1


def normalise(obj: Any) -> Any:
    """The JSON round-trip of ``obj`` (tuples become lists), so configs compare as stored."""
    return json.loads(json.dumps(obj, sort_keys=True))


def is_header(row: Any) -> bool:
    return isinstance(row, dict) and HEADER_KEY in row


def read_jsonl(path: str | Path, *, tolerate_partial_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for every non-blank line; bad JSON names its line.

    With ``tolerate_partial_tail`` a last line without its newline that does not parse is
    skipped silently (it is what a killed writer leaves behind).
    """
    path = Path(path)
    if not path.exists():
        raise FileProblem(path, "no such file")
    if path.is_dir():
        raise FileProblem(path, "is a directory, expected a JSONL file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last_unterminated = lineno == len(lines) and not data.endswith(b"\n")
        try:
            yield lineno, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            if tolerate_partial_tail and last_unterminated:
                return
            raise FileProblem(path, f"line {lineno}: not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            if tolerate_partial_tail and last_unterminated:
                return
            raise FileProblem(path, f"line {lineno}: bad JSON ({exc.msg} at column {exc.colno})") from None


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """Write all rows to a temp file beside ``path`` and rename it over, so readers never see half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


@dataclass
class AppendLog:
    """A resumable JSONL log of ``kind`` rows produced under ``config``.

    ``key`` maps a row to its identity (what "already done" means). Use :meth:`open` to
    create or resume, :meth:`append` to add one finished row durably.
    """

    path: Path
    kind: str
    config: dict
    key: Callable[[dict], Hashable]
    rows: list[dict] = field(default_factory=list)
    done: set = field(default_factory=set)
    _fh: Any = None

    @classmethod
    def open(cls, path: str | Path, kind: str, config: dict, key: Callable[[dict], Hashable], force: bool = False) -> "AppendLog":
        """Resume ``path`` if it holds a log of the same kind and config; start it afresh otherwise.

        A log of another kind or config raises :class:`FileProblem` unless ``force``.
        """
        log = cls(Path(path), kind, normalise(config), key)
        if log.path.exists() and not force:
            log._resume()
        else:
            log._start()
        log._fh = open(log.path, "a", encoding="utf-8")
        return log

    @classmethod
    def check(cls, path: str | Path, kind: str, config: dict, force: bool = False) -> None:
        """Raise the error :meth:`open` would raise, without writing anything (a cheap pre-flight)."""
        path = Path(path)
        if force or not path.exists():
            return
        if path.is_dir():
            raise FileProblem(path, "is a directory")
        log = cls(path, kind, normalise(config), key=lambda row: None)
        for _, head in read_jsonl(path, tolerate_partial_tail=True):
            log._check_header(head)
            return

    def _header(self) -> dict:
        return {HEADER_KEY: {"kind": self.kind, "version": FORMAT_VERSION, "config": self.config}}

    def _start(self) -> None:
        if self.path.is_dir():
            raise FileProblem(self.path, "is a directory")
        write_jsonl_atomic(self.path, [self._header()])

    def _resume(self) -> None:
        self._cut_partial_tail()
        entries = list(read_jsonl(self.path))
        if not entries:
            self._start()
            return
        _, head = entries[0]
        self._check_header(head)
        for _, row in entries[1:]:
            if not isinstance(row, dict) or is_header(row):
                continue
            k = self.key(row)
            if k not in self.done:
                self.done.add(k)
                self.rows.append(row)

    def _check_header(self, head: Any) -> None:
        if not is_header(head):
            raise FileProblem(self.path, f"exists and is not an rs-local {self.kind} file; use --force to overwrite it")
        meta = head[HEADER_KEY]
        if meta.get("kind") != self.kind:
            raise FileProblem(self.path, f"holds {meta.get('kind')} rows, not {self.kind}; use --force to overwrite it")
        old = meta.get("config") or {}
        if old != self.config:
            diff = ", ".join(_config_diff(old, self.config))
            raise FileProblem(
                self.path,
                f"was written with different settings ({diff}); use --force to start over, or another output file",
            )

    def _cut_partial_tail(self) -> None:
        """Drop a last line that a killed writer left without its newline."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, key: Hashable) -> bool:
        return key in self.done

    def append(self, row: dict) -> None:
        """Write one finished row and make it durable before returning."""
        k = self.key(row)
        if k in self.done:
            return
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(k)
        self.rows.append(row)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_rows(path: str | Path, what: str = "row") -> list[tuple[int, dict]]:
    """The object rows of a JSONL file (header skipped), with line numbers.

    A partial last line is tolerated only in a file that an rs-local writer made (it starts
    with a header): there it means a writer was killed or is still running. In a hand-made
    file a broken last line is an error like any other.
    """
    ours = header_of_first_line(path) is not None
    out = []
    for lineno, row in read_jsonl(path, tolerate_partial_tail=ours):
        if is_header(row):
            continue
        if not isinstance(row, dict):
            raise FileProblem(path, f"line {lineno}: expected a JSON object {what}, found {type(row).__name__}")
        out.append((lineno, row))
    return out


def header_of_first_line(path: str | Path) -> dict | None:
    """The header when the file's first line is a complete rs-local header, else None (never raises on content)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return None
    try:
        row = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row[HEADER_KEY] if is_header(row) else None


def header_of(path: str | Path) -> dict | None:
    """The header of an rs-local log, or None when the file has none."""
    for _, row in read_jsonl(path, tolerate_partial_tail=True):
        return row[HEADER_KEY] if is_header(row) else None
    return None
