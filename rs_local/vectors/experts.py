"""Which experts route refused prompts differently from answered ones (MoE models).

A Mixture-of-Experts block sends each token to its top-k experts by a router's softmax. If
refused and answered prompts lean on different experts at some block, that is where refusal
is routed: the expert-aware refusal steering paper (arXiv 2606.04160) looks there. We read the
router logits Transformers records under ``output_router_logits`` (the class its
``_can_record_outputs["router_logits"]`` names, one per MoE block), through forward hooks so
each one is tied to its block index (dense blocks of a mixed model are simply absent).

Per prompt and block, the routing probabilities (softmax over all experts) and the top-k
selections are averaged over the chosen positions. Per block and expert we then compare the
two sets: the difference of mean probability and Cohen's d (pooled standard deviation), and
rank experts by |d|. Prompts run one at a time, so no padding token ever reaches a router.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rs_local.errors import ModelError
from rs_local.vectors.hf_model import FitModel

POSITIONS = ("last", "post_instruction", "prompt")


@dataclass
class Routing:
    """Routing of one prompt set: ``probs[i, k, e]`` and ``selected[i, k, e]`` at MoE block ``blocks[k]``."""

    blocks: list[int]
    probs: np.ndarray
    selected: np.ndarray


def require_moe_file(path: str | Path) -> None:
    """Refuse a dense GGUF from its header, before seconds of loading it into Transformers."""
    from rs_local.converters.gguf_header import gguf_scalars
    from rs_local.converters.moe_arch import expert_count

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        meta = gguf_scalars(path)
        if expert_count(meta) == 0:
            raise ModelError(f"{path}: '{meta.get('general.architecture', '?')}' is a dense model (no experts); "
                             "the experts report needs a Mixture-of-Experts model")


def router_modules(fm: FitModel) -> dict[int, tuple[Any, int]]:
    """Block index -> (router module, index of the logits in its output); error for a dense model."""
    spec = (getattr(fm.model, "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        raise ModelError(f"{fm.path}: '{fm.model_hint}' is a dense model (no expert router); "
                         "the experts report needs a Mixture-of-Experts model")
    target, index = getattr(spec, "target_class", spec), int(getattr(spec, "index", 0))
    found = {}
    for block, module in enumerate(fm.blocks):
        for sub in module.modules():
            if isinstance(sub, target):
                found[block] = (sub, index)
                break
    if not found:
        raise ModelError(f"{fm.path}: no expert router found in the decoder blocks of '{fm.model_hint}'")
    return found


def top_k(fm: FitModel) -> int:
    """Experts each token is sent to (``num_experts_per_tok``)."""
    config = fm.model.config
    return int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "top_k", 0) or 1)


def _rows(n_tokens: int, n_suffix: int, position: str) -> slice:
    if position == "last":
        return slice(n_tokens - 1, n_tokens)
    if position == "post_instruction":
        return slice(n_tokens - n_suffix, n_tokens)
    return slice(0, n_tokens)


def capture_routing(fm: FitModel, prompts: Sequence[str], *, position: str = "last", system: str | None = None) -> Routing:
    """Router probabilities and top-k selections per prompt and MoE block."""
    import torch

    from rs_local.vectors.capture import tokenize

    if position not in POSITIONS:
        raise ValueError(f"unknown position '{position}' (choose from {', '.join(POSITIONS)})")
    routers = router_modules(fm)
    blocks, k = sorted(routers), top_k(fm)
    ids, n_suffix = tokenize(fm, list(prompts), system)
    seen: dict[int, Any] = {}

    def hook_for(block: int, index: int):
        def hook(_module, _inputs, output):
            logits = output[index] if isinstance(output, tuple) else output
            seen[block] = logits.reshape(-1, logits.shape[-1]).float()
        return hook

    handles = [routers[b][0].register_forward_hook(hook_for(b, routers[b][1])) for b in blocks]
    probs, selected = [], []
    try:
        for toks, n_suf in zip(ids, n_suffix):
            seen.clear()
            with torch.inference_mode():
                fm.base(input_ids=torch.tensor([toks]), use_cache=False)
            rows = _rows(len(toks), n_suf, position)
            p = torch.stack([torch.softmax(seen[b][rows], dim=-1) for b in blocks])  # [blocks, t, E]
            chosen = torch.zeros_like(p).scatter_(-1, p.topk(min(k, p.shape[-1]), dim=-1).indices, 1.0)
            probs.append(p.mean(dim=1).numpy())
            selected.append(chosen.mean(dim=1).numpy())
    finally:
        for h in handles:
            h.remove()
    return Routing(blocks, np.stack(probs), np.stack(selected))


def cohen_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d of ``a`` against ``b`` along axis 0 (pooled standard deviation; 0 where both are constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(axis=0, ddof=1 if na > 1 else 0) + (nb - 1) * b.var(axis=0, ddof=1 if nb > 1 else 0))
    pooled = np.sqrt(pooled / max(na + nb - 2, 1))
    diff = a.mean(axis=0) - b.mean(axis=0)
    return np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 1e-12)


def expert_report(refused: Routing, answered: Routing, *, top: int = 3, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per MoE block, the ``top`` experts whose routing differs most (|Cohen's d|) between the sets."""
    d = cohen_d(refused.probs, answered.probs)  # [blocks, E]
    mr, ma = refused.probs.mean(axis=0), answered.probs.mean(axis=0)
    sr, sa = refused.selected.mean(axis=0), answered.selected.mean(axis=0)
    blocks = []
    for k, block in enumerate(refused.blocks):
        order = np.argsort(-np.abs(d[k]), kind="stable")[:top]
        blocks.append({"block": block, "max_abs_d": float(np.abs(d[k]).max()), "top": [
            {"expert": int(e), "cohen_d": float(d[k, e]), "mean_prob_refused": float(mr[k, e]),
             "mean_prob_answered": float(ma[k, e]), "prob_diff": float(mr[k, e] - ma[k, e]),
             "selected_refused": float(sr[k, e]), "selected_answered": float(sa[k, e])} for e in order]})
    return (meta or {}) | {
        "n_refused": int(len(refused.probs)), "n_answered": int(len(answered.probs)),
        "n_experts": int(d.shape[1]), "blocks": blocks, "cohen_d": np.round(d, 4).tolist(),
    }


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """PNG heat map of Cohen's d per (block, expert): red routes refused prompts more, blue answered."""
    from rs_local.files import atomic_output

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError("plotting needs matplotlib: pip install 'rs-local[plot]'") from exc
    d = np.asarray(report["cohen_d"], dtype=np.float64)
    limit = max(float(np.abs(d).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * d.shape[1], 16), min(1.5 + 0.3 * d.shape[0], 12)))
    try:
        image = ax.imshow(d, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_yticks(range(d.shape[0]), [str(b["block"]) for b in report["blocks"]])
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_title("routing: Cohen's d, refused vs answered")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        with atomic_output(Path(path), force=True) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)
