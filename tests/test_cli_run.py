"""`rs-local generate`, `chat` and `models` through click's runner, on the real SmolLM2 model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_io import write_control_vector
from rs_local.vectors import ControlVector


def vector_file(path, n_embd=576, layers=range(4, 20), norm=6.0, seed=1):
    rng = np.random.default_rng(seed)
    dirs = {l: (lambda v: v / np.linalg.norm(v) * norm)(rng.normal(size=n_embd)) for l in layers}
    return write_control_vector(ControlVector(dirs, "llama"), path)


def run(*args, input=None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def vec(tmp_path_factory):
    return vector_file(tmp_path_factory.mktemp("v") / "v.gguf")


def gen_json(model, *extra):
    res = run("generate", "Name a fruit.", "--model", str(model), "-n", "12", "--ctx", "256", "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_generate_json_plain_scaled_and_layer_range(smollm2_path, vec):
    plain = gen_json(smollm2_path)
    assert plain["text"] and 0 < plain["tokens"] <= 12 and plain["vectors"] == []
    steered = gen_json(smollm2_path, "--vector", f"{vec}:1.0")
    assert steered["text"] != plain["text"]
    assert steered["vectors"] == [{"path": str(vec), "scale": 1.0}]
    assert gen_json(smollm2_path, "--vector", str(vec), "--scale", "0")["text"] == plain["text"]
    # llama.cpp spelling; a range that selects none of the vector's blocks would steer nothing: an error, before loading
    res = run("generate", "Name a fruit.", "--model", str(smollm2_path), "--control-vector", str(vec),
              "--control-vector-layer-range", "21-29")
    assert res.exit_code == 1 and "selects none of them" in res.output and "Traceback" not in res.output
    part = gen_json(smollm2_path, "--control-vector", str(vec), "--control-vector-layer-range", "4-5")
    assert part["layers"] == [4, 5]


def test_generate_streams_text(smollm2_path):
    res = run("generate", "Name a fruit.", "--model", str(smollm2_path), "-n", "8", "--ctx", "256")
    assert res.exit_code == 0 and res.output.strip()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.gguf", "missing.gguf"),
        (lambda d: (d / "junk.gguf").write_bytes(b"not a gguf at all") and d / "junk.gguf", "junk.gguf"),
        (lambda d: vector_file(d / "wide.gguf", n_embd=896), "896"),
        (lambda d: vector_file(d / "huge.gguf", norm=5e31), "direction.4 has values up to"),  # an empty answer, exit 0, before
    ],
)
def test_generate_bad_vector_is_one_line_error(smollm2_path, tmp_path, make, message):
    path = make(tmp_path)
    res = CliRunner().invoke(cli, ["generate", "hi", "--model", str(smollm2_path), "--vector", str(path)])
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_generate_bad_model_and_usage_errors(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(cli, ["generate", "hi", "--model", str(bad)])
    assert res.exit_code == 1 and "not a GGUF" in res.output
    res = CliRunner().invoke(cli, ["generate", "hi", "--model", "gpt-9"])
    assert res.exit_code == 1 and "unknown model 'gpt-9'" in res.output
    res = CliRunner().invoke(cli, ["generate", "hi", "--layers", "x-y"])
    assert res.exit_code == 1 and "bad layer range" in res.output
    res = CliRunner().invoke(cli, ["generate", "hi", "--temperature", "-1"])
    assert res.exit_code == 2
    for option in (["--layers", "8-16"], ["--scale", "-1"]):  # taken and ignored, exit 0, before
        res = CliRunner().invoke(cli, ["generate", "hi", "--model", "gpt-9", *option])
        assert res.exit_code == 2 and f"{option[0]} applies to a --vector; none was given" in res.output


def test_chat_repl_commands(smollm2_path, vec):
    script = "\n".join([
        "Name a fruit.",
        "/scale 0",
        "/vector nowhere.gguf",
        "/vector off",
        "/system You are terse.",
        "/bogus",
        "/help",
        "Name a fruit.",
        "/quit",
    ]) + "\n"
    res = run("chat", "--model", str(smollm2_path), "--vector", str(vec), "-n", "8", "--ctx", "256", input=script)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "steering with" in out and "no vector" in out
    assert "nowhere.gguf" in out and "error" in out  # a bad /vector does not end the session
    assert "unknown command /bogus" in out and "/scale X" in out


def test_chat_ends_on_eof(smollm2_path):
    res = run("chat", "--model", str(smollm2_path), "-n", "4", "--ctx", "256", input="Hi\n")
    assert res.exit_code == 0


def test_chat_survives_bad_turns(smollm2_path, vec):
    """A line that is not UTF-8, a /vector the session's --layers misses and a message too long for the
    context are each an error line; the session goes on, and the failed turn is not kept."""
    import subprocess
    import sys

    long = b"word " * 300 + b"\n"
    script = (b"hi\xff\xfe there\n/vector " + str(vec).encode() + b"\n" + long + b"Name a fruit.\n" + long
              + b"Name a colour.\n/quit\n")
    proc = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "chat", "--model", str(smollm2_path), "-n", "6",
                           "--ctx", "256", "--layers", "25-29"], input=script, capture_output=True, timeout=120)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in out + proc.stderr.decode("utf-8", "replace"), out
    assert "the line is not valid UTF-8 text" in out
    assert "--layers 25-29 selects none" in out and "steering with" not in out
    assert "the context holds 256" in out
    first, second = [line for line in out.splitlines() if "the context holds 256" in line]
    assert "error:" in first and first.endswith("(use --ctx)")  # nothing to /reset yet: no such hint
    assert "error:" in second and second.endswith("(/reset starts over)")  # one line, not wrapped at 80 columns
    answers = [line for line in out.splitlines() if line.startswith("> ") and "error" not in line and line[2:].strip()]
    assert len(answers) >= 2, out  # both questions answered: the too-long turns did not fill the history


def test_chat_skips_a_piped_line_longer_than_the_context_could_hold(smollm2_path):
    """``chat < /dev/zero`` read one endless line until the OOM killer ended it (21 GB), and a 20 MB
    line aborted llama.cpp's tokenizer under ``ulimit -v``. Such a line is now skipped in bounded
    pieces with one error line, and the chat goes on; the address-space limit proves nothing of it
    is held (the 8 MB line would not fit it three times over as tokens)."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    script = b"a" * (8 << 20) + b"\nName a fruit.\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "chat", "--model", str(smollm2_path), "-n", "4",
                           "--ctx", "256"], input=script, capture_output=True, timeout=120, preexec_fn=limit)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, (out, proc.stderr[-800:])
    error = [line for line in out.splitlines() if "error:" in line]
    assert len(error) == 1 and "standard input: a line of over" in error[0] and error[0].endswith("skipping it")
    answers = [line for line in out.splitlines() if line.startswith("> ") and "error" not in line and line[2:].strip()]
    assert answers, out  # the next line was answered
    with open("/dev/zero", "rb") as zeros:  # no end of line, ever: said at once, then the chat stops
        endless = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "chat", "--model", str(smollm2_path),
                                  "--ctx", "256"], stdin=zeros, capture_output=True, timeout=120, preexec_fn=limit)
    assert endless.returncode == 1 and b"skipping it" in endless.stdout, endless.stdout[-500:]
    assert endless.stderr.decode().strip().splitlines()[-1].startswith("Error: standard input: no end of line in")


