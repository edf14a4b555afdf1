"""Judge quality: agreement with our hand-labelled answers, keyword baseline vs the local LLM judge, side by side.

The labelled set (benchmarks/data/judge_labelled.jsonl) holds real answers of
Qwen2.5-Coder-0.5B to our own political, harmful and harmless prompts, each read and labelled
by hand (refusal yes/no and refusal type); see make_judge_labelled.py for how they were made.
The soft refusal types (deflection, feigned ignorance, vagueness, redirection, ...) are where
an LLM judge has to earn its cost over keywords, so they get their own line.

    python benchmarks/judge_quality.py [--split test] [--probe FILE] [--also NAME=probe=OLD.gguf] [--no-llm] [--json out.json]

The probe judge (the default judge) is trained on the labelled rows marked "train"; its
figures only mean something on ``--split test`` (the default), rows it never saw.
Every judge also reads the 48 held-out everyday answers (judge_everyday_heldout.jsonl: plain
answers to Alpaca tasks, 46 of them real answers; see make_judge_everyday.py) and the table shows
how many real answers it calls refusals there: the overcalling a judge trained on sensitive
prompts shows on ordinary ones. ``--also`` adds more judges as columns (e.g. an earlier probe:
``git show f49d2e4:rs_local/data/judge-probe-qwen2.5-coder-0.5b.gguf > /tmp/probe_v1.gguf``).
Targets (issue 14): agreement >= 90%, soft-refusal recall >= 80%, precision >= 90%, and
100 answers judged in under a minute on 2 CPU cores.

How far two readers agree: all 605 labelled answers were read a second time, blind to the first labels and
to every judge, by a second reader with the same rubric (a separate AI-assistant session, like the first
labeller, given only prompt, answer and rubric; benchmarks/data/judge_second_reading.jsonl: id,
refusal, type, clear). The table's last rows give each judge's agreement on the answers both readers
label alike, and the line under it how often the two readers agree: the ceiling a judge can be held to.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rs_local.judge.backends import make_judge
from rs_local.judge.judge_eval import EvalResult, evaluate, load_labelled

HERE = Path(__file__).resolve().parent
LABELLED = HERE / "data" / "judge_labelled.jsonl"
EVERYDAY = HERE / "data" / "judge_everyday_heldout.jsonl"
SECOND = HERE / "data" / "judge_second_reading.jsonl"


def _pct(a: int, n: int) -> str:
    return f"{a}/{n} ({a / n:.0%})" if n else "-"


_CLEAR: list[bool] = []


def clear_agreement(result: EvalResult) -> float:
    """Agreement on the answers whose label we marked clear (``"clear": true``), ambiguous ones left out."""
    pairs = [(p, item) for p, item, clear in zip(result.predictions, _ITEMS, _CLEAR) if clear]
    agreed = sum((p > 0) == item.refusal and p != 0 for p, item in pairs)
    return agreed / len(pairs) if pairs else 0.0


_ITEMS: list = []
_CONDITIONS: list[str] = []
_SECOND: list[bool | None] = []  # the second reader's label per row (None: not read twice)
_EVERYDAY: dict = {}


def agreement_where(result: EvalResult, keep) -> str:
    """Agreement on the rows whose condition passes ``keep`` (e.g. the set before everyday answers were added)."""
    pairs = [(p, item) for p, item, c in zip(result.predictions, _ITEMS, _CONDITIONS) if keep(c)]
    agreed = sum((p > 0) == item.refusal and p != 0 for p, item in pairs)
    return f"{agreed / len(pairs):.1%} of {len(pairs)}" if pairs else "-"


def consensus_agreement(result: EvalResult) -> str:
    """Agreement on the rows both readers labelled alike (where the readers agree, what does the judge say)."""
    pairs = [(p, item) for p, item, second in zip(result.predictions, _ITEMS, _SECOND) if second == item.refusal]
    agreed = sum((p > 0) == item.refusal and p != 0 for p, item in pairs)
    return f"{agreed / len(pairs):.1%} of {len(pairs)}" if pairs else "-"


def readers_line() -> str:
    """How often the second reader agrees with the first, split by the first reader's clarity mark."""
    both = [(second, item.refusal, clear) for second, item, clear in zip(_SECOND, _ITEMS, _CLEAR) if second is not None]
    if not both:
        return "no second reading for these rows"
    same = sum(a == b for a, b, _ in both)
    unclear = [(a, b) for a, b, c in both if not c]
    return (f"second reader vs first: {same}/{len(both)} ({same / len(both):.1%}) agree; "
            f"on the {len(unclear)} labels the first marked unclear {sum(a == b for a, b in unclear)}, "
            f"on the clear ones {sum(a == b for a, b, c in both if c)}/{len(both) - len(unclear)}")


def load_second(path: str, raw: list[dict]) -> list[bool | None]:
    """The second reader's refusal label for each row of ``raw`` (by id), None where it has none."""
    if not path or not Path(path).is_file():
        return [None] * len(raw)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    labels = {r["id"]: bool(r["refusal"]) for r in rows}
    return [labels.get(r.get("id")) for r in raw]


def everyday_overcall(name: str) -> str:
    """Real answers among the held-out everyday ones that the judge called refusals."""
    r = _EVERYDAY.get(name)
    return _pct(r.fp, r.fp + r.tn + r.no_verdict_answer) if r else "-"


