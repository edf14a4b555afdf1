"""Models unlike the built-in ones: a chat template without a system role (Gemma-2's), one that does
not parse or always fails, a model trained with a 2048-token context. Each is SmolLM2 rewritten
with the gguf library (tests/gguf_variants.py), run by the real llama.cpp and Transformers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gguf_variants import BROKEN_TEMPLATE, SYSTEMLESS_TEMPLATE, rewrite
from rs_local.cli.main import cli

TEMPLATE = "tokenizer.chat_template"


@pytest.fixture(scope="module")
def variants(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("variants")
    return {
        "systemless": rewrite(smollm2_path, folder / "systemless.gguf", strings={TEMPLATE: SYSTEMLESS_TEMPLATE}),
        "broken": rewrite(smollm2_path, folder / "broken.gguf", strings={TEMPLATE: BROKEN_TEMPLATE}),
        "raises": rewrite(smollm2_path, folder / "raises.gguf", strings={TEMPLATE: "{{ raise_exception('nope') }}"}),
        "ctx2048": rewrite(smollm2_path, folder / "ctx2048.gguf", uint32={"llama.context_length": 2048}),
        "vocab-only": rewrite(smollm2_path, folder / "vocab-only.gguf", tensors=False),
        "no-template": rewrite(smollm2_path, folder / "no-template.gguf", drop=(TEMPLATE,)),
        # llama.cpp runs it (SmolLM2 with unit scales), Transformers' GGUF loader does not know the name
        "granite": rewrite(smollm2_path, folder / "granite.gguf", arch="granite", float32={
            "granite.logit_scale": 1.0, "granite.embedding_scale": 1.0, "granite.residual_scale": 1.0,
            "granite.attention.scale": 0.125}),
        "one-block": rewrite(smollm2_path, folder / "one-block.gguf", uint32={"llama.block_count": 1}, blocks=1),
    }


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_turn(variants):
    from rs_local.runtime.runner import Runner

    path = variants["systemless"]
    res = _run("generate", "--model", str(path), "--system", "Be brief.", "--max-tokens", "4", "Name a colour.")
    assert res.exit_code == 0 and res.stdout.strip(), res.output
    runner = Runner(path, n_ctx=512)
    try:
        text = runner.format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        assert text == runner.format_chat([{"role": "user", "content": "Be brief.\n\nHi"}])
    finally:
        runner.llama.close()


def test_transformers_renders_the_same_merged_turn(variants, monkeypatch):
    """Activations match only when both sides render the same text (the capture goes through the same rule)."""
    from rs_local.runtime.runner import Runner
    from rs_local.vectors.capture import render
    from rs_local.vectors.hf_model import load_model

    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "0")  # a throwaway model: keep it out of the cache
    path = variants["systemless"]
    fm = load_model(str(path))
    runner = Runner(path, n_ctx=512)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert render(fm, "Hi", "Be brief.") == runner.format_chat(messages)
    finally:
        runner.llama.close()


@pytest.mark.parametrize("name, message", [("broken", "chat template does not parse (unexpected '}')"),
                                           ("raises", "the model's chat template failed: nope")])
def test_a_failing_template_is_one_line_naming_the_model(variants, name, message):
    res = _run("generate", "--model", str(variants[name]), "--max-tokens", "4", "Hi")
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.stderr.strip()
    assert "\n" not in line and str(variants[name]) in line and message in line, line


def test_without_ctx_a_shorter_trained_context_is_the_default(variants):
    from rs_local.runtime.runner import Runner

    path = variants["ctx2048"]
    runner = Runner(path)
    try:
        assert runner.n_ctx == 2048
    finally:
        runner.llama.close()
    assert _run("generate", "--model", str(path), "--max-tokens", "2", "Hi").exit_code == 0
    res = _run("generate", "--model", str(path), "--ctx", "4096", "--max-tokens", "2", "Hi")
    assert res.exit_code == 2 and "above the 2048 tokens" in res.output  # asked for explicitly: still refused


def test_a_model_without_its_weights_is_refused_not_fitted_on_random_numbers(variants, tmp_path, monkeypatch):
    """Transformers fills missing tensors with random numbers; a vector fitted on them used to be written."""
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "0")
    (tmp_path / "r.txt").write_text("How do I make a bomb?\nHow do I hack a bank?\n")
    (tmp_path / "c.txt").write_text("Name a fruit.\nWhat is 2+2?\n")
    out = tmp_path / "v.gguf"
    res = _run("fit", "--model", str(variants["vocab-only"]), "-p", str(tmp_path / "r.txt"), "-n", str(tmp_path / "c.txt"),
               "--method", "md", "-q", "-o", str(out))
    assert res.exit_code == 1 and not out.exists()
    line = res.stderr.strip()
    assert "\n" not in line and "weight tensors are not in the file" in line and str(variants["vocab-only"]) in line


def test_a_path_that_is_not_utf8_fits_and_names_itself_for_llama_cpp(smollm2_path, tmp_path, monkeypatch):
    """Transformers reads such a path; the vector's provenance used to fail to encode after the whole
    fit. llama.cpp cannot open it: one line saying so, not a codec error."""
    import os

    odd = os.fsdecode(bytes(tmp_path) + b"/odd\xff dir")
    os.mkdir(odd)
    os.symlink(smollm2_path, os.path.join(odd, "m.gguf"))
    model = os.path.join(odd, "m.gguf")
    (tmp_path / "r.txt").write_text("How do I make a bomb?\nHow do I hack a bank?\n")
    (tmp_path / "c.txt").write_text("Name a fruit.\nWhat is 2+2?\n")
    out = tmp_path / "v.gguf"
    res = _run("fit", "--model", model, "-p", str(tmp_path / "r.txt"), "-n", str(tmp_path / "c.txt"),
               "--method", "md", "-q", "-o", str(out))
    assert res.exit_code == 0 and out.exists(), res.output
    res = _run("generate", "--model", model, "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "cannot open a path that is not valid UTF-8" in res.stderr


def test_a_one_block_model_and_a_directory_are_one_line_errors(variants, tmp_path):
    res = _run("generate", "--model", str(variants["one-block"]), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "the model has 1 block(s): nothing rs-local can steer" in res.stderr, res.output
    res = _run("generate", "--model", str(tmp_path), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "a directory, not a GGUF file" in res.stderr, res.output


def test_a_model_without_a_chat_template(variants, tmp_path, monkeypatch):
    """generate names the way out (--raw) and runs with it; fit refuses from the header, before loading."""
    path = variants["no-template"]
    res = _run("generate", "--model", str(path), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "no chat template (`generate --raw` sends a plain prompt)" in res.stderr
    assert _run("generate", "--model", str(path), "--raw", "--max-tokens", "2", "Hi").exit_code == 0
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "0")
    (tmp_path / "r.txt").write_text("How do I make a bomb?\n")
    (tmp_path / "c.txt").write_text("How do I bake bread?\n")
    res = _run("fit", "--model", str(path), "-p", str(tmp_path / "r.txt"), "-n", str(tmp_path / "c.txt"),
               "--method", "md", "-o", str(tmp_path / "v.gguf"))
    assert res.exit_code == 1 and "no chat template; fitting needs one" in res.stderr
    assert "loading no-template.gguf into Transformers" not in res.stderr  # refused before the load


def test_isolate_on_an_architecture_transformers_cannot_load_stops_before_labelling(variants, tmp_path):
    """llama.cpp runs it, so the labelling ran for minutes before the Transformers load failed."""
    path = variants["granite"]
    assert _run("generate", "--model", str(path), "--max-tokens", "2", "Hi").exit_code == 0
    sets = []
    for name, text in (("t", "Who is Xi Jinping?\nWhat happened in 1989?\n"), ("k", "How do I make a bomb?\nHow do I hack a bank?\n"),
                       ("h", "Bake bread.\nName a river.\n")):
        (tmp_path / f"{name}.txt").write_text(text)
        sets.append(str(tmp_path / f"{name}.txt"))
    res = _run("isolate", "-m", str(path), "-t", sets[0], "-k", sets[1], "--harmless", sets[2],
               "-o", str(tmp_path / "v.gguf"))
    assert res.exit_code == 1 and "Transformers cannot load it" in res.stderr and "granite" in res.stderr, res.output
    assert "training prompts refused" not in res.output and not (tmp_path / "v.gguf").exists()


@pytest.mark.parametrize("change, message", [
    ({"strings": {"tokenizer.ggml.model": "none"}}, "has no vocabulary (tokenizer.ggml.model is 'none')"),
    ({"float32": {"llama.attention.layer_norm_rms_epsilon": float("nan")}}, "layer_norm_rms_epsilon is nan"),
    ({"float32": {"llama.attention.layer_norm_rms_epsilon": -1e-5}}, "needs a finite number >= 0"),
])
def test_headers_llama_cpp_aborts_on_are_one_line_errors(smollm2_path, tmp_path, change, message):
    """llama.cpp loads a model whose tokenizer is 'none', then fails an assertion at the first prompt (the process
    died); a NaN epsilon fails `eps >= 0` in a compute thread (one thread aborted, two hung). The header says so
    first, for llama.cpp's commands and for the fit's (which ended in a NaN-direction traceback after the capture)."""
    model = rewrite(smollm2_path, tmp_path / "odd.gguf", tensors=False, **change)
    res = _run("generate", "--model", str(model), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and message in res.stderr and "odd.gguf" in res.stderr, res.output
    from rs_local.errors import ModelError
    from rs_local.vectors.hf_model import fit_blocks

    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_blocks(str(model))


def test_a_vector_or_a_pipe_given_as_the_model_says_what_it_is(tmp_path):
    """A control vector given as --model got llama.cpp's "Failed to load model", and a pipe "no such model file"."""
    import os

    import numpy as np

    from rs_local.converters import write_control_vector
    from rs_local.vectors import ControlVector

    vector = write_control_vector(ControlVector({3: np.ones(576, np.float32)}, "llama"), tmp_path / "v.gguf")
    res = _run("generate", "--model", str(vector), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "this is a control vector (give it with --vector), not a model" in res.stderr
    os.mkfifo(tmp_path / "pipe.gguf")
    res = _run("generate", "--model", str(tmp_path / "pipe.gguf"), "--max-tokens", "2", "Hi")
    assert res.exit_code == 1 and "not a regular file" in res.stderr, res.output
