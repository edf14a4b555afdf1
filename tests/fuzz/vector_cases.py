"""A seeded generator of malformed control-vector files, one class per kind of damage in issue 10.

Every GGUF case starts from a valid small vector written by rs-local's own writer, parsed
into an editable form (:class:`Doc`), then mutated and serialised by the small GGUF encoder
below, which can write what no proper writer would: wrong counts and lengths, invalid
types, arrays of arrays, big-endian fields, any tensor offsets, names and shapes. ``.npz``
and ``.safetensors`` cases are built the same way from rs-local's savers or by hand.

Each case carries what the reader must do with it: ``accept``, ``reject`` or ``any`` (where
only the oracles decide: no traceback, and nothing llama.cpp rejects). The same seed and
index always give the same bytes, whatever else is generated.

    cases = generate(n=300, seed=1, workdir=tmp)   # round robin over CLASSES
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B", U64: "Q", I64: "q", F64: "d"}


# --------------------------------------------------------------------------- editable GGUF


@dataclass
class Kv:
    key: bytes
    vtype: int
    value: Any  # scalar, bytes for a string, a list for an array
    atype: int | None = None  # element type when vtype == ARR
    count: int | None = None  # declared array length, if not len(value)


@dataclass
class Tensor:
    name: bytes
    ne: list[int]
    data: bytes
    ttype: int = 0
    offset: int | None = None  # None: packed after the previous one, as ggml expects
    n_dims: int | None = None  # declared, if not len(ne)


@dataclass
class Doc:
    kvs: list[Kv]
    tensors: list[Tensor]
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32  # used to lay out the data, whatever general.alignment says
    endian: str = "<"
    pad_end: bool = True

    def kv(self, key: bytes) -> Kv | None:
        return next((kv for kv in self.kvs if kv.key == key), None)

    def set(self, kv: Kv) -> None:
        self.kvs = [k for k in self.kvs if k.key != kv.key] + [kv]


def _pack(e: str, fmt: str, value: Any) -> bytes:
    return struct.pack(e + fmt, value)


def _string(e: str, raw: bytes, declared: int | None = None) -> bytes:
    return _pack(e, "Q", len(raw) if declared is None else declared) + raw


def _value(e: str, vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return _string(e, value)
    if vtype == BOOL:
        return bytes([value & 0xFF])
    return _pack(e, _FMT[vtype], value)


def _kv_bytes(e: str, kv: Kv) -> bytes:
    out = _string(e, kv.key) + _pack(e, "i", kv.vtype)
    if kv.vtype != ARR:
        return out + (_value(e, kv.vtype, kv.value) if kv.vtype in _FMT or kv.vtype == STR else bytes(kv.value or b""))
    items = kv.value or []
    out += _pack(e, "i", kv.atype) + _pack(e, "Q", len(items) if kv.count is None else kv.count)
    if kv.atype in _FMT or kv.atype == STR:
        return out + b"".join(_value(e, kv.atype, v) for v in items)
    return out + b"".join(bytes(v) for v in items)  # raw bytes for invalid element types


def _pad(n: int, a: int) -> int:
    return (n + a - 1) // a * a if a > 0 else n


def serialize(doc: Doc) -> bytes:
    """GGUF bytes for ``doc``, exactly as declared, however wrong."""
    e = doc.endian
    out = bytearray(doc.magic + _pack(e, "I", doc.version & 0xFFFFFFFF))
    out += _pack(e, "q", len(doc.tensors) if doc.n_tensors is None else doc.n_tensors)
    out += _pack(e, "q", len(doc.kvs) if doc.n_kv is None else doc.n_kv)
    for kv in doc.kvs:
        out += _kv_bytes(e, kv)
    offsets, at = [], 0
    for t in doc.tensors:
        offsets.append(at if t.offset is None else t.offset)
        at = _pad((at if t.offset is None else t.offset) + len(t.data), doc.alignment)
    for t, off in zip(doc.tensors, offsets):
        dims = t.ne if t.n_dims is None else (t.ne + [1] * 8)[: max(t.n_dims, 0)]
        out += _string(e, t.name) + _pack(e, "I", (len(t.ne) if t.n_dims is None else t.n_dims) & 0xFFFFFFFF)
        out += b"".join(_pack(e, "q", d) for d in dims[:8])
        out += _pack(e, "i", t.ttype) + _pack(e, "Q", off & (2**64 - 1))
    align = doc.alignment if doc.alignment <= 1 << 16 else 1  # a 2 GB alignment is not written out
    if doc.tensors:
        out += bytes(_pad(len(out), align) - len(out))
    base = len(out)
    end = max((off + len(t.data) for t, off in zip(doc.tensors, offsets) if off < 1 << 24), default=0)
    data = bytearray(_pad(end, align) if doc.pad_end else end)
    for t, off in zip(doc.tensors, offsets):
        if off < 1 << 24:
            data[off:off + len(t.data)] = t.data
    return bytes(out[:base] + data)


def parse(raw: bytes) -> Doc:
    """Doc from a valid little-endian GGUF (the writer's output); not a validator."""
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from("<" + fmt, raw, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> bytes:
        nonlocal pos
        n = take("Q")
        pos += n
        return raw[pos - n:pos]

    def value(vtype: int) -> Any:
        return string() if vtype == STR else (take("B") if vtype == BOOL else take(_FMT[vtype]))

    assert raw[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("q"), take("q")
    kvs = []
    for _ in range(n_kv):
        key, vtype = string(), take("i")
        if vtype == ARR:
            atype, count = take("i"), take("Q")
            kvs.append(Kv(key, ARR, [value(atype) for _ in range(count)], atype))
        else:
            kvs.append(Kv(key, vtype, value(vtype)))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        ne = [take("q") for _ in range(n_dims)]
        infos.append((name, ne, take("i"), take("Q")))
    align = next((kv.value for kv in kvs if kv.key == b"general.alignment"), 32)
    base = _pad(pos, align)
    tensors = [Tensor(name, ne, raw[base + off: base + off + 4 * int(np.prod(ne))], ttype) for name, ne, ttype, off in infos]
    return Doc(kvs, tensors, version=version, alignment=align)


# --------------------------------------------------------------------------- bases


@lru_cache(maxsize=None)
def _base_bytes(k: int) -> bytes:
    """Valid vector k (0..5) written by rs-local's own writer: varied n_embd, blocks, metadata."""
    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.vectors.control_vector import ControlVector

    rng = np.random.default_rng(k)
    n_embd = [1, 3, 8, 17, 64, 96][k]
    layers = sorted(rng.choice(np.arange(1, 40), size=1 + k % 4, replace=False).tolist())
    dirs = {int(i): rng.standard_normal(n_embd).astype(np.float32) for i in layers}
    meta = {"method": "wrmd", "lambda": 0.25, "layers": layers, "table": {"8": {"r": 0.5}}, "note": "ünï ✓"}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_control_vector(ControlVector(dirs, ["llama", "qwen2", ""][k % 3], meta if k % 2 else {}), Path(tmp) / "v.gguf")
        return path.read_bytes()


def base_doc(rng: random.Random) -> Doc:
    return parse(_base_bytes(rng.randrange(6)))


def _f32(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def _n_embd(doc: Doc) -> int:
    return len(doc.tensors[0].data) // 4


# --------------------------------------------------------------------------- GGUF classes
# Each returns (bytes, expectation). Expectation "any" leaves the verdict to the oracles.

Made = tuple[bytes, str]


def c_valid(rng: random.Random) -> Made:
    """Unmodified, re-encoded, version 2, other alignments, trailing unit dims: all accepted."""
    doc = base_doc(rng)
    variant = rng.randrange(6)
    if variant == 0:
        return _base_bytes(rng.randrange(6)), "accept"
    if variant == 1:
        doc.version = 2
    elif variant == 2:
        align = rng.choice([1, 8, 64, 256])
        doc.set(Kv(b"general.alignment", U32, align))
        doc.alignment = align
    elif variant == 3:
        for t in doc.tensors:
            t.ne = t.ne + [1] * rng.randrange(1, 4)
    elif variant == 4:  # direction.N and direction.0N: two names for one block, summed
        t = doc.tensors[0]
        doc.tensors.append(Tensor(t.name.replace(b".", b".0", 1), list(t.ne), _f32(np.ones(_n_embd(doc)))))
    return serialize(doc), "accept"


def c_header_counts(rng: random.Random) -> Made:
    """Tensor and key counts: huge, negative, off by one."""
    doc = base_doc(rng)
    which = rng.choice(["n_tensors", "n_kv"])
    real = len(doc.tensors) if which == "n_tensors" else len(doc.kvs)
    value = rng.choice([2**40, 2**62, 2**63 - 1, -1, -(2**63), 2**31, real + 1, real - 1, 0])
    setattr(doc, which, value)
    expect = "any" if value in (real - 1, 0) else "reject"
    return serialize(doc), expect


def _filler(doc: Doc, size: int = 4600) -> None:
    """Pad the metadata so the file is about 4.9 KB, the size of issue 10's file."""
    doc.set(Kv(b"general.description", STR, b"x" * size))


def c_huge_array(rng: random.Random) -> Made:
    """A small file whose metadata declares an enormous array."""
    doc = base_doc(rng)
    _filler(doc)
    atype = rng.choice([U8, F64, STR, I32, BOOL])
    count = rng.choice([2**20, 2**24, 2**30, 2**30 + 1, 2**40, 2**63, 2**64 - 1])
    key = rng.choice([b"rs_local.big", b"tokenizer.ggml.tokens", b"controlvector.extra"])
    sample = [b"a"] * 3 if atype == STR else [1] * 3
    kv = Kv(key, ARR, sample, atype, count)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), kv)
    return serialize(doc), "reject"


def c_huge_string(rng: random.Random) -> Made:
    """A key, value or tensor name whose declared length is far past the file's end."""
    doc = base_doc(rng)
    _filler(doc, rng.choice([0, 4600]))
    raw = bytearray(serialize(doc))
    length = rng.choice([2**30, 2**30 + 1, 2**40, 2**64 - 1, len(raw)])
    pos = 24 if rng.random() < 0.5 else 24 + 8 + len(doc.kvs[0].key) + 4  # first key or first value
    raw[pos:pos + 8] = length.to_bytes(8, "little")
    return bytes(raw), "reject"


def c_layer_count(rng: random.Random) -> Made:
    """controlvector.layer_count of 2^31-1 and friends: llama.cpp ignores it, so must we (cheaply)."""
    doc = base_doc(rng)
    vtype, value = rng.choice([(U32, 2**31 - 1), (U32, 2**32 - 1), (I32, 2**31 - 1), (I32, -1), (U64, 2**64 - 1),
                               (I64, -(2**63)), (STR, b"many"), (F64, float("nan"))])
    doc.set(Kv(b"controlvector.layer_count", vtype, value))
    if rng.random() < 0.5:  # the cvector-generator layout: three keys only, INT32 count
        doc.kvs = [kv for kv in doc.kvs if kv.key.startswith((b"general.architecture", b"controlvector."))]
        doc.set(Kv(b"controlvector.layer_count", I32, 2**31 - 1))
    return serialize(doc), "accept"


def c_huge_tensor(rng: random.Random) -> Made:
    """Tensor shapes whose size is huge or overflows int64."""
    doc = base_doc(rng)
    t = rng.choice(doc.tensors)
    t.ne = rng.choice([[2**40], [2**61], [2**62 + 1], [2**32, 2**32], [2**31, 2**31, 4], [2**63 - 1, 2], [3, 2**62, 2**62]])
    return serialize(doc), "reject"


def c_big_endian(rng: random.Random) -> Made:
    """The whole file big-endian, as gguf-py writes with --bigendian."""
    doc = base_doc(rng)
    doc.endian = ">"
    for t in doc.tensors:
        t.data = np.frombuffer(t.data, "<f4").astype(">f4").tobytes()
    return serialize(doc), "reject"


def c_version(rng: random.Random) -> Made:
    doc = base_doc(rng)
    doc.version = rng.choice([0, 1, 4, 5, 0x00030000, 0x03000000, 0xFFFF0000, 2**32 - 1, 0x0102])
    return serialize(doc), "reject"


def c_magic(rng: random.Random) -> Made:
    doc = base_doc(rng)
    doc.magic = rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0", b"gguf", b"GGML", b"GGJT"])
    return serialize(doc), "reject"


def c_offsets(rng: random.Random) -> Made:
    """Overlapping, shared, gapped, unaligned, swapped and out-of-file tensor offsets."""
    doc = base_doc(rng)
    while len(doc.tensors) < 2:
        doc.tensors.append(Tensor(f"direction.{len(doc.tensors) + 50}".encode(), list(doc.tensors[0].ne), doc.tensors[0].data))
    packed = []
    at = 0
    for t in doc.tensors:
        packed.append(at)
        at = _pad(at + len(t.data), doc.alignment)
    i = rng.randrange(1, len(doc.tensors))
    kind = rng.choice(["shared", "overlap", "gap", "unaligned", "swap", "beyond", "first"])
    offs = {"shared": 0, "overlap": max(packed[i] - doc.alignment, 0), "gap": packed[i] + doc.alignment,
            "unaligned": packed[i] + 4, "beyond": 2**40, "first": doc.alignment}
    if kind == "swap":
        doc.tensors[0].offset, doc.tensors[i].offset = packed[i], packed[0]
    elif kind == "first":
        doc.tensors[0].offset = offs["first"]
    else:
        for j, t in enumerate(doc.tensors):
            t.offset = packed[j]
        doc.tensors[i].offset = offs[kind]
    return serialize(doc), "reject"


def c_f16_sized(rng: random.Random) -> Made:
    """F32 tensors laid out with F16-sized data: each reads its neighbour's bytes."""
    doc = base_doc(rng)
    for t in doc.tensors:
        t.data = t.data[: len(t.data) // 2]
    return serialize(doc), "any"


def c_ndims(rng: random.Random) -> Made:
    doc = base_doc(rng)
    t = rng.choice(doc.tensors)
    n = _n_embd(doc)
    kind = rng.randrange(6)
    if kind == 0:
        t.ne = [n, 1, 1, 1, 1]  # 5-D
    elif kind == 1:
        t.n_dims = rng.choice([5, 64, 2**31, 2**32 - 1])
    elif kind == 2:
        t.ne, t.data = [n, 2], t.data * 2
    elif kind == 3:
        t.ne = [n, rng.choice([-1, -(2**63)])]
    elif kind == 4:
        t.ne, t.data = [0], b""
    else:
        t.ne, t.data = [n, 0], b""
    return serialize(doc), "reject"


def c_tensor_type(rng: random.Random) -> Made:
    doc = base_doc(rng)
    t = rng.choice(doc.tensors)
    t.ttype = rng.choice([1, 2, 4, 5, 8, 24, 28, 30, 31, 42, 43, 99, -1, 2**31 - 1])
    if t.ttype == 1:  # a proper F16 tensor
        t.data = np.frombuffer(t.data, "<f4").astype("<f2").tobytes()
    return serialize(doc), "reject"


def c_kv_type(rng: random.Random) -> Made:
    """Invalid value types, arrays of arrays, invalid array element types."""
    doc = base_doc(rng)
    key = rng.choice([b"rs_local.x", b"general.thing"])
    kind = rng.randrange(3)
    if kind == 0:
        kv = Kv(key, rng.choice([13, 99, -1, 2**31 - 1]), b"\0" * 8)
    elif kind == 1:
        kv = Kv(key, ARR, [b"\x04\0\0\0\x01\0\0\0\0\0\0\0\x07\0\0\0"], ARR, 1)  # [[7]]
    else:
        kv = Kv(key, ARR, [b"\0" * 4], rng.choice([13, 99, -1]), 1)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), kv)
    return serialize(doc), "reject"


_NAMES: list[tuple[bytes, str]] = [
    ("direction.٣".encode(), "reject"), ("direction.３".encode(), "reject"), ("direction.¹".encode(), "reject"),
    ("direction.߃".encode(), "reject"), (b"direction.5abc", "reject"), (b"direction. 5", "reject"),
    (b"direction.+5", "reject"), (b"direction.-1", "reject"), (b"direction.0", "reject"), (b"direction.-0", "reject"),
    (b"direction.00", "reject"), (b"direction.2147483648", "reject"), (b"direction.4294967297", "reject"),
    (b"direction.99999999999999999999", "reject"), (b"direction.", "reject"), (b"direction..1", "reject"),
    (b"Direction.1", "reject"), (b"direction_1", "reject"), (b"direction.1\0x", "reject"), (b"", "reject"),
    (b"direction.\xff", "reject"), (b"direction.\x1b[31m", "reject"), (b"direction.1\n", "reject"),
    (b"direction.0x10", "reject"), (b"direction.1e3", "reject"), (b"direction." + b"0" * 52 + b"7", "accept"),
    (b"direction." + b"0" * 53 + b"7", "reject"), (b"direction.2147483647", "reject"), (b"direction.16385", "reject"),
    (b"direction.16384", "accept"), (b"direction.12", "accept"),
    (b"blk.1.attn_q.weight", "reject"),
]


def c_names(rng: random.Random) -> Made:
    """Tensor names llama.cpp's stoi would bend, refuse, or read differently than Python's \\d."""
    doc = base_doc(rng)
    name, expect = rng.choice(_NAMES)
    i = rng.randrange(len(doc.tensors))
    doc.tensors[i].name = name
    if len(doc.tensors) > 1 and (rng.random() < 0.15 or any(t.name == name for t in doc.tensors[:i] + doc.tensors[i + 1:])):
        doc.tensors[(i + 1) % len(doc.tensors)].name = name
        expect = "reject"  # the same name twice
    return serialize(doc), expect


def c_alignment(rng: random.Random) -> Made:
    doc = base_doc(rng)
    kind = rng.randrange(6)
    if kind == 0:
        doc.set(Kv(b"general.alignment", U32, rng.choice([0, 3, 24, 2**31 + 1])))
        expect = "reject"
    elif kind == 1:
        vtype = rng.choice([U64, I32, U16, STR, F32])
        doc.set(Kv(b"general.alignment", vtype, b"32" if vtype == STR else 32))
        expect = "reject"
    elif kind == 2:
        doc.set(Kv(b"general.alignment", ARR, [32], U32))
        expect = "reject"  # llama.cpp takes a 1-element array; we want a scalar
    elif kind == 3:  # declared 64, laid out with 32
        doc.set(Kv(b"general.alignment", U32, 64))
        expect = "any"
    elif kind == 4:  # declared 16, laid out with 16
        doc.set(Kv(b"general.alignment", U32, 16))
        doc.alignment = 16
        expect = "accept"
    else:
        doc.set(Kv(b"general.alignment", U32, 2**31))
        doc.alignment = 2**31
        expect = "reject"  # the data section would start 2 GB in
    return serialize(doc), expect


def c_keys(rng: random.Random) -> Made:
    """Duplicate, empty, non-UTF-8 and hostile keys; missing or wrong architecture."""
    doc = base_doc(rng)
    kind = rng.randrange(8)
    if kind == 0:
        doc.kvs.append(copy.deepcopy(rng.choice(doc.kvs)))
        return serialize(doc), "reject"
    if kind == 1:
        doc.kvs.append(Kv(b"", U32, 1))
        return serialize(doc), "reject"
    if kind == 2:
        doc.kvs.append(Kv(b"rs_local.\xff\xfe", U32, 1))
        return serialize(doc), "reject"
    if kind == 3:
        doc.kvs.append(Kv(rng.choice([b"general.\xff", b"x\x1b]0;pwned\x07", b"tokenizer.\xed\xa0\x80"]), U32, 1))
        return serialize(doc), "accept"
    if kind == 4:
        doc.kvs = [kv for kv in doc.kvs if kv.key != b"general.architecture"]
        return serialize(doc), "reject"
    if kind == 5:
        doc.kv(b"general.architecture").value = rng.choice([b"llama", b"", b"controlvector\0", b"CONTROLVECTOR"])
        return serialize(doc), "reject"
    if kind == 6:
        arch = doc.kv(b"general.architecture")
        arch.vtype, arch.value = U32, 7
        return serialize(doc), "reject"
    doc.kvs.reverse()  # architecture last: still a vector
    return serialize(doc), "accept"


def c_truncation(rng: random.Random) -> Made:
    raw = serialize(base_doc(rng))
    return raw[: rng.randrange(0, len(raw))], "reject"


def c_bitflip(rng: random.Random) -> Made:
    raw = bytearray(serialize(base_doc(rng)))
    for _ in range(rng.randrange(1, 9)):
        pos = rng.randrange(len(raw))
        raw[pos] = rng.choice([raw[pos] ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)])
    return bytes(raw), "any"


