"""Ctrl-C and SIGTERM that land inside a llama.cpp callback, held until the C call returns.

Why: Python runs a signal's handler at the next Python code of the main thread, and while
llama.cpp works that is often one of our ctypes callbacks (the log filter during a load, the
block reader's ``cb_eval`` during a read). ctypes prints an exception raised there as
"Exception ignored" and drops it: Ctrl-C during a model load was lost (the command ran on and
replaced its output), and during a read it turned into a false "no output" error. So callbacks
:func:`hold` whatever they catch, and every place that calls into llama.cpp calls
:func:`release` when the call returns, which raises it there, in plain Python.
"""

from __future__ import annotations

_PENDING: list[BaseException] = []


def hold(exc: BaseException) -> None:
    """Keep ``exc`` for :func:`release`; called by callbacks, which must not raise. The first one is
    kept, except that a SIGTERM (SystemExit) wins over a Ctrl-C: ``chat`` takes Ctrl-C as "stop this
    reply", and a termination must not be lost behind it."""
    if not _PENDING:
        _PENDING.append(exc)
    elif isinstance(exc, SystemExit) and isinstance(_PENDING[0], KeyboardInterrupt):
        _PENDING[0] = exc


def release() -> None:
    """Raise the exception a callback held, if any (after a llama.cpp call has returned)."""
    if _PENDING:
        exc = _PENDING.pop()
        _PENDING.clear()
        raise exc
