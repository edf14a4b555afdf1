"""``rs-local serve`` as a real server on 127.0.0.1 (SmolLM2), talked to by the official openai client.

Two servers per run: a plain one, and one with ``--api-key`` and a default steering. Vectors
are random directions written with rs-local's own writer, large enough to change greedy text.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import click
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from rs_local.converters.gguf_io import write_control_vector  # noqa: E402
from rs_local.serve.scheduler import StopFilter  # noqa: E402
from rs_local.vectors.control_vector import ControlVector  # noqa: E402

MODEL = "smollm2-135m"
KEY = "test-key-123"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    """Raw HTTP with the standard library (status, headers and body as sent, no client-side checks)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        return json.loads(self.content)

    @staticmethod
    def send(method: str, url: str, body=None, headers: dict[str, str] | None = None) -> "Http":
        """Send like a careful client: the body goes out in chunks, and when the server has
        already answered (a 413 decided from Content-Length) the rest is not pushed into a
        closing socket, whose reset could otherwise swallow the answer."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.putrequest(method, parts.path + (f"?{parts.query}" if parts.query else ""))
            sent = {"Content-Type": "application/json", **(headers or {})}
            if data is not None:
                sent["Content-Length"] = str(len(data))
            for key, value in sent.items():
                conn.putheader(key, value)
            conn.endheaders()
            for start in range(0, len(data or b""), 1 << 16):
                if select.select([conn.sock], [], [], 0)[0]:
                    break  # the server has answered early
                try:
                    conn.send(data[start:start + (1 << 16)])
                except (BrokenPipeError, ConnectionResetError):
                    break
            r = conn.getresponse()
            return Http(r.status, dict(r.headers), r.read())
        finally:
            conn.close()


def _stream(server: "Server", path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Open a streaming POST and return the connection and response to read lines from."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1" + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _random_vector(seed: int, norm: float = 8.0) -> ControlVector:
    """Random unit directions on blocks 6-19 times ``norm`` (SmolLM2: n_embd 576, 30 blocks)."""
    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in range(6, 20):
        d = rng.standard_normal(576).astype(np.float32)
        dirs[layer] = d * np.float32(norm / np.linalg.norm(d))
    return ControlVector(dirs, "llama", {"method": "random", "seed": seed})


class Server:
    """``rs-local serve`` in its own process group; SIGKILLed by the fixture."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, preexec=None):
        self.port = _free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        cmd = [sys.executable, "-m", "rs_local.cli.main", "serve", "--model", MODEL, "--port", str(self.port),
               "--ctx", "512", *args]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"rs-local serve exited with {self.proc.returncode}"
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError("rs-local serve did not come up in 120 s")

    def health(self) -> dict:
        with urllib.request.urlopen(self.root + "/health", timeout=10) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, smollm2_path) -> Path:
    folder = tmp_path_factory.mktemp("vectors")
    write_control_vector(_random_vector(1), folder / "tilt.gguf")
    write_control_vector(_random_vector(2), folder / "lean.gguf")
    return folder


@pytest.fixture(scope="module")
def policy_file(vectors, smollm2_path) -> Path:
    """A policy fitted here on SmolLM2 (as in test_policy): cooking removed, maths refused at 4, code kept."""
    from test_policy import CODE, COOKING, MATH, _write

    from rs_local.recipes.policy_fit import CategorySpec, fit_policy, load_category_prompts
    from rs_local.runtime.policy_file import write_policy
    from rs_local.runtime.runner import Runner

    specs = [CategorySpec("cooking", _write(vectors, "cooking", COOKING[:8]), "remove"),
             CategorySpec("math", _write(vectors, "math", MATH[:8]), "refuse"),
             CategorySpec("code", _write(vectors, "code", CODE[:8]), "keep")]
    load_category_prompts(specs)
    runner = Runner(smollm2_path, n_ctx=512, n_threads=2)
    try:
        policy = fit_policy(runner, specs, probe_blocks=[10], steer_blocks=[8, 9, 10, 11, 12], baseline="code",
                            refusal_from="cooking", default_scale=4.0, k=3)
    finally:
        runner.llama.close()
    return write_policy(policy, vectors.parent / "gate.gguf")


@pytest.fixture(scope="module")
def server(vectors, policy_file):
    srv = Server(["--vector", f"tilt={vectors / 'tilt.gguf'}:4", "--vector", f"lean={vectors / 'lean.gguf'}:-4",
                  "--policy", f"gate={policy_file}"])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def keyed(vectors):
    """With an API key (from the environment, as users should pass it) and a default steering."""
    srv = Server(["--vectors", str(vectors), "--default-steering", "tilt:4"], env={"RS_LOCAL_API_KEY": KEY})
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kw) -> tuple[str, dict]:
    resp = client.chat.completions.create(model=kw.pop("model", MODEL), messages=kw.pop("messages", ASK), **{**GREEDY, **kw})
    return resp.choices[0].message.content, resp.to_dict()


