"""Judge a responses file into a resumable verdicts log, then aggregate it into scores.

Two files come out, on purpose:

* the **verdicts log** (default ``<scores stem>.verdicts.jsonl`` beside the scores file): one
  row per judged answer, appended and fsynced as each verdict arrives, with a header holding
  the judge's settings. This is the resumable part: a killed run continues from it.
* the **scores file** (``-o``): one row per prompt, ``{"prompt", "score", "label", ...,
  "answers": [per-answer verdicts]}``, written atomically once every answer has a verdict.
  ``rs-local fit --scores`` reads its ``prompt`` and ``score`` fields.

A verdict is keyed by (prompt id, sample, hash of the answer text), so a responses file that
was regenerated never reuses a verdict given to a different answer. Rows the judge could not
score (server down after all retries) are not written; they are reported, and running the
same command again judges exactly those.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rs_local.errors import FileProblem
from rs_local.judge.jsonl import AppendLog, data_rows, write_jsonl_atomic
from rs_local.judge.openai_http import JudgeUnavailable
from rs_local.judge.respond import prompt_id as make_prompt_id
from rs_local.judge.scores import DEFAULT_COMPLIED_BELOW, DEFAULT_REFUSED_ABOVE, PromptScore, aggregate

VERDICTS_KIND = "verdicts"
ANSWER_FIELDS = ("response", "answer", "output", "completion")
Progress = Callable[[int, int], None]


def default_verdicts_path(scores_path: str | Path) -> Path:
    p = Path(scores_path)
    return p.with_name(p.stem + ".verdicts.jsonl")


def answer_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def verdict_key(row: dict) -> tuple[str, int, str]:
    return row["prompt_id"], int(row["sample"]), row["answer_hash"]


def load_responses(path: str | Path) -> list[dict]:
    """The answers to judge: rows with ``prompt`` and ``response`` (or answer/output/completion).

    ``prompt_id``, ``sample`` and ``mean_logprob`` are filled in when absent (a hand-made file
    with one answer per prompt is fine: equal weights). A missing field names its line.
    """
    path = Path(path)
    rows = []
    seen: dict[str, int] = {}
    for lineno, rec in data_rows(path, "answer"):
        field_name = next((f for f in ANSWER_FIELDS if f in rec), None)
        if "prompt" not in rec or field_name is None:
            raise FileProblem(path, f"line {lineno}: needs fields 'prompt' and 'response'")
        prompt, answer = rec["prompt"], rec[field_name]
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise FileProblem(path, f"line {lineno}: 'prompt' and '{field_name}' must be text")
        pid = str(rec.get("prompt_id") or make_prompt_id(prompt))
        sample = rec.get("sample")
        if sample is None:
            sample = seen.get(pid, 0)
        seen[pid] = int(sample) + 1
        rows.append({
            "prompt_id": pid, "prompt": prompt, "sample": int(sample), "response": answer,
            "mean_logprob": float(rec.get("mean_logprob") or 0.0), "answer_hash": answer_hash(answer), "line": lineno,
        })
    if not rows:
        raise FileProblem(path, "no answers in file")
    return rows


@dataclass
class JudgeReport:
    """What a judge run did; ``complete`` is true when every answer has a verdict and scores were written."""

    total: int
    already_done: int
    judged: int
    failed: list[tuple[dict, str]] = field(default_factory=list)
    not_attempted: int = 0
    scores: list[PromptScore] | None = None
    verdicts_path: Path | None = None
    scores_path: Path | None = None

    @property
    def complete(self) -> bool:
        return self.scores is not None

    @property
    def missing(self) -> int:
        return len(self.failed) + self.not_attempted


def judge_responses(
    responses: str | Path,
    judge,
    scores_path: str | Path,
    *,
    verdicts_path: str | Path | None = None,
    force: bool = False,
    refused_above: float = DEFAULT_REFUSED_ABOVE,
    complied_below: float = DEFAULT_COMPLIED_BELOW,
    progress: Progress | None = None,
    max_consecutive_failures: int | None = None,
) -> JudgeReport:
    """Judge every answer in ``responses`` not judged yet, then write per-prompt scores.

    ``judge`` is any backend with ``judge(prompt, answer) -> Verdict``, ``describe()`` and
    ``concurrency``. After ``max_consecutive_failures`` failed rows in a row (default: twice
    the concurrency, at least 3) the run stops asking a server that is evidently down.
    """
    scores_path = Path(scores_path)
    verdicts_path = Path(verdicts_path) if verdicts_path else default_verdicts_path(scores_path)
    rows = load_responses(responses)
    check_outputs(responses, scores_path, verdicts_path, force)
    config = {"judge": judge.describe()}
    limit = max_consecutive_failures or max(3, 2 * getattr(judge, "concurrency", 1))
    with AppendLog.open(verdicts_path, VERDICTS_KIND, config, verdict_key, force=force) as log:
        todo = [r for r in rows if verdict_key(r) not in log]
        report = JudgeReport(len(rows), len(rows) - len(todo), 0, verdicts_path=verdicts_path, scores_path=scores_path)
        if progress:
            progress(report.already_done, report.total)
        for row, outcome in _run(judge, todo, limit, report):
            if isinstance(outcome, str):
                report.failed.append((row, outcome))
                continue
            log.append(_verdict_row(row, outcome))
            report.judged += 1
            if progress:
                progress(report.already_done + report.judged, report.total)
        wanted = {verdict_key(r) for r in rows}
        current = [v for v in log.rows if verdict_key(v) in wanted]
    if report.missing == 0:
        report.scores = aggregate(_in_response_order(current, rows), refused_above, complied_below)
        write_jsonl_atomic(scores_path, (s.as_row() for s in report.scores))
    return report


def check_outputs(responses: str | Path, scores_path: str | Path, verdicts_path: str | Path | None = None, force: bool = False) -> None:
    """Refuse outputs that collide with the input, or a finished scores file with nothing to continue from."""
    responses, scores_path = Path(responses), Path(scores_path)
    verdicts_path = Path(verdicts_path) if verdicts_path else default_verdicts_path(scores_path)
    same = {responses.resolve()}
    for out in (scores_path, verdicts_path):
        if out.resolve() in same:
            raise FileProblem(out, "output would overwrite another input or output file of this command")
        same.add(out.resolve())
    if scores_path.exists() and not force and not verdicts_path.exists():
        raise FileProblem(scores_path, "already exists (and no verdicts log to continue from); use --force to overwrite it")


def _in_response_order(verdicts: list[dict], rows: list[dict]) -> list[dict]:
    by_key = {verdict_key(v): v for v in verdicts}
    return [by_key[verdict_key(r)] for r in rows if verdict_key(r) in by_key]


def _verdict_row(row: dict, verdict) -> dict:
    out = {k: row[k] for k in ("prompt_id", "sample", "answer_hash", "prompt", "response", "mean_logprob")}
    out.update(verdict.as_row())
    return out


def _run(judge, todo: list[dict], limit: int, report: JudgeReport) -> Iterator[tuple[dict, object]]:
    """Yield (row, Verdict or error text) as verdicts arrive; stop early when the backend keeps failing."""
    workers = max(1, int(getattr(judge, "concurrency", 1)))
    if workers == 1:
        yield from _run_serial(judge, todo, limit, report)
    else:
        yield from _run_threads(judge, todo, workers, limit, report)


def _judge_one(judge, row: dict):
    try:
        return judge.judge(row["prompt"], row["response"])
    except JudgeUnavailable as exc:
        return str(exc)


def _run_serial(judge, todo, limit, report) -> Iterator[tuple[dict, object]]:
    streak = 0
    for i, row in enumerate(todo):
        outcome = _judge_one(judge, row)
        streak = streak + 1 if isinstance(outcome, str) else 0
        yield row, outcome
        if streak >= limit:
            report.not_attempted = len(todo) - i - 1
            return


def _run_threads(judge, todo, workers, limit, report) -> Iterator[tuple[dict, object]]:
    pending: dict[Future, dict] = {}
    queue = iter(enumerate(todo))
    streak, submitted, stop = 0, 0, False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
    try:
        while True:
            while not stop and len(pending) < 2 * workers:
                item = next(queue, None)
                if item is None:
                    break
                pending[pool.submit(_judge_one, judge, item[1])] = item[1]
                submitted += 1
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                row = pending.pop(fut)
                outcome = fut.result()
                streak = streak + 1 if isinstance(outcome, str) else 0
                if streak >= limit:
                    stop = True
                yield row, outcome
        report.not_attempted = len(todo) - submitted
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
