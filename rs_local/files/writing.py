"""Output checks before work, atomic writes, append logs (see :mod:`rs_local.files`)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import signal
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from rs_local.errors import FileProblem
from rs_local.files.reading import _kind, read_bytes

#: Age after which a leftover temp file of ours beside a target is removed.
STALE_TEMP_SECONDS = 3600


class Terminated(SystemExit):
    """SIGTERM (or SIGHUP: the terminal closed) arrived; raised so temp files are removed on the way out.
    The exit status is the shell's for that signal (143, 129)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)


#: Signals that end a command the way SIGTERM does: SIGHUP is what a closed terminal or a dropped SSH
#: session sends, and left to the OS it killed the command with its temp files and lock left behind.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


# ----------------------------------------------------------------------------- JSON out


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Standard JSON text: non-finite floats are written as ``null`` (JSON has no NaN/Infinity).

    Our readers refuse ``NaN``/``Infinity``, so a writer must never produce them.
    """
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False, **kwargs)


# ----------------------------------------------------------------------------- output checks


def _own(st: os.stat_result) -> bool:
    """Whether this user owns the file; Windows has no uids (a user's directory holds their own files)."""
    getuid = getattr(os, "getuid", None)
    return getuid is None or st.st_uid == getuid()


def file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give: 0666 minus the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_parent(path: Path) -> None:
    parent = path.parent
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise FileProblem(path, f"directory {parent} does not exist") from None
    except OSError as exc:
        raise FileProblem(path, f"directory {parent} cannot be used ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FileProblem(path, f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileProblem(path, f"directory {parent} is not writable")


#: Where a symlinked output must not lead: a process's descriptors (/dev/stdout is a link into /proc) and
#: kernel objects. A link to a device itself is refused by the regular-file check, /dev/shm's files pass.
_SPECIAL_ROOTS = ("/proc/", "/sys/")


def output_target(path: str | Path) -> Path:
    """The file an output path names: a symlink is followed to its target, which is written instead.

    Why: the temp file was renamed over the link itself, so ``-o link.npz`` replaced the link with a
    file and left its target as it was, and ``-o /dev/stdout`` (run as root) replaced the system's
    /dev/stdout link with a regular file. A link through /proc or /sys (a process's descriptor: a
    terminal, a pipe) is refused: rs-local writes files whole, by rename, not into streams.
    """
    if str(path) in ("", "-"):  # "-" wrote a file named "-" where stdout was meant; "" was reported as "."
        raise FileProblem(str(path) or "''", "is not a file name (rs-local writes files whole, not to standard output)")
    path = Path(path)
    if not os.path.islink(path):
        return path
    hop = os.path.abspath(path)
    for _ in range(40):  # every link on the way counts: /dev/stdout -> /proc/self/fd/1 -> wherever stdout is
        if not os.path.islink(hop):
            break
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
        if hop.startswith(_SPECIAL_ROOTS):
            raise FileProblem(path, f"is a link to {hop}; rs-local writes outputs as whole files, not into a "
                                    "terminal, pipe or device: give a file name")
    return Path(os.path.realpath(path))


def check_output_path(path: str | Path, force: bool = False, *, directory: bool = False) -> Path:
    """Refuse an output before any work: it must be creatable in a writable directory.

    A file output must not be a directory or a special file (a device or FIFO would be
    replaced, or written into), and must not exist unless ``force``. A ``directory`` output
    must not be a file, must not exist unless ``force`` (then it must be writable), and its
    parent must exist: rs-local does not create missing parents behind the user's back. A
    symlink is checked as its target (:func:`output_target`), which is what gets written.
    """
    path = output_target(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise FileProblem(path, f"cannot be used ({exc.strerror or exc})") from None
    if st is not None:
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise FileProblem(path, "exists and is not a directory")
            if not force:
                raise FileProblem(path, "output directory exists (use --force to overwrite its files)")
            if not os.access(path, os.W_OK | os.X_OK):
                raise FileProblem(path, "directory is not writable")
            return path
        if stat.S_ISDIR(st.st_mode):
            raise FileProblem(path, "is a directory, expected a file")
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(path, f"is {_kind(st.st_mode)}; rs-local only replaces regular files")
        if not force:
            raise FileProblem(path, "already exists (use --force to overwrite)")
    _check_parent(path)
    return path


def check_distinct(outputs: Sequence[str | Path | None], inputs: Sequence[str | Path | None] = ()) -> None:
    """One line when an output would overwrite an input or another output of the same command.

    Why: each output was checked alone, so ``fit -o v.gguf --plot v.gguf`` wrote the vector and then
    the plot over it, exit 0, the fit lost. Paths are compared as the files they name (links followed)."""
    seen = [_identity(Path(os.path.realpath(p))) for p in inputs if p is not None]
    for out in outputs:
        if out is None:
            continue
        real = _identity(output_target(out).resolve())
        if any(real == other or (real[1] is not None and real[1] == other[1]) for other in seen):
            raise FileProblem(out, "output would overwrite another input or output file of this command")
        seen.append(real)


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """A path and, where the file exists, its (device, inode): hard links and case-insensitive
    file systems name one file by several paths."""
    try:
        st = os.stat(path)
    except OSError:
        return path, None
    return path, (st.st_dev, st.st_ino)


def make_output_dir(path: str | Path, force: bool = False) -> Path:
    """Check ``path`` as a directory output and create it (its parent must exist)."""
    path = check_output_path(path, force, directory=True)
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise FileProblem(path, f"cannot be created ({exc.strerror or exc})") from None
    return path


# ----------------------------------------------------------------------------- atomic writing


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:120]}."


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(_temp_prefix(path)) + r"[A-Za-z0-9_]{6,32}\.tmp")


