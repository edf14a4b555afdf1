"""Scalar metadata of a GGUF model file, read from its header alone.

The Mixture-of-Experts paths need a few numbers from a model GGUF before Transformers or
llama.cpp load it (the expert count, the experts' FFN width), the fit's memory check needs
the number of weights, and the Runner the trained context (its default context is not larger). The gguf package's reader
builds a numpy view per array element and takes ~25 s on a 150k-token vocabulary; this reader
walks the header once, keeps scalars and skips arrays, in about a second.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from rs_local.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Header entries beyond this are not metadata a model would carry (a damaged file).
_MAX_KV = 1 << 16
_MAX_ITEMS = 1 << 24
#: ggml tensors have at most 4 dimensions.
_MAX_DIMS = 4


class _Reader:
    """Little-endian reads from a file, failing with the file's name on a short read."""

    def __init__(self, fh: BinaryIO, path: Path):
        self.fh, self.path = fh, path
        self.size = os.fstat(fh.fileno()).st_size

    def take(self, n: int) -> bytes:
        if n > self.size - self.fh.tell():  # checked first: a damaged length must not allocate exabytes
            raise ModelError(f"{self.path}: GGUF header is truncated")
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelError(f"{self.path}: GGUF header is truncated")
        return data

    def skip_value(self, vtype: int) -> None:
        """Step over one metadata value of type ``vtype``."""
        if vtype in _SCALARS:
            self.take(struct.calcsize(_SCALARS[vtype]))
        elif vtype == _STRING:
            self.fh.seek(self.unpack("<Q"), 1)
        elif vtype == _ARRAY:
            self.skip_array()
        else:
            raise ModelError(f"{self.path}: GGUF metadata has unknown type {vtype}")

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.take(self.unpack("<Q"))

    def skip_array(self) -> None:
        sub, n = self.unpack("<I"), self.unpack("<Q")
        if n > _MAX_ITEMS:
            raise ModelError(f"{self.path}: GGUF array of {n} items is implausible")
        if sub in _SCALARS:
            self.fh.seek(n * struct.calcsize(_SCALARS[sub]), 1)
        elif sub == _STRING:
            for _ in range(n):
                self.fh.seek(self.unpack("<Q"), 1)
        else:
            raise ModelError(f"{self.path}: GGUF array of type {sub} is not supported")


