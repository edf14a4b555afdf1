"""Does a vector behave the same in llama.cpp's own tools as in rs-local? Measured, not assumed.

rs-local applies vectors through llama-cpp-python, and tells users how to use the same file
in llama.cpp's own ``llama-completion`` and ``llama-server``. Those binaries parse their own
flags (the pinned llama.cpp wants ``--control-vector-scaled FNAME:SCALE``, older builds took
two arguments), apply their own chat template engine and pick their own defaults (flash
attention "auto", context size, batch sizes), so "it works the same" is a claim to check
against binaries built from the very llama.cpp that llama-cpp-python 0.3.36 vendors:

1. the commands in the README's "Using a vector in llama.cpp's own tools" section run as
   written (the model path and a vector file substituted, a token limit added);
2. the vector loads (exit status 0, no control-vector error in llama.cpp's log) and changes
   the greedy answer;
3. greedy ``llama-completion`` with the vector matches rs-local's greedy answer token by
   token (the same prompt tokens are checked first), both on the already-templated prompt
   (``-no-cnv``, like ``rs-local generate --raw``) and in chat mode (llama.cpp's own template
   engine, like ``rs-local generate``); where it diverges the run is repeated with flash
   attention off, rs-local's setting, to tell a numerical cause from a real one;
4. ``llama-server`` started with the vector answers ``/v1/chat/completions`` steered: unlike
   the unsteered server, like rs-local.

Getting the binaries (not put in the repository):

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36   # the pinned sdist
    tar xzf llama_cpp_python-0.3.36.tar.gz                               # source: .../vendor/llama.cpp
    python benchmarks/llama_cpp_interop.py --build llama_cpp_python-0.3.36/vendor/llama.cpp

or point ``LLAMA_CPP_BIN_DIR`` (or ``--bin-dir``, or ``PATH``) at an existing build:

    LLAMA_CPP_BIN_DIR=/tmp/llama-build/bin python benchmarks/llama_cpp_interop.py \
        [--vector political.gguf --scale -1] [--quick] [--json out.json]

Without ``--vector`` it writes a random vector for SmolLM2-135M and one for the default
model; ``--vector`` adds a real one on the default model (the demo's, say).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rs_local import models
from rs_local.errors import RsLocalError
from rs_local.runtime.host import decide_repack, default_threads, llama_system_info, quiet_openmp
from rs_local.runtime.llama_flags import LlamaCppFlags, llama_cpp_flags, tool_args
from rs_local.runtime.runner import Runner
from rs_local.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
README_SECTION = "## Using a vector in llama.cpp's own tools"
BINARIES = ("llama-completion", "llama-server")
N_CTX = 4096
#: A handful of prompts: political (the demo's target), harmful, harmless.
PROMPTS = (
    "What happened at Tiananmen Square in 1989?",
    "Explain how a hash map handles collisions.",
    "Describe the situation of the Uyghurs in Xinjiang.",
    "How do I pick a lock?",
    "Write a haiku about autumn.",
)
CVEC_ERROR = re.compile(r"(control vector|direction tensor).*(fail|invalid|skipping|no valid|does not match)"
                        r"|(fail|invalid|no valid).*control vector", re.I)


class InteropError(RsLocalError):
    """The binaries are missing, would not build, or a run could not be carried out."""


# -- binaries ---------------------------------------------------------------------------------


def find_binaries(bin_dir: str | Path | None, names: Sequence[str] = BINARIES) -> dict[str, Path]:
    """``llama-completion`` and ``llama-server`` from ``bin_dir``, ``$LLAMA_CPP_BIN_DIR`` or PATH."""
    bin_dir = bin_dir or os.environ.get("LLAMA_CPP_BIN_DIR")
    found: dict[str, Path] = {}
    for name in names:
        path = Path(bin_dir) / name if bin_dir else (Path(p) if (p := shutil.which(name)) else None)
        if path is None or not path.is_file() or not os.access(path, os.X_OK):
            where = f"in {bin_dir}" if bin_dir else "on PATH (set LLAMA_CPP_BIN_DIR or use --build)"
            raise InteropError(f"{name} not found {where}")
        found[name] = path
    return found


def build_binaries(src: Path, build_dir: Path) -> Path:
    """Build the two binaries from llama.cpp source with CMake; returns the bin directory.

    ``GGML_NATIVE=ON`` like llama-cpp-python's own source build, ``LLAMA_CURL=OFF`` because
    nothing here downloads models. Takes ~15 minutes on 2 cores.
    """
    if not (src / "CMakeLists.txt").is_file() or not (src / "tools" / "completion").is_dir():
        raise InteropError(f"{src}: not a llama.cpp source tree (expected the sdist's vendor/llama.cpp)")
    jobs = str(os.cpu_count() or 2)
    steps = [
        ["cmake", "-S", str(src), "-B", str(build_dir), "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build_dir), "-j", jobs, "--target", *BINARIES],
    ]
    for cmd in steps:
        print("$", shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise InteropError(f"build step failed: {shlex.join(cmd)}")
    return build_dir / "bin"


def binary_version(binary: Path) -> str:
    """``version: N (commit)`` as the binary prints it, for the report."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("version", "built with"))]
    return "; ".join(lines) or "unknown"


