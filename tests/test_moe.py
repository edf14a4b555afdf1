"""Mixture-of-Experts end to end on a tiny seeded Qwen3-MoE GGUF (see tests/moe_model.py).

The same file is loaded by llama.cpp (the Runner) and by Transformers (the fitting loader):
block outputs agree block by block, ``rs-local fit`` writes a vector that changes llama.cpp's
greedy text at scale 4 and leaves it alone at 0 (an architecture that silently ignored
control vectors would fail here), a dense model's vector is refused with one line, and
``rs-local experts`` reports routing differences as a table and JSON (and refuses a dense model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_io import read_control_vector, write_control_vector
from rs_local.errors import VectorFileError
from rs_local.vectors.control_vector import ControlVector

pytest.importorskip("torch")

from conftest import MOE_ANSWERED, MOE_REFUSED  # noqa: E402  (tests/ is on sys.path under pytest)
from moe_model import TinyMoE  # noqa: E402

SPEC = TinyMoE()
PROMPT = "Tell me about the sea."


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def runner(tiny_moe):
    from rs_local.runtime.runner import Runner

    return Runner(tiny_moe, n_ctx=512, n_threads=2)


def invoke(args: list[str], home: Path):
    return CliRunner().invoke(cli, args, env={"RS_LOCAL_HOME": str(home)}, catch_exceptions=False)


def test_both_runtimes_read_the_tiny_moe(runner, tiny_moe):
    from rs_local.vectors.hf_model import load_model

    fm = load_model(str(tiny_moe))
    assert (runner.n_embd, runner.n_layer, runner.n_expert, runner.model_hint) == (SPEC.n_embd, SPEC.n_layer, SPEC.n_expert, "qwen3moe")
    assert (fm.n_embd, fm.n_layer, fm.model_hint) == (SPEC.n_embd, SPEC.n_layer, "qwen3_moe")
    assert fm.model.config.moe_intermediate_size == SPEC.n_ff_exp  # not Transformers' default 768


def test_llama_cpp_block_outputs_match_transformers_on_moe(runner, tiny_moe):
    """Block N of llama.cpp (``l_out-N``) correlates best with Transformers' block N, as on dense models."""
    from rs_local.runtime.activations import BlockReader
    from rs_local.vectors.capture import capture
    from rs_local.vectors.hf_model import load_model

    prompts = MOE_REFUSED + MOE_ANSWERED
    with BlockReader(runner, range(SPEC.n_layer), n_ctx=512) as reader:
        rows = [reader.read([{"role": "user", "content": p}]) for p in prompts]
    ll = {b: np.stack([r[b] for r in rows]) for b in range(SPEC.n_layer)}
    hf = capture(load_model(str(tiny_moe)), prompts, keep_raw=True)
    for b in range(SPEC.n_layer):
        same = _corr(ll[b], hf.layer(b))
        neighbours = [_corr(ll[b], hf.layer(n)) for n in (b - 1, b + 1) if 0 <= n < SPEC.n_layer]
        assert same > 0.99 and same > max(neighbours) + 0.05, (b, same, neighbours)


def test_fit_export_apply_changes_moe_output(tiny_moe, moe_sets, tmp_path):
    vec = tmp_path / "moe.gguf"
    res = invoke(["fit", "-m", str(tiny_moe), "-p", str(moe_sets["refused"]), "-n", str(moe_sets["answered"]), "--method", "md",
                  "--layers", "1-3", "--holdout", "0", "--no-cache", "--quiet", "-o", str(vec)], tmp_path)
    assert res.exit_code == 0, res.output
    cv = read_control_vector(vec)
    assert cv.layers == [1, 2, 3] and cv.n_embd == SPEC.n_embd and cv.model_hint == "qwen3_moe"

    def greedy(*extra: str) -> str:
        out = invoke(["generate", PROMPT, "-m", str(tiny_moe), "-n", "16", "--ctx", "512", "--json", "--threads", "2", *extra], tmp_path)
        assert out.exit_code == 0, out.output
        return json.loads(out.output)["text"]

    plain = greedy()
    assert greedy("--vector", f"{vec}:0") == plain
    assert greedy("--vector", f"{vec}:4") != plain


def test_dense_vector_on_moe_model_is_one_clear_line(runner, smollm2_path, tmp_path):
    wide = ControlVector({5: np.ones(576, dtype=np.float32)}, "llama")  # SmolLM2's width and depth
    write_control_vector(wide, tmp_path / "smollm2.gguf")
    res = invoke(["generate", PROMPT, "-m", str(runner.path), "--vector", f"{tmp_path / 'smollm2.gguf'}:1", "-n", "2", "--ctx", "512"], tmp_path)
    assert res.exit_code == 1 and "n_embd 576" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1

    same_shape = ControlVector({2: np.ones(SPEC.n_embd, dtype=np.float32)}, "llama")  # fits, but made for a dense model
    with pytest.raises(VectorFileError, match="dense model .'llama'.*qwen3moe.*4 experts"):
        runner.set_vectors([(same_shape, 1.0)])
    moe_vec = ControlVector({2: np.ones(SPEC.n_embd, dtype=np.float32)}, "qwen3_moe")
    runner.set_vectors([(moe_vec, 1.0)])  # the Transformers spelling of the same architecture is accepted
    runner.clear_vectors()


