"""One block's direction computed the way ``fit_vector`` computes it, for tests on plain arrays.

The fitter is :class:`rs_local.vectors.fit._LayerFitter` (the only method dispatch), fed with
streamed moments and raw activations kept, as ``fit_vector`` does for the held-out split;
weights are used only by ``wrmd``, as in the fit.
"""

from __future__ import annotations

import numpy as np

from rs_local.vectors.capture import StreamingMoments
from rs_local.vectors.fit import _LayerFitter


def _streamed(x: np.ndarray, w: np.ndarray | None) -> StreamingMoments:
    sm = StreamingMoments(1, x.shape[1])
    sm.update(x[:, None, :], w)
    return sm


def fitted_direction(method: str, pos: np.ndarray, neg: np.ndarray, lam: float = 0.1,
                     w_pos: np.ndarray | None = None, w_neg: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Direction of ``method`` for ``pos [n, d]`` against ``neg [m, d]`` (one block)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if method != "wrmd":
        w_pos = w_neg = None
    fitter = _LayerFitter(method, _streamed(pos, w_pos), _streamed(neg, w_neg), pos[:, None, :], neg[:, None, :], seed, w_neg)
    return fitter.direction(0, lam)
