"""One sequence's keys and values copied out of a llama.cpp context and back (per-sequence state).

The Runner keeps chat-template heads for the server (:mod:`rs_local.serve.prefix`) and the batch
engine restores the head every prompt of a call shares into each slot; both go through these
two functions, so the C calls, the size check and what counts as failure are written once.
A snapshot holds keys and values computed under the vector active at the time: whoever keeps
one must key it by that vector.
"""

from __future__ import annotations

import ctypes
from typing import Any

from rs_local.errors import RsLocalError


def read_seq_state(lib: Any, ctx: Any, seq: int, max_bytes: int | None = None) -> bytes | None:
    """Sequence ``seq``'s state as bytes; None when it would exceed ``max_bytes``.

    Raises RsLocalError when llama.cpp copies nothing (an empty sequence, or a context it cannot copy).
    """
    size = lib.llama_state_seq_get_size(ctx, seq)
    if max_bytes is not None and size > max_bytes:
        return None
    buf = (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(ctx, buf, size, seq) if size else 0
    if written == 0:
        raise RsLocalError("llama.cpp could not copy the KV cache")
    return ctypes.string_at(buf, written)  # one copy; bytes(buf[:written]) builds a list of ints first


def write_seq_state(lib: Any, ctx: Any, seq: int, data: bytes) -> bool:
    """Put a :func:`read_seq_state` snapshot into sequence ``seq``; False when llama.cpp refuses it
    (or when there is nothing: llama.cpp reads 0 bytes of an empty one, which equalled its length)."""
    if not data:
        return False
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return lib.llama_state_seq_set_data(ctx, buf, len(data), seq) == len(data)
