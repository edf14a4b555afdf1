"""Evaluation decode throughput against llama.cpp's own batched decoding (issue 16).

    python benchmarks/eval_throughput.py                 # 32 harmless prompts, 32 tokens, the default batch (32)
    python benchmarks/eval_throughput.py --n 32 --batch 16 32 --repeat 2
    python benchmarks/eval_throughput.py --engine-kv split --baseline-kv split   # the exact mode (eval --exact)

Measured on one model load (a :class:`Runner`, which loads through
``rs_local.runtime.loading.load_llama``), the same prompts (chat template applied) and the same
number of answer tokens per prompt:

* ``engine``   : :class:`rs_local.runtime.batched.BatchEngine.generate_many`, greedy, ``n_seq``
  sequences per decode with continuous batching, one shared KV pool: what ``rs-local eval`` runs
  (``--engine-kv split``: a stream per sequence, what ``eval --exact`` runs). Its answers set
  each prompt's token count for the others.
* ``llama.cpp``: llama.cpp's batched decoding through llama-cpp-python's low-level API, written
  as tightly as Python allows: one context with ``n_seq`` sequences (one KV pool, the faster
  layout; ``--baseline-kv split`` for a stream per sequence), all prompts of a batch in
  one prefill, then one ``llama_decode`` per step holding every running sequence's token and a
  single argmax over the step's logits block; each sequence stops after the engine's count.
* ``single``   : the Runner's own one-sequence loop (``Runner.generate``), what chat runs, and
  the low-level loop above with one sequence (``llama.cpp n=1``).

Aggregate tokens/s = answer tokens / wall seconds including the prompts' prefill. The
machine is shared: variants are interleaved and repeated, ratios come from the same run and
absolute figures are upper bounds on the time. Prints peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LlamaBatched:
    """llama.cpp's batched greedy decode on the Runner's model: the reference to measure against."""

    def __init__(self, runner, n_seq: int, seq_ctx: int = 1024, unified: bool = False):
        import llama_cpp

        self.lib, self.runner, self.n_seq = llama_cpp, runner, n_seq
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * seq_ctx
        params.n_batch = params.n_ctx  # a whole group's prompts go in one decode (llama.cpp splits it into ubatches)
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = unified  # one pool (default) or a stream per sequence (--baseline-kv split)
        threads = runner.llama.context_params.n_threads
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(runner.llama.model, params)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n_vocab = runner.n_vocab

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0

    def _decode(self, n_tokens: int, n_out: int) -> np.ndarray:
        self.batch.n_tokens = n_tokens
        if self.lib.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).argmax(axis=1)

    def run(self, prompts: list[list[int]], lengths: list[int]) -> int:
        """Greedy-decode ``lengths[i]`` tokens after each prompt, ``n_seq`` prompts at a time; tokens made."""
        made = 0
        for start in range(0, len(prompts), self.n_seq):
            group = list(range(start, min(start + self.n_seq, len(prompts))))
            self.lib.llama_memory_clear(self.mem, True)
            i = 0
            for seq, g in enumerate(group):
                for pos, tok in enumerate(prompts[g]):
                    self._put(i, tok, pos, seq, pos == len(prompts[g]) - 1)
                    i += 1
            nxt = self._decode(i, len(group))
            pos = {seq: len(prompts[g]) for seq, g in enumerate(group)}
            left = {seq: lengths[g] for seq, g in enumerate(group)}
            last = dict(enumerate(int(t) for t in nxt))
            while True:
                running = [s for s in range(len(group)) if left[s] > 1]
                for s in list(left):
                    if left[s] >= 1:
                        made += 1
                    left[s] -= 1
                if not running:
                    break
                for i, s in enumerate(running):
                    self._put(i, last[s], pos[s], s, True)
                    pos[s] += 1
                toks = self._decode(len(running), len(running))
                last = {s: int(t) for s, t in zip(running, toks)}
        return made


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    from rs_local import models
    from rs_local.eval.prompt_sets import builtin_set
    from rs_local.runtime.batched import MAX_DEFAULT_BATCH, BatchEngine
    from rs_local.runtime.runner import Runner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=32, help="prompts (from the shipped harmless set)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[MAX_DEFAULT_BATCH],
                    help="sequences per batch (default: what rs-local eval uses for a small model)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--engine-kv", choices=("unified", "split"), default="unified",
                    help="the engine's KV cache: one pool (rs-local eval's default) or a stream per sequence (--exact)")
    ap.add_argument("--baseline-kv", choices=("unified", "split"), default="unified",
                    help="llama.cpp baseline's KV cache: one pool (default, its faster layout) or a stream per sequence")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    runner = Runner(models.resolve(args.model), n_ctx=2048)
    msgs = [[{"role": "user", "content": p}] for p in builtin_set("harmless").subset(args.n, seed=0).prompts]
    prompts = [runner.tokenize(m) for m in msgs]
    result: dict = {"settings": {"model": runner.path.name, "prompts": len(msgs), "max_tokens": args.max_tokens,
                                 "threads": runner.llama.context_params.n_threads, "repeat": args.repeat}, "runs": []}
    for n_seq in args.batch:
        engine = BatchEngine(runner, n_seq=n_seq, kv_unified=args.engine_kv == "unified")
        ref = LlamaBatched(runner, n_seq, unified=args.baseline_kv == "unified")
        one = LlamaBatched(runner, 1)
        try:
            for rep in range(args.repeat):
                t_eng, gens = _timed(lambda: engine.generate_many(msgs, max_tokens=args.max_tokens))
                lengths = [len(g.tokens) + (g.finish_reason == "stop") for g in gens]  # the end token was decoded too
                tokens = sum(lengths)  # every variant counts decoded outputs, the end token included
                t_ref, made = _timed(lambda: ref.run(prompts, lengths))
                t_one, _ = _timed(lambda: one.run(prompts, lengths))
                t_seq, seq_gens = _timed(lambda: [runner.generate(m, max_tokens=args.max_tokens) for m in msgs])
                seq_tokens = sum(len(g.tokens) + (g.finish_reason == "stop") for g in seq_gens)
                row = {"n_seq": n_seq, "repeat": rep, "tokens": tokens,
                       "engine_tok_s": tokens / t_eng, "llama_cpp_batched_tok_s": made / t_ref,
                       "llama_cpp_n1_tok_s": made / t_one, "runner_single_tok_s": seq_tokens / t_seq}
                row["engine_vs_llama_cpp_batched"] = row["engine_tok_s"] / row["llama_cpp_batched_tok_s"]
                row["engine_vs_runner_single"] = row["engine_tok_s"] / row["runner_single_tok_s"]
                row["engine_vs_llama_cpp_n1"] = row["engine_tok_s"] / row["llama_cpp_n1_tok_s"]
                result["runs"].append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        finally:
            engine.close()
            ref.close()
            one.close()
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; absolute tokens/s are lower bounds on a shared machine")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