def c_n_embd(rng: random.Random) -> Made:
    doc = base_doc(rng)
    n = _n_embd(doc)
    doc.tensors.append(Tensor(b"direction.45", [n + rng.choice([1, -1 if n > 1 else 2, 7])], b""))
    doc.tensors[-1].data = _f32(np.ones(doc.tensors[-1].ne[0]))
    return serialize(doc), "reject"


def c_values(rng: random.Random) -> Made:
    """NaN and Inf in the data (refused); subnormals, -0, 3e38 (fine); two blocks summing to Inf."""
    doc = base_doc(rng)
    t = rng.choice(doc.tensors)
    vec = np.frombuffer(t.data, "<f4").copy()
    kind = rng.randrange(4)
    if kind == 0:
        vec[rng.randrange(vec.size)] = rng.choice([np.nan, np.inf, -np.inf])
        expect = "reject"
    elif kind == 1:
        vec[:] = rng.choice([1e-45, -0.0, 3e38, -3e38])
        expect = "accept"
    elif kind == 2:
        vec[:] = 3e38
        doc.tensors.append(Tensor(t.name.replace(b".", b".0", 1), list(t.ne), _f32(vec)))
        expect = "reject"  # the sum overflows to Inf
    else:
        vec = np.frombuffer(rng.randbytes(vec.nbytes), "<f4").copy()
        expect = "any"
    t.data = _f32(vec)
    return serialize(doc), expect


