"""rs_local.files: bounded strict reading, atomic writing, output checks; and the inputs built on them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.cli.options import Number, parse_number_list
from rs_local.errors import FileProblem, PromptSetError, RsLocalError
from rs_local.files import (
    JsonProblem, atomic_output, atomic_write_text, check_distinct, check_output_path, make_output_dir, parse_json, read_text, split_lines,
    sweep_stale_temps,
)
from rs_local.judge.jsonl import AppendLog, data_rows
from rs_local.judge.judging import load_responses
from rs_local.prompts import load_prompts, load_scores
from rs_local.runtime.vector_specs import check_layer_range, load_vector_specs, parse_layer_range, parse_vector_spec
from rs_local.vectors.control_vector import ControlVector

ROOT = os.geteuid() == 0


def _key(row):
    return row["k"]


# ----------------------------------------------------------------------------- reading


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(FileProblem, match="is a FIFO"):
        read_text(fifo)  # must not open it for a blocking read
    assert time.monotonic() - start < 2
    with pytest.raises(FileProblem, match="is a character device"):
        read_text("/dev/zero")
    with pytest.raises(FileProblem, match="is a directory"):
        read_text(tmp_path)
    with pytest.raises(FileProblem, match="no such file"):
        read_text(tmp_path / "missing.txt")


def test_size_limit_is_checked_before_reading(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(300 * 2**20)  # sparse
    with pytest.raises(FileProblem, match="over the 256 MiB limit"):
        read_text(big)
    small = tmp_path / "s.txt"
    small.write_text("x" * 100)
    with pytest.raises(FileProblem, match="over the 10 bytes limit"):
        read_text(small, limit=10)


@pytest.mark.parametrize("data, message", [
    ("hi\nthere\n".encode("utf-16-le"), "NUL byte"),
    ("hi\n".encode("utf-16"), "is UTF-16"),
    ("hi\n".encode("utf-32"), "is UTF-32"),
    (b"\x00\x00\x00", "NUL byte"),
    (b"ok\n\xff\n", r"not valid UTF-8 \(byte 3, line 2\)"),
    (b"ok\n\xed\xa0\x80\n", "not valid UTF-8"),  # an encoded surrogate
])
def test_strict_utf8(tmp_path, data, message):
    path = tmp_path / "p.txt"
    path.write_bytes(data)
    with pytest.raises(FileProblem, match=message):
        read_text(path)


def test_utf8_bom_is_stripped_in_prompt_and_judge_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "hello"}\n')
    assert load_prompts(p) == ["hello"]
    r = tmp_path / "r.jsonl"
    r.write_bytes(b'\xef\xbb\xbf{"prompt": "hello", "response": "hi"}\n')
    assert load_responses(r)[0]["prompt"] == "hello"


def test_lines_split_only_at_newline(tmp_path):
    assert split_lines("a\u2028b\r\nc\x85d\x0be\x0cf\rg\n") == ["a\u2028b", "c\x85d\x0be\x0cf\rg"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\u2028still one\nfeed\x0cstill feed\r\ntwo\n", encoding="utf-8")
    assert load_prompts(txt) == ["one\u2028still one", "feed\x0cstill feed", "two"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "raw \u2028 separator"}\n{"prompt": "next \u0085 line"}\n', encoding="utf-8")
    assert load_prompts(jsonl) == ["raw \u2028 separator", "next \u0085 line"]


@pytest.mark.parametrize("text, message", [
    ("[" * 1500 + "]" * 1500, "nested 1500 levels"),
    ('{"a": ' * 101 + "1" + "}" * 101, "nested 101 levels"),
    ("9" * 4301, "4301 digits"),
    ("[NaN]", "NaN is not a JSON number"),
    ('{"s": -Infinity}', "-Infinity is not a JSON number"),
    ("1e999", "too large"),
    ('"\\ud800"', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
    ("[1,", "bad JSON"),
])
def test_json_limits_are_one_line_errors(text, message):
    with pytest.raises(JsonProblem, match=message):
        parse_json(text)


def test_json_that_is_fine():
    assert parse_json('{"a": "[[[[{{{{\\"", "b": "\\ud83d\\ude00"}') == {"a": '[[[[{{{{"', "b": "\U0001F600"}
    assert parse_json("[" * 100 + "]" * 100) is not None
    assert parse_json("-" + "9" * 100) == -int("9" * 100)


# ----------------------------------------------------------------------------- prompt, scores, judge files


def test_prompt_null_and_wrong_types_name_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": null}\n')
    with pytest.raises(PromptSetError, match="line 2: field 'prompt' is null"):
        load_prompts(p)
    s = tmp_path / "s.jsonl"
    s.write_text('{"prompt": null, "score": 0.5}\n')
    with pytest.raises(PromptSetError, match="line 1: prompt is null"):
        load_scores(s)
    s.write_text('{"prompt": "a", "score": true}\n')
    with pytest.raises(PromptSetError, match="not a number"):
        load_scores(s)
    s.write_text('{"prompt": "a", "score": NaN}\n')
    with pytest.raises(PromptSetError, match="line 1: NaN"):
        load_scores(s)


@pytest.mark.parametrize("text, message", [
    ("prompt,cat\na,1\nb\nc,3\n", "line 3: 1 field\\(s\\), the header has 2"),
    ("prompt,cat\na,1,x\n", "line 2: 3 field"),
    ('prompt,cat\na,1\n"b,2\nc,3\nd,4\n', "line 3: unterminated quote"),
    ('prompt,cat\n"a"b,1\n', "line 2: bad CSV"),
])
def test_csv_rows_must_match_the_header(tmp_path, text, message):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(PromptSetError, match=message):
        load_prompts(p)


def test_csv_multiline_quoted_field_is_one_prompt(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('prompt,cat\n"two\nlines",1\n\nb,2\n')
    assert load_prompts(p) == ["two\nlines", "b"]


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "a", "response": "b", "mean_logprob": NaN}', "NaN"),
    ('{"prompt": "a", "response": "b", "mean_logprob": "x"}', "'mean_logprob' must be a number"),
    ('{"prompt": "a", "response": "b", "sample": "1"}', "'sample' must be a whole number"),
    ('{"prompt": "a", "response": "b", "sample": true}', "'sample' must be a whole number"),
    ('{"prompt": null, "response": "b"}', "must be text"),
    ('{"prompt": "a", "response": "b", "prompt_id": 3}', "'prompt_id' must be text"),
])
def test_response_rows_are_type_checked(tmp_path, row, message):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "z", "response": "y"}\n' + row + "\n")
    with pytest.raises(FileProblem, match=message):
        load_responses(p)


def test_duplicate_response_rows_are_an_error(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "a", "sample": 0, "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                 '{"prompt": "a", "sample": 0, "response": "b"}\n')
    with pytest.raises(FileProblem, match="line 3: same prompt, sample and answer as line 1"):
        load_responses(p)
    # the same answer text under another sample number is a different answer (greedy sampling repeats itself)
    p.write_text('{"prompt": "a", "sample": 0, "response": "b"}\n{"prompt": "a", "sample": 1, "response": "b"}\n')
    assert len(load_responses(p)) == 2


def test_truncated_last_line_of_a_headed_input_is_an_error(tmp_path):
    p = tmp_path / "r.jsonl"
    header = json.dumps({"rs_local_header": {"kind": "responses", "version": 1, "config": {}}})
    p.write_text(header + '\n{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp')
    with pytest.raises(FileProblem, match="line 3: incomplete last line"):
        data_rows(p)
    p.write_text(header + '\n{"prompt": "a", "response": "b"}')  # complete, just no final newline: fine
    assert len(data_rows(p)) == 1


# ----------------------------------------------------------------------------- append logs keep bytes


def test_refused_log_keeps_its_unterminated_tail(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"my notes\nlast line without newline")
    with pytest.raises(FileProblem, match="not an rs-local things file"):
        AppendLog.open(path, "things", {}, _key)
    assert path.read_bytes() == b"my notes\nlast line without newline"
    path.write_bytes(b'{"precious": 1')
    with pytest.raises(FileProblem, match="not an rs-local things file"):
        AppendLog.open(path, "things", {}, _key)
    assert path.read_bytes() == b'{"precious": 1'


def test_other_config_keeps_the_partial_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        log.append({"k": 1})
    with open(path, "a") as f:
        f.write('{"k": 2, "half')
    before = path.read_bytes()
    with pytest.raises(FileProblem, match="different settings"):
        AppendLog.open(path, "things", {"a": 2}, _key)
    assert path.read_bytes() == before


def test_bad_row_in_a_log_names_its_line_and_changes_nothing(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {}, _key) as log:
        log.append({"k": 1})
    with open(path, "a") as f:
        f.write('{"no_key": 2}\n{"k": 3, "par')
    before = path.read_bytes()
    with pytest.raises(FileProblem, match="line 3: not a valid things row"):
        AppendLog.open(path, "things", {}, _key)
    assert path.read_bytes() == before


def test_complete_last_row_without_newline_is_not_glued_to(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {}, _key) as log:
        log.append({"k": 1})
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with AppendLog.open(path, "things", {}, _key) as log:
        assert log.done == {1}
        log.append({"k": 2})
    assert [json.loads(x).get("k") for x in path.read_text().splitlines()] == [None, 1, 2]


def test_logs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with AppendLog.open(tmp_path / "log.jsonl", "things", {}, _key) as log:
            log.append({"k": 1})
        atomic_write_text(tmp_path / "scores.jsonl", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "log.jsonl").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "scores.jsonl").st_mode) == 0o640


# ----------------------------------------------------------------------------- judge outputs


def _responses(path: Path, n: int = 2) -> Path:
    """``n`` answers to one prompt, refusals more likely than not: a score of about 0.34, so thresholds matter."""
    path.write_text("".join(json.dumps({"prompt": "q?", "sample": i, "response": "I can't help." if i % 2 == 0 else "Sure.",
                                        "mean_logprob": -0.2 if i % 2 == 0 else -0.9}) + "\n" for i in range(n)))
    return path


def test_second_judge_run_does_not_replace_scores(tmp_path):
    responses = _responses(tmp_path / "r.jsonl")
    out = tmp_path / "s.jsonl"
    run = lambda *extra: CliRunner().invoke(cli, ["judge", str(responses), "--judge", "keywords", "-o", str(out), *extra])  # noqa: E731
    assert run().exit_code == 0
    first, mtime = out.read_bytes(), out.stat().st_mtime_ns
    assert run().exit_code == 0  # the same run again changes nothing and touches nothing
    assert out.read_bytes() == first and out.stat().st_mtime_ns == mtime
    res = run("--refused-above", "0.5", "--complied-below", "-0.5")  # other thresholds: other scores
    assert res.exit_code == 1 and "already exists with other scores" in res.stderr
    _responses(responses, 3)  # more answers than the first run judged
    res = run()
    assert res.exit_code == 1 and "did not judge 1 of the answers" in res.stderr and out.read_bytes() == first
    assert run("--force").exit_code == 0 and out.read_bytes() != first


def test_judge_outputs_are_checked_before_the_judge(tmp_path):
    responses = _responses(tmp_path / "r.jsonl")
    for target, message in [(tmp_path / "no" / "s.jsonl", "does not exist"), (tmp_path, "is a directory"),
                            (Path("/dev/null"), "character device")]:
        res = CliRunner().invoke(cli, ["judge", str(responses), "--judge", "keywords", "-o", str(target), "--force"])
        assert res.exit_code == 1 and message in res.stderr and str(target) in res.stderr, res.stderr


# ----------------------------------------------------------------------------- writing


def test_atomic_output_mode_cleanup_and_errors_name_the_target(tmp_path):
    target = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        with atomic_output(target) as tmp:
            assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output(target, force=True) as tmp:
                tmp.write_bytes(b"half")
                raise exc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"] and target.read_bytes() == b"x"
    with pytest.raises(FileProblem, match="already exists"):
        with atomic_output(target):
            pass


def test_safetensors_and_npz_follow_the_umask(tmp_path):
    from rs_local.converters import save_npz, save_safetensors

    cv = ControlVector({1: np.ones(4)}, "llama")
    old = os.umask(0o022)
    try:
        save_safetensors(cv, tmp_path / "a.safetensors")
        save_npz(cv, tmp_path / "a.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.npz").stat().st_mode) == 0o644


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
def test_read_only_directory_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(FileProblem, match="is not writable") as info:
            check_output_path(ro / "x.gguf")
        assert str(ro / "x.gguf") in str(info.value)
    finally:
        ro.chmod(0o755)


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileProblem, match="does not exist"):
        check_output_path(tmp_path / "no" / "x")
    with pytest.raises(FileProblem, match="is a directory"):
        check_output_path(tmp_path, force=True)
    with pytest.raises(FileProblem, match="character device"):
        check_output_path("/dev/null", force=True)
    with pytest.raises(FileProblem, match="already exists"):
        check_output_path(tmp_path / "f")
    with pytest.raises(FileProblem, match="does not exist"):
        make_output_dir(tmp_path / "a" / "b")  # no silent parents
    assert not (tmp_path / "a").exists()
    with pytest.raises(FileProblem, match="exists and is not a directory"):
        make_output_dir(tmp_path / "f", force=True)
    assert make_output_dir(tmp_path / "d").is_dir()


def test_eval_refuses_a_missing_parent_before_loading(tmp_path):
    vec = tmp_path / "v.gguf"
    from rs_local.converters.gguf_io import write_control_vector

    write_control_vector(ControlVector({3: np.ones(8)}, "llama"), vec)
    res = CliRunner().invoke(cli, ["eval", "--vector", str(vec), "--set", "harmless", "--model", "/no/model.gguf",
                                   "-o", str(tmp_path / "a" / "b")])
    assert res.exit_code == 1 and "does not exist" in res.stderr and not (tmp_path / "a").exists()


def test_stale_temps_of_ours_are_swept(tmp_path):
    target = tmp_path / "v.gguf"
    old, young, other = tmp_path / ".v.gguf.abc123.tmp", tmp_path / ".v.gguf.def456.tmp", tmp_path / ".other.abc123.tmp"
    for p in (old, young, other):
        p.write_bytes(b"leftover")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert sweep_stale_temps(target) == 1
    assert not old.exists() and young.exists() and other.exists()


def test_stale_temps_are_swept_where_the_os_has_no_uids(tmp_path, monkeypatch):
    """Windows has no os.getuid: the sweep must not crash there (it raised AttributeError)."""
    monkeypatch.delattr(os, "getuid")
    old = tmp_path / ".v.gguf.abc123.tmp"
    old.write_bytes(b"leftover")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sweep_stale_temps(tmp_path / "v.gguf") == 1 and not old.exists()


def test_sigterm_during_a_write_removes_the_temp_file(tmp_path):
    target = tmp_path / "big.bin"
    code = f"""
