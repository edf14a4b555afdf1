"""One bounded validation of GGUF control-vector files, mirroring llama.cpp rule for rule.

Two layers of llama.cpp decide whether a control vector is used:

* ggml's GGUF parser (``gguf_init_from_file`` in ggml/src/gguf.cpp), which the loader calls
  with ``no_alloc = false``, so it also reads the whole data section;
* the control-vector loader (``common_control_vector_load_one`` in common/common.cpp), which
  reads no metadata and takes every tensor as ``direction.<N>`` parsed with ``std::stoi``.

This module walks the file itself with ``struct`` and bounded reads: every count, length and
offset is compared with the bytes actually left in the file *before* anything is allocated
for it, so a 5 KB file that declares a billion-element array is refused in microseconds.
The rule is "accept no file that llama.cpp rejects": where llama.cpp is looser than makes
sense for a steering vector (NaN values, ``direction.5abc`` read as block 5 by ``stoi``, a
tensor name with a NUL inside, no ``general.architecture``) we are stricter, never looser.
A test (tests/fuzz) runs ggml's own parser from the installed llama-cpp-python over every
fuzz case we accept.

The result carries only what rs-local needs: the decoded values of the keys a caller asks
for (other keys are skipped, never decoded) and the summed direction data per block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from rs_local.converters.gguf_limits import (
    GGUF_MAGIC, GGUF_VERSION, GGUF_DEFAULT_ALIGNMENT, GGUF_MAX_ARRAY_ELEMENTS, GGML_MAX_DIMS, GGML_MAX_NAME, GGML_TYPE_COUNT, GGML_TYPE_F32, INT64_MAX, SIZE_MAX, T_UINT32, T_BOOL, T_STRING, T_ARRAY, _SCALAR, TYPE_NAMES, _MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES, MAX_TENSORS, MAX_KEYS, MAX_META_ITEMS, MAX_META_BYTES,
)
from rs_local.converters.gguf_cursor import (
    _Cursor, _pad, ggml_type_name, label, open_regular_file, show, tensor_label,
)
from rs_local.errors import FileProblem, VectorFileError



# --------------------------------------------------------------------------- parsed form


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: its GGUF type (the element type for arrays) and, if asked for, its value."""

    type: int
    is_array: bool
    value: Any = None  # str/int/float/bool, a list of them, or None when not decoded
    count: int = 1


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as ggml records it: padded shape ``ne`` (4 entries), type and data offset."""

    name: bytes
    n_dims: int
    ne: tuple[int, int, int, int]
    ggml_type: int
    offset: int

    @property
    def nelements(self) -> int:
        return self.ne[0] * self.ne[1] * self.ne[2] * self.ne[3]

    @property
    def nbytes(self) -> int:
        """ggml_nbytes for F32 (the only type that reaches this point): 0 if any ne is 0."""
        return 0 if min(self.ne) <= 0 else 4 * self.nelements

    @property
    def ggml_n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of size 0 or 1 do not count; at least 1."""
        for i in range(GGML_MAX_DIMS - 1, 0, -1):
            if self.ne[i] > 1:
                return i + 1
        return 1

    @property
    def label(self) -> str:
        return tensor_label(self.name)


@dataclass
class GGUFFile:
    """What the walk found: header, the keys (values only for wanted ones), tensors and layout."""

    version: int
    kv: dict[str, KeyValue] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0
    data_size: int = 0  # the padded data section llama.cpp reads (ctx->size)


# --------------------------------------------------------------------------- the parser


