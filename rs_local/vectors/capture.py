"""Capture residual-stream activations per block, the way llama.cpp will see the prompt.

Each prompt is wrapped in the model's chat template with the generation prompt appended
(what llama.cpp's chat completion feeds the model), and we read the residual stream after
every decoder block through forward hooks on ``blocks[i]``. Hooks rather than
``output_hidden_states`` because in Transformers 5 the last ``hidden_states`` entry is taken
after the final norm; a hook on block i's output is exactly llama.cpp's block i (where
``direction.i`` is added), for every i including the last. Only the base model runs, so the
vocabulary projection (the largest matmul of a small model) is never computed.

Two positions: ``last`` (the last prompt token, the one that produces the first answer
token) and ``post_instruction`` (mean over the template suffix after the user's text,
e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``), which is less sensitive to one token.

Batches are length-sorted and LEFT padded with explicit position ids, so a prompt's
activations do not depend on its batch-mates (tested: batch 1 == batch 16 to 1e-4).

Two savings, both exact up to float summation order (tested against the plain pass): the
tokens every prompt starts with (the chat template's system part: 25 of ~40 tokens per prompt
on Qwen2.5) are evaluated once and their keys and values handed to every batch (only on
stacks of full-attention layers, and checked on the shortest and longest prompt as one padded
batch against evaluating them whole; dropped where they differ), and with
``upto`` the forward pass stops after the last block the caller reads. The recipe's band
lengths (blocks up to 16 of 24) took 41 s before both and 15 s after, on 2 cores.

Results come as raw ``[n, n_layer, d]`` arrays (needed for held-out AUROC, PCA, plots) and/or
as streaming moments (weighted mean, covariance, mean norm per layer) whose memory does not
grow with the number of prompts. Captures are cached on disk under
``<rs-local home>/activations`` keyed by model identity, prompts, template and position, so
refitting with another method or lambda skips the forward passes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rs_local.callbacks import Progress
from rs_local.errors import FileProblem, RsLocalError
from rs_local.files import atomic_output, is_cached_file
from rs_local.prompts import prompts_hash
from rs_local.vectors.hf_model import FitModel

POSITIONS = ("last", "post_instruction")
CACHE_VERSION = 1
#: Keep raw activations automatically when they need at most this many bytes.
RAW_BUDGET_BYTES = 1 << 30
#: A common token prefix shorter than this is evaluated with each prompt (not worth a cache copy).
MIN_HEAD_TOKENS = 8
#: Largest difference (relative to the block's largest entry) between the check's prompts evaluated
#: with the shared head and evaluated whole for the head to be used (float noise is ~1e-6).
HEAD_TOLERANCE = 1e-3
_SENTINEL = "\u2063RSLOCALSENTINEL\u2063"


# ----------------------------------------------------------------------------- statistics


class StreamingMoments:
    """Weighted mean, covariance and mean L2 norm per layer, updated batch by batch.

    Uses Chan et al.'s pairwise update (batch mean and centred scatter merged into the
    running ones), which stays accurate in float64 even when the residual stream has a large
    common offset, unlike accumulating raw sums of squares.
    """

    def __init__(self, n_layer: int, d: int, with_cov: bool = True):
        self.n = 0
        self.weight = 0.0
        self.mean = np.zeros((n_layer, d))
        self.m2 = np.zeros((n_layer, d, d)) if with_cov else None
        self.norm_sum = np.zeros(n_layer)

    def update(self, acts: np.ndarray, w: np.ndarray | None = None) -> None:
        """Fold in ``acts [b, n_layer, d]`` with per-prompt weights ``w [b]``."""
        x = np.asarray(acts, dtype=np.float64)
        w = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
        wb = float(w.sum())
        if wb <= 0:
            return
        mb = np.einsum("b,bld->ld", w, x) / wb
        total = self.weight + wb
        delta = mb - self.mean
        if self.m2 is not None:
            xc = x - mb
            shift = self.weight * wb / total
            for layer in range(x.shape[1]):  # one BLAS matmul per layer; einsum would not use BLAS
                xl = xc[:, layer, :]
                self.m2[layer] += (xl * w[:, None]).T @ xl + shift * np.outer(delta[layer], delta[layer])
        self.mean += delta * (wb / total)
        self.weight = total
        self.n += len(x)
        self.norm_sum += np.linalg.norm(x, axis=2).sum(axis=0)

    @property
    def cov(self) -> np.ndarray:
        if self.m2 is None:
            raise ValueError("covariance was not tracked")
        return self.m2 / self.weight

    @property
    def mean_norm(self) -> np.ndarray:
        """Unweighted mean activation norm per layer (the export scale reference)."""
        return self.norm_sum / max(self.n, 1)

    def copy(self) -> "StreamingMoments":
        return StreamingMoments.from_arrays({k: np.array(v, copy=True) for k, v in self.to_arrays().items()})

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"n": np.array(self.n), "weight": np.array(self.weight), "mean": self.mean, "norm_sum": self.norm_sum}
        if self.m2 is not None:
            out["m2"] = self.m2
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "StreamingMoments":
        mean = arrays["mean"]
        obj = cls(mean.shape[0], mean.shape[1], with_cov="m2" in arrays)
        obj.n, obj.weight, obj.mean, obj.norm_sum = int(arrays["n"]), float(arrays["weight"]), mean, arrays["norm_sum"]
        if "m2" in arrays:
            obj.m2 = arrays["m2"]
        return obj


@dataclass
class Activations:
    """Activations of one prompt set: ``raw[i, block]`` and/or streaming moments.

    Block indices follow llama.cpp: ``raw[:, N]`` is the output of block N, where
    ``direction.N`` is added.
    """

    n_prompts: int
    n_layer: int
    d: int
    position: str
    raw: np.ndarray | None = None
    moments: StreamingMoments | None = None
    n_tokens: int = 0
    seconds: float = 0.0
    from_cache: bool = False
    #: the last block computed (``capture(upto=...)``); later blocks hold NaN
    upto: int | None = None

    def layer(self, block: int) -> np.ndarray:
        """Raw ``[n, d]`` activations at one block."""
        if self.raw is None:
            raise ValueError("raw activations were not kept (use keep_raw=True)")
        if self.upto is not None and block > self.upto:
            raise ValueError(f"block {block} was not captured (the pass stopped after block {self.upto})")
        return self.raw[:, block, :]

    def mean_norm(self) -> np.ndarray:
        """Mean activation L2 norm per block."""
        if self.raw is not None:
            return np.linalg.norm(self.raw.astype(np.float64), axis=2).mean(axis=0)
        assert self.moments is not None
        return self.moments.mean_norm


# ----------------------------------------------------------------------------- templating


def template_fingerprint(fm: FitModel, system: str | None) -> str:
    """Hash of the chat template (and system prompt): a different one changes every activation."""
    text = json.dumps([getattr(fm.tokenizer, "chat_template", None), system], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render(fm: FitModel, prompt: str, system: str | None = None) -> str:
    """The prompt as the model sees it: chat template plus generation prompt (a template without a
    system role gets ``system`` in the first user turn, as the llama.cpp side does)."""
    from rs_local.templating import apply_template, one_turn

    return apply_template(lambda m: fm.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          one_turn(prompt, system), getattr(fm, "path", "the model"))


def template_suffix(fm: FitModel, system: str | None = None) -> str:
    """Text the template puts after the user's message (the post-instruction tokens)."""
    return render(fm, _SENTINEL, system).rsplit(_SENTINEL, 1)[-1]


