"""A seeded generator of malformed text inputs and CLI values, one class per kind of damage in issue 10.

Covers what :mod:`rs_local.files` and the numeric validator must stop: prompt files, scores
files, responses and labelled answer files, verdict logs and output paths that are broken in
each way the issue lists (deep JSON, huge integers, lone surrogates, NaN/Infinity, NUL bytes,
UTF-16, bad UTF-8, wrong JSON types, nulls, duplicates, truncated tails, CSV short rows and
open quotes, FIFOs, devices, oversized files), and option values (``nan``, ``inf``,
``1_0``, negative seeds, absurd contexts, loose layer ranges, ``PATH:SCALE`` oddities).

Every case is meant to fail before any model loads: the model options point at a file that
does not exist, so a case that were wrongly accepted fails with a message naming the model,
not what the case expects, and its test fails. Each :class:`Case` says which exit codes are
right (1: one-line error; 2: click usage error), which text the error must contain (the
user's file or the option), and, for file classes, a library call that must raise
``RsLocalError``. Same seed and index give the same case.

    cases = generate(n=300, seed=1, workdir=tmp)   # round robin over CLASSES
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

NO_MODEL = "/nonexistent/rs-local-fuzz-model.gguf"
CASE_SECONDS = 10.0
HEADER = {"rs_local_header": {"kind": "responses", "version": 1, "config": {"model": "m"}}}


@dataclass
class Case:
    """One malformed input: run ``argv`` through the CLI (and ``lib`` through the library)."""

    cls: str
    name: str
    argv: list[str]
    names: str | tuple[str, ...]  # text the error must contain (any of): the user's path or the option
    exits: tuple[int, ...] = (1,)
    lib: tuple[str, str] | None = None  # ("module:function", path): must raise RsLocalError (picklable, for workers)
    workdir: Path | None = None
    needs_fifo: bool = False
    notes: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The case's directory (``<class>-<index>``), which names it in reports."""
        return Path(self.workdir or self.cls)


# ----------------------------------------------------------------------------- helpers


def _row_text(rng: random.Random) -> str:
    words = ["tell", "me", "about", "the", "weather", "in", "Paris", "how", "do", "I", "sort", "a", "list", "été", "日本"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "?"


def _valid_prompt_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"prompt": f"{_row_text(rng)} #{i}"} for i in range(n)]


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _deep(rng: random.Random) -> str:
    depth = rng.choice([101, 500, 1000, 3000, 20000])
    inner = rng.choice(['"x"', "1", "null", "{}"])
    if rng.random() < 0.5:
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def _prompt_command(rng: random.Random, d: Path, path: Path) -> list[str]:
    """A command that reads ``path`` as a prompt file before any model loads."""
    choice = rng.randrange(3)
    if choice == 0:
        return ["respond", "--prompts", str(path), "--model", NO_MODEL, "-o", str(d / "out.jsonl")]
    if choice == 1:
        return ["eval", "--set", f"x={path}", "--vector", str(d / "none.gguf"), "--model", NO_MODEL, "-o", str(d / "ev")]
    return ["fit", "--positive", str(path), "--negative", str(path), "--model", NO_MODEL, "-o", str(d / "v.gguf")]


def _prompt_case(cls: str, name: str, rng: random.Random, d: Path, path: Path) -> Case:
    return Case(cls, name, _prompt_command(rng, d, path), str(path), lib=("rs_local.prompts:load_prompts", str(path)))


def _suffix(rng: random.Random, allowed: tuple[str, ...] = (".jsonl", ".json")) -> str:
    return rng.choice(allowed)


def _as_prompt_file(rng: random.Random, d: Path, bad_value_json: str) -> Path:
    """Valid prompt rows with one row carrying ``bad_value_json`` (JSON text) somewhere."""
    rows = [json.dumps(r, ensure_ascii=False) for r in _valid_prompt_rows(rng, rng.randint(1, 6))]
    rows.insert(rng.randint(0, len(rows)), bad_value_json)
    suffix = _suffix(rng)
    if suffix == ".jsonl":
        return _write(d / f"p{suffix}", "\n".join(rows) + "\n")
    return _write(d / f"p{suffix}", "[" + ",\n".join(rows) + "]")


# ----------------------------------------------------------------------------- prompt files


