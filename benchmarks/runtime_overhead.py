"""Cost of steering at inference: tokens/s steered vs unsteered, and the time to swap a vector.

Both sides decode the same tokens (each prompt's plain greedy answer, fed back one token at a
time) on the same loaded model, the order alternating from round to round, so machine noise hits
both alike and the ratio is the vector's cost alone. Timing each side's own generation instead
would compare different answers (a steered answer runs to a different length and context), which
read as a cost of 0.85-0.93x in earlier rounds while the same tokens decode at ~1.0x.

    python benchmarks/runtime_overhead.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--rounds 4]

Targets: steered/unsteered tokens/s >= 0.97; a vector swap < 50 ms (no model reload).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rs_local import models
from rs_local.runtime import Runner
from rs_local.vectors import ControlVector

PROMPTS = [
    "Explain how a hash map works.",
    "Write a short poem about the sea.",
    "What are the main causes of inflation?",
]


def random_vector(n_embd: int, n_layer: int, seed: int, norm: float = 2.0) -> ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in range(1, n_layer):
        v = rng.normal(size=n_embd)
        dirs[layer] = v / np.linalg.norm(v) * norm
    return ControlVector(dirs)


def answers(runner: Runner, n_tokens: int) -> list[list[int]]:
    """Each prompt's plain greedy answer, padded by repetition to ``n_tokens`` (only the count matters)."""
    runner.clear_vectors()
    out = []
    for prompt in PROMPTS:
        toks = runner.generate(msgs(prompt), max_tokens=n_tokens).tokens or [0]
        out.append((toks * (n_tokens // len(toks) + 1))[:n_tokens])
    return out


def msgs(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def decode_seconds(runner: Runner, tokens: list[list[int]]) -> float:
    """llama.cpp's time decoding each prompt's ``tokens`` one at a time (prompt evaluation excluded)."""
    before = runner.counters.copy()
    for prompt, toks in zip(PROMPTS, tokens):
        runner.forced_logprobs(msgs(prompt), toks + [0])
    return runner.counters.since(before).decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="Even, so each side goes first equally often.")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    path = models.resolve(args.model)
    t0 = time.perf_counter()
    runner = Runner(path, n_ctx=1024, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    vec_a = random_vector(runner.n_embd, runner.n_layer, 1)
    vec_b = random_vector(runner.n_embd, runner.n_layer, 2)

    tokens = answers(runner, args.tokens)
    n = len(PROMPTS) * args.tokens
    plain, steered = [], []
    for i in range(args.rounds):
        for steer in ((False, True) if i % 2 == 0 else (True, False)):
            if steer:
                runner.set_vectors([(vec_a, 1.0)])
            else:
                runner.clear_vectors()
            (steered if steer else plain).append(decode_seconds(runner, tokens))
    runner.clear_vectors()

    swaps = []
    for i in range(20):
        t = time.perf_counter()
        runner.set_vectors([(vec_a if i % 2 else vec_b, -1.0)])
        swaps.append(time.perf_counter() - t)

    p, s = n * len(plain) / sum(plain), n * len(steered) / sum(steered)  # total tokens / total time
    swap_ms = statistics.median(swaps) * 1000
    print(f"model: {path.name} ({runner.n_layer} blocks, n_embd {runner.n_embd}), {args.rounds} rounds x {len(PROMPTS)} prompts x {args.tokens} tokens, the same tokens both sides, order alternating")
    print(f"unsteered decode: {p:8.2f} tok/s   (rounds: {', '.join(f'{n / x:.1f}' for x in plain)})")
    print(f"steered decode:   {s:8.2f} tok/s   (rounds: {', '.join(f'{n / x:.1f}' for x in steered)})")
    print(f"ratio steered/unsteered: {s / p:.3f}   (target >= 0.97)")
    print(f"vector swap: median {swap_ms:.2f} ms over 20 swaps (target < 50 ms); model load for comparison: {load_s * 1000:.0f} ms")
    print(f"swap / reload ratio: {swap_ms / (load_s * 1000):.4f}")


if __name__ == "__main__":
    main()