def _json_value(rng: random.Random) -> tuple[bytes, str]:
    depth = rng.choice([63, 64, 65, 1000, 5000, 100_000])
    kind = rng.randrange(9)
    if kind == 0:
        return ("[" * depth + "]" * depth).encode(), "accept" if depth <= 64 else "reject"
    if kind == 1:
        return ('{"a":' * depth + "1" + "}" * depth).encode(), "accept" if depth <= 64 else "reject"
    if kind == 2:
        return ("[" * depth).encode(), "reject"
    if kind == 3:  # Python refuses integers of more than 4300 digits
        return rng.choice([(b"1" * 5000, "reject"), (b"-" + b"9" * 4301, "reject"), (b"[" + b"7" * 4300 + b"]", "accept")])
    if kind == 4:
        return rng.choice([b'"\\ud800"', b'{"\\udfff": "\\ud83d"}', b'["\\ud83d\\ude00"]']), "accept"
    if kind == 5:
        return rng.choice([b"NaN", b"[Infinity, -Infinity]", b"1e400", b"-1e400"]), "accept"
    if kind == 6:
        return rng.choice([b"[1, 2", b"{'a': 1}", b"", b"\xff\xfe", b"[1] [2]", b"\x00"]), "reject"
    if kind == 7:
        return ('"' + "\\u001b[2J\\u001b]0;title\\u0007\\n\\u2028\\u202e" + '"').encode(), "accept"
    return json.dumps(list(range(rng.choice([10, 100_000])))).encode(), "accept"


