"""Ctrl-C, SIGTERM and SIGHUP that land inside a llama.cpp callback, held until the C call returns.

Why: Python runs a signal's handler at the next Python code of the main thread, and while
llama.cpp works that is often one of our ctypes callbacks (the log filter during a load, the
block reader's ``cb_eval`` during a read). ctypes prints an exception raised there as
"Exception ignored" and drops it: Ctrl-C during a model load was lost (the command ran on and
replaced its output), and during a read it turned into a false "no output" error. Catching it
inside the callback is not enough (the signal can land on the callback's first line, before its
``try``), so around such a call :func:`deferred` swaps the handlers for ones that :func:`hold`
the exception instead of raising it, and :func:`release` raises it when the call has returned, in
plain Python.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from rs_local.files.writing import STOP_SIGNALS

_STATE = threading.local()  # per thread: a Ctrl-C held for the main thread never surfaces on a worker


def _pending() -> list[BaseException]:
    if not hasattr(_STATE, "held"):
        _STATE.held = []
    return _STATE.held


def hold(exc: BaseException) -> None:
    """Keep ``exc`` for :func:`release`; called by callbacks, which must not raise. The first one is
    kept, except that a SIGTERM (SystemExit) wins over a Ctrl-C: ``chat`` takes Ctrl-C as "stop this
    reply", and a termination must not be lost behind it."""
    held = _pending()
    if not held:
        held.append(exc)
    elif isinstance(exc, SystemExit) and isinstance(held[0], KeyboardInterrupt):
        held[0] = exc


def release() -> None:
    """Raise the exception a callback held, if any (after a llama.cpp call has returned)."""
    held = _pending()
    if held:
        exc = held.pop()
        held.clear()
        raise exc


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP are held (their handlers' exceptions kept for
    :func:`release`) instead of raised wherever Python happens to be; the block's end releases them.

    Only the Python handlers in place are wrapped (Python's own Ctrl-C handler, rs-local's SIGTERM
    handler); a signal left to the OS's default keeps its default. Signal handlers can only be set
    on the main thread: elsewhere the block runs unchanged (signals are delivered there anyway)."""
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            release()
        return
    saved: dict[int, Any] = {}
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, _holding(handler))
    try:
        yield
    finally:
        try:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        finally:  # even if a second Ctrl-C lands while the handlers are put back: nothing stays held
            release()  # also when the block failed: a Ctrl-C wins over the call's own error


def _holding(handler: Any) -> Any:
    def held(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except BaseException as exc:  # the handler's KeyboardInterrupt or Terminated: kept for release()
            hold(exc)
    return held
