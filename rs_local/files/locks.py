"""One writer per output: an advisory lock beside a file that a command appends to for minutes.

Why: two ``respond`` runs started on the same output both resumed it and appended every row
twice, and ``judge`` then refused the file until the duplicates were removed by hand. The second
run now stops at once with one line naming the file.

The lock is ``.NAME.lock`` beside the output (the hidden-prefix style of our temp files), held with
``flock`` for the run and removed when it ends. A lock file unlinked by the holder between
another process's open and its ``flock`` would lock a file nobody else sees, so the inode is
checked after locking and the attempt repeated. Where ``fcntl`` does not exist (Windows) there is
no lock and the behaviour is as before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rs_local.errors import FileProblem

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(path: Path) -> Path:
    """``.NAME.lock`` beside ``path``; a long name is cut and told apart by a hash of the whole (two long
    outputs with one prefix must not lock each other out), within the usual 255-byte name limit."""
    name = path.name
    if len(name) > 120:
        name = name[:100] + "." + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return path.with_name(f".{name}.lock")


class OutputLock:
    """An exclusive lock on writing ``path``; :meth:`release` (or the ``with`` block's end) gives it up."""

    def __init__(self, path: str | Path, what: str = "output"):
        self.path = Path(path)
        self._fd: int | None = None
        if fcntl is None:
            return
        self._fd = _acquire(lock_path(self.path), self.path, what)

    def release(self) -> None:
        """Give the lock up and remove its file (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(lock_path(self.path))  # while still held: nobody can be waiting on this inode
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _acquire(lock: Path, path: Path, what: str) -> int | None:
    """The locked descriptor of ``lock``; None where locking is not possible here (the write then goes
    on unlocked, as before); a FileProblem naming ``path`` when another process holds it."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    for _ in range(20):
        try:
            fd = os.open(lock, flags, 0o666)
        except OSError:
            return None  # a read-only directory: the output cannot be written either, and that error says so
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileProblem(path, f"is being written by another rs-local process; wait for it to finish "
                                    f"or choose another {what}") from None
        except OSError:  # a filesystem without locks (some network mounts): go on without one
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this lock file as we locked it: take the new one
    return None