def c_meta_json(rng: random.Random) -> Made:
    """rs_local.json.* values: deep nesting, big integers, surrogates, NaN, invalid JSON."""
    doc = base_doc(rng)
    text, expect = _json_value(rng)
    key = b"rs_local.json." + rng.choice([b"table", b"layers", b"x"])
    if rng.random() < 0.1:
        doc.set(Kv(key, U32, 5))
        return serialize(doc), "reject"  # a JSON key whose value is not a string
    doc.set(Kv(key, STR, text))
    return serialize(doc), expect


_TEXTS = [b"\x1b[2J\x1b[H", b"line1\nline2\r\n", "a\u2028b\u0085c\u202etxt".encode(), b"\x9b31m", b"\xff\xfe\xfd",
          b"\xed\xa0\x80", b"\xc3", "\x07bell\x08\x7f".encode(), b"\x1b]0;title\x07", b"[bold red]markup[/]",
          "ünïcødé ✓ 日本".encode(), b"x" * 100_000]


def c_meta_text(rng: random.Random) -> Made:
    """Escape sequences, newlines, invalid UTF-8 and lone surrogates in metadata keys and values."""
    doc = base_doc(rng)
    text = rng.choice(_TEXTS)
    where = rng.randrange(4)
    if where == 0:
        doc.set(Kv(b"rs_local.note", STR, text))
    elif where == 1:
        doc.set(Kv(b"controlvector.model_hint", STR, text))
    elif where == 2:  # the text as a key: fine if UTF-8, refused in our namespace otherwise
        key = b"rs_local." + text[:40]
        doc.set(Kv(key, STR, b"value"))
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return serialize(doc), "reject"
    else:
        doc.set(Kv(b"rs_local.list", ARR, [text, b"ok"], STR))
    return serialize(doc), "accept"