def prompt_deep_json(rng: random.Random, d: Path) -> Case:
    deep = _deep(rng)
    path = _as_prompt_file(rng, d, '{"prompt": ' + deep + "}" if rng.random() < 0.5 else deep)
    return _prompt_case("prompt_deep_json", "nested", rng, d, path)


def prompt_big_number(rng: random.Random, d: Path) -> Case:
    digits = rng.choice([101, 4301, 5000, 100000])
    value = rng.choice(["-", ""]) + "9" * digits
    if rng.random() < 0.3:
        value = "1e" + "9" * rng.choice([3, 5, 400])  # overflows to infinity
    path = _as_prompt_file(rng, d, '{"prompt": "x", "n": ' + value + "}")
    return _prompt_case("prompt_big_number", f"{len(value)} chars", rng, d, path)


def prompt_surrogate(rng: random.Random, d: Path) -> Case:
    code = rng.choice(["d800", "dbff", "dc00", "dfff", "DABC"])
    text = json.dumps(_row_text(rng), ensure_ascii=False)[1:-1]  # no escapes: any cut point is safe
    cut = rng.randint(0, len(text))
    value = text[:cut] + "\\u" + code + text[cut:]
    if rng.random() < 0.3:
        value = "\\ud83d\\ude00" + value  # a valid pair next to the lone one
    path = _as_prompt_file(rng, d, '{"prompt": "' + value + '"}')
    return _prompt_case("prompt_surrogate", code, rng, d, path)


def prompt_bad_literal(rng: random.Random, d: Path) -> Case:
    lit = rng.choice(["NaN", "Infinity", "-Infinity", "nan", "undefined", "True", "None", "0x10", "+1", ".5", "01"])
    path = _as_prompt_file(rng, d, '{"prompt": "x", "w": ' + lit + "}")
    return _prompt_case("prompt_bad_literal", lit, rng, d, path)


def prompt_wrong_type(rng: random.Random, d: Path) -> Case:
    value = rng.choice(["null", "1", "1.5", "true", "false", "[]", '["a"]', "{}", '{"text": "a"}'])
    line = '{"prompt": ' + value + "}"
    if rng.random() < 0.3:
        line = value if value not in ("{}", '{"text": "a"}') else "7"  # a bare non-text row
    path = _as_prompt_file(rng, d, line)
    return _prompt_case("prompt_wrong_type", value, rng, d, path)


def prompt_encoding(rng: random.Random, d: Path) -> Case:
    text = "\n".join(r["prompt"] for r in _valid_prompt_rows(rng, rng.randint(1, 5))) + "\n"
    kind = rng.choice(["utf16le", "utf16be", "utf16bom", "utf32", "nul", "nul_only", "bad_byte", "surrogate_bytes",
                       "overlong", "latin1"])
    data = {
        "utf16le": lambda: text.encode("utf-16-le"),
        "utf16be": lambda: text.encode("utf-16-be"),
        "utf16bom": lambda: text.encode("utf-16"),
        "utf32": lambda: text.encode("utf-32"),
        "nul": lambda: _insert(rng, text.encode(), b"\x00"),
        "nul_only": lambda: b"\x00" * rng.randint(1, 4096),
        "bad_byte": lambda: _insert(rng, text.encode(), bytes([rng.choice([0x80, 0xBF, 0xC0, 0xF5, 0xFF])])),
        "surrogate_bytes": lambda: _insert(rng, text.encode(), b"\xed\xa0\x80"),
        "overlong": lambda: _insert(rng, text.encode(), b"\xc0\xaf"),
        "latin1": lambda: "café crème\n".encode("latin-1"),
    }[kind]()
    path = _write(d / f"p{_suffix(rng, ('.txt', '.jsonl', '.csv'))}", data)
    return _prompt_case("prompt_encoding", kind, rng, d, path)


def _insert(rng: random.Random, data: bytes, piece: bytes) -> bytes:
    cut = rng.randint(0, len(data))
    return data[:cut] + piece + data[cut:]


def prompt_bad_json(rng: random.Random, d: Path) -> Case:
    rows = _valid_prompt_rows(rng, rng.randint(2, 6))
    if rng.random() < 0.5:
        lines = [json.dumps(r) for r in rows]
        i = rng.randrange(len(lines))
        lines[i] = lines[i][: rng.randint(1, len(lines[i]) - 1)]
        path = _write(d / "p.jsonl", "\n".join(lines) + rng.choice(["\n", ""]))
    else:
        doc = json.dumps(rows)
        path = _write(d / "p.json", doc[: rng.randint(1, len(doc) - 1)])
    return _prompt_case("prompt_bad_json", path.suffix, rng, d, path)