def side_by_side(results: dict[str, tuple[EvalResult, float]], console: Console) -> None:
    table = Table(title="judge vs human labels")
    table.add_column("figure")
    for name in results:
        table.add_column(name, justify="right")

    def row(label: str, fn) -> None:
        table.add_row(label, *[fn(r) for r, _ in results.values()])

    row("agreement (all)", lambda r: f"{r.agreement:.1%}")
    row("refusal precision", lambda r: f"{r.precision:.1%}")
    row("refusal recall", lambda r: f"{r.recall:.1%}")
    row("F1", lambda r: f"{r.f1:.3f}")
    row("soft refusals caught", lambda r: _pct(*r.soft_refusal_recall()))
    row("no verdict", lambda r: str(r.no_verdict_refusal + r.no_verdict_answer))
    types = sorted({t for r, _ in results.values() for t in r.by_type})
    for t in types:
        row(f"  label: {t}", lambda r, t=t: _pct(*r.by_type.get(t, [0, 0])))
    cats = sorted({c for r, _ in results.values() for c in r.by_category})
    for c in cats:
        row(f"  prompts: {c}", lambda r, c=c: _pct(*r.by_category.get(c, [0, 0])))
    table.add_row("answers/s", *[f"{r.n / s:.2f}" if s else "-" for r, s in results.values()])
    table.add_row("agreement (clear labels only)", *[f"{clear_agreement(r):.1%}" for r, _ in results.values()])
    row("agreement without everyday rows", lambda r: agreement_where(r, lambda c: c != "everyday-plain"))
    row("everyday rows (this split) kept", lambda r: agreement_where(r, lambda c: c == "everyday-plain"))
    table.add_row("held-out everyday answers called refusals", *[everyday_overcall(n) for n in results])
    row("agreement where both readers agree", consensus_agreement)
    console.print(table)
    console.print(readers_line())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", default=str(LABELLED))
    ap.add_argument("--judge", default="qwen2.5-coder-0.5b", help="Local judge model (name or GGUF path).")
    ap.add_argument("--limit", type=int, default=None, help="Only the first N labelled answers.")
    ap.add_argument("--step", type=int, default=1, help="Every STEP-th labelled answer (a quick stratified subset).")
    ap.add_argument("--split", choices=["all", "train", "test"], default="test",
                    help="Rows of this split (rows without one count as train).")
    ap.add_argument("--probe", default="probe", help="Probe judge: 'probe' (shipped) or probe=FILE.gguf.")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=JUDGE",
                    help="Another judge as a column, e.g. 'old probe=probe=/tmp/probe_v1.gguf' (repeatable).")
    ap.add_argument("--everyday", default=str(EVERYDAY), help="Held-out everyday answers ('' to skip).")
    ap.add_argument("--no-llm", action="store_true", help="Skip the (slow, weak) generative LLM judge.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--second", default=str(SECOND), help="A second reader's labels by id ('' to skip).")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the figures here.")
    args = ap.parse_args()
    raw = [json.loads(line) for line in Path(args.labelled).read_text().splitlines() if line.strip()]
    keep = [args.split == "all" or r.get("split", "train") == args.split for r in raw]
    items = [i for i, k in zip(load_labelled(args.labelled), keep) if k][:: args.step][: args.limit]
    raw = [r for r, k in zip(raw, keep) if k][:: args.step][: args.limit]
    _ITEMS[:] = items
    _CLEAR[:] = [bool(r.get("clear", True)) for r in raw]
    _CONDITIONS[:] = [str(r.get("condition", "")) for r in raw]
    _SECOND[:] = load_second(args.second, raw)
    everyday = load_labelled(args.everyday) if args.everyday else []
    console = Console()
    console.print(f"{len(items)} labelled answers, {sum(i.refusal for i in items)} refusals")
    results = {}
    judges = [("keywords", lambda: make_judge("keywords")),
              ("probe judge (default)", lambda: make_judge(args.probe, n_ctx=2048, n_threads=args.threads))]
    for spec in args.also:
        name, _, judge_spec = spec.partition("=")
        judges.append((name, lambda j=judge_spec: make_judge(j, n_ctx=2048, n_threads=args.threads)))
    if not args.no_llm:
        judges.append((f"LLM judge ({args.judge})", lambda: make_judge(args.judge, n_ctx=2048, n_threads=args.threads)))
    for name, build in judges:
        judge = build()  # model loads are not counted in answers/s
        t0 = time.perf_counter()
        result = evaluate(judge, items, progress=lambda d, t: print(f"  {name}: {d}/{t}", flush=True) if d % 20 == 0 else None)
        results[name] = (result, time.perf_counter() - t0)
        console.print(f"{name}: agreement {result.agreement:.1%}")
        if everyday:
            _EVERYDAY[name] = evaluate(judge, everyday)
    side_by_side(results, console)
    if args.json_out:
        out = {k: {**r.as_dict(), "answers_per_s": r.n / s if s else None,
                   "everyday_heldout": _EVERYDAY[k].as_dict() if k in _EVERYDAY else None,
                   "agreement_where_readers_agree": consensus_agreement(r)}
               for k, (r, s) in results.items()}
        out["readers"] = readers_line()
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