def _header(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version and counts, refused exactly where gguf_init_from_reader refuses them."""
    if cur.size < 4:
        if cur.size and GGUF_MAGIC.startswith(cur.fh.read(cur.size)):
            raise cur.truncated(f"only {cur.size} bytes")
        raise VectorFileError(cur.path, "empty file, not a GGUF control vector" if not cur.size else "not a GGUF file")
    magic = cur.take(4, "magic")
    if magic != GGUF_MAGIC:
        raise VectorFileError(cur.path, f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.unpack("<I", "version")
    if version == 0:
        raise VectorFileError(cur.path, "corrupt GGUF file: version 0")
    if version & 0xFFFF == 0:
        raise VectorFileError(
            cur.path, f"GGUF version reads as {version:#x}: a big-endian file, which llama.cpp does not load"
        )
    if version == 1:
        raise VectorFileError(cur.path, "GGUF version 1 is no longer supported by llama.cpp")
    if version > GGUF_VERSION:
        raise VectorFileError(cur.path, f"GGUF version {version} is newer than llama.cpp reads ({GGUF_VERSION})")
    n_tensors = cur.unpack("<q", "tensor count")
    n_kv = cur.unpack("<q", "key count")
    if n_tensors < 0 or n_kv < 0:
        raise VectorFileError(cur.path, f"corrupt GGUF file: negative count ({n_tensors} tensors, {n_kv} keys)")
    need = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
    if need > cur.left:
        raise cur.truncated(f"header declares {n_tensors} tensors and {n_kv} keys, "
                            f"at least {need} bytes, but only {cur.left} follow")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise VectorFileError(cur.path, f"{n_tensors} tensors and {n_kv} keys, more than a control vector has "
                                        f"(rs-local reads up to {MAX_TENSORS} and {MAX_KEYS})")
    return version, n_tensors, n_kv


def _element_size(cur: _Cursor, key: str, vtype: int, is_array: bool) -> int:
    """Bytes per element (8 = the length prefix for strings); refuses types llama.cpp refuses."""
    if vtype == T_ARRAY and is_array:
        raise VectorFileError(cur.path, f"key {key} is an array of arrays, which llama.cpp rejects")
    if vtype == T_STRING:
        return 8
    if vtype not in _SCALAR:
        raise VectorFileError(cur.path, f"key {key} has invalid GGUF type {vtype}")
    return struct.calcsize(_SCALAR[vtype])


def _scalar(cur: _Cursor, vtype: int, what: str) -> Any:
    value = cur.unpack(_SCALAR[vtype], what)
    return value != 0 if vtype == T_BOOL else value


def _text(raw: bytes) -> str:
    """Metadata text: invalid UTF-8 (lone surrogates included) becomes U+FFFD, never an error later."""
    return raw.decode("utf-8", errors="replace")


def _value(cur: _Cursor, key: str, vtype: int, is_array: bool, count: int, keep: bool) -> Any:
    """Read (``keep``) or skip one value, bounding every length by the bytes left first."""
    size = _element_size(cur, key, vtype, is_array)
    what = f"value of key {key}"
    if not is_array:
        if vtype == T_STRING:
            raw = cur.string(what, keep=keep, limit=MAX_META_BYTES)
            return None if raw is None else _text(raw)
        if not keep:
            cur.skip(size, what)
            return None
        return _scalar(cur, vtype, what)
    if count > GGUF_MAX_ARRAY_ELEMENTS:
        raise VectorFileError(cur.path, f"corrupt GGUF file: key {key} declares {count} elements, over llama.cpp's limit of 2^30")
    cur.need(count * size, f"{what} ({count} elements)")
    if keep and count > MAX_META_ITEMS:
        raise VectorFileError(cur.path, f"key {key} holds {count} elements, more than rs-local reads ({MAX_META_ITEMS})")
    if vtype == T_STRING:
        items = [cur.string(f"{what}[{i}]", keep=keep, limit=MAX_META_BYTES) for i in range(count)]
        return [_text(raw) for raw in items] if keep else None
    if not keep:
        cur.skip(count * size, what)
        return None
    data = np.frombuffer(cur.take(count * size, what), dtype=np.dtype(_SCALAR[vtype]))
    return [v != 0 for v in data.tolist()] if vtype == T_BOOL else data.tolist()


def _key(cur: _Cursor, i: int, seen: set[bytes]) -> tuple[str, bool]:
    """Key ``i`` decoded (U+FFFD for invalid UTF-8) and whether it was valid UTF-8."""
    raw = cur.string(f"key {i}")
    assert raw is not None
    if not raw:
        raise VectorFileError(cur.path, f"corrupt GGUF file: key {i} is empty")
    if raw in seen:
        raise VectorFileError(cur.path, f"corrupt GGUF file: duplicate key {show(raw)}")
    seen.add(raw)
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def _kv_pairs(cur: _Cursor, n_kv: int, want: Callable[[str], bool],
              on_key: Callable[[str, KeyValue], None]) -> dict[str, KeyValue]:
    """Every key-value pair, in file order; values decoded only where ``want(key)``."""
    seen: set[bytes] = set()
    out: dict[str, KeyValue] = {}
    for i in range(n_kv):
        key, valid = _key(cur, i, seen)
        shown = label(key)
        vtype = cur.unpack("<i", f"type of key {shown}")
        is_array, count = vtype == T_ARRAY, 1
        if is_array:
            vtype = cur.unpack("<i", f"element type of key {shown}")
            count = cur.unpack("<Q", f"length of key {shown}")
        keep = want(key)
        if keep and not valid:
            raise VectorFileError(cur.path, f"metadata key {shown} is not valid UTF-8")
        value = _value(cur, shown, vtype, is_array, count, keep)
        if key in out and keep:  # two byte-distinct keys that decode alike
            raise VectorFileError(cur.path, f"metadata key {shown} appears twice")
        entry = KeyValue(vtype, is_array, value, count)
        out.setdefault(key, entry)
        on_key(key, entry)
    return out


def _alignment(cur: _Cursor, kv: dict[str, KeyValue]) -> int:
    """general.alignment: a scalar UINT32 power of two, else the default 32 (as ggml)."""
    entry = kv.get("general.alignment")
    if entry is None:
        return GGUF_DEFAULT_ALIGNMENT
    if entry.type != T_UINT32 or entry.is_array:
        kind = f"an array of {TYPE_NAMES.get(entry.type, entry.type)}" if entry.is_array else TYPE_NAMES.get(entry.type)
        raise VectorFileError(cur.path, f"corrupt GGUF file: general.alignment is {kind}, llama.cpp needs a UINT32")
    value = entry.value
    if value == 0 or value & (value - 1):
        raise VectorFileError(cur.path, f"corrupt GGUF file: general.alignment {value} is not a power of 2")
    return value


def _tensor_info(cur: _Cursor, i: int, seen: set[bytes]) -> TensorInfo:
    """One tensor info, with ggml's checks on name, shape, element count and type."""
    name = cur.string(f"name of tensor {i}")
    assert name is not None
    if len(name) >= GGML_MAX_NAME:
        raise VectorFileError(cur.path, f"tensor name {show(name[:80])} is {len(name)} bytes, llama.cpp allows {GGML_MAX_NAME - 1}")
    if b"\0" in name:  # ggml would cut it at the NUL and look up another tensor by that name
        raise VectorFileError(cur.path, f"tensor name {show(name)} contains a NUL byte")
    if name in seen:
        raise VectorFileError(cur.path, f"corrupt GGUF file: duplicate tensor name {show(name)}")
    seen.add(name)
    shown = tensor_label(name)
    n_dims = cur.unpack("<I", f"dimension count of {shown}")
    if n_dims > GGML_MAX_DIMS:
        raise VectorFileError(cur.path, f"{shown} has {n_dims} dimensions, llama.cpp allows at most {GGML_MAX_DIMS}")
    ne = [cur.unpack("<q", f"shape of {shown}") for _ in range(n_dims)] + [1] * (GGML_MAX_DIMS - n_dims)
    if any(d < 0 for d in ne):
        raise VectorFileError(cur.path, f"corrupt GGUF file: {shown} has a negative dimension {ne[:n_dims]}")
    total = 1
    for d in ne:
        total *= d
    if total > INT64_MAX:
        raise VectorFileError(cur.path, f"corrupt GGUF file: {shown} has {total} elements, more than ggml can count")
    ggml_type = cur.unpack("<i", f"type of {shown}")
    if not 0 <= ggml_type < GGML_TYPE_COUNT:
        raise VectorFileError(cur.path, f"corrupt GGUF file: {shown} has invalid ggml type {ggml_type}")
    if ggml_type != GGML_TYPE_F32:  # the loader's rule, applied early: no size table needed
        raise VectorFileError(cur.path, f"{shown} is {ggml_type_name(ggml_type)}, llama.cpp needs F32")
    if total > SIZE_MAX // 4:
        raise VectorFileError(cur.path, f"corrupt GGUF file: {shown} is larger than memory can address")
    offset = cur.unpack("<Q", f"data offset of {shown}")
    return TensorInfo(name, n_dims, (ne[0], ne[1], ne[2], ne[3]), ggml_type, offset)


def _layout(cur: _Cursor, parsed: GGUFFile) -> None:
    """Where the data section starts and how long it is, by ggml's rule.

    ggml computes each tensor's offset as the running sum of the previous tensors' sizes,
    each padded to the alignment, and rejects any other offset: so gaps, overlaps, shared
    offsets, out-of-order tensors and F32 tensors followed by F16-sized data all fail here.
    With ``no_alloc = false`` (the control-vector loader) it then reads the whole padded
    section, so the file must hold it, padding after the last tensor included.
    """
    align = parsed.alignment
    start = _pad(cur.pos, align) if parsed.tensors else cur.pos
    if start > cur.size:
        raise cur.truncated(f"data section would start at byte {start}, past the end of the file ({cur.size})")
    size = 0
    for t in parsed.tensors:
        if t.offset != size:
            raise VectorFileError(cur.path, f"corrupt GGUF file: {t.label} has data offset {t.offset}, "
                                            f"llama.cpp expects {size} (tensors must be packed in order)")
        size += _pad(t.nbytes, align)
        if size > SIZE_MAX:
            raise VectorFileError(cur.path, f"corrupt GGUF file: data section size overflows at {t.label}")
    if start + size > cur.size:
        raise cur.truncated(f"tensor data needs {size} bytes from byte {start}, the file ends at {cur.size}")
    parsed.data_offset, parsed.data_size = start, size


def parse_gguf(fh: BinaryIO, path: Path, size: int, *, want: Callable[[str], bool] = lambda key: False,
               on_key: Callable[[str, KeyValue], None] = lambda key, kv: None) -> GGUFFile:
    """Walk a GGUF file as ggml's parser does, refusing what it refuses, bounded by ``size``.

    ``want(key)`` says which values to decode; ``on_key`` sees each entry as it is read and
    may raise to stop early (a model file given as a vector is refused at its first key).
    Every tensor must be F32 (the control-vector loader's rule, checked here so no table of
    quantized block sizes is needed).
    """
    cur = _Cursor(fh, path, size)
    version, n_tensors, n_kv = _header(cur)
    parsed = GGUFFile(version)
    parsed.kv = _kv_pairs(cur, n_kv, lambda key: key == "general.alignment" or want(key), on_key)
    parsed.alignment = _alignment(cur, parsed.kv)
    seen: set[bytes] = set()
    parsed.tensors = [_tensor_info(cur, i, seen) for i in range(n_tensors)]
    _layout(cur, parsed)
    return parsed


class _Seen(Exception):
    """Stops a header walk once ``general.architecture`` has been read."""


def file_architecture(path: str | Path) -> str | None:
    """A GGUF file's ``general.architecture`` from its header alone; None where it is unreadable or absent.

    Lets ``inspect`` tell a vector, a policy and a probe judge apart without guessing from an
    error message; anything unreadable is left to the vector reader to explain."""
    found: list[Any] = []

    def stop(key: str, entry: KeyValue) -> None:
        if key == "general.architecture":
            found.append(entry.value)
            raise _Seen

    try:
        fh, size = open_regular_file(Path(path))
        with fh:
            parse_gguf(fh, Path(path), size, want=lambda key: key == "general.architecture", on_key=stop)
    except _Seen:
        pass
    except (FileProblem, OSError):
        return None
    return found[0] if found and isinstance(found[0], str) else None


def read_tensors_f64(fh: BinaryIO, parsed: GGUFFile) -> dict[str, np.ndarray]:
    """Every tensor of a walked file by name, as float64 (they are all F32; see :func:`parse_gguf`).

    A damaged file can hold signalling-NaN bit patterns, whose widening raises numpy's "invalid
    value" warning: the caller's finiteness check is what reports them, as one line naming the
    file, so the warning is silenced here instead of printed above it.
    """
    out = {}
    with np.errstate(invalid="ignore"):
        for t in parsed.tensors:
            fh.seek(parsed.data_offset + t.offset)
            out[t.name.decode("ascii", "replace")] = np.frombuffer(fh.read(t.nbytes), "<f4").astype(np.float64)
    return out
