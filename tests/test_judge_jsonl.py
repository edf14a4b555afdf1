"""The append-only log that makes respond and judge resumable."""

from __future__ import annotations

import json

import pytest

from rs_local.errors import FileProblem
from rs_local.judge.jsonl import AppendLog, data_rows, write_jsonl_atomic


def _key(row):
    return row["k"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_skips_done_keys_and_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        log.append({"k": 1})
        log.append({"k": 2})
        log.append({"k": 2})  # duplicate key: ignored
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        assert log.done == {1, 2}
        assert 1 in log and 3 not in log
        log.append({"k": 3})
    rows = _lines(path)
    assert "rs_local_header" in rows[0]
    assert [r["k"] for r in rows[1:]] == [1, 2, 3]


def test_partial_last_line_is_cut_and_redone(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {}, _key) as log:
        log.append({"k": 1})
    with open(path, "a") as f:
        f.write('{"k": 2, "text": "half wri')  # what a SIGKILL mid-write leaves
    with AppendLog.open(path, "things", {}, _key) as log:
        assert log.done == {1}
        log.append({"k": 2, "text": "whole"})
    assert [r["k"] for r in _lines(path)[1:]] == [1, 2]


def test_other_config_is_an_error_unless_forced(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"seed": 0, "model": "m"}, _key) as log:
        log.append({"k": 1})
    with pytest.raises(FileProblem, match=r"different settings \(seed\).*--force"):
        AppendLog.open(path, "things", {"seed": 1, "model": "m"}, _key)
    with pytest.raises(FileProblem, match="different settings"):
        AppendLog.check(path, "things", {"seed": 1, "model": "m"})
    with pytest.raises(FileProblem, match="holds things rows"):
        AppendLog.open(path, "verdicts", {"seed": 0, "model": "m"}, _key)
    with AppendLog.open(path, "things", {"seed": 1, "model": "m"}, _key, force=True) as log:
        assert not log.done
    assert len(_lines(path)) == 1


def test_a_forced_run_replaces_the_old_log_only_when_it_finishes(tmp_path):
    """--force used to truncate the old file at the start: an interrupted forced run lost it."""
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"seed": 0}, _key) as log:
        log.append({"k": 1})
        log.append({"k": 2})
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with AppendLog.open(path, "things", {"seed": 1}, _key, force=True) as log:
            log.append({"k": 9})
            raise KeyboardInterrupt
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    path.chmod(0o600)
    with AppendLog.open(path, "things", {"seed": 1}, _key, force=True) as log:
        log.append({"k": 9})
        assert path.read_bytes() == before  # still the old file while the new one is written
    assert [r["k"] for r in _lines(path)[1:]] == [9] and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    assert path.stat().st_mode & 0o777 == 0o600  # the old file's permissions, not the umask's


def test_a_foreign_file_is_not_appended_to(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "hello"}\n')
    with pytest.raises(FileProblem, match="not an rs-local things file"):
        AppendLog.open(path, "things", {}, _key)
    assert path.read_text() == '{"prompt": "hello"}\n'


def test_bad_line_reports_its_number(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{oops\n{"a": 2}\n')
    with pytest.raises(FileProblem, match="line 2: bad JSON"):
        data_rows(path)
    # a broken last line of a hand-made file is an error too (only our own logs may end mid-line)
    path.write_text('{"a": 1}\n{"a": 2')
    with pytest.raises(FileProblem, match="line 2"):
        data_rows(path)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}, {"a": 2}])
    assert _lines(path) == [{"a": 1}, {"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_a_log_from_before_a_config_key_was_added_still_resumes(tmp_path):
    """respond's config gained model_edges: a half-finished log from before must not need --force."""
    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"model": "m.gguf"}, _key) as log:
        log.append({"k": 1})
    with AppendLog.open(path, "things", {"model": "m.gguf", "model_edges": "abc"}, _key) as log:
        assert log.done == {1}
    with AppendLog.open(tmp_path / "new.jsonl", "things", {"model_edges": "abc"}, _key):
        pass
    with pytest.raises(FileProblem, match=r"different settings \(model_edges\)"):  # known in both: compared
        AppendLog.open(tmp_path / "new.jsonl", "things", {"model_edges": "xyz"}, _key)


