"""Lifetime of a llama.cpp context (and its batch) that an engine creates on a Runner's model.

The batched engine and the activation reader each own a second context on the same loaded
weights; both free it, and its batch, the same way: explicitly with ``close()`` or a ``with``
block, and as a last resort on garbage collection.
"""

from __future__ import annotations

from typing import Any


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

    def close(self) -> None:
        """Free the context and batch (also done on garbage collection)."""
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
