"""Connections that never send a whole request are closed, not kept forever.

Why: uvicorn times out idle keep-alive connections but not a request whose headers stop half
way. A client sending ``GET /health HTTP/1.1\\r\\nHo`` and nothing more held its connection open
indefinitely; a few hundred such connections used up the process's file descriptors (256 by
default on macOS), after which no one was served and uvicorn logged a traceback per refused
accept, 78 MB in ten seconds. The body has its own bound (``rs_local.serve.app.read_body``).
"""

from __future__ import annotations

import asyncio
from typing import Any


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than ``seconds``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            """Armed while the client owes us a request's headers (h11's IDLE: before a first request,
            or a next one that has begun to arrive); off once they are in. An idle keep-alive connection
            between requests is uvicorn's own timer's (data_received is not called there)."""
            if self.conn.their_state is h11.IDLE:
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(seconds, self._too_slow)
            else:
                self._stop_watching()

        def _stop_watching(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