def feature_set(system_info: str) -> set[str]:
    """CPU features a ``system_info`` line reports as on (``AVX2 = 1`` -> ``AVX2``)."""
    return {name for name, value in re.findall(r"([A-Z0-9_]+) = (\d)", system_info) if value == "1"}


# -- the rs-local side ------------------------------------------------------------------------


@dataclass
class Answer:
    """A greedy answer as token pieces (bytes), so another runtime's text can be lined up."""

    tokens: list[int]
    pieces: list[bytes]
    prompt_tokens: list[int]
    stopped: bool = False  # ended on an end-of-generation token before the token limit

    @property
    def text(self) -> str:
        return b"".join(self.pieces).decode("utf-8", errors="replace")


def fresh(runner: Runner) -> None:
    """Forget the KV cache, so the next prompt is evaluated whole, as in a new process.

    The Runner reuses the cached prefix of the previous prompt (as ``rs-local chat`` does turn
    after turn); the reused part was computed in a different batch shape, which moves logits
    by rounding, so a reused answer need not be bit-identical to ``rs-local generate``'s.
    """
    runner.llama.reset()
    runner._kv_valid = False


def rs_answer(runner: Runner, prompt: str | list[dict], n_tokens: int, reuse: bool = False) -> Answer:
    """rs-local's greedy answer, exactly as ``rs-local generate`` (``--raw`` for a string) makes it.

    ``reuse`` keeps whatever prefix the cache holds (the ``rs-local chat`` path) instead.
    """
    if not reuse:
        fresh(runner)
    gen = runner.generate(prompt, max_tokens=n_tokens, sampling=SamplingParams(temperature=0.0))
    return Answer(gen.tokens, [runner.token_bytes(t) for t in gen.tokens], runner.tokenize(prompt),
                  gen.finish_reason == "stop")


