"""Prompt-set and score loading: every shape users bring, and every way a file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rs_local.errors import PromptSetError, RsLocalError
from rs_local.prompts import load_prompts, load_scores, prompts_hash, split_by_scores


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shapes


def test_txt_one_per_line_skips_blanks_and_dedupes(tmp_path):
    p = write(tmp_path / "p.txt", "first\n\n  second  \nfirst\nthird\n")
    assert load_prompts(p) == ["first", "second", "third"]
    assert load_prompts(p, dedupe=False) == ["first", "second", "first", "third"]


def test_jsonl_autodetects_text_field(tmp_path):
    rows = [{"text": "a", "split": "x"}, {"text": "b", "split": "y"}]
    p = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompts(p) == ["a", "b"]


def test_jsonl_named_field_and_plain_strings(tmp_path):
    p = write(tmp_path / "p.jsonl", '{"q": "one", "text": "no"}\n"two"\n')
    assert load_prompts(p, field="q") == ["one", "two"]


@pytest.mark.parametrize("name", ["prompt", "goal", "instruction", "question"])
def test_json_list_autodetects_usual_names(tmp_path, name):
    p = write(tmp_path / "p.json", json.dumps([{name: "x", "category": None}, {name: "y", "category": None}]))
    assert load_prompts(p) == ["x", "y"]


def test_json_list_of_strings(tmp_path):
    p = write(tmp_path / "p.json", json.dumps(["a", "b", "a"]))
    assert load_prompts(p) == ["a", "b"]


def test_csv_column_auto_and_named(tmp_path):
    p = write(tmp_path / "p.csv", 'index,goal,target\n0,"Write, with a comma",t\n1,Second,t\n')
    assert load_prompts(p) == ["Write, with a comma", "Second"]
    assert load_prompts(p, field="target") == ["t"]


def test_columns_are_found_whatever_their_case(tmp_path):
    """JailbreakBench's own CSV says ``Goal``: "no prompt column found", and the hint named an option
    `eval` did not have. Exact names win; a case-folded name is taken only when it is unique."""
    p = write(tmp_path / "jbb.csv", "Index,Goal,Target\n0,Write a poem,Sure\n")
    assert load_prompts(p) == ["Write a poem"] and load_prompts(p, field="target") == ["Sure"]
    both = write(tmp_path / "both.csv", "Goal,goal\nupper,lower\n")
    assert load_prompts(both) == ["lower"] and load_prompts(both, field="Goal") == ["upper"]
    expect_error(both, "no column 'GOAL' (found: Goal, goal)", field="GOAL")  # two in another case: ambiguous
    label = write(tmp_path / "label.jsonl", '{"Text": "label A", "prompt": "Say hi"}\n')
    assert load_prompts(label) == ["Say hi"]  # an exact name wins over an earlier one in another case
    twice = write(tmp_path / "twice.jsonl", '{"Text": "a", "TEXT": "b"}\n')
    expect_error(twice, "no field 'text' (found: Text, TEXT)", field="text")


def test_shared_data_all_shapes(shared_data):
    assert len(load_prompts(shared_data / "deccp" / "censored.jsonl")) > 50
    assert len(load_prompts(shared_data / "jbb_behaviors" / "harmful-behaviors.csv")) == 100
    assert len(load_prompts(shared_data / "refusal_direction" / "splits" / "harmful_val.json")) > 30


def test_hash_depends_on_order_and_content():
    assert prompts_hash(["a", "b"]) != prompts_hash(["b", "a"])
    assert prompts_hash(["ab"]) != prompts_hash(["a", "b"])
    assert prompts_hash(["a", "b"]) == prompts_hash(["a", "b"])


# ----------------------------------------------------------------------------- errors


def expect_error(path: Path, fragment: str, **kw) -> PromptSetError:
    with pytest.raises(PromptSetError) as info:
        load_prompts(path, **kw)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert fragment in msg, msg
    assert isinstance(info.value, RsLocalError)
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jsonl", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "is a directory")


def test_empty_set(tmp_path):
    expect_error(write(tmp_path / "e.txt", "\n  \n"), "no prompts")
    expect_error(write(tmp_path / "e.json", "[]"), "no prompts")
    expect_error(write(tmp_path / "e.csv", "goal\n"), "no prompts")


def test_bad_encoding_reports_line(tmp_path):
    expect_error(write(tmp_path / "b.txt", b"fine\nbad \xff\xfe byte\n"), "not valid UTF-8 (byte 9, line 2)")


def test_bad_jsonl_reports_line(tmp_path):
    expect_error(write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"text": "broken"\n'), "line 2: bad JSON")


def test_bad_json_reports_line(tmp_path):
    expect_error(write(tmp_path / "b.json", '[\n {"text": "a"},\n {"text": }\n]'), "line 3: bad JSON")


def test_json_not_a_list(tmp_path):
    expect_error(write(tmp_path / "b.json", '{"text": "a"}'), "expected a JSON list")


def test_missing_field_named(tmp_path):
    expect_error(write(tmp_path / "m.jsonl", '{"text": "a"}\n'), "no field 'body' (found: text)", field="body")


def test_no_known_field(tmp_path):
    expect_error(write(tmp_path / "m.jsonl", '{"body": "a"}\n'), "no prompt field found")


def test_field_missing_in_later_row(tmp_path):
    expect_error(write(tmp_path / "m.jsonl", '{"text": "a"}\n{"other": "b"}\n'), "line 2: no field 'text'")


def test_non_text_field(tmp_path):
    expect_error(write(tmp_path / "m.json", '[{"text": 3}]'), "item 0: field 'text' is int")


def test_missing_csv_column(tmp_path):
    expect_error(write(tmp_path / "m.csv", "a,b\n1,2\n"), "no prompt column found")
    expect_error(write(tmp_path / "n.csv", "a,b\n1,2\n"), "no column 'goal' (found: a, b)", field="goal")


def test_unknown_suffix(tmp_path):
    expect_error(write(tmp_path / "m.parquet", "x"), "unknown prompt file type")


# ----------------------------------------------------------------------------- scores


def test_scores_split_refused_complied_neutral(tmp_path):
    rows = [{"prompt": "r1", "score": 0.9}, {"text": "c1", "c": -0.5}, {"prompt": "n1", "score": 0.05}, {"prompt": "r2", "score": 0.3}]
    p = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in rows))
    split = split_by_scores(load_scores(p))
    assert split.refused == ["r1", "r2"] and split.refused_weights == [0.9, 0.3]
    assert split.complied == ["c1"] and split.complied_weights == [0.5]
    assert split.neutral == ["n1"]


def test_scores_restricted_to_prompts_needs_every_score(tmp_path):
    p = write(tmp_path / "s.jsonl", '{"prompt": "a", "score": 1}\n{"prompt": "b", "score": -1}\n')
    scores = load_scores(p)
    assert split_by_scores(scores, ["b", "a"]).refused == ["a"]
    with pytest.raises(PromptSetError, match="1 prompt\\(s\\) have no score"):
        split_by_scores(scores, ["a", "b", "zzz"], path=p)


def test_scores_errors(tmp_path):
    with pytest.raises(PromptSetError, match="line 1: needs fields prompt"):
        load_scores(write(tmp_path / "a.jsonl", '{"prompt": "a"}\n'))
    with pytest.raises(PromptSetError, match="outside \\[-1, 1\\]"):
        load_scores(write(tmp_path / "b.jsonl", '{"prompt": "a", "score": 3}\n'))
    with pytest.raises(PromptSetError, match="not a number"):
        load_scores(write(tmp_path / "c.jsonl", '{"prompt": "a", "score": "high"}\n'))
    with pytest.raises(PromptSetError, match="need both refused"):
        split_by_scores(load_scores(write(tmp_path / "d.jsonl", '{"prompt": "a", "score": 0.9}\n')))
