"""The public Python API: every exported name resolves, and importing rs_local stays light."""

from __future__ import annotations

import subprocess
import sys

import rs_local


def test_every_export_resolves():
    for name in rs_local.__all__:
        assert getattr(rs_local, name) is not None, name


def test_import_pulls_in_neither_torch_nor_llama_cpp():
    code = "import sys, rs_local; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
