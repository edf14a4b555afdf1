"""Append-only JSONL logs that survive being killed, and atomic whole-file writes.

Sampling answers and judging them are the slow steps of the pipeline (hours for a real prompt
set on a laptop), so both write one row per finished unit of work, flushed and fsynced before
the next starts. A run that is killed and started again with the same command reads what is
there, skips every key already done and appends the rest: no row twice, none lost.

The first row of such a log is a header ``{"rs_local_header": {"kind", "version", "config"}}``
recording the settings that produced the rows. Continuing a log written with other settings
would mix two experiments in one file, so that is an error unless the caller forces a fresh
start. A kill during a write can leave a partial last line. It is cut off and redone, but only
when the log is really resumed, after the header and every row passed their checks: a file
that is refused keeps every byte. Anywhere else (a broken line in the middle, or a partial
last line of a file being *read* as input) it is an error naming the line.

Reading goes through :mod:`rs_local.files` (regular files only, bounded, strict UTF-8 and
JSON), writing too (atomic, umask mode).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from rs_local.errors import FileProblem
from rs_local.files import (
    JsonProblem, append_line, check_output_path, cut_partial_tail, dumps, iter_jsonl, json_type, new_temp, open_append,
    output_target, parse_json, partial_tail, read_text, stat_regular, sweep_stale_temps, write_jsonl,
)
from rs_local.files.locks import OutputLock

HEADER_KEY = "rs_local_header"
FORMAT_VERSION = 1


def normalise(obj: Any) -> Any:
    """The JSON round-trip of ``obj`` (tuples become lists), so configs compare as stored."""
    return json.loads(dumps(obj, sort_keys=True))


def is_header(row: Any) -> bool:
    return isinstance(row, dict) and HEADER_KEY in row


def read_jsonl(path: str | Path, *, tolerate_partial_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for every non-blank line; bad JSON names its line.

    With ``tolerate_partial_tail`` a last line without its newline that does not parse is
    skipped (it is what a killed writer leaves behind); callers decide when that is right.
    """
    text = read_text(path, what="JSONL file")
    yield from iter_jsonl(path, text, tolerate_partial_tail=tolerate_partial_tail)


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """Write all rows to a temp file beside ``path`` and rename it over, so readers never see half."""
    write_jsonl(path, rows, force=True)


#: Config keys added after logs were first written, at any depth: a header without one still resumes
#: (the key is unknown there, not different). ``model_edges`` (respond) tells apart model files of one
#: name and size; ``digest`` (respond's vectors) a vector's contents; ``weights`` (a judge) its model's.
ADDED_KEYS = frozenset({"model_edges", "digest", "weights"})


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if not (k in ADDED_KEYS and k not in old) and _differs(old.get(k), new.get(k))]


