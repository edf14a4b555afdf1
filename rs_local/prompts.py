"""Prompt sets and judge-score files, loaded from the shapes users actually have.

Users bring prompts as plain text (one per line), JSONL, a JSON list, or a CSV with a header,
and the interesting text sits under one of a handful of conventional names (``text``,
``prompt``, ``goal``, ``instruction``, ``question``). Loading is strict about anything that
would silently change what gets fitted: an empty set, a missing column, undecodable bytes or
broken JSON all raise :class:`PromptSetError` naming the file (and the line where it helps),
because a steering vector fitted on half a file is worse than no vector.

Duplicates are dropped (first occurrence kept, order preserved) so a prompt repeated in a
scraped list does not weigh more in the means.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rs_local.errors import PromptSetError

#: Field / column names tried, in order, when none is given.
AUTO_FIELDS = ("text", "prompt", "goal", "instruction", "question")
#: Field names accepted in a scores file.
SCORE_PROMPT_FIELDS = ("prompt", "text")
SCORE_VALUE_FIELDS = ("score", "c")
#: |c| at or below this is "neutral": the judge could not decide, so the prompt is left out.
NEUTRAL_THRESHOLD = 0.1

SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def load_prompts(path: str | Path, field: str | None = None, dedupe: bool = True) -> list[str]:
    """Read a prompt set from ``.txt``, ``.jsonl``, ``.json`` or ``.csv``.

    ``field`` names the JSON field or CSV column; when omitted the first of
    :data:`AUTO_FIELDS` present is used. Blank prompts are skipped; duplicates are dropped
    unless ``dedupe`` is false.
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _from_records(path, _jsonl_records(path, text), field)
    elif suffix == ".json":
        prompts = _from_records(path, _json_records(path, text), field)
    elif suffix == ".csv":
        prompts = _from_csv(path, text, field)
    elif suffix == ".txt" or suffix == "":
        prompts = [line.strip() for line in text.splitlines()]
    else:
        raise PromptSetError(path, f"unknown prompt file type '{suffix}' (use one of {', '.join(SUFFIXES)})")
    prompts = [p for p in prompts if p]
    if dedupe:
        prompts = dedupe_keep_order(prompts)
    if not prompts:
        raise PromptSetError(path, "no prompts in file")
    return prompts


def dedupe_keep_order(items: Iterable[str]) -> list[str]:
    """Drop repeats, keeping each item's first position."""
    return list(dict.fromkeys(items))