def prompt_csv(rng: random.Random, d: Path) -> Case:
    n = rng.randint(2, 6)
    lines = ["prompt,category"] + [f"{_row_text(rng)} {i},c{i}" for i in range(n)]
    i = rng.randint(1, n)
    kind = rng.choice(["short", "long", "open_quote", "quote_then_text"])
    if kind == "short":
        lines[i] = lines[i].split(",")[0]
    elif kind == "long":
        lines[i] += ",extra"
    elif kind == "open_quote":
        lines[i] = '"' + lines[i]
    else:
        lines[i] = '"quoted"x,c'
    path = _write(d / "p.csv", "\r\n".join(lines) + "\r\n")
    return _prompt_case("prompt_csv", kind, rng, d, path)


def prompt_empty(rng: random.Random, d: Path) -> Case:
    kind = rng.choice(["empty", "blank", "bom_only", "empty_list", "blank_strings", "header_only"])
    suffix = {"empty_list": ".json", "blank_strings": ".jsonl", "header_only": ".csv"}.get(kind, ".txt")
    data = {"empty": b"", "blank": b"\n \n\t\n", "bom_only": b"\xef\xbb\xbf", "empty_list": b"[]",
            "blank_strings": b'"  "\n""\n', "header_only": b"prompt\n"}[kind]
    path = _write(d / f"p{suffix}", data)
    return _prompt_case("prompt_empty", kind, rng, d, path)


def prompt_special_file(rng: random.Random, d: Path) -> Case:
    kind = rng.choice(["fifo", "dir", "dev_zero", "oversize", "missing", "dangling_link"])
    if kind == "fifo":
        path = d / "p.txt"
        os.mkfifo(path)
    elif kind == "dir":
        path = d / "p.jsonl"
        path.mkdir()
    elif kind == "dev_zero":
        path = d / "p.txt"
        os.symlink("/dev/zero", path)
    elif kind == "oversize":
        path = d / "p.txt"
        with open(path, "wb") as f:
            f.truncate(300 * 2**20)  # sparse: no disk used, but over the size limit
    elif kind == "missing":
        path = d / "nothing.txt"
    else:
        path = d / "p.txt"
        os.symlink(d / "gone.txt", path)
    case = _prompt_case("prompt_special_file", kind, rng, d, path)
    case.needs_fifo = kind == "fifo"
    case.exits = (1, 2)  # click's own Path type may refuse a directory first (exit 2)
    return case


# ----------------------------------------------------------------------------- scores files


def scores_bad(rng: random.Random, d: Path) -> Case:
    rows = [json.dumps({"prompt": f"p{i}", "score": rng.choice([-0.9, 0.8])}) for i in range(rng.randint(1, 5))]
    bad = rng.choice([
        '{"prompt": "a", "score": NaN}', '{"prompt": "a", "score": Infinity}', '{"prompt": "a", "score": -Infinity}',
        '{"prompt": "a", "score": 1e999}', '{"prompt": "a", "score": "0.5"}', '{"prompt": "a", "score": true}',
        '{"prompt": null, "score": 0.5}', '{"prompt": 5, "score": 0.5}', '{"prompt": "a", "score": 1.5}',
        '{"prompt": "a", "score": null}', '{"prompt": "a", "score": [0.5]}', '["a", 0.5]',
        '{"prompt": "a", "score": ' + "9" * 5000 + "}", '{"prompt": "a", "c": ' + _deep(rng) + "}",
        '{"text": "\\udc80", "score": 0.5}',
    ])
    rows.insert(rng.randint(0, len(rows)), bad)
    path = _write(d / "scores.jsonl", "\n".join(rows) + "\n")
    argv = ["fit", "--scores", str(path), "--model", NO_MODEL, "-o", str(d / "v.gguf")]
    return Case("scores_bad", bad[:40], argv, str(path), lib=("rs_local.prompts:load_scores", str(path)))


# ----------------------------------------------------------------------------- responses / labelled / verdicts


