"""Prompt sets and judge-score files, loaded from the shapes users actually have.

Users bring prompts as plain text (one per line), JSONL, a JSON list, or a CSV with a header,
and the interesting text sits under one of a handful of conventional names (``text``,
``prompt``, ``goal``, ``instruction``, ``question``). Loading is strict about anything that
would silently change what gets fitted: an empty set, a missing column, undecodable bytes or
broken JSON all raise :class:`PromptSetError` naming the file (and the line where it helps),
because a steering vector fitted on half a file is worse than no vector.

Duplicates are dropped (first occurrence kept, order preserved) so a prompt repeated in a
scraped list does not weigh more in the means.

Files are read by :mod:`rs_local.files`: regular files only, bounded, strict UTF-8 (a UTF-8
BOM is fine, UTF-16 and NUL bytes are not), lines split at ``\n`` only (a prompt may contain
U+2028 or a form feed), JSON with depth and number limits. A ``null`` where a prompt is
expected is an error, not the text "None" and not a silently dropped row; a CSV row with
fewer or more fields than the header, or an unterminated quote, is an error naming its line.
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
from rs_local.files import JsonProblem, iter_jsonl, json_type, parse_json, read_text, split_lines

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
        prompts = [line.strip() for line in split_lines(text)]
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


def prompt_words(prompt: str) -> str:
    """``'its first words...'``: a prompt named in a message by how it begins."""
    return f"'{' '.join(prompt[:40].split())}...'"


def prompt_opening(index: int, prompt: str) -> str:
    """``prompt N ('its first words...')``: how a message points at one prompt of a set (0-based ``index``)."""
    return f"prompt {index + 1} ({prompt_words(prompt)})"


def check_disjoint(sets: Sequence[tuple[str, Sequence[str]]]) -> None:
    """One line when a prompt is in two of the named ``(label, prompts)`` sets.

    Compared as text, spacing and case aside. Why: a prompt cannot be both refused and answered,
    or both removed and kept; one file given for two roles fitted a vector of zeros, or of
    rounding noise at full length, with exit 0."""
    from rs_local.errors import RsLocalError

    seen: dict[str, int] = {}
    for index, (label, prompts) in enumerate(sets):
        for p in prompts:
            key = " ".join(p.split()).casefold()
            other = seen.setdefault(key, index)
            if other != index:
                raise RsLocalError(f"{label}: overlaps {sets[other][0]}: both contain {' '.join(p[:60].split())!r}")


def prompts_hash(prompts: Sequence[str]) -> str:
    """Stable content hash of an ordered prompt list (for cache keys and provenance)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _read_text(path: Path) -> str:
    return read_text(path, what="prompt file", error=PromptSetError)


def _jsonl_records(path: Path, text: str) -> list[tuple[int, Any]]:
    return list(iter_jsonl(path, text, error=PromptSetError))


def _json_records(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = parse_json(text)
    except JsonProblem as exc:
        raise PromptSetError(path, f"line {exc.line}: {exc.message}" if exc.line else exc.message) from None
    if not isinstance(data, list):
        raise PromptSetError(path, f"expected a JSON list of strings or objects, found {json_type(data)}")
    # A JSON list carries no line numbers per item; report the item index instead.
    return [(i, item) for i, item in enumerate(data)]


def _matching(keys: list[str], name: str) -> str | None:
    """``name`` among ``keys``, exactly or else in another case when only one key matches that way.

    Why: JailbreakBench's CSV names its column ``Goal`` and AdvBench's ``goal``; the first was not
    found, and the message pointed at an option ``eval`` did not have."""
    if name in keys:
        return name
    folded = [k for k in keys if k.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def pick_field(path: Path, keys: Iterable[str], field: str | None, what: str = "field") -> str:
    """The requested field, or the first conventional one present (case aside); a clear error otherwise."""
    keys = [str(k) for k in keys]
    if field is not None:
        found = _matching(keys, field)
        if found is None:
            raise PromptSetError(path, f"no {what} '{field}' (found: {', '.join(keys) or 'none'})")
        return found
    for name in AUTO_FIELDS:  # exact names first: {"Text": label, "prompt": ...} keeps reading "prompt"
        if name in keys:
            return name
    for name in AUTO_FIELDS:
        found = _matching(keys, name)
        if found is not None:
            return found
    raise PromptSetError(
        path, f"no prompt {what} found (tried {', '.join(AUTO_FIELDS)}; found: {', '.join(keys) or 'none'}); "
              "name it with --field (--column)"
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
            if not isinstance(value, str):
                raise PromptSetError(path, f"{where} {pos}: field '{key}' is {json_type(value)}, expected text")
            out.append(value.strip())
        else:
            raise PromptSetError(path, f"{where} {pos}: expected text or an object, found {json_type(rec)}")
    return out


def _from_csv(path: Path, text: str, column: str | None) -> list[str]:
    """The chosen column of every row; a row of the wrong width or an unterminated quote names its line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = _csv_rows(path, reader)
    if not rows:
        raise PromptSetError(path, "no prompts in file")
    header = rows[0][1]
    col = header.index(pick_field(path, header, column, what="column"))
    out = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise PromptSetError(path, f"line {line}: {len(row)} field(s), the header has {len(header)}")
        out.append(row[col].strip())
    return out


def _csv_rows(path: Path, reader) -> list[tuple[int, list[str]]]:
    """``(first line, fields)`` per non-blank CSV record (a quoted field may span lines)."""
    rows, start = [], 1
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        if "end of data" in str(exc):
            raise PromptSetError(path, f"line {start}: unterminated quote (the quoted field runs to the end of the file)") from None
        raise PromptSetError(path, f"line {reader.line_num}: bad CSV ({exc})") from None
    return rows


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
        prompt, score = _score_row(path, pos, rec)
        scores[prompt] = score
    if not scores:
        raise PromptSetError(path, "no scores in file")
    return scores


def _score_row(path: Path, pos: int, rec: Any) -> tuple[str, float]:
    """One checked ``(prompt, score)``: text and a number in [-1, 1], nothing coerced."""
    if not isinstance(rec, dict):
        raise PromptSetError(path, f"line {pos}: expected an object with prompt and score, found {json_type(rec)}")
    prompt_key = next((k for k in SCORE_PROMPT_FIELDS if k in rec), None)
    score_key = next((k for k in SCORE_VALUE_FIELDS if k in rec), None)
    if prompt_key is None or score_key is None:
        raise PromptSetError(path, f"line {pos}: needs fields prompt (or text) and score (or c)")
    prompt, score = rec[prompt_key], rec[score_key]
    if not isinstance(prompt, str):
        raise PromptSetError(path, f"line {pos}: {prompt_key} is {json_type(prompt)}, expected text")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise PromptSetError(path, f"line {pos}: score {json.dumps(score, ensure_ascii=False)[:40]} is not a number")
    if not -1.0 - 1e-9 <= score <= 1.0 + 1e-9:
        raise PromptSetError(path, f"line {pos}: score {score} is outside [-1, 1]")
    return prompt.strip(), float(score)


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
