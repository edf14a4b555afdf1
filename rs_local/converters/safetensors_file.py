"""safetensors vector files: tensors ``direction.N``, hint and JSON metadata in the header.

Read without the safetensors library (it is only needed to write): the header is
length-checked against the file, parsed with a depth limit and no duplicate keys, and its
offsets must tile the data exactly as the library requires, so a file rs-local accepts is one
the library (and repeng) accepts too. Every failure is one VectorFileError naming the file.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rs_local.converters.gguf_cursor import label, open_regular_file, show
from rs_local.converters.gguf_io import MAX_JSON_DEPTH, atomic_output, json_depth
from rs_local.converters.vector_parts import add_direction, build_vector, layer_index, meta_json, parse_meta
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

_ST_KEY = re.compile(r"direction\.([0-9]+)")
MAX_ST_HEADER = 100_000_000  # the safetensors library's own limit


def _safetensors() -> Any:
    try:
        import safetensors.numpy as stnp
    except ImportError:
        raise RsLocalError("safetensors is not installed (pip install safetensors)") from None
    return stnp


def save_safetensors(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Tensors ``direction.N``; hint and JSON metadata go in the safetensors header."""
    stnp = _safetensors()
    path = Path(path)
    tensors = {f"direction.{k}": v for k, v in cv.directions.items()}
    header = {"model_hint": cv.model_hint, "rs_local_metadata": meta_json(cv)}
    data = stnp.save(tensors, metadata=header)  # bytes first: a full disk is then an OSError naming the file,
    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as fh:  # not safetensors' own traceback
        fh.write(data)
    return path


_ST_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2")}


def _unreadable(path: Path, why: str) -> VectorFileError:
    return VectorFileError(path, f"not a readable .safetensors file ({why})")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in the safetensors header")
    return dict(pairs)


def _st_header(path: Path, fh: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The JSON header and where the data starts, with the length bounded before it is read."""
    if size < 8:
        raise _unreadable(path, f"only {size} bytes")
    n = struct.unpack("<Q", fh.read(8))[0]
    if n > MAX_ST_HEADER or 8 + n > size:
        raise _unreadable(path, f"header length {n} does not fit the file of {size} bytes")
    try:
        text = fh.read(n).decode("utf-8")
    except UnicodeDecodeError:
        raise _unreadable(path, "header is not UTF-8") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise _unreadable(path, f"header nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise _unreadable(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    return header, 8 + n


def _st_entry(path: Path, name: str, entry: Any) -> tuple[np.dtype, list[int], int, int, str]:
    """dtype, shape and [begin, end) of one tensor entry, each field type-checked."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _unreadable(path, f"entry {label(name)} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]

    def is_count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise _unreadable(path, f"shape of {label(name)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise _unreadable(path, f"data_offsets of {label(name)} are not two non-negative integers")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise VectorFileError(path, f"{label(name)} has dtype {show(str(dtype)[:40])}, expected F16, BF16, F32 or F64")
    return _ST_DTYPES[dtype], shape, offsets[0], offsets[1], dtype


def _st_tensors(path: Path, header: dict[str, Any], data_len: int) -> list[tuple[str, np.dtype, list[int], int, int, str]]:
    """Entries sorted by offset; like the safetensors library, they must tile the data exactly."""
    entries = sorted(((name, *_st_entry(path, name, entry)) for name, entry in header.items()), key=lambda e: (e[3], e[4]))
    at = 0
    for name, dtype, shape, begin, end, _ in entries:
        if begin != at or end < begin:
            raise _unreadable(path, f"data of {label(name)} starts at {begin}, expected {at} (overlap or gap)")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise _unreadable(path, f"{label(name)} has shape {shape} but {end - begin} bytes of data")
        at = end
    if at != data_len:
        raise _unreadable(path, f"tensors cover {at} bytes of data, the file holds {data_len}")
    return entries


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files Transformers loads: those the shard index names, else ``model*.safetensors``,
    else any. Mistral's repositories ship ``consolidated.safetensors`` beside the shards, the same
    weights again: counting both doubled the need and refused fits that would pass."""
    index = directory / "model.safetensors.index.json"
    try:
        fh, _size = open_regular_file(index)  # a FIFO's read_text() blocked the fit forever
        with fh:
            names = sorted(set(json.loads(fh.read())["weight_map"].values()))
        return [directory / n for n in names if (directory / n).is_file()]
    except (RsLocalError, OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    found = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    return [p for p in found if p.is_file()]


def safetensors_parameter_count(directory: str | Path) -> int | None:
    """Weights in a Hugging Face model directory's ``*.safetensors`` files, from their headers alone;
    None when it has none (a ``pytorch_model.bin`` model). Why: the fit's memory check
    (``rs_local.recipes.memory_check``) for a model given as a directory."""
    files = _weight_files(Path(directory))
    if not files:
        return None
    total = 0
    for path in files:
        fh, size = open_regular_file(path)  # not open(): a FIFO named model.safetensors blocked forever
        with fh:
            header, _start = _st_header(path, fh, size)
        for name, entry in header.items():
            if name != "__metadata__":
                shape = entry.get("shape") if isinstance(entry, dict) else None
                if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise _unreadable(path, f"shape of {label(name)} is not a list of non-negative integers")
                total += math.prod(shape)
    return total


def _st_metadata(path: Path, header: dict[str, Any]) -> tuple[str, dict]:
    """model_hint and rs-local metadata from ``__metadata__`` (a str -> str map by the format)."""
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _unreadable(path, "__metadata__ is not a map of strings")
    hint = re.sub("[\ud800-\udfff]", "\ufffd", meta.get("model_hint", ""))
    metadata = parse_meta(path, meta["rs_local_metadata"]) if "rs_local_metadata" in meta else {}
    return hint, metadata


def load_safetensors(path: str | Path) -> ControlVector:
    """Read ``direction.N`` tensors and the metadata save_safetensors writes, with our own bounded parser."""
    path = Path(path)
    fh, size = open_regular_file(path)
    with fh:
        header, start = _st_header(path, fh, size)
        hint, metadata = _st_metadata(path, header)
        entries = _st_tensors(path, header, size - start)
        directions: dict[int, np.ndarray] = {}
        for name, dtype, shape, begin, end, st_dtype in entries:
            match = _ST_KEY.fullmatch(name)
            if not match:
                raise VectorFileError(path, f"tensor {show(name)} is not named direction.N")
            layer = layer_index(path, name, match.group(1))
            fh.seek(start + begin)
            arr = np.frombuffer(fh.read(end - begin), dtype=dtype).reshape(shape)
            if st_dtype == "BF16":  # bfloat16 is the top half of a float32
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            add_direction(path, directions, layer, name, arr)
    if not directions:
        raise VectorFileError(path, "no direction tensors")
    return build_vector(path, directions, hint, metadata)
