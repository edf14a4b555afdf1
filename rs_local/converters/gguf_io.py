"""Read and write llama.cpp GGUF control-vector files.

The file layout is fixed by llama.cpp's loader (``common_control_vector_load_one`` in
common/common.cpp), which reads no metadata at all: it walks every tensor, parses the
layer from ``direction.<N>`` and skips the *whole file* on the first tensor that is not
``direction.N`` with N >= 1, not F32, not 1-D (trailing dimensions of size 1 count as 1-D,
as ``ggml_n_dims`` does) or of a different length than the first. So everything we write
must pass those rules, and everything we read is checked against them (and against ggml's
GGUF parser) by :mod:`rs_local.converters.gguf_check`, with a message that names the file and
the problem, before llama.cpp can silently skip or abort on it. That walk is bounded: no count
or length in the file is trusted before it is compared with the file's size.

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
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rs_local.converters import gguf_check, gguf_cursor, gguf_limits
from rs_local.converters.cvec_loader import read_directions
from rs_local.converters.gguf_check import KeyValue
from rs_local.errors import FileProblem, VectorFileError
from rs_local.files import atomic_output  # noqa: F401 - one atomic writer for every file; re-exported here
from rs_local.vectors.control_vector import ControlVector

ARCH = "controlvector"
FORMAT_VERSION = 1
META_PREFIX = "rs_local."
JSON_PREFIX = "rs_local.json."
VERSION_KEY = "rs_local.format_version"
CVECTOR_GENERATOR = "llama.cpp-cvector-generator"
GGUF_MAGIC = b"GGUF"

_INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------- writing


def to_jsonable(value: Any) -> Any:
    """Turn numpy values and paths inside metadata into plain JSON types, and text into valid UTF-8.

    A path that is not UTF-8 (``odd\xff dir/m.gguf``) reaches Python with surrogate escapes that no
    file format can store; left in, writing the vector failed after the whole fit. Such bytes become
    U+FFFD, as the readers already do."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, str)):
        return _SURROGATE.sub("\ufffd", str(value))
    if isinstance(value, dict):
        return {to_jsonable(str(k)): to_jsonable(v) for k, v in value.items()}
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
        writer.add_key_value(META_PREFIX + key, to_jsonable(value), GGUFValueType.STRING)
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
        writer.add_key_value(f"{ARCH}.model_hint", to_jsonable(cv.model_hint), gguf.GGUFValueType.STRING)
        writer.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
        writer.add_uint32(VERSION_KEY, FORMAT_VERSION)
        for key, value in cv.metadata.items():
            _add_metadata(writer, key, value)
        for layer in cv.layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(cv.directions[layer], np.float32))
        finish_gguf(writer, tmp, path)
    return path


def finish_gguf(writer: Any, tmp: Path, path: Path) -> None:
    """Write a GGUFWriter's file and check it is whole before :func:`atomic_output` renames it over ``path``.

    Why: the gguf library writes each tensor with numpy's ``tofile``, which loses a write error for an
    array smaller than the C library's buffer, as every direction of a small model is. On a full disk
    or past a file-size limit the file came out short, and the command said "wrote" and replaced the
    good file with it. Reading the temp file back as ggml would catches any short write."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    try:
        fh, size = gguf_cursor.open_regular_file(Path(tmp))
        with fh:
            gguf_check.parse_gguf(fh, Path(tmp), size)
    except VectorFileError as exc:
        raise FileProblem(path, f"cannot be written: the file came out incomplete ({exc.problem}); a full disk or a "
                                "file-size limit? Nothing was replaced") from None


# --------------------------------------------------------------------------- reading

MAX_JSON_DEPTH = 64  # provenance is a few levels deep; json's own recursion limit is ~1000
MAX_INT_DIGITS = 4300  # Python's int/str conversion limit (sys.get_int_max_str_digits)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, counted without recursion.

    Strings are cut out first so that brackets inside them do not count; for text that is not
    valid JSON the figure may be too high, which only moves the error from "not valid JSON"
    to "nested too deep".
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1))
    return int(depth.max())


def _no_surrogates(value: Any) -> Any:
    """Replace lone surrogates (from ``\\ud800`` escapes) by U+FFFD in every string and key.

    Such a string cannot be encoded for a terminal or a file: left in, it fails much later
    with UnicodeEncodeError. The depth is bounded by MAX_JSON_DEPTH, so recursion is safe.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_no_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    return value


