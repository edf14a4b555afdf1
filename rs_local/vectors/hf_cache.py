"""A disk cache of the Transformers model that a GGUF dequantizes to, so the second fit loads in seconds.

Transformers reads a GGUF three times (config, tokenizer, weights), and each read parses every
metadata field in Python: for Qwen2.5's 151k-token vocabulary and merges that is over a million
fields per read, then the quantized weights are dequantized with numpy. Measured on 2 cores, the
load of Qwen2.5-Coder-0.5B took about 45-120 s, more than the fit itself; the same model saved as
safetensors loads in a few seconds. So after the first load from a GGUF, the model and tokenizer
are saved with ``save_pretrained`` under ``$RS_LOCAL_HOME/transformers/<key>/`` and later loads
read that directory instead.

The weights are stored in the dtype they were loaded in (float32 by default), so a cached load
gives bit-identical weights to a GGUF load (tested). The key is the model's identity (sha256 for
built-in and pulled models; path, size and mtime otherwise), the dtype and the Transformers
version, so an edited file or an upgraded Transformers never reads a stale entry.

A cache must never break a fit: any failure to write is logged and ignored, an entry that fails
to load is removed and the GGUF is read again, the entry is written to a temp directory and
renamed into place (two processes racing keep one), and nothing is written when the disk would be
left with under 1 GiB free. ``RS_LOCAL_FIT_CACHE=0`` turns it off; ``rm -rf`` the directory frees it.

The cache holds at most ``RS_LOCAL_FIT_CACHE_GB`` (default 20) GiB: after a new entry is written, the
entries used longest ago are removed until the rest fit (the newest always stays). Without a bound it
only grew: one developer machine held 15 GB in 99 entries, most for GGUF files long deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rs_local.errors import RsLocalError

log = logging.getLogger("rs_local.fit")

#: Bump when what is stored changes shape, so older entries are ignored.
FORMAT = 1
#: Free space the cache leaves on the disk after writing an entry.
MIN_FREE_BYTES = 1 << 30
#: Default bound on the whole cache, in GiB (``RS_LOCAL_FIT_CACHE_GB``).
DEFAULT_BUDGET_GB = 20.0
DONE = "rs_local_cache.json"


def enabled() -> bool:
    """Off when ``RS_LOCAL_FIT_CACHE`` is ``0``, ``false``, ``no`` or ``off``; any other value but
    the "on" spellings is a one-line error, as for rs-local's other switches (a typo used to mean on)."""
    raw = os.environ.get("RS_LOCAL_FIT_CACHE", "1").strip().lower()
    if raw in {"0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on", ""}:
        budget_bytes()  # a bad bound is said at the start, not swallowed by a best-effort write
        return True
    raise RsLocalError(f"RS_LOCAL_FIT_CACHE={os.environ['RS_LOCAL_FIT_CACHE']!r}: expected 0 or 1")


def cache_root() -> Path:
    from rs_local import models

    return models.home_dir() / "transformers"