# ----------------------------------------------------------------------------- client


def test_chat_with_the_openai_client(client):
    text, raw = _chat(client)
    assert text.strip()
    assert raw["usage"]["completion_tokens"] == 10 and raw["usage"]["prompt_tokens"] > 5
    assert raw["usage"]["total_tokens"] == raw["usage"]["prompt_tokens"] + 10
    assert raw["choices"][0]["finish_reason"] == "length"
    assert raw["steering"] == {"vectors": [], "layers": None, "source": "default"}


def test_streaming_matches_and_ends_with_usage(client):
    whole, _ = _chat(client)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": True}
    conn, r = _stream(server, "/completions", body)
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    lines = [line.decode().rstrip("\r\n") for line in r if line.startswith(b"data: ")]
    conn.close()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 4


def test_extra_body_and_model_name_steer_the_same(client):
    plain, _ = _chat(client)
    steered, raw = _chat(client, extra_body={"steering": {"vectors": [{"name": "tilt", "scale": 4}]}})
    assert steered != plain
    assert raw["steering"] == {"vectors": [{"name": "tilt", "scale": 4.0}], "layers": None, "source": "request"}
    by_name, raw = _chat(client, model=f"{MODEL}+tilt:4")
    assert by_name == steered and raw["steering"]["source"] == "model"
    default_scale, _ = _chat(client, model=f"{MODEL}+tilt")  # tilt was loaded with :4
    assert default_scale == steered
    ranged, raw = _chat(client, extra_body={"steering": {"vectors": [{"name": "tilt", "scale": 4}], "layers": "8-12"}})
    assert raw["steering"]["layers"] == "8-12" and ranged != steered


def test_completions_and_stop(client):
    resp = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = resp.choices[0].text
    assert text.strip() and resp.usage.completion_tokens >= 1
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert cut.choices[0].finish_reason == "stop" and " 7" not in cut.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kw = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    assert _chat(client, **kw)[0] == _chat(client, **kw)[0]


def test_limits_of_sampling_answer_as_greedy(client):
    """A temperature near the smallest float (every token but the top one overflows to -inf; it was a
    500) and top_p 0 (OpenAI's range starts at 0: the most likely token alone) both give the greedy answer."""
    greedy = _chat(client, max_tokens=8)[0]
    for kw in ({"temperature": 5e-324, "seed": 1}, {"temperature": 1e-310, "seed": 2},
               {"temperature": 1.5, "top_p": 0, "seed": 3}):
        assert _chat(client, max_tokens=8, **kw)[0] == greedy, kw


def test_catalog_and_models(server, policy_file):
    catalog = Http.send("GET", server.url + "/steering/vectors").json()
    names = {v["name"]: v for v in catalog["data"]}
    assert set(names) == {"tilt", "lean"} and catalog["n_embd"] == 576
    tilt = names["tilt"]
    assert tilt["layers"] == list(range(6, 20)) and tilt["n_embd"] == 576 and tilt["default_scale"] == 4.0
    assert abs(tilt["norms"]["6"] - 8.0) < 1e-3 and tilt["provenance"]["method"] == "random"
    assert tilt["file"] == "tilt.gguf" and str(server.url) not in json.dumps(catalog)
    ids = [m["id"] for m in Http.send("GET", server.url + "/models").json()["data"]]
    assert ids == [MODEL, f"{MODEL}+tilt:4", f"{MODEL}+lean:-4", f"{MODEL}+@gate"]
    assert catalog["policies"] == ["gate"]
    policies = Http.send("GET", server.url + "/steering/policies").json()["data"]
    assert [p["name"] for p in policies] == ["gate"] and policies[0]["file"] == "gate.gguf"
    assert policies[0]["probe_block"] == 10 and policies[0]["n_embd"] == 576
    assert policies[0]["training"]["files"]["math"] == "math.jsonl"  # the training sets by name, no directory
    assert str(policy_file.parent) not in json.dumps(policies)
    assert [(c["name"], c["action"]) for c in policies[0]["categories"]] == [
        ("cooking", "remove"), ("math", "refuse"), ("code", "keep")]


# ----------------------------------------------------------------------------- policies


def test_the_http_judge_asks_rs_local_serve_one_request_at_a_time(server):
    """``judge --judge-url`` at ``rs-local serve`` sent 4 requests at once by default; the server
    answers one at a time, so the other three waited out their timeouts in its queue (4 of 12
    verdicts in 200 s). Against rs-local the default is 1; a given -j, or another server, keeps its own."""
    from rs_local.judge.openai_http import DEFAULT_CONCURRENCY, OpenAIJudge

    assert OpenAIJudge(server.url, model=MODEL, concurrency=None).concurrency == 1
    assert OpenAIJudge(server.url, model=MODEL, concurrency=3).concurrency == 3
    assert OpenAIJudge._default_concurrency([{"id": "x", "owned_by": "llamacpp"}]) == DEFAULT_CONCURRENCY == 4