def tokenize(fm: FitModel, prompts: Sequence[str], system: str | None = None) -> tuple[list[list[int]], list[int]]:
    """Token ids per prompt and how many trailing tokens belong to the template suffix.

    The suffix is located by character offsets, so a token that merges the user's last
    characters with the template is counted as the user's (never as post-instruction).
    """
    suffix_len = len(template_suffix(fm, system))
    limit = trained_context(fm)
    ids, n_suffix = [], []
    for i, p in enumerate(prompts):
        text = render(fm, p, system)
        start = len(text) - suffix_len
        enc = fm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        toks = list(enc["input_ids"])
        if limit is not None and len(toks) > limit:
            raise RsLocalError(_too_long(i, p, len(toks), limit, fm.name))
        offsets = enc.get("offset_mapping")
        if offsets:
            k = sum(1 for a, _ in offsets if a >= start)
        else:  # slow tokenizer: count the suffix's own tokens
            k = len(fm.tokenizer(text[start:], add_special_tokens=False)["input_ids"])
        ids.append(toks)
        n_suffix.append(max(1, min(k, len(toks))))
    return ids, n_suffix


def trained_context(fm: FitModel) -> int | None:
    """Tokens the model was trained on (its config's ``max_position_embeddings``); None if unknown."""
    config = getattr(fm.model.config, "text_config", None) or fm.model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _too_long(index: int, prompt: str, n: int, limit: int, model: str) -> str:
    """Why a prompt cannot be read: a 10-MB line was a 6-TB allocation and a torch traceback."""
    from rs_local.prompts import prompt_opening

    return (f"{prompt_opening(index, prompt)} is {n:,} tokens with the chat template, and {model} was "
            f"trained on {limit:,}: shorten it or leave it out")