import sys, time
from rs_local.files import atomic_output
with atomic_output({str(target)!r}) as tmp:
    open(tmp, "wb").write(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(30)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_sigterm_ends_any_command_with_one_line(smollm2_path):
    """SIGTERM unwinds like Ctrl-C (finally blocks clean up) and says so; it used to end commands silently."""
    cmd = [sys.executable, "-m", "rs_local.cli.main", "generate", "--model", str(smollm2_path), "--max-tokens", "2000",
           "Count from 1 to 1000, one number per line."]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # answering now
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().strip().splitlines()[-1] == "Terminated." and b"Traceback" not in err


def test_an_interrupt_inside_a_llama_cpp_callback_is_raised_after_the_call(smollm2_path, monkeypatch):
    """Ctrl-C landing in the block reader's cb_eval was printed by ctypes and dropped, and the read then
    failed with a false "no output" error; it is held and raised when llama_decode returns."""
    from rs_local.runtime.activations import BlockReader
    from rs_local.runtime.runner import Runner

    runner = Runner(smollm2_path, n_ctx=512)
    try:
        with BlockReader(runner, [8], n_ctx=512) as reader:
            calls = {"n": 0}
            take = BlockReader._take

            def interrupted(self, tensor, ask):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise KeyboardInterrupt
                return take(self, tensor, ask)

            monkeypatch.setattr(BlockReader, "_take", interrupted)
            with pytest.raises(KeyboardInterrupt):
                reader.read_tokens(runner.tokenize("Hello there"))
            monkeypatch.setattr(BlockReader, "_take", take)
            assert reader.read_tokens(runner.tokenize("Hello there"))[8].shape == (runner.n_embd,)  # nothing left held
    finally:
        runner.llama.close()


def test_ctrl_c_during_a_llama_cpp_call_is_held_to_its_end(smollm2_path, monkeypatch):
    """Catching Ctrl-C inside the callback was not enough: the signal could land on its first line,
    before its `try`, and ctypes printed and dropped it ('no output' followed, or the Ctrl-C was lost).
    Around such calls the handlers hold it, and it is raised once the call has returned."""
    from rs_local.runtime.activations import BlockReader
    from rs_local.runtime.interrupts import deferred
    from rs_local.runtime.runner import Runner

    ran_on = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran_on.append("after the signal")  # still running: the interrupt waits for the block's end
    assert ran_on == ["after the signal"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    runner = Runner(smollm2_path, n_ctx=512)
    try:
        with BlockReader(runner, [8], n_ctx=512) as reader:
            take, calls = BlockReader._take, {"n": 0}

            def signalled(self, tensor, ask):
                calls["n"] += 1
                if calls["n"] == 3:
                    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # held, not raised
                    os.kill(os.getpid(), signal.SIGINT)  # delivered while llama.cpp computes the graph
                return take(self, tensor, ask)

            first = runner.tokenize("Tell me about the history of bread in Egypt.")
            other = runner.tokenize("Tell me about the history of cheese in France and its makers.")
            reader.read_tokens(first)
            monkeypatch.setattr(BlockReader, "_take", signalled)
            with pytest.raises(KeyboardInterrupt):
                reader.read_tokens(other)  # shares a prefix with the first; its own tokens replace the rest
            monkeypatch.setattr(BlockReader, "_take", take)
            again = reader.read_tokens(first)[8]  # the other text's positions are not taken for the first's
        with BlockReader(runner, [8], n_ctx=512) as fresh:
            assert np.allclose(again, fresh.read_tokens(first)[8], atol=1e-4)
    finally:
        runner.llama.close()


# ----------------------------------------------------------------------------- CLI values


@pytest.mark.parametrize("text", ["-1", "8-", "", "8,20", "20-8", "\u0663-\u0665", "1-99999999999", "8--9", "0x8", " - "])
def test_loose_layer_ranges_are_refused(text):
    with pytest.raises(RsLocalError, match="bad layer range"):
        parse_layer_range(text)


def test_layer_ranges():
    assert parse_layer_range("8-20") == (8, 20)
    assert parse_layer_range("12") == (12, 12)
    assert parse_layer_range(" 3-4 ") == (3, 4)


def test_vector_spec_scales(tmp_path):
    vec = tmp_path / "v.gguf"
    vec.write_bytes(b"")
    assert parse_vector_spec(f"{vec}:-0.5") == (vec, -0.5)
    assert parse_vector_spec(f"{vec}:1e-1") == (vec, 0.1)
    assert parse_vector_spec(str(vec), 2.0) == (vec, 2.0)
    for tail in ("1_0", "nan", "inf", "Infinity", "0x1"):
        with pytest.raises(RsLocalError, match="bad scale"):
            parse_vector_spec(f"{vec}:{tail}")
    for tail in ("1e999", "5000"):
        with pytest.raises(RsLocalError, match="bad scale"):
            parse_vector_spec(f"{vec}:{tail}")


def test_vector_metadata_cannot_name_another_file(tmp_path):
    from rs_local.converters.gguf_io import write_control_vector

    path = tmp_path / "v.gguf"
    write_control_vector(ControlVector({4: np.ones(8), 5: np.ones(8)}, "llama", {"path": "/etc/elsewhere.gguf"}), path)
    [(vec, scale)] = load_vector_specs([f"{path}:0.5"])
    assert vec.source == str(path) and vec.metadata["path"] == str(path) and scale == 0.5
    with pytest.raises(RsLocalError, match=f"vector {path} has directions for blocks 4-5; --layers 7-9 selects none"):
        check_layer_range([(vec, scale)], (7, 9))
    check_layer_range([(vec, scale)], (5, 9))


@pytest.mark.parametrize("kind, text", [
    (Number(), "nan"), (Number(), "inf"), (Number(), "1_0"), (Number(), "1e999"), (Number(), ""),
    (Number(0), "-1"), (Number(0, 1, min_open=True), "0"), (Number(integer=True), "1.5"),
    (Number(0, 10, integer=True), "11"), (Number(integer=True), "1_000"), (Number(), "\u0663"),
])
def test_number_option_refuses(kind, text):
    with pytest.raises(click.BadParameter):
        kind.convert(text, None, None)


def test_number_option_accepts():
    assert Number().convert("-0.5", None, None) == -0.5
    assert Number().convert("1e-3", None, None) == 0.001
    assert Number(integer=True).convert("42", None, None) == 42
    assert parse_number_list("0, -0.5,-1", "--scales") == [0.0, -0.5, -1.0]
    with pytest.raises(click.BadParameter):
        parse_number_list("0,,1", "--scales")


@pytest.mark.parametrize("args", [
    ["--scale", "nan"], ["--scale", "inf"], ["--temperature", "inf"], ["--temperature", "nan"], ["--top-p", "nan"],
    ["--seed", "-1"], ["--seed", str(2**32)], ["--ctx", "1000000000"], ["--max-tokens", "1_0"],
])
def test_generate_values_are_usage_errors_before_any_load(args):
    res = CliRunner().invoke(cli, ["generate", "hi", "--model", "/no/such/model.gguf", *args])
    assert res.exit_code == 2 and args[0] in res.stderr and "Traceback" not in res.output


def test_ctx_above_the_trained_context_fails_before_loading(smollm2_path):
    start = time.monotonic()
    res = CliRunner().invoke(cli, ["generate", "hi", "--model", str(smollm2_path), "--ctx", "1000000"])
    assert res.exit_code == 2 and "trained with" in res.stderr and time.monotonic() - start < 10


def test_a_model_copied_over_another_with_its_times_is_told_apart(tmp_path):
    """`cp -p` keeps size and mtime: the fit cache, the eval cache and respond's resume key by the file's
    edges too, so they no longer serve the old model's results."""
    from rs_local.eval.baseline_cache import model_key
    from rs_local.files import edge_digest
    from rs_local.vectors.hf_model import model_identity

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"a" * (3 << 20))
    before = (edge_digest(path), model_identity(path, str(path)), model_key(path))
    stamp = path.stat().st_mtime
    path.write_bytes(b"GGUF" + b"a" * ((3 << 20) - 1) + b"b")  # same size, other last byte
    os.utime(path, (stamp, stamp))
    after = (edge_digest(path), model_identity(path, str(path)), model_key(path))
    assert all(b != a for b, a in zip(before, after))


def test_a_held_termination_wins_over_a_held_ctrl_c():
    """chat takes Ctrl-C as "stop this reply": a SIGTERM held with it must not be lost behind it."""
    from rs_local.files import Terminated
    from rs_local.runtime.interrupts import hold, release

    for first, second in ((KeyboardInterrupt(), Terminated()), (Terminated(), KeyboardInterrupt())):
        hold(first)
        hold(second)
        with pytest.raises(Terminated):
            release()
    release()  # nothing left held


def test_leftovers_of_a_killed_cache_save_or_pull_are_swept_once_old(tmp_path):
    """A SIGKILL mid-save (or mid-download) leaves a hidden directory of up to a model's size."""
    from rs_local import models
    from rs_local.vectors import hf_cache

    old_entry, young_entry, kept = tmp_path / ".abc123.x1y2", tmp_path / ".def456.z9", tmp_path / "abc123"
    old_pull, young_pull = tmp_path / "rs-local-pull-aaaa", tmp_path / "rs-local-pull-bbbb"
    for d in (old_entry, young_entry, kept, old_pull, young_pull):
        d.mkdir()
        (d / "part").write_bytes(b"x" * 10)
    for d in (old_entry, kept, old_pull, young_pull):
        os.utime(d / "part", (time.time() - 7200, time.time() - 7200))
        os.utime(d, (time.time() - 7200, time.time() - 7200))
    os.utime(young_pull / "part")  # a download still writing: its directory is old, its file is not
    hf_cache._sweep_stale(tmp_path)
    models._sweep_stale_pulls(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young_entry.name, kept.name, young_pull.name])