def _responses(rng: random.Random, n: int) -> list[dict]:
    return [{"prompt": f"question {i // 2}?", "sample": i % 2, "response": rng.choice(["I can't help.", "Sure: here."]) + f" {i}",
             "mean_logprob": -0.1 * (i + 1)} for i in range(n)]


def responses_bad(rng: random.Random, d: Path) -> Case:
    rows = _responses(rng, rng.randint(2, 6))
    lines = [json.dumps(r) for r in rows]
    headed = rng.random() < 0.5
    kind = rng.choice(["null_prompt", "num_response", "sample_text", "sample_negative", "sample_float", "sample_bool",
                       "lp_nan", "lp_inf", "lp_text", "lp_huge", "duplicate", "prompt_id_num", "deep", "surrogate",
                       "truncated_tail", "list_row", "broken_middle"])
    i = rng.randrange(len(lines))
    edit = {
        "null_prompt": lambda r: r.replace('"prompt": "question', '"prompt": null, "x": "'),
        "num_response": lambda r: r.replace('"response": "', '"response": 7, "y": "'),
        "sample_text": lambda r: r.replace('"sample": ', '"sample": "x", "s": '),
        "sample_negative": lambda r: r.replace('"sample": ', '"sample": -1, "s": '),
        "sample_float": lambda r: r.replace('"sample": ', '"sample": 1.5, "s": '),
        "sample_bool": lambda r: r.replace('"sample": ', '"sample": true, "s": '),
        "lp_nan": lambda r: r.replace('"mean_logprob": ', '"mean_logprob": NaN, "m": '),
        "lp_inf": lambda r: r.replace('"mean_logprob": ', '"mean_logprob": -Infinity, "m": '),
        "lp_text": lambda r: r.replace('"mean_logprob": ', '"mean_logprob": "high", "m": '),
        "lp_huge": lambda r: r.replace('"mean_logprob": ', '"mean_logprob": 1e400, "m": '),
        "prompt_id_num": lambda r: "{" + '"prompt_id": 12, ' + r[1:],
        "deep": lambda r: "{" + '"meta": ' + _deep(rng) + ", " + r[1:],
        "surrogate": lambda r: r.replace('"response": "', '"response": "\\ud800'),
        "list_row": lambda r: "[1, 2]",
        "broken_middle": lambda r: r[: len(r) // 2],
    }
    if kind == "duplicate":
        lines.insert(rng.randint(i + 1, len(lines)), lines[i])
    elif kind == "truncated_tail":
        headed = True
        lines[-1] = lines[-1][: rng.randint(1, len(lines[-1]) - 1)]
    elif kind == "broken_middle":
        lines.append(json.dumps(rows[0] | {"sample": 9}))
        lines[i] = edit[kind](lines[i])
    else:
        lines[i] = edit[kind](lines[i])
    if headed:
        lines.insert(0, json.dumps(HEADER))
    end = "" if kind == "truncated_tail" else "\n"
    path = _write(d / "responses.jsonl", "\n".join(lines) + end)
    argv = ["judge", str(path), "--judge", "keywords", "-o", str(d / "scores.jsonl")]
    return Case("responses_bad", kind, argv, str(path), lib=("rs_local.judge.judging:load_responses", str(path)))


def labelled_bad(rng: random.Random, d: Path) -> Case:
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "refusal": bool(i % 2)} for i in range(rng.randint(2, 5))]
    kind = rng.choice(["refusal_text", "refusal_null", "type_num", "category_list", "duplicate", "prompt_null", "nan"])
    i = rng.randrange(len(rows))
    lines = [json.dumps(r) for r in rows]
    if kind == "duplicate":
        lines.append(lines[i])
    elif kind == "nan":
        lines[i] = lines[i][:-1] + ', "w": NaN}'
    else:
        patch = {"refusal_text": {"refusal": "yes"}, "refusal_null": {"refusal": None}, "type_num": {"refusal": True, "refusal_type": 3},
                 "category_list": {"category": ["a"]}, "prompt_null": {"prompt": None}}[kind]
        lines[i] = json.dumps(rows[i] | patch)
    path = _write(d / "labelled.jsonl", "\n".join(lines) + "\n")
    argv = ["judge-eval", str(path), "--judge", "keywords"]
    return Case("labelled_bad", kind, argv, str(path), lib=("rs_local.judge.judge_eval:load_labelled", str(path)))