def test_policy_fit_gives_the_same_dense_vector_error(runner, tmp_path):
    """``policy fit --vector`` checks the dense / MoE divide up front, with the runner's own message."""
    dense = tmp_path / "dense.gguf"
    write_control_vector(ControlVector({2: np.ones(SPEC.n_embd, dtype=np.float32)}, "llama"), dense)
    with pytest.raises(VectorFileError) as applied:
        runner.check_vector(read_control_vector(dense))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(MOE_REFUSED) + "\n")
    b.write_text("\n".join(MOE_ANSWERED) + "\n")
    res = invoke(["policy", "fit", "--category", f"bad={a}:remove", "--category", f"good={b}:keep", "--vector", f"bad={dense}",
                  "--no-check-refusals", "--model", str(runner.path), "--ctx", "512", "-o", str(tmp_path / "pol.gguf")], tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.strip().endswith(str(applied.value)) and "dense model ('llama')" in res.output
    assert not (tmp_path / "pol.gguf").exists()


def test_serve_refuses_a_dense_vector_at_start_with_the_same_line(runner, tmp_path):
    """``serve --vector`` checks the dense / MoE divide when it loads the vector, not on the first request."""
    pytest.importorskip("fastapi")
    from rs_local.serve.app import build_service

    dense = tmp_path / "dense.gguf"
    write_control_vector(ControlVector({2: np.ones(SPEC.n_embd, dtype=np.float32)}, "llama"), dense)
    with pytest.raises(VectorFileError) as applied:
        runner.check_vector(read_control_vector(dense), dense)
    with pytest.raises(VectorFileError) as served:
        build_service(runner, "tiny-moe", vector_specs=(f"dense={dense}",))
    assert str(served.value) == str(applied.value) and "dense model ('llama')" in str(served.value)


def test_moe_vector_on_dense_model_is_refused():
    from rs_local.converters.moe_arch import vector_arch_problem

    assert "Mixture-of-Experts model ('qwen3_moe')" in vector_arch_problem("qwen3_moe", "llama", 0)
    assert vector_arch_problem("mistral", "llama", 0) is None  # free-text hints of the same kind pass
    assert vector_arch_problem("", "qwen3moe", 4) is None


def test_experts_report(tiny_moe, moe_sets, tmp_path, smollm2_path):
    report, plot = tmp_path / "experts.json", tmp_path / "experts.png"
    args = ["experts", "-m", str(tiny_moe), "-r", str(moe_sets["refused"]), "-a", str(moe_sets["answered"]), "--top", "2"]
    res = invoke(args + ["-o", str(report), "--plot", str(plot)], tmp_path)
    assert res.exit_code == 0, res.output
    assert "Cohen's d" in res.output and plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(report.read_text())
    assert data["n_experts"] == SPEC.n_expert and data["top_k"] == SPEC.n_expert_used
    assert [b["block"] for b in data["blocks"]] == list(range(SPEC.n_layer))
    d = np.array(data["cohen_d"])
    for block in data["blocks"]:
        assert len(block["top"]) == 2
        assert abs(block["top"][0]["cohen_d"]) == pytest.approx(np.abs(d[block["block"]]).max(), abs=1e-3)
        for row in block["top"]:
            assert row["prob_diff"] == pytest.approx(row["mean_prob_refused"] - row["mean_prob_answered"])
    assert invoke(args + ["-o", str(report)], tmp_path).exit_code == 1  # exists: needs --force

    dense = invoke(["experts", "-m", str(smollm2_path), "-r", str(moe_sets["refused"]), "-a", str(moe_sets["answered"])], tmp_path)
    assert dense.exit_code == 1 and "dense model" in dense.output and len(dense.output.strip().splitlines()) == 1


def test_cohen_d_and_header_reader(tiny_moe, tmp_path):
    from rs_local.converters.gguf_header import gguf_scalars
    from rs_local.errors import ModelError
    from rs_local.vectors.experts import cohen_d

    a, b = np.array([[1.0, 5.0], [3.0, 5.0]]), np.array([[0.0, 5.0], [2.0, 5.0]])
    np.testing.assert_allclose(cohen_d(a, b), [1.0 / np.sqrt(2.0), 0.0])  # constant expert: 0, not inf
    meta = gguf_scalars(tiny_moe)
    assert meta["qwen3moe.expert_feed_forward_length"] == SPEC.n_ff_exp and meta["qwen3moe.expert_count"] == SPEC.n_expert
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_moe.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cut.gguf: GGUF header is truncated"):
        gguf_scalars(cut)
