"""The command line in surroundings unlike a developer's terminal (rs_local.cli.streams).

Each case ran the real ``rs-local`` entry point in a child process, as a user's shell would, and
ended a finished command with a traceback or lost its output before the fix: a stdout that is not
UTF-8, a reader that leaves early, a closed stdout, a stderr that cannot be written, ``COLUMNS=0``, a
deleted working directory, an ASCII locale's arguments, undecodable chat input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rs_local.converters.gguf_io import write_control_vector
from rs_local.vectors.control_vector import ControlVector

TEXT = "日本 🚀 café"


def _rs_local(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    kw.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", "rs_local.cli.main", *args], env=full, timeout=120, **kw)


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "v.gguf"
    vec = ControlVector({3: np.ones(576, np.float32)}, "llama", {"note": TEXT, "model": "x" * 200})
    return write_control_vector(vec, path)


def test_output_that_is_not_utf8_is_written_as_utf8_not_a_traceback(vector):
    """A latin-1 locale (or Windows' code page when redirected) could not print Chinese or rich's
    '…': UnicodeEncodeError after the work. Redirected output is now UTF-8, JSON included."""
    shown = _rs_local("inspect", str(vector), env={"PYTHONIOENCODING": "latin-1"})
    assert shown.returncode == 0, shown.stderr.decode(errors="replace")
    assert TEXT in shown.stdout.decode("utf-8")
    as_json = _rs_local("inspect", str(vector), "--json", env={"PYTHONIOENCODING": "latin-1"})
    assert as_json.returncode == 0 and TEXT in json.dumps(json.loads(as_json.stdout.decode("utf-8")), ensure_ascii=False)


def test_a_reader_that_leaves_early_ends_the_command_quietly(vector):
    """`rs-local inspect X --json | head -c 10` printed 'Error: [Errno 32] Broken pipe'."""
    proc = subprocess.Popen([sys.executable, "-m", "rs_local.cli.main", "inspect", str(vector), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read().decode(errors="replace")
    assert proc.wait(timeout=120) == 1
    assert "Error" not in err and "Traceback" not in err


def test_a_closed_stdout_is_an_error_not_a_silent_success(vector):
    """`rs-local inspect X >&-`: Python drops every print to a closed stdout, so the command exited 0 and
    its result went nowhere. It is now one line on stderr and exit 1, as `ls >&-` fails."""
    shown = _rs_local("inspect", str(vector), stdout=None, stderr=subprocess.PIPE, capture_output=False,
                      preexec_fn=lambda: os.close(1))
    assert shown.returncode == 1
    err = shown.stderr.decode(errors="replace").strip().splitlines()
    assert err == ["Error: standard output is closed (>&-), so the result cannot be printed; redirect it to a file "
                   "or /dev/null instead"], err


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "VECTOR"], ["inspect", "VECTOR", "--json"]])
def test_a_stdout_that_cannot_be_written_is_named_in_one_line(vector, args):
    """``> /dev/full``: the group's own --help and --version ended in a traceback (click runs them
    before the group's error handling), and a command's result said "[Errno 28] No space left on
    device", naming neither the stream nor a file."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        shown = _rs_local(*[str(vector) if a == "VECTOR" else a for a in args], stdout=full, stderr=subprocess.PIPE,
                          capture_output=False)
    err = shown.stderr.decode(errors="replace").strip().splitlines()
    assert shown.returncode == 1 and err == ["Error: standard output: cannot be written (No space left on device)"], err
    closed = _rs_local(*args[:1], stdout=None, stderr=subprocess.PIPE, capture_output=False,
                       preexec_fn=lambda: os.close(1)) if args[0].startswith("--") else None
    if closed is not None:
        assert closed.returncode == 1 and b"Traceback" not in closed.stderr
        assert closed.stderr.decode().strip().startswith("Error: standard output is closed")


def test_a_stderr_that_cannot_be_written_does_not_lose_the_answer(smollm2_path, tmp_path):
    """A read-only stderr (`2<&-` through a shell shim, a full disk): the loading spinner raised
    OSError and the command died without its answer."""
    ro = tmp_path / "ro"
    ro.write_text("")
    with open(ro, "rb") as stderr:
        done = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "generate", "--model", str(smollm2_path),
                               "--max-tokens", "4", "--threads", "1", "Say hello."],
                              stdout=subprocess.PIPE, stderr=stderr, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip()


def test_a_width_that_is_not_one_is_ignored(vector):
    """COLUMNS=0 printed every table as nothing, exit 0."""
    shown = _rs_local("inspect", str(vector), env={"COLUMNS": "0"})
    assert shown.returncode == 0 and "note" in shown.stdout.decode("utf-8")  # the metadata table


