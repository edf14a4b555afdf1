"""What llama.cpp's weight repacking buys: prompt-eval and decode tokens/s, repack on vs off.

rs-local turns repacking off on AMX CPUs (where llama.cpp's AMX repack segfaults) and leaves it
on elsewhere. This measures the price of turning it off on the built-in models: both loads
live in one process and are measured in alternating rounds, so machine noise hits both
alike; the figures that matter are the ratios off/on.

    python benchmarks/repack_speed.py [--model qwen2.5-coder-0.5b --model smollm2-135m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from rs_local import models
from rs_local.runtime import Runner

PROMPT = ("Summarise the following notes for a colleague who missed the meeting. " * 12).strip()
ANSWER_PROMPT = [{"role": "user", "content": "Explain how a hash map handles collisions."}]


def prompt_eval_rate(runner: Runner, tokens: list[int]) -> float:
    """Tokens/s evaluating a prompt from an empty cache (one batch)."""
    runner.llama.reset()
    runner._kv_valid = False
    start = time.perf_counter()
    runner._eval_prompt(tokens)
    return len(tokens) / (time.perf_counter() - start)


def decode_rate(runner: Runner, n_tokens: int) -> float:
    """Tokens/s after the first token (prompt evaluation excluded)."""
    runner.llama.reset()
    runner._kv_valid = False
    start, count = None, 0
    for _ in runner.stream(ANSWER_PROMPT, max_tokens=n_tokens):
        if start is None:
            start = time.perf_counter()
        count += 1
    return (count - 1) / (time.perf_counter() - start) if start and count > 1 else float("nan")


def bench(name: str, rounds: int, n_tokens: int, threads: int | None) -> None:
    path = models.resolve(name)
    runners = {flag: Runner(path, n_ctx=1024, n_threads=threads, repack=flag) for flag in (True, False)}
    tokens = runners[True].tokenize(PROMPT)
    rates: dict[tuple[bool, str], list[float]] = {}
    for _ in range(rounds):
        for flag, runner in runners.items():
            rates.setdefault((flag, "prompt"), []).append(prompt_eval_rate(runner, tokens))
            rates.setdefault((flag, "decode"), []).append(decode_rate(runner, n_tokens))
    print(f"\n{path.name}: {rounds} rounds, prompt {len(tokens)} tokens, decode {n_tokens} tokens, "
          f"threads {runners[True].llama.context_params.n_threads}")
    for kind in ("prompt", "decode"):
        on, off = (statistics.median(rates[(flag, kind)]) for flag in (True, False))
        print(f"  {kind:6s} eval  repack on {on:8.1f} tok/s   off {off:8.1f} tok/s   ratio off/on {off / on:.3f}")
    for runner in runners.values():
        runner.llama.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="repeatable; default: both built-in models")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    for name in args.model or [models.DEFAULT_MODEL, "smollm2-135m"]:
        bench(name, args.rounds, args.tokens, args.threads)


if __name__ == "__main__":
    main()
