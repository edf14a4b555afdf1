"""``fit --routing``: blocks chosen from an ``rs-local experts`` report, on the tiny seeded Qwen3-MoE.

The real report of the tiny model feeds ``fit`` end to end (the blocks written are the report's
top-K by max |d|, recomputed here from its matrix, and the GGUF holds ``direction.N`` only
there); a hand-written report whose top blocks are not a contiguous band checks the rule
against an answer known in advance; reports made for another model, malformed ones and
impossible K are each one line naming the file, exit 1, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_io import read_control_vector

pytest.importorskip("torch")

from moe_model import TinyMoE  # noqa: E402  (tests/ is on sys.path under pytest)

SPEC = TinyMoE()


def invoke(args: list[str], home: Path):
    return CliRunner().invoke(cli, args, env={"RS_LOCAL_HOME": str(home)}, catch_exceptions=False)


def fit_args(model: Path, moe_sets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["fit", "-m", str(model), "-p", str(moe_sets["refused"]), "-n", str(moe_sets["answered"]), "--method", "md",
            "--holdout", "0", "--no-cache", "--quiet", "-o", str(out), *extra]


def report(path: Path, rows: list[list[float]], **extra) -> Path:
    """A report in the experts command's layout: one ``cohen_d`` row per MoE block."""
    data = {"arch": "qwen3_moe", "n_layer": SPEC.n_layer, "blocks": [{"block": b} for b in range(len(rows))],
            "cohen_d": rows} | extra
    path.write_text(json.dumps(data))
    return path


def gguf_tensor_names(path: Path) -> list[str]:
    import gguf

    return sorted(t.name for t in gguf.GGUFReader(str(path)).tensors)


def one_line_error(res, name: str) -> str:
    text = res.output.strip()
    assert res.exit_code == 1 and "Traceback" not in text and len(text.splitlines()) == 1 and name in text, text
    return text


def test_fit_uses_the_top_blocks_of_a_real_experts_report(tiny_moe, moe_sets, tmp_path):
    routing = tmp_path / "routing.json"
    res = invoke(["experts", "-m", str(tiny_moe), "-r", str(moe_sets["refused"]), "-a", str(moe_sets["answered"]), "-o", str(routing)], tmp_path)
    assert res.exit_code == 0, res.output
    data = json.loads(routing.read_text())
    assert data["n_layer"] == SPEC.n_layer
    strength = np.abs(np.array(data["cohen_d"])).max(axis=1)  # per block, blocks 0..3
    expected = sorted(sorted(range(1, SPEC.n_layer), key=lambda b: (-strength[b], b))[:2])

    vec = tmp_path / "routed.gguf"
    res = invoke(fit_args(tiny_moe, moe_sets, vec, "--routing", str(routing), "--routing-top", "2"), tmp_path)
    assert res.exit_code == 0, res.output
    cv = read_control_vector(vec)
    assert cv.layers == expected
    assert gguf_tensor_names(vec) == [f"direction.{b}" for b in expected]
    meta = cv.metadata
    assert meta["layer_rule"] == "routing" and meta["routing_report"] == str(routing) and meta["routing_top"] == 2
    assert meta["routing_blocks"] == ",".join(map(str, expected)) and meta["layers"] == meta["routing_blocks"]
    assert meta["routing_strength"][str(expected[0])] == pytest.approx(strength[expected[0]], abs=1e-3)

    shown = invoke(["layers", str(vec)], tmp_path)
    assert shown.exit_code == 0 and "chosen by routing (top 2" in shown.output, shown.output


def test_fit_follows_a_report_whose_top_blocks_are_not_a_band(tiny_moe, moe_sets, tmp_path):
    """Blocks 1 and 3 route most differently; block 0 is strongest but cannot be steered."""
    routing = report(tmp_path / "r.json", [[9.0, 0.0, 0, 0], [0.1, -2.5, 0, 0], [0.2, 0.3, 0, 0], [0, 0, -1.5, 0.4]])
    vec = tmp_path / "v.gguf"
    res = invoke(fit_args(tiny_moe, moe_sets, vec, "--routing", str(routing), "--routing-top", "2"), tmp_path)
    assert res.exit_code == 0, res.output
    assert read_control_vector(vec).layers == [1, 3]
    assert gguf_tensor_names(vec) == ["direction.1", "direction.3"]