def verdicts_foreign(rng: random.Random, d: Path) -> Case:
    """``judge --verdicts FILE`` (or an existing default log) that is not a verdicts log: refused, every byte kept."""
    responses = _write(d / "responses.jsonl", _jsonl(_responses(rng, 4)))
    kind = rng.choice(["notes_no_newline", "notes", "other_kind", "bad_row", "deep", "partial_only", "binary"])
    content = {
        "notes_no_newline": "my precious notes\nlast line without newline",
        "notes": "my notes\n",
        "other_kind": json.dumps(HEADER) + "\n" + '{"prompt": "a"}\n{"half',
        "bad_row": json.dumps({"rs_local_header": {"kind": "verdicts", "version": 1, "config": {}}}) + "\n"
                   + '{"prompt_id": 5, "sample": "x"}\n{"trunc',
        "deep": _deep(rng) + "\n",
        "partial_only": '{"precious": "no newline at all"',
        "binary": "\x00\x01\x02 not text",
    }[kind]
    default = rng.random() < 0.5
    out = d / "scores.jsonl"
    verdicts = d / "scores.verdicts.jsonl" if default else d / "notes.txt"
    _write(verdicts, content)
    argv = ["judge", str(responses), "--judge", "keywords", "-o", str(out)] + ([] if default else ["--verdicts", str(verdicts)])
    return Case("verdicts_foreign", kind + (" default" if default else ""), argv, str(verdicts))


def scores_second_run(rng: random.Random, d: Path) -> Case:
    """An existing scores file from another run: never replaced without --force."""
    responses = _write(d / "responses.jsonl", _jsonl(_responses(rng, 4)))
    out = _write(d / "scores.jsonl", '{"prompt": "old", "score": 0.5}\n')
    if rng.random() < 0.5:
        _write(d / "scores.verdicts.jsonl", json.dumps({"rs_local_header": {"kind": "verdicts", "version": 1, "config": {}}}) + "\n")
    argv = ["judge", str(responses), "--judge", "keywords", "-o", str(out)]
    return Case("scores_second_run", "existing scores", argv, str(out))


# ----------------------------------------------------------------------------- output paths


def output_path(rng: random.Random, d: Path) -> Case:
    prompts = _write(d / "p.txt", "a\nb\n")
    responses = _write(d / "responses.jsonl", _jsonl(_responses(rng, 2)))
    kind = rng.choice(["missing_dir", "is_dir", "exists", "parent_is_file", "dev_null"])
    if kind == "missing_dir":
        target = d / "no" / "such" / "out.npz"
    elif kind == "is_dir":
        target = d / "adir.npz"
        target.mkdir()
    elif kind == "exists":
        target = _write(d / "out.npz", "precious\n")
    elif kind == "parent_is_file":
        target = d / "p.txt" / "out.npz"
    else:
        target = Path("/dev/null")
    cmd = rng.choice(["fit", "respond", "judge", "isolate", "eval", "convert"])
    force = ["--force"] if kind == "dev_null" else []
    if cmd == "fit":
        argv = ["fit", "-p", str(prompts), "-n", str(prompts), "--model", NO_MODEL, "-o", str(target)] + force
    elif cmd == "respond":
        argv = ["respond", "--prompts", str(prompts), "--model", NO_MODEL, "-o", str(target if kind != "exists" else d / "adir2")] + force
        if kind == "exists":  # an existing log is resumed, so use a directory instead
            (d / "adir2").mkdir()
            target = d / "adir2"
    elif cmd == "judge":
        argv = ["judge", str(responses), "--judge", "keywords", "-o", str(target)] + force
    elif cmd == "isolate":
        argv = ["isolate", "-t", str(prompts), "-k", str(prompts), "--harmless", str(prompts), "--model", NO_MODEL,
                "-o", str(target)] + force
    elif cmd == "eval":
        vec = _vector(d)
        argv = ["eval", "--vector", str(vec), "--set", f"a={prompts}", "--model", NO_MODEL, "-o", str(target)] + force
    else:
        argv = ["convert", str(_vector(d)), str(target)] + force
    return Case("output_path", f"{cmd} {kind}", argv, str(target), exits=(1, 2))