def _differs(old: Any, new: Any) -> bool:
    """Whether two stored config values differ, with keys added since ``old`` was written left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        return bool(_config_diff(old, new))
    if isinstance(old, list) and isinstance(new, list):
        return len(old) != len(new) or any(_differs(a, b) for a, b in zip(old, new))
    return old != new


@dataclass
class AppendLog:
    """A resumable JSONL log of ``kind`` rows produced under ``config``.

    ``key`` maps a row to its identity (what "already done" means); it may raise
    ``KeyError``/``TypeError``/``ValueError`` on a malformed row, which is then reported
    with its line. Use :meth:`open` to create or resume, :meth:`append` to add one finished
    row durably.
    """

    path: Path
    kind: str
    config: dict
    key: Callable[[dict], Hashable]
    rows: list[dict] = field(default_factory=list)
    done: set = field(default_factory=set)
    _fh: Any = None
    #: where a forced run's log goes when it finishes; until then ``path`` is a temp file beside it
    _target: Path | None = None
    _lock: Any = None  # OutputLock on the log's final name: one writer at a time

    @classmethod
    def open(cls, path: str | Path, kind: str, config: dict, key: Callable[[dict], Hashable], force: bool = False) -> "AppendLog":
        """Resume ``path`` if it holds a log of the same kind and config; start it afresh otherwise.

        A log of another kind or config, or a file that is not an rs-local log, raises
        :class:`FileProblem` (and is left untouched) unless ``force``.
        """
        log = cls(output_target(path), kind, normalise(config), key)  # a symlink's target is the log
        log._lock = OutputLock(log.path, what="output file")  # a second run on it stops here
        try:
            log._open(force)
        except BaseException:
            log._lock.release()
            raise
        return log

    def _open(self, force: bool) -> None:
        if self.path.exists() and not force:
            self._resume()
        else:
            if self.path.exists():  # forced over a file: it stays until the new log is complete (see __exit__)
                check_output_path(self.path, force=True)
                sweep_stale_temps(self.path)  # what a forced run killed with SIGKILL left behind
                self._target, self.path = self.path, new_temp(self.path)
            try:
                self._start()
            except BaseException:
                if self._target is not None:
                    self.path.unlink(missing_ok=True)
                raise
        try:
            self._fh = open_append(self.path)
        except BaseException:
            self.__exit__(OSError)
            raise

    @classmethod
    def check(cls, path: str | Path, kind: str, config: dict, force: bool = False) -> None:
        """Raise the error :meth:`open` would raise, without writing anything (a cheap pre-flight)."""
        path = Path(path)
        if force or not path.exists():
            check_output_path(path, force=True)
            return
        log = cls(path, kind, normalise(config), key=lambda row: None)
        log._entries()

    def _header(self) -> dict:
        return {HEADER_KEY: {"kind": self.kind, "version": FORMAT_VERSION, "config": self.config}}

    def _start(self) -> None:
        write_jsonl(self.path, [self._header()], force=True)

    def _entries(self) -> tuple[str, list[tuple[int, Any]]]:
        """The file's text and parsed lines, header checked; raises before anything is changed."""
        stat_regular(self.path, what=f"{self.kind} log")
        text = read_text(self.path, what=f"{self.kind} log")
        try:
            entries = list(iter_jsonl(self.path, text, tolerate_partial_tail=True))
        except FileProblem:
            if not starts_with_header(text):  # a broken first line: somebody else's file, say so
                raise FileProblem(self.path, f"exists and is not an rs-local {self.kind} file; use --force to overwrite it") from None
            raise
        if entries:
            self._check_header(entries[0][1])
        elif text.strip():
            raise FileProblem(self.path, f"exists and is not an rs-local {self.kind} file; use --force to overwrite it")
        return text, entries

    def _resume(self) -> None:
        text, entries = self._entries()
        if not entries:
            self._start()  # an empty file: nothing to keep
            return
        rows: list[dict] = []
        done: set = set()
        for lineno, row in entries[1:]:
            if not isinstance(row, dict) or is_header(row):
                raise FileProblem(self.path, f"line {lineno}: not a {self.kind} row; use --force to start over")
            try:
                k = self.key(row)
            except (KeyError, TypeError, ValueError) as exc:
                raise FileProblem(self.path, f"line {lineno}: not a valid {self.kind} row ({_why(exc)}); "
                                             "use --force to start over") from None
            if k not in done:
                done.add(k)
                rows.append(row)
        # Every check passed: only now may the file change.
        if partial_tail(text):
            cut_partial_tail(self.path)
        elif not text.endswith("\n"):
            with open_append(self.path) as fh:
                append_line(fh, "")  # a complete last row without its newline: end it, lose nothing
        self.rows, self.done = rows, done

    def _check_header(self, head: Any) -> None:
        if not is_header(head) or not isinstance(head[HEADER_KEY], dict):
            raise FileProblem(self.path, f"exists and is not an rs-local {self.kind} file; use --force to overwrite it")
        meta = head[HEADER_KEY]
        if meta.get("kind") != self.kind:
            raise FileProblem(self.path, f"holds {meta.get('kind')} rows, not {self.kind}; use --force to overwrite it")
        old = meta.get("config") or {}
        diff = ", ".join(_config_diff(old, self.config)) if isinstance(old, dict) else "config"
        if diff:
            raise FileProblem(
                self.path,
                f"was written with different settings ({diff}); use --force to start over, or another output file",
            )

    def __contains__(self, key: Hashable) -> bool:
        return key in self.done

    def append(self, row: dict) -> None:
        """Write one finished row and make it durable before returning."""
        k = self.key(row)
        if k in self.done:
            return
        self._check_still_there()
        try:
            append_line(self._fh, dumps(row))
        except OSError as exc:  # a full disk mid-run: say which file, and that what is there is kept
            raise self._write_problem(exc) from None
        self.done.add(k)
        self.rows.append(row)

    def _check_still_there(self) -> None:
        """Stop when the log was deleted or replaced under us: rows appended to a removed file are lost,
        and the run reported success with no file left (a stat per row; an answer takes far longer)."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        except OSError:
            return
        if not same:
            raise FileProblem(self._target or self.path, "was deleted or replaced while this command wrote to it; "
                                                         "run the command again to write it anew")

    def _write_problem(self, exc: OSError) -> FileProblem:
        kept = "" if self._target is not None else "; the rows before it are kept, and the same command goes on from there"
        return FileProblem(self._target or self.path, f"cannot be written ({exc.strerror or exc}){kept}")

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                raise self._write_problem(exc) from None

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Close; a forced run's log replaces the old file only when the run finished (an error, Ctrl-C
        or SIGTERM used to leave the old file already destroyed and a partial one in its place)."""
        try:
            try:
                self.close()
            except BaseException:  # the last rows could not be written (a full disk): the old log stays
                if self._target is not None:
                    self.path.unlink(missing_ok=True)  # and the forced run's partial one goes
                raise
            if self._target is None:
                return
            if exc_type is None:
                os.chmod(self.path, stat.S_IMODE(os.stat(self._target).st_mode))  # the old file's permissions
                os.replace(self.path, self._target)
                self.path, self._target = self._target, None
            else:
                self.path.unlink(missing_ok=True)
        finally:
            if self._lock is not None:
                self._lock.release()


