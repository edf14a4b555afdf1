"""The HTTP side of ``rs-local serve``: FastAPI routes in front of the one worker.

The routes parse and check a request completely (body size, JSON, fields, steering) before
anything is queued, then wait for the worker's first event: a prompt that does not fit the
context comes back as a 400 before any byte of a stream is sent. A streaming response ends
with ``data: [DONE]``; when its client disconnects, sse-starlette cancels the generator and its
``finally`` marks the job cancelled, so the worker stops at the next token and takes the next
request. No route touches the Runner: only the worker thread does.

A stopping server (SIGINT, SIGTERM or SIGHUP) lets answers under way go on for ``Service.grace`` seconds,
then ends each one as it would end a failed one: a stream with an error event (503,
``server_shutdown``) and ``[DONE]``, a waiting request with a 503. Clients can thus tell an answer
cut short from a finished one instead of seeing the connection drop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rs_local.errors import RsLocalError
from rs_local.runtime.host import raise_open_files_limit
from rs_local.runtime.runner import Runner
from rs_local.serve.connections import header_timeout_protocol
from rs_local.serve.errors import ApiError, client_closed
from rs_local.serve.prefix import HEAD_CACHE_BYTES
from rs_local.serve.requests import ParsedRequest, parse_body, parse_chat, parse_completion
from rs_local.serve.responses import Reply
from rs_local.serve.scheduler import Delta, Event, Failed, Finished, Job, Worker
from rs_local.serve.steering import Steering, VectorLibrary, resolve

log = logging.getLogger("rs_local.serve")

#: Largest request body accepted (a long chat fits many times over; a runaway upload does not).
MAX_BODY = 1 << 20
#: How often a request that is queued or not streaming checks whether its client is still there.
POLL_S = 0.5
#: Seconds a stopping server lets answers under way go on before it ends them with an error.
SHUTDOWN_GRACE_S = 3.0
#: Seconds a client has to send a request's headers, and again its body.
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Service:
    """Everything the routes share: the model's facts, the vectors, the default and the worker."""

    runner: Runner
    model_id: str
    library: VectorLibrary
    default: Steering
    worker: Worker
    grace: float = SHUTDOWN_GRACE_S
    request_timeout: float = REQUEST_TIMEOUT_S
    closing: threading.Event = field(default_factory=threading.Event)  # set when the server begins to stop

    def aliases(self) -> set[str]:
        return {self.model_id, self.runner.path.name, self.runner.path.stem}

    def split_model(self, name: str) -> str | None:
        """The steering suffix of a model name (None without '+'); 404 for a model not served here."""
        if not name or name in self.aliases():
            return None
        for alias in sorted(self.aliases(), key=len, reverse=True):
            if name.startswith(alias + "+"):
                return name[len(alias) + 1:]
        raise ApiError(404, f"model {name[:200]!r} is not served here (this server serves {self.model_id!r}; "
                            f"add +NAME:SCALE to steer)", param="model", code="model_not_found")

    def steering_for(self, body: Mapping[str, Any], parsed: ParsedRequest) -> Steering:
        return resolve(self.library, self.default, body, self.split_model(parsed.model))

    def model_list(self) -> list[dict[str, Any]]:
        """The plain model, then one entry per loaded vector at its default scale (for model-name-only clients)."""
        rows = [(self.model_id, self.default)]
        for named in self.library.vectors.values():
            steering = Steering(((named.name, named.scale),), None, "model")
            rows.append((f"{self.model_id}+{named.name}:{named.scale:g}", steering))
        for name in self.library.policies:
            rows.append((f"{self.model_id}+@{name}", Steering((), None, "model", name)))
        return [{"id": mid, "object": "model", "created": 0, "owned_by": "rs-local", "steering": s.describe()}
                for mid, s in rows]


# ----------------------------------------------------------------------------- request plumbing


async def read_body(request: Request, limit: int, timeout: float = REQUEST_TIMEOUT_S,
                    closing: threading.Event | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (header or bytes read).

    A body that has not arrived within ``timeout`` seconds is a 408 (a client that declared more
    than it sent held its connection, and a file descriptor, forever); a client that leaves during
    the upload ends the request quietly (499, not two tracebacks in the log); a server that begins
    to stop meanwhile answers 503 ``server_shutdown`` instead of being cancelled into a plain 500."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_big

    async def upload() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        return bytes(data)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    task = asyncio.ensure_future(upload())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=max(0.0, min(POLL_S, deadline - loop.time())))
            if task.done():
                break
            if closing is not None and closing.is_set():
                raise cut_short()
            if loop.time() >= deadline:
                raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout")
        return task.result()
    except ClientDisconnect:
        raise client_closed() from None
    finally:
        task.cancel()