def test_policy_gates_each_request(client, server):
    """Held-out prompts: maths is steered (toward refusal), code is kept (the plain answer, exactly)."""
    from test_policy import CODE, COOKING, MATH

    gate = {"steering": {"policy": "gate"}}
    for prompt, category, action in ((MATH[10], "math", "refuse"), (CODE[10], "code", "keep"),
                                     (COOKING[10], "cooking", "remove")):
        ask = [{"role": "user", "content": prompt}]
        plain, _ = _chat(client, messages=ask, max_tokens=16)
        gated, raw = _chat(client, messages=ask, max_tokens=16, extra_body=gate)
        chosen = raw["steering"]["policy"]
        assert (chosen["name"], chosen["category"], chosen["action"]) == ("gate", category, action), chosen
        assert chosen["gated"] and chosen["confidence"] >= 0.5
        if action == "keep":
            assert gated == plain and raw["steering"]["vectors"] == []
        else:
            assert gated != plain
            assert raw["steering"]["vectors"] == [{"name": f"gate/{category}", "scale": chosen["scale"]}]
        by_name, raw = _chat(client, messages=ask, max_tokens=16, model=f"{MODEL}+@gate")
        assert by_name == gated and raw["steering"]["source"] == "model"
    r = Http.send("POST", server.url + "/chat/completions",
                  {"messages": [{"role": "user", "content": MATH[11]}], "max_tokens": 2, **gate})
    assert r.status_code == 200 and r.headers["x-rs-local-steering"].startswith("@gate/math:")
    assert server.health()["stats"]["gated"] >= 7


# ----------------------------------------------------------------------------- isolation


def test_concurrent_mixed_steering_equals_solo(client, server):
    steerings = [[], [{"name": "tilt", "scale": 4}], [{"name": "lean", "scale": -4}]]
    prompts = ["What is the capital of France?", "Name a colour."]
    cases = [(p, s) for p in prompts for s in steerings]

    def ask(case):
        prompt, vectors = case
        return _chat(client, messages=[{"role": "user", "content": prompt}], extra_body={"steering": {"vectors": vectors}})[0]

    solo = [ask(c) for c in cases]
    assert len(set(solo)) >= 4  # the vectors really change the answers
    before = server.health()["stats"]["switches"]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(cases[i % len(cases)])))
               for i in range(2 * len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(threads))] == [solo[i % len(cases)] for i in range(len(threads))]
    stats = server.health()["stats"]
    assert stats["switches"] > before
    # the template's head came from the per-steering cache (the first solo request of each steering filled it)
    assert stats["head_hits"] >= 2 * len(cases)
    assert stats["prompt_tokens_evaluated"] < stats["prompt_tokens"]


def _wait_cancelled(server, before: int) -> None:
    deadline = time.time() + 20
    while server.health()["stats"]["cancelled"] == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["stats"]["cancelled"] > before


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_stops_generation_and_serving_goes_on(server, client, stream):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 400, "temperature": 0, "stream": stream}
    before = server.health()["stats"]["cancelled"]
    conn, r = _stream(server, "/chat/completions", body) if stream else (None, None)
    if stream:
        seen = 0
        for line in r:
            seen += line.startswith(b"data: ")
            if seen >= 3:
                break
    else:  # send the request, then leave before the answer (400 tokens) can be ready
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        time.sleep(1.0)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_cancelled(server, before)
    t0 = time.time()
    assert _chat(client, max_tokens=2)[0]
    assert time.time() - t0 < 20


def _events_signalled(r, srv: Server, sig: int) -> list[bytes]:
    """A stream's data events, sending ``sig`` to the server after the third."""
    events = []
    for line in r:
        if line.startswith(b"data: "):
            events.append(line[6:].strip())
            if len(events) == 3:
                srv.proc.send_signal(sig)
    return events


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_stopping_server_ends_answers_with_an_error_not_a_dropped_connection(stream):
    """SIGTERM mid-answer (grace 0): a stream ends with a server_shutdown error event and [DONE],
    a waiting request gets a 503 error object, and the process exits."""
    srv = Server(["--shutdown-grace", "0"])
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                "max_tokens": 400, "temperature": 0, "stream": stream}
        conn, r = _stream(srv, "/chat/completions", body) if stream else (None, None)
        if stream:
            assert r.status == 200
            events = _events_signalled(r, srv, signal.SIGTERM)
            assert events[-1] == b"[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "server_shutdown"
            assert len(events) < 300  # cut short, not run to max_tokens
        else:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            time.sleep(1.0)
            srv.proc.send_signal(signal.SIGTERM)
            r = conn.getresponse()
            assert r.status == 503
            assert json.loads(r.read())["error"]["code"] == "server_shutdown"
        conn.close()
        srv.proc.wait(timeout=30)
    finally:
        srv.kill()


