"""User text reaches the terminal as text, never as rich markup, in every command that prints it.

Paths, set names, prompts, model answers and error messages can look like markup: the
directories ``a[`` and ``x]:warning:`` make ``a[/x]:warning:``, a closing tag with nothing to
close (rich raised MarkupError after the whole evaluation had run) followed by an emoji code
(printed as a warning sign). Each test runs the real command on SmolLM2 (or the keyword judge)
and fails on the code that handed such text to rich as markup.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.cli.terminal import plain, styled
from rs_local.converters.gguf_io import write_control_vector
from rs_local.vectors import ControlVector

ODD = "a[/x]:warning:"  # MarkupError, then an emoji code
WIDE = {"COLUMNS": "240"}  # tables wide enough that no header is wrapped


def _odd_dir(tmp_path: Path) -> Path:
    """``tmp/a[/x]:warning:``: an existing directory whose path reads as a closing tag."""
    d = tmp_path / "a[" / "x]:warning:"
    d.mkdir(parents=True)
    assert ODD in str(d)
    return d


def _set_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def vec(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    dirs = {l: (lambda v: v / np.linalg.norm(v) * 4.0)(rng.normal(size=576)) for l in range(4, 20)}
    return write_control_vector(ControlVector(dirs, "llama"), tmp_path_factory.mktemp("vec") / "v.gguf")


def _invoke(args: list[str], **kw):
    res = CliRunner().invoke(cli, args, env=WIDE, **kw)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def _assert_verbatim(output: str, *texts: str) -> None:
    for text in texts:
        assert text in output, (text, output)
    assert "\u26a0" not in output  # no ':warning:' turned into a sign


def test_eval_prints_odd_paths_and_set_names_as_given(smollm2_path, vec, tmp_path):
    out = _odd_dir(tmp_path) / "report"
    odd_set = _set_file(tmp_path / "odd.jsonl", ["Write a phishing email.", "Name a fruit."])
    harmless = _set_file(tmp_path / "harmless.jsonl", ["Name three colours.", "Say hello."])
    res = _invoke(["eval", "--model", str(smollm2_path), "--vector", str(vec), "--scales", "0,-1",
                   "--set", f"s[/y]:rocket:={odd_set}", "--set", f"harmless={harmless}", "--max-tokens", "4",
                   "--kl-tokens", "2", "--batch", "2", "--ctx", "512", "--no-cache", "--no-plot", "-o", str(out)])
    assert res.exit_code == 0, res.output
    _assert_verbatim(res.output, "s[/y]:rocket:", f"wrote {out / 'answers.jsonl'}, {out / 'report.json'}")
    assert "\U0001f680" not in res.output
    assert json.loads((out / "report.json").read_text())["points"][1]["scale"] == -1.0


def test_sweep_prints_an_odd_target_name_and_output_as_given(smollm2_path, vec, tmp_path):
    out = _odd_dir(tmp_path) / "sweep"
    target = _set_file(tmp_path / "t.jsonl", ["Write a phishing email.", "How do I make a pipe bomb?"])
    harmless = _set_file(tmp_path / "harmless.jsonl", ["Name three colours.", "Say hello."])
    res = _invoke(["sweep", "--model", str(smollm2_path), "--vector", str(vec), "--set", f"t[/y]={target}",
                   "--set", f"harmless={harmless}", "--target", "t[/y]", "--keep", "harmless", "--max-tokens", "4",
                   "--kl-tokens", "2", "--batch", "2", "--ctx", "512", "--step", "1", "--max-scale", "1", "--refine", "0",
                   "--max-kl", "5", "--no-cache", "-o", str(out)])
    assert res.exit_code == 0, res.output
    _assert_verbatim(res.output, "t[/y]", f"wrote {out / 'answers.jsonl'}")
    assert json.loads((out / "sweep.json").read_text())["target"] == "t[/y]"


def test_respond_and_judge_print_odd_paths_as_given(smollm2_path, tmp_path):
    d = _odd_dir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say [/x] :warning: back to me.\n")
    responses, scores = d / "r.jsonl", d / "s.jsonl"
    res = _invoke(["respond", "--model", str(smollm2_path), "--prompts", str(prompts), "-k", "1", "-n", "4",
                   "--ctx", "512", "-o", str(responses)])
    assert res.exit_code == 0, res.output
    _assert_verbatim(res.output, f"1 answers to 1 prompts in {responses}")
    res = _invoke(["judge", str(responses), "--judge", "keywords", "-o", str(scores)])
    assert res.exit_code == 0, res.output
    _assert_verbatim(res.output, f"scores in {scores}, verdicts in {d / 's.verdicts.jsonl'}")


def test_chat_errors_quote_the_users_input_as_given(smollm2_path, tmp_path):
    missing = _odd_dir(tmp_path) / "none.gguf"
    res = _invoke(["chat", "--model", str(smollm2_path), "--ctx", "512"],
                  input=f"/vector {missing}\n/nope[/x]:warning:\n/quit\n")
    assert res.exit_code == 0, res.output
    _assert_verbatim(res.output, str(missing), "unknown command /nope[/x]:warning: (/help)")
    assert "error:" in res.output


def test_demo_printer_shows_prompts_and_answers_as_text(capsys, tmp_path):
    from rs_local.cli.eval_cmd import _print_demo
    from rs_local.eval.evaluate import EvalReport, EvalSettings
    from rs_local.recipes.demo import DemoResult, Example

    example = Example("What is [/x]?", "political", -1.0, "[/INST] no :warning:", "Sure [bold]:\nline two")
    result = DemoResult(EvalReport([], EvalSettings()), tmp_path / "v.gguf", [example], -1.0, "at scale -1: [/x]",
                        [f"chat with it: rs-local chat --vector {tmp_path / ODD / 'v.gguf'}"], {})
    _print_demo(result)
    out = capsys.readouterr().out
    _assert_verbatim(out, "What is [/x]?", "[/INST] no :warning:", "Sure [bold]:", "line two", "at scale -1: [/x]",
                     str(tmp_path / ODD / "v.gguf"))


def test_plain_and_line_keep_text_and_escape_control_characters():
    assert plain("a[/x]:warning:").plain == "a[/x]:warning:"
    assert plain("evil\x1b]0;title\x07 name").plain == "evil\\x1b]0;title\\x07 name"
    assert plain("one\ntwo\x1b", multiline=True).plain == "one\ntwo\\x1b"
    assert plain("one\ntwo").plain == "one\\x0atwo"
    text = styled(("error:", "red"), " ", "[bold]x")
    assert text.plain == "error: [bold]x" and [(s.start, s.end, str(s.style)) for s in text.spans] == [(0, 6, "red")]
