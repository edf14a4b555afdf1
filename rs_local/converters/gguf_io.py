"""Read and write llama.cpp GGUF control-vector files.

The file layout is fixed by llama.cpp's loader (``common_control_vector_load_one`` in
common/common.cpp), which reads no metadata at all: it walks every tensor, parses the
layer from ``direction.<N>`` and skips the *whole file* on the first tensor that is not
``direction.N`` with N >= 1, not F32, not 1-D (trailing dimensions of size 1 count as 1-D,
as ``ggml_n_dims`` does) or of a different length than the first. So everything we write
must pass those rules, and everything we read is checked against them here, with a message
that names the file and the problem, before llama.cpp can silently skip or abort on it.

Provenance goes into extra ``rs_local.*`` keys, which llama.cpp ignores. Plain values
(str/int/float/bool) use native GGUF types; anything else is stored as JSON under
``rs_local.json.<key>`` so that it reads back as the same dicts and lists.

Convention: ``direction.N`` is read as block N whoever wrote it. llama.cpp's
``cvector-generator`` stores the vector it measured at block N's output as
``direction.N+1``; we do not shift it back (that would change what llama.cpp applies),
but when a file looks like that tool's output we record ``source`` in the metadata.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rs_local.errors import FileProblem, VectorFileError
from rs_local.vectors.control_vector import ControlVector

ARCH = "controlvector"
FORMAT_VERSION = 1
META_PREFIX = "rs_local."
JSON_PREFIX = "rs_local.json."
VERSION_KEY = "rs_local.format_version"
CVECTOR_GENERATOR = "llama.cpp-cvector-generator"
GGUF_MAGIC = b"GGUF"

_DIRECTION = re.compile(r"direction\.(\d+)")
_INT64 = (-(2**63), 2**63 - 1)


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path`` in one step.

    A crash or an exception mid-write therefore never leaves a half-written vector where a
    good one (or nothing) was, and an existing file is only replaced when ``force`` is set.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileProblem(path, "already exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise FileProblem(path, f"directory {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_jsonable(value: Any) -> Any:
    """Turn numpy values and paths inside metadata into plain JSON types."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _add_metadata(writer: Any, key: str, value: Any) -> None:
    """Store one provenance entry with a native GGUF type when one round-trips exactly."""
    from gguf import GGUFValueType

    if not isinstance(key, str) or not key or key.startswith("json.") or key == "format_version":
        raise ValueError(f"metadata key {key!r} is empty or reserved")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        writer.add_key_value(META_PREFIX + key, value, GGUFValueType.BOOL)
    elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        writer.add_key_value(META_PREFIX + key, value, GGUFValueType.INT64)
    elif isinstance(value, float):
        writer.add_key_value(META_PREFIX + key, value, GGUFValueType.FLOAT64)
    elif isinstance(value, str):
        writer.add_key_value(META_PREFIX + key, value, GGUFValueType.STRING)
    else:
        text = json.dumps(to_jsonable(value), ensure_ascii=False, allow_nan=True)
        writer.add_key_value(JSON_PREFIX + key, text, GGUFValueType.STRING)


