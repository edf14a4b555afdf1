"""Load the model to fit on: the very GGUF llama.cpp runs, dequantized by Transformers.

Fitting on the same file the vector will be applied to removes a whole class of mismatch
(a different checkpoint, a different chat template). Transformers reads GGUF with
``from_pretrained(dir, gguf_file=name)``; a Hugging Face model directory works as well.

Everything is local: ``local_files_only=True`` everywhere, so fitting works with
``HF_HUB_OFFLINE=1`` and never touches the network. Loaded models are cached per process
(by file and dtype) because loading and dequantizing costs seconds and a session (tests,
a notebook, ``lambda=auto``) fits many times.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rs_local.errors import ModelError

DTYPES = ("float32", "bfloat16")

_CACHE: dict[tuple[str, str], "FitModel"] = {}


@dataclass
class FitModel:
    """A loaded causal LM, its tokenizer and where its decoder blocks are."""

    name: str
    path: Path
    model: Any  # transformers PreTrainedModel (with LM head; only .base is run)
    base: Any  # the decoder stack without the LM head
    blocks: Any  # torch.nn.ModuleList of decoder layers, block i = llama.cpp block i
    tokenizer: Any
    dtype: str
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def n_embd(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_hint(self) -> str:
        """Architecture name for ``controlvector.model_hint`` (``llama``, ``qwen2`` ...)."""
        return str(getattr(self.model.config, "model_type", "") or "")

    @property
    def fingerprint(self) -> str:
        """Short stable hash of :attr:`identity` (cache keys)."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]


def model_identity(path: Path, name: str) -> dict[str, Any]:
    """What identifies the weights without hashing 500 MB each time.

    Built-in models carry their verified sha256; other files are identified by absolute
    path, size, mtime and a hash of their first and last MiB (a model copied over another with
    ``cp -p`` keeps size and mtime; see :func:`rs_local.files.edge_digest`).
    """
    from rs_local import models

    if name in models.MODELS:
        return {"sha256": models.MODELS[name].sha256}
    digest = models.verified_digest(path) if path.is_file() else None
    if digest:  # a pulled model's verification marker gives its sha256 for free (it compared seconds with ns)
        return {"sha256": digest}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".gguf", ".model"})
        return {"dir": str(path.resolve()), "files": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]}
    from rs_local.files import edge_digest

    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime), "edges": edge_digest(path)}


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return getattr(torch, dtype)


