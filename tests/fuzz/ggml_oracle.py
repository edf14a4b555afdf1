"""llama.cpp's own verdict on control-vector files: ggml's C GGUF parser plus the loader's rules.

The parser is the real one: ``gguf_init_from_file`` exported by ``libggml-base.so`` in the
installed llama-cpp-python, called through ctypes first with ``no_alloc = true, ctx = NULL``
(header only) and then with ``no_alloc = false`` and a context, as
``common_control_vector_load_one`` calls it (that reads the whole data section). The loader
itself lives in common.cpp, which the shared library does not export, so its few rules are
replayed here over ggml's own tensors, with the layer index parsed by the C library's
``strtol`` exactly as ``std::stoi`` does. The result is llama.cpp's summed buffer per block.

A hostile file may make ggml abort (a failed allocation is a GGML_ASSERT), so the checks run
in a child process under an address-space limit, one JSON line per file; a child that dies
marks the file it was on as rejected ("aborted") and a fresh child takes the rest.

    python tests/fuzz/ggml_oracle.py < paths      # one JSON-encoded path per line (child mode)
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import importlib.util
import json
import os
import resource
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INT_MAX = 2**31 - 1
ADDRESS_LIMIT = 2 << 30
ALLOCATION_LIMIT = 1 << 30  # past this, llama.cpp's loader's resize() is counted as a failure


def _lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed")
    return Path(spec.origin).parent / "lib"


def available() -> bool:
    """Whether the installed llama-cpp-python ships the ggml library this oracle needs."""
    try:
        return (_lib_dir() / "libggml-base.so").exists()
    except RuntimeError:
        return False


# --------------------------------------------------------------------------- child side


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _load_ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_lib_dir() / "libggml-base.so"))
    sigs = {
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _InitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "ggml_get_tensor": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "ggml_n_dims": (ctypes.c_int, [ctypes.c_void_p]),
        "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
        "ggml_get_data_f32": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
        "ggml_free": (None, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.strtol.restype = ctypes.c_long
    libc.strtol.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    return libc


def stoi(libc: ctypes.CDLL, text: bytes) -> int | None:
    """``std::stoi(text)``: strtol base 10; None where it throws (no digits, ERANGE, outside int)."""
    buf = ctypes.create_string_buffer(text)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = libc.strtol(buf, ctypes.byref(end), 10)
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buf)
    if consumed == 0 or ctypes.get_errno() != 0 or not -(2**31) <= value <= INT_MAX:
        return None
    return value


def _loader(lib: ctypes.CDLL, libc: ctypes.CDLL, gctx: int, ctx: int) -> dict:
    """common_control_vector_load_one's loop over ggml's tensors, strength 1."""
    n_tensors = lib.gguf_get_n_tensors(gctx)
    if n_tensors == 0:
        return {"accepts": False, "why": "no tensors"}
    n_embd, data = -1, np.zeros(0, np.float32)
    layers: set[int] = set()
    for i in range(n_tensors):
        name = lib.gguf_get_tensor_name(gctx, i)
        prefix, dot, rest = name.partition(b".")
        layer = stoi(libc, rest) if dot and prefix == b"direction" else None
        if layer is None or layer < 0:
            return {"accepts": False, "why": f"unparsable layer in {name!r}"}
        if layer == 0:
            return {"accepts": False, "why": "layer 0"}
        tensor = lib.ggml_get_tensor(ctx, name)
        if ctypes.c_int.from_address(tensor).value != 0:  # ggml_tensor.type is the first field
            return {"accepts": False, "why": "not F32"}
        if lib.ggml_n_dims(tensor) != 1:
            return {"accepts": False, "why": "not 1-D"}
        count = ctypes.c_int(lib.ggml_nelements(tensor)).value  # stored in an int
        if n_embd == -1:
            n_embd = count
        elif count != n_embd:
            return {"accepts": False, "why": "n_embd mismatch"}
        if n_embd * layer > INT_MAX:
            return {"accepts": False, "why": "n_embd * layer overflows int (undefined behaviour)"}
        if n_embd * layer * 4 > ALLOCATION_LIMIT:
            return {"accepts": False, "why": f"the loader would allocate {n_embd * layer * 4} bytes (n_embd x block floats)"}
        if data.size < n_embd * layer:
            data = np.concatenate([data, np.zeros(n_embd * layer - data.size, np.float32)])
        src = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), shape=(n_embd,)) if n_embd else np.zeros(0, np.float32)
        block = data[n_embd * (layer - 1): n_embd * layer]
        block += src * np.float32(1.0)
        layers.add(layer)
    encoded = {str(k): base64.b64encode(data[n_embd * (k - 1): n_embd * k].tobytes()).decode() for k in sorted(layers)}
    return {"accepts": True, "why": "", "n_embd": n_embd, "layers": encoded}


def judge_file(lib: ctypes.CDLL, libc: ctypes.CDLL, path: str) -> dict:
    """Parser (header, then with data) and loader verdict for one file."""
    raw = os.fsencode(path)
    gctx = lib.gguf_init_from_file(raw, _InitParams(True, None))
    if not gctx:
        return {"accepts": False, "why": "parser rejects the header"}
    lib.gguf_free(gctx)
    ctx = ctypes.c_void_p()
    gctx = lib.gguf_init_from_file(raw, _InitParams(False, ctypes.pointer(ctx)))
    if not gctx:
        return {"accepts": False, "why": "parser rejects the data"}
    try:
        return _loader(lib, libc, gctx, ctx.value)
    finally:
        lib.gguf_free(gctx)
        lib.ggml_free(ctx)


def child_main() -> None:
    """Answer on a private copy of stdout: whatever ggml prints (fd 1) goes to stderr instead."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    lib, libc = _load_ggml(), _libc()
    for line in sys.stdin:
        path = json.loads(line)
        answers.write(json.dumps(judge_file(lib, libc, path)) + "\n")
        answers.flush()