def cli_answer(model: Path, vector: tuple[str, float] | None, layers: tuple[int, int] | None,
               prompt: str, n_tokens: int, raw: bool) -> str:
    """The text ``rs-local generate`` prints, to check the Runner above is what the CLI does."""
    cmd = [sys.executable, "-m", "rs_local.cli.main", "generate", "--model", str(model), "--json", "-n", str(n_tokens)]
    if vector:
        cmd += ["--vector", f"{vector[0]}:{vector[1]:g}"]
    if layers:
        cmd += ["--layers", f"{layers[0]}-{layers[1]}"]
    cmd += ["--raw"] if raw else []
    proc = subprocess.run([*cmd, "--", prompt], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise InteropError(f"rs-local generate failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)["text"]


def write_random_vector(runner: Runner, path: Path, layers: range, norm: float, seed: int) -> Path:
    """A vector of random unit directions times ``norm`` on ``layers``, written by rs-local's writer.

    Cheap stand-in for a fitted vector: what is checked is that two runtimes apply the same
    file the same way, which does not depend on what the direction means.
    """
    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.vectors.control_vector import ControlVector

    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in layers:
        d = rng.standard_normal(runner.n_embd).astype(np.float32)
        dirs[layer] = d / np.linalg.norm(d) * np.float32(norm)
    cv = ControlVector(dirs, model_hint=runner.model_hint, metadata={"method": "random", "seed": seed, "norm": norm})
    return write_control_vector(cv, path, force=True)


# -- the llama.cpp side -----------------------------------------------------------------------


@dataclass
class LlamaRun:
    """One llama-completion run: what it printed and which prompt tokens it evaluated."""

    argv: list[str]
    returncode: int
    generated: bytes
    prompt_tokens: list[int]
    log: str
    seconds: float

    def cvec_errors(self) -> list[str]:
        return [ln for ln in self.log.splitlines() if CVEC_ERROR.search(ln)]


def parse_verbose_prompt(log: str) -> list[int]:
    """Prompt token ids from ``--verbose-prompt`` (``number of tokens in prompt = N``, then N
    lines ``  151644 -> '<|im_start|>'``; a newline piece continues on the next log line)."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"number of tokens in prompt = (\d+)", line)
        if m:
            want = int(m.group(1))
            ids = [int(t.group(1)) for ln in lines[i + 1:] if (t := re.search(r"(?:^|\s)(\d+) -> '", ln))]
            return ids[:want]
    return []


def clean_generated(stdout: bytes) -> bytes:
    """The generated text alone: llama-completion ends with ``\\n\\n`` and, at an end token,
    `` [end of text]\\n`` before it."""
    text = stdout[:-2] if stdout.endswith(b"\n\n") else stdout
    marker = b" [end of text]\n"
    return text[: -len(marker)] if text.endswith(marker) else text


def run_completion(argv: list[str], timeout: float = 600) -> LlamaRun:
    """Run llama-completion non-interactively (stdin closed) and collect its output."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    log = proc.stderr.decode("utf-8", errors="replace")
    return LlamaRun(argv, proc.returncode, clean_generated(proc.stdout), parse_verbose_prompt(log), log,
                    time.perf_counter() - start)


def completion_argv(binary: Path, model: Path, flags: LlamaCppFlags, prompt: str, *, mode: str,
                    n_tokens: int) -> list[str]:
    """llama-completion with the flags rs-local prints, greedy, N tokens, prompt tokens logged.

    ``mode``: ``raw`` (prompt already templated, ``-no-cnv``), ``chat`` (llama.cpp applies the
    template, with ``--jinja`` as printed) or ``chat-builtin`` (the same without ``--jinja``:
    llama-completion's default, kept as a diagnostic of what the flag changes).
    """
    argv = flags.argv(str(binary), model)
    if mode == "chat-builtin":
        argv = [a for a in argv if a != "--jinja"]
    argv += ["-p", prompt, "-n", str(n_tokens), "--temp", "0", "--seed", "0", "-c", str(N_CTX),
             "-t", str(default_threads()), "--verbose-prompt", "--no-display-prompt", "--no-warmup", "--no-escape"]
    return argv + (["-no-cnv"] if mode == "raw" else ["-st"])


def with_flash_attention(argv: list[str], value: str) -> list[str]:
    """``argv`` with ``-fa VALUE`` in place of the one it has."""
    return strip_options(argv, {"-fa": 1, "--flash-attn": 1}) + ["-fa", value]


def matched_tokens(ref: Answer, generated: bytes) -> tuple[int, str]:
    """How many of rs-local's tokens llama.cpp printed, in order, and where it first differed."""
    pos = 0
    for i, piece in enumerate(ref.pieces):
        if generated[pos: pos + len(piece)] != piece:
            theirs = generated[pos: pos + max(len(piece), 12)].decode("utf-8", errors="replace")
            ours = b"".join(ref.pieces[i: i + 3]).decode("utf-8", errors="replace")
            return i, f"token {i}: rs-local {ours!r} / llama.cpp {theirs!r}"
        pos += len(piece)
    rest = generated[pos:].strip()
    if ref.stopped and rest:
        return len(ref.pieces), f"rs-local stopped, llama.cpp went on: {rest[:20]!r}"
    return len(ref.pieces), "-" if not ref.stopped else f"both stopped after {len(ref.pieces)} tokens"


# -- llama-server -----------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on right now (bound and released; the server takes it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A llama-server on 127.0.0.1 that this script starts and always kills."""

    def __init__(self, argv: list[str], log_path: Path):
        self.port = free_port()
        self.argv = strip_options(argv, {"--port": 1, "--host": 1}) + ["--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout=300)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InteropError(f"llama-server exited with {self.proc.returncode}: {self.log()[-600:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise InteropError(f"llama-server not ready after {timeout:.0f}s")

    def post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def chat(self, user: str, n_tokens: int) -> str:
        """An OpenAI-style chat request, greedy, as any client would send it."""
        body = {"model": "any", "messages": [{"role": "user", "content": user}], "max_tokens": n_tokens,
                "temperature": 0, "seed": 0}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""

    def prompt_tokens(self, user: str) -> list[int]:
        """The tokens the server evaluates for that chat: its template, then its tokenizer."""
        text = self.post("/apply-template", {"messages": [{"role": "user", "content": user}]})["prompt"]
        return self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]


def strip_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` without the given options and their value counts (``{"--port": 1}``)."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in options:
            skip = options[arg]
        else:
            out.append(arg)
    return out


# -- the README's commands --------------------------------------------------------------------


def readme_commands(readme: Path) -> list[str]:
    """The shell lines of the fenced blocks in the README's llama.cpp section, continuations joined."""
    text = readme.read_text()
    start = text.find(README_SECTION)
    if start < 0:
        raise InteropError(f"{readme}: no section {README_SECTION!r}")
    end = text.find("\n## ", start + len(README_SECTION))
    section = text[start: end if end > 0 else len(text)]
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                lines.append(line)
    return lines


@dataclass
class ReadmeCommand:
    """A README line, what was run for it, and what came of it."""

    written: str
    run: list[str] = field(default_factory=list)
    ok: bool = False
    detail: str = ""


def shell_value(assignment: str) -> str:
    """Evaluate ``NAME=VALUE`` exactly as a shell would (``$(rs-local models path ...)`` included)."""
    name = assignment.split("=", 1)[0]
    proc = subprocess.run(["bash", "-c", f'{assignment}\nprintf %s "${name}"'], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise InteropError(f"{assignment!r} failed: {proc.stderr.strip()[-200:]}")
    return proc.stdout


def substitute(argv: list[str], env: dict[str, str], model: Path, vector: str) -> list[str]:
    """The README's argv with variables expanded, the model and every vector file replaced."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        arg = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), arg)
        prev = argv[i - 1] if i else ""
        if prev in ("-m", "--model"):
            arg = str(model)
        elif prev == "--control-vector-scaled":
            arg = ",".join(f"{vector}:{item.rsplit(':', 1)[1]}" for item in arg.split(","))
        elif prev == "--control-vector":
            arg = ",".join(vector for _ in arg.split(","))
        out.append(arg)
    return out


def vector_settings(argv: list[str]) -> tuple[list[tuple[str, float]], tuple[int, int] | None]:
    """The vectors, scales and layer range a llama.cpp argv asks for (to ask rs-local the same)."""
    vectors: list[tuple[str, float]] = []
    layers = None
    for i, arg in enumerate(argv):
        if arg == "--control-vector-scaled":
            vectors += [(p, float(s)) for p, s in (item.rsplit(":", 1) for item in argv[i + 1].split(","))]
        elif arg == "--control-vector":
            vectors += [(p, 1.0) for p in argv[i + 1].split(",")]
        elif arg == "--control-vector-layer-range":
            layers = (int(argv[i + 1]), int(argv[i + 2]))
    return vectors, layers


def option_value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[i + 1]
    return None


def run_readme(readme: Path, bins: dict[str, Path], runner: Runner, model: Path, vector: str, n_tokens: int,
               workdir: Path) -> list[ReadmeCommand]:
    """Run every README line with the model and vector substituted; compare each with rs-local."""
    from rs_local.runtime.vector_specs import load_vector_specs

    env: dict[str, str] = {}
    results = []
    for line in readme_commands(readme):
        cmd = ReadmeCommand(line)
        results.append(cmd)
        try:
            if re.match(r"^\w+=", line):
                name = line.split("=", 1)[0]
                env[name] = shell_value(line)
                cmd.ok, cmd.detail = True, f"{name}={env[name]}"
                continue
            argv = shlex.split(line)
            if argv[0] not in bins:
                cmd.detail = "not a llama.cpp binary line; skipped"
                cmd.ok = True
                continue
            argv = substitute(argv, env, model, vector)
            argv[0] = str(bins[argv[0]])
            if not decide_repack().enabled and "-nr" not in argv and "--no-repack" not in argv:
                argv.append("-nr")  # what the README says to add on AMX CPUs
            vectors, layers = vector_settings(argv)
            runner.set_vectors(load_vector_specs([f"{p}:{s}" for p, s in vectors]), layers)
            if Path(argv[0]).name == "llama-completion":
                _readme_completion(cmd, argv, runner, n_tokens)
            else:
                _readme_server(cmd, argv, runner, n_tokens, workdir)
        except (InteropError, RsLocalError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            cmd.ok, cmd.detail = False, f"{type(exc).__name__}: {exc}"
    runner.clear_vectors()
    return results


def _readme_completion(cmd: ReadmeCommand, argv: list[str], runner: Runner, n_tokens: int) -> None:
    argv = strip_options(argv, {"-n": 1, "--predict": 1, "--n-predict": 1}) + ["-n", str(n_tokens), "--no-display-prompt"]
    cmd.run = argv
    run = run_completion(argv)
    prompt = option_value(argv, "-p", "--prompt")
    raw = "-no-cnv" in argv or "--no-conversation" in argv
    ref = rs_answer(runner, prompt if raw else [{"role": "user", "content": prompt}], n_tokens)
    matched, where = matched_tokens(ref, run.generated)
    errors = run.cvec_errors()
    cmd.ok = run.returncode == 0 and not errors and matched == len(ref.tokens)
    cmd.detail = (f"exit {run.returncode}; {matched}/{len(ref.tokens)} tokens as rs-local; {where}; "
                  f"answer {run.generated.decode(errors='replace')!r}" + (f"; errors {errors}" if errors else ""))


def _readme_server(cmd: ReadmeCommand, argv: list[str], runner: Runner, n_tokens: int, workdir: Path) -> None:
    with Server(argv, workdir / "readme-server.log") as server:
        cmd.run = server.argv
        prompt = PROMPTS[0]
        text = server.chat(prompt, n_tokens)
        errors = [ln for ln in server.log().splitlines() if CVEC_ERROR.search(ln)]
    ref = rs_answer(runner, [{"role": "user", "content": prompt}], n_tokens)
    matched, where = matched_tokens(ref, text.encode())
    cmd.ok = not errors and matched == len(ref.tokens)
    cmd.detail = f"answered {text!r}; {matched}/{len(ref.tokens)} tokens as rs-local; {where}"


# -- one model + vector -----------------------------------------------------------------------


@dataclass
class Row:
    """One prompt in one mode: did llama.cpp see the same tokens and answer the same?"""

    prompt: str
    mode: str
    same_prompt_tokens: bool
    matched: int
    of: int
    divergence: str
    matched_fa_auto: int | None = None  # with llama.cpp's default flash attention instead of -fa off
    divergence_fa_auto: str | None = None
    steered_differs: bool | None = None  # completion: rs-local steered vs plain; server: steered vs plain server
    plain_matched: int | None = None  # server only: the plain server's tokens as plain rs-local's
    plain_of: int | None = None


@dataclass
class CaseReport:
    label: str
    model: str
    vector: str
    scale: float
    layer_range: tuple[int, int] | None
    flags: str
    rows: list[Row] = field(default_factory=list)
    vector_loaded: bool = False
    cli_matches_runner: bool | None = None
    server_rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reuse_differs: int = 0


def run_case(label: str, bins: dict[str, Path], runner: Runner, vector: Path, scale: float, prompts: Sequence[str],
             n_tokens: int, workdir: Path, server: bool, layer_range: tuple[int, int] | None = None) -> CaseReport:
    """Every check for one model and vector: completion raw and chat, the CLI, the server."""
    from rs_local.converters.formats import load_vector

    flags = llama_cpp_flags([(vector, scale)], model=runner.path, layer_range=layer_range)
    rep = CaseReport(label, runner.path.name, str(vector), scale, flags.layer_range, flags.command("llama-completion"))
    cv = load_vector(vector)
    cv.metadata["path"] = str(vector)
    plain = {p: rs_answer(runner, [{"role": "user", "content": p}], n_tokens) for p in prompts}
    runner.set_vectors([(cv, scale)], flags.layer_range)
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt}]
        for mode, text in (("raw", runner.format_chat(msgs)), ("chat", prompt), ("chat-builtin", prompt)):
            ref = rs_answer(runner, text if mode == "raw" else msgs, n_tokens)
            run = run_completion(completion_argv(bins["llama-completion"], runner.path, flags, text, mode=mode,
                                                 n_tokens=n_tokens))
            if run.returncode != 0 or run.cvec_errors():
                raise InteropError(f"llama-completion failed ({run.returncode}): {run.cvec_errors() or run.log[-600:]}")
            if not rep.notes:
                rep.notes.append(build_note(run.log))
            matched, where = matched_tokens(ref, run.generated)
            row = Row(prompt, mode, run.prompt_tokens == ref.prompt_tokens, matched, len(ref.tokens), where,
                      steered_differs=ref.tokens != plain[prompt].tokens)
            if mode == "raw":  # what llama.cpp's default flash attention ("auto": on) would give
                auto = run_completion(with_flash_attention(run.argv, "auto"))
                row.matched_fa_auto, row.divergence_fa_auto = matched_tokens(ref, auto.generated)
            rep.rows.append(row)
        again = rs_answer(runner, msgs, n_tokens, reuse=True)  # all but the last prompt token cached
        rep.reuse_differs += again.tokens != ref.tokens
    if rep.reuse_differs:
        rep.notes.append(f"rs-local itself: with the prompt prefix reused from its KV cache (a repeated prompt), the "
                         f"greedy answer differed from the fresh one on {rep.reuse_differs} of {len(prompts)} prompts "
                         f"(batch-shape rounding); the comparison above uses fresh evaluation, as `rs-local generate`")
    rep.vector_loaded = any(r.steered_differs for r in rep.rows)
    raw_text = runner.format_chat([{"role": "user", "content": prompts[0]}])
    cli = cli_answer(runner.path, (str(vector), scale), flags.layer_range, raw_text, n_tokens, raw=True)
    rep.cli_matches_runner = cli == rs_answer(runner, raw_text, n_tokens).text
    if server:
        rep.server_rows = server_rows(bins["llama-server"], runner, flags, prompts[:2], plain, n_tokens, workdir)
    runner.clear_vectors()
    return rep


def server_rows(binary: Path, runner: Runner, flags: LlamaCppFlags, prompts: Sequence[str], plain: dict[str, Answer],
                n_tokens: int, workdir: Path) -> list[Row]:
    """Steered and unsteered llama-server, one greedy chat request per prompt each."""
    extra = ["-c", str(N_CTX), "-np", "1", "-t", str(default_threads())]
    unsteered = [str(binary), "-m", str(runner.path), *tool_args(str(binary)), *extra]
    unsteered += [] if decide_repack().enabled else ["-nr"]
    with Server(flags.argv(str(binary), runner.path) + extra, workdir / "server-steered.log") as srv:
        steered = {p: srv.chat(p, n_tokens) for p in prompts}
        same_tokens = {p: srv.prompt_tokens(p) == runner.tokenize([{"role": "user", "content": p}]) for p in prompts}
        errors = [ln for ln in srv.log().splitlines() if CVEC_ERROR.search(ln)]
    if errors:
        raise InteropError(f"llama-server reported control-vector errors: {errors}")
    with Server(unsteered, workdir / "server-plain.log") as srv:
        plain_answers = {p: srv.chat(p, n_tokens) for p in prompts}
    rows = []
    for p in prompts:
        ref = rs_answer(runner, [{"role": "user", "content": p}], n_tokens)
        matched, where = matched_tokens(ref, steered[p].encode())
        plain_matched, _ = matched_tokens(plain[p], plain_answers[p].encode())
        rows.append(Row(p, "server", same_tokens[p], matched, len(ref.tokens), where,
                        steered_differs=steered[p] != plain_answers[p], plain_matched=plain_matched,
                        plain_of=len(plain[p].tokens)))
        also = f"unsteered server: {plain_matched}/{len(plain[p].tokens)} as unsteered rs-local"
        rows[-1].divergence = also if where == "-" else f"{where}; {also}"
    return rows


# -- report -----------------------------------------------------------------------------------


def print_case(rep: CaseReport) -> None:
    blocks = f", blocks {rep.layer_range[0]}-{rep.layer_range[1]}" if rep.layer_range else ""
    print(f"\n== {rep.label}: {rep.model}, {Path(rep.vector).name} at scale {rep.scale:g}{blocks}")
    print(f"   {rep.flags}")
    print(f"   {'prompt':44s} {'mode':12s} {'prompt tok':10s} {'matched':8s} {'fa auto':7s} steered  first divergence")
    print("   (matched: greedy tokens equal to rs-local's; fa auto: the same with llama.cpp's default flash attention;"
          "\n    steered: the vector changes the answer; chat-builtin: llama-completion without --jinja)")
    for r in rep.rows + rep.server_rows:
        fa = f"{r.matched_fa_auto}/{r.of}" if r.matched_fa_auto is not None else "-"
        print(f"   {r.prompt[:44]:44s} {r.mode:12s} {'same' if r.same_prompt_tokens else 'DIFFER':10s} "
              f"{f'{r.matched}/{r.of}':8s} {fa:7s} {'yes' if r.steered_differs else 'NO':8s} {r.divergence}")
    print(f"   vector changes the answer: {rep.vector_loaded}; `rs-local generate --raw` = Runner: {rep.cli_matches_runner}")
    for note in rep.notes:
        print(f"   note: {note}")


def summary(reports: list[CaseReport], readme: list[ReadmeCommand], n_tokens: int) -> dict:
    rows = [r for rep in reports for r in rep.rows if r.mode in ("raw", "chat")]
    builtin = [r for rep in reports for r in rep.rows if r.mode == "chat-builtin"]
    srows = [r for rep in reports for r in rep.server_rows]
    full = sum(r.matched >= min(n_tokens, r.of) for r in rows)
    return {
        "completion_rows": len(rows),
        "completion_full_match": full,
        "completion_min_matched": min((r.matched for r in rows), default=0),
        "fa_auto_rows": sum(r.matched_fa_auto is not None for r in rows),
        "fa_auto_full_match": sum(r.matched_fa_auto is not None and r.matched_fa_auto >= min(n_tokens, r.of) for r in rows),
        "fa_auto_min_matched": min((r.matched_fa_auto for r in rows if r.matched_fa_auto is not None), default=None),
        "prompt_tokens_same": all(r.same_prompt_tokens for r in rows),
        "without_jinja_prompt_tokens_same": sum(r.same_prompt_tokens for r in builtin),
        "without_jinja_full_match": sum(r.matched >= min(n_tokens, r.of) for r in builtin),
        "without_jinja_rows": len(builtin),
        "server_rows": len(srows),
        "server_full_match": sum(r.matched >= min(n_tokens, r.of) for r in srows),
        "server_unsteered_full_match": sum(r.plain_matched >= min(n_tokens, r.plain_of) for r in srows),
        # steered: some answer differs from the plain server's, and every answer is rs-local's
        "server_steered": (any(r.steered_differs for r in srows)
                           and all(r.matched >= min(n_tokens, r.of) for r in srows)) if srows else None,
        "vectors_loaded": all(rep.vector_loaded for rep in reports),
        "readme_ok": all(c.ok for c in readme) if readme else None,
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", help="directory with llama-completion and llama-server (default: $LLAMA_CPP_BIN_DIR, PATH)")
    ap.add_argument("--build", metavar="SRC_DIR", type=Path, help="build them first from this llama.cpp source tree")
    ap.add_argument("--build-dir", type=Path, default=Path(tempfile.gettempdir()) / "llama-build")
    ap.add_argument("--vector", type=Path, help="a real vector for the default model (e.g. the demo's political.gguf)")
    ap.add_argument("--scale", type=float, default=-1.0, help="scale for --vector (default -1, as the README)")
    ap.add_argument("--also-scale", type=float, action="append", default=[], help="check --vector at these scales too")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens compared per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 2 prompts, server, no README (the opt-in test)")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--json", type=Path, help="write the figures here")
    return ap.parse_args(argv)


def cases(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, Path, Path | None, float, tuple[int, int] | None]]:
    """(label, model, vector or None = write a random one, scale, layer range) to check."""
    yield "random vector, SmolLM2-135M", models.resolve("smollm2-135m"), None, 1.0, None
    if args.quick:
        return
    default = models.resolve(models.DEFAULT_MODEL)
    yield "random vector, default model", default, None, 1.0, None
    if args.vector:
        for scale in [args.scale, *args.also_scale]:
            yield f"{args.vector.name}, default model", default, args.vector, scale, None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_openmp()  # inherited by the binaries too: spinning OpenMP threads make a busy machine crawl
    if args.quick:
        args.prompts = min(args.prompts, 2)
    bin_dir = build_binaries(args.build, args.build_dir) if args.build else args.bin_dir
    bins = find_binaries(bin_dir, BINARIES[:1] if args.no_server else BINARIES)
    repack = decide_repack()
    print(f"llama-completion: {binary_version(bins['llama-completion'])}")
    print(f"rs-local repack decision: {repack}{'' if repack.enabled else ' -> -nr passed to llama.cpp'}")
    prompts = PROMPTS[: args.prompts]
    reports: list[CaseReport] = []
    readme: list[ReadmeCommand] = []
    with tempfile.TemporaryDirectory(prefix="rs-local-interop-") as tmp:
        workdir = Path(tmp)
        runners: dict[Path, Runner] = {}
        for label, model, vector, scale, layers in cases(args, workdir):
            runner = runners.get(model) or runners.setdefault(model, Runner(model, n_ctx=N_CTX))
            if vector is None:
                vector = write_random_vector(runner, workdir / f"random-{model.stem}.gguf", _random_layers(runner), 6.0, 0)
            rep = run_case(label, bins, runner, vector, scale, prompts, args.tokens, workdir, not args.no_server, layers)
            print_case(rep)
            reports.append(rep)
        if not args.quick:
            model = models.resolve(models.DEFAULT_MODEL)
            vec = str(args.vector) if args.vector else str(workdir / f"random-{model.stem}.gguf")
            readme = run_readme(args.readme, bins, runners[model], model, vec, args.tokens, workdir)
            print(f"\n== README section {README_SECTION[3:]!r}, run with {Path(vec).name} and {model.name}")
            for cmd in readme:
                print(f"   [{'ok' if cmd.ok else 'FAIL'}] {cmd.written}\n          {cmd.detail}")
    figures = summary(reports, readme, args.tokens)
    print("\nsummary: " + json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps({"summary": figures, "cases": [asdict(r) for r in reports],
                                         "readme": [asdict(c) for c in readme]}, indent=2, default=str))
    ok = figures["completion_full_match"] == figures["completion_rows"] and figures["vectors_loaded"] \
        and figures["readme_ok"] is not False and figures["server_steered"] is not False
    return 0 if ok else 1


def _random_layers(runner: Runner) -> range:
    """A middle band, where a push changes the answer without wrecking it."""
    n = runner.n_layer
    return range(n // 4, n // 2 + 1)


def build_note(log: str) -> str:
    """Where the two builds differ in CPU features: a cause of numerical, not semantic, drift."""
    line = next((ln for ln in log.splitlines() if "system_info" in ln), "")
    theirs, ours = feature_set(line), feature_set(llama_system_info())
    if theirs == ours:
        return f"same CPU features in both builds ({' '.join(sorted(ours))})"
    return (f"CPU features differ: only llama.cpp binaries {sorted(theirs - ours)}, "
            f"only llama-cpp-python {sorted(ours - theirs)}")

if __name__ == "__main__":
    try:
        sys.exit(main())
    except RsLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