def bearer_check(api_key: str | None) -> Callable:
    """A dependency that answers 401 unless ``Authorization: Bearer <api_key>`` (constant-time compare)."""
    expected = f"Bearer {api_key}".encode("utf-8") if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1", errors="replace")
        if not hmac.compare_digest(got, expected):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    return check


def submit(service: Service, parsed: ParsedRequest, steering: Steering) -> tuple[Job, asyncio.Queue]:
    """Queue a job whose events arrive on an asyncio queue of the running loop."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # called on the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            job.cancelled.set()

    job = Job(parsed.prompt, steering, parsed.sampling, parsed.max_tokens, parsed.stop, sink)
    service.worker.submit(job)
    return job, events


@dataclass
class ShuttingDown:
    """Put on a request's event queue when the server begins to stop."""


def cut_short() -> ApiError:
    return ApiError(503, "the server is shutting down: this answer was cut short", code="server_shutdown")


class EventReader:
    """A request's events from the worker, until a stopping server's grace runs out."""

    def __init__(self, events: asyncio.Queue, grace: float):
        self.events = events
        self.grace = grace
        self.deadline: float | None = None

    async def next(self) -> Event | None:
        """The next event; None once the server is stopping and the grace has passed."""
        loop = asyncio.get_running_loop()
        while True:
            if self.deadline is not None and loop.time() >= self.deadline:
                return None  # a backlog (a slow client) does not outlast the grace
            if not self.events.empty():
                event = self.events.get_nowait()
            elif self.deadline is None:
                event = await self.events.get()
            else:
                try:
                    event = await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - loop.time()))
                except asyncio.TimeoutError:
                    return None
            if not isinstance(event, ShuttingDown):
                return event
            if self.deadline is None:
                self.deadline = loop.time() + self.grace


async def watch_disconnect(request: Request, job: Job, events: asyncio.Queue, closing: threading.Event) -> None:
    """Cancel the job when its client goes away while it waits in the queue or runs (non-streaming);
    tell the request when the server begins to stop.

    Polled on a clock rather than between events: a running job sends a token every few
    milliseconds, so waiting for a quiet moment would never notice.
    """
    told = False
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            # the request's coroutine ends now: a job queued behind a long answer is told only when the
            # worker reaches it, and a server stopping before then cancelled the coroutine mid-wait
            # ("Exception in ASGI application", a CancelledError traceback in the server's log)
            events.put_nowait(Failed(client_closed()))
            return
        if closing.is_set() and not told:
            events.put_nowait(ShuttingDown())
            told = True
        await asyncio.sleep(POLL_S)


async def collect(reader: EventReader, reply: Reply, job: Job) -> dict:
    """Wait for the whole answer of a non-streaming request."""
    parts: list[str] = []
    while True:
        event = await reader.next()
        if event is None:
            job.cancelled.set()  # the worker stops at its next token instead of running to max_tokens
            raise cut_short()
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return reply.whole("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens,
                               event.timings)
        elif isinstance(event, Failed):
            raise event.error


async def announce(stopping: Any, events: asyncio.Queue) -> None:
    """Put :class:`ShuttingDown` on the queue once sse-starlette sees the server stopping."""
    await stopping.wait()
    events.put_nowait(ShuttingDown())


async def sse(reader: EventReader, job: Job, reply: Reply, include_usage: bool, stopping: Any) -> AsyncIterator[dict]:
    """Chunks as server-sent events, then ``[DONE]``; leaving early (disconnect) cancels the job,
    and a stopping server ends the stream with an error event after its grace."""
    herald = asyncio.create_task(announce(stopping, reader.events))
    try:
        if reply.chat:
            yield {"data": json.dumps(reply.chunk("", role=True))}
        while True:
            event = await reader.next()
            if event is None:
                yield {"data": json.dumps(cut_short().body())}
                break
            if isinstance(event, Delta):
                yield {"data": json.dumps(reply.chunk(event.text))}
            elif isinstance(event, Finished):
                last = reply.chunk(None if reply.chat else "", event.finish_reason)
                if not include_usage:
                    last["usage"] = reply.usage_chunk(event.prompt_tokens, event.completion_tokens)["usage"]
                yield {"data": json.dumps(last)}
                if include_usage:
                    yield {"data": json.dumps(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))}
                break
            elif isinstance(event, Failed):
                yield {"data": json.dumps(event.error.body())}
                break
        yield {"data": "[DONE]"}
    finally:
        herald.cancel()
        job.cancelled.set()


