"""Other vector formats: repeng-style dicts, numpy ``.npz`` and safetensors.

All of them use the same layer convention as the GGUF file (key N = block N, whose output
the direction is added to), which is also repeng's (its ``directions[layer]`` is measured
at ``hidden_states[layer + 1]``). So converting never shifts layers; only the container
changes. ``load_vector``/``save_vector`` pick the format from the file suffix.

The readers are bounded the way the GGUF reader is: only regular files are opened; a
``.npz`` member's header is read and checked (real float dtype, a 1-D shape, a size within
limits) before its data, never with pickle; a ``.safetensors`` header is length-checked
against the file, parsed with a depth limit, and its offsets must tile the data exactly as
the safetensors library requires. Every failure is one VectorFileError naming the file.
"""

from __future__ import annotations

import json
import lzma
import math
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rs_local.converters.gguf_cursor import label, open_regular_file, show
from rs_local.converters.gguf_limits import INT32_MAX, MAX_BLOCK
from rs_local.converters.gguf_io import (
    MAX_JSON_DEPTH,
    atomic_output,
    json_depth,
    load_metadata_json,
    read_control_vector,
    to_jsonable,
    write_control_vector,
)
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

SUFFIXES = (".gguf", ".npz", ".safetensors")
_NPZ_KEY = re.compile(r"layer_([0-9]+)")  # ASCII digits only: \d would take "layer_٣"
_ST_KEY = re.compile(r"direction\.([0-9]+)")
MAX_ARRAY_BYTES = 256 << 20  # one direction; real ones are under 1 MB (16384 x float64 = 128 KB)
MAX_TEXT_BYTES = 64 << 20  # a model_hint or metadata string array (UCS-4: 16 M characters)
MAX_ST_HEADER = 100_000_000  # the safetensors library's own limit
_FLOAT_SIZES = (2, 4, 8)  # float16/32/64; longdouble is platform-specific and never needed


def _build(path: str | Path, directions: dict[int, Any], hint: str, metadata: dict) -> ControlVector:
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


def _meta_json(cv: ControlVector) -> str:
    return json.dumps(to_jsonable(cv.metadata), ensure_ascii=False)


def _layer_index(path: Path, name: str, digits: str) -> int:
    """Block index from a name's digits, bounded as llama.cpp's int index is (and int() is)."""
    if len(digits) > 10 or int(digits) > INT32_MAX:
        raise VectorFileError(path, f"{label(name)}: block index is past 2^31-1, out of range for llama.cpp")
    if int(digits) > MAX_BLOCK:
        raise VectorFileError(path, f"{label(name)}: block {int(digits)} is past any model's depth (rs-local reads up to {MAX_BLOCK})")
    return int(digits)


def _add_direction(path: Path, directions: dict[int, np.ndarray], layer: int, name: str, arr: np.ndarray) -> None:
    """Store one direction; two names for one block (layer_5, layer_05) are refused, not merged."""
    if layer in directions:
        raise VectorFileError(path, f"{label(name)} is a second direction for block {layer}")
    directions[layer] = arr


def _check_float_dtype(path: Path, name: str, dtype: np.dtype) -> None:
    """Directions must be real floats: complex would lose its imaginary part, ints/bools are not data."""
    if dtype.hasobject:
        raise VectorFileError(path, f"{label(name)} is an object array, which needs pickle (refused)")
    if dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize not in _FLOAT_SIZES:
        raise VectorFileError(path, f"{label(name)} has dtype {dtype.str}, expected float16, float32 or float64")


def _text_value(path: Path, what: str, arr: np.ndarray) -> str:
    """A 0-d unicode array (how save_npz stores model_hint and metadata) as a clean str."""
    if arr.dtype.kind != "U" or arr.shape != ():
        raise VectorFileError(path, f"{what} is not a string (dtype {arr.dtype.str}, shape {list(arr.shape)})")
    try:
        text = str(arr[()])
    except (ValueError, UnicodeError):  # UCS-4 code points past U+10FFFF
        raise VectorFileError(path, f"{what} is not valid text") from None
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


# --------------------------------------------------------------------------- repeng