def entry_dir(identity: dict[str, Any], transformers_version: str) -> Path:
    """Where the model with this identity (which includes the dtype) is cached."""
    key = json.dumps({"identity": identity, "transformers": transformers_version, "format": FORMAT}, sort_keys=True)
    return cache_root() / hashlib.sha256(key.encode()).hexdigest()[:32]


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` holds a finished save; an entry that cannot be looked at (permissions) is a miss."""
    from rs_local.files import is_cached_file

    return is_cached_file(entry / DONE)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the causes Transformers wrapped it around (a few deep)."""
    out: list[BaseException] = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _errno_in(exc: BaseException, numbers: set[int]) -> int | None:
    return next((e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno in numbers), None)


def _shortage(exc: BaseException, entry: Path) -> BaseException | None:
    """The error to raise when a failed load says the machine ran short (memory, threads, descriptors)
    rather than that the entry is damaged, in the form the command group reports as one line; else None."""
    texts = [str(e) for e in _chain(exc)]
    if any("can't start new thread" in t for t in texts):
        return RuntimeError("can't start new thread")
    number = _errno_in(exc, {errno.EMFILE, errno.ENFILE})
    if number is not None:
        return OSError(number, os.strerror(number), str(entry))
    if (any(isinstance(e, MemoryError) for e in _chain(exc)) or _errno_in(exc, {errno.ENOMEM}) is not None
            or any(m in t for t in texts for m in ("allocate memory", "out of memory", "Out of memory",
                                                    "failed to map segment"))):  # a library mmap'd under ulimit -v
        return MemoryError(str(entry))
    return None


def load(entry: Path, transformers: Any, torch_dtype: Any) -> tuple[Any, Any] | None:
    """(tokenizer, model) from a complete entry, or None when there is none or it is damaged (then removed).

    Why not remove on every failure: under ``ulimit -v`` the 0.5 GB entry just written was deleted
    as "unreadable", and the out-of-memory line came only after the slow GGUF load. A machine
    short of memory, threads or descriptors is said (the entry kept); an entry this user may not
    read is passed over (a read-only shared cache, a directory made under ``umask 777``)."""
    if not is_complete(entry):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch_dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken entry only costs the slow load
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        short = _shortage(exc, entry)
        if short is not None:
            raise short from exc
        if _errno_in(exc, {errno.EACCES, errno.EPERM}) is not None or any(isinstance(e, ImportError) for e in _chain(exc)):
            log.warning("cannot read the model cache %s (%s); reading the GGUF instead", entry, first)
            return None  # not the entry's fault: kept
        log.warning("ignoring the unreadable model cache %s (%s: %s); reading the GGUF again",
                    entry, type(exc).__name__, first)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    _mark_used(entry)
    return tokenizer, lm


def _mark_used(entry: Path) -> None:
    """Record a use (the marker's mtime): what the eviction orders entries by."""
    try:
        os.utime(entry / DONE)
    except OSError:  # a read-only cache: it is only read, and never evicted from here
        pass


def budget_bytes() -> int:
    """``RS_LOCAL_FIT_CACHE_GB`` in bytes (default :data:`DEFAULT_BUDGET_GB`); a bad value is one line."""
    raw = os.environ.get("RS_LOCAL_FIT_CACHE_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise RsLocalError(f"RS_LOCAL_FIT_CACHE_GB={raw!r}: expected a number of GiB >= 0")
    return int(gb * 2**30)


def evict(root: Path, keep: Path, budget: int) -> list[Path]:
    """Remove complete entries, least recently used first, until the cache fits ``budget`` bytes;
    ``keep`` (the entry just written) stays whatever its size. Returns what was removed."""
    entries = []
    for child in root.iterdir():
        marker = child / DONE
        if child.name.startswith(".") or not marker.is_file():
            continue  # temp entries are _sweep_stale's
        try:
            size = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
            entries.append((marker.stat().st_mtime, size, child))
        except OSError:
            continue
    total = sum(size for _used, size, _child in entries)
    removed = []
    for _used, size, child in sorted(entries):
        if total <= budget:
            break
        if child == keep:
            continue
        shutil.rmtree(child, ignore_errors=True)
        total -= size
        removed.append(child)
    return removed


def _state_bytes(lm: Any) -> int:
    return sum(p.numel() * p.element_size() for p in lm.state_dict().values())


def store(entry: Path, tokenizer: Any, lm: Any, source: Path) -> bool:
    """Save ``lm`` and ``tokenizer`` as ``entry``; False (and a log line) when it was not written."""
    try:
        if entry.exists():
            return False
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(entry.parent)
        need = _state_bytes(lm) + MIN_FREE_BYTES
        if shutil.disk_usage(entry.parent).free < need:
            log.info("not caching %s: under %.1f GiB free in %s", source.name, need / 2**30, entry.parent)
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            _save(lm, tokenizer, tmp)
            (tmp / DONE).write_text(json.dumps({"source": str(source), "format": FORMAT}) + "\n")
            os.rename(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for gone in evict(entry.parent, entry, budget_bytes()):
            log.info("removed the model cache entry used longest ago: %s", gone.name)
    except Exception as exc:  # noqa: BLE001 - a full disk, a read-only home, a lost rename race: only speed is lost
        log.info("not caching %s in %s: %s: %s", source.name, entry.parent, type(exc).__name__, exc)
        return False
    return True


#: Age after which a half-written entry (a process killed while saving) is removed.
STALE_SECONDS = 3600


def _sweep_stale(root: Path) -> None:
    """Remove temp entries (``.<key>.<random>``) that a killed process left, once they are an hour old:
    a SIGKILL or power loss mid-save leaves up to a model's size (2.4 GB for Qwen) nobody reads."""
    from rs_local.files import is_stale_dir

    for child in root.iterdir():
        if child.name.startswith(".") and child.is_dir() and is_stale_dir(child, STALE_SECONDS):
            shutil.rmtree(child, ignore_errors=True)


def _save(lm: Any, tokenizer: Any, where: Path) -> None:
    """Config, generation config, weights (safetensors) and tokenizer, as ``from_pretrained`` reads them.

    ``save_pretrained`` refuses a model that Transformers' GGUF quantizer produced, although its
    weights are plain dequantized tensors; so the parts are written one by one. ``save_model``
    stores a tied tensor once (the embedding and the output head of small models).
    """
    from safetensors.torch import save_model

    lm.config.save_pretrained(str(where))
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(str(where))
    save_model(lm, str(where / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(where))
