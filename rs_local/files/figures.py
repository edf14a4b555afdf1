"""Matplotlib, imported only when a plot is asked for, and PNGs written like every other output.

One place for both, so the fit plots and the evaluation plot fail the same way when matplotlib
is missing (one line, not a traceback) and are written atomically (:func:`atomic_output`).
The Agg backend needs no display (servers, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rs_local.errors import RsLocalError
from rs_local.files.writing import atomic_output


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RsLocalError("plots need matplotlib: pip install 'rs-local[plot]'") from exc
    return plt


def require_pyplot(why: str = "") -> None:
    """Fail at once when a plot will be wanted and matplotlib is not installed (the ``plot`` extra).

    Why: the evaluation, the sweep and the fit found out when they came to draw, after all their
    work; the check is the import machinery's lookup, not the (slow) import itself."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RsLocalError(f"plots need matplotlib: pip install 'rs-local[plot]'{why}")


def save_png(fig: Any, plt: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out ``fig``, write it to ``path`` atomically (overwriting: callers checked the path first), close it."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_output(path, force=True) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
