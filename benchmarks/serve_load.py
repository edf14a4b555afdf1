"""Load on ``rs-local serve`` with mixed steering, beside llama-cpp-python's own server, in one run.

Each phase sends a fixed number of greedy chat requests from ``--clients`` concurrent clients
to a server on 127.0.0.1 and measures errors, latency (p50/p95, as the client sees it) and
aggregate completion tokens/s. The servers are started together and the phases take turns in
``--rounds`` slices, so load that drifts during the run (a shared machine) falls on all alike:

* llama-cpp-python's server (through ``rs_local.runtime.upstream_server``, which applies the
  AMX-safe repack decision), plain model: the baseline;
* ``rs-local serve`` (default: steering re-applied before every request, only the chat
  template's head reused, per steering), once with no steering and once with mixed steering
  (none / +vector / -vector);
* ``rs-local serve --prefix-cache``, the same two phases.

Leaks: after the rounds every distinct (prompt, steering) pair of a mixed phase is sent alone
and every concurrent answer must equal its solo answer. Switch cost: the server's own time in
``set_vectors`` over its busy time, and mixed against plain latency on the same server.

Where the time goes: a breakdown line per phase, per request: prompt evaluation (ms, and how
many of the prompt's tokens were evaluated rather than taken from a cache), decoding (ms, and
per decode), the rest of the server's busy time (sampling, detokenising, template, vector
switch) and the time outside it (HTTP, JSON, thread hops, idle). rs-local's figures come from its
``/health`` stats; llama-cpp-python's from the ``llama_perf_context_print`` lines its server
prints per request (its own llama.cpp timers; its busy time is not known, so the rest is one
figure). Each server answers one warm-up request before its first phase.

    python benchmarks/serve_load.py [--model smollm2-135m] [--clients 8] [--requests 48] [--max-tokens 16] [--rounds 4]

Targets (issue 13): 0 errors, 0 leaks, steered throughput >= 0.9x llama-cpp-python's,
switches < 5% of latency.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rs_local import models
from rs_local.converters.gguf_io import write_control_vector
from rs_local.runtime.host import default_threads
from rs_local.vectors.control_vector import ControlVector

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Explain what a hash map is.",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "What is 12 times 7?",
]
STEERINGS = [[], [{"name": "tilt", "scale": 4.0}], [{"name": "lean", "scale": -4.0}]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_vector(seed: int, n_embd: int, layers: range, norm: float = 8.0) -> ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in layers:
        d = rng.standard_normal(n_embd).astype(np.float32)
        dirs[layer] = d * np.float32(norm / np.linalg.norm(d))
    return ControlVector(dirs, "", {"method": "random", "seed": seed})


class Server:
    """A server process in its own group; ``health`` is the URL polled until it answers."""

    def __init__(self, cmd: list[str], port: int, health: str, log: Path | None = None):
        self.port, self.base, self.log = port, f"http://127.0.0.1:{port}", log
        err = open(log, "wb") if log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        finally:
            if log is not None:
                err.close()
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.base + health, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd[:4]} did not come up")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read()).get("stats", {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Result:
    ok: bool
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0


@dataclass
class Phase:
    name: str
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    leaks: int | None = None
    switch_share: float | None = None
    #: server-side totals over the phase: prompt_s, prompt_evaluated, decode_s, decodes, and busy_s when known
    work: dict = field(default_factory=dict)

    def merge(self, part: "Phase") -> None:
        """Add one round's requests, wall time and server totals to this phase."""
        self.results += part.results
        self.wall += part.wall
        for key, value in part.work.items():
            self.work[key] = self.work.get(key, 0) + value
        if self.work.get("busy_s"):
            self.switch_share = self.work["switch_s"] / self.work["busy_s"]

    def row(self) -> dict:
        lat = sorted(r.seconds for r in self.results if r.ok)
        tokens = sum(r.tokens for r in self.results if r.ok)
        return {
            "phase": self.name, "errors": sum(not r.ok for r in self.results),
            "leaks": "-" if self.leaks is None else self.leaks,
            "p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
            "p95_ms": 1e3 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
            "tok_s": tokens / self.wall if self.wall else 0.0,
            "switch": "-" if self.switch_share is None else f"{100 * self.switch_share:.2f}%",
        }


def request(base: str, model: str, prompt: str, steering: list | None, max_tokens: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "repeat_penalty": 1.0}  # llama-cpp-python's default penalty is 1.1; make the work equal
    if steering is not None:
        body["steering"] = {"vectors": steering}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
    except (OSError, ValueError):
        return Result(False, seconds=time.perf_counter() - t0)
    return Result(True, out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"],
                  time.perf_counter() - t0, out["usage"]["prompt_tokens"])