def load_metadata_json(path: str | Path, key: str, text: str) -> Any:
    """Parse one JSON metadata value with bounded depth; every failure is one VectorFileError.

    Guards against what a hostile or damaged file can hold: nesting 1000+ deep (json's
    RecursionError), integers past Python's 4300-digit limit, lone surrogates.
    ``NaN``/``Infinity`` are accepted: our writer stores non-finite floats that way.
    """
    if json_depth(text) > MAX_JSON_DEPTH:
        raise VectorFileError(path, f"{key} is JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except RecursionError:  # not reachable after the depth check; kept as a last guard
        raise VectorFileError(path, f"{key} is JSON nested too deep") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise VectorFileError(path, f"{key} holds an integer of more than {MAX_INT_DIGITS} digits") from None
        where = f" ({exc.msg} at char {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise VectorFileError(path, f"{key} is not valid JSON{where}") from None
    return _no_surrogates(value)


def _wanted(key: str) -> bool:
    """Keys whose values we decode; the rest (a model's vocabulary, say) are only skipped."""
    return key == "general.architecture" or key.startswith((f"{ARCH}.", META_PREFIX))


#: rs-local's other GGUF files, named by their architecture, and where they are given instead.
_OTHER_ARTEFACTS = {
    "rs_local_policy": " (a policy: give it with --policy)",
    "rs_local_probe": " (a probe judge: give it with --judge probe=FILE)",
}


def _refuse_other_architectures(path: Path) -> Callable[[str, KeyValue], None]:
    """An ``on_key`` hook: stop at ``general.architecture`` if it names anything but a vector.

    Writers put that key first, so a model file given by mistake is refused after reading a
    few dozen bytes instead of walking its whole vocabulary.
    """

    def check(key: str, entry: KeyValue) -> None:
        if key != "general.architecture":
            return
        if entry.is_array or entry.type != gguf_limits.T_STRING:
            kind = gguf_limits.TYPE_NAMES.get(entry.type, str(entry.type))
            raise VectorFileError(path, f"not a control vector: general.architecture is {'an array' if entry.is_array else kind}, "
                                        f"expected the string '{ARCH}'")
        if entry.value != ARCH:
            hint = _OTHER_ARTEFACTS.get(entry.value, "")  # ours, given where a vector goes: say where it goes
            raise VectorFileError(path, f"not a control vector: general.architecture is "
                                        f"{gguf_cursor.show(entry.value[:200])}, expected '{ARCH}'{hint}")

    return check


def _metadata(path: Path, kv: dict[str, KeyValue]) -> dict[str, Any]:
    """``rs_local.*`` keys back into the metadata dict, JSON ones parsed with bounds."""
    meta: dict[str, Any] = {}
    for key, entry in kv.items():
        if key == VERSION_KEY or not key.startswith(META_PREFIX):
            continue
        if key.startswith(JSON_PREFIX):
            if entry.is_array or entry.type != gguf_limits.T_STRING:
                raise VectorFileError(path, f"{gguf_cursor.label(key)} is not a JSON string")
            name, value = key[len(JSON_PREFIX):], load_metadata_json(path, gguf_cursor.label(key), entry.value)
        else:
            name, value = key[len(META_PREFIX):], entry.value
        if name in meta:
            raise VectorFileError(path, f"metadata {gguf_cursor.label(name)} is stored twice (plain and as JSON)")
        meta[name] = value
    return meta


def _model_hint(path: Path, kv: dict[str, KeyValue]) -> str:
    entry = kv.get(f"{ARCH}.model_hint")
    if entry is None:
        return ""
    if entry.is_array or entry.type != gguf_limits.T_STRING:
        raise VectorFileError(path, f"{ARCH}.model_hint is not a string")
    return entry.value


def _looks_like_cvector_generator(kv: dict[str, KeyValue], directions: dict[int, np.ndarray]) -> bool:
    """True for the exact shape of llama.cpp cvector-generator output.

    That tool writes only three keys, ``layer_count`` as INT32 (Python writers such as repeng
    and ours use UINT32), directions 1..layer_count, each normalised to unit length. The count
    is compared with the number of directions before any range is built from it: a declared
    2^31-1 costs nothing.
    """
    keys = {"general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count"}
    if set(kv) != keys:
        return False
    count = kv[f"{ARCH}.layer_count"]
    if count.type != gguf_limits.T_INT32 or count.is_array or count.value != len(directions):
        return False
    if sorted(directions) != list(range(1, len(directions) + 1)):
        return False
    return all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-3 for v in directions.values())


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a GGUF control vector written by rs-local, llama.cpp's cvector-generator or repeng.

    ``direction.N`` becomes block N. The file is validated by :mod:`gguf_check` exactly as
    llama.cpp's parser and control-vector loader would, with every count bounded by the file
    size before anything is allocated. Raises VectorFileError (one line: path and problem)
    for any file llama.cpp would skip or that could not be steered with.
    """
    path = Path(path)
    fh, size = gguf_cursor.open_regular_file(path)
    with fh:
        parsed = gguf_check.parse_gguf(fh, path, size, want=_wanted, on_key=_refuse_other_architectures(path))
        if "general.architecture" not in parsed.kv:
            raise VectorFileError(path, f"not a control vector: general.architecture is missing, expected '{ARCH}'")
        directions = read_directions(fh, path, parsed)
    metadata = _metadata(path, parsed.kv)
    if _looks_like_cvector_generator(parsed.kv, directions):
        metadata.setdefault("source", CVECTOR_GENERATOR)
    try:
        return ControlVector(directions, _model_hint(path, parsed.kv), metadata, str(path))
    except ValueError as exc:  # e.g. two tensors for one block summing to Inf
        raise VectorFileError(path, str(exc)) from None


# --------------------------------------------------------------------------- checking


#: Largest value a direction may hold. Residual streams run to thousands at most; a million per
#: dimension overflows the block norms into NaN or flat logits (an empty answer, exit 0, before).
MAX_DIRECTION_VALUE = 1e6


def validate_for_model(cv: ControlVector, *, n_embd: int, n_layer: int, path: str | Path = "<vector>") -> None:
    """Check that ``cv`` fits a model before llama.cpp sees it.

    llama.cpp aborts or silently drops directions on a mismatch, so the runner calls this
    first and the user gets a message naming the vector and what does not fit.
    """
    if cv.n_embd != n_embd:
        raise VectorFileError(path, f"vector has n_embd {cv.n_embd}, model has {n_embd}")
    for layer, d in sorted(cv.directions.items()):
        peak = float(np.max(np.abs(d), initial=0.0))
        if peak > MAX_DIRECTION_VALUE:
            raise VectorFileError(path, f"direction.{layer} has values up to {peak:.3g}, far beyond any model's "
                                        f"residual stream (at most {MAX_DIRECTION_VALUE:g} accepted): a wrong unit or a damaged file?")
    if cv.max_layer >= n_layer:
        raise VectorFileError(
            path, f"direction.{cv.max_layer} but the model has {n_layer} blocks (directions 1..{n_layer - 1})"
        )