def _find_blocks(model: Any) -> tuple[Any, Any]:
    """The base model (no LM head) and its decoder ModuleList, across common layouts."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or getattr(model, "model", None)
    candidates = [base, getattr(base, "language_model", None), getattr(base, "decoder", None)]
    for cand in candidates:
        if cand is not None and hasattr(cand, "layers"):
            return cand, cand.layers
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}")


def _gguf_overrides(path: Path) -> dict[str, Any]:
    """Config fields Transformers' GGUF loader misses (MoE expert widths), from the file's header."""
    if path.is_dir():
        return {}
    from rs_local.converters.gguf_header import gguf_scalars
    from rs_local.converters.moe_arch import transformers_overrides

    try:
        return transformers_overrides(gguf_scalars(path))
    except ModelError:
        return {}  # unreadable header: Transformers' own load reports it


def _import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelError("fitting needs Transformers and torch: pip install 'rs-local[fit]'") from exc
    return transformers


def is_loaded(path: Path, dtype: str = "float32") -> bool:
    """Whether :func:`load_model` already holds this resolved model file in this dtype (no new memory)."""
    return (str(Path(path).resolve()), dtype) in _CACHE


def reads_cache(name: str, path: Path, dtype: str = "float32") -> bool:
    """Whether loading this GGUF as ``dtype`` would read the disk cache (the weights, without the
    first load's dequantization beside them; see :mod:`rs_local.vectors.hf_cache`)."""
    from rs_local.vectors import hf_cache

    if not hf_cache.enabled() or Path(path).is_dir():
        return False
    try:
        import transformers
    except ImportError:
        return False
    entry = hf_cache.entry_dir(model_identity(Path(path), name) | {"dtype": dtype}, transformers.__version__)
    return hf_cache.is_complete(entry)


def fit_blocks(model: Any, progress=None) -> int:
    """How many blocks Transformers will see in ``model``, without loading it.

    Why: the recipes label prompts with llama.cpp for minutes before the Transformers load. A model
    whose architecture Transformers' GGUF loader does not know, or a ``--layers`` band it lacks,
    should stop them at once, without paying for the load first (a 7B model's takes minutes and
    most of the memory). A GGUF answers from its header (0.1 s); the architecture is checked
    against the installed Transformers' own list, read the way its loader reads it. A directory
    answers from its config; a loaded FitModel from itself.
    """
    if hasattr(model, "blocks"):
        return model.n_layer
    from rs_local import models

    path = models.resolve(str(model), progress=progress)
    from rs_local.vectors.layers import check_steerable

    blocks = _directory_blocks(path) if path.is_dir() else _gguf_blocks(path)
    check_steerable(path, blocks)
    return blocks


def _gguf_blocks(path: Path) -> Any:
    from rs_local.converters.gguf_header import check_model_header, gguf_scalars

    check_model_header(path)
    scalars = gguf_scalars(path)
    arch = str(scalars.get("general.architecture", ""))
    _import_transformers()
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known

    # the loader's own renames: qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, t5encoder -> t5, ...
    names = {arch, arch.replace("-", "_"), re.sub(r"moe$", "_moe", arch), "t5" if "t5" in arch else arch}
    if not names & set(known):
        raise ModelError(f"{path}: Transformers cannot load it (its GGUF loader does not know the architecture "
                         f"{arch!r}), and fitting needs Transformers; llama.cpp can still run it with a ready vector")
    return scalars.get(f"{arch}.block_count")


def _directory_blocks(path: Path) -> Any:
    transformers = _import_transformers()
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: Transformers could not load it "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None)


def _fit_threads() -> None:
    """Hold torch to the CPUs this process may use (:func:`rs_local.runtime.host.torch_threads`)."""
    import torch

    from rs_local.runtime.host import torch_threads

    wanted = torch_threads(current=torch.get_num_threads())
    if wanted is not None:
        torch.set_num_threads(wanted)


def load_model(model: str | Path, dtype: str = "float32", progress=None) -> FitModel:
    """Resolve ``model`` (built-in name, ``.gguf`` path or HF directory) and load it for fitting.

    Cached per process by (resolved path, dtype).
    """
    from rs_local import models
    from rs_local.vectors.layers import check_steerable

    name = str(model)
    path = models.resolve(name, progress=progress)
    key = (str(Path(path).resolve()), dtype)
    if key in _CACHE:
        return _CACHE[key]
    torch_dtype = _torch_dtype(dtype)
    transformers = _import_transformers()
    _fit_threads()
    if path.is_dir():
        where, extra = str(path), {}
    elif path.suffix.lower() == ".gguf":
        where, extra = str(path.parent), {"gguf_file": path.name}
        from rs_local.converters.gguf_header import check_model_header

        check_model_header(path)
        _check_template_key(path)
    else:
        raise ModelError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    identity = model_identity(Path(path), name) | {"dtype": dtype}
    tokenizer, lm = _load_transformers(transformers, Path(path), where, extra, torch_dtype, identity, progress)
    lm.eval()
    lm.requires_grad_(False)
    base, blocks = _find_blocks(lm)
    check_steerable(path, len(blocks))
    if getattr(tokenizer, "chat_template", None) in (None, ""):
        raise ModelError(f"{path}: the model has no chat template; fitting needs one to format prompts as llama.cpp will")
    fm = FitModel(
        name=name,
        path=Path(path),
        model=lm,
        base=base,
        blocks=blocks,
        tokenizer=tokenizer,
        dtype=dtype,
        identity=identity,
    )
    _CACHE[key] = fm
    return fm


def _load_transformers(transformers: Any, path: Path, where: str, extra: dict[str, Any], torch_dtype: Any,
                       identity: dict[str, Any], progress=None) -> tuple[Any, Any]:
    """Tokenizer and model: from the disk cache when a GGUF was loaded before, else from the GGUF (then cached).

    ``progress`` hears one line first: a first load of a GGUF is a silent quarter of a minute or more.
    """
    from rs_local.vectors import hf_cache

    cached = "gguf_file" in extra and hf_cache.enabled()
    entry = hf_cache.entry_dir(identity, transformers.__version__) if cached else None
    if progress is not None:
        first = "gguf_file" in extra and (entry is None or not hf_cache.is_complete(entry))
        progress(f"loading {path.name} into Transformers" + (
            " (dequantizing the GGUF: 10-30 s for a 0.5B model on 2 cores" + ("; later loads read a cache)" if cached else ")")
            if first else ""))
    with _quiet_transformers():
        hit = hf_cache.load(entry, transformers, torch_dtype) if entry else None
        if hit is not None:
            return hit
        try:
            with _one_gguf_reader():
                tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
                lm, info = transformers.AutoModelForCausalLM.from_pretrained(
                    where, dtype=torch_dtype, local_files_only=True, output_loading_info=True, **extra,
                    **_gguf_overrides(path))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
                raise  # the machine's limit, not the model's fault: the command group says so
            raise ModelError(f"{path}: Transformers could not load it "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        _check_complete(path, info)
        if entry is not None:
            hf_cache.store(entry, tokenizer, lm, path)
    return tokenizer, lm


def _check_template_key(path: Path) -> None:
    """A GGUF without a chat template is refused from its header, before the load dequantizes it
    (and the cache stores it) only to be refused after."""
    from rs_local.converters.gguf_header import gguf_scalars

    try:
        template = gguf_scalars(path).get("tokenizer.chat_template")
    except (ModelError, OSError):
        return  # unreadable here: the load reports it
    if not template:
        raise ModelError(f"{path}: the model has no chat template; fitting needs one to format prompts as llama.cpp will")


def _check_complete(path: Path, info: dict[str, Any]) -> None:
    """Refuse a model some of whose weights the file lacks (a vocabulary-only GGUF, a config claiming
    more blocks than the weights hold): Transformers fills them with random numbers, and a vector fitted
    on those would look fine (AUROC 1.0) and mean nothing."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"{path}: {len(missing)} of the model's weight tensors are not in the file "
                         f"(e.g. {missing[0]}); Transformers would fill them with random numbers")


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """One fast ``gguf.GGUFReader`` per file for the whole load, instead of one per Transformers step.

    Why: Transformers builds a reader for the tokenizer's config, the model's config and the
    weights, and each build turns every metadata field into Python objects (over a million for
    Qwen2.5's vocabulary and merges): measured on 2 cores, 28 s of the first Qwen2.5-Coder-0.5B
    load, of which dequantizing took 4. Transformers imports the class from ``gguf`` at each call,
    so swapping the module attribute for the load reaches every step; a reader is only read from,
    so sharing it changes nothing in what is loaded (tests/test_hf_cache.py loads both ways and compares).
    The reader is also built over a plain array view of the file instead of ``np.memmap``: each of
    its ~450,000 small slices then skips memmap's Python-level bookkeeping (5.3 s -> 1.6 s per
    build for Qwen here; the same bytes, the same fields and tensors).
    The swap is process-wide while the load runs: rs-local loads one Transformers model at a time.
    """
    try:
        import gguf
    except ImportError:  # Transformers reports the missing package itself
        yield
        return
    original = gguf.GGUFReader
    plain = _plain_view_reader(original)
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = plain(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _plain_view_reader(reader_class: type) -> type:
    """``reader_class`` whose ``data`` (the mapped file, a ``np.memmap``) is kept as a plain ndarray view.

    Slicing a memmap runs ``memmap.__getitem__`` and ``__array_finalize__`` in Python for every
    slice; a plain view of the same mapping slices in C. The memmap stays alive as the view's base.
    """
    import numpy as np

    class PlainViewReader(reader_class):  # type: ignore[misc, valid-type]
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, value: Any) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainViewReader


def clear_cache() -> None:
    """Forget loaded models (frees memory in long sessions)."""
    _CACHE.clear()


class _quiet_transformers:
    """Silence Transformers' GGUF-dequantization chatter and progress bars for the load."""

    def __enter__(self):
        # The GGUF dequantizer draws its own tqdm bar on stderr, outside Transformers' switch.
        self._stderr = contextlib.redirect_stderr(io.StringIO())
        self._stderr.__enter__()
        self._level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as tlog

            self._bars = tlog.is_progress_bar_enabled()
            tlog.disable_progress_bar()
        except Exception:  # pragma: no cover - older/newer API
            self._bars = None
        return self

    def __exit__(self, *exc):
        self._stderr.__exit__(*exc)
        logging.getLogger("transformers").setLevel(self._level)
        self._warn.__exit__(*exc)
        if self._bars:
            from transformers.utils import logging as tlog

            tlog.enable_progress_bar()
        return False
