"""Shared checks of the non-GGUF vector readers (npz, safetensors, repeng dicts).

A direction read from any container passes the same gates: one real float array per block, a
block index llama.cpp can hold, no block named twice, metadata that is a JSON object. Each
failure is one VectorFileError naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rs_local.converters.gguf_cursor import label
from rs_local.converters.gguf_limits import INT32_MAX, MAX_BLOCK
from rs_local.converters.gguf_io import load_metadata_json, to_jsonable
from rs_local.errors import VectorFileError
from rs_local.vectors.control_vector import ControlVector

_FLOAT_SIZES = (2, 4, 8)  # float16/32/64; longdouble is platform-specific and never needed


def build_vector(path: str | Path, directions: dict[int, Any], hint: str, metadata: dict) -> ControlVector:
    """ControlVector from parsed parts, with its ValueErrors reported against the file."""
    for layer, arr in directions.items():
        shape = np.shape(arr)
        if sum(d != 1 for d in shape) > 1:  # [1, n] is fine; a matrix is not a direction
            raise VectorFileError(path, f"layer {layer} has shape {list(shape)}, expected a 1-D direction")
        if np.size(arr) == 0:
            raise VectorFileError(path, f"layer {layer} has no values")
    try:
        return ControlVector(directions, hint, metadata)
    except ValueError as exc:
        raise VectorFileError(path, str(exc)) from None


def meta_json(cv: ControlVector) -> str:
    return json.dumps(to_jsonable(cv.metadata), ensure_ascii=False)


def layer_index(path: Path, name: str, digits: str) -> int:
    """Block index from a name's digits, bounded as llama.cpp's int index is (and int() is)."""
    if len(digits) > 10 or int(digits) > INT32_MAX:
        raise VectorFileError(path, f"{label(name)}: block index is past 2^31-1, out of range for llama.cpp")
    if int(digits) > MAX_BLOCK:
        raise VectorFileError(path, f"{label(name)}: block {int(digits)} is past any model's depth (rs-local reads up to {MAX_BLOCK})")
    return int(digits)


def add_direction(path: Path, directions: dict[int, np.ndarray], layer: int, name: str, arr: np.ndarray) -> None:
    """Store one direction; two names for one block (layer_5, layer_05) are refused, not merged."""
    if layer in directions:
        raise VectorFileError(path, f"{label(name)} is a second direction for block {layer}")
    directions[layer] = arr


def check_float_dtype(path: Path, name: str, dtype: np.dtype) -> None:
    """Directions must be real floats: complex would lose its imaginary part, ints/bools are not data."""
    if dtype.hasobject:
        raise VectorFileError(path, f"{label(name)} is an object array, which needs pickle (refused)")
    if dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize not in _FLOAT_SIZES:
        raise VectorFileError(path, f"{label(name)} has dtype {dtype.str}, expected float16, float32 or float64")


def text_value(path: Path, what: str, arr: np.ndarray) -> str:
    """A 0-d unicode array (how save_npz stores model_hint and metadata) as a clean str."""
    if arr.dtype.kind != "U" or arr.shape != ():
        raise VectorFileError(path, f"{what} is not a string (dtype {arr.dtype.str}, shape {list(arr.shape)})")
    try:
        text = str(arr[()])
    except (ValueError, UnicodeError):  # UCS-4 code points past U+10FFFF
        raise VectorFileError(path, f"{what} is not valid text") from None
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def parse_meta(path: str | Path, text: str) -> dict:
    meta = load_metadata_json(path, "metadata", text)
    if not isinstance(meta, dict):
        raise VectorFileError(path, "metadata is not a JSON object")
    return meta