def test_a_hang_up_stops_the_server_like_sigterm():
    """SIGHUP (the terminal closed) ended the server at once: an open stream was cut with no event, no [DONE]."""
    srv = Server(["--shutdown-grace", "0"])
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                "max_tokens": 400, "temperature": 0, "stream": True}
        conn, r = _stream(srv, "/chat/completions", body)
        events = _events_signalled(r, srv, signal.SIGHUP)
        assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutdown"
        conn.close()
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.kill()


def test_under_nohup_a_hang_up_leaves_the_server_running():
    """`nohup rs-local serve` asks to outlive the terminal: SIGHUP stays ignored there."""
    srv = Server([], preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert srv.proc.poll() is None and srv.health()["status"] == "ok"
    finally:
        srv.kill()


def test_a_second_ctrl_c_ends_every_answer_with_an_error_at_once():
    """A second SIGINT (uvicorn's "CTRL+C to force quit") cancelled the request tasks: 38 of 40 clients got a
    plain-text 500, a stream was cut without [DONE], and the log filled with tracebacks. Now every answer in
    flight or waiting ends at once with the server_shutdown error (a stream: error event, then [DONE])."""
    srv = Server(["--shutdown-grace", "60"])  # a long grace: only the second signal can end them this fast
    outcomes: dict[int, tuple] = {}
    streaming = threading.Event()

    def ask(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a long story number {i}."}],
                "max_tokens": 1000, "temperature": 0, "stream": i % 2 == 0}
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = b""
        while chunk := r.read1(4096):
            data += chunk
            if i == 0 and b"data: " in data:
                streaming.set()
        outcomes[i] = (r.status, data)
        conn.close()

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        threads[0].start()
        assert streaming.wait(60)  # request 0 is being answered
        for t in threads[1:]:
            t.start()
        time.sleep(0.5)  # the others wait in the queue
        srv.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        started = time.time()
        srv.proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(timeout=30) == 0 and time.time() - started < 10
        assert len(outcomes) == 6
        for i, (status, data) in outcomes.items():
            assert status in (200, 503), (status, data[:200])
            if status == 503:  # waiting, or not yet streaming: an error object
                assert json.loads(data)["error"]["code"] == "server_shutdown", data[:200]
            elif i % 2 == 0:
                events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
                assert events[-1] == b"[DONE]", data[-200:]
        events = [line[6:] for line in outcomes[0][1].split(b"\n") if line.startswith(b"data: ")]
        assert json.loads(events[-2])["error"]["code"] == "server_shutdown"  # the answer under way was cut
    finally:
        srv.kill()


# ----------------------------------------------------------------------------- bad input


def _long_prompt() -> str:
    return "hello " * 800  # > 512 tokens


BAD = [
    ("malformed", b'{"messages": [', 400, None),
    ("not-object", b"[1, 2]", 400, None),
    ("not-utf8", b'{"messages": "\xff"}', 400, None),
    ("messages-type", {"messages": "hi"}, 400, "messages"),
    ("role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("temperature-type", {"messages": ASK, "temperature": "hot"}, 400, "temperature"),
    ("top-p-range", {"messages": ASK, "top_p": 1.5}, 400, "top_p"),
    ("max-tokens-bool", {"messages": ASK, "max_tokens": True}, 400, "max_tokens"),
    ("n", {"messages": ASK, "n": 3}, 400, "n"),
    ("stop-type", {"messages": ASK, "stop": [1]}, 400, "stop"),
    ("steering-type", {"messages": ASK, "steering": "tilt"}, 400, "steering"),
    ("unknown-vector", {"messages": ASK, "steering": {"vectors": [{"name": "nope", "scale": 1}]}}, 404,
     "steering.vectors[0].name"),
    ("path", {"messages": ASK, "steering": {"vectors": [{"name": "../tilt", "scale": 1}]}}, 400, "steering.vectors[0].name"),
    ("abs-path", {"messages": ASK, "steering": {"vectors": [{"name": "/etc/passwd"}]}}, 400, "steering.vectors[0].name"),
    ("nan-scale", b'{"messages": [{"role": "user", "content": "x"}], "steering": {"vectors": [{"name": "tilt", "scale": NaN}]}}',
     400, None),
    ("inf-scale", b'{"messages": [{"role": "user", "content": "x"}], "steering": {"vectors": [{"name": "tilt", "scale": 1e999}]}}',
     400, None),
    ("huge-scale", {"messages": ASK, "steering": {"vectors": [{"name": "tilt", "scale": 1e300}]}}, 400, "steering.vectors[0].scale"),
    ("bool-scale", {"messages": ASK, "steering": {"vectors": [{"name": "tilt", "scale": True}]}}, 400, "steering.vectors[0].scale"),
    ("layers-outside", {"messages": ASK, "steering": {"vectors": [{"name": "tilt", "scale": 1}], "layers": "8-40"}}, 400,
     "steering.layers"),
    ("layers-miss", {"messages": ASK, "steering": {"vectors": [{"name": "tilt", "scale": 1}], "layers": "25-28"}}, 400,
     "steering.layers"),
    ("layers-text", {"messages": ASK, "steering": {"vectors": [], "layers": "8-"}}, 400, "steering.layers"),
    ("policy-unknown", {"messages": ASK, "steering": {"policy": "strict"}}, 404, "steering.policy"),
    ("policy-path", {"messages": ASK, "steering": {"policy": "../gate"}}, 400, "steering.policy"),
    ("policy-type", {"messages": ASK, "steering": {"policy": 3}}, 400, "steering.policy"),
    ("policy-and-vectors", {"messages": ASK, "steering": {"policy": "gate", "vectors": [{"name": "tilt"}]}}, 400,
     "steering"),
    ("policy-and-layers", {"messages": ASK, "steering": {"policy": "gate", "layers": "8-12"}}, 400, "steering"),
    ("model-unknown-policy", {"model": f"{MODEL}+@strict", "messages": ASK}, 404, "model"),
    ("model-policy-and-vector", {"model": f"{MODEL}+tilt:1+@gate", "messages": ASK}, 400, "model"),
    ("both", {"model": f"{MODEL}+tilt:1", "messages": ASK, "steering": {"vectors": []}}, 400, "steering"),
    ("model-unknown", {"model": "gpt-4", "messages": ASK}, 404, "model"),
    ("model-nan", {"model": f"{MODEL}+tilt:nan", "messages": ASK}, 400, "model"),
    ("model-path", {"model": f"{MODEL}+../../x", "messages": ASK}, 400, "model"),
    ("model-unknown-vector", {"model": f"{MODEL}+nope:1", "messages": ASK}, 404, "model"),
    ("too-long", {"messages": [{"role": "user", "content": _long_prompt()}]}, 400, "messages"),
    ("oversized", {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413, None),
    # fields the answer would silently ignore: a client would take null log-probs or prose for what it asked
    ("logprobs", {"messages": ASK, "logprobs": True, "top_logprobs": 2}, 400, "logprobs"),
    ("tools", {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("json-format", {"messages": ASK, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("logit-bias", {"messages": ASK, "logit_bias": {"42": 5}}, 400, "logit_bias"),
    ("tool-required", {"messages": ASK, "tool_choice": "required"}, 400, "tool_choice"),
    ("tool-named", {"messages": ASK, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("audio", {"messages": ASK, "modalities": ["text", "audio"], "audio": {"voice": "alloy"}}, 400, "modalities"),
    ("stream-options-list", {"messages": ASK, "stream": True, "stream_options": []}, 400, "stream_options"),
]


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_browser_pages_reach_the_server_only_from_origins_allowed():
    """Web UIs call the server from a page's script; the browser asks first (a CORS preflight) and reads the
    answer only with Access-Control-Allow-Origin. Allowed only for origins given with --cors-origin."""
    srv = Server(["--cors-origin", "http://localhost:3000"], env={"RS_LOCAL_API_KEY": KEY})
    try:
        preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        r = Http.send("OPTIONS", srv.url + "/chat/completions", headers=preflight)
        assert r.status_code == 200 and _lower(r.headers).get("access-control-allow-origin") == "http://localhost:3000"
        body = {"messages": ASK, **GREEDY, "max_tokens": 2}
        r = Http.send("POST", srv.url + "/chat/completions", body,
                      headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and _lower(r.headers).get("access-control-allow-origin") == "http://localhost:3000"
        assert "x-rs-local-steering" in _lower(r.headers).get("access-control-expose-headers", "").lower()
        r = Http.send("OPTIONS", srv.url + "/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in _lower(r.headers)
    finally:
        srv.kill()
    res = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "serve", "--cors-origin", "localhost:3000/"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is not an origin" in res.stderr


def test_a_port_in_use_is_one_line_before_the_model_loads():
    """Another server on the port was found by uvicorn only after the model had loaded (exit 3, its log format)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "serve", "--model", "/nonexistent.gguf",
                              "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.strip() == f"Error: 127.0.0.1:{port} is in use (another server?); " \
                                                         "choose another with --port", res.stderr


def test_the_address_check_binds_as_the_server_will():
    """An IPv4 listener made `--host ::` "in use", though the server (IPv6-only sockets, as asyncio binds)
    could listen there; a host that resolves to two addresses is checked on both."""
    from rs_local.cli.serve_cmd import check_address

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if socket.has_ipv6:
            try:
                check_address("::", port)
            except click.ClickException as exc:
                assert "cannot be listened on" in exc.message, exc.message  # a machine without IPv6 at all
        with pytest.raises(click.ClickException, match="is in use"):
            check_address("127.0.0.1", port)


def test_what_other_local_servers_accept_is_accepted(server):
    """top_k -1 (vLLM's and llama.cpp's "off"), a UTF-8 byte-order mark before the JSON and a trailing slash
    on the route were a 400, a 400 and a 307 with an empty body that POST clients do not follow."""
    plain = Http.send("POST", server.url + "/chat/completions", {"messages": ASK, **GREEDY, "max_tokens": 4})
    assert plain.status_code == 200, plain.text
    for url, body in ((server.url + "/chat/completions", {"messages": ASK, **GREEDY, "max_tokens": 4, "top_k": -1}),
                      (server.url + "/chat/completions", b"\xef\xbb\xbf" + json.dumps(
                          {"messages": ASK, **GREEDY, "max_tokens": 4}).encode()),
                      (server.url + "/chat/completions/", {"messages": ASK, **GREEDY, "max_tokens": 4})):
        r = Http.send("POST", url, body)
        assert r.status_code == 200, (url, r.text)
        assert r.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_error_object(server, name, body, status, param):
    url = server.url + "/chat/completions"
    r = Http.send("POST", url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_completion_prompt_and_unknown_routes(server):
    r = Http.send("POST", server.url + "/completions", {"prompt": [1, 2, 3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = Http.send("POST", server.url + "/completions", {"prompt": _long_prompt()})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = Http.send("POST", server.url + "/completions", {"prompt": "a" * 600_000})  # too many bytes to tokenize at all
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "(use --ctx)" not in r.json()["error"]["message"]  # the CLI's hint is not the client's
    r = Http.send("GET", server.url + "/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = Http.send("POST", server.url + "/completions", {"prompt": "Hi", "logprobs": 0})  # legacy: the chosen tokens'
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"  # log-probs, which came back null


def test_fields_that_ask_for_nothing_still_pass(client):
    """What clients send by habit (`logprobs: false`, `tools: []`, a text format) is no refusal."""
    text, _ = _chat(client, max_tokens=2, logprobs=False, tools=[], response_format={"type": "text"})
    assert text


def test_head_model_retrieval_and_allow(server, client):
    """Health checkers send HEAD; the openai client's models.retrieve asks /v1/models/ID; a 405 says what is allowed."""
    assert Http.send("HEAD", server.root + "/health").status_code == 200
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(f"{MODEL}+tilt:4").id == f"{MODEL}+tilt:4"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = Http.send("DELETE", server.url + "/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "") and r.json()["error"]["code"]


def test_stalled_requests_are_closed_and_timed_out():
    """Headers that stop half way held a connection (and a file descriptor) forever; a body shorter
    than its Content-Length too. --request-timeout 1: the first is closed, the second gets a 408."""
    srv = Server(["--request-timeout", "1"])
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")
            t0 = time.time()
            assert sock.recv(1024) == b""  # closed by the server, not by the 10 s timeout here
            assert time.time() - t0 < 6
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"mess")
            reply = b""
            while b"request_timeout" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert srv.health()["status"] == "ok"
    finally:
        srv.kill()


def test_the_server_still_answers_after_bad_input(server, client):
    assert server.health()["status"] == "ok" and server.proc.poll() is None
    assert _chat(client, max_tokens=3)[0]


def test_openai_client_raises_the_status(client):
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, extra_body={"steering": {"vectors": [{"name": "nope", "scale": 1}]}})
    assert info.value.body["param"] == "steering.vectors[0].name"


# ----------------------------------------------------------------------------- api key and default


def test_api_key_and_default_steering(keyed, client):
    assert Http.send("GET", keyed.root + "/health").status_code == 200  # health stays open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = Http.send("POST", keyed.url + "/chat/completions", {"messages": ASK}, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert Http.send("GET", keyed.url + "/models", None, headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _chat(openai.OpenAI(base_url=keyed.url, api_key="wrong", max_retries=0), max_tokens=2)
    keyed_client = openai.OpenAI(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=60)
    default, raw = _chat(keyed_client)
    assert raw["steering"] == {"vectors": [{"name": "tilt", "scale": 4.0}], "layers": None, "source": "default"}
    assert default == _chat(client, model=f"{MODEL}+tilt:4")[0]  # the same vector on the other server
    off, raw = _chat(keyed_client, extra_body={"steering": {"vectors": []}})
    assert raw["steering"]["vectors"] == [] and off == _chat(client)[0]


# ----------------------------------------------------------------------------- the template's head cache


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from rs_local.runtime.runner import Runner

    r = Runner(smollm2_path, n_ctx=512, n_threads=2)
    yield r
    r.llama.close()


def test_cached_template_head_gives_bit_identical_answers(runner, vectors):
    """Every (prompt, steering) answered from a cached head equals, token and log-prob, the answer with a cold cache.

    Requests run in an interleaved order with other steerings in between, as on the server; the
    log-probs compare every logit (through the log-sum-exp) to the bit.
    """
    from rs_local.converters.gguf_io import read_control_vector
    from rs_local.serve.prefix import PrefixStore, load_prompt, template_boundary

    tilt, lean = read_control_vector(vectors / "tilt.gguf"), read_control_vector(vectors / "lean.gguf")
    steerings = {"none": [], "tilt": [(tilt, 4.0)], "lean": [(lean, -4.0)]}
    # the last prompt's plain answer ends on an end-of-generation token before the budget ("Yes.")
    prompts = ["What is the capital of France?", "Name a colour.", "Write a haiku about rain.",
               "Reply with one word: yes or no?"]

    def answer(store: PrefixStore, prompt: str, name: str) -> tuple[bool, list, list, str]:
        messages = [{"role": "user", "content": prompt}]
        runner.set_vectors(steerings[name])
        tokens = runner.tokenize(messages)
        boundary = template_boundary(runner, messages, tokens)
        assert 8 <= boundary < len(tokens)
        hit = load_prompt(runner, store, name, tokens, boundary)
        before = runner.counters.copy()
        out = runner.generate(messages, max_tokens=12)
        spent = runner.counters.since(before)
        assert spent.prompt_tokens == len(tokens) - boundary  # only the rest of the prompt was evaluated
        # every kept token is evaluated but the budget's last; an answer that ended on an end
        # token evaluated its last kept token (those logits chose the end), and the end token
        # itself is neither kept nor evaluated
        assert not any(runner.is_end_token(t) for t in out.tokens)
        ended = out.finish_reason == "stop"  # no stop strings here: "stop" is an end token
        assert spent.decodes == len(out.tokens) - (0 if ended else 1), (out.finish_reason, len(out.tokens))
        return hit, out.tokens, out.logprobs, out.finish_reason

    cold = {(p, n): answer(PrefixStore(), p, n)[1:] for p in prompts for n in steerings}
    assert len({tuple(t) for t, *_ in cold.values()}) >= 6  # the vectors change the answers
    assert {f for *_, f in cold.values()} == {"stop", "length"}  # both ways an answer ends are checked
    store = PrefixStore()
    order = [(p, n) for i in range(2) for j, p in enumerate(prompts) for n in list(steerings)[i + j:] + list(steerings)[:i + j]]
    hits = 0
    for prompt, name in order:
        hit, tokens, logprobs, finish = answer(store, prompt, name)
        hits += hit
        assert (tokens, logprobs, finish) == cold[(prompt, name)], (prompt, name)
    assert hits == len(order) - len(steerings) and len(store) == len(steerings)


def test_template_boundary_is_the_head_before_the_last_message(runner):
    from rs_local.serve.prefix import template_boundary

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    tokens = runner.tokenize(chat)
    n = template_boundary(runner, chat, tokens)
    head = runner.llama.detokenize(tokens[:n]).decode()
    assert head.endswith("user\n") and "Hello!" in head and "Name a colour." not in head
    assert template_boundary(runner, "a raw completion prompt", runner.tokenize("a raw completion prompt")) == 0


# ----------------------------------------------------------------------------- units


def test_prefix_store_drops_the_least_recently_used_past_its_budget():
    from rs_local.serve.prefix import PrefixStore

    store = PrefixStore(max_bytes=420)  # one entry: at most 105 bytes
    store.put("a", [1, 2], b"x" * 100)
    store.put("b", [1, 2], b"y" * 100)
    assert store.get("a", [1, 2]) == b"x" * 100  # "a" is now the most recent
    store.put("c", [1, 2], b"z" * 100)
    store.put("e", [1, 2], b"v" * 100)
    store.put("f", [1, 2], b"u" * 100)  # over 420: "b", the least recently used, goes
    assert store.get("b", [1, 2]) is None and store.get("a", [1, 2]) and store.get("c", [1, 2])
    assert store.get("a", [1, 3]) is None  # other tokens, other entry
    assert store.bytes == 400 and (store.hits, store.misses) == (3, 2)
    store.put("d", [1], b"w" * 106)  # over a quarter of the budget: not kept, nothing evicted
    assert len(store) == 4 and store.bytes == 400 and store.get("d", [1]) is None


@pytest.mark.parametrize("pieces,stop,sent,stopped", [
    (["a", "b", "<", "/e", "nd>", "x"], ["</end>"], "ab", True),
    (["a", "<", "b"], ["</end>"], "a<b", False),
    (["hello wor", "ld"], ["world"], "hello ", True),
    (["abc"], [], "abc", False),
])
def test_stop_filter_never_shows_a_stop_string(pieces, stop, sent, stopped):
    f = StopFilter(stop)
    out = ""
    for piece in pieces:
        out += f.feed(piece)
        if f.stopped:
            break
    out += f.flush()
    assert out == sent and f.stopped is stopped


def test_head_cache_size_reaches_the_worker(runner):
    """``serve --head-cache-mib`` bounds the worker's head store; 0 turns it off; its default is the library's."""
    from rs_local.cli.serve_cmd import serve
    from rs_local.serve.app import build_service
    from rs_local.serve.prefix import HEAD_CACHE_BYTES

    default = next(p.default for p in serve.params if p.name == "head_cache_mib")
    assert default << 20 == HEAD_CACHE_BYTES == build_service(runner, "m").worker.heads.max_bytes

    assert build_service(runner, "m", head_cache_bytes=3 << 20).worker.heads.max_bytes == 3 << 20
    assert build_service(runner, "m", head_cache_bytes=0).worker.heads.max_bytes == 0


def test_clients_that_left_do_not_fill_the_queue(smollm2_path):
    """64 clients that timed out behind one long answer still counted as waiting, so every live client
    got a 503 until the worker reached them; now they are dropped (and told) when a job arrives."""
    from rs_local.runtime.runner import Runner
    from rs_local.runtime.sampling import SamplingParams
    from rs_local.serve.errors import ApiError
    from rs_local.serve.scheduler import Failed, Job, Worker
    from rs_local.serve.steering import VectorLibrary

    with Runner(smollm2_path, n_ctx=256) as runner:
        library = VectorLibrary(runner.n_embd, runner.n_layer, check=runner.check_vector)
        worker = Worker(runner, library, max_waiting=4)  # not started: jobs stay queued
        told: list = []

        def job() -> Job:
            return Job("hi", library.default(()), SamplingParams(), 2, (), told.append)

        gone = [job() for _ in range(4)]
        for j in gone:
            worker.submit(j)
            j.cancelled.set()
        assert worker.waiting == 0
        live = [job() for _ in range(4)]
        for j in live:
            worker.submit(j)  # was a 503: the queue held 4 cancelled jobs
        assert worker.waiting == 4 and len(told) == 4
        assert all(isinstance(e, Failed) and e.error.status == 499 for e in told)
        with pytest.raises(ApiError) as full:
            worker.submit(job())
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "5"}


def test_steering_labels_in_any_script_make_a_valid_header():
    """A policy category named in another script raised UnicodeEncodeError (headers are Latin-1): a 500
    after the worker had started the answer."""
    from urllib.parse import unquote

    from rs_local.serve.app import header_text

    label = "@strict/料理:-1"
    value = header_text(label)
    value.encode("ascii")
    assert unquote(value) == label
    assert header_text("@gate/cooking:-4 tilt:4") == "@gate/cooking:-4 tilt:4"  # ASCII labels stay readable


def test_a_client_leaving_during_a_long_prompt_frees_the_worker():
    """The worker evaluated a long prompt to its end (a minute for 8000 tokens on one thread) for a
    client that had left. Measured against the same prompt's own evaluation in this run."""
    srv = Server(["--ctx", "4096"])
    try:
        def prompt(seed: int) -> dict:  # a different start each time: nothing cached to reuse
            return {"prompt": f"{seed} " + "the cat sat on the mat " * 600, "max_tokens": 1, "temperature": 0}

        t0 = time.time()
        r = Http.send("POST", srv.url + "/completions", prompt(1))
        whole = time.time() - t0
        assert r.status_code == 200, r.text
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(prompt(2)), headers={"Content-Type": "application/json"})
        time.sleep(0.3)
        left = time.time()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        while srv.health()["busy"] or srv.health()["stats"]["cancelled"] == 0:
            assert time.time() - left < 2 * whole, "the worker went on evaluating for a client that had left"
            time.sleep(0.05)
        freed = time.time() - left
        assert freed < 0.7 * whole, (freed, whole)
        assert srv.health()["stats"]["generated_tokens"] == 1  # only the first request's token
    finally:
        srv.kill()


def test_the_same_vectors_in_any_order_are_the_same_sum():
    """Steering keys sort their parts, so [a, b, c] and [c, b, a] share a cached head and an applied
    vector; the parts were summed in request order, which differs in float32 from three vectors on,
    and an answer changed with the request before it (4 of 12 greedy answers on SmolLM2)."""
    from rs_local.serve.steering import Steering, VectorLibrary

    rng = np.random.default_rng(11)
    library = VectorLibrary(64, 4, check=lambda vector, file: None)
    for name in ("a", "b", "c"):
        library.add(name, ControlVector({k: rng.standard_normal(64).astype(np.float32) for k in (1, 2)}, "llama", {}),
                    1.0, f"{name}.gguf")
    forward = Steering((("a", 1.7), ("b", -2.3), ("c", 1.9)))
    backward = Steering(tuple(reversed(forward.parts)))
    assert forward.key == backward.key
    one, two = (ControlVector.merge(library.parts(s)) for s in (forward, backward))
    for layer in (1, 2):
        assert np.array_equal(one.directions[layer], two.directions[layer])


def test_accept_errors_out_of_descriptors_are_logged_once_a_minute():
    """Out of file descriptors, asyncio logged a traceback per retried accept: 120,000 in ten seconds."""
    import logging

    from rs_local.serve.app import _OncePerMinute

    once = _OncePerMinute()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    flood = [once.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert flood.count(True) == 1 and once.filter(record("something else"))
