"""Training a probe judge on labelled answers (``rs-local judge-train``).

The judge model reads every labelled (prompt, answer) once; the last-token outputs of a band
of candidate blocks are kept, grouped cross-validation over the *train* rows picks the block,
the penalty and the threshold, and the probe is refitted on all train rows. Rows marked
``"split": "test"`` are never read here, so figures measured on them later are honest.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rs_local.callbacks import Progress
from rs_local.errors import RsLocalError
from rs_local.judge.judge_eval import LabelledAnswer
from rs_local.judge.probe import ProbeFile, judge_messages
from rs_local.judge.probe_fit import cross_validate, fit_probe



def candidate_blocks(n_layer: int) -> list[int]:
    """Every second block from a quarter to the end: refusal shows in the middle and late blocks."""
    return sorted(set(range(n_layer // 4, n_layer, 2)) | {n_layer - 2})


def read_features(runner: Any, rows: Sequence[LabelledAnswer], blocks: Sequence[int],
                  progress: Progress | None = None) -> dict[int, np.ndarray]:
    """Last-token block outputs of the judge model reading each row (``{block: [n, n_embd]}``)."""
    from rs_local.runtime.activations import BlockReader

    out: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
    with BlockReader(runner, blocks, n_ctx=runner.n_ctx) as reader:
        for i, row in enumerate(rows):
            got = reader.read(judge_messages(row.prompt, row.response))
            for b in blocks:
                out[b].append(got[b])
            if progress:
                progress(i + 1, len(rows))
    return {b: np.stack(v) for b, v in out.items()}


def train_rows(rows: Sequence[LabelledAnswer]) -> list[LabelledAnswer]:
    """The rows a probe may learn from: everything not marked as test."""
    train = [r for r in rows if r.split != "test"]
    if len({r.refusal for r in train}) < 2:
        raise RsLocalError("the labelled training rows need both refusals and answers")
    if len(train) < 20:
        raise RsLocalError(f"only {len(train)} labelled training rows; a probe needs at least 20")
    return train


def train_probe(runner: Any, rows: Sequence[LabelledAnswer], *, blocks: Sequence[int] | None = None,
                folds: int = 5, progress: Progress | None = None, source: str = "") -> ProbeFile:
    """Fit a probe judge for ``runner``'s model on the non-test rows; figures go into the file."""
    train = train_rows(rows)
    blocks = list(blocks) if blocks else candidate_blocks(runner.n_layer)
    feats = read_features(runner, train, blocks, progress)
    y = np.array([1.0 if r.refusal else 0.0 for r in train])
    sel = cross_validate(feats, y, [r.prompt for r in train], k=folds)
    probe = fit_probe(feats[sel.layer], y, sel.lam)
    probe.threshold = sel.threshold
    training = {
        "source": source, "rows": len(train), "refusals": int(y.sum()), "test_rows_excluded": len(rows) - len(train),
        "blocks": blocks, "folds": folds, "layer": sel.layer, "lambda": sel.lam, "threshold": sel.threshold,
        "cv_accuracy": sel.cv_accuracy, "cv_table": sel.table,
    }
    return ProbeFile(probe, sel.layer, str(runner.llama.metadata.get("general.architecture", "")), runner.n_embd,
                     runner.n_layer, str(runner.llama.metadata.get("general.name", "")), training=training)


def summary(pf: ProbeFile) -> dict[str, Any]:
    """What `judge-train` prints and `inspect` could show: the choice and its held-out figures."""
    t = pf.training
    return {"layer": pf.layer, "threshold": pf.probe.threshold, "cv_accuracy": t.get("cv_accuracy"),
            "rows": t.get("rows"), "model": pf.model_name or pf.model_arch, "combine": pf.combine}


__all__ = ["candidate_blocks", "read_features", "summary", "train_probe", "train_rows"]
