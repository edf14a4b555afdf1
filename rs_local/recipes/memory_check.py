"""Stop a fit that cannot fit in memory before it starts, with one line instead of the OOM killer.

Every fit (``fit``, ``experts``, ``isolate``, ``policy fit``'s gradient vectors, ``demo``) loads the
GGUF into Transformers, dequantized: 4 bytes a weight in float32 (2 in bfloat16), whatever the
file's quantization. A 7B model that chats in 4-5 GB takes 30 GB there, and the first load, which
dequantizes tensor by tensor beside the model being built, peaks higher still: measured on the
built-in models, 1.35x the weights (Qwen2.5-Coder-0.5B: 3.66 GB for 2.52 GB of float32 weights;
SmolLM2-135M 1.6x) over the ~0.25 GB that Python, torch and Transformers take before it. A process
that asks for more than the machine has is killed by the kernel without a message, often after
minutes of labelling, or it swaps until the user gives up.

So before any work: the weights alone over what is available is a one-line error naming the
file, the need and what is left; the first load's peak over it is a warning (the load may still
pass, and a second load reads a cache at 1x). A Hugging Face directory's weights are counted from
its safetensors headers; it loads without dequantizing, so its peak is the weights. Where the need
cannot be read (a directory without safetensors, an unreadable header the load itself will report)
or the machine's memory is unknown, nothing is said. ``RS_LOCAL_MEMORY_CHECK=0`` skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rs_local.callbacks import Say
from rs_local.errors import ModelError, RsLocalError

#: Bytes per weight of each fitting dtype.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: Peak of a first load from a GGUF, as a multiple of the weights (measured: 1.35x on Qwen2.5-Coder-0.5B).
FIRST_LOAD_PEAK = 1.35
#: What Python, torch and Transformers hold before the model (measured: 0.25 GB).
BASE_BYTES = 300 << 20
#: The way out of a float32 recipe fit that does not fit: its passes and weights in bfloat16
#: (``isolate``/``demo --bf16`` say the same; ``rs_local.recipes.isolate.fit_dtype``).
RECIPE_HINT = "(bfloat16 takes half: RS_LOCAL_BF16=1)"
#: The same for the commands with a ``--dtype`` option (``fit``, ``experts``).
DTYPE_OPTION_HINT = "(bfloat16 takes half: --dtype bfloat16)"


def fit_memory_need(n_weights: int, dtype: str = "float32") -> tuple[int, int]:
    """(bytes the weights take, bytes a first load from a GGUF peaks at), ``BASE_BYTES`` included."""
    weights = n_weights * DTYPE_BYTES[dtype]
    return weights + BASE_BYTES, int(weights * FIRST_LOAD_PEAK) + BASE_BYTES


def check_fit_memory(model: Any, dtype: str = "float32", say: Say | None = None, *, hint: str = RECIPE_HINT,
                     available: int | None = None, env: dict[str, str] | None = None) -> None:
    """Raise a one-line :class:`ModelError` when ``model``'s weights cannot fit in memory as ``dtype``;
    ``say`` a warning when only the first load's peak would not. ``hint``: the calling command's way
    to bfloat16 (``fit --dtype bfloat16``; the recipes' :data:`RECIPE_HINT` by default), added to the
    error of a float32 fit. ``available`` (bytes) and ``env`` default to this machine's (tests give
    fixtures). A model already loaded in this process, or one given as a loaded FitModel, is not
    checked."""
    from rs_local.runtime.host import available_memory, memory_check_enabled

    if hasattr(model, "blocks") or not memory_check_enabled(env):
        return
    from rs_local import models
    from rs_local.vectors.hf_model import is_loaded, reads_cache

    path = models.resolve(str(model), progress=say)
    if is_loaded(path, dtype):
        return
    n_weights = _weights(path)
    available = available_memory() if available is None else available
    if n_weights is None or available is None:
        return
    need, peak = fit_memory_need(n_weights, dtype)
    peak = need if path.is_dir() else peak  # no dequantizing copy beside the model
    hint = hint if dtype == "float32" else ""
    count = f"{n_weights / 1e9:.1f} billion" if n_weights >= 1e9 else f"{n_weights / 1e6:.0f} million"
    what = f"{count} weights as {dtype}"
    if need > available:
        raise ModelError(f"{path}: fitting loads its {what} into Transformers, {_gb(need)} of memory, but "
                         f"{_gb(available)} is available: use a smaller model or a machine with more memory"
                         f"{' ' + hint if hint else ''}, or set RS_LOCAL_MEMORY_CHECK=0 to try anyway")
    if peak > available and say is not None and not reads_cache(str(model), path, dtype):
        say(f"warning: {path.name}: the first load of its {what} may peak near {_gb(peak)}, and {_gb(available)} "
            "is available; if the process is killed, close other programs or use a smaller model")


#: Share of the memory left after the model's load that the gradient passes' activations may take.
GRADIENT_SHARE = 0.8


def gradient_memory(available: int | None = None, env: dict[str, str] | None = None) -> int | None:
    """Bytes the recipes' gradient passes may take (a share of what is left now, with the model
    loaded); None when the check is off or the machine's memory is unknown (no bound). Handed to
    ``vectors.refusal_gradient`` as an argument, which sizes its batches by it."""
    from rs_local.runtime.host import available_memory, memory_check_enabled

    if not memory_check_enabled(env):
        return None
    available = available_memory() if available is None else available
    return None if available is None else int(available * GRADIENT_SHARE)


def _weights(path: Path) -> int | None:
    """Weights in a GGUF file or a Hugging Face directory, from headers; None when they are not
    readable (the load reports that)."""
    from rs_local.converters.gguf_header import gguf_parameter_count
    from rs_local.converters.safetensors_file import safetensors_parameter_count

    try:
        return safetensors_parameter_count(path) if path.is_dir() else gguf_parameter_count(path)
    except (RsLocalError, OSError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
