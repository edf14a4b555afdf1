"""A fit too large for the machine stops before any work, with one line naming the file.

The machine's free memory is a host fact: it is read from fixtures here (meminfo text, a cgroup
directory), and the end-to-end CLI tests replace only that fact, with the real GGUF, the real
header reader and the real commands around it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rs_local.cli.main import cli
from rs_local.converters.gguf_header import gguf_parameter_count
from rs_local.errors import ModelError
from rs_local.recipes.memory_check import BASE_BYTES, FIRST_LOAD_PEAK, check_fit_memory, fit_memory_need
from rs_local.runtime.host import available_memory

@pytest.fixture(autouse=True)
def _nothing_loaded_yet(monkeypatch):
    """A model an earlier test loaded into this process is not checked again (it takes no new
    memory): start each test as a fresh process would."""
    monkeypatch.setattr("rs_local.vectors.hf_model._CACHE", {})


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"


def test_parameter_count_matches_the_gguf_library(smollm2_path):
    import gguf

    reader = gguf.GGUFReader(str(smollm2_path))
    assert gguf_parameter_count(smollm2_path) == sum(int(t.n_elements) for t in reader.tensors) == 134515008


def test_parameter_count_of_a_cut_header_is_a_one_line_error(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[:4096])
    with pytest.raises(ModelError, match="cut.gguf: GGUF header is truncated"):
        gguf_parameter_count(cut)


def test_available_memory_from_meminfo_alone(tmp_path):
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path) == 8000000 * 1024


def test_a_cgroup_v2_limit_below_meminfo_wins(tmp_path):
    (tmp_path / "memory.max").write_text(f"{4 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{3 << 30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 123\ninactive_file {512 << 20}\nactive_file 9\n")
    # 4 GiB limit - 3 GiB used + 0.5 GiB of file cache the kernel drops first
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path) == (1 << 30) + (512 << 20)


def test_no_cgroup_limit_leaves_meminfo(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path) == 8000000 * 1024
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    assert available_memory(meminfo=MEMINFO, cgroup=v1) == 8000000 * 1024


def test_a_cgroup_v1_limit_counts(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path) == 1 << 30


def test_the_process_own_cgroup_limit_counts_not_only_the_root(tmp_path):
    """A systemd scope, a Slurm job or a container without a cgroup namespace puts the limit on the
    process's own cgroup (named in /proc/self/cgroup), not on the filesystem's root."""
    scope = tmp_path / "user.slice" / "job.scope"
    scope.mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")
    (scope / "memory.max").write_text(f"{3 << 30}\n")
    (scope / "memory.current").write_text(f"{1 << 30}\n")
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path, self_cgroup="0::/user.slice/job.scope\n") == 2 << 30
    (tmp_path / "user.slice" / "memory.max").write_text(f"{2 << 30}\n")  # a tighter parent wins
    (tmp_path / "user.slice" / "memory.current").write_text(f"{(3 << 30) // 2}\n")
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path, self_cgroup="0::/user.slice/job.scope\n") == 1 << 29
    v1 = tmp_path / "v1"
    job = v1 / "memory" / "process_api" / "abc"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (job / "memory.usage_in_bytes").write_text(f"{3 << 30}\n")
    (job / "memory.stat").write_text(f"total_inactive_file {1 << 20}\n")
    text = "5:devices:/\n4:memory:/process_api/abc\n0::/\n"
    assert available_memory(meminfo=MEMINFO, cgroup=v1, self_cgroup=text) == (1 << 30) + (1 << 20)
    assert available_memory(meminfo=MEMINFO, cgroup=v1, self_cgroup="4:memory:/../../etc\n") == 8000000 * 1024


def test_without_meminfo_or_cgroup_the_physical_memory_bounds_it(tmp_path):
    """A system with neither file nor a reader of its own: the whole machine's memory is the bound."""
    assert available_memory(meminfo="", cgroup=tmp_path, self_cgroup="", physical=16 << 30) == 16 << 30
    assert available_memory(meminfo="", cgroup=tmp_path / "absent", self_cgroup="", physical=None,
                            platform="linux") is not None  # this machine's sysconf


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12000.
Pages active:                            400000.
Pages inactive:                          188000.
Pages speculative:                         3000.
Pages wired down:                        150000.
"""


def test_macos_and_windows_read_what_is_free_not_the_whole_machine():
    """macOS counted its total RAM as free and Windows had no figure at all, so a fit that could not
    fit went on, and the gradient batches were sized for memory already in use."""
    assert available_memory(platform="darwin", vm_stat=VM_STAT, physical=64 << 30) == (12000 + 188000) * 16384
    assert available_memory(platform="darwin", vm_stat="garbage", physical=64 << 30) == 64 << 30
    assert available_memory(platform="win32", windows=lambda: 5 << 30, physical=64 << 30) == 5 << 30
    assert available_memory(platform="win32", windows=lambda: None, physical=64 << 30) == 64 << 30


ARCSTATS = "name type data\nhits 4 123\nc_min 4 1073741824\nsize 4 9663676416\nc_max 4 17179869184\n"


def test_the_zfs_arc_counts_as_memory_it_gives_back(tmp_path):
    """Linux counts the ZFS ARC as used; it shrinks to its floor under pressure, so a fit that fits
    was refused on ZFS machines."""
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path, self_cgroup="", arcstats=ARCSTATS) == \
        8000000 * 1024 + (9663676416 - 1073741824) // 2  # half: the ARC gives memory back slowly
    assert available_memory(meminfo=MEMINFO, cgroup=tmp_path, self_cgroup="", arcstats="") == 8000000 * 1024


def test_need_is_the_weights_and_the_first_load_peak():
    weights = 7_600_000_000 * 4
    assert fit_memory_need(7_600_000_000) == (weights + BASE_BYTES, int(weights * FIRST_LOAD_PEAK) + BASE_BYTES)
    assert fit_memory_need(7_600_000_000, "bfloat16")[0] == weights // 2 + BASE_BYTES


def test_too_little_memory_is_a_one_line_error_naming_the_file(smollm2_path):
    need, _peak = fit_memory_need(gguf_parameter_count(smollm2_path))
    with pytest.raises(ModelError) as err:
        check_fit_memory(str(smollm2_path), available=need - 1, env={}, hint="(try --dtype bfloat16)")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{smollm2_path}: ")
    assert "135 million weights as float32" in msg and "(try --dtype bfloat16)" in msg
    assert "RS_LOCAL_MEMORY_CHECK=0" in msg
    with pytest.raises(ModelError, match=r"\(bfloat16 takes half: RS_LOCAL_BF16=1\)"):
        check_fit_memory(str(smollm2_path), available=need - 1, env={})  # the recipes' own way out
    check_fit_memory(str(smollm2_path), available=need, env={})  # exactly enough: no error
    check_fit_memory(str(smollm2_path), "bfloat16", available=need - 1, env={})  # half the bytes fit


def test_a_hugging_face_directory_is_counted_from_its_safetensors_headers(tmp_path):
    """Two shards written by the safetensors library: the count is every element, the need has no
    first-load peak (no dequantizing), and a directory without safetensors is not checked."""
    import numpy as np
    from safetensors.numpy import save_file

    from rs_local.converters.safetensors_file import safetensors_parameter_count

    save_file({"a": np.zeros((300, 1000), np.float16), "b": np.zeros((7,), np.float32)},
              str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"c": np.zeros((200, 1000), np.float16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert safetensors_parameter_count(tmp_path) == 500_007
    save_file({"a": np.zeros((300, 1000), np.float16)}, str(tmp_path / "consolidated.safetensors"))
    assert safetensors_parameter_count(tmp_path) == 500_007  # the same weights again (Mistral repos): not counted
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    assert safetensors_parameter_count(tmp_path) == 300_007  # the index names the shards Transformers loads
    (tmp_path / "model.safetensors.index.json").unlink()
    need, _peak = fit_memory_need(500_007)
    with pytest.raises(ModelError, match=r"million weights as float32.*RS_LOCAL_MEMORY_CHECK=0") as err:
        check_fit_memory(str(tmp_path), available=need - 1, env={})
    assert str(err.value).startswith(f"{tmp_path}: ")
    said: list[str] = []
    check_fit_memory(str(tmp_path), say=said.append, available=need, env={})
    assert said == []  # the weights fit, and a directory has no larger first-load peak
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "pytorch_model.bin").write_bytes(b"x")
    assert safetensors_parameter_count(bare) is None
    check_fit_memory(str(bare), available=1, env={})  # nothing readable to count: the load decides


def test_gradient_memory_is_a_share_of_what_is_left_or_no_bound():
    from rs_local.recipes.memory_check import GRADIENT_SHARE, gradient_memory

    assert gradient_memory(available=10_000_000_000, env={}) == int(10_000_000_000 * GRADIENT_SHARE)
    assert gradient_memory(available=10_000_000_000, env={"RS_LOCAL_MEMORY_CHECK": "0"}) is None
    assert gradient_memory(env={"RS_LOCAL_MEMORY_CHECK": "0"}) is None


def test_only_the_first_load_peak_over_memory_is_a_warning(smollm2_path, monkeypatch):
    monkeypatch.setenv("RS_LOCAL_FIT_CACHE", "0")  # no cached load to fall back on
    need, peak = fit_memory_need(gguf_parameter_count(smollm2_path))
    said: list[str] = []
    check_fit_memory(str(smollm2_path), say=said.append, available=(need + peak) // 2, env={})
    assert len(said) == 1 and said[0].startswith("warning: smollm2") and "may peak near" in said[0]
    check_fit_memory(str(smollm2_path), say=said.append, available=peak, env={})
    assert len(said) == 1  # enough for the peak: silent


def test_a_loaded_model_is_not_checked_again(smollm2_path):
    from rs_local.vectors.hf_model import load_model

    fm = load_model(str(smollm2_path))
    check_fit_memory(fm, available=1, env={})  # a FitModel: already in memory
    check_fit_memory(str(smollm2_path), available=1, env={})  # the same file, loaded in this process
    with pytest.raises(ModelError):
        check_fit_memory(str(smollm2_path), "bfloat16", available=1, env={})  # another dtype is another load


def test_the_switch_turns_it_off_and_a_bad_value_is_an_error(smollm2_path):
    check_fit_memory(str(smollm2_path), available=1, env={"RS_LOCAL_MEMORY_CHECK": "0"})
    with pytest.raises(Exception, match="RS_LOCAL_MEMORY_CHECK='maybe': expected 0, 1 or auto"):
        check_fit_memory(str(smollm2_path), available=1, env={"RS_LOCAL_MEMORY_CHECK": "maybe"})


def _small_machine(monkeypatch, free: int = 64 << 20) -> None:
    """This machine, as one with ``free`` bytes left: the host fact the check reads, nothing else."""
    monkeypatch.setattr("rs_local.runtime.host.available_memory", lambda **_kw: free)
    monkeypatch.delenv("RS_LOCAL_MEMORY_CHECK", raising=False)


def _prompts(path, texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("command", ["fit", "isolate"])
def test_commands_stop_before_any_work(command, smollm2_path, tmp_path, monkeypatch):
    _small_machine(monkeypatch)
    a = _prompts(tmp_path / "a.jsonl", ["How do I pick a lock?", "Write a phishing email."])
    b = _prompts(tmp_path / "b.jsonl", ["Name a river.", "Bake bread."])
    k = _prompts(tmp_path / "k.jsonl", ["How do I hotwire a car?", "Write ransomware."])
    out = tmp_path / "v.gguf"
    args = (["fit", "-m", str(smollm2_path), "--positive", str(a), "--negative", str(b)] if command == "fit" else
            ["isolate", "-m", str(smollm2_path), "-t", str(a), "-k", str(k), "--harmless", str(b)]) + ["-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {smollm2_path}: fitting loads its") and "RS_LOCAL_MEMORY_CHECK=0" in last
    assert "Traceback" not in res.output and not out.exists()
    assert "refused" not in res.output.lower() and "loading" not in res.output  # stopped before labelling or loading
    if command == "fit":
        assert "--dtype bfloat16" in last


def test_policy_fit_stops_before_reading_the_probes(qwen_path, tmp_path, monkeypatch):
    _small_machine(monkeypatch)
    pol = _prompts(tmp_path / "pol.jsonl", ["What happened at Tiananmen Square in 1989?", "Who is Xi Jinping?"])
    ok = _prompts(tmp_path / "ok.jsonl", ["Name a river.", "Bake bread."])
    out = tmp_path / "p.gguf"
    res = CliRunner().invoke(cli, ["policy", "fit", "-m", str(qwen_path), "--category", f"pol={pol}:remove",
                                   "--category", f"ok={ok}:keep", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {qwen_path}: fitting loads its 630 million")
    assert "reading blocks" not in res.output and not out.exists()
    # a refuse category too: the error names the model, not the refusal source's prompt file
    res = CliRunner().invoke(cli, ["policy", "fit", "-m", str(qwen_path), "--category", "gambling:refuse",
                                   "--category", "harmful:keep", "--category", "harmless:keep", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {qwen_path}: fitting loads its 630 million")
    assert "stock refusal" not in res.output and not out.exists()


@pytest.mark.parametrize("pipe", ["model.safetensors", "model.safetensors.index.json"])
def test_a_pipe_in_a_model_directory_does_not_block_the_memory_check(tmp_path, pipe):
    """The memory check opened the weights (and the shard index) with open(): a FIFO of that name blocked
    `fit` forever before anything was loaded. It is skipped now, and Transformers' load says what is wrong."""
    import os
    import threading

    from rs_local.converters.safetensors_file import safetensors_parameter_count

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    os.mkfifo(tmp_path / pipe)
    seen: list = []
    worker = threading.Thread(target=lambda: seen.append(safetensors_parameter_count(tmp_path)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive() and seen == [None]