async def answer(request: Request, service: Service, body: dict, parsed: ParsedRequest, chat: bool) -> Response:
    """Resolve steering, queue the job, and answer as JSON or as a stream."""
    import anyio
    from sse_starlette import EventSourceResponse

    steering = service.steering_for(body, parsed)
    job, events = submit(service, parsed, steering)
    reader = EventReader(events, service.grace)
    watcher = asyncio.create_task(watch_disconnect(request, job, events, service.closing))
    streaming = False
    try:
        first = await reader.next()
        if first is None:
            job.cancelled.set()
            raise cut_short()
        if isinstance(first, Failed):
            raise first.error
        steering = first.steering  # as applied: a policy's gate has chosen by now
        reply = Reply(chat=chat, model=parsed.model or service.model_id, steering=steering)
        headers = {"X-RS-Local-Steering": header_text(steering.label())}
        if parsed.stream:  # from here sse-starlette watches the connection and the server's stop
            stopping = anyio.Event()
            response = EventSourceResponse(sse(reader, job, reply, parsed.include_usage, stopping), sep="\n", ping=15,
                                           headers=headers, shutdown_event=stopping,
                                           shutdown_grace_period=service.grace + 1)
            streaming = True  # the stream's own finally cancels the job from here on
            return response
        return JSONResponse(await collect(reader, reply, job), headers=headers)
    finally:
        watcher.cancel()
        if not streaming:  # answered, failed or raised: the worker must not go on for nobody
            job.cancelled.set()


def header_text(text: str) -> str:
    """``text`` as an HTTP header value: headers are Latin-1, and a policy category or vector named in
    another script raised UnicodeEncodeError (a 500) after the worker had started the answer."""
    from urllib.parse import quote

    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


# ----------------------------------------------------------------------------- the app


