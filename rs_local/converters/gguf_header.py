"""Scalar metadata of a GGUF model file, read from its header alone.

The Mixture-of-Experts paths need a few numbers from a model GGUF before Transformers or
llama.cpp load it (the expert count, the experts' FFN width). The gguf package's reader
builds a numpy view per array element and takes ~25 s on a 150k-token vocabulary; this reader
walks the header once, keeps scalars and skips arrays, in about a second.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from rs_local.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Header entries beyond this are not metadata a model would carry (a damaged file).
_MAX_KV = 1 << 16
_MAX_ITEMS = 1 << 24


class _Reader:
    """Little-endian reads from a file, failing with the file's name on a short read."""

    def __init__(self, fh: BinaryIO, path: Path):
        self.fh, self.path = fh, path

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelError(f"{self.path}: GGUF header is truncated")
        return data

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
    """Every scalar (number, bool, string) key of a GGUF file's header; arrays are skipped."""
    path = Path(path)
    out: dict[str, Any] = {}
    with open(path, "rb") as fh:
        r = _Reader(fh, path)
        if r.take(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file")
        version = r.unpack("<I")
        if version < 2:
            raise ModelError(f"{path}: GGUF version {version} is too old")
        r.unpack("<Q")  # tensor count: not needed
        n_kv = r.unpack("<Q")
        if n_kv > _MAX_KV:
            raise ModelError(f"{path}: GGUF header claims {n_kv} metadata entries")
        for _ in range(n_kv):
            key = r.string().decode("utf-8", errors="replace")
            vtype = r.unpack("<I")
            if vtype == _ARRAY:
                r.skip_array()
            elif vtype == _STRING:
                out[key] = r.string().decode("utf-8", errors="replace")
            elif vtype in _SCALARS:
                out[key] = r.unpack(_SCALARS[vtype])
            else:
                raise ModelError(f"{path}: GGUF metadata '{key}' has unknown type {vtype}")
    return out
