"""``rs-local serve``: parse options, load the model and vectors, start the server (logic in rs_local.serve)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import click

from rs_local.cli.options import load_runner, model_option, runtime_options, say
from rs_local.errors import RsLocalError
from rs_local.files import Terminated
from rs_local.models import MODELS


def _checked(parser_name: str):
    """A click callback that checks each NAME=PATH spec's syntax with ``serve.steering.<parser_name>``
    before the model loads (imported late: the server's dependencies are an optional extra)."""
    def callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
        from rs_local.serve import steering

        for spec in value:
            try:
                getattr(steering, parser_name)(spec)
            except RsLocalError as exc:
                raise click.BadParameter(str(exc)) from None
        return value
    return callback


_named_vectors = _checked("parse_named_spec")
_policies = _checked("parse_policy_spec")


def _defaults(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    from rs_local.serve.steering import parse_default_spec

    try:
        return tuple(parse_default_spec(spec) for spec in value)
    except RsLocalError as exc:
        raise click.BadParameter(str(exc)) from None


def _origins(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """``*`` or ``scheme://host[:port]``, as browsers send ``Origin`` (a path or a trailing slash never matches)."""
    for value in values:
        if value != "*" and not re.fullmatch(r"https?://[^/\s]+", value):
            raise click.BadParameter(f"{value!r} is not an origin: use scheme://host[:port] (no path) or '*'")
    return values


def check_address(host: str, port: int) -> None:
    """One line when the server could not listen on ``host:port`` (in use, not this machine's address),
    said before the model loads; uvicorn said it after the load, in its own log format, with exit code 3.

    Binds as asyncio's ``create_server`` (uvicorn's) will: every address the host resolves to at once
    (``localhost`` may be ::1 and 127.0.0.1), IPv6 sockets IPv6-only, SO_REUSEADDR except on Windows,
    where it would let the probe share a port in use; a family this machine lacks is skipped."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"--host {host}: not an address this machine can listen on ({exc.strerror})") from None
    probes: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            try:
                probe = socket.socket(family, kind, proto)
            except OSError:  # no IPv6 here, say: asyncio skips it too
                continue
            probes.append(probe)
            if os.name != "nt":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT port is free
            if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = ("is in use (another server?); choose another with --port" if exc.errno == errno.EADDRINUSE
                       else f"cannot be listened on ({exc.strerror})")
                raise click.ClickException(f"{host}:{port} {why}") from None
    finally:
        for probe in probes:
            probe.close()


def _web_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"rs-local serve needs the serve extra ({exc.name} is missing): "
                                   "pip install -e '.[serve]' in the rs-local checkout") from None


@click.command()
@model_option
@click.option("--vector", "vector_specs", multiple=True, metavar="NAME=PATH[:SCALE]", callback=_named_vectors,
              help="A vector requests may name (repeatable); SCALE is its default scale.")
@click.option("--vectors", "vectors_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Load every *.gguf in DIR, named by file stem, default scale 1.")
@click.option("--policy", "policy_specs", multiple=True, metavar="NAME=PATH", callback=_policies,
              help="A conditional-steering policy requests may name ({\"steering\": {\"policy\": NAME}} "
                   "or model <model>+@NAME); repeatable.")
@click.option("--default-steering", "default_specs", multiple=True, metavar="NAME[:SCALE]|@POLICY", callback=_defaults,
              help="Steering for requests that ask for none (repeatable; or one policy, @NAME). Default: none.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="RS_LOCAL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 (also RS_LOCAL_API_KEY, kept out of `ps`).")
@click.option("--prefix-cache/--no-prefix-cache", default=False, show_default=True,
              help="Reuse the cached prompt prefix between requests with the same steering (faster; "
                   "answers may then depend in the last bits on the previous request).")
@click.option("--head-cache-mib", type=click.IntRange(0, 1 << 16), default=64, show_default=True,
              help="Memory for the chat template's head KV kept per steering (answers identical either way; "
                   "0 turns it off and re-evaluates the whole prompt each request).")
@click.option("--shutdown-grace", type=click.FloatRange(0, 600), default=3.0, show_default=True, metavar="SECONDS",
              help="On SIGINT, SIGTERM or SIGHUP, how long answers under way may go on before they end with a "
                   "'server_shutdown' error (a stream still ends with [DONE]).")
@click.option("--request-timeout", type=click.FloatRange(1, 3600), default=30.0, show_default=True, metavar="SECONDS",
              help="How long a client may take to send a request's headers, and again its body, before its "
                   "connection is closed (a stalled client would otherwise hold it forever).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", callback=_origins,
              help="Let web pages from ORIGIN (e.g. http://localhost:3000, or '*') call the server from a "
                   "browser (repeatable). Default: none, so a page you visit cannot reach it.")
@runtime_options
def serve(model: str, vector_specs, vectors_dir, policy_specs, default_specs, host: str, port: int,
          api_key: str | None, prefix_cache: bool, head_cache_mib: int, shutdown_grace: float, request_timeout: float,
          cors_origins: tuple[str, ...], n_ctx: int, n_gpu_layers: int, n_threads: int | None) -> None:
    """OpenAI-compatible server; each request picks its steering (body field or model name)."""
    _web_stack()
    from rs_local.serve.app import build_service, serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        say(f"warning: listening on {host} without --api-key: anyone who can reach it can use it")
    check_address(host, port)  # before the model loads: a port in use was found only after it
    runner = load_runner(model, n_ctx, n_gpu_layers, n_threads)
    model_id = model if model in MODELS else runner.path.stem
    service = build_service(runner, model_id, vector_specs=vector_specs, vectors_dir=vectors_dir,
                            default_specs=default_specs, prefix_cache=prefix_cache, policy_specs=policy_specs,
                            head_cache_bytes=head_cache_mib << 20)
    service.grace, service.request_timeout = shutdown_grace, request_timeout
    names = ", ".join(service.library.vectors) or "none"
    policies = ", ".join(service.library.policies) or "none"
    say(f"serving {model_id} on http://{host}:{port}/v1 (vectors: {names}; policies: {policies}; default steering: "
        f"{service.default.label()}; weight repacking {runner.repack_decision})")
    try:
        run_server(service, host=host, port=port, api_key=api_key, cors_origins=cors_origins)
    except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the signal it stopped on: a stop asked for, done
        say("stopped")


COMMANDS = [serve]