def _error_response(error: ApiError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if error.status == 408:  # a stalled body: nothing more is worth waiting for on this connection
        headers["Connection"] = "close"  # (not on 413: closing while the client still uploads resets the
                                         # connection, and clients report a network error, not the 413)
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure, expected or not, leaves as an OpenAI error object."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, str(exc), code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


def create_app(service: Service, *, api_key: str | None = None, max_body: int = MAX_BODY,
               cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app; ``/health`` is open, everything under ``/v1`` needs the key when one is set.

    ``cors_origins``: web pages (by origin, or ``*``) whose scripts may call the server from a browser.
    None by default: a page the user happens to visit must not reach a server on their loopback."""
    app = FastAPI(title="rs-local", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["*"], expose_headers=["X-RS-Local-Steering", "Retry-After"], max_age=600)
    guarded = [Depends(bearer_check(api_key))]
    started = time.time()

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: health checkers that send it got a 405
    async def health() -> dict:
        worker = service.worker
        return {"status": "ok", "model": service.model_id, "n_ctx": service.runner.n_ctx,
                "n_layer": service.runner.n_layer, "uptime_s": round(time.time() - started, 1),
                "busy": worker.busy, "waiting": worker.waiting, "prefix_cache": worker.prefix_cache,
                "default_steering": service.default.describe(), "stats": dict(worker.stats)}

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": service.model_list()}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model(model_id: str) -> dict:  # the openai client's models.retrieve
        found = next((m for m in service.model_list() if m["id"] == model_id), None)
        if found is None:
            raise ApiError(404, f"model {model_id[:200]!r} is not served here", param="model", code="model_not_found")
        return found

    @app.get("/v1/steering/vectors", dependencies=guarded)
    async def vectors() -> dict:
        return {"object": "list", "n_layer": service.runner.n_layer, "n_embd": service.runner.n_embd,
                "default": service.default.describe(), "data": service.library.catalog(),
                "policies": sorted(service.library.policies)}

    @app.get("/v1/steering/policies", dependencies=guarded)
    async def policies() -> dict:
        return {"object": "list", "data": service.library.policy_catalog()}

    # each also with a trailing slash: the default was a 307 redirect with an empty body, which a POST
    # client does not follow
    @app.post("/v1/chat/completions", dependencies=guarded)
    @app.post("/v1/chat/completions/", dependencies=guarded, include_in_schema=False)
    async def chat(request: Request) -> Response:
        body = parse_body(await read_body(request, max_body, service.request_timeout, service.closing))
        return await answer(request, service, body, parse_chat(body), chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    @app.post("/v1/completions/", dependencies=guarded, include_in_schema=False)
    async def completions(request: Request) -> Response:
        body = parse_body(await read_body(request, max_body, service.request_timeout, service.closing))
        return await answer(request, service, body, parse_completion(body), chat=False)

    return app


def build_service(runner: Runner, model_id: str, *, vector_specs: tuple[str, ...] = (), vectors_dir=None,
                  default_specs: tuple[tuple[str, float | None], ...] = (), prefix_cache: bool = False,
                  policy_specs: tuple[str, ...] = (), head_cache_bytes: int = HEAD_CACHE_BYTES) -> Service:
    """Load and check the named vectors and policies against the loaded model, and make the (not yet started) worker.

    ``head_cache_bytes`` bounds the KV kept of chat-template heads per steering (0 turns it off).
    """
    library = VectorLibrary(runner.n_embd, runner.n_layer, check=runner.check_vector)
    library.load_specs(vector_specs)
    if vectors_dir is not None:
        library.load_directory(vectors_dir)
    gates = load_policies(runner, library, policy_specs)
    default = library.default(default_specs)
    worker = Worker(runner, library, prefix_cache=prefix_cache, gates=gates, head_cache_bytes=head_cache_bytes)
    return Service(runner, model_id, library, default, worker)


def load_policies(runner: Runner, library: VectorLibrary, specs: tuple[str, ...]) -> dict[str, Any]:
    """One gate per ``NAME=PATH``: the file is read and checked against the model here, at start."""
    from rs_local.runtime.policy import PolicyRunner
    from rs_local.serve.steering import parse_policy_spec

    gates: dict[str, Any] = {}
    for spec in specs:
        name, path = parse_policy_spec(spec)
        if name in gates:
            raise RsLocalError(f"two policies are named '{name}'")
        gate = PolicyRunner.load(runner, path)
        library.add_policy(name, gate.policy, str(path))
        gates[name] = gate
    return gates


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_body: int = MAX_BODY, log_level: str = "info", cors_origins: tuple[str, ...] = ()) -> None:
    """Run the server until SIGINT, SIGTERM or SIGHUP; answers under way get ``service.grace`` seconds, then the worker stops."""
    import uvicorn

    closing = service.closing

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # the signal handler: tell waiting requests first
            if not closing.is_set() or self.force_exit:
                closing.set()
                super().handle_exit(sig, frame)
            elif not self.hurried:  # a second Ctrl-C: end every answer now, with an error the client can read
                self.hurried = True
                self._captured_signals.append(sig)
                # on a thread of its own: this handler interrupts the event loop's thread, which may hold
                # the queue's or a job's lock that end_all takes (a deadlock, even for a third Ctrl-C)
                threading.Thread(target=service.worker.end_all, args=(cut_short(),), daemon=True).start()
            else:  # a third: uvicorn's own force quit
                self.force_exit = True

        hurried = False

    app = create_app(service, api_key=api_key, max_body=max_body, cors_origins=cors_origins)
    import numpy.random  # noqa: F401 - numpy loads it on first use; out of descriptors, the first request's 500
    service.worker.start()
    raise_open_files_limit()
    quiet_accept_errors()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=service.grace + 2, access_log=log_level == "debug",
                            http=header_timeout_protocol(service.request_timeout))
    server = Server(config)
    previous = hang_up_stops(server)
    try:
        server.run()
    finally:
        service.worker.stop()
        if previous is not None:  # a library caller's process keeps its own SIGHUP handling afterwards
            signal.signal(signal.SIGHUP, previous)


def hang_up_stops(server: Any) -> Any:
    """SIGHUP (the terminal closed, the SSH session dropped) stops the server as SIGTERM does: streams end
    with the server_shutdown event and [DONE]. Left to the command's own handler it ended the process
    mid-stream, the connection cut with no event. Returns the handler it replaced (None: none replaced)."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None or threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(hup) == signal.SIG_IGN:  # `nohup rs-local serve`: asked to outlive the terminal
        return None
    return signal.signal(hup, lambda signum, frame: server.handle_exit(signal.SIGTERM, frame))


class _OncePerMinute(logging.Filter):
    """Lets asyncio's "out of system resource" accept error through once a minute.

    Why: out of file descriptors (a low ``ulimit -n``), asyncio logs a traceback for every accept it
    retries: 120,000 of them, 50 MB of log, in ten seconds, while the server otherwise recovered."""

    def __init__(self) -> None:
        super().__init__()
        self.last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        return True


def quiet_accept_errors() -> None:
    log_of_asyncio = logging.getLogger("asyncio")
    if not any(isinstance(f, _OncePerMinute) for f in log_of_asyncio.filters):
        log_of_asyncio.addFilter(_OncePerMinute())
