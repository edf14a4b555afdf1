"""GGUF control-vector files: exact round trips, one-line errors, foreign writers, real llama.cpp.

Files that other tools write are built with gguf.GGUFWriter the way those tools write them
(llama.cpp's cvector-generator: tools/cvector-generator, repeng: repeng/extract.py
``export_gguf``). The llama.cpp checks use the real library shipped in llama-cpp-python:
ggml's own C GGUF parser for the file, and ``llama_set_adapter_cvec`` on SmolLM2.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest

from rs_local.converters.gguf_io import (
    CVECTOR_GENERATOR,
    FORMAT_VERSION,
    read_control_vector,
    validate_for_model,
    write_control_vector,
)
from rs_local.errors import FileProblem, RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

META = {
    "method": "wrmd",
    "lambda": 0.25,
    "n_prompts": 128,
    "negative": -3,
    "normalized": False,
    "note": "ünïcødé ✓",
    "empty": "",
    "layers": [8, 9, 10],
    "table": {"8": {"r": 0.5, "ok": True}, "9": None},
    "prompt_sets": ["harmful.jsonl", "political.jsonl"],
}


def _random_cv(n_embd: int, layers: list[int], seed: int = 0, hint: str = "llama", meta=None) -> ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {k: (rng.standard_normal(n_embd) * 10 ** rng.uniform(-6, 3)).astype(np.float32) for k in layers}
    return ControlVector(dirs, hint, dict(META if meta is None else meta))


def _gguf_file(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector",
               hint: str | None = "llama", count: int | None = None, count_type: str = "uint32") -> Path:
    """A GGUF laid out as the tools write it: arch, model_hint, layer_count, then tensors in order."""
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string(f"{arch}.model_hint", hint)
    n = len(tensors) if count is None else count
    (w.add_int32 if count_type == "int32" else w.add_uint32)(f"{arch}.layer_count", n)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return v / np.float32(np.linalg.norm(v))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "n_embd,layers",
    [(1, [1]), (7, [3, 100]), (576, list(range(1, 30))), (896, [5, 10, 23]), (4096, [31])],
)
def test_round_trip_is_bit_exact(tmp_path, n_embd, layers):
    cv = _random_cv(n_embd, layers, seed=n_embd)
    path = write_control_vector(cv, tmp_path / "v.gguf")
    back = read_control_vector(path)
    assert back.layers == layers
    for k in layers:
        assert back.directions[k].dtype == np.float32
        assert np.array_equal(back.directions[k], cv.directions[k])
    assert back.model_hint == "llama"
    assert back.metadata == META


def test_written_keys_are_what_llama_cpp_and_other_readers_expect(tmp_path):
    cv = _random_cv(16, [2, 4, 9])
    reader = gguf.GGUFReader(str(write_control_vector(cv, tmp_path / "v.gguf")))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert fields["controlvector.layer_count"].types[0] == gguf.GGUFValueType.UINT32
    assert fields["controlvector.layer_count"].contents() == 3
    assert fields["rs_local.format_version"].contents() == FORMAT_VERSION
    assert fields["rs_local.n_prompts"].types[0] == gguf.GGUFValueType.INT64
    assert fields["rs_local.lambda"].types[0] == gguf.GGUFValueType.FLOAT64
    assert fields["rs_local.normalized"].types[0] == gguf.GGUFValueType.BOOL
    assert fields["rs_local.method"].contents() == "wrmd"
    assert [t.name for t in reader.tensors] == ["direction.2", "direction.4", "direction.9"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [16]


def test_empty_model_hint_and_no_metadata_round_trip(tmp_path):
    cv = ControlVector({1: np.arange(4, dtype=np.float32)})
    back = read_control_vector(write_control_vector(cv, tmp_path / "v.gguf"))
    assert back.model_hint == "" and back.metadata == {}
    assert np.array_equal(back.directions[1], cv.directions[1])


def test_numpy_values_in_metadata_become_plain_types(tmp_path):
    meta = {"r": np.float32(0.5), "n": np.int64(3), "arr": np.arange(3), "big": 2**70}
    back = read_control_vector(write_control_vector(_random_cv(4, [1], meta=meta), tmp_path / "v.gguf"))
    assert back.metadata == {"r": 0.5, "n": 3, "arr": [0, 1, 2], "big": 2**70}


def test_reserved_metadata_key_is_refused_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_control_vector(_random_cv(4, [1], meta={"format_version": 2}), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- overwrite rules


def test_refuses_to_overwrite_without_force(tmp_path):
    path = write_control_vector(_random_cv(8, [1]), tmp_path / "v.gguf")
    before = path.read_bytes()
    with pytest.raises(FileProblem) as info:
        write_control_vector(_random_cv(8, [2], seed=1), path)
    assert str(path) in str(info.value) and "--force" in str(info.value)
    assert isinstance(info.value, RsLocalError)
    assert path.read_bytes() == before
    write_control_vector(_random_cv(8, [2], seed=1), path, force=True)
    assert read_control_vector(path).layers == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]  # no temp files left


def test_written_file_gets_normal_permissions(tmp_path):
    path = write_control_vector(_random_cv(8, [1]), tmp_path / "v.gguf")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(FileProblem, match="does not exist"):
        write_control_vector(_random_cv(8, [1]), tmp_path / "nope" / "v.gguf")


# --------------------------------------------------------------------------- malformed files


def _expect(path: Path, fragment: str) -> VectorFileError:
    with pytest.raises(VectorFileError) as info:
        read_control_vector(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "\n" not in message
    return info.value


def test_missing_file(tmp_path):
    _expect(tmp_path / "absent.gguf", "file not found")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(b'{"layer_1": [0.1, 0.2]}\n')
    _expect(path, "not a GGUF file")
    path.write_bytes(b"")
    _expect(path, "empty file")


@pytest.mark.parametrize("cut", [2, 20, 90, 300, "half", "last"])
def test_truncated_file(tmp_path, cut):
    data = write_control_vector(_random_cv(64, [1, 2, 3]), tmp_path / "good.gguf").read_bytes()
    n = {"half": len(data) // 2, "last": len(data) - 1}.get(cut, cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:n])
    _expect(path, "truncated")


def test_corrupt_header_counts(tmp_path):
    data = bytearray(write_control_vector(_random_cv(64, [1, 2]), tmp_path / "good.gguf").read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    _expect(path, "truncated or corrupt")


def test_wrong_architecture(tmp_path):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)}, arch="llama")
    _expect(path, "general.architecture is 'llama'")


def test_model_file_is_not_a_control_vector(smollm2_path):
    _expect(smollm2_path, "not a control vector: general.architecture is 'llama'")


@pytest.mark.parametrize("arch, where", [("rs_local_policy", "--policy"), ("rs_local_probe", "--judge probe=FILE")])
def test_our_other_files_given_as_a_vector_say_where_they_go(tmp_path, arch, where):
    """`--vector policy.gguf` said what the file is not, and not the option that takes it."""
    path = _gguf_file(tmp_path / "x.gguf", {"direction.1": np.ones(8, np.float32)}, arch=arch)
    _expect(path, f"general.architecture is '{arch}', expected 'controlvector' (a {'policy' if 'policy' in arch else 'probe judge'}: "
                  f"give it with {where})")


@pytest.mark.parametrize(
    "name,fragment",
    [("blk.1.attn_q.weight", "'blk.1.attn_q.weight' is not named direction.N"),
     ("direction.x", "'direction.x' is not named direction.N"),
     ("direction.-3", "is not named direction.N"),
     ("direction.0", "direction.0: block 0 cannot be steered")],
)
def test_bad_tensor_names(tmp_path, name, fragment):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32), name: np.ones(8, np.float32)})
    _expect(path, fragment)


def test_non_f32_tensor(tmp_path):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float16)})
    _expect(path, "direction.1 is F16, llama.cpp needs F32")


def test_rank_two_tensor(tmp_path):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.2": np.ones((2, 8), np.float32)})
    _expect(path, "direction.2 has shape [8, 2], llama.cpp needs a 1-D tensor")


def test_trailing_unit_dimension_counts_as_1d_like_ggml_n_dims(tmp_path):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.2": np.arange(8, dtype=np.float32).reshape(1, 8)})
    cv = read_control_vector(path)
    assert np.array_equal(cv.directions[2], np.arange(8, dtype=np.float32))
    assert _ggml_load(path)[2].tolist() == list(range(8))  # ggml's own parser agrees


def test_two_tensors_for_one_block_are_summed_like_llama_cpp(tmp_path):
    a, b = np.full(4, 1.5, np.float32), np.arange(4, dtype=np.float32)
    path = _gguf_file(tmp_path / "v.gguf", {"direction.5": a, "direction.05": b, "direction.2": b})
    cv = read_control_vector(path)
    assert cv.layers == [2, 5] and np.array_equal(cv.directions[5], a + b)


def test_inconsistent_n_embd(tmp_path):
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(6, np.float32)})
    _expect(path, "direction.2 has 6 values but direction.1 has 8 (inconsistent n_embd)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    vec = np.ones(8, np.float32)
    vec[5] = bad
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32), "direction.3": vec})
    _expect(path, "direction.3 contains NaN or Inf")


def test_no_directions(tmp_path):
    _expect(_gguf_file(tmp_path / "v.gguf", {}), "no direction tensors")


def test_bad_json_metadata(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_string("rs_local.json.layers", "[1, 2")
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _expect(tmp_path / "v.gguf", "rs_local.json.layers is not valid JSON")


# --------------------------------------------------------------------------- other writers


def test_reads_cvector_generator_layout(tmp_path):
    """cvector-generator: int32 layer_count = n_layer-1, unit directions 1..n_layer-1, nothing else."""
    dirs = {f"direction.{i}": _unit(576, i) for i in range(1, 30)}
    path = _gguf_file(tmp_path / "cvgen.gguf", dirs, hint="llama", count_type="int32")
    cv = read_control_vector(path)
    assert cv.layers == list(range(1, 30))  # read as written: direction.N is block N
    assert all(np.array_equal(cv.directions[i], dirs[f"direction.{i}"]) for i in cv.layers)
    assert cv.model_hint == "llama"
    assert cv.metadata == {"source": CVECTOR_GENERATOR}


def test_scaled_cvector_like_file_is_not_labelled(tmp_path):
    dirs = {f"direction.{i}": 3 * _unit(32, i) for i in range(1, 6)}
    cv = read_control_vector(_gguf_file(tmp_path / "v.gguf", dirs, count_type="int32"))
    assert "source" not in cv.metadata


def test_reads_repeng_layout(tmp_path):
    """repeng export_gguf: uint32 layer_count, HF model_type hint, layers in its (descending) order."""
    dirs = {f"direction.{i}": _unit(896, 100 + i) for i in range(23, 0, -1)}
    path = _gguf_file(tmp_path / "repeng.gguf", dirs, hint="qwen2")
    cv = read_control_vector(path)
    assert cv.layers == list(range(1, 24))
    assert all(np.array_equal(cv.directions[i], dirs[f"direction.{i}"]) for i in cv.layers)
    assert cv.model_hint == "qwen2" and cv.metadata == {}


# --------------------------------------------------------------------------- validate_for_model


def test_validate_for_model():
    cv = _random_cv(576, [1, 29])
    validate_for_model(cv, n_embd=576, n_layer=30)
    with pytest.raises(VectorFileError, match=r"^v\.gguf: vector has n_embd 576, model has 896$"):
        validate_for_model(cv, n_embd=896, n_layer=30, path="v.gguf")
    with pytest.raises(VectorFileError, match=r"direction\.31 but the model has 30 blocks \(directions 1\.\.29\)"):
        validate_for_model(_random_cv(576, [3, 31]), n_embd=576, n_layer=30)


# --------------------------------------------------------------------------- real llama.cpp


def _ggml_lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    lib.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_n_dims.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml_load(path: Path) -> dict[int, np.ndarray]:
    """Parse with ggml's C GGUF reader and apply common_control_vector_load_one's rules."""
    lib = _ggml_lib()
    ggml_ctx = ctypes.c_void_p()
    gctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(False, ctypes.pointer(ggml_ctx)))
    assert gctx, f"ggml could not parse {path}"
    try:
        out: dict[int, np.ndarray] = {}
        for i in range(lib.gguf_get_n_tensors(gctx)):
            name = lib.gguf_get_tensor_name(gctx, i)
            prefix, _, idx = name.decode().partition(".")
            assert prefix == "direction" and int(idx) >= 1
            assert lib.gguf_get_tensor_type(gctx, i) == 0  # GGML_TYPE_F32
            tensor = lib.ggml_get_tensor(ggml_ctx, name)
            assert lib.ggml_n_dims(tensor) == 1
            n = lib.ggml_nelements(tensor)
            out[int(idx)] = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), shape=(n,)).copy()
        assert len({v.size for v in out.values()}) == 1
        return out
    finally:
        lib.gguf_free(gctx)
        lib.ggml_free(ggml_ctx)


def test_ggml_parser_reads_our_file_bit_exactly(tmp_path):
    cv = _random_cv(576, [1, 7, 29])
    loaded = _ggml_load(write_control_vector(cv, tmp_path / "v.gguf"))
    assert sorted(loaded) == cv.layers
    assert all(np.array_equal(loaded[k], cv.directions[k]) for k in cv.layers)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    pytest.importorskip("llama_cpp")
    from rs_local.runtime.loading import load_llama

    llm, _ = load_llama(smollm2_path, n_ctx=256, n_threads=1, seed=0)
    yield llm
    llm.close()


def _apply(llm, cv: ControlVector | None) -> int:
    import llama_cpp

    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    llm.reset()  # drop the cached prefix computed under the previous vector
    if cv is None:
        return llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, llm.n_embd(), -1, -1)
    buf = cv.to_buffer(n_layer)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    return llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, cv.n_embd, 1, n_layer - 1)


def _greedy(llm, prompt: str = "The capital of France is") -> str:
    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def test_llama_cpp_accepts_written_file_and_its_contents_steer(smollm2, tmp_path):
    import llama_cpp

    n_layer = llama_cpp.llama_model_n_layer(smollm2.model)
    n_embd = smollm2.n_embd()
    assert (n_layer, n_embd) == (30, 576)
    baseline = _greedy(smollm2)

    big = {k: (40.0 * _unit(n_embd, k)).astype(np.float32) for k in range(4, 20)}
    path = write_control_vector(ControlVector(big, "llama", {"why": "test"}), tmp_path / "big.gguf")
    cv = read_control_vector(path)
    validate_for_model(cv, n_embd=n_embd, n_layer=n_layer, path=path)
    try:
        assert _apply(smollm2, cv) == 0
        steered = _greedy(smollm2)
        assert steered != baseline, (baseline, steered)
        # A zero vector is accepted too and changes nothing: the change above came from the file's values.
        zero = ControlVector({k: np.zeros(n_embd, np.float32) for k in big}, "llama")
        assert _apply(smollm2, zero) == 0
        assert _greedy(smollm2) == baseline
    finally:
        assert _apply(smollm2, None) == 0
    assert _greedy(smollm2) == baseline


def test_llama_cpp_rejects_wrong_width_so_the_check_above_can_fail(smollm2):
    wrong = ControlVector({1: np.ones(64, np.float32)})
    try:
        assert _apply(smollm2, wrong) != 0
    finally:
        _apply(smollm2, None)
    with pytest.raises(VectorFileError, match="vector has n_embd 64, model has 576"):
        validate_for_model(wrong, n_embd=smollm2.n_embd(), n_layer=30)


# --------------------------------------------------------------------------- hardening (issue 10)


def _bytes_of(cv: ControlVector, tmp_path: Path) -> bytearray:
    return bytearray(write_control_vector(cv, tmp_path / "base.gguf").read_bytes())


def _info_at(data: bytes, name: bytes) -> int:
    """Byte position just after tensor ``name`` in the tensor-info section (its n_dims field)."""
    return data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)


def _write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def _peak_alloc(fn) -> tuple[int, float]:
    """Peak bytes traced by tracemalloc (numpy's buffers included) and seconds, while ``fn`` runs."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, seconds


def _raises_vector_error(path: Path) -> None:
    with pytest.raises(VectorFileError):
        read_control_vector(path)


@pytest.mark.parametrize("count", [2**30, 2**40, 2**64 - 1])
def test_small_file_declaring_a_huge_array_is_refused_without_allocating(tmp_path, count):
    """Issue 10 item 1: 4.9 KB, an array of ``count`` strings declared; refused at once."""
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_string("general.description", "x" * 4600)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("direction.1", np.ones(8, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    data = bytearray((tmp_path / "v.gguf").read_bytes())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # after type + element type
    data[at:at + 8] = count.to_bytes(8, "little")
    path = _write(tmp_path, data)
    assert 4500 < path.stat().st_size < 5500
    peak, seconds = _peak_alloc(lambda: _raises_vector_error(path))
    assert peak < 1 << 20 and seconds < 0.5, (peak, seconds)
    _expect(path, "tokenizer.ggml.tokens")


def test_layer_count_of_2_31_is_read_without_allocating(tmp_path):
    """cvector-generator layout with layer_count INT32 2^31-1: llama.cpp ignores it, so do we, cheaply."""
    dirs = {f"direction.{i}": _unit(16, i) for i in range(1, 4)}
    path = _gguf_file(tmp_path / "v.gguf", dirs, count=2**31 - 1, count_type="int32")
    peak, seconds = _peak_alloc(lambda: read_control_vector(path))
    assert peak < 1 << 20 and seconds < 0.5, (peak, seconds)
    assert "source" not in read_control_vector(path).metadata  # count != number of directions


def test_big_endian_file_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("direction.1", np.ones(8, np.float32).astype(">f4"), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _expect(tmp_path / "v.gguf", "big-endian")


@pytest.mark.parametrize("version,fragment", [(0, "version 0"), (1, "version 1 is no longer"), (4, "newer")])
def test_versions_llama_cpp_does_not_read(tmp_path, version, fragment):
    data = _bytes_of(_random_cv(8, [1]), tmp_path)
    data[4:8] = version.to_bytes(4, "little")
    _expect(_write(tmp_path, data), fragment)


def test_version_2_is_read(tmp_path):
    cv = _random_cv(8, [1, 3])
    data = _bytes_of(cv, tmp_path)
    data[4:8] = (2).to_bytes(4, "little")
    assert read_control_vector(_write(tmp_path, data)).layers == [1, 3]


def test_array_of_arrays_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_array("rs_local.nested", [[1, 2], [3]])
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _expect(tmp_path / "v.gguf", "rs_local.nested is an array of arrays")


@pytest.mark.parametrize("which,fragment", [("shared", "data offset 0, llama.cpp expects 32"),
                                            ("gap", "data offset 64, llama.cpp expects 32"),
                                            ("unaligned", "data offset 36, llama.cpp expects 32")])
def test_tensor_offsets_must_be_packed_as_llama_cpp_computes_them(tmp_path, which, fragment):
    data = _bytes_of(_random_cv(8, [1, 2]), tmp_path)
    at = _info_at(data, b"direction.2") + 4 + 8 + 4  # n_dims, ne[0], type
    data[at:at + 8] = {"shared": 0, "gap": 64, "unaligned": 36}[which].to_bytes(8, "little")
    _expect(_write(tmp_path, data), fragment)


def test_f32_tensor_with_f16_sized_data_is_refused(tmp_path):
    """direction.1 is F32 [16] (64 bytes) but direction.2's offset says it was 32 bytes."""
    data = _bytes_of(_random_cv(16, [1, 2]), tmp_path)
    at = _info_at(data, b"direction.2") + 4 + 8 + 4
    data[at:at + 8] = (32).to_bytes(8, "little")
    _expect(_write(tmp_path, data), "llama.cpp expects 64")


def test_five_dimensional_tensor_is_refused(tmp_path):
    data = _bytes_of(_random_cv(8, [1]), tmp_path)
    at = _info_at(data, b"direction.1")
    data[at:at + 4] = (5).to_bytes(4, "little")
    _expect(_write(tmp_path, data), "direction.1 has 5 dimensions, llama.cpp allows at most 4")


@pytest.mark.parametrize("digits", ["٣", "３", "¹", "߃"])
def test_non_ascii_digits_are_not_a_block_index(tmp_path, digits):
    """Python's \\d matches these; llama.cpp's std::stoi does not."""
    path = _gguf_file(tmp_path / "v.gguf", {"direction.1": np.ones(4, np.float32), f"direction.{digits}": np.ones(4, np.float32)})
    _expect(path, "with N in ASCII digits")


@pytest.mark.parametrize("index,fragment", [(2**31, "past 2^31-1"), (2**31 - 1, "past any model's depth"),
                                            (10**30, "past 2^31-1")])
def test_block_indices_past_what_llama_cpp_can_hold(tmp_path, index, fragment):
    path = _gguf_file(tmp_path / "v.gguf", {f"direction.{index}": np.ones(4, np.float32)})
    _expect(path, fragment)


def test_tensor_name_with_nul_is_refused(tmp_path):
    data = _bytes_of(_random_cv(4, [1, 2]), tmp_path)
    at = data.index(b"direction.2")
    data[at:at + 11] = b"direction\x002"
    _expect(_write(tmp_path, data), "contains a NUL byte")


@pytest.mark.parametrize("value,fragment", [("[" * 1500 + "]" * 1500, "is JSON nested deeper than 64 levels"),
                                            ("1" * 5000, "holds an integer of more than 4300 digits"),
                                            ("{\"a\": [1, 2}", "is not valid JSON")], ids=["deep", "bigint", "broken"])
def test_hostile_json_metadata_is_a_one_line_error(tmp_path, value, fragment):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_string("rs_local.json.table", value)
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _expect(tmp_path / "v.gguf", f"rs_local.json.table {fragment}")


def test_lone_surrogates_and_invalid_utf8_in_metadata_become_replacement_characters(tmp_path):
    path = write_control_vector(_random_cv(4, [1], meta={"note": "ok"}), tmp_path / "v.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"rs_local.note") + len("rs_local.note") + 4 + 8  # type, length
    data[at:at + 2] = b"\xed\xa0"  # half of an encoded surrogate
    w = gguf.GGUFWriter(str(tmp_path / "j.gguf"), "controlvector")
    w.add_string("rs_local.json.x", '{"\\ud800": "a\\udfffb"}')
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert read_control_vector(_write(tmp_path, data)).metadata["note"] == "\ufffd\ufffd"
    meta = read_control_vector(tmp_path / "j.gguf").metadata
    assert meta == {"x": {"\ufffd": "a\ufffdb"}}
    json.dumps(meta).encode("utf-8")  # encodable, unlike a lone surrogate


def test_metadata_key_in_our_namespace_must_be_utf8(tmp_path):
    path = write_control_vector(_random_cv(4, [1], meta={"abc": 1}), tmp_path / "v.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"rs_local.abc")
    data[at + 9] = 0xFF
    _expect(_write(tmp_path, data), "is not valid UTF-8")


@pytest.mark.parametrize("kind", ["fifo", "dir", "devzero"])
def test_special_files_are_refused_at_once(tmp_path, kind):
    path = tmp_path / "v.gguf"
    {"fifo": lambda: os.mkfifo(path), "dir": lambda: path.mkdir(), "devzero": lambda: path.symlink_to("/dev/zero")}[kind]()
    peak, seconds = _peak_alloc(lambda: _raises_vector_error(path))
    assert seconds < 1.0
    _expect(path, "not a file" if kind == "dir" else "not a regular file")


@pytest.mark.parametrize("vtype,value,fragment", [(gguf.GGUFValueType.UINT64, 32, "is UINT64, llama.cpp needs a UINT32"),
                                                  (gguf.GGUFValueType.UINT32, 0, "0 is not a power of 2"),
                                                  (gguf.GGUFValueType.UINT32, 48, "48 is not a power of 2")])
def test_general_alignment_rules(tmp_path, vtype, value, fragment):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_key_value("general.alignment", value, vtype)
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _expect(tmp_path / "v.gguf", fragment)


def test_general_alignment_64_is_honoured_like_ggml(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_custom_alignment(64)
    w.add_tensor("direction.1", np.arange(3, dtype=np.float32))
    w.add_tensor("direction.2", np.ones(3, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    cv = read_control_vector(tmp_path / "v.gguf")
    assert cv.directions[1].tolist() == [0, 1, 2] and cv.directions[2].tolist() == [1, 1, 1]
    assert _ggml_load(tmp_path / "v.gguf")[1].tolist() == [0, 1, 2]
