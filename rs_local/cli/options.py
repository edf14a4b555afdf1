"""Options shared by the commands that load a model and apply vectors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

from rs_local import models
from rs_local.errors import FileProblem
from rs_local.runtime.host import REPACK_ENV
from rs_local.runtime.sampling import SamplingParams

err_console = Console(stderr=True)


def say(msg: str) -> None:
    """A dim progress/status line on stderr (stdout stays for results)."""
    err_console.print(f"[dim]{msg}[/]")


def check_output(path: Path, force: bool) -> None:
    """Refuse to overwrite, or to write into a missing directory, before minutes of work."""
    if path.exists() and not force:
        raise FileProblem(path, "already exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise FileProblem(path, f"directory {path.parent} does not exist")


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model", "-m", default=models.DEFAULT_MODEL, show_default=True,
        help="Built-in model name (see `rs-local models list`) or path to a GGUF file.",
    )(f)


def vector_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--vector", "--control-vector", "vectors", multiple=True, metavar="PATH[:SCALE]",
                     help="Control vector to apply (repeatable); an explicit :SCALE overrides --scale."),
        click.option("--scale", type=float, default=1.0, show_default=True,
                     help="Scale for vectors given without one. Negative removes refusal, positive induces it."),
        click.option("--layers", "--control-vector-layer-range", "layers", metavar="START-END", default=None,
                     help="Apply only to blocks START..END inclusive."),
    ]):
        f = opt(f)
    return f


def runtime_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--ctx", "n_ctx", type=click.IntRange(128), default=4096, show_default=True, help="Context size in tokens."),
        click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="Layers to offload on a Metal/CUDA build of llama.cpp (-1 = all)."),
        click.option("--threads", "n_threads", type=click.IntRange(1), default=None,
                     help="CPU threads (default: the physical cores this process may use)."),
        click.option("--repack/--no-repack", default=None, expose_value=False, callback=_set_repack,
                     help="llama.cpp weight repacking (its --no-repack). Default: on, off on AMX CPUs, "
                          f"where it crashes; also {REPACK_ENV}=0|1|auto."),
    ]):
        f = opt(f)
    return f


def _set_repack(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
    """Record --repack/--no-repack for every model this command loads (runner, judge, recipe)."""
    if value is not None:
        os.environ[REPACK_ENV] = "1" if value else "0"


def sampling_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--max-tokens", "-n", type=click.IntRange(1), default=256, show_default=True),
        click.option("--temperature", "--temp", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output with --temperature > 0)."),
        click.option("--system", default=None, help="System prompt."),
    ]):
        f = opt(f)
    return f


def sampling_from(kwargs: dict[str, Any]) -> SamplingParams:
    return SamplingParams(temperature=kwargs["temperature"], top_p=kwargs["top_p"], seed=kwargs["seed"])


def quiet_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (must happen before llama.cpp loads).

    On a busy or small machine, spinning threads of a batched decode steal the cores the
    other threads need; passive waiting costs nothing measurable on an idle one.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_runner(model: str, n_ctx: int, n_gpu_layers: int, n_threads: int | None):
    """Resolve the model (pulling a built-in one on first use) and load it with a status line."""
    from rs_local.runtime.runner import Runner

    path = models.resolve(model, progress=say)
    with err_console.status(f"loading {path.name}"):
        return Runner(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads)


def load_vectors(specs: tuple[str, ...], scale: float, layers: str | None):
    """Parse --vector/--scale/--layers into (parts, layer_range)."""
    from rs_local.runtime.vector_specs import load_vector_specs, parse_layer_range

    parts = load_vector_specs(specs, default_scale=scale)
    return parts, (parse_layer_range(layers) if layers else None)
