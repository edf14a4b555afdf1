"""Probe-judge speed: the reader stopping at the answer's end against reading the whole judge text.

The shipped probe averages one block's output over the answer's tokens. Attention is causal, so
the judge text after the answer (the ~17-token verdict request and the template's tail) cannot
change those rows; the reader now stops at the answer's end. This measures what that saves, in
one run, passes alternating (ABBA) on one model load, on the hand-labelled answers, and checks
that both ways give the same P(refusal):

    python benchmarks/judge_speed.py [--n 100] [--repeat 2]

Target (issue 14): the default judge judges 100 answers in under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rs_local.judge.backends import make_judge
from rs_local.judge.judge_eval import load_labelled
from rs_local.judge.probe import MAX_ANSWER_CHARS, answer_marker, judge_messages
from rs_local.judge.probe_read import answer_span

HERE = Path(__file__).resolve().parent
LABELLED = HERE / "data" / "judge_labelled.jsonl"


def whole_text_p(judge, prompt: str, answer: str) -> float:
    """P(refusal) read the old way: every token of the judge text evaluated, the answer's rows averaged."""
    runner, pf = judge.runner, judge.pf
    tokens, lo, hi = answer_span(runner, judge_messages(prompt, answer), answer_marker(prompt), answer[:MAX_ANSWER_CHARS])
    rows = judge.reader.read_rows(tokens, lo, len(tokens))[pf.layer][: hi - lo]
    return float(pf.probe.prob(rows.mean(axis=0)))


def one_pass(judge, items, whole: bool) -> tuple[float, list[float], int]:
    """Seconds, P(refusal) per answer and tokens evaluated for one pass over ``items`` (cache cleared first)."""
    judge.reader._cached = []
    before = judge.reader.tokens_evaluated
    t0 = time.perf_counter()
    probs = [whole_text_p(judge, a.prompt, a.response) if whole else judge.p_refusal(a.prompt, a.response)
             for a in items]
    return time.perf_counter() - t0, probs, judge.reader.tokens_evaluated - before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="labelled answers (every k-th, so all conditions appear)")
    ap.add_argument("--repeat", type=int, default=2, help="passes per mode, order alternating")
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        ap.error("--n and --repeat must be at least 1")
    rows = load_labelled(LABELLED)
    items = rows[:: max(1, len(rows) // args.n)][: args.n]
    judge = make_judge("probe")
    try:
        seconds = {False: 0.0, True: 0.0}
        tokens = {False: 0, True: 0}
        probs: dict[bool, list[float]] = {}
        for r in range(args.repeat):
            for whole in ((True, False) if r % 2 == 0 else (False, True)):
                s, p, t = one_pass(judge, items, whole)
                seconds[whole] += s
                tokens[whole] += t
                probs.setdefault(whole, p)
    finally:
        judge.close()
    n = len(items) * args.repeat
    diff = np.abs(np.array(probs[True]) - np.array(probs[False]))
    flips = int(np.sum((np.array(probs[True]) > 0.5) != (np.array(probs[False]) > 0.5)))
    for whole, name in ((True, "whole judge text"), (False, "stop at the answer's end (default)")):
        print(f"{name:36s} {n / seconds[whole]:.2f} answers/s, {100 * seconds[whole] / n:.0f} s per 100 answers, "
              f"{tokens[whole] / n:.0f} tokens evaluated per answer")
    print(f"ratio (default / whole): time {seconds[False] / seconds[True]:.2f}, tokens {tokens[False] / tokens[True]:.2f}; "
          f"P(refusal) max difference {diff.max():.2e}, verdicts changed {flips}/{len(items)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