def test_a_text_far_past_the_context_is_refused_before_llama_cpp_tokenizes_it(smollm2_path):
    """llama.cpp's tokenizer allocates for the whole text first (``std::bad_alloc``, an abort, under a
    memory limit); the byte count decides where no tokenization could fit the context."""
    from rs_local.errors import RsLocalError
    from rs_local.runtime.runner import Runner

    runner = Runner(smollm2_path, n_ctx=256)
    try:
        assert 16 * 256 < runner.max_text_bytes() < 1000 * 256  # SmolLM2's longest token is tens of bytes
        with pytest.raises(RsLocalError, match=r"the prompt is 20,000,000 bytes: over 256 tokens .*\(use --ctx\)"):
            runner.tokenize("x" * 20_000_000)
        with pytest.raises(RsLocalError, match="the context holds 256"):  # long but possible: counted in tokens
            runner.generate("word " * 1000, max_tokens=2)
    finally:
        runner.close()


def test_chat_with_stdin_closed_leaves_cleanly(smollm2_path):
    """``rs-local chat <&-``: Python's input() raises RuntimeError there, not EOFError."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "chat", "--model", str(smollm2_path), "--ctx", "256"],
                          capture_output=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr[-500:]


def test_inspect_scale_is_a_plain_number(vec):
    for bad in ("nan", "inf", "1_0"):
        res = run("inspect", str(vec), "--llama-cpp", "--scale", bad)
        assert res.exit_code == 2 and "--scale" in res.output, (bad, res.output)
    assert run("inspect", str(vec), "--llama-cpp", "--scale", "-1.5", "--model", "smollm2-135m").exit_code == 0


def test_inspect_llama_cpp_refuses_a_model_the_vector_does_not_fit(vec, qwen_path):
    """The default model (Qwen, 896 wide) got a ready-to-paste command for a SmolLM2 vector (576 wide),
    which llama.cpp then rejected."""
    res = run("inspect", str(vec), "--llama-cpp")
    assert res.exit_code == 1 and "vector has n_embd 576, model has 896" in res.output and "--model" in res.output


def test_models_commands(smollm2_path):
    res = run("models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["qwen2.5-coder-0.5b"]["default"] and rows["smollm2-135m"]["pulled"]
    assert run("models", "path", "smollm2-135m").output.strip() == str(smollm2_path)
    assert CliRunner().invoke(cli, ["models", "path", "gpt-9"]).exit_code == 2


def test_a_vector_fitted_under_a_system_prompt_is_noted_when_the_run_differs(smollm2_path, tmp_path):
    """A vector records the system prompt it was fitted under; generate says so (one dim line, on
    stderr) when this run's differs, and says nothing when it matches."""
    rng = np.random.default_rng(0)
    dirs = {b: rng.standard_normal(576).astype(np.float32) for b in range(4, 8)}
    path = write_control_vector(ControlVector(dirs, "llama", {"system_prompt": "Answer like a pirate."}),
                                tmp_path / "pirate.gguf")
    base = ["generate", "hi", "--model", str(smollm2_path), "--vector", f"{path}:0.1", "-n", "2", "--ctx", "512"]
    none = run(*base)
    assert none.exit_code == 0, none.output
    assert "pirate.gguf was fitted under the system prompt 'Answer like a pirate.' (this run has none" in none.output
    other = run(*base, "--system", "Be brief.")
    assert "(this run's is 'Be brief.'" in other.output
    same = run(*base, "--system", "Answer like a pirate.")
    assert same.exit_code == 0 and "fitted under" not in same.output, same.output