def to_repeng_dict(cv: ControlVector) -> dict[str, Any]:
    """``{"model_type": ..., "directions": {layer: array}}``, the fields of repeng's ControlVector."""
    return {"model_type": cv.model_hint, "directions": {k: v.copy() for k, v in cv.directions.items()}}


def from_repeng(obj: Any, metadata: dict | None = None) -> ControlVector:
    """From a repeng ``ControlVector`` instance or a dict shaped like ``to_repeng_dict``'s output."""
    if isinstance(obj, dict):
        model_type, directions = obj.get("model_type", ""), obj.get("directions")
    else:
        model_type, directions = getattr(obj, "model_type", ""), getattr(obj, "directions", None)
    if not isinstance(directions, dict):
        raise RsLocalError("a repeng vector needs a 'directions' dict of layer -> array")
    return _build("<repeng>", {int(k): np.asarray(v) for k, v in directions.items()}, str(model_type or ""), dict(metadata or {}))


# --------------------------------------------------------------------------- npz


def save_npz(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Arrays ``layer_N`` plus ``model_hint`` and ``metadata`` (JSON) as 0-d string arrays."""
    path = Path(path)
    arrays = {f"layer_{k}": v for k, v in cv.directions.items()}
    arrays["model_hint"] = np.array(cv.model_hint)
    arrays["metadata"] = np.array(_meta_json(cv))
    with atomic_output(path, force=force) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # a file object: savez would append ".npz" to a temp name
    return path


# What zipfile, zlib, lzma, bz2 and numpy's header parser raise on a damaged archive.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, NotImplementedError,
               RuntimeError, ValueError, KeyError, struct.error, UnicodeError)


def _npz_members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Array name (``.npy`` stripped, as np.load does) -> member; duplicates are refused."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if name in members:
            raise VectorFileError(path, f"the .npz holds {label(name)} twice")
        members[name] = info
    return members


def _npy_header(path: Path, name: str, fp: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a .npy stream, read without touching its data."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        return fmt.read_array_header_1_0(fp, max_header_size=10_000)
    if version == (2, 0):
        return fmt.read_array_header_2_0(fp, max_header_size=10_000)
    raise VectorFileError(path, f"not a readable .npz file: {label(name)} has .npy format version {version}, expected 1.0 or 2.0")


def _npy_array(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int,
               check: Any = None) -> np.ndarray:
    """One member as an array: header checked (``check(dtype)``) and sizes bounded before the data is read.

    The member's declared uncompressed size bounds what zipfile will inflate, so a zip bomb
    is refused from its directory entry; the array size must fit in that member.
    """
    if info.file_size > limit:
        raise VectorFileError(path, f"{label(name)} is {info.file_size} bytes uncompressed, more than rs-local reads ({limit})")
    with zf.open(info) as fp:
        shape, fortran, dtype = _npy_header(path, name, fp)
        if check is not None:
            check(dtype)
        elif dtype.hasobject:
            raise VectorFileError(path, f"{label(name)} is an object array, which needs pickle (refused)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise VectorFileError(path, f"{label(name)} declares shape {list(shape)}, more data than the member holds")
        data = fp.read(nbytes)
    if len(data) != nbytes:
        raise VectorFileError(path, f"{label(name)} is cut short")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _npz_directions(path: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict[int, np.ndarray]:
    directions: dict[int, np.ndarray] = {}
    for name, info in members.items():
        match = _NPZ_KEY.fullmatch(name)
        if not match:
            continue  # other arrays are allowed and never read
        layer = _layer_index(path, name, match.group(1))
        arr = _npy_array(path, zf, info, name, MAX_ARRAY_BYTES, lambda dtype, n=name: _check_float_dtype(path, n, dtype))
        _add_direction(path, directions, layer, name, arr)
    if not directions:
        raise VectorFileError(path, "no layer_N arrays in the .npz file")
    return directions


def load_npz(path: str | Path) -> ControlVector:
    """Read ``layer_N`` arrays; ``model_hint``/``metadata`` are optional (hand-made files)."""
    path = Path(path)
    fh, _ = open_regular_file(path)
    with fh:
        try:
            with zipfile.ZipFile(fh) as zf:
                members = _npz_members(path, zf)
                directions = _npz_directions(path, zf, members)
                texts = {key: _text_value(path, key, _npy_array(path, zf, members[key], key, MAX_TEXT_BYTES))
                         for key in ("model_hint", "metadata") if key in members}
        except _ZIP_ERRORS as exc:
            detail = f" ({type(exc).__name__})" if not isinstance(exc, zipfile.BadZipFile) else ""
            raise VectorFileError(path, f"not a readable .npz file{detail}") from None
    metadata = _parse_meta(path, texts["metadata"]) if "metadata" in texts else {}
    return _build(path, directions, texts.get("model_hint", ""), metadata)


def _parse_meta(path: str | Path, text: str) -> dict:
    meta = load_metadata_json(path, "metadata", text)
    if not isinstance(meta, dict):
        raise VectorFileError(path, "metadata is not a JSON object")
    return meta


# --------------------------------------------------------------------------- safetensors


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
    header = {"model_hint": cv.model_hint, "rs_local_metadata": _meta_json(cv)}
    with atomic_output(path, force=force) as tmp:
        stnp.save_file(tensors, str(tmp), metadata=header)
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


def _st_metadata(path: Path, header: dict[str, Any]) -> tuple[str, dict]:
    """model_hint and rs-local metadata from ``__metadata__`` (a str -> str map by the format)."""
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _unreadable(path, "__metadata__ is not a map of strings")
    hint = re.sub("[\ud800-\udfff]", "\ufffd", meta.get("model_hint", ""))
    metadata = _parse_meta(path, meta["rs_local_metadata"]) if "rs_local_metadata" in meta else {}
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
            layer = _layer_index(path, name, match.group(1))
            fh.seek(start + begin)
            arr = np.frombuffer(fh.read(end - begin), dtype=dtype).reshape(shape)
            if st_dtype == "BF16":  # bfloat16 is the top half of a float32
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            _add_direction(path, directions, layer, name, arr)
    if not directions:
        raise VectorFileError(path, "no direction tensors")
    return _build(path, directions, hint, metadata)


# --------------------------------------------------------------------------- dispatch

_LOADERS = {".gguf": read_control_vector, ".npz": load_npz, ".safetensors": load_safetensors}
_SAVERS = {".gguf": write_control_vector, ".npz": save_npz, ".safetensors": save_safetensors}


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        shown = show(suffix) if suffix else "(no suffix)"
        raise VectorFileError(path, f"unknown vector format {shown}, expected one of {', '.join(SUFFIXES)}")
    return suffix


def load_vector(path: str | Path) -> ControlVector:
    """Read a vector from ``.gguf``, ``.npz`` or ``.safetensors``, chosen by suffix."""
    path = Path(path)
    cv = _LOADERS[_suffix(path)](path)
    cv.source = str(path)  # errors about this vector name this file, whatever its metadata says
    return cv


def save_vector(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Write a vector in the format its suffix names; refuses to overwrite unless ``force``."""
    path = Path(path)
    return _SAVERS[_suffix(path)](cv, path, force=force)


def describe(cv: ControlVector) -> dict[str, Any]:
    """A JSON-ready summary (what ``rs-local inspect --json`` prints).

    Values are plain Python types; non-finite floats stay floats here (see ``json_safe``
    for the form that standard JSON can hold).
    """
    return {
        "model_hint": cv.model_hint,
        "n_embd": cv.n_embd,
        "layer_count": len(cv.directions),
        "layers": [{"block": k, "norm": n} for k, n in sorted(cv.norms().items())],
        "metadata": to_jsonable(cv.metadata),
    }


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Infinity floats as the strings "NaN"/"Infinity"/"-Infinity".

    Standard JSON has no non-finite numbers (Python's ``json`` writes bare ``NaN``, which
    strict parsers reject); strings keep the information, where null would lose it. Lone
    surrogates become U+FFFD so that the text can be encoded at all.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return NON_FINITE[repr(value)]
    if isinstance(value, str):
        return re.sub("[\ud800-\udfff]", "\ufffd", value)
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
