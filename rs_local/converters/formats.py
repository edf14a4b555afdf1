"""Other vector formats: repeng-style dicts, numpy ``.npz`` and safetensors.

All of them use the same layer convention as the GGUF file (key N = block N, whose output
the direction is added to), which is also repeng's (its ``directions[layer]`` is measured
at ``hidden_states[layer + 1]``). So converting never shifts layers; only the container
changes. ``load_vector``/``save_vector`` pick the format from the file suffix. This module
holds the dispatch, repeng and ``.npz``; safetensors is :mod:`rs_local.converters.safetensors_file`,
the checks both readers share :mod:`rs_local.converters.vector_parts`.

The readers are bounded the way the GGUF reader is: only regular files are opened; a
``.npz`` member's header is read and checked (real float dtype, a 1-D shape, a size within
limits) before its data, never with pickle; a ``.safetensors`` header is length-checked
against the file, parsed with a depth limit, and its offsets must tile the data exactly as
the safetensors library requires. Every failure is one VectorFileError naming the file.
"""

from __future__ import annotations

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
from rs_local.converters.gguf_io import atomic_output, read_control_vector, to_jsonable, write_control_vector
from rs_local.converters.safetensors_file import load_safetensors, save_safetensors
from rs_local.converters.vector_parts import (
    add_direction,
    build_vector,
    check_float_dtype,
    layer_index,
    meta_json,
    parse_meta,
    text_value,
)
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

SUFFIXES = (".gguf", ".npz", ".safetensors")
_NPZ_KEY = re.compile(r"layer_([0-9]+)")  # ASCII digits only: \d would take "layer_٣"
MAX_ARRAY_BYTES = 256 << 20  # one direction; real ones are under 1 MB (16384 x float64 = 128 KB)
MAX_TEXT_BYTES = 64 << 20  # a model_hint or metadata string array (UCS-4: 16 M characters)



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
    return build_vector("<repeng>", {int(k): np.asarray(v) for k, v in directions.items()}, str(model_type or ""), dict(metadata or {}))


# --------------------------------------------------------------------------- npz


def save_npz(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Arrays ``layer_N`` plus ``model_hint`` and ``metadata`` (JSON) as 0-d string arrays."""
    path = Path(path)
    arrays = {f"layer_{k}": v for k, v in cv.directions.items()}
    arrays["model_hint"] = np.array(cv.model_hint)
    arrays["metadata"] = np.array(meta_json(cv))
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
        layer = layer_index(path, name, match.group(1))
        arr = _npy_array(path, zf, info, name, MAX_ARRAY_BYTES, lambda dtype, n=name: check_float_dtype(path, n, dtype))
        add_direction(path, directions, layer, name, arr)
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
                texts = {key: text_value(path, key, _npy_array(path, zf, members[key], key, MAX_TEXT_BYTES))
                         for key in ("model_hint", "metadata") if key in members}
        except _ZIP_ERRORS as exc:
            detail = f" ({type(exc).__name__})" if not isinstance(exc, zipfile.BadZipFile) else ""
            raise VectorFileError(path, f"not a readable .npz file{detail}") from None
    metadata = parse_meta(path, texts["metadata"]) if "metadata" in texts else {}
    return build_vector(path, directions, texts.get("model_hint", ""), metadata)


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
