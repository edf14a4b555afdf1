"""Plain answers to everyday (Alpaca) tasks for the judge's labelled set, and a held-out set of them.

Why: the first probe judge was trained only on answers to our political, harmful and
alarming-sounding prompts, and on the refusal-steering benchmark it called 47% of the plain
model's answers to held-out Alpaca tasks refusals: it had never seen an ordinary answer to an
ordinary task. This script generates such answers from Qwen2.5-Coder-0.5B (greedy, 64 tokens, no
system prompt), reading the refusal_direction Alpaca splits IN PLACE from ``../shared/data``:

* ``--set train``: 80 prompts sampled (seed 14) from ``harmless_train.json``. After they were
  read and labelled by hand, ``--merge`` appends them to judge_labelled.jsonl (condition
  ``everyday-plain``, ``split`` by :func:`make_judge_labelled.split_of`, so about 30% land in test).
* ``--set heldout``: 48 prompts sampled (seed 15) from ``harmless_val.json``, labelled by hand the
  same way and written to judge_everyday_heldout.jsonl (every row ``"split": "test"``: never
  trained on, never used to choose anything). ``judge_quality.py --labelled ... --split test``
  on it gives the overcall rate on everyday answers.

    python benchmarks/make_judge_everyday.py --set train --out /tmp/everyday_raw.jsonl
    python benchmarks/make_judge_everyday.py --merge /tmp/everyday_raw.jsonl --labels LABELS.json \
        [--into benchmarks/data/judge_labelled.jsonl | --heldout benchmarks/data/judge_everyday_heldout.jsonl]

``LABELS.json`` maps a raw id to ``[refusal, refusal_type or null, clear, note]``; every raw row
needs one (labels are given by a person who read the answer, never by a judge).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_judge_labelled import _answer, split_of

from rs_local import models
from rs_local.runtime.runner import Runner

HERE = Path(__file__).resolve().parent
SPLITS = HERE.parent.parent / "shared" / "data" / "refusal_direction" / "splits"
SETS = {"train": ("harmless_train.json", 80, 14, "ev"), "heldout": ("harmless_val.json", 48, 15, "evh")}
MAX_TOKENS = 64
CONDITION = "everyday-plain"


def plan(which: str, splits: Path = SPLITS) -> list[dict]:
    """The prompts of one set, in a fixed order (seeded sample of the Alpaca split)."""
    name, n, seed, tag = SETS[which]
    prompts = [r["instruction"] for r in json.loads((splits / name).read_text(encoding="utf-8"))]
    picked = random.Random(seed).sample(prompts, n)
    return [{"raw_id": f"{tag}-{i}", "category": "harmless", "condition": CONDITION, "system": None,
             "instruction": None, "temperature": 0.0, "seed": None, "prompt": p} for i, p in enumerate(picked)]


def generate(which: str, out: Path, threads: int | None) -> None:
    """Answer every prompt of the set not yet in ``out`` (appends; resumable)."""
    done = {json.loads(x)["raw_id"] for x in out.read_text().splitlines() if x.strip()} if out.exists() else set()
    runner = Runner(models.resolve("qwen2.5-coder-0.5b"), n_ctx=2048, n_threads=threads)
    import make_judge_labelled

    make_judge_labelled.MAX_TOKENS = MAX_TOKENS  # _answer reads the module's limit
    with open(out, "a", encoding="utf-8") as f:
        for cond in plan(which):
            if cond["raw_id"] in done:
                continue
            rec = {**cond, **_answer(runner, cond)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            print(rec["raw_id"], repr(rec["response"][:80]), flush=True)


def merge(raw: Path, labels: Path, into: Path | None, heldout: Path | None) -> None:
    """Attach hand labels to raw answers and append them to the labelled set (or write the held-out file)."""
    from rs_local.files.writing import atomic_output

    marks = json.loads(labels.read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in raw.read_text(encoding="utf-8").splitlines() if x.strip()]
    missing = [r["raw_id"] for r in rows if r["raw_id"] not in marks]
    if missing:
        raise SystemExit(f"{labels}: no label for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    target = into or heldout
    old = target.read_text(encoding="utf-8") if into and target.exists() else ""
    next_id = max((json.loads(x)["id"] for x in old.splitlines() if x.strip()), default=-1) + 1
    lines = []
    for i, r in enumerate(rows):
        refusal, rtype, clear, note = marks[r["raw_id"]]
        rid = next_id + i if into else r["raw_id"]
        lines.append(json.dumps({"id": rid, **{k: v for k, v in r.items() if k not in ("raw_id", "finish_reason")},
                                 "refusal": refusal, "refusal_type": rtype if refusal else None, "clear": clear,
                                 "note": note, "split": split_of(r["prompt"]) if into else "test",
                                 "raw_id": r["raw_id"]}, ensure_ascii=False))
    with atomic_output(target, force=True) as tmp:
        Path(tmp).write_text(old + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{target}: {len(lines)} rows written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default=None, help="Generate answers for this set.")
    ap.add_argument("--out", default=None, help="Raw answers (appended; resumable).")
    ap.add_argument("--merge", default=None, metavar="RAW", help="Raw answers to label and merge.")
    ap.add_argument("--labels", default=None, help="Hand labels for --merge (JSON: raw id -> [refusal, type, clear, note]).")
    ap.add_argument("--into", default=None, help="Append the labelled rows to this labelled set.")
    ap.add_argument("--heldout", default=None, help="Write the labelled rows to this held-out file instead.")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.merge:
        if not args.labels or bool(args.into) == bool(args.heldout):
            raise SystemExit("--merge needs --labels and exactly one of --into / --heldout")
        merge(Path(args.merge), Path(args.labels), Path(args.into) if args.into else None,
              Path(args.heldout) if args.heldout else None)
    elif args.set:
        generate(args.set, Path(args.out or f"/tmp/everyday_{args.set}_raw.jsonl"), args.threads)
    else:
        ap.error("give --set or --merge")


if __name__ == "__main__":
    main()
