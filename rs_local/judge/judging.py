"""Judge a responses file into a resumable verdicts log, then aggregate it into scores.

Two files come out, on purpose:

* the **verdicts log** (default ``<scores stem>.verdicts.jsonl`` beside the scores file): one
  row per judged answer, appended and fsynced as each verdict arrives, with a header holding
  the judge's settings. This is the resumable part: a killed run continues from it.
* the **scores file** (``-o``): one row per prompt, ``{"prompt", "score", "label", ...,
  "answers": [per-answer verdicts]}``, written atomically once every answer has a verdict.
  ``rs-local fit --scores`` reads its ``prompt`` and ``score`` fields. An existing scores
  file is never replaced without ``force``: a second run is only allowed when it gives
  exactly the scores already there (then the file is left alone).

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
from typing import Iterator

from rs_local.callbacks import Progress
from rs_local.errors import FileProblem, PromptTooLong
from rs_local.files import (
    atomic_write_text, check_distinct, check_output_path, dumps, is_json_int, is_json_number, iter_jsonl, read_text,
)
from rs_local.judge.jsonl import HEADER_KEY, AppendLog, data_rows, is_header, starts_with_header
from rs_local.judge.openai_http import JudgeUnavailable
from rs_local.judge.respond import prompt_id as make_prompt_id
from rs_local.judge.scores import DEFAULT_COMPLIED_BELOW, DEFAULT_REFUSED_ABOVE, PromptScore, aggregate

VERDICTS_KIND = "verdicts"
ANSWER_FIELDS = ("response", "answer", "output", "completion")


def default_verdicts_path(scores_path: str | Path) -> Path:
    p = Path(scores_path)
    return p.with_name(p.stem + ".verdicts.jsonl")


def answer_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def verdict_key(row: dict) -> tuple[str, int, str]:
    """The identity of an answer (a responses row or its verdict row)."""
    return row["prompt_id"], row["sample"], row["answer_hash"]


def _logged_verdict_key(row: dict) -> tuple[str, int, str]:
    """:func:`verdict_key` of a row read back from the verdicts log, which may have been edited:
    a row of the wrong shape raises ``ValueError`` (reported with its line) instead of failing later."""
    pid, sample, ahash = row["prompt_id"], row["sample"], row["answer_hash"]
    if not isinstance(pid, str) or not isinstance(ahash, str) or not is_json_int(sample):
        raise ValueError("prompt_id and answer_hash must be text, sample a whole number")
    signed = row.get("signed")
    if not is_json_number(signed) or not -1.000001 <= signed <= 1.000001 or not isinstance(row.get("prompt"), str):
        raise ValueError("signed must be a number in [-1, 1] and prompt text")
    if row.get("mean_logprob") is not None and not is_json_number(row["mean_logprob"]):
        raise ValueError("mean_logprob must be a number")
    if row.get("verdict") not in (-1, 0, 1) or isinstance(row.get("verdict"), bool):
        raise ValueError("verdict must be -1, 0 or 1")
    return pid, sample, ahash


def load_responses(path: str | Path) -> list[dict]:
    """The answers to judge: rows with ``prompt`` and ``response`` (or answer/output/completion).

    ``prompt_id``, ``sample`` and ``mean_logprob`` are filled in when absent or null (a
    hand-made file with one answer per prompt is fine: equal weights). A field of the wrong
    type names its line. ``mean_logprob`` must be a finite number: NaN and Infinity are not
    JSON and are refused by the reader. Two rows with the same prompt, sample and answer
    (e.g. a line pasted twice) are an error rather than silently counted twice or dropped:
    which of them was meant is the user's call.
    """
    path = Path(path)
    rows = []
    seen: dict[str, int] = {}
    lines: dict[tuple[str, int, str], int] = {}
    prompts: dict[str, tuple[str, int]] = {}  # prompt_id -> (its prompt, first line): scores group by the id
    for lineno, rec in data_rows(path, "answer"):
        row = _response_row(path, lineno, rec, seen)
        first = prompts.setdefault(row["prompt_id"], (row["prompt"], lineno))
        if first[0] != row["prompt"]:  # the second prompt's answers were folded into the first one's score
            raise FileProblem(path, f"line {lineno}: prompt_id {row['prompt_id'][:40]!r} names another prompt on "
                                    f"line {first[1]}; give each prompt its own id (or none)")
        key = verdict_key(row)
        if key in lines:
            raise FileProblem(path, f"line {lineno}: same prompt, sample and answer as line {lines[key]} "
                                    "(a repeated row would count twice); remove one")
        lines[key] = lineno
        rows.append(row)
    if not rows:
        raise FileProblem(path, "no answers in file")
    return rows


def _response_row(path: Path, lineno: int, rec: dict, seen: dict[str, int]) -> dict:
    """One checked responses row in the shape the judge loop uses."""
    field_name = next((f for f in ANSWER_FIELDS if f in rec), None)
    if "prompt" not in rec or field_name is None:
        raise FileProblem(path, f"line {lineno}: needs fields 'prompt' and 'response'")
    prompt, answer = rec["prompt"], rec[field_name]
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise FileProblem(path, f"line {lineno}: 'prompt' and '{field_name}' must be text")
    pid = rec.get("prompt_id")
    if pid is not None and (not isinstance(pid, str) or not pid):
        raise FileProblem(path, f"line {lineno}: 'prompt_id' must be text")
    pid = pid or make_prompt_id(prompt)
    sample = rec.get("sample")
    if sample is None:
        sample = seen.get(pid, 0)
    elif not is_json_int(sample) or sample < 0:
        raise FileProblem(path, f"line {lineno}: 'sample' must be a whole number >= 0")
    seen[pid] = sample + 1
    lp = rec.get("mean_logprob")
    if lp is not None and not is_json_number(lp):
        raise FileProblem(path, f"line {lineno}: 'mean_logprob' must be a number")
    return {
        "prompt_id": pid, "prompt": prompt, "sample": sample, "response": answer,
        "mean_logprob": float(lp or 0.0), "answer_hash": answer_hash(answer), "line": lineno,
    }


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
    check_outputs(responses, scores_path, verdicts_path, force, refused_above, complied_below, rows)
    config = {"judge": judge.describe()}
    limit = max_consecutive_failures or max(3, 2 * getattr(judge, "concurrency", 1))
    with AppendLog.open(verdicts_path, VERDICTS_KIND, config, _logged_verdict_key, force=force) as log:
        todo = [r for r in rows if verdict_key(r) not in log]
        report = JudgeReport(len(rows), len(rows) - len(todo), 0, verdicts_path=verdicts_path, scores_path=scores_path)
        if progress:
            progress(report.already_done, report.total)
        for row, outcome in _named(_run(judge, todo, limit, report), responses):
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
        _write_scores(scores_path, report.scores, force)
    return report


def check_outputs(responses: str | Path, scores_path: str | Path, verdicts_path: str | Path | None = None, force: bool = False,
                  refused_above: float = DEFAULT_REFUSED_ABOVE, complied_below: float = DEFAULT_COMPLIED_BELOW,
                  rows: list[dict] | None = None) -> None:
    """Refuse, before any judge loads, outputs this run must not write.

    Outputs may not collide with the input or each other, and must be writable files. An
    existing scores file is the result of a finished run (scores are only written when every
    answer has a verdict): without ``force`` it is only "continued" when nothing would change,
    i.e. its verdicts log already covers every answer and the scores it gives are the ones in
    the file. Otherwise a second run would silently replace the first run's scores.
    """
    responses, scores_path = Path(responses), Path(scores_path)
    verdicts_path = Path(verdicts_path) if verdicts_path else default_verdicts_path(scores_path)
    check_distinct([scores_path, verdicts_path], [responses])
    for out in (scores_path, verdicts_path):
        check_output_path(out, force=True)
    if force:
        return
    logged = _logged_verdicts(verdicts_path) if verdicts_path.exists() else None
    if not scores_path.exists():
        return
    if logged is None:
        raise FileProblem(scores_path, "already exists (and no verdicts log to continue from); use --force to overwrite it")
    rows = rows if rows is not None else load_responses(responses)
    missing = sum(verdict_key(r) not in logged for r in rows)
    if missing:
        raise FileProblem(scores_path, f"already exists, from a run that did not judge {missing} of the answers in "
                                       f"{responses}; use --force to replace it, or another output file")
    text = _scores_text(aggregate(_in_response_order(list(logged.values()), rows), refused_above, complied_below))
    if read_text(scores_path, what="scores file") != text:
        raise FileProblem(scores_path, "already exists with other scores (other responses or thresholds); "
                                       "use --force to replace it, or another output file")


def _logged_verdicts(path: Path) -> dict[tuple[str, int, str], dict]:
    """Verdict rows of a log by key (a killed writer's partial tail is ignored; it is redone on resume).

    Read only, so that a file that is not a verdicts log is refused before a judge loads and
    without a byte of it changed.
    """
    out: dict[tuple[str, int, str], dict] = {}
    text = read_text(path, what="verdicts log")
    foreign = FileProblem(path, "exists and is not an rs-local verdicts file; use --force to overwrite it")
    try:
        entries = list(iter_jsonl(path, text, tolerate_partial_tail=True))
    except FileProblem:
        if not starts_with_header(text):
            raise foreign from None
        raise
    if not entries and not text.strip():
        return out
    head = entries[0][1] if entries else None
    if not is_header(head) or not isinstance(head[HEADER_KEY], dict) or head[HEADER_KEY].get("kind") != VERDICTS_KIND:
        raise foreign
    for lineno, row in entries[1:]:
        try:
            out.setdefault(_logged_verdict_key(row), row)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FileProblem(path, f"line {lineno}: not a valid verdicts row; use --force to start over") from None
    return out


def _scores_text(scores: list[PromptScore]) -> str:
    return "".join(dumps(s.as_row()) + "\n" for s in scores)


def _write_scores(path: Path, scores: list[PromptScore], force: bool) -> None:
    """Write the scores file, unless it already holds exactly these scores (then nothing is touched)."""
    text = _scores_text(scores)
    if path.exists() and read_text(path, what="scores file") == text:
        return
    if path.exists() and not force:
        raise FileProblem(path, "already exists with other scores; use --force to replace it, or another output file")
    atomic_write_text(path, text, force=True)


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


def _named(outcomes: Iterator[tuple[dict, object]], responses: str | Path) -> Iterator[tuple[dict, object]]:
    """``outcomes``, a row too long to judge named with its file (the verdicts before it are kept)."""
    try:
        yield from outcomes
    except PromptTooLong as exc:
        raise PromptTooLong(f"{responses}: {exc}") from None


def _judge_one(judge, row: dict):
    try:
        return judge.judge(row["prompt"], row["response"])
    except JudgeUnavailable as exc:
        return str(exc)
    except PromptTooLong as exc:  # "the text is N tokens" named neither the file nor the row
        raise PromptTooLong(f"line {row['line']}: the prompt with its answer: {exc}") from None


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
