"""The callback types rs-local's long-running functions take, defined once for every package.

``Progress``: ``progress(done, total)`` after each finished item of a known total (the first
call of a resumed run may already report rows done earlier). The library reports counts; the
CLI turns them into a bar (``cli/``), so no screen code sits in the library.

``Say``: ``say(message)`` for one status line (a download, a fitting stage); the CLI prints it
dim on stderr, a library user may pass nothing.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int], None]
Say = Callable[[str], None]
