"""Refusal-gradient directions: what lowers *political* refusal without touching *harmful* refusal.

Why not a mean difference. On Qwen2.5-Coder-0.5B every mean-difference direction we tried
(political minus harmless, orthogonalised to harmful minus harmless, to refused-minus-complied
harmful, political-refused minus harmful-refused, the politics topic alone, ridge variants,
any band from blocks 2-6 to 16-22) lowered harmful refusals at least as fast as political
ones: the model refuses both through the same machinery, and a mean difference describes
where prompts *are*, not what makes the model *refuse*. Projecting out one harmful direction
changes almost nothing (measured: same refusal curves within noise).

What works is to ask the model directly. For a prompt the model refuses, the gradient of
the log-probability of its own refusal opening ("I'm sorry", "As an AI language model")
with respect to a vector added to a block's output at every position (exactly what a
llama.cpp control vector is) is the direction that raises that refusal fastest. Averaged
over political prompts it is the political-refusal direction; the harmful prompts' gradients
span the directions that move harmful refusal. Removing that whole span from the political
gradient (not one mean direction: harmful gradients vary from prompt to prompt, so a
subspace is needed) leaves a direction that, to first order, does not change any harmful
refusal seen in training. Measured on held-out prompts it removes most political refusals
while harmful refusals stay at or above their baseline.

The result is an ordinary ControlVector: unit direction per block times
``||mean(political) - mean(harmless)|| / k`` (the same magnitude a mean-difference vector
of the band would get, so scales are comparable); negative scales remove refusal.
Needs Transformers and torch (like ``rs-local fit``); imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from rs_local.errors import RsLocalError
from rs_local.vectors.capture import token_batches

Say = Callable[[str], None]


@dataclass
class RefusedPrompt:
    """A prompt the plain model refused, with the opening of its refusal (text)."""

    prompt: str
    answer: str


#: Prompts per gradient pass. Batching streams the weights once per batch instead of once per
#: prompt; measured on 2 cores (SmolLM2/Qwen 0.5B, short prompts) 8 is near the best and keeps
#: the backward pass's activation memory small.
GRADIENT_BATCH = 8


def gradient_bytes_per_token(fm, first_block: int, bf16: bool) -> int:
    """Memory a gradient pass keeps per (padded) token, from the first steered block to the last.

    Why: the backward pass holds every block's activations from the first block with an added
    vector on, and on a 7B model that is ~8 MB a token, so 8 long prompts can take tens of GB on
    top of the weights. Per token and block, about 10 hidden-size and 4 MLP-size values (norms,
    projections, attention output, gated MLP); measured peaks were below this estimate: 41 KB of
    its 48 (SmolLM2-135M) and 94 KB of its 114 (Qwen2.5-Coder-0.5B) in float32, 57 KB in bfloat16,
    where the residual stream stays float32 (2.5 bytes a value here for that mix).
    """
    config = getattr(fm.model.config, "text_config", None) or fm.model.config
    mlp = getattr(config, "intermediate_size", None) or 4 * fm.n_embd
    per_value = 2.5 if bf16 else 4.0
    return int((10 * fm.n_embd + 4 * mlp) * per_value * max(1, fm.n_layer - first_block))


def refusal_gradients(fm, items: Sequence[RefusedPrompt], layers: Sequence[int], answer_tokens: int = 2,
                      system: str | None = None, say: Say | None = None, steer: Any = None,
                      batch_size: int = GRADIENT_BATCH, bf16: bool = False, memory: int | None = None) -> np.ndarray:
    """``[n, n_layer, d]`` gradients of log P(refusal opening | prompt) w.r.t. an added block-output vector.

    A zero vector ``delta_l`` is added to block ``l``'s output at every position (a forward
    hook), so ``d score / d delta_l`` is the sum over positions of the residual-stream gradient:
    the first-order effect of a control vector on that block. Only the answer positions go
    through the LM head. ``steer`` = ``(ControlVector, scale)`` takes the gradients at that
    steered point instead of at the plain model.

    Prompts run ``batch_size`` at a time, length-sorted and left-padded with an attention mask
    and position ids (as in :mod:`rs_local.vectors.capture`). Each row has its own delta, so the
    gradient of the summed scores w.r.t. row b's delta is prompt b's gradient alone: masked
    padding never reaches a real token, and rows never see each other.

    ``bf16`` runs the passes under torch's bfloat16 autocast (matrix products in bfloat16, norms
    and the log-softmax in float32): 2.5x faster where the CPU has native bfloat16 (see
    :func:`rs_local.runtime.host.decide_bf16`, which the recipe asks), each gradient at cosine
    ~0.999 to float32's. A model loaded in bfloat16 always runs under it; the added vectors stay
    float32 either way, so from the first steered block on the residual stream is float32 as in
    the float32 model's autocast passes.

    ``memory`` (bytes the passes may take, from the caller's reading of the host; None: no bound)
    caps each batch's padded tokens by :func:`gradient_bytes_per_token`; a single prompt whose
    estimate is over it is a one-line error before any pass, not the kernel's OOM killer.
    """
    import torch

    from rs_local.vectors.capture import render

    say = say or (lambda _m: None)
    tok = fm.tokenizer
    out = np.zeros((len(items), fm.n_layer, fm.n_embd), dtype=np.float32)
    seqs: list[tuple[list[int], list[int]]] = []
    for item in items:
        prompt_ids = tok(render(fm, item.prompt, system), add_special_tokens=False)["input_ids"]
        seqs.append((list(prompt_ids), list(tok(item.answer, add_special_tokens=False)["input_ids"][:answer_tokens])))
    todo = [i for i, (_p, a) in enumerate(seqs) if a]
    fixed = _steer_tensors(fm, steer)
    bf16 = bf16 or next(fm.model.parameters()).dtype == torch.bfloat16
    lengths = [len(seqs[i][0]) + len(seqs[i][1]) for i in todo]
    done = 0
    for group in token_batches(lengths, max(1, batch_size), _token_cap(fm, layers, bf16, memory, max(lengths, default=0))):
        idx = [todo[g] for g in group]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            grads = _batch_gradients(fm, [seqs[i] for i in idx], layers, fixed)
        for l, g in zip(layers, grads):
            out[idx, l] = g
        done += len(idx)
        say(f"  gradients: {done}/{len(todo)}")
    return out


def _token_cap(fm, layers: Sequence[int], bf16: bool, memory: int | None, longest: int) -> int | None:
    """Padded tokens a gradient batch may hold within ``memory``; an error when the longest prompt alone is over."""
    if memory is None or not layers:
        return None
    per_token = gradient_bytes_per_token(fm, min(layers), bf16)
    if longest * per_token > memory:
        raise RsLocalError(f"a prompt of {longest} tokens needs about {_size(longest * per_token)} for its "
                           f"gradient pass and {_size(memory)} is available: shorten the longest prompts, use a "
                           "smaller model or a machine with more memory, or set RS_LOCAL_MEMORY_CHECK=0 to try anyway")
    return memory // per_token


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _steer_tensors(fm, steer: Any) -> dict:
    """``{block: tensor}`` of a fixed ``(ControlVector, scale)`` steering point ({} for none)."""
    if steer is None:
        return {}
    import torch

    vec, scale = steer
    return {l: torch.tensor(d * scale, dtype=torch.float32) for l, d in vec.directions.items() if l < fm.n_layer}


@dataclass
class AnswerBatch:
    """(prompt, answer) token pairs left-padded into one batch, and where each answer token is predicted."""

    ids: Any  # [b, t] token ids, padding on the left, so every sequence ends at the last column
    mask: Any  # [b, t] attention mask
    position_ids: Any  # [b, t] positions counted from each sequence's first real token
    rows: list[int]  # per answer token: its batch row ...
    cols: list[int]  # ... and the column whose logits predict it
    targets: list[int]  # ... and the token itself


def answer_batch(fm, seqs: Sequence[tuple[list[int], list[int]]]) -> AnswerBatch:
    """Left-pad ``(prompt_ids, answer_ids)`` pairs for one forward pass that scores every answer token.

    Shared by the refusal gradients and the judge benchmark's question-answer PMI, so the padding,
    masking and off-by-one of "logits at column j predict token j + 1" live in one place.
    """
    import torch

    from rs_local.vectors.capture import _pad_id

    b, t = len(seqs), max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((b, t), _pad_id(fm), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for r, (p, a) in enumerate(seqs):
        start = t - len(p) - len(a)
        ids[r, start:] = torch.tensor(list(p) + list(a), dtype=torch.long)
        mask[r, start:] = 1
        for k, token in enumerate(a):
            rows.append(r)
            cols.append(start + len(p) - 1 + k)
            targets.append(token)
    return AnswerBatch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), rows, cols, targets)


def _batch_gradients(fm, seqs: list[tuple[list[int], list[int]]], layers: Sequence[int], fixed: dict) -> list[np.ndarray]:
    """Per layer ``[b, d]``: each row's gradient of its answer's log-prob w.r.t. its own added vector."""
    import torch

    batch = answer_batch(fm, seqs)
    deltas = {l: torch.zeros((len(seqs), fm.n_embd), dtype=torch.float32, requires_grad=True) for l in layers}
    handles = [fm.blocks[l].register_forward_hook(_adder(deltas[l][:, None, :])) for l in layers]
    handles += [fm.blocks[l].register_forward_hook(_adder(v)) for l, v in fixed.items()]
    try:
        hidden = fm.base(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.position_ids,
                         use_cache=False).last_hidden_state
        picked = hidden[torch.tensor(batch.rows), torch.tensor(batch.cols)]
        logp = torch.log_softmax(fm.model.get_output_embeddings()(picked).float(), dim=-1)
        score = logp[torch.arange(len(batch.targets)), torch.tensor(batch.targets)].sum()
        grads = torch.autograd.grad(score, [deltas[l] for l in layers])
    finally:
        for h in handles:
            h.remove()
    return [g.detach().float().numpy() for g in grads]


def _adder(delta):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + delta,) + tuple(output[1:])
        return output + delta
    return hook


def contrast_direction(target: np.ndarray, keep: np.ndarray, layers: Sequence[int], rank: int | None = None) -> dict[int, np.ndarray]:
    """Per block: mean target gradient with the span of the keep gradients projected out (unit).

    ``rank`` caps how many singular directions of the keep gradients are removed (default:
    all of them, i.e. their whole span).
    """
    out = {}
    for l in layers:
        g = target[:, l].astype(np.float64).mean(axis=0)
        k = keep[:, l].astype(np.float64)
        k = k[np.linalg.norm(k, axis=1) > 0]
        if len(k):
            _, s, vt = np.linalg.svd(k, full_matrices=False)
            r = int((s > s[0] * 1e-6).sum()) if rank is None else min(rank, len(s))
            q = vt[:r]
            g = g - q.T @ (q @ g)
        norm = float(np.linalg.norm(g))
        if norm > 0:
            out[l] = g / norm
    return out


class GradientContrast:
    """Refusal gradients gathered over one or more rounds, and the vector they give.

    Round 1 takes gradients at the plain model. A round at a steered point (``steer=``) adds
    the gradients of prompts that are *still* refused there: on the default model the few
    political prompts the first vector leaves refused switch to the generic "Sorry, but I
    can't assist" opening, a refusal the first round never saw. Pooling both rounds (and the
    keep prompts' gradients at both points) removed those too, at a lower KL (measured; see
    :mod:`rs_local.recipes.isolate`).
    """

    def __init__(self, fm, layers: Sequence[int], answer_tokens: int = 2, system: str | None = None,
                 bf16: bool = False, keep_free: bool = False, memory: int | None = None):
        self.fm, self.layers, self.answer_tokens, self.system = fm, list(layers), answer_tokens, system
        self.bf16 = bf16  # gradient passes under bfloat16 autocast (see refusal_gradients)
        self.memory = memory  # bytes the gradient passes may take (see refusal_gradients); None: no bound
        #: no keep set by design (a vector a policy gate applies to its own category only): the
        #: direction is the mean target gradient, nothing projected out
        self.keep_free = keep_free
        self.target: list[np.ndarray] = []
        self.keep: list[np.ndarray] = []
        self.weighted = 0  # target rows from add_weighted (answers of every kind, not refusals only)
        self.rounds = 0

    def add(self, target: Sequence[RefusedPrompt], keep: Sequence[RefusedPrompt], steer: Any = None,
            say: Say | None = None) -> None:
        """Gradients of these refused prompts (at the plain model, or at ``steer=(vector, scale)``)."""
        say = say or (lambda _m: None)
        for name, items, into in (("target", target, self.target), ("keep", keep, self.keep)):
            if items:
                say(f"refusal gradients of {len(items)} refused {name} prompts" + (" (steered)" if steer else ""))
                into.append(refusal_gradients(self.fm, items, self.layers, self.answer_tokens, self.system, say, steer,
                                              bf16=self.bf16, memory=self.memory))
        self.rounds += 1

    def add_weighted(self, items: Sequence[RefusedPrompt], weights: Sequence[float], tokens: int, steer: Any = None,
                     say: Say | None = None) -> None:
        """Target gradients of whole answers, each weighted by how much more it refuses than the set's mean.

        ``weights`` are centred judge confidences (``c_i - mean(c)``), so the rows sum to an estimate of
        the direction that makes refusing answers (soft ones included: whatever the judge calls a
        refusal) more likely *relative to* the answers that comply: the policy gradient of the
        judge's expected verdict, with the mean as baseline. Gradients over ``tokens`` answer tokens
        are scaled by ``answer_tokens / tokens`` so a row weighs about as much as an opening's.
        """
        say = say or (lambda _m: None)
        w = np.asarray(weights, dtype=np.float64)
        if len(items) != len(w):
            raise ValueError("one weight per item")
        keep = [i for i in range(len(w)) if w[i] != 0 and items[i].answer.strip()]
        if not keep:
            return
        say(f"judge-weighted gradients of {len(keep)} target answers" + (" (steered)" if steer else ""))
        grads = refusal_gradients(self.fm, [items[i] for i in keep], self.layers, tokens, self.system, say, steer,
                                  bf16=self.bf16, memory=self.memory)
        factor = self.answer_tokens / max(1, tokens)
        self.target.append((grads * (w[keep] * factor)[:, None, None]).astype(np.float32))
        self.weighted += len(keep)

    def counts(self) -> tuple[int, int]:
        return sum(len(g) for g in self.target), sum(len(g) for g in self.keep)

    def vector(self, lengths: np.ndarray):
        """The ControlVector: unit contrast direction per block times ``lengths[block]`` (see :func:`band_lengths`)."""
        from rs_local.vectors.control_vector import ControlVector

        n_target, n_keep = self.counts()
        if not n_target or not (n_keep or self.keep_free):
            raise RsLocalError("need at least one refused target and one refused keep prompt to fit on")
        target = np.concatenate(self.target)
        keep = np.concatenate(self.keep) if n_keep else np.zeros((0,) + target.shape[1:], target.dtype)
        units = contrast_direction(target, keep, self.layers)
        k = len(units)
        directions = {l: (u * float(lengths[l]) / k).astype(np.float32) for l, u in units.items()}
        meta = {
            "method": "refusal-gradient contrast",
            "layers": ",".join(str(l) for l in units),
            "rounds": self.rounds,
            "n_refused_target": n_target - self.weighted,
            "n_refused_keep": n_keep,
            "answer_tokens": self.answer_tokens,
            "scale_rule": "||mean(target) - mean(harmless)|| / k per block",
            "model": self.fm.name,
            "model_file": self.fm.path.name,
            "gradient_dtype": "bfloat16" if self.bf16 else "float32",
        }
        if self.weighted:
            meta["n_judge_weighted_target"] = self.weighted
        return ControlVector(directions, self.fm.model_hint, meta)


def band_lengths(fm, political_prompts: Sequence[str], harmless_prompts: Sequence[str], system: str | None = None,
                 cache: Any = True, upto: int | None = None, bf16: bool = False) -> np.ndarray:
    """``[n_layer]``: per block, ||mean(political) - mean(harmless)|| of the block outputs.

    Gives the gradient direction the length a mean-difference vector of the band would have,
    so scales mean the same for both kinds of vector. ``upto``: the band's last block; the
    capture stops there (later blocks read NaN), which skips a third of the pass on a 8-16 band.
    """
    from rs_local.vectors.capture import capture

    pos = capture(fm, list(political_prompts), keep_raw=True, system=system, cache=cache, upto=upto, bf16=bf16)
    neg = capture(fm, list(harmless_prompts), keep_raw=True, system=system, cache=cache, upto=upto, bf16=bf16)
    dp = pos.raw.astype(np.float64).mean(axis=0) - neg.raw.astype(np.float64).mean(axis=0)
    return np.linalg.norm(dp, axis=-1)
