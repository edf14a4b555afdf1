"""Cost of steering at inference: tokens/s steered vs unsteered, and the time to swap a vector.

Both runs use the same loaded model in one process, interleaved over several rounds, so machine
noise hits both sides alike; the figure that matters is the ratio.

    python benchmarks/runtime_overhead.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--rounds 3]

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


def tokens_per_second(runner: Runner, n_tokens: int) -> float:
    """Decode speed over the prompts (prompt evaluation excluded: it is timed separately by llama.cpp)."""
    total_tokens, total_time = 0, 0.0
    for prompt in PROMPTS:
        runner.llama.reset()
        start = None
        count = 0
        for _ in runner.stream([{"role": "user", "content": prompt}], max_tokens=n_tokens):
            if start is None:
                start = time.perf_counter()  # first token marks the end of prompt evaluation
            count += 1
        if start is not None and count > 1:
            total_time += time.perf_counter() - start
            total_tokens += count - 1
    return total_tokens / total_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    path = models.resolve(args.model)
    t0 = time.perf_counter()
    runner = Runner(path, n_ctx=1024, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    vec_a = random_vector(runner.n_embd, runner.n_layer, 1)
    vec_b = random_vector(runner.n_embd, runner.n_layer, 2)

    plain, steered = [], []
    for _ in range(args.rounds):
        runner.clear_vectors()
        plain.append(tokens_per_second(runner, args.tokens))
        runner.set_vectors([(vec_a, 1.0)])
        steered.append(tokens_per_second(runner, args.tokens))
    runner.clear_vectors()

    swaps = []
    for i in range(20):
        t = time.perf_counter()
        runner.set_vectors([(vec_a if i % 2 else vec_b, -1.0)])
        swaps.append(time.perf_counter() - t)

    p, s = statistics.median(plain), statistics.median(steered)
    swap_ms = statistics.median(swaps) * 1000
    print(f"model: {path.name} ({runner.n_layer} blocks, n_embd {runner.n_embd}), {args.rounds} rounds x {len(PROMPTS)} prompts x {args.tokens} tokens")
    print(f"unsteered decode: {p:8.2f} tok/s   (rounds: {', '.join(f'{x:.1f}' for x in plain)})")
    print(f"steered decode:   {s:8.2f} tok/s   (rounds: {', '.join(f'{x:.1f}' for x in steered)})")
    print(f"ratio steered/unsteered: {s / p:.3f}   (target >= 0.97)")
    print(f"vector swap: median {swap_ms:.2f} ms over 20 swaps (target < 50 ms); model load for comparison: {load_s * 1000:.0f} ms")
    print(f"swap / reload ratio: {swap_ms / (load_s * 1000):.4f}")


if __name__ == "__main__":
    main()