_WINDOWS_LIKE = """
import os, sys
del os.O_NONBLOCK                      # Windows has no O_NONBLOCK ...
FAKE = 1 << 30
os.O_BINARY = FAKE                     # ... and needs O_BINARY, or os.open reads in text mode
seen, real_open = [], os.open
def spy(path, flags, *rest):
    seen.append(flags)
    return real_open(path, flags & ~FAKE, *rest)
os.open = spy
from rs_local.converters.gguf_io import read_control_vector
from rs_local.files.reading import read_bytes
vec = read_control_vector(sys.argv[1])
read_bytes(sys.argv[2])
assert seen and all(f & FAKE for f in seen), seen
print(sorted(vec.directions))
"""


def test_reads_work_without_unix_only_flags_and_ask_for_binary(tmp_path):
    """`os.O_NONBLOCK` made every vector, policy and probe read an AttributeError on Windows; without
    O_BINARY its os.open would translate CRLF and stop at a Ctrl-Z byte."""
    from rs_local.converters.gguf_io import write_control_vector

    path = write_control_vector(ControlVector({2: np.ones(8, np.float32)}, "llama"), tmp_path / "v.gguf")
    text = tmp_path / "p.txt"
    text.write_text("a\r\nb\n")
    done = subprocess.run([sys.executable, "-c", _WINDOWS_LIKE, str(path), str(text)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2]"


def test_atomic_writes_fsync_through_a_writable_handle(tmp_path, monkeypatch):
    """Windows' fsync fails with EBADF on a read-only handle: every atomic write was an error there."""
    import errno
    import fcntl

    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o444)  # the target's read-only mode is copied after the flush, not before
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_full_disk_mid_log_names_the_file_and_keeps_the_rows(tmp_path, monkeypatch):
    """ENOSPC while appending a row was '[Errno 28] No space left on device' without a file name."""
    import errno

    from rs_local.judge import jsonl

    path = tmp_path / "r.jsonl"
    real, calls = jsonl.append_line, []

    def filling(fh, line):
        calls.append(line)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, line)

    monkeypatch.setattr(jsonl, "append_line", filling)
    with pytest.raises(FileProblem, match=r"r\.jsonl: cannot be written \(No space left on device\); the rows before "
                                          r"it are kept"):
        with AppendLog.open(path, "things", {}, _key) as log:
            log.append({"k": 1})
            log.append({"k": 2})
    monkeypatch.setattr(jsonl, "append_line", real)
    with AppendLog.open(path, "things", {}, _key) as log:  # resumes where the disk ran out
        assert [r["k"] for r in log.rows] == [1]