def write_control_vector(cv: ControlVector, path: str | Path, *, force: bool = False) -> Path:
    """Write ``cv`` as a GGUF control vector that llama.cpp (llama-cli, llama-server) loads.

    Refuses to replace an existing file unless ``force``; writes atomically.
    """
    import gguf

    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        # add_string() drops empty strings; the key should exist even for an unknown model.
        writer.add_key_value(f"{ARCH}.model_hint", cv.model_hint, gguf.GGUFValueType.STRING)
        writer.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
        writer.add_uint32(VERSION_KEY, FORMAT_VERSION)
        for key, value in cv.metadata.items():
            _add_metadata(writer, key, value)
        for layer in cv.layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(cv.directions[layer], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


# --------------------------------------------------------------------------- reading


def _check_magic(path: Path) -> None:
    """Reject missing and non-GGUF files before the gguf package sees them."""
    if not path.exists():
        raise VectorFileError(path, "file not found")
    if not path.is_file():
        raise VectorFileError(path, "not a file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        raise VectorFileError(path, "empty file, not a GGUF control vector")
    if len(head) < 4 and GGUF_MAGIC.startswith(head):
        raise VectorFileError(path, f"truncated GGUF file ({len(head)} bytes)")
    if head != GGUF_MAGIC:
        raise VectorFileError(path, f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")


class _CutShort(ValueError):
    """Tensor data ends before the size its header announces."""


def _field_value(field: Any) -> Any:
    """Decode one GGUFReader field into a Python value (str, int, float, bool or list)."""
    from gguf import GGUFValueType

    def one(part: Any, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part[0].item()

    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], vtype)


def _peek_architecture(path: Path) -> str | None:
    """``general.architecture`` when it is the first key (as every writer puts it), else None.

    Lets a model file given by mistake be refused at once: the gguf package would first
    decode its whole vocabulary, which takes seconds.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
        if int.from_bytes(head[4:8], "little") not in (2, 3):
            return None
        key_len = int.from_bytes(head[24:32], "little")
        key = head[32:32 + key_len]
        pos = 32 + key_len
        if key != b"general.architecture" or int.from_bytes(head[pos:pos + 4], "little") != 8:  # STRING
            return None
        val_len = int.from_bytes(head[pos + 4:pos + 12], "little")
        value = head[pos + 12:pos + 12 + val_len]
        return value.decode("utf-8") if len(value) == val_len else None
    except (OSError, UnicodeDecodeError):
        return None


def _wanted(key: str) -> bool:
    return key == "general.architecture" or key.startswith((f"{ARCH}.", META_PREFIX))


def _open(path: Path) -> tuple[dict[str, tuple[Any, Any]], list[tuple[str, Any, tuple[int, ...], np.ndarray]]]:
    """Parse the file into ``{key: (value, type)}`` and ``[(name, type, ne, data)]``.

    All gguf-package calls live here, because on a damaged file it may raise almost any
    exception; each becomes one VectorFileError. Data is copied out of the memory map.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        # Every key is listed, but only ours are decoded: a model's vocabulary is slow to decode.
        kv = {
            name: (_field_value(field) if _wanted(name) else None, field.types[0] if field.types else None)
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")
        }
        tensors = []
        # A model file passed by mistake can hold gigabytes: only copy data out of vectors.
        for t in reader.tensors if kv.get("general.architecture", (None,))[0] == ARCH else []:
            data = np.array(t.data, copy=True).reshape(-1)
            if data.nbytes < int(t.n_bytes):
                raise _CutShort(f"data of {t.name} is cut short")
            tensors.append((str(t.name), t.tensor_type, tuple(int(x) for x in t.shape), data))
        del reader
    except Exception as exc:  # noqa: BLE001 - any parser failure is a damaged file
        # numpy's own wording ("cannot reshape ...") means nothing to a user; ours does.
        detail = f": {exc}" if isinstance(exc, _CutShort) else ""
        raise VectorFileError(path, f"truncated or corrupt GGUF file{detail}") from None
    return kv, tensors


def _direction_layer(path: Path, name: str) -> int:
    match = _DIRECTION.fullmatch(name)
    if not match:
        raise VectorFileError(path, f"tensor {name!r} is not named direction.N (llama.cpp would skip the file)")
    layer = int(match.group(1))
    if layer == 0:
        raise VectorFileError(path, "direction.0: block 0 cannot be steered (llama.cpp rejects the file)")
    return layer


def _check_tensor(path: Path, name: str, ttype: Any, ne: tuple[int, ...], data: np.ndarray) -> np.ndarray:
    """Apply llama.cpp's per-tensor rules plus a finiteness check; return the 1-D data."""
    import gguf

    if int(ttype) != int(gguf.GGMLQuantizationType.F32):
        type_name = getattr(ttype, "name", str(ttype))
        raise VectorFileError(path, f"{name} is {type_name}, llama.cpp needs F32")
    dims = list(ne)
    while len(dims) > 1 and dims[-1] == 1:  # ggml_n_dims ignores trailing 1s
        dims.pop()
    if len(dims) != 1:
        raise VectorFileError(path, f"{name} has shape {list(ne)}, llama.cpp needs a 1-D tensor")
    if not np.all(np.isfinite(data)):
        raise VectorFileError(path, f"{name} contains NaN or Inf")
    return data.astype(np.float32, copy=False)


def _collect_directions(path: Path, tensors: list) -> dict[int, np.ndarray]:
    directions: dict[int, np.ndarray] = {}
    first: tuple[str, int] | None = None
    for name, ttype, ne, data in tensors:
        layer = _direction_layer(path, name)
        vec = _check_tensor(path, name, ttype, ne, data)
        if first is None:
            first = (name, vec.size)
        elif vec.size != first[1]:
            raise VectorFileError(path, f"{name} has {vec.size} values but {first[0]} has {first[1]} (inconsistent n_embd)")
        # llama.cpp sums tensors that parse to the same layer (direction.5 and direction.05).
        directions[layer] = directions[layer] + vec if layer in directions else vec
    if not directions:
        raise VectorFileError(path, "no direction tensors (llama.cpp would skip the file)")
    return directions


def _metadata(path: Path, kv: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, (value, _) in kv.items():
        if key == VERSION_KEY or not key.startswith(META_PREFIX):
            continue
        if key.startswith(JSON_PREFIX):
            try:
                meta[key[len(JSON_PREFIX):]] = json.loads(value)
            except (TypeError, ValueError):
                raise VectorFileError(path, f"{key} is not valid JSON") from None
        else:
            meta[key[len(META_PREFIX):]] = value
    return meta


def _looks_like_cvector_generator(kv: dict[str, tuple[Any, Any]], directions: dict[int, np.ndarray]) -> bool:
    """True for the exact shape of llama.cpp cvector-generator output.

    That tool writes only three keys, ``layer_count`` as INT32 (Python writers such as repeng
    and ours use UINT32), directions 1..layer_count, each normalised to unit length.
    """
    from gguf import GGUFValueType

    keys = {"general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count"}
    if set(kv) != keys:
        return False
    count, count_type = kv[f"{ARCH}.layer_count"]
    if count_type != GGUFValueType.INT32 or sorted(directions) != list(range(1, int(count) + 1)):
        return False
    return all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-3 for v in directions.values())


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a GGUF control vector written by rs-local, llama.cpp's cvector-generator or repeng.

    ``direction.N`` becomes block N. Raises VectorFileError (one line: path and problem)
    for any file llama.cpp would skip or that could not be steered with.
    """
    path = Path(path)
    _check_magic(path)
    arch = _peek_architecture(path)
    if arch in (None, ARCH):
        kv, tensors = _open(path)
        arch = kv.get("general.architecture", (None, None))[0]
    if arch != ARCH:
        what = "missing" if arch is None else repr(arch)
        raise VectorFileError(path, f"not a control vector: general.architecture is {what}, expected '{ARCH}'")
    directions = _collect_directions(path, tensors)
    metadata = _metadata(path, kv)
    if _looks_like_cvector_generator(kv, directions):
        metadata.setdefault("source", CVECTOR_GENERATOR)
    hint = kv.get(f"{ARCH}.model_hint", ("", None))[0]
    try:
        return ControlVector(directions, str(hint), metadata)
    except ValueError as exc:  # e.g. two tensors for one block summing to Inf
        raise VectorFileError(path, str(exc)) from None


# --------------------------------------------------------------------------- checking


def validate_for_model(cv: ControlVector, *, n_embd: int, n_layer: int, path: str | Path = "<vector>") -> None:
    """Check that ``cv`` fits a model before llama.cpp sees it.

    llama.cpp aborts or silently drops directions on a mismatch, so the runner calls this
    first and the user gets a message naming the vector and what does not fit.
    """
    if cv.n_embd != n_embd:
        raise VectorFileError(path, f"vector has n_embd {cv.n_embd}, model has {n_embd}")
    if cv.max_layer >= n_layer:
        raise VectorFileError(
            path, f"direction.{cv.max_layer} but the model has {n_layer} blocks (directions 1..{n_layer - 1})"
        )