def c_meta_types(rng: random.Random) -> Made:
    """Non-finite and odd-typed metadata: fine; a model_hint that is not a string: refused."""
    doc = base_doc(rng)
    kind = rng.randrange(4)
    if kind == 0:
        doc.set(Kv(b"rs_local.r", F64, rng.choice([float("nan"), float("inf"), -float("inf"), 1e308])))
        return serialize(doc), "accept"
    if kind == 1:
        doc.set(Kv(b"rs_local.arr", ARR, [float("nan"), 1.5, float("inf")], F32))
        return serialize(doc), "accept"
    if kind == 2:
        doc.set(Kv(b"controlvector.model_hint", rng.choice([U32, I64]), 7))
        return serialize(doc), "reject"
    doc.set(Kv(b"rs_local.flags", ARR, [0, 1, 2, 255], BOOL))
    return serialize(doc), "accept"


def c_special(rng: random.Random) -> Made:
    """Placeholders: the runner turns these into a FIFO, a directory or a link to /dev/zero."""
    return rng.choice([b"@fifo", b"@dir", b"@devzero", b"@missing", b"@empty"]), "reject"


# --------------------------------------------------------------------------- npz classes


def _npz(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(header: dict, data: bytes) -> bytes:
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n" + data


@lru_cache(maxsize=1)
def _zip_bomb() -> bytes:
    """A .npz whose layer_1 inflates to 300 MB of zeros: about 1.4 MB on disk."""
    size = 300 << 20
    header = _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (size // 4,)}, b"")
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    body = comp.compress(header) + b"".join(comp.compress(chunk) for _ in range(size >> 20)) + comp.flush()
    crc = zlib.crc32(header)
    for _ in range(size >> 20):
        crc = zlib.crc32(chunk, crc)
    name = b"layer_1.npy"
    total = len(header) + size
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(body), total, len(name), 0) + name
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(body), total, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(body), 0)
    return local + body + central + end