def plan(n: int, mixed: bool) -> list[tuple[str, int]]:
    """(prompt, steering index) for each request; mixed cycles the steerings against the prompts."""
    return [(PROMPTS[i % len(PROMPTS)], (i // len(PROMPTS) + i) % len(STEERINGS) if mixed else 0) for i in range(n)]


def run_phase(name: str, server: Server, model: str, jobs: list[tuple[str, int]], args, steer: bool) -> Phase:
    phase = Phase(name)
    before = server.stats() if steer else {}
    log_from = server.log.stat().st_size if server.log else 0

    def one(job):
        prompt, s = job
        return request(server.base, model, prompt, STEERINGS[s] if steer else None, args.max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        phase.results = list(pool.map(one, jobs))
    phase.wall = time.perf_counter() - t0
    if steer:
        after = server.stats()
        diff = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
        busy = diff["busy_s"]
        phase.switch_share = diff["switch_s"] / busy if busy else None
        phase.work = {"prompt_s": diff["prompt_s"], "prompt_evaluated": diff["prompt_tokens_evaluated"],
                      "decode_s": diff["decode_s"], "decodes": diff["decodes"], "busy_s": busy,
                      "switch_s": diff["switch_s"], "queue_s": diff["queue_s"]}
    elif server.log:
        time.sleep(0.2)  # the last request's timing lines
        phase.work = upstream_work(server.log, log_from)
    return phase


PERF = re.compile(r"llama_perf_context_print:\s+(prompt eval|eval) time =\s+([\d.]+) ms /\s+(\d+) (?:tokens|runs)")


def upstream_work(log: Path, start: int) -> dict:
    """Sum llama-cpp-python's per-request llama.cpp timers from its log, from byte ``start`` on."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", errors="replace")
    work = {"prompt_s": 0.0, "prompt_evaluated": 0, "decode_s": 0.0, "decodes": 0}
    for kind, ms, n in PERF.findall(text):
        key = "prompt" if kind == "prompt eval" else "decode"
        work[f"{key}_s"] += float(ms) / 1e3
        work["prompt_evaluated" if key == "prompt" else "decodes"] += int(n)
    return work


def breakdown(phase: Phase) -> str:
    """One line: where a request's share of the phase's wall time went (ms per request)."""
    ok = [r for r in phase.results if r.ok]
    w, n = phase.work, len(ok)
    if not w or not n:
        return f"{phase.name:38} breakdown n/a"
    prompt_tokens = sum(r.prompt_tokens for r in ok) / n
    per = lambda seconds: 1e3 * seconds / n  # noqa: E731
    line = (f"{phase.name:38} per request: prompt {per(w['prompt_s']):5.0f} ms "
            f"({w['prompt_evaluated'] / n:4.1f} of {prompt_tokens:4.1f} tokens evaluated, "
            f"{1e3 * w['prompt_s'] / max(w['prompt_evaluated'], 1):4.1f} ms each) | decode {per(w['decode_s']):5.0f} ms "
            f"({w['decodes'] / n:4.1f} x {1e3 * w['decode_s'] / max(w['decodes'], 1):4.1f} ms)")
    engine = w["prompt_s"] + w["decode_s"]
    if "busy_s" in w:
        return line + (f" | rest of worker {per(w['busy_s'] - engine):4.0f} ms | outside worker "
                       f"{per(phase.wall - w['busy_s']):4.0f} ms")
    return line + f" | rest (sampling, HTTP, idle) {per(phase.wall - engine):4.0f} ms"


def count_leaks(server: Server, model: str, jobs: list[tuple[str, int]], results: list[Result], args) -> int:
    """Concurrent answers that differ from the same request sent alone."""
    solo = {}
    for key in sorted(set(jobs)):
        solo[key] = request(server.base, model, key[0], STEERINGS[key[1]], args.max_tokens).text
    return sum(r.ok and r.text != solo[job] for job, r in zip(jobs, results))


def ours(vectors: Path, port: int, args, extra: list[str]) -> Server:
    cmd = [sys.executable, "-m", "rs_local.cli.main", "serve", "--model", args.model, "--port", str(port),
           "--ctx", str(args.ctx), "--threads", str(args.threads),
           "--vector", f"tilt={vectors / 'tilt.gguf'}", "--vector", f"lean={vectors / 'lean.gguf'}", *extra]
    return warm(Server(cmd, port, "/health"), args)


def upstream(path: Path, port: int, args, log: Path) -> Server:
    """llama-cpp-python's server, verbose (its default): its per-request timer lines go to ``log``."""
    cmd = [sys.executable, "-m", "rs_local.runtime.upstream_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--verbose", "True"]
    return warm(Server(cmd, port, "/v1/models", log), args)


def warm(server: Server, args) -> Server:
    """One request before measuring: a server's first decode allocates its compute buffers."""
    request(server.base, args.model_id, "Hello.", None, 2)
    return server


def print_table(phases: list[Phase]) -> None:
    rows = [p.row() for p in phases]
    print(f"{'phase':38} {'errors':>6} {'leaks':>5} {'p50 ms':>8} {'p95 ms':>8} {'tok/s':>7} {'set_vectors':>11}")
    for r in rows:
        print(f"{r['phase']:38} {r['errors']:>6} {str(r['leaks']):>5} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
              f"{r['tok_s']:>7.1f} {r['switch']:>11}")


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b and a == a and b == b else "n/a"


def print_ratios(phases: dict[str, Phase]) -> None:
    base = phases[BASE].row()
    for name in [n for n in phases if n.startswith("rs-local")]:
        row = phases[name].row()
        print(f"{name:38} tok/s {ratio(row['tok_s'], base['tok_s'])}  p50 {ratio(row['p50_ms'], base['p50_ms'])}  "
              f"p95 {ratio(row['p95_ms'], base['p95_ms'])}  (vs llama-cpp-python)")
    for server in ("rs-local serve", "rs-local serve --prefix-cache"):
        plain, mixed = phases[f"{server}, plain"].row(), phases[f"{server}, mixed"].row()
        print(f"{server:38} mixed/plain p50 {ratio(mixed['p50_ms'], plain['p50_ms'])}  "
              f"tok/s {ratio(mixed['tok_s'], plain['tok_s'])}  (cost of switching steering)")


BASE = "llama-cpp-python server, plain"


def rounds(servers: dict[str, Server], model_id: str, args) -> dict[str, Phase]:
    """Every phase in ``args.rounds`` slices, the phases taking turns, so load that drifts on a shared
    machine falls on all of them alike (one phase after another, a baseline run first once ran at
    32 ms a decode and the phases after it at 39-47)."""
    phases: dict[str, Phase] = {}
    specs = [(BASE, "upstream", False)] + [(f"{label}, {'mixed' if mixed else 'plain'}", label, mixed)
                                           for label in ("rs-local serve", "rs-local serve --prefix-cache")
                                           for mixed in (False, True)]
    size = -(-args.requests // args.rounds)
    for r in range(args.rounds):
        for name, server, mixed in specs:
            jobs = plan(args.requests, mixed)[r * size:(r + 1) * size]
            part = run_phase(name, servers[server], model_id, jobs, args, steer=server != "upstream")
            phases.setdefault(name, Phase(name)).merge(part)
    for name, server, mixed in specs:
        if mixed:
            phases[name].leaks = count_leaks(servers[server], model_id, plan(args.requests, True),
                                             phases[name].results, args)
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--rounds", type=int, default=4, help="slices each phase is run in, the phases taking turns")
    args = ap.parse_args()
    path = models.resolve(args.model)
    model_id = args.model_id = args.model if args.model in models.MODELS else path.stem
    print(f"model {path.name}, {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens, "
          f"greedy, {args.threads} threads, ctx {args.ctx}, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        vectors = Path(tmp)
        n_embd, n_layer = _model_shape(path)
        for seed, name in ((1, "tilt"), (2, "lean")):
            vec = random_vector(seed, n_embd, range(n_layer // 5, 2 * n_layer // 3))
            write_control_vector(vec, vectors / f"{name}.gguf")
        servers: dict[str, Server] = {}
        try:  # all up at once (an idle server costs nothing); the phases then take turns
            servers["upstream"] = upstream(path, free_port(), args, Path(tmp) / "upstream.log")
            servers["rs-local serve"] = ours(vectors, free_port(), args, [])
            servers["rs-local serve --prefix-cache"] = ours(vectors, free_port(), args, ["--prefix-cache"])
            phases = rounds(servers, model_id, args)
        finally:
            for srv in servers.values():
                srv.stop()
    print_table(list(phases.values()))
    print()
    for phase in phases.values():
        print(breakdown(phase))
    print()
    print_ratios(phases)


def _model_shape(path: Path) -> tuple[int, int]:
    """n_embd and block count from the GGUF header (no model load in this process)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    get = lambda key: int(reader.fields[f"{arch}.{key}"].parts[-1][0])  # noqa: E731
    return get("embedding_length"), get("block_count")


if __name__ == "__main__":
    main()
