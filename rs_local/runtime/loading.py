"""The one way rs-local loads a llama.cpp model.

Every model load in the package (the Runner, and through it the batched engine, the local
judge, evaluation and recipes) comes here, so that the host decisions of
:mod:`rs_local.runtime.host` apply everywhere: repacking off on AMX CPUs, threads from the
physical cores, OpenMP threads that sleep. A test checks that nothing else in the package
constructs ``llama_cpp.Llama`` or calls llama.cpp's model loader.

llama-cpp-python's ``Llama`` has no argument for ``use_extra_bufts`` (the field behind
llama.cpp's ``--no-repack``): it builds its model parameters from
``llama_model_default_params()`` inside its constructor. :func:`repack_policy` therefore
swaps that function, for the duration of one load, for one that returns the defaults with
our choice filled in. The same patch, applied for a whole process, is what
``python -m rs_local.runtime.upstream_server`` uses to run llama-cpp-python's own server.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rs_local.errors import ModelError
from rs_local.runtime.host import (
    RepackDecision, capped_threads, decide_repack, default_threads, import_llama, quiet_openmp,
)
from rs_local.runtime.interrupts import deferred, hold

_PATCH_LOCK = threading.RLock()


def check_gguf(path: Path) -> None:
    """Refuse missing and non-GGUF files before llama.cpp sees them (it may abort the process)."""
    from rs_local.converters.gguf_header import check_model_header

    if not path.is_file():
        if path.is_dir():
            what = "a directory, not a GGUF file (llama.cpp runs GGUF files; a Hugging Face directory is for fitting)"
        else:
            what = "not a regular file (a pipe or a device)" if path.exists() else "no such model file"
        raise ModelError(f"{path}: {what}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF model file (bad magic {magic!r})")
    check_model_header(path)


def memory_hint(path: Path, *, limit: int | None = None, free: int | None = None) -> str:
    """Why a load may have failed for memory, or "": llama.cpp says only "Failed to create llama_context"
    or "Failed to load model" when an address-space limit (``ulimit -v``) or a full machine stops it.
    ``limit`` (bytes) and ``free`` default to this process's RLIMIT_AS and the memory available."""
    try:
        need = path.stat().st_size
    except OSError:
        return ""
    if limit is None:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_AS)[0]
            limit = None if soft == resource.RLIM_INFINITY else soft
        except (ImportError, ValueError, OSError):
            limit = None
    if limit is not None and limit < 2 * need + (1 << 30):  # weights mapped, context and Python itself
        return (f"; this process may use only {limit / 2**30:.1f} GiB of address space (ulimit -v), and a "
                f"{need / 2**30:.1f} GiB model needs more (the weights, llama.cpp's context, Python and its libraries)")
    if free is None:
        from rs_local.runtime.memory import available_memory

        free = available_memory()
    if free is not None and free < need:
        return f"; {free / 2**30:.1f} GiB of memory is free, the model alone is {need / 2**30:.1f} GiB"
    return ""


def install_repack_policy(decision: RepackDecision) -> None:
    """Make every later llama.cpp model load in this process follow ``decision``.

    For programs we do not control the loading of (llama-cpp-python's server); rs-local's own
    loads use the scoped :func:`repack_policy`.
    """
    import llama_cpp.llama_cpp as low

    original = getattr(low.llama_model_default_params, "rs_local_original", low.llama_model_default_params)

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = decision.enabled
        return params

    default_params.rs_local_original = original  # type: ignore[attr-defined]
    low.llama_model_default_params = default_params


@contextmanager
def repack_policy(decision: RepackDecision) -> Iterator[None]:
    """Within the block, llama.cpp models load with repacking as ``decision`` says."""
    import llama_cpp.llama_cpp as low

    with _PATCH_LOCK:
        saved = low.llama_model_default_params
        install_repack_policy(decision)
        try:
            yield
        finally:
            low.llama_model_default_params = saved


_LOG_FILTER: Any = None  # the installed ctypes callback; kept referenced so it is never collected