def test_no_home_directory_is_one_line(monkeypatch):
    """HOME unset under a uid without a passwd entry (a container's random uid): RuntimeError traceback."""
    from rs_local import models
    from rs_local.errors import ModelError

    monkeypatch.setenv("RS_LOCAL_HOME", "~nosuchuser-rs-local/cache")
    with pytest.raises(ModelError, match="names a home directory that cannot be found .* set RS_LOCAL_HOME"):
        models.home_dir()
    monkeypatch.delenv("RS_LOCAL_HOME")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("pwd.getpwuid", lambda _uid: (_ for _ in ()).throw(KeyError("no such uid")))
    with pytest.raises(ModelError, match="the home directory cannot be found"):
        models.home_dir()


def test_a_symlinked_output_is_written_through_and_a_link_to_a_stream_refused(tmp_path):
    """The temp file was renamed over the link itself: `-o link.npz` replaced the link and left its target
    as it was, and `-o /dev/stdout` (as root) replaced the system's /dev/stdout link with a file."""
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(FileProblem, match="already exists"):
        atomic_write_text(link, "new", force=False)
    atomic_write_text(link, "new", force=True)
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["real.txt"]
    os.link(target, tmp_path / "hard.txt")  # another name for the same file is the same file
    with pytest.raises(FileProblem, match="would overwrite another input"):
        check_distinct([tmp_path / "hard.txt"], [target])
    stream = tmp_path / "out"
    stream.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    for write in (lambda: atomic_write_text(stream, "x", force=True), lambda: AppendLog.open(stream, "things", {}, _key)):
        with pytest.raises(FileProblem, match="is a link to .*not into a terminal, pipe or device"):
            write()
    assert stream.is_symlink()


