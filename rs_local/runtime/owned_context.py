"""Lifetime of a llama.cpp context (and its batch) that an engine creates on a Runner's model.

The batched engine and the activation reader each own a second context on the same loaded
weights; both free it, and its batch, the same way: explicitly with ``close()`` or a ``with``
block, and as a last resort on garbage collection.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

#: Guards every owned context's ``_owner``/``_depth`` (held for a few instructions at a time).
_OWNERS = threading.Lock()


class OwnedContext:
    """Mixin: subclasses set ``self._lib`` (llama_cpp), ``self.ctx`` and ``self._batch``."""

    _lib: Any
    ctx: Any = None
    _batch: Any = None

    def live(self) -> None:
        """A one-line error where llama.cpp would be handed freed memory (a segfault): this context
        after :meth:`close`, or the Runner whose model it runs on after its ``close()``."""
        from rs_local.errors import RsLocalError

        if not self.ctx:
            raise RsLocalError(f"this {type(self).__name__} is closed")
        runner = getattr(self, "runner", None)
        if runner is not None and getattr(runner, "closed", False):
            raise RsLocalError(f"the Runner under this {type(self).__name__} is closed")

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Hold this context for the calling thread through one public call (re-entrant).

        Why: a llama.cpp context serves one call at a time; two threads decoding on one reader or
        engine aborted the process inside ggml (GGML_ASSERT), and a :meth:`close` from another thread
        freed it mid-decode. A second thread now gets a one-line error, as the Runner gives. The
        Runner under it is lent for the call too, so closing the Runner then is refused as well."""
        from rs_local.errors import RsLocalError

        me = threading.get_ident()
        with _OWNERS:
            self.live()
            owner = getattr(self, "_owner", None)
            if owner not in (None, me):
                raise RsLocalError(f"this {type(self).__name__} is in use by another thread: a llama.cpp "
                                   "context serves one call at a time (make one per thread)")
            self._owner, self._depth = me, getattr(self, "_depth", 0) + 1
        try:
            runner = getattr(self, "runner", None)
            with runner._lend() if hasattr(runner, "_lend") else nullcontext():
                yield
        finally:
            with _OWNERS:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    def close(self) -> None:
        """Free the context and batch (also done on garbage collection); refused while another thread uses it."""
        from rs_local.errors import RsLocalError

        with _OWNERS:
            if getattr(self, "_owner", None) not in (None, threading.get_ident()):
                raise RsLocalError(f"this {type(self).__name__} is in use by another thread; close it there")
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            self._lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
