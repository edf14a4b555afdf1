"""File formats for control vectors: llama.cpp GGUF (read/write/validate), repeng, npz, safetensors.

Never imports llama.cpp or the CLI: files are checked in Python so that llama.cpp never
sees one it would skip or abort on.
"""

from rs_local.converters.formats import (
    describe,
    from_repeng,
    load_npz,
    load_safetensors,
    load_vector,
    save_npz,
    save_safetensors,
    save_vector,
    to_repeng_dict,
)
from rs_local.converters.gguf_io import (
    FORMAT_VERSION,
    atomic_output,
    read_control_vector,
    validate_for_model,
    write_control_vector,
)

__all__ = [
    "FORMAT_VERSION",
    "atomic_output",
    "describe",
    "from_repeng",
    "load_npz",
    "load_safetensors",
    "load_vector",
    "read_control_vector",
    "save_npz",
    "save_safetensors",
    "save_vector",
    "to_repeng_dict",
    "validate_for_model",
    "write_control_vector",
]
