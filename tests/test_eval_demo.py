"""`rs-local demo` end to end on SmolLM2 with tiny sizes: fit, vector file, report, examples."""

from __future__ import annotations

import json

from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_io import read_control_vector
from rs_local.recipes.demo import DemoOptions, run_demo
from rs_local.recipes.isolate import Recipe


def test_run_demo_small(tmp_path):
    # SmolLM2 refuses too little for the gradient recipe (it needs refused prompts); the md recipe runs the same flow.
    opts = DemoOptions(model="smollm2-135m", output=tmp_path / "demo", n_fit=6, n_eval=4, scales=[0.0, -1.0],
                       max_tokens=8, batch=2, n_ctx=512, recipe=Recipe(method="md"))
    res = run_demo(opts)
    vec = read_control_vector(res.vector_path)
    assert vec.n_embd == 576 and vec.layers == list(range(8, 17))
    assert "orthogonalised" in vec.metadata.get("recipe", "")
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [p["scale"] for p in report["points"]] == [0.0, -1.0]
    assert set(report["points"][0]["sets"]) == {"political", "harmful", "harmless"}
    assert all(s["n"] == 4 for s in report["points"][0]["sets"].values())
    assert (tmp_path / "demo" / "refusal_vs_scale.png").exists()
    # never the plain model: within the limits -1 wins, and if it breaks them the demo still shows
    # the mildest steered scale (a demo that chose 0 would show nothing)
    assert res.chosen_scale == -1.0
    assert "refusal" in res.summary and res.next_steps
    for ex in res.examples:
        assert ex.before and ex.prompt


def test_demo_refuses_an_existing_output(tmp_path):
    (tmp_path / "d").mkdir()
    res = CliRunner().invoke(cli, ["demo", "--model", "smollm2-135m", "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and "exists" in res.output


def test_a_failed_demo_leaves_no_directory_it_made(tmp_path):
    """An error (or Ctrl-C, SIGTERM) after the directory was made used to leave it empty or half-filled,
    and the same command then refused to run without --force."""
    import pytest

    from rs_local.errors import RsLocalError

    opts = DemoOptions(model="smollm2-135m", output=tmp_path / "demo", judge=str(tmp_path / "no-judge.gguf"), n_ctx=512)
    with pytest.raises(RsLocalError):
        run_demo(opts)
    assert not (tmp_path / "demo").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    opts = DemoOptions(model="smollm2-135m", output=tmp_path / "mine", judge=str(tmp_path / "no-judge.gguf"),
                       n_ctx=512, force=True)
    with pytest.raises(RsLocalError):
        run_demo(opts)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"  # the user's own directory stays