def is_stale_dir(path: Path, max_age: float = STALE_TEMP_SECONDS) -> bool:
    """Whether a leftover work directory has had nothing written for ``max_age`` seconds: neither it
    nor any file in it changed since. A download or save still running keeps writing a file inside,
    so its directory's own mtime alone (set when it was made) would call it stale an hour in."""
    try:
        newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
    except OSError:
        return False
    return time.time() - newest > max_age


def sweep_stale_temps(path: str | Path, max_age: float = STALE_TEMP_SECONDS) -> int:
    """Remove our own leftover temp files of ``path`` (``.NAME.<random>.tmp``) older than ``max_age`` seconds.

    Such files are what a SIGKILLed write leaves; younger ones may belong to a write still
    running. Best effort: returns how many were removed.
    """
    path = Path(path)
    pattern, now, removed = _temp_pattern(path), time.time(), 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and _own(st) and now - st.st_mtime > max_age:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def new_temp(path: Path) -> Path:
    """Create an empty temp file beside ``path`` with the umask's mode (``os.open`` 0666, not mkstemp's 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(_temp_prefix(path) + secrets.token_hex(6) + ".tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise FileProblem(path, f"cannot be written ({exc.strerror or exc})") from None
    raise FileProblem(path, "cannot create a temp file beside it")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` (so ``finally`` blocks run) instead of
    killing outright; a signal someone else handles keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = raise_on_stop_signals()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_on_stop_signals() -> dict[int, Any]:
    """Make each of :data:`STOP_SIGNALS` left to the OS raise :class:`Terminated` (so ``finally`` blocks
    run); a handler someone else set, or an ignored signal (``nohup``), is left alone. Returns the
    handlers replaced, for a caller that puts them back. Only the main thread can set handlers."""
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def _raise_terminated(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


def _fsync_path(path: Path, flags: int = os.O_RDWR) -> None:
    """Flush a file we wrote to disk. Opened for writing: Windows' fsync (FlushFileBuffers) fails with
    EBADF on a read-only handle, which made every atomic write an error there."""
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        _fsync_path(directory, os.O_RDONLY)  # a directory opens read-only (POSIX only; elsewhere it fails quietly)
    except OSError:
        pass  # not every filesystem lets a directory be fsynced; the rename is still atomic


def _mode_for(path: Path) -> int:
    """What a plain ``open(path, "w")`` would leave: an existing file's mode, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return file_mode()


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block finishes, make it ``path`` in one step.

    The target is checked first (:func:`check_output_path`: an existing file is replaced only
    with ``force``). The caller writes the temp file by name (``savefig``, ``save_file``,
    ``open``). On success it is fsynced and renamed over ``path``; on any exception, Ctrl-C
    or SIGTERM it is removed. Operating-system errors name ``path``, not the temp file.
    """
    path = check_output_path(path, force)  # a symlink's target (see output_target)
    sweep_stale_temps(path)
    with _sigterm_raises():
        tmp = new_temp(path)
        try:
            yield tmp
            _fsync_path(tmp)  # before the chmod: the target's mode may be read-only
            os.chmod(tmp, _mode_for(path))  # some writers (safetensors) recreate the file 0600
            os.replace(tmp, path)
            _fsync_dir(path.absolute().parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not tmp.exists():
                raise FileProblem(path, "its temp file vanished during the write") from None
            raise FileProblem(path, f"cannot be written ({exc.strerror or exc})") from None
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass


def atomic_write_bytes(path: str | Path, data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (replacing it unless ``force`` is false)."""
    path = Path(path)
    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, force: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (replacing it unless ``force`` is false)."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def write_jsonl(path: str | Path, rows: Any, *, force: bool = True) -> Path:
    """One JSON object per line, atomically; non-finite floats become ``null`` (see :func:`dumps`)."""
    path = Path(path)
    with atomic_output(path, force=force) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
    return path


def open_append(path: str | Path) -> IO[str]:
    """An append handle on a log: created like a plain ``open()`` (umask mode), UTF-8, ``\\n`` line ends."""
    try:
        return open(path, "a", encoding="utf-8", newline="\n")
    except OSError as exc:
        raise FileProblem(path, f"cannot be written ({exc.strerror or exc})") from None


def append_line(fh: IO[str], text: str) -> None:
    """Append one line and make it durable before returning (a kill after this keeps it)."""
    fh.write(text + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def cut_partial_tail(path: str | Path) -> None:
    """Drop an unterminated last line from ``path`` (only call when resuming, after every check passed)."""
    data = read_bytes(path, what="log")
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
