"""The ControlVector type: per-block steering directions in llama.cpp's convention.

Direction ``N`` is added to the output of block ``N`` (0-based), i.e. the residual stream
after block N, which is ``hidden_states[N + 1]`` in Transformers terms. Block 0 cannot be
steered by llama.cpp (its loader has no slot for it), so the type refuses it up front rather
than letting a file silently lose a layer.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass
class ControlVector:
    """Steering directions keyed by block index, plus what is needed to apply them safely.

    ``directions`` maps block index (>= 1) to a float32 array of shape ``[n_embd]``.
    ``model_hint`` is the model architecture (``llama``, ``qwen2`` ...) written to the GGUF.
    ``metadata`` is free-form provenance (method, prompt sets, layer table ...), stored in the
    GGUF under the ``rs_local.`` prefix. ``source`` is the file this vector was loaded from,
    for messages; it is kept out of ``metadata`` so that a file's own provenance (which may
    name any path) can never make an error name another file.
    """

    directions: dict[int, np.ndarray]
    model_hint: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        clean: dict[int, np.ndarray] = {}
        n_embd = None
        for layer, vec in sorted(self.directions.items()):
            layer = int(layer)
            if layer < 1:
                raise ValueError(f"block {layer} cannot be steered: llama.cpp directions start at block 1")
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
                arr = np.asarray(vec, dtype=np.float32).reshape(-1)
            if n_embd is None:
                n_embd = arr.shape[0]
            elif arr.shape[0] != n_embd:
                raise ValueError(f"direction for block {layer} has {arr.shape[0]} values, expected {n_embd}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"direction for block {layer} contains NaN or Inf")
            clean[layer] = arr
        if not clean:
            raise ValueError("a control vector needs at least one direction")
        self.directions = clean

    @property
    def n_embd(self) -> int:
        """Width of every direction (the model's hidden size)."""
        return next(iter(self.directions.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        """Block indices that carry a direction, ascending."""
        return sorted(self.directions)

    @property
    def max_layer(self) -> int:
        return max(self.directions)

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's direction."""
        return {layer: float(np.linalg.norm(vec.astype(np.float64))) for layer, vec in self.directions.items()}

    def _with(self, directions: Mapping[int, np.ndarray], **meta: Any) -> "ControlVector":
        metadata = dict(self.metadata)
        metadata.update(meta)
        return ControlVector(dict(directions), self.model_hint, metadata, self.source)

    def scaled(self, scale: float) -> "ControlVector":
        """Every direction times ``scale``."""
        return self._with({k: v * np.float32(scale) for k, v in self.directions.items()})

    def __mul__(self, scale: float) -> "ControlVector":
        return self.scaled(scale)

    __rmul__ = __mul__

    def __neg__(self) -> "ControlVector":
        return self.scaled(-1.0)

    def __add__(self, other: "ControlVector") -> "ControlVector":
        return ControlVector.merge([(self, 1.0), (other, 1.0)])

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        return ControlVector.merge([(self, 1.0), (other, -1.0)])

    @staticmethod
    def merge(parts: Iterable[tuple["ControlVector", float]]) -> "ControlVector":
        """Sum of ``scale * vector`` over parts, layer by layer, as llama.cpp sums several files."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        n_embd = parts[0][0].n_embd
        total: dict[int, np.ndarray] = {}
        for vec, scale in parts:
            if vec.n_embd != n_embd:
                raise ValueError(f"cannot merge vectors of width {n_embd} and {vec.n_embd}")
            for layer, d in vec.directions.items():
                total[layer] = total.get(layer, np.zeros(n_embd, np.float32)) + d * np.float32(scale)
        first = parts[0][0]
        return ControlVector(total, first.model_hint, {"merged_from": len(parts)})

    def digest(self) -> str:
        """A hash of the directions (blocks and float32 values): what identifies a vector in logs and caches
        where its path does not (a vector refitted in place, or another one at the same relative path)."""
        h = hashlib.sha256()
        for layer in self.layers:
            h.update(f"{layer}:".encode())
            h.update(np.ascontiguousarray(self.directions[layer], dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def select_layers(self, layers: Iterable[int]) -> "ControlVector":
        """Keep only the given blocks (those that exist)."""
        keep = {int(x) for x in layers}
        chosen = {k: v for k, v in self.directions.items() if k in keep}
        if not chosen:
            raise ValueError(f"none of the layers {sorted(keep)} carries a direction (have {self.layers})")
        return self._with(chosen)

    def layer_range(self, start: int, end: int) -> "ControlVector":
        """Keep blocks ``start..end`` inclusive, like llama.cpp's --control-vector-layer-range."""
        return self.select_layers(range(start, end + 1))

    def normalized(self, norm: float = 1.0) -> "ControlVector":
        """Each layer's direction rescaled to the given L2 norm (zero directions stay zero)."""
        out = {}
        for k, v in self.directions.items():
            n = float(np.linalg.norm(v))
            out[k] = v * np.float32(norm / n) if n > 0 else v
        return self._with(out)

    def to_buffer(self, n_layer: int, layer_range: tuple[int, int] | None = None) -> np.ndarray:
        """Flat float32 buffer for ``llama_set_adapter_cvec``: slot k holds block k+1.

        Blocks outside ``layer_range`` (inclusive) are zeroed, so the buffer alone decides what
        is applied and no separate range bookkeeping can drift from it.
        """
        if self.max_layer >= n_layer:
            raise ValueError(f"vector has a direction for block {self.max_layer}, the model has {n_layer} blocks")
        buf = np.zeros((n_layer - 1, self.n_embd), dtype=np.float32)
        lo, hi = layer_range if layer_range else (1, n_layer - 1)
        for layer, vec in self.directions.items():
            if lo <= layer <= hi:
                buf[layer - 1] = vec
        return buf.reshape(-1)
