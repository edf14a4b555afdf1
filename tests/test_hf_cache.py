"""The disk cache of dequantized models: same weights as the GGUF, and never in the way of a fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rs_local.vectors import hf_cache, hf_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name three colours, then say wörld 你好."}]


@pytest.fixture
def own_home(tmp_path, monkeypatch, smollm2_path) -> Path:
    """A fresh RS_LOCAL_HOME (so the cache starts empty) and no model cached in this process."""
    monkeypatch.setenv("RS_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RS_LOCAL_FIT_CACHE", raising=False)
    hf_model.clear_cache()
    yield smollm2_path
    hf_model.clear_cache()


def _entries() -> list[Path]:
    root = hf_cache.cache_root()
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def _load(path: Path) -> hf_model.FitModel:
    hf_model.clear_cache()  # the per-process cache would hide the disk cache
    return hf_model.load_model(path)


def _same(a: hf_model.FitModel, b: hf_model.FitModel) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sorted(sa) == sorted(sb)
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, f"weights differ after the cache: {differing[:3]}"
    assert a.tokenizer.apply_chat_template(MESSAGES, tokenize=False) == b.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False)
    text = a.tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert a.tokenizer(text)["input_ids"] == b.tokenizer(text)["input_ids"]


def test_cached_load_gives_the_gguf_weights_and_tokenizer_and_survives_a_broken_entry(own_home, monkeypatch):
    first = _load(own_home)  # reads the GGUF, writes the entry
    (entry,) = _entries()
    assert (entry / hf_cache.DONE).is_file() and (entry / "model.safetensors").stat().st_size > 100e6

    import os

    os.utime(entry / hf_cache.DONE, (1_000_000_000, 1_000_000_000))
    with monkeypatch.context() as m:  # reading the GGUF again would fail the test
        m.setattr(hf_model, "_gguf_overrides", lambda path: pytest.fail("the GGUF was read again"))
        second = _load(own_home)
    _same(first, second)
    assert (entry / hf_cache.DONE).stat().st_mtime > 1_000_000_000  # the hit counts as a use for the eviction

    (entry / "config.json").write_text("{ not json")
    again = _load(own_home)  # falls back to the GGUF and writes a good entry
    _same(first, again)
    (entry,) = _entries()
    assert (entry / "config.json").read_text().startswith("{\n")


CHILD = """
import resource, sys
from pathlib import Path
import torch, transformers  # imported before the limit, as a fit has them by the time it loads
from rs_local.vectors import hf_model

size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 150 * 2**20, size + 150 * 2**20))
try:
    hf_model.load_model(Path(sys.argv[1]))
except MemoryError:
    print("out of memory")
else:
    print("loaded")
"""


def test_a_load_short_of_memory_keeps_the_entry_and_says_so(own_home):
    """Under ``ulimit -v`` the load of a good entry failed (a library could not be mapped, an array
    not allocated), the entry was deleted as "unreadable", and the out-of-memory line came only after
    the slow GGUF load. The entry now stays and the shortage is said at once."""
    import subprocess
    import sys

    _load(own_home)
    (entry,) = _entries()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(own_home)], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "out of memory", (proc.stdout, proc.stderr[-1500:])
    assert _entries() == [entry] and hf_cache.is_complete(entry)


def test_what_counts_as_the_machine_running_short():
    """Transformers wraps the cause; the chain decides, and a damaged entry is not a shortage."""
    def wrapped(inner: BaseException) -> OSError:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise OSError("Unable to load weights from checkpoint file") from exc
        except OSError as outer:
            return outer

    entry = Path("/cache/entry")
    assert isinstance(hf_cache._shortage(wrapped(MemoryError()), entry), MemoryError)
    assert isinstance(hf_cache._shortage(wrapped(RuntimeError("can't start new thread")), entry), RuntimeError)
    emfile = hf_cache._shortage(wrapped(OSError(24, "Too many open files")), entry)
    assert isinstance(emfile, OSError) and emfile.errno == 24 and emfile.filename == str(entry)
    assert hf_cache._shortage(wrapped(ValueError("header too large")), entry) is None
    assert hf_cache._shortage(OSError(13, "Permission denied"), entry) is None  # a miss, not a shortage


def test_an_unwritable_cache_only_costs_speed(smollm2_path, tmp_path):
    fm = hf_model.load_model(smollm2_path)  # the usual home: cached by now, on disk or in this process
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would go")
    assert hf_cache.store(blocked / "entry", fm.tokenizer, fm.model, smollm2_path) is False
    assert blocked.is_file()


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_the_switch(monkeypatch, value, on):
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", value)
    assert hf_cache.enabled() is on


def test_a_gguf_load_builds_one_reader_and_loads_what_a_reader_per_step_loads(smollm2_path, monkeypatch):
    """The shared reader is a speed fix only: one GGUFReader per load (Transformers would build three),
    over a plain array view of the file instead of a memmap, and the same weights and tokenizer as
    Transformers' own reader per step."""
    import contextlib

    import gguf
    import numpy as np

    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "0")
    built: list[str] = []
    kinds: list[type] = []
    original = gguf.GGUFReader

    class Counting(original):  # type: ignore[misc,valid-type]
        def __init__(self, path, *args, **kwargs):
            built.append(str(path))
            super().__init__(path, *args, **kwargs)
            kinds.append(type(self.data))

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    shared = _load(smollm2_path)
    assert len(built) == 1, f"the GGUF was parsed {len(built)} times in one load"
    assert kinds == [np.ndarray]  # not np.memmap: slicing stays in C

    built.clear()
    kinds.clear()
    monkeypatch.setattr(hf_model, "_one_gguf_reader", contextlib.nullcontext)
    own = _load(smollm2_path)
    assert len(built) >= 2  # without it Transformers parses per step: the saving is real
    assert set(kinds) == {np.memmap}
    _same(shared, own)
    hf_model.clear_cache()
    assert gguf.GGUFReader is Counting  # the load put the module attribute back


def test_the_cache_keeps_to_its_bound_dropping_what_was_used_longest_ago(tmp_path, monkeypatch):
    """The cache only grew (15 GB in 99 entries on one machine, most for GGUFs long deleted). After a new entry,
    the entries used longest ago go until the rest fit; the new one stays even when it alone is over."""
    import os

    for age, name in enumerate(["newest", "middle", "oldest"]):
        entry = tmp_path / name
        entry.mkdir()
        (entry / "model.safetensors").write_bytes(bytes(1 << 20))
        (entry / hf_cache.DONE).write_text("{}\n")
        when = 1_700_000_000 - age * 1000
        os.utime(entry / hf_cache.DONE, (when, when))
    (tmp_path / ".half.abc123").mkdir()  # a temp entry is not the eviction's to remove
    removed = hf_cache.evict(tmp_path, tmp_path / "newest", budget=int(2.5 * (1 << 20)))
    assert [p.name for p in removed] == ["oldest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".half.abc123", "middle", "newest"]
    assert [p.name for p in hf_cache.evict(tmp_path, tmp_path / "newest", budget=0)] == ["middle"]
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE_GB", "lots")
    with pytest.raises(hf_cache.RsLocalError, match="RS_LOCAL_FIT_CACHE_GB='lots'"):
        hf_cache.enabled()
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE_GB", "0.5")
    assert hf_cache.budget_bytes() == 1 << 29