def c_npz(rng: random.Random) -> Made:
    """Complex, object, integer, 2-D, odd-shaped and lying .npz files; zip bombs."""
    n = rng.choice([1, 4, 16])
    good = np.linspace(-1, 1, n)
    kind = rng.randrange(18)
    table: list[Callable[[], Made]] = [
        lambda: (_npz({"layer_1": good, "layer_3": good.astype(np.float32)}), "accept"),
        lambda: (_npz({"layer_1": good.astype(rng.choice([np.complex64, np.complex128]))}), "reject"),
        lambda: (_npz({"layer_1": good.astype(rng.choice([np.int32, np.int64, np.uint8, bool]))}), "reject"),
        lambda: (_npz({"layer_1": np.stack([good, good])}), "reject" if n > 1 else "accept"),  # [2, 1] is a column
        lambda: (_npz({"layer_1": good.reshape(1, n)}), "accept"),
        lambda: (_npz({"layer_1": good.astype(">f8")}), "accept"),
        lambda: (_npz({"layer_1": np.zeros(0)}), "reject"),
        lambda: (_npz({"layer_1": np.zeros(n, dtype=[("a", "<f4")])}), "reject"),
        lambda: (_npz({"layer_1": good.astype(np.longdouble)}), "reject"),
        lambda: (_zip_bomb(), "reject"),
        lambda: (_npz_raw({"layer_1.npy": _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (2**40,)}, b"\0" * 16)}), "reject"),
        lambda: (_npz_raw({"layer_1.npy": _npy_bytes({"descr": "|O", "fortran_order": False, "shape": (2,)}, b"\x80\x04N.")}), "reject"),
        lambda: (_npz({"layer_1": good, "model_hint": np.array([b"llama"])}), "reject"),
        lambda: (_npz({"layer_1": good, "metadata": np.array("[" * 5000 + "]" * 5000)}), "reject"),
        lambda: (_npz({"layer_1": good, "metadata": np.array(rng.choice(['"str"', "[1]", "1" * 5000]))}), "reject"),
        lambda: (_npz_raw({"layer_1.npy": _npy_bytes({"descr": "<f8", "fortran_order": False, "shape": (n,)}, good.tobytes()),
                           "layer_01.npy": _npy_bytes({"descr": "<f8", "fortran_order": False, "shape": (n,)}, good.tobytes())}), "reject"),
        lambda: (_npz({"layer_٣": good} if rng.random() < 0.5 else {"layer_99999999999": good}), "reject"),
        lambda: (_npz({"layer_1": good, "metadata": np.array('{"a": "\\ud800", "b": NaN}'),
                       "model_hint": np.array("\x1b[2Jhint\n")}), "accept"),
    ]
    raw, expect = table[kind]()
    if rng.random() < 0.1 and kind != 9:
        raw = raw[: rng.randrange(len(raw))]
        expect = "reject"
    return raw, expect


