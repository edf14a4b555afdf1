"""The ``rs-local`` command group.

Commands live in one module each; this module only assembles them and turns library errors
into one-line messages (exit 1) instead of tracebacks. Usage errors are click's (exit 2).
"""

from __future__ import annotations

import errno
import sys

import click

from rs_local.cli.terminal import terminal_safe
from rs_local.errors import RsLocalError


#: What an allocation that failed mid-command says (the fit's memory check runs before work; this is the rest).
OUT_OF_MEMORY = ("out of memory: use a smaller model, shorter or fewer prompts, or a machine with more memory "
                 "(`rs-local doctor` shows what is available)")
#: What a thread that could not be started says (a container's process limit counts threads).
NO_THREADS = ("cannot start a thread: this process is at its process/thread limit (docker --pids-limit, a pod's "
              "pid limit, ulimit -u); raise the limit, or lower --threads and OMP_NUM_THREADS")


class _Group(click.Group):
    """A group that reports RsLocalError (and OSError on user files) as one line.

    The line is terminal-safe: a file name with an escape sequence or a newline cannot rewrite
    the screen or fake a second line.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RsLocalError as exc:
            raise click.ClickException(terminal_safe(str(exc))) from None
        except MemoryError:
            raise click.ClickException(OUT_OF_MEMORY) from None
        except RuntimeError as exc:  # torch's allocator says so in a RuntimeError, not a MemoryError
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
                detail = " ".join(str(exc).split())[:200]  # which device, how much: worth keeping
                raise click.ClickException(terminal_safe(f"{OUT_OF_MEMORY} [{detail}]")) from None
            if "can't start new thread" in str(exc):  # docker --pids-limit, a pod's pid limit, ulimit -u
                raise click.ClickException(NO_THREADS + _address_space_note()) from None
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout's reader left (`| head`): click ends quietly, exit 1
                raise
            if exc.filename:
                raise click.ClickException(terminal_safe(f"{exc.filename}: {exc.strerror or exc}")) from None
            raise click.ClickException(terminal_safe(str(exc))) from None


def _address_space_note() -> str:
    """Under ``ulimit -v`` a thread's stack may not fit: the pid limit alone misled the user there."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return ""
    if soft == resource.RLIM_INFINITY:
        return ""
    return f"; or the address-space limit (ulimit -v, now {soft // 2**20:,} MiB) left no room for a thread's stack"


def _version_message() -> str:
    """``--version``: ours and llama-cpp-python's; ``rs-local doctor`` has the build details."""
    from importlib import metadata

    try:
        llama = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        llama = "not installed"
    return f"%(prog)s %(version)s (llama-cpp-python {llama}; `rs-local doctor` for CPU, build and repack)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rs-local", message=_version_message())
def cli() -> None:
    """Refusal steering for local LLMs: fit, export and apply llama.cpp control vectors."""


def _register() -> None:
    from rs_local.cli import (doctor_cmd, eval_cmd, experts_cmd, fit_cmd, inspect_cmd, isolate_cmd, judge_cmd,
                              models_cmd, policy_cmd, run_cmd, serve_cmd)

    modules = (models_cmd, inspect_cmd, run_cmd, fit_cmd, experts_cmd, isolate_cmd, judge_cmd, eval_cmd, policy_cmd,
               serve_cmd, doctor_cmd)
    for module in modules:
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def _sigterm_unwinds() -> None:
    """Make SIGTERM and SIGHUP raise :class:`~rs_local.files.Terminated` for the whole command, as Ctrl-C raises
    KeyboardInterrupt: ``finally`` blocks then remove temp files and directories (a half-written
    Transformers cache entry or model download was left behind), and the command ends with one line
    instead of dying silently. A handler someone else installed is left alone."""
    from rs_local.files.writing import raise_on_stop_signals

    raise_on_stop_signals()


def main() -> None:
    """Console-script entry point."""
    from rs_local.cli.streams import prepare
    from rs_local.files import Terminated

    problem = prepare()  # encodings, a broken stderr, COLUMNS, a deleted cwd: see rs_local.cli.streams
    if problem:
        click.echo(f"Error: {problem}", err=True)
        sys.exit(1)
    _sigterm_unwinds()
    try:
        cli(prog_name="rs-local")
    except Terminated as exc:
        click.echo("Terminated.", err=True)
        sys.exit(exc.code)
    except RsLocalError as exc:  # from --help or --version, which click runs before the group's invoke
        click.echo(f"Error: {terminal_safe(str(exc))}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
