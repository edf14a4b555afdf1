"""repeng dicts, .npz and .safetensors: exact round trips, suffix dispatch, one-line errors."""

from __future__ import annotations

import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from rs_local.converters import (
    describe,
    from_repeng,
    load_npz,
    load_vector,
    read_control_vector,
    save_vector,
    to_repeng_dict,
)
from rs_local.errors import FileProblem, RsLocalError, VectorFileError
from rs_local.vectors.control_vector import ControlVector

META = {"method": "md", "layers": [3, 5], "scale": -0.5, "ok": True}


@pytest.fixture
def cv() -> ControlVector:
    rng = np.random.default_rng(3)
    return ControlVector({k: rng.standard_normal(96).astype(np.float32) for k in (3, 5, 11)}, "qwen2", dict(META))


def _same(a: ControlVector, b: ControlVector, *, meta: bool = True) -> None:
    assert a.layers == b.layers
    assert all(np.array_equal(a.directions[k], b.directions[k]) for k in a.layers)
    assert a.model_hint == b.model_hint
    if meta:
        assert a.metadata == b.metadata


@pytest.mark.parametrize("suffix", [".gguf", ".npz", ".safetensors"])
def test_round_trip_each_format(tmp_path, cv, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = save_vector(cv, tmp_path / f"v{suffix}")
    _same(load_vector(path), cv)


def test_chain_of_conversions_is_lossless(tmp_path, cv):
    pytest.importorskip("safetensors")
    a = save_vector(cv, tmp_path / "a.gguf")
    b = save_vector(load_vector(a), tmp_path / "b.npz")
    c = save_vector(load_vector(b), tmp_path / "c.safetensors")
    d = save_vector(load_vector(c), tmp_path / "d.gguf")
    _same(read_control_vector(d), cv)


def test_npz_uses_layer_keys(tmp_path, cv):
    path = save_vector(cv, tmp_path / "v.npz")
    with np.load(path) as npz:
        assert {"layer_3", "layer_5", "layer_11"} <= set(npz.files)
        assert np.array_equal(npz["layer_5"], cv.directions[5])


def test_hand_made_npz_without_hint_or_metadata(tmp_path):
    path = tmp_path / "hand.npz"
    np.savez(path, layer_2=np.arange(4, dtype=np.float64), other=np.zeros(3))
    back = load_npz(path)
    assert back.layers == [2] and back.model_hint == "" and back.metadata == {}
    assert back.directions[2].dtype == np.float32


def test_safetensors_uses_direction_names(tmp_path, cv):
    st = pytest.importorskip("safetensors.numpy")
    path = save_vector(cv, tmp_path / "v.safetensors")
    assert set(st.load_file(str(path))) == {"direction.3", "direction.5", "direction.11"}


def test_repeng_dict_and_object(cv):
    d = to_repeng_dict(cv)
    assert d["model_type"] == "qwen2" and sorted(d["directions"]) == [3, 5, 11]
    _same(from_repeng(d), cv, meta=False)
    obj = SimpleNamespace(model_type="llama", directions={np.int64(4): [1.0, 2.0]})  # like repeng's dataclass
    back = from_repeng(obj, metadata={"source": "repeng"})
    assert back.layers == [4] and back.model_hint == "llama" and back.metadata == {"source": "repeng"}
    with pytest.raises(RsLocalError):
        from_repeng({"model_type": "llama"})


def test_describe(cv):
    info = describe(cv)
    assert info["n_embd"] == 96 and info["layer_count"] == 3 and info["model_hint"] == "qwen2"
    assert [row["block"] for row in info["layers"]] == [3, 5, 11]
    assert info["layers"][0]["norm"] == pytest.approx(float(np.linalg.norm(cv.directions[3])))
    assert info["metadata"] == META


def test_save_refuses_overwrite_in_every_format(tmp_path, cv):
    for suffix in (".npz", ".safetensors"):
        path = tmp_path / f"v{suffix}"
        path.write_bytes(b"keep me")
        with pytest.raises(FileProblem, match="already exists"):
            save_vector(cv, path)
        assert path.read_bytes() == b"keep me"
    save_vector(cv, tmp_path / "v.npz", force=True)
    _same(load_vector(tmp_path / "v.npz"), cv)


def _expect(path, fragment):
    with pytest.raises(VectorFileError) as info:
        load_vector(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_suffix(tmp_path, cv):
    _expect(tmp_path / "v.pt", "unknown vector format '.pt'")
    with pytest.raises(VectorFileError, match="unknown vector format"):
        save_vector(cv, tmp_path / "v.json")
    assert list(tmp_path.iterdir()) == []


def test_bad_npz_files(tmp_path):
    _expect(tmp_path / "absent.npz", "file not found")
    (tmp_path / "junk.npz").write_text("not a zip")
    _expect(tmp_path / "junk.npz", "not a readable .npz file")
    np.savez(tmp_path / "none.npz", weights=np.zeros(3))
    _expect(tmp_path / "none.npz", "no layer_N arrays")
    np.savez(tmp_path / "zero.npz", layer_0=np.zeros(3))
    _expect(tmp_path / "zero.npz", "block 0 cannot be steered")
    np.savez(tmp_path / "ragged.npz", layer_1=np.zeros(3), layer_2=np.zeros(4))
    _expect(tmp_path / "ragged.npz", "has 4 values, expected 3")
    np.savez(tmp_path / "matrix.npz", layer_1=np.zeros((2, 3)))
    _expect(tmp_path / "matrix.npz", "layer 1 has shape [2, 3], expected a 1-D direction")
    np.savez(tmp_path / "row.npz", layer_1=np.ones((1, 3)))
    assert load_vector(tmp_path / "row.npz").n_embd == 3
    np.savez(tmp_path / "nan.npz", layer_1=np.array([0.0, np.nan]))
    _expect(tmp_path / "nan.npz", "NaN or Inf")
    np.savez(tmp_path / "meta.npz", layer_1=np.zeros(2), metadata=np.array("{oops"))
    _expect(tmp_path / "meta.npz", "metadata is not valid JSON")
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as zf:  # object arrays need pickle: refused
        zf.writestr("layer_1.npy", b"\x93NUMPY garbage")
    _expect(tmp_path / "pickled.npz", "not a readable .npz file")


def test_bad_safetensors_files(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    _expect(tmp_path / "junk.safetensors", "not a readable .safetensors file")
    st.save_file({"blk.1.weight": np.zeros(3, np.float32)}, str(tmp_path / "names.safetensors"))
    _expect(tmp_path / "names.safetensors", "'blk.1.weight' is not named direction.N")