def _npz_raw(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --------------------------------------------------------------------------- safetensors classes


def _st(header: dict, data: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def c_safetensors(rng: random.Random) -> Made:
    """Header lengths, JSON, dtypes, offsets, shapes and metadata of .safetensors files."""
    n = rng.choice([1, 4, 16])
    data = np.linspace(-1, 1, n).astype("<f4").tobytes()

    def entry(dtype: str = "F32", shape: Any = None, offsets: Any = None) -> dict:
        return {"dtype": dtype, "shape": [n] if shape is None else shape, "data_offsets": [0, len(data)] if offsets is None else offsets}

    meta = {"model_hint": "llama", "rs_local_metadata": json.dumps({"m": 1})}
    kind = rng.randrange(14)
    table: list[Callable[[], Made]] = [
        lambda: (_st({"direction.2": entry(), "__metadata__": meta}, data), "accept"),
        lambda: (_st({"direction.2": entry()}, data, rng.choice([2**40, 2**64 - 1, 100_000_001])), "reject"),
        lambda: (_st({"direction.2": entry()}, data)[:rng.randrange(1, 30)], "reject"),
        lambda: (struct.pack("<Q", 9) + b"[[[[[[[[[" + data, "reject"),
        lambda: (_st_text("[" * 5000 + "]" * 5000, data), "reject"),
        lambda: (_st({"direction.2": entry(rng.choice(["I32", "BOOL", "U8", "C64", "F8_E4M3", "I64"]))}, data), "reject"),
        lambda: (_st({"direction.2": entry(offsets=[4, len(data) + 4])}, data + b"\0" * 4), "reject"),
        lambda: (_st({"direction.2": entry(offsets=[0, len(data)]), "direction.3": entry(offsets=[0, len(data)])}, data), "reject"),
        lambda: (_st({"direction.2": entry(shape=[n, 2], offsets=[0, 2 * len(data)])}, data * 2), "reject" if n > 1 else "accept"),
        lambda: (_st({"direction.2": entry(), "__metadata__": {"model_hint": 7}}, data), "reject"),
        lambda: (_st({"direction.2": entry(), "__metadata__": {"rs_local_metadata": '{"a":' * 100 + "1" + "}" * 100}}, data), "reject"),
        lambda: (_st({rng.choice(["direction.٣", "direction.+2", "blk.0", "direction.99999999999"]): entry()}, data), "reject"),
        lambda: (_st({"direction.2": entry(shape=[2**62], offsets=[0, len(data)])}, data), "reject"),
        lambda: (_st({"direction.2": entry("BF16", offsets=[0, 2 * n]), "__metadata__": {"model_hint": "\x1b[31m\n"}},
                     np.ones(n, "<u2").tobytes()), "accept"),
    ]
    return table[kind]()


def _st_text(text: str, data: bytes) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class VectorClass:
    """A class of damaged vector files: its maker and the suffix of the files it makes."""

    make: Callable[[random.Random], Made]
    suffix: str = ".gguf"


CLASSES: dict[str, VectorClass] = {
    "valid": VectorClass(c_valid),
    "header_counts": VectorClass(c_header_counts),
    "huge_array": VectorClass(c_huge_array),
    "huge_string": VectorClass(c_huge_string),
    "layer_count": VectorClass(c_layer_count),
    "huge_tensor": VectorClass(c_huge_tensor),
    "big_endian": VectorClass(c_big_endian),
    "version": VectorClass(c_version),
    "magic": VectorClass(c_magic),
    "offsets": VectorClass(c_offsets),
    "f16_sized": VectorClass(c_f16_sized),
    "ndims": VectorClass(c_ndims),
    "tensor_type": VectorClass(c_tensor_type),
    "kv_type": VectorClass(c_kv_type),
    "names": VectorClass(c_names),
    "alignment": VectorClass(c_alignment),
    "keys": VectorClass(c_keys),
    "truncation": VectorClass(c_truncation),
    "bitflip": VectorClass(c_bitflip),
    "n_embd": VectorClass(c_n_embd),
    "values": VectorClass(c_values),
    "meta_json": VectorClass(c_meta_json),
    "meta_text": VectorClass(c_meta_text),
    "meta_types": VectorClass(c_meta_types),
    "special": VectorClass(c_special),
    "npz": VectorClass(c_npz, ".npz"),
    "safetensors": VectorClass(c_safetensors, ".safetensors"),
}


@dataclass
class Case:
    """One generated file and what the reader must do with it."""

    cls: str
    index: int
    path: Path
    expect: str  # "accept", "reject" or "any"
    meta: dict = field(default_factory=dict)


def _materialise(path: Path, raw: bytes) -> None:
    """Write the case; special placeholders become a FIFO, a directory, a /dev/zero link ..."""
    special = {b"@fifo": lambda: os.mkfifo(path), b"@dir": lambda: path.mkdir(),
               b"@devzero": lambda: path.symlink_to("/dev/zero"), b"@missing": lambda: None,
               b"@empty": lambda: path.write_bytes(b"")}
    if raw in special:
        special[raw]()
    else:
        path.write_bytes(raw)


def make_case(cls: str, seed: int, index: int, workdir: Path) -> Case:
    """Case ``index`` of class ``cls``; the bytes depend only on (cls, seed, index)."""
    rng = random.Random(f"{cls}:{seed}:{index}")
    raw, expect = CLASSES[cls].make(rng)
    path = workdir / f"{index:06d}-{cls}{CLASSES[cls].suffix}"
    _materialise(path, raw)
    return Case(cls, index, path, expect)


def generate(n: int, seed: int, workdir: Path, classes: list[str] | None = None, start: int = 0) -> list[Case]:
    """``n`` cases, round robin over ``classes`` (default: all), written under ``workdir``."""
    names = classes or list(CLASSES)
    return [make_case(names[i % len(names)], seed, i, workdir) for i in range(start, start + n)]


# --------------------------------------------------------------------------- running one case


@dataclass
class Outcome:
    """What reading one case did: ``accepted``, ``clean error``, ``bad error`` or ``traceback``.

    A clean error is a VectorFileError (an RsLocalError) whose message is ``<path>: <problem>``
    with a one-line problem; a bad error is any other RsLocalError, or one that names another
    file or spans lines. ``directions`` holds what an accepted file gave, for the oracles.
    """

    kind: str
    detail: str = ""
    directions: dict[int, np.ndarray] = field(default_factory=dict)


def classify(path: Path) -> Outcome:
    """Read ``path`` with rs-local's dispatching reader and sort the result into an Outcome."""
    import traceback

    from rs_local.converters import load_vector
    from rs_local.errors import RsLocalError, VectorFileError

    try:
        cv = load_vector(path)
    except VectorFileError as exc:
        message, prefix = str(exc), f"{path}: "
        ok = message.startswith(prefix) and "\n" not in message[len(prefix):] and "\r" not in message[len(prefix):]
        return Outcome("clean error" if ok else "bad error", message)
    except RsLocalError as exc:
        return Outcome("bad error", f"{type(exc).__name__}: {exc}")
    except MemoryError:
        return Outcome("memory", "MemoryError")
    except Exception:  # noqa: BLE001 - this is what the fuzzer is looking for
        return Outcome("traceback", traceback.format_exc(limit=-3))
    return Outcome("accepted", "", dict(cv.directions))
