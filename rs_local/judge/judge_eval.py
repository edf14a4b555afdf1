"""How well does a judge agree with human labels? Agreement, precision/recall, confusion, per type.

A steering vector is only as good as the scores it is fitted on, so the judge itself needs a
yardstick: a file of real answers labelled by people (``refusal`` true/false and, for
refusals, the ``refusal_type``). The per-type breakdown matters most: the point of an LLM
judge over keywords is the soft refusals (deflection, feigned ignorance, vagueness, ...).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rs_local.callbacks import Progress
from rs_local.errors import FileProblem, PromptTooLong
from rs_local.judge.jsonl import data_rows
from rs_local.judge.rubric import REFUSAL_TYPES
from rs_local.prompts import prompt_words

DIRECT = "direct refusal"


@dataclass(frozen=True)
class LabelledAnswer:
    prompt: str
    response: str
    refusal: bool
    refusal_type: str | None = None
    category: str | None = None
    split: str | None = None  # "train" / "test": a probe judge never trains on "test"


def load_labelled(path: str | Path) -> list[LabelledAnswer]:
    """Rows ``{"prompt", "response", "refusal": bool, "refusal_type"?, "category"?}``; problems name their line."""
    path = Path(path)
    out = []
    seen: dict[tuple, int] = {}
    for lineno, rec in data_rows(path, "labelled answer"):
        item = _labelled(path, lineno, rec)
        key = (item.prompt, item.response)
        if key in seen:
            # the same answer twice would count twice in every figure; which label is right is the user's call
            raise FileProblem(path, f"line {lineno}: same prompt and response as line {seen[key]}; remove one")
        seen[key] = lineno
        out.append(item)
    if not out:
        raise FileProblem(path, "no labelled answers in file")
    return out


def _labelled(path: Path, lineno: int, rec: dict) -> LabelledAnswer:
    """One checked labelled row; a field of the wrong type names its line."""
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("response"), str):
        raise FileProblem(path, f"line {lineno}: needs text fields 'prompt' and 'response'")
    if not isinstance(rec.get("refusal"), bool):
        raise FileProblem(path, f"line {lineno}: 'refusal' must be true or false")
    rtype, category = rec.get("refusal_type"), rec.get("category")
    if rtype is not None and not isinstance(rtype, str):
        raise FileProblem(path, f"line {lineno}: 'refusal_type' must be text")
    if rec["refusal"] and rtype is not None and rtype not in REFUSAL_TYPES:
        raise FileProblem(path, f"line {lineno}: unknown refusal_type {rtype[:40]!r} (known: {', '.join(REFUSAL_TYPES)})")
    if category is not None and not isinstance(category, str):
        raise FileProblem(path, f"line {lineno}: 'category' must be text")
    split = rec.get("split")
    if split is not None and split not in ("train", "test"):
        raise FileProblem(path, f"line {lineno}: 'split' must be \"train\" or \"test\"")
    return LabelledAnswer(rec["prompt"], rec["response"], rec["refusal"], rtype if rec["refusal"] else None, category,
                          split)


@dataclass
class EvalResult:
    """Judge vs human labels. ``no_verdict_*`` counts answers the judge gave no verdict on."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    no_verdict_refusal: int = 0
    no_verdict_answer: int = 0
    by_type: dict[str, list[int]] = field(default_factory=dict)  # type -> [agreed, total]
    by_category: dict[str, list[int]] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn + self.no_verdict_refusal + self.no_verdict_answer

    @property
    def agreement(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn + self.no_verdict_refusal) if self.tp + self.fn + self.no_verdict_refusal else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def soft_refusal_recall(self) -> tuple[int, int]:
        """(agreed, total) over refusals of every type except direct refusal."""
        agreed = sum(a for t, (a, _) in self.by_type.items() if t not in (DIRECT, "not refusal"))
        total = sum(n for t, (_, n) in self.by_type.items() if t not in (DIRECT, "not refusal"))
        return agreed, total

    def add(self, item: LabelledAnswer, verdict: int) -> None:
        self.predictions.append(verdict)
        agreed = (verdict > 0) == item.refusal and verdict != 0
        if verdict == 0:
            if item.refusal:
                self.no_verdict_refusal += 1
            else:
                self.no_verdict_answer += 1
        elif item.refusal:
            self.tp += verdict > 0
            self.fn += verdict < 0
        else:
            self.fp += verdict > 0
            self.tn += verdict < 0
        key = (item.refusal_type or "unspecified") if item.refusal else "not refusal"
        _tally(self.by_type, key, agreed)
        if item.category:
            _tally(self.by_category, item.category, agreed)

    def as_dict(self) -> dict:
        soft = self.soft_refusal_recall()
        return {
            "n": self.n, "agreement": self.agreement, "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                          "no_verdict_refusal": self.no_verdict_refusal, "no_verdict_answer": self.no_verdict_answer},
            "soft_refusals": {"agreed": soft[0], "total": soft[1]},
            "by_type": {k: {"agreed": a, "total": n} for k, (a, n) in sorted(self.by_type.items())},
            "by_category": {k: {"agreed": a, "total": n} for k, (a, n) in sorted(self.by_category.items())},
        }


def _tally(table: dict[str, list[int]], key: str, agreed: bool) -> None:
    cell = table.setdefault(key, [0, 0])
    cell[0] += int(agreed)
    cell[1] += 1


def evaluate(judge, labelled: list[LabelledAnswer], progress: Progress | None = None) -> EvalResult:
    """Judge every labelled answer (``judge.concurrency`` at a time) and tally against the labels."""
    result = EvalResult()
    verdicts: list[int] = [0] * len(labelled)
    workers = max(1, int(getattr(judge, "concurrency", 1)))
    if progress:
        progress(0, len(labelled))

    def one(i: int) -> tuple[int, int]:
        try:
            return i, judge.judge(labelled[i].prompt, labelled[i].response).verdict
        except PromptTooLong as exc:  # "the text is N tokens" named no row (the caller adds the file)
            raise PromptTooLong(f"the row whose prompt begins {prompt_words(labelled[i].prompt)}: {exc}") from None

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        outcomes = pool.map(one, range(len(labelled))) if pool is not None else map(one, range(len(labelled)))
        for done, (i, verdict) in enumerate(outcomes, start=1):
            verdicts[i] = verdict
            if progress:
                progress(done, len(labelled))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for item, verdict in zip(labelled, verdicts):
        result.add(item, verdict)
    return result
