"""Disk cache of what the unsteered model does, reused by every eval and sweep.

Every evaluation compares steered answers with the plain model's; the plain model's answers
(and its next-token distributions for the KL) do not change between runs, scales, vectors
or sweeps, so computing them once per (model, prompt, settings) saves a whole pass per run.
Verdicts of an LLM judge on any answer are cached the same way (keyed by the judge's
settings and the answer text), so re-evaluating a scale costs nothing to judge. Answers cut
short for labelling (``EvalSettings.settle``) live under keys that name the stop rule
(``Evaluator._gen_key``), so a whole answer's key never finds a cut one.

Layout under ``<rs-local home>/cache/eval``: one small JSON (generations, verdicts) or
``.npz`` (references) file per entry, named by a hash of everything that decides it and
written atomically, so concurrent runs and a killed run never leave a half entry. The model
is identified by its verified sha256 for built-in models and by size, mtime and a hash of
its first and last megabyte otherwise (hashing 500 MB per run would cost seconds).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from rs_local.errors import FileProblem
from rs_local.eval.metrics import Reference
from rs_local.files import atomic_write_bytes, edge_digest, is_cached_file, is_json_int, is_json_number, parse_json, read_text
from rs_local.runtime.runner import Generation

CACHE_VERSION = 1


def cache_root() -> Path:
    from rs_local.models import home_dir

    return home_dir() / "cache" / "eval"


def model_key(path: str | Path) -> dict[str, Any]:
    """What identifies a GGUF model's weights, cheaply."""
    from rs_local import models

    path = Path(path)
    for spec in models.MODELS.values():
        if path.name == spec.filename and path.resolve().parent == models.models_dir().resolve():
            return {"sha256": spec.sha256}
    st = path.stat()
    return {"size": st.st_size, "mtime": int(st.st_mtime), "edges": edge_digest(path)}


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, force=True)


class EvalCache:
    """Baseline generations, KL references and judge verdicts; ``root=None`` disables caching.

    Writes are best effort: a full disk or a read-only home must not fail an evaluation.
    """

    def __init__(self, root: str | Path | None = "default"):
        self.root = cache_root() if root == "default" else (Path(root) if root else None)
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, kind: str, key: Any, suffix: str) -> Path | None:
        if self.root is None:
            return None
        d = digest({"v": CACHE_VERSION, "kind": kind, "key": key})
        return self.root / kind / d[:2] / f"{d}{suffix}"

    def _count(self, found: bool) -> None:
        if found:
            self.hits += 1
        else:
            self.misses += 1

    # -- generations ---------------------------------------------------------------------

    def get_generation(self, key: Any) -> Generation | None:
        path = self._path("generation", key, ".json")
        gen = None
        if path is not None and is_cached_file(path):
            try:
                gen = _generation(_entry_row(path))
            except (OSError, ValueError, FileProblem):
                gen = None
        self._count(gen is not None)
        return gen

    def put_generation(self, key: Any, gen: Generation) -> None:
        path = self._path("generation", key, ".json")
        if path is None:
            return
        row = {"text": gen.text, "tokens": gen.tokens, "logprobs": gen.logprobs,
               "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens, "entry": path.stem}
        self._write(path, json.dumps(row, ensure_ascii=False).encode("utf-8"))

    # -- KL references -------------------------------------------------------------------

    def get_reference(self, key: Any) -> Reference | None:
        path = self._path("reference", key, ".npz")
        ref = None
        if path is not None and is_cached_file(path):
            try:
                with np.load(path, allow_pickle=False) as data:
                    mine = "entry" in data.files and str(data["entry"]) == path.stem  # see _entry_row
                    ref = Reference(data["ids"], data["logprobs"]) if mine else None
                if ref is not None and (ref.ids.ndim != 2 or ref.logprobs.shape != ref.ids.shape
                                        or ref.ids.dtype.kind not in "iu"):
                    ref = None
            except Exception:  # noqa: BLE001 - a damaged .npz is BadZipFile/EOFError too; recomputing is the remedy
                ref = None
        self._count(ref is not None)
        return ref

    def put_reference(self, key: Any, ref: Reference) -> None:
        path = self._path("reference", key, ".npz")
        if path is None:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, ids=ref.ids, logprobs=ref.logprobs, entry=np.array(path.stem))
        self._write(path, buf.getvalue())

    # -- verdicts ------------------------------------------------------------------------

    def get_verdict(self, key: Any) -> dict | None:
        path = self._path("verdict", key, ".json")
        row = None
        if path is not None and is_cached_file(path):
            try:
                row = _entry_row(path)
            except (OSError, ValueError, FileProblem):
                row = None
            if row is not None:
                row = {k: v for k, v in row.items() if k != "entry"}
        self._count(row is not None)
        return row

    def put_verdict(self, key: Any, row: dict) -> None:
        path = self._path("verdict", key, ".json")
        if path is not None:
            self._write(path, json.dumps({**row, "entry": path.stem}, ensure_ascii=False).encode("utf-8"))

    def _write(self, path: Path, data: bytes) -> None:
        try:
            _atomic_write(path, data)
        except (OSError, FileProblem):
            pass


def _entry_row(path: Path) -> dict | None:
    """A JSON entry if it names itself as ``path``'s entry, else None (a miss).

    Why: an entry is found by its file name, a hash of its key; one copied or swapped under another
    name was served for the other key (a KL of 91.5 instead of 0.011), so each entry carries its own
    name. Entries written before that carry none and are recomputed once, under the same name."""
    row = parse_json(read_text(path, what="cache entry"))
    return row if isinstance(row, dict) and row.get("entry") == path.stem else None


def _generation(row: Any) -> Generation | None:
    """A cached answer if the entry has the shape :meth:`EvalCache.put_generation` writes, else None (a miss)."""
    if not isinstance(row, dict):
        return None
    text, tokens, logprobs = row.get("text"), row.get("tokens"), row.get("logprobs")
    finish, prompt_tokens = row.get("finish_reason"), row.get("prompt_tokens")
    ints = isinstance(tokens, list) and all(is_json_int(t) and t >= 0 for t in tokens)
    floats = isinstance(logprobs, list) and all(is_json_number(v) for v in logprobs)
    if not (isinstance(text, str) and ints and floats and isinstance(finish, str) and is_json_int(prompt_tokens)):
        return None
    return Generation(text, tokens, [float(v) for v in logprobs], finish, prompt_tokens)