def test_a_second_writer_on_the_same_log_is_refused(tmp_path):
    """Two `respond` runs on one output both resumed it and appended every row twice (then `judge` refused the
    file). The second now stops at once, in another process as in this one; the lock goes with the first run."""
    import subprocess
    import sys

    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        log.append({"k": 1})
        with pytest.raises(FileProblem, match="being written by another rs-local process"):
            AppendLog.open(path, "things", {"a": 1}, _key)
        code = ("import sys; from rs_local.judge.jsonl import AppendLog\n"
                "try:\n    AppendLog.open(sys.argv[1], 'things', {'a': 1}, lambda r: r['k'])\n"
                "except Exception as exc:\n    print(exc)")
        other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        assert "being written by another rs-local process" in other.stdout, other.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # no lock file left
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        assert log.done == {1}


def test_a_log_deleted_while_written_is_an_error_not_a_success(tmp_path):
    """Rows appended after the log was removed went into the removed file, and the run reported success."""
    path = tmp_path / "log.jsonl"
    with pytest.raises(FileProblem, match="was deleted or replaced while this command wrote to it"):
        with AppendLog.open(path, "things", {"a": 1}, _key) as log:
            log.append({"k": 1})
            path.unlink()
            log.append({"k": 2})


def test_a_forced_run_sweeps_what_a_killed_forced_run_left(tmp_path):
    """A forced run killed with SIGKILL left its hidden temp log; the next forced run removes it once stale."""
    import os
    import time

    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        log.append({"k": 1})
    stale = tmp_path / ".log.jsonl.0123456789ab.tmp"
    stale.write_text("half a run")
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    with AppendLog.open(path, "things", {"a": 2}, _key, force=True) as log:
        log.append({"k": 5})
    assert not stale.exists() and [r["k"] for r in _lines(path)[1:]] == [5]


def test_keys_added_since_a_log_was_written_do_not_stop_it_resuming(tmp_path):
    """A judge's identity gained "weights" and respond's vectors a "digest": logs written before (hours of
    rows) still resume, while a value that is there and differs still stops the run."""
    path = tmp_path / "log.jsonl"
    old = {"judge": {"backend": "local", "model": "m.gguf", "model_bytes": 5},
           "vectors": [{"path": "v.gguf", "scale": -1.0}]}
    with AppendLog.open(path, "things", old, _key) as log:
        log.append({"k": 1})
    new = {"judge": {**old["judge"], "weights": {"size": 5, "edges": "ab"}},
           "vectors": [{"path": "v.gguf", "scale": -1.0, "digest": "cd"}]}
    with AppendLog.open(path, "things", new, _key) as log:
        assert log.done == {1}
        log.append({"k": 2})
    with AppendLog.open(tmp_path / "now.jsonl", "things", new, _key):
        pass
    other = {"judge": {**new["judge"], "weights": {"size": 5, "edges": "zz"}}, "vectors": new["vectors"]}
    with pytest.raises(FileProblem, match=r"different settings \(judge\)"):
        AppendLog.open(tmp_path / "now.jsonl", "things", other, _key)
    moved = {**new, "vectors": [{"path": "v.gguf", "scale": -1.0, "digest": "ef"}]}
    with pytest.raises(FileProblem, match=r"different settings \(vectors\)"):
        AppendLog.open(tmp_path / "now.jsonl", "things", moved, _key)


def test_a_forced_log_that_cannot_be_written_leaves_no_temp_file(tmp_path):
    """Past a file-size limit the forced run failed as it should, old log kept, but closing raised again and
    its hidden temp log stayed behind (on a full disk, holding the space)."""
    import subprocess
    import sys

    path = tmp_path / "log.jsonl"
    with AppendLog.open(path, "things", {"a": 1}, _key) as log:
        log.append({"k": 1})
    before = path.read_bytes()
    code = ("import resource, sys\nfrom rs_local.judge.jsonl import AppendLog\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n    with AppendLog.open(sys.argv[1], 'things', {'a': 2}, lambda r: r['k'], force=True) as log:\n"
            "        for i in range(100):\n            log.append({'k': i, 'text': 'x' * 200})\n"
            "except Exception as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert "cannot be written" in res.stdout, (res.stdout, res.stderr)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]