def test_a_gguf_cut_short_by_a_file_size_limit_is_an_error_and_replaces_nothing(tmp_path):
    """The gguf library writes tensors with numpy's tofile, which loses the write error of a small array: past
    a file-size limit (or on a full disk) `convert` said "wrote" and replaced a good vector with a cut one."""
    import resource

    from rs_local.converters import write_control_vector
    from rs_local.vectors import ControlVector

    big = write_control_vector(ControlVector({k: np.ones(576, np.float32) for k in range(1, 30)}, "llama"),
                               tmp_path / "big.gguf")
    good = write_control_vector(ControlVector({3: np.ones(576, np.float32)}, "llama"), tmp_path / "good.gguf")
    before = good.read_bytes()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024, 10 * 1024))

    res = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "convert", str(big), str(good), "--force"],
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 1 and "the file came out incomplete" in res.stderr and "wrote" not in res.stdout
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf", "good.gguf"]


def _without_root_override() -> list[str] | None:
    """A prefix that runs a command without the power to read any file: nothing as a normal user,
    ``setpriv`` dropping root's override as root (None where neither is possible)."""
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


CACHE_CHILD = """
import sys
from pathlib import Path
import numpy as np
from rs_local.eval.baseline_cache import EvalCache, Reference
from rs_local.files import is_cached_file
from rs_local.vectors import hf_cache

root = Path(sys.argv[1])
cache = EvalCache(root / "eval")
print(cache.get_verdict({"k": 1}), cache.get_reference({"k": 2}), cache.get_generation({"k": 3}))
print(is_cached_file(root / "eval" / "verdict" / "x.json"), hf_cache.is_complete(root / "eval" / "verdict"))
"""


def test_an_unreadable_cache_is_a_miss_not_an_error(tmp_path):
    """``Path.is_file`` raises on a permission error: one cache directory made unreadable (or created
    under ``umask 777``) failed every later fit and eval, whose caches are best effort."""
    from rs_local.eval.baseline_cache import EvalCache, Reference

    prefix = _without_root_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: no way to be refused a read")
    cache = EvalCache(tmp_path / "eval")
    cache.put_verdict({"k": 1}, {"verdict": 1})
    cache.put_reference({"k": 2}, Reference(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32)))
    assert cache.get_verdict({"k": 1}) == {"verdict": 1}
    for sub in (tmp_path / "eval").iterdir():
        sub.chmod(0)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", CACHE_CHILD, str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
    finally:
        for sub in (tmp_path / "eval").iterdir():
            sub.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.split() == ["None", "None", "None", "False", "False"]