def _vector(d: Path, blocks: tuple[int, ...] = (4, 5, 6)) -> Path:
    import numpy as np

    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.vectors.control_vector import ControlVector

    path = d / "v.gguf"
    if not path.exists():
        rs = np.random.default_rng(0)
        write_control_vector(ControlVector({b: rs.normal(size=8) for b in blocks}, "llama", {"path": "/etc/other.gguf"}), path)
    return path


# ----------------------------------------------------------------------------- CLI values

_FLOATS_BAD = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400", "1_0", "0x10", "", " ", "1.5.2", "--", "1e", "٣"]


def cli_value(rng: random.Random, d: Path) -> Case:
    gen = ["generate", "hi", "--model", NO_MODEL]
    choice = rng.choice(["scale", "temperature", "top_p", "seed", "ctx", "max_tokens", "threads", "ngl", "text"])
    if choice == "text":  # undecodable argv bytes arrive as lone surrogates
        bad = rng.choice(["\udced\udca0\udc80", "ok \udcff", "\ud800"])
        if rng.random() < 0.5:
            return Case("cli_value", "PROMPT surrogate", ["generate", bad, "--model", NO_MODEL], "PROMPT", exits=(2,))
        return Case("cli_value", "--system surrogate", gen + ["--system", bad], "--system", exits=(2,))
    value, option = {
        "scale": lambda: (rng.choice(_FLOATS_BAD + ["1e308", "-5000"]), "--scale"),
        "temperature": lambda: (rng.choice(_FLOATS_BAD + ["-1", "1e308"]), "--temperature"),
        "top_p": lambda: (rng.choice(_FLOATS_BAD + ["1.5", "-0.1"]), "--top-p"),  # 0 is greedy, as in OpenAI's API
        "seed": lambda: (rng.choice(["-1", str(2**32), str(2**64), "1_0", "1.5", "nan", "1e3"]), "--seed"),
        "ctx": lambda: (rng.choice(["1000000000", "99999999999999999999", "0", "-5", "1e9", "2000000"]), "--ctx"),
        "max_tokens": lambda: (rng.choice(["0", "-1", str(2**40), "nan", "1_0"]), "--max-tokens"),
        "threads": lambda: (rng.choice(["0", "-2", "100000"]), "--threads"),
        "ngl": lambda: (rng.choice(["-2", "1000000000"]), "--n-gpu-layers"),
    }[choice]()
    return Case("cli_value", f"{option} {value!r}", gen + [option, value], option, exits=(2,))


def cli_layers(rng: random.Random, d: Path) -> Case:
    value = rng.choice(["-1", "8-", "", "8,20", "20-8", "٣-٥", "1-99999999999", "a-b", "8--9", " - ", "-", "8-12-16", "0x8"])
    cmd = rng.choice(["generate", "eval", "sweep"])
    vec = _vector(d)
    if cmd == "generate":
        argv = ["generate", "hi", "--model", NO_MODEL, "--vector", str(vec), "--layers", value]
    elif cmd == "eval":
        argv = ["eval", "--vector", str(vec), "--set", "harmless", "--model", NO_MODEL, "-o", str(d / "ev"), "--layers", value]
    else:
        argv = ["sweep", "--vector", str(vec), "--set", "harmless", "--target", "harmless", "--model", NO_MODEL,
                "-o", str(d / "sw"), "--bands", value]
    return Case("cli_layers", f"{cmd} {value!r}", argv, ("layer range", "selects none"), exits=(1, 2))


def cli_vector_spec(rng: random.Random, d: Path) -> Case:
    vec = _vector(d)
    kind = rng.choice(["scale", "miss", "empty"])
    if kind == "scale":
        tail = rng.choice(["1_0", "nan", "inf", "-inf", "1e999", "1e308", "0x1", "NaN", "Infinity", "1.2.3"])
        spec, names = f"{vec}:{tail}", f"{vec}:{tail}"
    elif kind == "miss":
        spec, names = str(vec), "selects none"
    else:
        spec, names = "", "--vector"
    argv = ["generate", "hi", "--model", NO_MODEL, "--vector", spec]
    if kind == "miss":
        argv += ["--layers", rng.choice(["7-9", "1-3", "20-23", "0"])]
    return Case("cli_vector_spec", f"{kind} {spec[-12:]!r}", argv, names if kind != "scale" else str(vec))


