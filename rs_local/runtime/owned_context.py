"""Lifetime of a llama.cpp context (and its batch) that an engine creates on a Runner's model.

The batched engine and the activation reader each own a second context on the same loaded
weights; both free it, and its batch, the same way: explicitly with ``close()`` or a ``with``
block, and as a last resort on garbage collection.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

#: Guards every owned context's ``_owner`` and its freeing (held for a few instructions at a time).
#: Re-entrant: a garbage-collection finalizer of another context (``__del__`` -> ``close``) may run
#: while this thread holds it.
_OWNERS = threading.RLock()


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
        """Hold this context through one public call; another call meanwhile, from any thread, is an error.

        Why: a llama.cpp context serves one call at a time; two threads decoding on one reader or
        engine aborted the process inside ggml (GGML_ASSERT), a :meth:`close` from another thread
        freed it mid-decode, and a call made from the call's own callback (a progress or stop
        function) cleared the outer call's sequences (wrong answers). Each is now a one-line error,
        as the Runner gives. The Runner under it is lent for the call too, so closing the Runner then
        is refused as well."""
        from rs_local.errors import RsLocalError

        me, mine = threading.get_ident(), False
        try:  # a Ctrl-C between taking and the try must not leave the context taken for good
            with _OWNERS:
                self.live()
                if getattr(self, "_owner", None) is not None:
                    where = "this thread (from its own callback)" if self._owner == me else "another thread"
                    raise RsLocalError(f"this {type(self).__name__} is in a call on {where}: a llama.cpp context "
                                       "serves one call at a time (make one per thread)")
                mine = True
                self._owner = me
            runner = getattr(self, "runner", None)
            with runner._lend() if hasattr(runner, "_lend") else nullcontext():
                yield
        finally:
            if mine:
                with _OWNERS:
                    if self._owner == me:
                        self._owner = None

    def close(self) -> None:
        """Free the context and batch (also done on garbage collection); refused during a call, from
        any thread. The handles are taken under the lock, so no call can start on them meanwhile."""
        from rs_local.errors import RsLocalError

        with _OWNERS:
            if getattr(self, "_owner", None) is not None:
                raise RsLocalError(f"this {type(self).__name__} is in a call; close it when the call has returned")
            batch, ctx = self._batch, self.ctx
            self._batch, self.ctx = None, None
        if batch is not None:
            self._lib.llama_batch_free(batch)
        if ctx:
            self._lib.llama_free(ctx)

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