def test_system_prompt_notes_check_only_vectors_that_record_one():
    from rs_local.runtime.vector_specs import system_prompt_notes

    dirs = {4: np.ones(8, np.float32)}
    recorded = ControlVector(dirs, "llama", {"system_prompt": "x " * 100})
    recorded.source = "long.gguf"
    silent = ControlVector(dirs, "llama")  # from another tool: nothing recorded, nothing to compare
    notes = system_prompt_notes([recorded, silent], "Be brief.")
    assert len(notes) == 1 and notes[0].startswith("note: long.gguf was fitted under")
    assert "..." in notes[0] and len(notes[0]) < 240
    assert system_prompt_notes([silent], None) == [] and system_prompt_notes([silent], "Be brief.") == []


def test_chat_slash_text_and_vector_state(smollm2_path, vec):
    """A line that starts with a slash could not be sent at all ("unknown command /etc/passwd"): `//` sends it.
    `/vector` alone removed the vector as `/vector off` does; it now shows the steering and keeps it."""
    script = "//etc/passwd is what?\n/vector\n/quit\n"
    res = run("chat", "--model", str(smollm2_path), "--vector", f"{vec}:0.5", "-n", "4", "--ctx", "256", input=script)
    assert res.exit_code == 0, res.output
    assert "unknown command" not in res.output
    assert res.output.count("v.gguf:0.5 at scale 1") == 2  # the banner, then /vector alone


def test_chat_leaves_on_a_second_ctrl_c_not_the_first(smollm2_path):
    """A Ctrl-C at the prompt ended the chat (and a second Ctrl-C just after a stopped reply did too), though
    the chat says Ctrl-C stops a reply, not the session. One alone now says how to leave; two in a row leave."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    def read_until(proc, needle: bytes, timeout: float = 120) -> bytes:
        seen, deadline = b"", time.time() + timeout
        while needle not in seen and time.time() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert needle in seen, seen
        return seen

    for twice in (False, True):
        proc = subprocess.Popen([sys.executable, "-m", "rs_local.cli.main", "chat", "--model", str(smollm2_path),
                                 "-n", "4", "--ctx", "256"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        read_until(proc, b"/help for commands")
        time.sleep(0.5)  # at the prompt
        proc.send_signal(signal.SIGINT)
        read_until(proc, b"Ctrl-C again, Ctrl-D or /quit leaves")
        if twice:
            proc.send_signal(signal.SIGINT)
        else:
            proc.stdin.write(b"/help\n/quit\n")
            proc.stdin.flush()
            read_until(proc, b"/scale X")
        assert proc.wait(timeout=60) == 0


def test_an_answer_cut_by_a_full_context_says_so(smollm2_path):
    """An answer that stopped because the context ran out came without a word (an empty answer for a prompt
    that filled the context); `--max-tokens` and the context both read "length"."""
    prompt = "count " * 230
    res = CliRunner().invoke(cli, ["generate", "--model", str(smollm2_path), "--ctx", "256", "-n", "60", "--raw", prompt])
    assert res.exit_code == 0 and "stopped: the context is full (256 tokens)" in res.stderr, res.output
    res = CliRunner().invoke(cli, ["generate", "--model", str(smollm2_path), "--ctx", "256", "-n", "60", "--raw", "--json",
                                   prompt])
    assert json.loads(res.stdout)["context_full"] is True
    res = CliRunner().invoke(cli, ["generate", "--model", str(smollm2_path), "--ctx", "256", "-n", "3", "--json", "Hi"])
    assert json.loads(res.stdout)["context_full"] is False
