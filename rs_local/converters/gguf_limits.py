"""Constants of GGUF and of llama.cpp's parser (the version llama-cpp-python 0.3.36 vendors),
and rs-local's own, stricter bounds. Shared by the GGUF cursor, parser and loader rules."""

from __future__ import annotations

import re
import struct

# ---- constants of the vendored llama.cpp (llama-cpp-python 0.3.36) ------------------------
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # newest version ggml reads; 1 is refused, 0 is invalid
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1 << 30
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # a tensor name must be shorter than this, in bytes
GGML_TYPE_COUNT = 43
GGML_TYPE_F32 = 0
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
SIZE_MAX = 2**64 - 1

# GGUF value types (gguf.h) and how each scalar is stored.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
_SCALAR = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
    T_FLOAT32: "<f", T_BOOL: "<b", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}
TYPE_NAMES = {
    T_UINT8: "UINT8", T_INT8: "INT8", T_UINT16: "UINT16", T_INT16: "INT16", T_UINT32: "UINT32",
    T_INT32: "INT32", T_FLOAT32: "FLOAT32", T_BOOL: "BOOL", T_STRING: "STRING", T_ARRAY: "ARRAY",
    T_UINT64: "UINT64", T_INT64: "INT64", T_FLOAT64: "FLOAT64",
}
_HEADER = struct.Struct("<4sIqq")  # magic, version, n_tensors, n_kv
# Smallest possible encodings, used to bound the declared counts by the bytes left: a KV pair
# is a non-empty key (8 + 1), a type (4) and a one-byte value; a tensor info is an empty name
# (8), n_dims = 0 (4), a type (4) and an offset (8).
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8

# ---- rs-local's own bounds (stricter than llama.cpp, far above any real control vector) ----
MAX_TENSORS = 1 << 16  # a vector has one tensor per block; models have < 200 blocks
MAX_KEYS = 1 << 16  # vectors carry a few dozen keys, model files a few hundred
MAX_STRINGS = 1 << 22  # strings walked per file (a model's vocabulary is < 300k): keeps the walk under seconds
MAX_META_ITEMS = 1 << 20  # elements of one decoded metadata array
MAX_META_BYTES = 16 << 20  # bytes of one decoded metadata string
# llama.cpp's loader allocates n_embd * block floats for a file's highest block: direction.2000000000
# would ask for gigabytes. Models have at most a few hundred blocks.
MAX_BLOCK = 1 << 14

# What llama.cpp's loader takes as a direction, minus std::stoi's leniency (leading blanks,
# a sign, trailing junk): ASCII digits only, because Python's \d also matches "٣" or "３".
DIRECTION_NAME = re.compile(rb"direction\.([0-9]+)")
