"""Per-layer signal analysis and the ``--layers`` choice.

For every block we project held-out activations of both sets on that block's fitted unit
direction and measure how well the projection separates them: Cohen's d (effect size, does
not saturate) and AUROC (rank separation, easy to read), plus ``|Pearson r|`` between the
projection and the judge score when scores exist (the paper ranks layers by it).

Automatic band (``--layers auto``), the documented rule:

1. Candidates are blocks ``1 .. n_layer-2``: block 0 cannot be steered by llama.cpp, and the
   last block feeds only the final norm and LM head, so steering it edits logits rather than
   the model's decision.
2. The ranking metric is ``|r|`` when scores are given, else held-out Cohen's d.
3. The peak is the block with the highest metric after a 3-block moving average (one noisy
   block should not win on its own).
4. The band grows from the peak one block at a time, toward the neighbour with the higher
   metric, while that neighbour's metric is at least ``0.8 x`` the peak's and the band is
   shorter than ``40 %`` of the blocks (at least 3). Steering many layers compounds: each
   added block pushes the same residual stream again.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Sequence

import numpy as np

BAND_FRACTION = 0.8
MAX_BAND_SHARE = 0.4


@dataclass
class LayerRow:
    """Signal at one block: separation of the held-out projections on its direction."""

    layer: int
    cohen_d: float
    auroc: float
    pearson_r: float | None = None
    act_norm: float = 0.0
    exported_norm: float = 0.0
    selected: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 5) if math.isfinite(v) else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerRow":
        """A row read back from a file; a value of the wrong type raises ValueError (the table printer
        took ``abs()`` of a string, and ``"selected": "no"`` showed a block as selected)."""
        names = {f.name for f in fields(cls)}
        clean = {k: v for k, v in data.items() if k in names}
        for key in ("cohen_d", "auroc", "act_norm", "exported_norm"):
            if clean.get(key) is None:
                clean[key] = float("nan")
        if not _is_int(clean.get("layer")):
            raise ValueError(f"layer_table row has layer {clean.get('layer')!r}, not a block number")
        for key in ("cohen_d", "auroc", "act_norm", "exported_norm", "pearson_r"):
            value = clean.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"layer_table row for block {clean['layer']}: {key} is {value!r}, not a number")
        if not isinstance(clean.get("selected", False), bool):
            raise ValueError(f"layer_table row for block {clean['layer']}: selected is {clean['selected']!r}, not true/false")
        return cls(**clean)


def _is_int(value: Any) -> bool:
    """A JSON whole number (``True`` is not a block)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- statistics


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """``(mean a - mean b) / pooled sd``; nan when there is no spread to measure."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 1 or len(b) < 1:
        return float("nan")
    dof = len(a) + len(b) - 2
    if dof <= 0:
        return float("nan")
    pooled = ((len(a) - 1) * a.var(ddof=1 if len(a) > 1 else 0) + (len(b) - 1) * b.var(ddof=1 if len(b) > 1 else 0)) / dof
    if pooled <= 0:
        return float("inf") * np.sign(a.mean() - b.mean()) if a.mean() != b.mean() else float("nan")
    return float((a.mean() - b.mean()) / math.sqrt(pooled))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive projects higher than a negative), ties counted half (Mann-Whitney U)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# ----------------------------------------------------------------------------- layer choice


def check_steerable(path: Any, n_layer: Any) -> None:
    """A one-line error for a model with fewer than 2 blocks: block 0's output is never steered (see
    ARCHITECTURE: the layer convention), so such a model has no layer to fit or apply a vector to.
    One check for both halves (the Runner, the fit's load and its header preflight)."""
    from rs_local.errors import ModelError

    if not isinstance(n_layer, int) or n_layer < 2:
        raise ModelError(f"{path}: the model has {n_layer} block(s): nothing rs-local can steer")


def parse_layers(spec: str, n_layer: int) -> list[int] | None:
    """``auto`` -> None; ``8-20`` (inclusive), ``8,9,12``, ``all`` -> a list of steerable blocks."""
    spec = spec.strip().lower()
    if spec == "auto":
        return None
    if spec == "all":
        return list(range(1, n_layer))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        if m is None or (m.group(2) is not None and int(m.group(1)) > int(m.group(2))):
            raise ValueError(f"bad layer spec '{spec[:64]}': use auto, all, 8-20 or 8,9,12")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 1:  # checked before the range is built, as is the end: '1-999999999' must not allocate
            raise ValueError(f"layers {part.strip()} out of range: block 0 cannot be steered, blocks start at 1")
        if hi >= n_layer:
            raise ValueError(f"layers {part.strip()} out of range: this model's steerable blocks are 1-{n_layer - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _metric(row: LayerRow, use_r: bool) -> float:
    value = abs(row.pearson_r) if use_r and row.pearson_r is not None else row.cohen_d
    return value if value is not None and math.isfinite(value) else -math.inf


def select_band(rows: Sequence[LayerRow], n_layer: int, fraction: float = BAND_FRACTION, max_share: float = MAX_BAND_SHARE) -> list[int]:
    """Contiguous band of blocks around the strongest signal (rule in the module docstring)."""
    use_r = any(r.pearson_r is not None and math.isfinite(r.pearson_r) for r in rows)
    by_layer = {r.layer: _metric(r, use_r) for r in rows if 1 <= r.layer <= n_layer - 2}
    if not by_layer:
        by_layer = {r.layer: _metric(r, use_r) for r in rows if r.layer >= 1}
    if not by_layer:
        raise ValueError("no steerable layer to choose from")
    layers = sorted(by_layer)

    def smoothed(layer: int) -> float:
        vals = [by_layer[x] for x in (layer - 1, layer, layer + 1) if x in by_layer and math.isfinite(by_layer[x])]
        return sum(vals) / len(vals) if vals else -math.inf

    peak = max(layers, key=lambda x: (smoothed(x), by_layer[x]))
    floor = fraction * by_layer[peak] if by_layer[peak] > 0 else by_layer[peak]
    max_len = max(3, int(round(max_share * n_layer)))
    band = [peak]
    while len(band) < max_len:
        lo, hi = band[0] - 1, band[-1] + 1
        options = [x for x in (lo, hi) if x in by_layer and by_layer[x] >= floor]
        if not options:
            break
        nxt = max(options, key=lambda x: by_layer[x])
        band = sorted(band + [nxt])
    return band


def best_layer(rows: Sequence[LayerRow]) -> int:
    """The block with the highest ranking metric (for the PCA scatter)."""
    use_r = any(r.pearson_r is not None and math.isfinite(r.pearson_r) for r in rows)
    return max(rows, key=lambda r: _metric(r, use_r)).layer


# ----------------------------------------------------------------------------- table I/O


def table_to_metadata(rows: Iterable[LayerRow]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in rows]


def table_from_metadata(value: Any) -> list[LayerRow]:
    """Rows back from GGUF metadata (a list of dicts, or its JSON text); damage raises ``ValueError``/``TypeError``."""
    from rs_local.files import parse_json  # depth, number and surrogate limits: no RecursionError from a file

    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        value = parse_json(value)
    if not isinstance(value, list):
        raise ValueError("layer_table metadata is not a list")
    return [LayerRow.from_dict(parse_json(v) if isinstance(v, str) else dict(v)) for v in value]
