"""The one place a steering vector enters a llama.cpp context.

Every engine (the Runner's single-sequence context, the batched engine's context, a server's
contexts) calls :func:`push_vectors`, so the buffer layout (slot k is block k+1), the
inclusive layer range, the C function's name across binding versions and the error on
refusal are written once.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np

from rs_local.errors import RsLocalError
from rs_local.vectors.control_vector import ControlVector

Parts = Sequence[tuple[ControlVector, float]]


def _cvec_function(lib: Any):
    """``llama_set_adapter_cvec``, or its older name ``llama_apply_adapter_cvec`` on older bindings."""
    return getattr(lib, "llama_set_adapter_cvec", None) or lib.llama_apply_adapter_cvec


def push_vectors(lib: Any, ctx: Any, parts: Parts, *, n_embd: int, n_layer: int,
                 layer_range: tuple[int, int] | None = None) -> None:
    """Set ``sum(scale * vector)`` on blocks ``layer_range`` (inclusive) of ``ctx``; [] clears.

    Callers validate the vectors against the model first (:func:`validate_for_model`).
    """
    fn = _cvec_function(lib)
    parts = list(parts)
    if not parts:
        fn(ctx, None, 0, n_embd, -1, -1)
        return
    lo, hi = layer_range if layer_range is not None else (1, n_layer - 1)
    buf = np.ascontiguousarray(ControlVector.merge(parts).to_buffer(n_layer), dtype=np.float32)
    rc = int(fn(ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, n_embd, lo, hi))
    if rc != 0:
        raise RsLocalError(f"llama.cpp refused the control vector (code {rc})")