# --------------------------------------------------------------------------- parent side


@dataclass
class Verdict:
    """llama.cpp's answer for one file: accepted or not, why not, and the summed blocks."""

    accepts: bool
    why: str = ""
    layers: dict[int, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def from_json(obj: dict) -> "Verdict":
        layers = {int(k): np.frombuffer(base64.b64decode(v), np.float32) for k, v in obj.get("layers", {}).items()}
        return Verdict(obj["accepts"], obj.get("why", ""), layers)


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _spawn() -> subprocess.Popen:
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort would otherwise attach gdb
    return subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, preexec_fn=_limit_child, env=env)


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else None


def verdicts(paths: list[Path], timeout: float = 30.0) -> list[Verdict]:
    """llama.cpp's verdict on each path, in order; an abort or hang counts as a rejection.

    Only regular files are handed to ggml: its fopen/fread would block on a FIFO forever.
    """
    regular = [p for p in paths if Path(p).is_file()]
    answers = iter(_ask(regular, timeout))
    return [next(answers) if Path(p).is_file() else Verdict(False, "not a regular file") for p in paths]


def _ask(paths: list[Path], timeout: float) -> list[Verdict]:
    out: list[Verdict] = []
    while len(out) < len(paths):
        proc = _spawn()
        assert proc.stdin is not None
        try:
            for p in paths[len(out):]:
                proc.stdin.write(json.dumps(os.fsdecode(p)) + "\n")
                proc.stdin.flush()
                line = _read_line(proc, timeout)
                if not line:
                    out.append(Verdict(False, "llama.cpp aborted or hung"))
                    break
                out.append(Verdict.from_json(json.loads(line)))
        except BrokenPipeError:
            out.append(Verdict(False, "llama.cpp aborted"))
        finally:
            proc.kill()
            proc.wait()
    return out


def disagreement(directions: dict[int, np.ndarray], verdict: Verdict) -> str | None:
    """Why llama.cpp would not apply what our reader returned, or None when they agree.

    Compared by value (0.0 == -0.0: llama.cpp starts each block from +0 and adds to it).
    """
    if not verdict.accepts:
        return f"llama.cpp rejects it ({verdict.why})"
    if sorted(directions) != sorted(verdict.layers):
        return f"blocks differ: ours {sorted(directions)}, llama.cpp {sorted(verdict.layers)}"
    for k, vec in directions.items():
        if not np.array_equal(np.asarray(vec, np.float32), verdict.layers[k]):
            return f"block {k} values differ"
    return None


if __name__ == "__main__":
    child_main()