def cli_list_value(rng: random.Random, d: Path) -> Case:
    vec = _vector(d)
    base = ["--vector", str(vec), "--set", "harmless", "--model", NO_MODEL, "-o", str(d / "ev")]
    choice = rng.choice(["scales", "keep_frac", "max_kl", "step", "timeout", "refused", "retries", "lambda", "holdout", "demo_scales"])
    if choice == "scales":
        value = rng.choice(["nan", "0,,1", "", "inf", "1_0,2", "1e999", "0,-1,", "abc", "0;1", "5000"])
        return Case("cli_list_value", f"--scales {value!r}", ["eval", *base, "--scales", value], "--scales", exits=(2,))
    if choice == "demo_scales":
        value = rng.choice(["nan", "", "inf,0", "1_0"])
        return Case("cli_list_value", f"demo --scales {value!r}", ["demo", "--model", NO_MODEL, "-o", str(d / "demo"),
                                                                 "--scales", value], "--scales", exits=(2,))
    if choice in ("keep_frac", "max_kl", "step"):
        option = {"keep_frac": "--keep-frac", "max_kl": "--max-kl", "step": "--step"}[choice]
        argv = ["sweep", *base, "--target", "harmless", option, rng.choice(_FLOATS_BAD + ["-1", "2"] if choice == "keep_frac" else _FLOATS_BAD)]
        return Case("cli_list_value", f"{option} {argv[-1]!r}", argv, option, exits=(2,))
    if choice in ("timeout", "refused", "retries"):
        option = {"timeout": "--timeout", "refused": "--refused-above", "retries": "--retries"}[choice]
        value = {"timeout": lambda: rng.choice(_FLOATS_BAD + ["1e400", "0", "-1"]),
                 "refused": lambda: rng.choice(_FLOATS_BAD + ["2", "-1.5"]),
                 "retries": lambda: rng.choice(["1_0", "-1", "nan", "1.5"])}[choice]()
        responses = _write(d / "responses.jsonl", _jsonl(_responses(rng, 2)))
        argv = ["judge", str(responses), "--judge", "keywords", "-o", str(d / "s.jsonl"), option, value]
        return Case("cli_list_value", f"{option} {value!r}", argv, option, exits=(2,))
    prompts = _write(d / "p.txt", "a\nb\n")
    option = "--lambda" if choice == "lambda" else "--holdout"
    value = rng.choice(["nan", "inf", "-1", "1_0", "0", "1e999"]) if choice == "lambda" else rng.choice(_FLOATS_BAD + ["0.95", "-0.1"])
    argv = ["fit", "-p", str(prompts), "-n", str(prompts), "--model", NO_MODEL, "-o", str(d / "v2.gguf"), option, value]
    return Case("cli_list_value", f"{option} {value!r}", argv, option, exits=(2,))


CLASSES: dict[str, Callable[[random.Random, Path], Case]] = {
    "prompt_deep_json": prompt_deep_json,
    "prompt_big_number": prompt_big_number,
    "prompt_surrogate": prompt_surrogate,
    "prompt_bad_literal": prompt_bad_literal,
    "prompt_wrong_type": prompt_wrong_type,
    "prompt_encoding": prompt_encoding,
    "prompt_bad_json": prompt_bad_json,
    "prompt_csv": prompt_csv,
    "prompt_empty": prompt_empty,
    "prompt_special_file": prompt_special_file,
    "scores_bad": scores_bad,
    "responses_bad": responses_bad,
    "labelled_bad": labelled_bad,
    "verdicts_foreign": verdicts_foreign,
    "scores_second_run": scores_second_run,
    "output_path": output_path,
    "cli_value": cli_value,
    "cli_layers": cli_layers,
    "cli_vector_spec": cli_vector_spec,
    "cli_list_value": cli_list_value,
}


def make_case(cls: str, seed: int, index: int, workdir: Path) -> Case:
    """Case ``index`` of class ``cls`` in its own directory under ``workdir`` (deterministic)."""
    d = Path(workdir) / f"{cls}-{index}"
    d.mkdir(parents=True, exist_ok=False)
    rng = random.Random(f"{seed}:{cls}:{index}")
    case = CLASSES[cls](rng, d)
    case.workdir = d
    return case


def generate(n: int, seed: int, workdir: Path, classes: list[str] | None = None) -> list[Case]:
    """``n`` cases, round robin over ``classes`` (default: all)."""
    names = classes or list(CLASSES)
    return [make_case(names[i % len(names)], seed, i, workdir) for i in range(n)]