def _why(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no field {exc.args[0]!r}" if exc.args else "missing field"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def data_rows(path: str | Path, what: str = "row") -> list[tuple[int, dict]]:
    """The object rows of a JSONL input file (an rs-local header line is skipped), with line numbers.

    Every line must parse, the last one too: a partial last line in a file an rs-local
    writer made means that writer was killed or is still running, and reading on would
    silently use part of the file, so it is an error that says so.
    """
    text = read_text(path, what="JSONL file")
    out = []
    for lineno, row in iter_jsonl(path, text, tolerate_partial_tail=True):
        if is_header(row):
            continue
        if not isinstance(row, dict):
            raise FileProblem(path, f"line {lineno}: expected a JSON object {what}, found {json_type(row)}")
        out.append((lineno, row))
    if partial_tail(text):
        _raise_for_tail(path, text)
    return out


def _raise_for_tail(path: str | Path, text: str) -> None:
    """The error for an unterminated, unparsable last line of an input file."""
    last = len(text.split("\n"))
    if starts_with_header(text):
        raise FileProblem(path, f"line {last}: incomplete last line (the command writing this file was killed "
                                "or is still running); run it again to finish the file")
    try:
        parse_json(text.rsplit("\n", 1)[-1])
    except JsonProblem as exc:
        raise FileProblem(path, f"line {last}: {exc.message}") from None


def starts_with_header(text: str) -> bool:
    """Whether ``text``'s first line is a complete rs-local header (never raises)."""
    try:
        return is_header(parse_json(text.split("\n", 1)[0]))
    except JsonProblem:
        return False