# ----------------------------------------------------------------------------- forward pass


def _pad_id(fm: FitModel) -> int:
    tok = fm.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped by similar length (little padding), longest first (memory peak early): at
    most ``batch_size`` a group and, where ``max_tokens`` is given (the refusal gradients' memory
    bound), at most that many padded tokens (rows x longest), so long prompts run in smaller
    batches instead of exhausting memory. A prompt longer than ``max_tokens`` runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group and len(group) < batch_size and (max_tokens is None or (len(group) + 1) * lengths[group[0]] <= max_tokens):
            group.append(i)
        else:
            groups.append([i])
    return groups


class _Stop(Exception):
    """Raised by the hook of the last block a capture reads: the rest of the forward pass is not needed."""


@dataclass
class _Head:
    """The tokens every prompt of a capture starts with, evaluated once: their keys and values."""

    length: int
    cache: Any  # transformers Cache holding the head's keys and values (never mutated; copied per batch)


def _shared_head(fm: FitModel, ids: list[list[int]], n_suffix: list[int], upto: int) -> _Head | None:
    """Evaluate the common token prefix once, or None when it is too short to be worth it.

    The head never reaches into a prompt's template suffix (``post_instruction`` averages those
    rows, so they must be computed in the batch) and leaves every prompt at least one token.
    A batch then holds head, padding, prompt: exact where attention masks by position id, not
    where a layer counts cache slots (sliding windows, whose mask is built by slot in
    Transformers 5, and recurrent or convolutional state), so those models never share a head.
    The shortest and the longest prompt are also evaluated as one padded batch both ways, and
    the head is used only if they agree; otherwise, or if Transformers rejects the cache, every
    prompt is evaluated whole, as before.
    """
    import os

    import torch

    if len(ids) < 2 or not _attention_only(fm):
        return None
    n = len(os.path.commonprefix(ids))
    n = min([n] + [len(x) - max(1, k) for x, k in zip(ids, n_suffix)])
    if n < MIN_HEAD_TOKENS:
        return None
    tokens = torch.tensor([ids[0][:n]], dtype=torch.long)
    pair = sorted({min(range(len(ids)), key=lambda i: len(ids[i])), max(range(len(ids)), key=lambda i: len(ids[i]))})
    pair_ids, pair_suffix = [ids[i] for i in pair], [n_suffix[i] for i in pair]
    try:
        head = _Head(n, _forward(fm, tokens, torch.ones_like(tokens), torch.arange(n).unsqueeze(0), None, upto,
                                 lambda *_: None, keep_cache=True))
        shared = _run_batch(fm, pair_ids, pair_suffix, "last", upto, head)[:, : upto + 1]
    except Exception:  # noqa: BLE001 -- an optimisation on library internals; the whole pass is the reference
        return None
    whole = _run_batch(fm, pair_ids, pair_suffix, "last", upto, None)[:, : upto + 1]
    scale = np.abs(whole).max(axis=-1, keepdims=True) + 1e-6
    return head if float(np.max(np.abs(shared - whole) / scale)) < HEAD_TOLERANCE else None


def _attention_only(fm: FitModel) -> bool:
    """True when every layer is full attention (the config's ``layer_types``, where it has them;
    a config without them and without a sliding window is a plain attention stack)."""
    config = getattr(fm.model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False


def _forward(fm: FitModel, input_ids, mask, position_ids, past, upto: int, record, keep_cache: bool = False) -> Any:
    """Run the base model with ``record(block, hidden)`` hooked on blocks 0..``upto``; stop after ``upto``.

    ``past``: keys and values of earlier tokens (the shared head). ``keep_cache``: return the
    keys and values of this pass (filled for blocks 0..``upto``), otherwise none are kept.
    """
    import torch

    cache = past
    if keep_cache and cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=fm.model.config)

    def make_hook(block: int):
        def hook(_module, _inputs, output):
            record(block, output[0] if isinstance(output, tuple) else output)
            if block == upto and upto < fm.n_layer - 1:
                raise _Stop
        return hook

    handles = [blk.register_forward_hook(make_hook(i)) for i, blk in enumerate(fm.blocks) if i <= upto]
    try:
        with torch.inference_mode():
            fm.base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                    use_cache=cache is not None, **{_cache_kwarg(fm): cache})
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return cache


