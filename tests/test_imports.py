"""Torch stays out of everything that runs a ready vector: the runtime, the chat/generate path,
eval/ and judge/ (ARCHITECTURE.md, "Who may import torch").

Two checks, because rs-local imports heavy things lazily inside functions: a fresh interpreter
imports the modules one after another and reports, per module, which forbidden packages
appeared with it (import time), and a scan of every ``import`` statement, function bodies
included, finds the lazy ones (run time). The chat/generate path is also run for real.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from rs_local.converters.gguf_io import write_control_vector
from rs_local.vectors import ControlVector

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "transformers")
TORCH_FREE_PACKAGES = ("runtime", "eval", "judge", "files", "converters", "serve")
CHAT_PATH = ("rs_local.cli.main", "rs_local.cli.run_cmd", "rs_local.cli.options")
# what torch-free code may not import, even lazily: torch itself and rs-local's torch side
FORBIDDEN_TARGETS = FORBIDDEN + ("rs_local.vectors.fit", "rs_local.vectors.capture", "rs_local.vectors.hf_model",
                                 "rs_local.vectors.refusal_gradient", "rs_local.recipes")

_REPORT_PER_MODULE = """
import importlib, json, pkgutil, sys
forbidden, names, packages = {forbidden!r}, {names!r}, {packages!r}
for pkg in packages:
    names += [f"rs_local.{{pkg}}.{{m.name}}" for m in pkgutil.iter_modules(importlib.import_module(f"rs_local.{{pkg}}").__path__)]
report = {{}}
for name in names:
    before = {{m for m in forbidden if m in sys.modules}}
    importlib.import_module(name)
    report[name] = sorted({{m for m in forbidden if m in sys.modules}} - before)
print(json.dumps(report))
"""


def _python(code: str, timeout: float = 120, path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter from the repository root (``path`` added to sys.path); its stdout."""
    code = f"import sys; sys.path.insert(0, {str(path)!r})\n{code}" if path else code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def heavy_imports(names: tuple[str, ...] = (), packages: tuple[str, ...] = (), path: Path | None = None) -> dict[str, list[str]]:
    """Module -> forbidden packages that first appeared when it was imported (every module of ``packages`` too)."""
    code = _REPORT_PER_MODULE.format(forbidden=FORBIDDEN, names=list(names), packages=list(packages))
    return json.loads(_python(code, path=path).strip().splitlines()[-1])


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import statement in ``source``, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def forbidden_imports(path: Path) -> list[str]:
    """``file:line module`` for each import of :data:`FORBIDDEN_TARGETS` (or a submodule of one) in ``path``."""
    hits = []
    for line, name in imported_names(path.read_text()):
        if any(name == t or name.startswith(t + ".") for t in FORBIDDEN_TARGETS):
            hits.append(f"{path.relative_to(REPO)}:{line} {name}")
    return hits


def test_runtime_eval_judge_and_chat_path_import_no_torch():
    report = heavy_imports(CHAT_PATH + ("rs_local.runtime",), TORCH_FREE_PACKAGES)
    assert "rs_local.runtime.runner" in report and "rs_local.eval.evaluate" in report  # the walk saw the packages
    assert {name: heavy for name, heavy in report.items() if heavy} == {}


def test_the_import_check_reports_a_module_that_imports_torch(tmp_path):
    (tmp_path / "uses_torch.py").write_text("import torch\n")
    report = heavy_imports(("rs_local.runtime.runner", "uses_torch"), path=tmp_path)
    assert report == {"rs_local.runtime.runner": [], "uses_torch": ["torch"]}


def test_torch_free_code_has_no_lazy_torch_import_either():
    files = [p for pkg in TORCH_FREE_PACKAGES for p in sorted((REPO / "rs_local" / pkg).rglob("*.py"))]
    files += [REPO / "rs_local" / "cli" / name for name in ("main.py", "run_cmd.py", "options.py")]
    assert len(files) > 40
    assert [hit for path in files for hit in forbidden_imports(path)] == []


def test_the_scan_reports_lazy_torch_imports():
    """capture.py and the isolate recipe import torch and the Transformers side inside functions."""
    assert any(hit.endswith(" torch") for hit in forbidden_imports(REPO / "rs_local" / "vectors" / "capture.py"))
    hits = forbidden_imports(REPO / "rs_local" / "recipes" / "isolate.py")
    assert any("rs_local.vectors.hf_model" in hit for hit in hits)


def test_running_generate_and_chat_with_a_vector_imports_no_torch(smollm2_path, tmp_path):
    """Commands import lazily inside their bodies, so run them, not only import them."""
    rng = np.random.default_rng(0)
    vector = write_control_vector(ControlVector({l: rng.normal(size=576) for l in range(4, 8)}, "llama"), tmp_path / "v.gguf")
    common = ["--model", str(smollm2_path), "--vector", f"{vector}:0.5", "-n", "2", "--ctx", "128"]
    code = f"""
import sys
from click.testing import CliRunner
from rs_local.cli.main import cli
for args, stdin in (({["generate", "Hi", *common]!r}, None), ({["chat", *common]!r}, "Hi\\n/quit\\n")):
    res = CliRunner().invoke(cli, args, input=stdin, catch_exceptions=False)
    assert res.exit_code == 0, res.output
print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))
"""
    assert _python(code).strip().splitlines()[-1] == "[]"
