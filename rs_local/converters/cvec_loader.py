"""llama.cpp's control-vector loader rules, applied to a GGUF file that :mod:`gguf_check` parsed.

``common_control_vector_load_one`` in llama.cpp's common/common.cpp reads no metadata: it
takes every tensor as ``direction.<N>`` (N parsed with ``std::stoi``), requires F32, 1-D and
one n_embd, and sums tensors that name the same block. These are those rules, with the few
places where rs-local is stricter said where they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from rs_local.converters.gguf_check import GGUFFile, TensorInfo
from rs_local.converters.gguf_limits import DIRECTION_NAME, INT32_MAX, MAX_BLOCK
from rs_local.errors import VectorFileError


def direction_layer(path: Path, t: TensorInfo) -> int:
    """Block index of a ``direction.N`` tensor, refused where llama.cpp's loader refuses it.

    llama.cpp takes the text after the first '.' with ``std::stoi``: an int, so an index past
    2^31-1 throws and the file is skipped; 0 and negatives are refused too. Names that
    ``stoi`` would bend into a number ("direction. 5", "direction.+5", "direction.5abc")
    are refused here as not canonical; non-ASCII digits are refused by both.
    """
    match = DIRECTION_NAME.fullmatch(t.name)
    if not match:
        raise VectorFileError(path, f"tensor {t.label} is not named direction.N with N in ASCII digits "
                                    "(llama.cpp would skip the file)")
    layer = int(match.group(1))  # at most 53 digits: far below int()'s 4300-digit limit
    if layer == 0:
        raise VectorFileError(path, f"{t.label}: block 0 cannot be steered (llama.cpp rejects the file)")
    if layer > INT32_MAX:
        raise VectorFileError(path, f"{t.label}: block index is past 2^31-1, out of range for llama.cpp (std::stoi)")
    if layer > MAX_BLOCK:
        raise VectorFileError(path, f"{t.label}: block {layer} is past any model's depth (rs-local reads up to {MAX_BLOCK}; "
                                    "llama.cpp would allocate n_embd x block floats for it)")
    return layer


def _check_direction(path: Path, t: TensorInfo, n_embd: int | None, first: str | None) -> int:
    """Shape rules of the loader (1-D by ggml_n_dims, one n_embd for all); returns n_embd."""
    if t.ggml_n_dims != 1:
        raise VectorFileError(path, f"{t.label} has shape {list(t.ne[:max(t.n_dims, 1)])}, llama.cpp needs a 1-D tensor")
    n = t.nelements
    if n_embd is not None and n != n_embd:
        raise VectorFileError(path, f"{t.label} has {n} values but {first} has {n_embd} (inconsistent n_embd)")
    if n == 0:
        raise VectorFileError(path, f"{t.label} has no values")
    return n


def read_directions(fh: BinaryIO, path: Path, parsed: GGUFFile) -> dict[int, np.ndarray]:
    """The loader's walk over the tensors: block index, F32, 1-D, one n_embd; data summed per block.

    llama.cpp adds tensors that parse to the same block (``direction.5`` and ``direction.05``)
    in file order, and so do we. It computes ``n_embd * block`` in ``int``; a product past
    2^31-1 overflows there (and would allocate gigabytes), so such a file is refused.
    """
    if not parsed.tensors:
        raise VectorFileError(path, "no direction tensors (llama.cpp would skip the file)")
    directions: dict[int, np.ndarray] = {}
    n_embd: int | None = None
    first: str | None = None
    for t in parsed.tensors:
        layer = direction_layer(path, t)
        n_embd = _check_direction(path, t, n_embd, first)
        first = first or t.label
        if n_embd * layer > INT32_MAX:
            raise VectorFileError(path, f"{t.label}: n_embd {n_embd} times block {layer} overflows llama.cpp's int arithmetic")
        fh.seek(parsed.data_offset + t.offset)
        raw = fh.read(t.nbytes)
        if len(raw) != t.nbytes:
            raise VectorFileError(path, f"truncated or corrupt GGUF file: data of {t.label} is cut short")
        vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vec)):
            raise VectorFileError(path, f"{t.label} contains NaN or Inf")
        with np.errstate(over="ignore"):  # a sum that overflows is refused by ControlVector as Inf
            directions[layer] = directions[layer] + vec if layer in directions else vec
    return directions