def test_reports_for_another_model_are_refused(tiny_moe, smollm2_path, moe_sets, tmp_path):
    rows = [[0.5, 0.1, 0, 0]] * SPEC.n_layer
    deeper = report(tmp_path / "deeper.json", rows + [[1.0, 0, 0, 0]] * 4, n_layer=8)
    text = one_line_error(invoke(fit_args(tiny_moe, moe_sets, tmp_path / "a.gguf", "--routing", str(deeper)), tmp_path), "deeper.json")
    assert "8 blocks" in text and f"has {SPEC.n_layer}" in text
    other = report(tmp_path / "other.json", rows, arch="qwen2_moe")
    assert "'qwen2_moe'" in one_line_error(invoke(fit_args(tiny_moe, moe_sets, tmp_path / "b.gguf", "--routing", str(other)), tmp_path), "other.json")
    moe = report(tmp_path / "moe.json", rows)  # an MoE report on the dense SmolLM2: caught from the header, before loading
    text = one_line_error(invoke(fit_args(smollm2_path, moe_sets, tmp_path / "c.gguf", "--routing", str(moe)), tmp_path), "moe.json")
    assert "'qwen3_moe' model, this model is 'llama'" in text
    assert not any(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("body, problem", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "not an `rs-local experts` report"),
    ('{"blocks": [{"block": 0}], "cohen_d": [[0.1, "x"]]}', "not a finite number"),
    ('{"blocks": [{"block": 0}, {"block": 1}], "cohen_d": [[0.1]]}', "one row per block"),
    ('{"blocks": [{"block": 0}, {"block": 0}], "cohen_d": [[0.1], [0.2]]}', "listed twice"),
    ('{"blocks": [{"block": -1}], "cohen_d": [[0.1]]}', "block index"),
    ('{"blocks": [{"block": 5}], "cohen_d": [[0.1]], "n_layer": 4}', "'n_layer' 4"),
])
def test_malformed_report_is_one_line(tiny_moe, moe_sets, tmp_path, body, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(body)
    text = one_line_error(invoke(fit_args(tiny_moe, moe_sets, tmp_path / "v.gguf", "--routing", str(bad)), tmp_path), "bad.json")
    assert problem in text


def test_routing_options_that_cannot_work(tiny_moe, moe_sets, tmp_path):
    routing = report(tmp_path / "r.json", [[0.1, 0.2, 0, 0]] * SPEC.n_layer)
    text = one_line_error(invoke(fit_args(tiny_moe, moe_sets, tmp_path / "v.gguf", "--routing", str(routing), "--routing-top", "4"), tmp_path), "r.json")
    assert "3 steerable MoE block(s) (1, 2, 3)" in text  # block 0 cannot be steered
    both = invoke(fit_args(tiny_moe, moe_sets, tmp_path / "v.gguf", "--routing", str(routing), "--layers", "1-2"), tmp_path)
    assert both.exit_code == 2 and "not both" in both.output
    alone = invoke(fit_args(tiny_moe, moe_sets, tmp_path / "v.gguf", "--routing-top", "2"), tmp_path)
    assert alone.exit_code == 2 and "--routing-top needs --routing" in alone.output


def test_choose_blocks_rule(tmp_path):
    from rs_local.vectors.routing_blocks import RoutingReport, RoutingReportError, check_model, choose_blocks

    rep = RoutingReport(tmp_path / "r.json", "qwen3_moe", None, {0: 5.0, 1: 1.0, 2: 2.0, 3: 1.0, 5: 2.0})
    assert choose_blocks(rep, 1) == [2]  # tie with block 5: the lower block wins
    assert choose_blocks(rep, 3) == [1, 2, 5]  # tie 1/3 at 1.0: block 1
    check_model(rep, "qwen3moe", 6)  # GGUF spelling of the same architecture
    with pytest.raises(RoutingReportError, match="names block 5, this model has 4 blocks"):
        check_model(rep, "qwen3_moe", 4)  # a report without n_layer still cannot name a missing block