def prompts_hash(prompts: Sequence[str]) -> str:
    """Stable content hash of an ordered prompt list (for cache keys and provenance)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PromptSetError(path, "no such file")
    if path.is_dir():
        raise PromptSetError(path, "is a directory, expected a prompt file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptSetError(path, f"not valid UTF-8 (byte {exc.start}, line {line}); re-save the file as UTF-8") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PromptSetError(path, f"line {lineno}: bad JSON ({exc.msg} at column {exc.colno})") from None
    return records


def _json_records(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptSetError(path, f"line {exc.lineno}: bad JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise PromptSetError(path, f"expected a JSON list of strings or objects, found {type(data).__name__}")
    # A JSON list carries no line numbers per item; report the item index instead.
    return [(i, item) for i, item in enumerate(data)]


def pick_field(path: Path, keys: Iterable[str], field: str | None, what: str = "field") -> str:
    """The requested field, or the first conventional one present; a clear error otherwise."""
    keys = list(keys)
    if field is not None:
        if field not in keys:
            raise PromptSetError(path, f"no {what} '{field}' (found: {', '.join(keys) or 'none'})")
        return field
    for name in AUTO_FIELDS:
        if name in keys:
            return name
    raise PromptSetError(
        path, f"no prompt {what} found (tried {', '.join(AUTO_FIELDS)}; found: {', '.join(keys) or 'none'}); name it with --{what}"
    )


def _from_records(path: Path, records: list[tuple[int, Any]], field: str | None) -> list[str]:
    where = "line" if path.suffix.lower() == ".jsonl" else "item"
    first_obj = next((rec for _, rec in records if isinstance(rec, dict)), None)
    key = pick_field(path, first_obj.keys(), field) if first_obj is not None else None
    out = []
    for pos, rec in records:
        if isinstance(rec, str):
            out.append(rec.strip())
        elif isinstance(rec, dict) and key is not None:
            if key not in rec:
                raise PromptSetError(path, f"{where} {pos}: no field '{key}'")
            value = rec[key]
            if value is None:
                continue
            if not isinstance(value, str):
                raise PromptSetError(path, f"{where} {pos}: field '{key}' is {type(value).__name__}, expected text")
            out.append(value.strip())
        else:
            raise PromptSetError(path, f"{where} {pos}: expected a string or an object, found {type(rec).__name__}")
    return out


def _from_csv(path: Path, text: str, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        key = pick_field(path, header, column, what="column")
        return [(row.get(key) or "").strip() for row in reader]
    except csv.Error as exc:
        raise PromptSetError(path, f"line {reader.line_num}: bad CSV ({exc})") from None


# ----------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class ScoredPrompts:
    """Prompts split by judge score into refused (c > t), complied (c < -t) and neutral."""

    refused: list[str]
    refused_scores: list[float]
    complied: list[str]
    complied_scores: list[float]
    neutral: list[str]

    @property
    def refused_weights(self) -> list[float]:
        return [abs(c) for c in self.refused_scores]

    @property
    def complied_weights(self) -> list[float]:
        return [abs(c) for c in self.complied_scores]


def load_scores(path: str | Path) -> dict[str, float]:
    """Read a judge-scores JSONL file: rows ``{"prompt": ..., "score": c}`` (``text``/``c`` also accepted).

    Returns prompt -> score in file order; a prompt scored twice keeps its last score (a
    re-judged row supersedes the old one).
    """
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        records = _json_records(path, text)
    else:
        records = _jsonl_records(path, text)
    scores: dict[str, float] = {}
    for pos, rec in records:
        if not isinstance(rec, dict):
            raise PromptSetError(path, f"line {pos}: expected an object with prompt and score")
        prompt_key = next((k for k in SCORE_PROMPT_FIELDS if k in rec), None)
        score_key = next((k for k in SCORE_VALUE_FIELDS if k in rec), None)
        if prompt_key is None or score_key is None:
            raise PromptSetError(path, f"line {pos}: needs fields prompt (or text) and score (or c)")
        try:
            score = float(rec[score_key])
        except (TypeError, ValueError):
            raise PromptSetError(path, f"line {pos}: score {rec[score_key]!r} is not a number") from None
        if not -1.0 - 1e-9 <= score <= 1.0 + 1e-9:
            raise PromptSetError(path, f"line {pos}: score {score} is outside [-1, 1]")
        scores[str(rec[prompt_key]).strip()] = score
    if not scores:
        raise PromptSetError(path, "no scores in file")
    return scores


def split_by_scores(
    scores: dict[str, float], prompts: Sequence[str] | None = None, threshold: float = NEUTRAL_THRESHOLD, path: str | Path = "scores"
) -> ScoredPrompts:
    """Split prompts into refused / complied / neutral by judge score (the paper's |c| <= 0.1 rule).

    When ``prompts`` is given every one of them must have a score (a silent default would
    decide the prompt's side for the user); otherwise all scored prompts are used.
    """
    if prompts is None:
        prompts = list(scores)
    else:
        missing = [p for p in prompts if p not in scores]
        if missing:
            raise PromptSetError(path, f"{len(missing)} prompt(s) have no score, e.g. {missing[0][:60]!r}")
    refused, rs, complied, cs, neutral = [], [], [], [], []
    for p in dedupe_keep_order(prompts):
        c = scores[p]
        if c > threshold:
            refused.append(p)
            rs.append(c)
        elif c < -threshold:
            complied.append(p)
            cs.append(c)
        else:
            neutral.append(p)
    if not refused or not complied:
        raise PromptSetError(
            path, f"need both refused (score > {threshold}) and complied (score < -{threshold}) prompts; "
            f"found {len(refused)} refused, {len(complied)} complied, {len(neutral)} neutral"
        )
    return ScoredPrompts(refused, rs, complied, cs, neutral)