# ----------------------------------------------------------------------------- oracles


class CaseTimeout(Exception):
    """A case ran past its deadline (a hang on a FIFO or a device would end here)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt a case that runs (or blocks in a syscall) past ``seconds``."""

    def handler(signum, frame):
        raise CaseTimeout(f"case ran past {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (size and mtime for huge sparse ones); special files by type."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                out[str(p)] = f"special {stat.S_IFMT(st.st_mode)}"
            elif st.st_size > 64 * 2**20:
                out[str(p)] = f"size {st.st_size} mtime {st.st_mtime_ns}"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _names(case: Case) -> tuple[str, ...]:
    return case.names if isinstance(case.names, tuple) else (case.names,)


def check_cli(case: Case, exit_code: int, stderr: str, output: str, exception: BaseException | None,
              seconds: float) -> list[str]:
    """Every way the CLI outcome of ``case`` breaks the issue's rules (empty when it is right)."""
    problems = []
    if exception is not None and not isinstance(exception, SystemExit):
        problems.append(f"raised {type(exception).__name__}: {exception}"[:300])
    if "Traceback" in output or "Traceback" in stderr:
        problems.append("traceback in the output")
    if exit_code not in case.exits:
        problems.append(f"exit {exit_code}, expected {case.exits}: {output.strip()[-300:]!r}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if exit_code == 1 and (len(lines) != 1 or not lines[0].startswith("Error: ")):
        problems.append(f"not one 'Error:' line on stderr: {stderr[-300:]!r}")
    if exit_code in (1, 2) and not any(n in stderr for n in _names(case)):
        problems.append(f"error does not name {_names(case)}: {stderr[-300:]!r}")
    if ".tmp" in stderr:
        problems.append("error names a temp file")
    if seconds > CASE_SECONDS:
        problems.append(f"took {seconds:.1f} s")
    return problems


def check_library(case: Case) -> list[str]:
    import importlib

    from rs_local.errors import RsLocalError

    if case.lib is None:
        return []
    module, _, name = case.lib[0].partition(":")
    try:
        getattr(importlib.import_module(module), name)(case.lib[1])
    except RsLocalError as exc:
        msg = str(exc)
        if "\n" in msg or not any(n in msg for n in _names(case)):
            return [f"library error not one line naming {_names(case)}: {msg[:200]!r}"]
        return []
    except Exception as exc:  # noqa: BLE001 - the point is to catch every other kind
        return [f"library raised {type(exc).__name__}: {exc}"[:300]]
    return ["library accepted the input"]


def check_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Bytes lost in any pre-existing file, or a hidden temp file left behind."""
    problems = [f"{p} changed or vanished" for p, h in before.items() if after.get(p) != h]
    leftovers = [p for p in after if Path(p).name.startswith(".") and p.endswith(".tmp")]
    return problems + [f"temp file left: {p}" for p in leftovers]


def run_case(case: Case) -> list[str]:
    """Run one case through the CLI (in-process) and the library; every broken rule, or an empty list."""
    from click.testing import CliRunner

    from rs_local.cli.main import cli

    before = snapshot(case.workdir)
    start = time.monotonic()
    try:
        with deadline(CASE_SECONDS + 5):
            res = CliRunner().invoke(cli, case.argv, catch_exceptions=True)
    except CaseTimeout as exc:
        return [str(exc)]
    seconds = time.monotonic() - start
    problems = check_cli(case, res.exit_code, res.stderr, res.output, res.exception, seconds)
    try:
        with deadline(CASE_SECONDS):
            problems += check_library(case)
    except CaseTimeout as exc:
        problems.append(f"library: {exc}")
    problems += check_files(before, snapshot(case.workdir))
    return problems


def outcome_label(problems: list[str]) -> str:
    """One label per case in ``benchmarks/fuzz.py``'s vocabulary: ``clean error`` or the first rule broken."""
    if not problems:
        return "clean error"
    first = problems[0]
    if "raised" in first or "Traceback" in first or "traceback" in first:
        return "traceback"
    if "ran past" in first or first.startswith("took"):
        return "hang"
    if first.startswith("exit 0") or "accepted the input" in first:
        return "wrong verdict"
    return "bad error"
