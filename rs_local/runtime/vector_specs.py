"""`PATH[:SCALE]` vector specs and `START-END` layer ranges, as llama.cpp users write them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rs_local.errors import RsLocalError
from rs_local.vectors.control_vector import ControlVector


def parse_vector_spec(spec: str, default_scale: float = 1.0) -> tuple[Path, float]:
    """Split ``a.gguf:0.8`` into (path, 0.8); a bare path takes ``default_scale``.

    Only a suffix that parses as a number is a scale, so paths containing colons still work.
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), default_scale


def parse_layer_range(text: str) -> tuple[int, int]:
    """``8-20`` -> (8, 20), inclusive like ``--control-vector-layer-range``; ``12`` -> (12, 12)."""
    parts = text.replace(",", "-").split("-")
    try:
        nums = [int(p) for p in parts if p.strip() != ""]
    except ValueError:
        raise RsLocalError(f"bad layer range '{text}': expected START-END, e.g. 8-20") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or nums[0] > nums[1] or nums[0] < 0:
        raise RsLocalError(f"bad layer range '{text}': expected START-END with START <= END")
    return nums[0], nums[1]


def load_vector_specs(specs: Iterable[str], default_scale: float = 1.0) -> list[tuple[ControlVector, float]]:
    """Read every ``PATH[:SCALE]``; each vector remembers its path for error messages."""
    from rs_local.converters.formats import load_vector

    out = []
    for spec in specs:
        path, scale = parse_vector_spec(spec, default_scale)
        vec = load_vector(path)
        vec.metadata.setdefault("path", str(path))
        out.append((vec, scale))
    return out
