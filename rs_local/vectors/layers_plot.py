"""Pictures of a fit: the per-block signal table and a PCA scatter of one block's activations.

Kept apart from :mod:`rs_local.vectors.layers` (the statistics and the band rule), so the
math imports no plotting and the plots import only what they draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rs_local.files.figures import pyplot, save_png
from rs_local.vectors.layers import LayerRow


def plot_layer_table(rows: Sequence[LayerRow], path: str | Path, title: str = "") -> Path:
    """PNG of Cohen's d, AUROC and |r| per block, with the selected band shaded."""
    plt = pyplot()
    layers = [r.layer for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [r.cohen_d for r in rows], "o-", label="Cohen's d (held-out)")
    ax.set_xlabel("block")
    ax.set_ylabel("Cohen's d")
    ax2 = ax.twinx()
    ax2.plot(layers, [r.auroc for r in rows], "s--", color="tab:orange", label="AUROC")
    if any(r.pearson_r is not None for r in rows):
        ax2.plot(layers, [abs(r.pearson_r) if r.pearson_r is not None else np.nan for r in rows], "^:", color="tab:green", label="|r| with score")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("AUROC / |r|")
    for r in rows:
        if r.selected:
            ax.axvspan(r.layer - 0.5, r.layer + 0.5, color="tab:blue", alpha=0.08)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title(title or "per-layer signal (shaded: selected)")
    return save_png(fig, plt, path, dpi=110)


def plot_scatter(pos: np.ndarray, neg: np.ndarray, path: str | Path, layer: int, labels: tuple[str, str] = ("positive", "negative")) -> Path:
    """PNG of both sets' activations at one block on their first two principal components."""
    plt = pyplot()
    both = np.concatenate([pos, neg]).astype(np.float64)
    centered = both - both.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    xy = centered @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(xy[: len(pos), 0], xy[: len(pos), 1], s=12, label=labels[0], alpha=0.7)
    ax.scatter(xy[len(pos) :, 0], xy[len(pos) :, 1], s=12, label=labels[1], alpha=0.7)
    ax.set_title(f"block {layer}: PCA of activations")
    ax.legend(fontsize=8)
    return save_png(fig, plt, path, dpi=110)