def gguf_scalars(path: str | Path) -> dict[str, Any]:
    """Every scalar (number, bool, string) key of a GGUF file's header; arrays are skipped.

    Remembered per file state (path, size, mtime): one fit asks several times (the chat-template
    check, the MoE config overrides, the architecture preflight), 0.1 s a walk on Qwen's header."""
    path = Path(path)
    st = path.stat()
    return dict(_scalars(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _scalars(path: str, _size: int, _mtime_ns: int) -> dict[str, Any]:
    with open(path, "rb") as fh:
        out, _n_tensors = _metadata(_Reader(fh, Path(path)))
    return out


#: Files of ours and llama.cpp's that are GGUF but not models, and where each is given instead.
_NOT_MODELS = {"controlvector": "a control vector (give it with --vector)",
               "rs_local_policy": "a conditional-steering policy (give it with --policy)",
               "rs_local_probe": "a probe judge (give it with --judge probe=FILE)"}
#: ``tokenizer.ggml.model`` values with no vocabulary: llama.cpp loads them, then aborts at the first tokenization.
_NO_VOCAB = {"none", "no_vocab"}


def check_model_header(path: str | Path) -> None:
    """A one-line ModelError for a GGUF that parses but that llama.cpp would abort or hang on as a model.

    Why: llama.cpp loads a model whose tokenizer is ``none`` and then fails an assertion at the first
    prompt (the process dies), and a NaN or negative normalisation epsilon fails ``eps >= 0`` inside
    a compute thread (one thread aborts, two hang). A control vector, a policy or a probe judge given
    as the model got "Failed to load model"; each is named for what it is."""
    scalars = gguf_scalars(path)
    arch = scalars.get("general.architecture")
    if arch in _NOT_MODELS:
        raise ModelError(f"{path}: this is {_NOT_MODELS[arch]}, not a model")
    if scalars.get("tokenizer.ggml.model") in _NO_VOCAB:
        raise ModelError(f"{path}: the model has no vocabulary (tokenizer.ggml.model is "
                         f"{scalars['tokenizer.ggml.model']!r}), so it cannot read text")
    for key, value in scalars.items():  # the architecture's own keys, as llama.cpp reads them (layer_norm_rms_epsilon, ...)
        if key.startswith(f"{arch}.") and key.endswith("epsilon") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
            raise ModelError(f"{path}: {key} is {value!r}; llama.cpp needs a finite number >= 0 there")


def gguf_parameter_count(path: str | Path) -> int:
    """How many weights the file's tensors hold (every element of every tensor), from the header alone.

    Why: a fit dequantizes the model into Transformers, at 4 bytes a weight in float32 whatever
    the file's quantization, so this count, not the file's size, says how much memory it takes
    (``rs_local.recipes.memory_check``).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        r = _Reader(fh, path)
        _scalars, n_tensors = _metadata(r, keep=False)
        if n_tensors > _MAX_ITEMS:
            raise ModelError(f"{path}: GGUF header claims {n_tensors} tensors")
        total = 0
        for _ in range(n_tensors):
            r.string()  # name
            n_dims = r.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise ModelError(f"{path}: GGUF tensor with {n_dims} dimensions")
            count = 1
            for _ in range(n_dims):
                count *= r.unpack("<Q")
            r.unpack("<I")  # type
            r.unpack("<Q")  # offset
            total += count
    return total


def _metadata(r: _Reader, keep: bool = True) -> tuple[dict[str, Any], int]:
    """Read the header up to the tensor infos: (scalar keys, or {} when not ``keep``; tensor count)."""
    out: dict[str, Any] = {}
    if r.take(4) != b"GGUF":
        raise ModelError(f"{r.path}: not a GGUF file")
    version = r.unpack("<I")
    if version < 2:
        raise ModelError(f"{r.path}: GGUF version {version} is too old")
    n_tensors = r.unpack("<Q")
    n_kv = r.unpack("<Q")
    if n_kv > _MAX_KV:
        raise ModelError(f"{r.path}: GGUF header claims {n_kv} metadata entries")
    for _ in range(n_kv):
        key = r.string().decode("utf-8", errors="replace")
        vtype = r.unpack("<I")
        if vtype == _ARRAY:
            r.skip_array()
        elif vtype == _STRING:
            value = r.string().decode("utf-8", errors="replace")
            if keep:
                out[key] = value
        elif vtype in _SCALARS:
            value = r.unpack(_SCALARS[vtype])
            if keep:
                out[key] = value
        else:
            raise ModelError(f"{r.path}: GGUF metadata '{key}' has unknown type {vtype}")
    return out, n_tensors


def trained_context(path: str | Path) -> int | None:
    """The ``<arch>.context_length`` a GGUF model was trained with, or None when it cannot be read.

    Walks the metadata only until both keys are seen (they come first in practice: milliseconds);
    anything odd gives None and llama.cpp's loader decides.
    """
    path = Path(path)
    if not path.is_file():  # a FIFO would block the open
        return None
    try:
        with open(path, "rb") as fh:
            r = _Reader(fh, path)
            if r.take(4) != b"GGUF" or r.unpack("<I") < 2:
                return None
            r.unpack("<Q")  # tensors
            arch, lengths = None, {}
            for _ in range(min(r.unpack("<Q"), _MAX_KV)):
                key, vtype = r.string(), r.unpack("<I")
                if key == b"general.architecture" and vtype == _STRING:
                    arch = r.string()
                elif key.endswith(b".context_length") and vtype in (4, 5, 10, 11):
                    lengths[key] = r.unpack(_SCALARS[vtype])
                else:
                    r.skip_value(vtype)
                if arch is not None and arch + b".context_length" in lengths:
                    value = lengths[arch + b".context_length"]
                    return value if value > 0 else None
    except (OSError, ModelError):
        return None
    return None
