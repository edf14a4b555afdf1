"""Other vector formats: repeng-style dicts, numpy ``.npz`` and safetensors.

All of them use the same layer convention as the GGUF file (key N = block N, whose output
the direction is added to), which is also repeng's (its ``directions[layer]`` is measured
at ``hidden_states[layer + 1]``). So converting never shifts layers; only the container
changes. ``load_vector``/``save_vector`` pick the format from the file suffix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rs_local.converters.gguf_io import atomic_output, read_control_vector, to_jsonable, write_control_vector
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

SUFFIXES = (".gguf", ".npz", ".safetensors")
_NPZ_KEY = re.compile(r"layer_(\d+)")
_ST_KEY = re.compile(r"direction\.(\d+)")


def _build(path: str | Path, directions: dict[int, Any], hint: str, metadata: dict) -> ControlVector:
    """ControlVector from parsed parts, with its ValueErrors reported against the file."""
    for layer, arr in directions.items():
        shape = np.shape(arr)
        if sum(d != 1 for d in shape) > 1:  # [1, n] is fine; a matrix is not a direction
            raise VectorFileError(path, f"layer {layer} has shape {list(shape)}, expected a 1-D direction")
    try:
        return ControlVector(directions, hint, metadata)
    except ValueError as exc:
        raise VectorFileError(path, str(exc)) from None


def _meta_json(cv: ControlVector) -> str:
    return json.dumps(to_jsonable(cv.metadata), ensure_ascii=False)


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


def load_npz(path: str | Path) -> ControlVector:
    """Read ``layer_N`` arrays; ``model_hint``/``metadata`` are optional (hand-made files)."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            items = {key: npz[key] for key in npz.files}
    except Exception:  # noqa: BLE001 - zipfile/numpy raise many kinds on damaged files
        raise VectorFileError(path, "not a readable .npz file") from None
    directions = {int(m.group(1)): v for k, v in items.items() if (m := _NPZ_KEY.fullmatch(k))}
    if not directions:
        raise VectorFileError(path, "no layer_N arrays in the .npz file")
    hint = str(items["model_hint"]) if "model_hint" in items else ""
    metadata = _parse_meta(path, str(items["metadata"])) if "metadata" in items else {}
    return _build(path, directions, hint, metadata)


def _parse_meta(path: str | Path, text: str) -> dict:
    try:
        meta = json.loads(text)
    except ValueError:
        raise VectorFileError(path, "metadata is not valid JSON") from None
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


def load_safetensors(path: str | Path) -> ControlVector:
    stnp = _safetensors()
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise VectorFileError(path, "file not found")
    try:
        tensors = stnp.load_file(str(path))
        with safe_open(str(path), framework="np") as fh:
            header = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - the Rust reader raises its own error types
        raise VectorFileError(path, "not a readable .safetensors file") from None
    directions = {}
    for name, arr in tensors.items():
        match = _ST_KEY.fullmatch(name)
        if not match:
            raise VectorFileError(path, f"tensor {name!r} is not named direction.N")
        directions[int(match.group(1))] = arr
    if not directions:
        raise VectorFileError(path, "no direction tensors")
    metadata = _parse_meta(path, header["rs_local_metadata"]) if "rs_local_metadata" in header else {}
    return _build(path, directions, header.get("model_hint", ""), metadata)


# --------------------------------------------------------------------------- dispatch

_LOADERS = {".gguf": read_control_vector, ".npz": load_npz, ".safetensors": load_safetensors}
_SAVERS = {".gguf": write_control_vector, ".npz": save_npz, ".safetensors": save_safetensors}


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise VectorFileError(path, f"unknown vector format {suffix or '(no suffix)'!r}, expected one of {', '.join(SUFFIXES)}")
    return suffix


def load_vector(path: str | Path) -> ControlVector:
    """Read a vector from ``.gguf``, ``.npz`` or ``.safetensors``, chosen by suffix."""
    path = Path(path)
    return _LOADERS[_suffix(path)](path)


def save_vector(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Write a vector in the format its suffix names; refuses to overwrite unless ``force``."""
    path = Path(path)
    return _SAVERS[_suffix(path)](cv, path, force=force)


def describe(cv: ControlVector) -> dict[str, Any]:
    """A JSON-ready summary (what ``rs-local inspect --json`` prints)."""
    return {
        "model_hint": cv.model_hint,
        "n_embd": cv.n_embd,
        "layer_count": len(cv.directions),
        "layers": [{"block": k, "norm": n} for k, n in sorted(cv.norms().items())],
        "metadata": to_jsonable(cv.metadata),
    }
