"""Activation-capture throughput on a Mixture-of-Experts model vs a dense one, per parameter.

    python benchmarks/moe_capture.py            # 64 prompts
    python benchmarks/moe_capture.py --n 16     # a quick look

Both models go through the same ``capture()`` (base model, forward hooks, left-padded
batches) in this process, on the same prompts (rs-local's built-in harmless set):

* dense: SmolLM2-135M (llama arch, dequantised from its Q4_1 GGUF);
* MoE:   the tests' tiny seeded Qwen3-MoE (tests/moe_model.py: 4 blocks, 4 experts, top-2).

The models differ ~100x in size, so raw prompts/s says little. The figure of merit is
parameter-tokens per second (tokens/s x parameters, total and active: an MoE token only runs
its top-k experts), and the ratio MoE / dense measured in the same run. Transformers' eager
MoE loops over experts in Python per block, so a tiny MoE is overhead-bound: expect a ratio
far below 1 per parameter; it shows the routing overhead, not the speed of a real MoE.
Model loading is not timed; one warm-up batch per model is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _params(fm) -> tuple[int, int]:
    """(total, active per token) parameters of the base model (no LM head)."""
    total = sum(p.numel() for p in fm.base.parameters())
    experts = sum(p.numel() for name, p in fm.base.named_parameters() if ".experts." in name)
    config = fm.model.config
    n_expert = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    active = total - experts + (experts * k // n_expert if n_expert else 0)
    return total, active


def measure(fm, prompts: list[str], batch_size: int) -> dict[str, float]:
    from rs_local.vectors.capture import capture

    capture(fm, prompts[:batch_size], batch_size=batch_size)  # warm-up
    acts = capture(fm, prompts, batch_size=batch_size)
    total, active = _params(fm)
    tok_s = acts.n_tokens / acts.seconds
    return {"prompts_per_s": len(prompts) / acts.seconds, "tokens_per_s": tok_s, "params": total, "active_params": active,
            "param_tokens_per_s": tok_s * total, "active_param_tokens_per_s": tok_s * active}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts per model")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from moe_model import write_tiny_moe

    from rs_local import models
    from rs_local.prompts import load_prompts
    from rs_local.vectors.hf_model import load_model

    prompts = load_prompts(REPO / "rs_local" / "data" / "harmless.jsonl")[: args.n]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        moe = write_tiny_moe(Path(tmp) / "tiny-qwen3moe.gguf", models.pull("qwen2.5-coder-0.5b"))
        for label, model in (("dense smollm2-135m", str(models.pull("smollm2-135m"))), ("moe tiny-qwen3moe", str(moe))):
            results[label] = measure(load_model(model), prompts, args.batch_size)
    dense, moe_r = results["dense smollm2-135m"], results["moe tiny-qwen3moe"]
    for label, r in results.items():
        print(f"{label:20s} {r['prompts_per_s']:8.1f} prompts/s {r['tokens_per_s']:9.0f} tok/s  "
              f"params {r['params'] / 1e6:7.2f} M (active {r['active_params'] / 1e6:.2f} M)")
    ratio = moe_r["param_tokens_per_s"] / dense["param_tokens_per_s"]
    ratio_active = moe_r["active_param_tokens_per_s"] / dense["active_param_tokens_per_s"]
    print(f"per-parameter throughput, MoE / dense: {ratio:.3f} (total params), {ratio_active:.3f} (active params)")
    print(json.dumps({"n": len(prompts), "results": results, "ratio_total": ratio, "ratio_active": ratio_active}))


if __name__ == "__main__":
    main()
