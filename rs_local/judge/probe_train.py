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
from rs_local.errors import PromptTooLong, RsLocalError
from rs_local.judge.judge_eval import LabelledAnswer
from rs_local.judge.keywords import find_refusal_phrase
from rs_local.judge.probe import ProbeFile, make_reader, read_judge_rows
from rs_local.judge.probe_fit import check_folds, cross_validate, fit_probe
from rs_local.prompts import prompt_words



def candidate_blocks(n_layer: int) -> list[int]:
    """Every second block from a quarter of the depth to the one before the last: refusal shows in
    the middle and late blocks, and an averaged probe cannot read the final block (llama.cpp keeps
    only the rows that make logits there). With an odd quarter and an even depth (SmolLM2's 30
    blocks, 28-block models) the plain stride used to land on the final block."""
    return sorted(b for b in set(range(n_layer // 4, n_layer - 1, 2)) | {n_layer - 2} if b >= 0)


def read_features(runner: Any, rows: Sequence[LabelledAnswer], blocks: Sequence[int],
                  progress: Progress | None = None, pooling: str = "answer-mean") -> dict[int, np.ndarray]:
    """Block outputs of the judge model reading each row, pooled as the probe will read them
    (``{block: [n, n_embd]}``)."""
    out: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
    with make_reader(runner, list(blocks), pooling) as reader:
        for i, row in enumerate(rows):
            try:
                got = read_judge_rows(reader, runner, row.prompt, row.response, pooling)
            except PromptTooLong as exc:  # "the text is N tokens" named no row
                raise PromptTooLong(f"the row whose prompt begins {prompt_words(row.prompt)}: {exc}") from None
            for b in blocks:
                out[b].append(got[b])
            if progress:
                progress(i + 1, len(rows))
    return {b: np.stack(v) for b, v in out.items()}


def train_rows(rows: Sequence[LabelledAnswer], folds: int = 5) -> list[LabelledAnswer]:
    """The rows a probe may learn from: everything not marked as test, enough of them and spread
    over enough prompts for grouped cross-validation to score every row."""
    train = [r for r in rows if r.split != "test"]
    if len({r.refusal for r in train}) < 2:
        raise RsLocalError("the labelled training rows need both refusals and answers")
    if len(train) < 20:
        raise RsLocalError(f"only {len(train)} labelled training rows; a probe needs at least 20")
    check_folds([r.prompt for r in train], np.array([r.refusal for r in train], float), folds)
    return train


def keyword_refusals(rows: Sequence[LabelledAnswer]) -> np.ndarray:
    """Rows the judge calls refusals by keyword whatever the probe says (``keywords-or-probe``)."""
    return np.array([find_refusal_phrase(r.response) is not None for r in rows])


def train_probe(runner: Any, rows: Sequence[LabelledAnswer], *, blocks: Sequence[int] | None = None,
                folds: int = 5, progress: Progress | None = None, source: str = "",
                features: dict[int, np.ndarray] | None = None, pooling: str = "answer-mean") -> ProbeFile:
    """Fit a probe judge for ``runner``'s model on the non-test rows; figures go into the file.

    Block, penalty and threshold are chosen for the judge as it runs (``keywords-or-probe``):
    answers with a stock refusal phrase are refusals anyway, so the probe's cut is chosen on
    what the keywords leave. ``features`` (as :func:`read_features` returns them for the train
    rows, with the same ``pooling``) skips reading the answers again. ``pooling`` is how a block's
    output becomes one row: "answer-mean" (the mean over the answer's tokens, the better one in
    cross-validation) or "last" (the last token, as the first probes did).
    """
    train = train_rows(rows, folds)
    blocks = list(blocks) if blocks else candidate_blocks(runner.n_layer)
    feats = features if features is not None else read_features(runner, train, blocks, progress, pooling)
    y = np.array([1.0 if r.refusal else 0.0 for r in train])
    forced = keyword_refusals(train)
    sel = cross_validate(feats, y, [r.prompt for r in train], k=folds, forced=forced)
    probe = fit_probe(feats[sel.layer], y, sel.lam)
    probe.threshold = sel.threshold
    training = {
        "source": source, "rows": len(train), "refusals": int(y.sum()), "test_rows_excluded": len(rows) - len(train),
        "blocks": blocks, "folds": folds, "layer": sel.layer, "lambda": sel.lam, "threshold": sel.threshold,
        "cv_accuracy": sel.cv_accuracy, "cv_table": sel.table, "keyword_refusals": int(forced.sum()),
        "cv_decision": "keywords-or-probe", "pooling": pooling,
        "threshold_tuned_cv_accuracy": sel.tuned_accuracy,
    }
    return ProbeFile(probe, sel.layer, str(runner.llama.metadata.get("general.architecture", "")), runner.n_embd,
                     runner.n_layer, str(runner.llama.metadata.get("general.name", "")), training=training,
                     pooling=pooling)


def summary(pf: ProbeFile) -> dict[str, Any]:
    """What `judge-train` prints and `inspect` could show: the choice and its held-out figures."""
    t = pf.training
    return {"layer": pf.layer, "threshold": pf.probe.threshold, "cv_accuracy": t.get("cv_accuracy"),
            "rows": t.get("rows"), "model": pf.model_name or pf.model_arch, "combine": pf.combine,
            "pooling": pf.pooling}


__all__ = ["candidate_blocks", "keyword_refusals", "read_features", "summary", "train_probe", "train_rows"]