def _cache_kwarg(fm: FitModel) -> str:
    """The name the model's forward takes its key/value cache by: ``cache`` in recent Transformers 5.x,
    ``past_key_values`` before. The old name still works there but prints a FutureWarning on every
    capture and goes away in 5.40, inside the range rs-local accepts, so the name is read off the signature
    (once per model class: this runs for every batch)."""
    return _cache_kwarg_of(type(fm.base))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    import inspect

    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a readable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _run_batch(fm: FitModel, ids: list[list[int]], n_suffix: list[int], position: str, upto: int,
               head: _Head | None = None) -> np.ndarray:
    """Forward one left-padded batch; return ``[b, n_layer, d]`` float32 at the chosen position
    (NaN after block ``upto``, which the pass never reaches). With ``head``, the rows hold only the
    tokens after it, and the batch attends to the head's keys and values."""
    import copy

    import torch

    h = head.length if head is not None else 0
    ids = [x[h:] for x in ids]
    b, t = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((b, t), _pad_id(fm), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for row, toks in enumerate(ids):
        input_ids[row, t - len(toks) :] = torch.tensor(toks, dtype=torch.long)
        mask[row, t - len(toks) :] = 1
    position_ids = h + (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    if head is not None:
        past = copy.deepcopy(head.cache)
        past.batch_repeat_interleave(b)
        mask = torch.cat([torch.ones((b, h), dtype=torch.long), mask], dim=1)
    if position == "post_instruction":
        k = torch.tensor(n_suffix).unsqueeze(1)
        sel = (torch.arange(t).unsqueeze(0) >= t - k).to(fm.model.dtype).unsqueeze(-1)  # [b, t, 1]
        denom = k.to(torch.float32)
    out = torch.full((b, fm.n_layer, fm.n_embd), float("nan"), dtype=torch.float32)

    def record(block: int, hs) -> None:
        if position == "last":
            out[:, block] = hs[:, -1, :].float()
        else:
            out[:, block] = (hs * sel).sum(dim=1).float() / denom

    _forward(fm, input_ids, mask, position_ids, past, upto, record)
    return out.numpy()


# ----------------------------------------------------------------------------- public API


def capture(
    fm: FitModel,
    prompts: Sequence[str],
    *,
    position: str = "last",
    batch_size: int = 16,
    system: str | None = None,
    keep_raw: bool | None = None,
    moments: bool = False,
    weights: Sequence[float] | None = None,
    with_cov: bool = True,
    cache: bool | str | Path = False,
    progress: Progress | None = None,
    upto: int | None = None,
    share_head: bool = True,
    bf16: bool = False,
) -> Activations:
    """Activations after every block for ``prompts`` (llama.cpp block indices).

    ``keep_raw=None`` keeps raw arrays when they fit in :data:`RAW_BUDGET_BYTES`; ``moments``
    also accumulates streaming statistics (weighted by ``weights``; covariance if
    ``with_cov``). ``cache`` is False, True (rs-local home) or a directory. ``progress(done, n)``
    follows the prompts through the model (a CLI draws the bar; nothing is printed here).
    ``upto``: the last block the caller needs; the pass stops there and later blocks read NaN.
    ``share_head=False`` evaluates every prompt whole (the reference the shared head is tested against).
    ``bf16``: the pass under bfloat16 autocast (1.5x faster on CPUs with native bfloat16; each
    row moves by ~1% of its norm, so it is part of the cache key).
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position '{position}' (choose from {', '.join(POSITIONS)})")
    if not prompts:
        raise ValueError("no prompts to capture")
    n, L, d = len(prompts), fm.n_layer, fm.n_embd
    if keep_raw is None:
        keep_raw = n * L * d * 4 <= RAW_BUDGET_BYTES
    if not keep_raw and not moments:
        moments = True
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} prompts")
    if upto is not None and not 0 <= upto < L:
        raise ValueError(f"upto={upto} is outside the model's blocks 0-{L - 1}")
    upto = None if upto == L - 1 else upto  # None: the whole pass, whichever way it was asked for
    cache_file = _cache_file(cache, fm, prompts, system, position, keep_raw, moments, w, with_cov, upto, bf16)
    if cache_file is not None and is_cached_file(cache_file):
        loaded = _load_cached(cache_file)
        if loaded is not None:
            return loaded
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        acts = _capture_uncached(fm, prompts, position, batch_size, system, keep_raw, moments, w, with_cov, progress,
                                 upto, share_head)
    if cache_file is not None:
        _save_cached(cache_file, acts)
    return acts


def _capture_uncached(fm, prompts, position, batch_size, system, keep_raw, moments, w, with_cov, progress,
                      upto=None, share_head=True) -> Activations:
    n, L, d = len(prompts), fm.n_layer, fm.n_embd
    ids, n_suffix = tokenize(fm, prompts, system)
    last = L - 1 if upto is None else upto  # upto is None or below the last block (see capture)
    head = _shared_head(fm, ids, n_suffix, last) if share_head else None
    raw = np.empty((n, L, d), dtype=np.float32) if keep_raw else None
    stats = StreamingMoments(L, d, with_cov=with_cov) if moments else None
    start, done = time.perf_counter(), 0
    for idx in token_batches([len(x) for x in ids], max(1, batch_size), None):
        out = _run_batch(fm, [ids[i] for i in idx], [n_suffix[i] for i in idx], position, last, head)
        if raw is not None:
            raw[idx] = out
        if stats is not None:
            stats.update(out, None if w is None else w[idx])
        done += len(idx)
        if progress:
            progress(done, n)
    seconds = time.perf_counter() - start
    return Activations(n, L, d, position, raw, stats, n_tokens=sum(len(x) for x in ids), seconds=seconds,
                       upto=upto)


# ----------------------------------------------------------------------------- disk cache


def cache_dir() -> Path:
    from rs_local.models import home_dir

    return home_dir() / "activations"


def _cache_file(cache, fm, prompts, system, position, keep_raw, moments, w, with_cov, upto=None,
                bf16: bool = False) -> Path | None:
    if cache is False or cache is None:
        return None
    root = cache_dir() if cache is True else Path(cache)
    key = {
        "v": CACHE_VERSION,
        "model": fm.fingerprint,
        "prompts": prompts_hash(prompts),
        "template": template_fingerprint(fm, system),
        "position": position,
        "raw": bool(keep_raw),
        # moments depend on the weights; raw activations do not
        "moments": [bool(moments), bool(with_cov), None if (w is None or not moments) else hashlib.sha256(w.tobytes()).hexdigest()[:16]],
    }
    if upto is not None:
        key["upto"] = int(upto)  # absent for whole passes: their cache entries stay valid
    if bf16:
        key["bf16"] = True  # absent for float32 passes, as above
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / f"{digest}.npz"


def _save_cached(path: Path, acts: Activations) -> None:
    """Best effort: a full disk or read-only home must not fail the fit."""
    arrays: dict[str, Any] = {
        "meta": np.array(json.dumps({"n": acts.n_prompts, "L": acts.n_layer, "d": acts.d, "position": acts.position, "n_tokens": acts.n_tokens,
                                   "upto": acts.upto, "entry": path.stem}))
    }
    if acts.raw is not None:
        arrays["raw"] = acts.raw
    if acts.moments is not None:
        arrays.update({f"m_{k}": v for k, v in acts.moments.to_arrays().items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, force=True) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: savez would append ".npz" to a temp name
    except (OSError, FileProblem):
        pass


def _load_cached(path: Path) -> Activations | None:
    """The cached capture, or None when the entry is unreadable or inconsistent (then it is recaptured).

    Any failure counts: a cache entry is ours, but a disk, a copy or another version can damage it,
    and numpy reports a damaged ``.npz`` as ``BadZipFile``/``EOFError``, not ``OSError``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            raw = data["raw"] if "raw" in data else None
            m = {k[2:]: data[k] for k in data.files if k.startswith("m_")}
        if meta.get("entry") != path.stem:  # another key's entry under this name (copied, swapped): a fit on
            return None                     # it came out flipped, cosine -1 per block, with no warning
        n, n_layer, d = (int(meta[k]) for k in ("n", "L", "d"))
        if raw is not None and raw.shape != (n, n_layer, d) or meta["position"] not in POSITIONS:
            return None
        stats = StreamingMoments.from_arrays(m) if m else None
        if stats is not None and stats.mean.shape != (n_layer, d):
            return None
        upto = meta.get("upto")
        return Activations(n, n_layer, d, meta["position"], raw, stats, n_tokens=int(meta["n_tokens"]),
                           from_cache=True, upto=None if upto is None else int(upto))
    except Exception:  # noqa: BLE001 - whatever is wrong with the entry, capturing again is the remedy
        return None