def test_a_deleted_working_directory_is_one_line(tmp_path):
    """torch's loader aborted the process with an MKL fatal error there."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
            "sys.argv = ['rs-local', 'models', 'list']; from rs_local.cli.main import main; main()")
    done = subprocess.run([sys.executable, "-c", code, str(gone)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: the current directory no longer exists (it was deleted): "
                                   "cd to one that does and run again")


def test_utf8_arguments_under_an_ascii_locale_are_read_as_utf8():
    """LC_ALL=C without Python's UTF-8 mode hands valid UTF-8 over as surrogates; it was refused."""
    import click

    from rs_local.cli.options import utf8_text

    raw = "Réponds 🚀".encode("utf-8")
    assert utf8_text(None, None, raw.decode("ascii", "surrogateescape")) == "Réponds 🚀"
    with pytest.raises(click.BadParameter, match="not valid UTF-8"):
        utf8_text(None, None, b"caf\xe9".decode("ascii", "surrogateescape"))


def test_undecodable_chat_input_is_a_line_of_its_own_not_the_end(smollm2_path):
    """With PYTHONIOENCODING=utf-8, one latin-1 byte raised UnicodeDecodeError and ended the chat."""
    done = _rs_local("chat", "--model", str(smollm2_path), "--max-tokens", "2", "--threads", "1",
                     input=b"caf\xe9\nhello\n", env={"PYTHONIOENCODING": "utf-8"})
    out = done.stdout.decode("utf-8", errors="replace") + done.stderr.decode("utf-8", errors="replace")
    assert done.returncode == 0, out
    assert "not valid UTF-8" in out and "Traceback" not in out


def test_piped_chat_input_is_utf8_whatever_the_locale(smollm2_path):
    """Under ``LC_ALL=C`` (no UTF-8 mode) Python reads stdin as ASCII: a file of Chinese piped into
    ``chat`` was "not valid UTF-8 text" though it was. Redirected input is read as UTF-8 now."""
    done = _rs_local("chat", "--model", str(smollm2_path), "--max-tokens", "2", "--threads", "1",
                     input=TEXT.encode("utf-8") + b"\n", env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
                                                             "PYTHONIOENCODING": ""})
    out = done.stdout.decode("utf-8", errors="replace") + done.stderr.decode("utf-8", errors="replace")
    assert done.returncode == 0 and "not valid UTF-8" not in out and "Traceback" not in out, out


def test_best_effort_stream_swallows_only_os_errors():
    from rs_local.cli.streams import BestEffort

    class Full:
        encoding = "utf-8"

        def write(self, text):
            if isinstance(text, bytes):
                raise TypeError("text only")
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    quiet = BestEffort(Full())
    assert quiet.write("progress") == len("progress")
    quiet.flush()
    assert quiet.encoding == "utf-8"
    with pytest.raises(TypeError):  # click probes a stream with bytes: that answer must stay
        quiet.write(b"")


def test_an_allocation_that_fails_is_one_line():
    """torch reports a failed allocation as a RuntimeError (a traceback); the memory check before a fit
    cannot see every later allocation."""
    import click
    import torch
    from click.testing import CliRunner

    from rs_local.cli.main import OUT_OF_MEMORY, _Group

    @click.group(cls=_Group)
    def group() -> None:
        pass

    @group.command()
    def huge() -> None:
        torch.empty(1 << 50, dtype=torch.float32)  # 4 PB: the allocator refuses at once

    res = CliRunner().invoke(group, ["huge"])
    line = res.output.strip()
    assert res.exit_code == 1 and line.startswith(f"Error: {OUT_OF_MEMORY} [") and "allocate" in line, res.output
    assert len(line.splitlines()) == 1


def test_a_thread_that_cannot_start_is_one_line_about_the_limit():
    """Under a container's pid limit, Python's "can't start new thread" was a traceback from the loading
    spinner (generate) or blamed the model file (fit: "Transformers could not load it"). The exception is
    Python's own, raised by threading when the OS refuses; root ignores the limit, so it is raised here."""
    import threading

    import click
    from click.testing import CliRunner

    from rs_local.cli.main import NO_THREADS, _Group

    @click.group(cls=_Group)
    def group() -> None:
        pass

    @group.command()
    def spin() -> None:
        raise RuntimeError("can't start new thread")  # what threading.Thread.start raises then

    res = CliRunner().invoke(group, ["spin"])
    assert res.exit_code == 1 and res.output.strip() == f"Error: {NO_THREADS}", res.output


def test_a_thread_refused_under_an_address_space_limit_names_that_limit_too():
    """Under ``ulimit -v`` a thread's stack may not fit; the message named only pid limits."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (64 << 30, 64 << 30))

    code = "from rs_local.cli.main import _address_space_note; print(_address_space_note())"
    limited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert limited.stdout.strip() == "; or the address-space limit (ulimit -v, now 65,536 MiB) left no room for a thread's stack"
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert free.stdout.strip() == ""


def test_a_dash_or_nothing_as_an_output_is_not_a_file_name(tmp_path):
    """``respond -o -`` wrote a file named "-" where standard output was meant."""
    from rs_local.errors import FileProblem
    from rs_local.files import check_output_path

    for name in ("-", ""):
        with pytest.raises(FileProblem, match="is not a file name"):
            check_output_path(name)