def install_log_filter() -> None:
    """llama.cpp's own log lines reach the terminal only when llama-cpp-python is verbose.

    llama-cpp-python 0.3.x filters them by an older numbering of ggml's levels (WARN 2, ERROR 3);
    current ggml numbers DEBUG 1, INFO 2, WARN 3, ERROR 4, so at ``verbose=False`` every warning
    got through: the batched engine's pooled context printed "n_ctx_seq (32768) > n_ctx_train
    (8192) -- possible training context overflow" on SmolLM2 (each sequence holds at most
    ``seq_ctx`` tokens; only the pool is that large). rs-local reports what matters itself, as
    one-line errors. Verbose loads (``verbose=True``) still see everything.
    """
    global _LOG_FILTER
    if _LOG_FILTER is not None:
        return
    import ctypes
    import logging

    import llama_cpp

    try:  # a private module: if a later llama-cpp-python moves it, its own filter stays
        from llama_cpp import _logger

        forward = _logger.llama_log_callback
        _logger.logger.level  # noqa: B018 (the attribute the filter reads)
    except (ImportError, AttributeError):
        return

    @llama_cpp.llama_log_callback
    def log_filter(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            if _logger.logger.level <= logging.DEBUG:  # set by Llama(verbose=True)
                forward(level, text, user_data)
        except BaseException as exc:  # Ctrl-C landing here: ctypes would print and drop it
            hold(exc)

    _LOG_FILTER = log_filter
    llama_cpp.llama_log_set(log_filter, ctypes.c_void_p(0))


#: The context a model is loaded with when none is asked for (unless it was trained with less).
DEFAULT_CTX = 4096


def context_size(path: str | Path, n_ctx: int | None) -> int:
    """``n_ctx`` as asked; without one, :data:`DEFAULT_CTX` or the model's trained context where that
    is shorter (a 2048-token model would otherwise need --ctx on every command)."""
    if n_ctx is not None:
        return n_ctx
    from rs_local.converters.gguf_header import trained_context

    trained = trained_context(path)
    return min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX


def load_llama(
    path: str | Path,
    *,
    n_ctx: int = 4096,
    n_batch: int = 512,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    repack: bool | None = None,
    verbose: bool = False,
    **extra: Any,
) -> tuple[Any, RepackDecision]:
    """Load a GGUF model into ``llama_cpp.Llama`` the safe way; returns it with the repack decision.

    ``repack`` None decides from the machine (see :func:`rs_local.runtime.host.decide_repack`);
    ``n_threads`` None takes the physical cores. ``extra`` goes to ``Llama`` unchanged (tests
    use ``logits_all``).
    """
    path = Path(path)
    check_gguf(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # llama-cpp-python passes the path to llama.cpp as UTF-8
        raise ModelError(f"{path}: llama.cpp cannot open a path that is not valid UTF-8; "
                         "rename it or link to it from a UTF-8 path") from None
    quiet_openmp()  # before llama.cpp (and its OpenMP runtime) is first imported
    decision = decide_repack(repack)
    threads = capped_threads(n_threads)[0] if n_threads else default_threads()  # the CLI warns; the API is cut too
    llama_cpp = import_llama()

    install_log_filter()
    try:
        with repack_policy(decision):
            llama = None
            try:
                with deferred():  # a Ctrl-C during the load is raised when it returns (and wins over its error)
                    llama = llama_cpp.Llama(
                        model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=n_gpu_layers,
                        n_threads=threads, n_threads_batch=threads, verbose=verbose, **extra,
                    )
            except BaseException:
                if llama is not None:  # interrupted after a load that succeeded: the model is freed first
                    llama.close()
                raise
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: llama.cpp could not load the model ({exc}){memory_hint(path)}") from None
    except Exception as exc:  # llama-cpp-python compiles the model's chat template while it loads
        from rs_local.templating import is_template_error, template_problem

        if not is_template_error(exc):
            raise
        raise ModelError(f"{path}: the model's chat template does not parse ({template_problem(exc)}), and "
                         "llama-cpp-python cannot load a model without a valid one: replace it with "
                         "gguf-new-metadata --chat-template-file") from None
    return llama, decision
