"""Capture throughput of rs-local's fitting front end against the usual ways of doing it.

    python benchmarks/fit_speed.py            # 200 prompts on Qwen2.5-Coder-0.5B
    python benchmarks/fit_speed.py --n 24     # a quick look

Compared, on the same model, the same prompts (chat template applied) and the same machine:

* ``rs-local``  : ``capture()`` -- base model only (no LM head), forward hooks, length-sorted
  left-padded batches, every block's residual at the last prompt token.
* ``whole``     : the same ``capture()`` with ``share_head=False``: every prompt evaluated whole,
  the chat template's common head (its system part) included, as before the head was shared.
* ``plain``     : ``model(**inputs, output_hidden_states=True)`` one prompt at a time with the
  full causal LM, the straightforward way to get the same activations.
* ``repeng``    : repeng 0.4.0 ``ControlVector.train`` (only if it imports; it is not a
  dependency: ``pip install --no-deps repeng==0.4.0`` and it needs scikit-learn).

Each variant runs in its own process so its peak RSS is its own; model loading is not timed.
Prints prompts/s, the ratios against rs-local, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "refusal_direction" / "splits" / "harmless_train.json"


def _prompts(n: int) -> list[str]:
    from rs_local.prompts import load_prompts

    return load_prompts(DATA)[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _load(model: str, dtype: str):
    from rs_local.vectors.hf_model import load_model

    return load_model(model, dtype=dtype)


def phase_ours(fm, prompts: list[str], batch_size: int, share_head: bool = True) -> float:
    from rs_local.vectors.capture import capture

    start = time.perf_counter()
    acts = capture(fm, prompts, batch_size=batch_size, cache=False, share_head=share_head)
    assert acts.raw.shape[0] == len(prompts)
    return time.perf_counter() - start


def phase_whole(fm, prompts: list[str], batch_size: int) -> float:
    return phase_ours(fm, prompts, batch_size, share_head=False)


def phase_plain(fm, prompts: list[str], _batch_size: int) -> float:
    import torch

    from rs_local.vectors.capture import render

    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = fm.tokenizer(render(fm, p), add_special_tokens=False, return_tensors="pt")
            out = fm.model(**ids, output_hidden_states=True)
            _ = [h[0, -1].float().numpy() for h in out.hidden_states[1:]]
    return time.perf_counter() - start


def phase_repeng(fm, prompts: list[str], batch_size: int) -> float:
    from repeng import ControlVector, DatasetEntry  # noqa: the optional comparison

    from rs_local.vectors.capture import render

    texts = [render(fm, p) for p in prompts]
    pairs = [DatasetEntry(positive=a, negative=b) for a, b in zip(texts[::2], texts[1::2])]
    tok = fm.tokenizer
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    start = time.perf_counter()
    ControlVector.train(fm.model, tok, pairs, batch_size=batch_size)
    return time.perf_counter() - start


PHASES = {"rs-local": phase_ours, "whole": phase_whole, "plain": phase_plain, "repeng": phase_repeng}


def run_phase(args) -> None:
    """Child process: load, time one variant, print one JSON line."""
    prompts = _prompts(args.n)
    if args.phase == "repeng":
        try:
            import repeng  # noqa: F401
        except Exception as exc:  # ImportError, or numpy-2 incompatibility inside repeng
            print(json.dumps({"phase": args.phase, "skipped": f"{type(exc).__name__}: {exc}"}))
            return
    fm = _load(args.model, args.dtype)
    rss_loaded = _peak_rss_mb()
    seconds = PHASES[args.phase](fm, prompts, args.batch_size)
    n = len(prompts) if args.phase != "repeng" else 2 * (len(prompts) // 2)
    print(json.dumps({"phase": args.phase, "n": n, "seconds": seconds, "prompts_per_s": n / seconds,
                      "peak_rss_mb": _peak_rss_mb(), "rss_after_load_mb": rss_loaded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        run_phase(args)
        return
    results = {}
    for phase in PHASES:
        cmd = [sys.executable, __file__, "--phase", phase, "--n", str(args.n), "--model", args.model,
               "--dtype", args.dtype, "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[phase] = {"skipped": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            results[phase] = json.loads(lines[-1])
        print(f"{phase:9s} {json.dumps(results[phase])}", flush=True)
    ours = results["rs-local"].get("prompts_per_s")
    print(f"\n{args.model}, {args.n} prompts, {args.dtype}, batch {args.batch_size}")
    print(f"{'variant':10s} {'prompts/s':>10s} {'rs-local is':>13s} {'peak RSS MB':>12s}")
    for phase, r in results.items():
        if "prompts_per_s" not in r:
            print(f"{phase:10s} skipped: {r['skipped']}")
            continue
        ratio = f"{ours / r['prompts_per_s']:.2f}x" if ours else "-"
        print(f"{phase:10s} {r['prompts_per_s']:10.2f} {ratio:>13s} {r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
