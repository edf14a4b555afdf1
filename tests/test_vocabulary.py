"""One meaning of --scale and PATH:SCALE in every command (issue 11): --scale multiplies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_io import write_control_vector
from rs_local.runtime.session import ChatSession
from rs_local.vectors import ControlVector


@pytest.fixture(scope="module")
def vec(tmp_path_factory):
    rng = np.random.default_rng(3)
    dirs = {l: (lambda v: v / np.linalg.norm(v) * 6.0)(rng.normal(size=576)) for l in range(4, 20)}
    return write_control_vector(ControlVector(dirs, "llama"), tmp_path_factory.mktemp("v") / "v.gguf")


def _generate(model, *extra):
    res = CliRunner().invoke(cli, ["generate", "Name a fruit.", "--model", str(model), "-n", "12", "--ctx", "256",
                                   "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_scale_multiplies_explicit_vector_scales_in_generate(smollm2_path, vec):
    combined = _generate(smollm2_path, "--vector", f"{vec}:0.5", "--scale", "-2")
    assert combined["vectors"] == [{"path": str(vec), "scale": -1.0}]
    direct = _generate(smollm2_path, "--vector", f"{vec}:-1")
    assert combined["text"] == direct["text"]
    assert _generate(smollm2_path, "--vector", f"{vec}:0.5", "--scale", "0")["text"] == _generate(smollm2_path)["text"]


def test_chat_session_uses_the_same_rule(smollm2_path, vec):
    from rs_local.cli.options import load_vectors
    from rs_local.runtime.runner import Runner

    parts, _ = load_vectors((f"{vec}:0.5",), 1.0, None)
    assert [s for _, s in parts] == [0.5]
    session = ChatSession(Runner(smollm2_path, n_ctx=256), vectors=parts, scale=-2.0, max_tokens=12)
    session.apply()
    assert [s for _, s in session.runner.vectors] == [-1.0]
    scaled, _ = load_vectors((f"{vec}:0.5",), -2.0, None)  # what generate and respond pass
    assert [s for _, s in scaled] == [-1.0]
