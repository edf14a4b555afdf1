"""Sample k answers per prompt (optionally steered) into a resumable JSONL log.

The judge needs several answers per prompt to turn one model's behaviour into a graded score,
plus each answer's length-normalised log-probability to weight them. Every answer's seed is
derived from (base seed, prompt index, sample index), not from a running RNG, so an answer
regenerated after a crash is the same answer, and skipping finished ones changes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rs_local.callbacks import Progress
from rs_local.judge.jsonl import AppendLog
from rs_local.models import file_identity
from rs_local.prompts import prompts_hash
from rs_local.runtime.runner import longest_prompt
from rs_local.templating import one_turn
from rs_local.runtime.sampling import SamplingParams

RESPONSES_KIND = "responses"


def prompt_id(prompt: str) -> str:
    """A short content id: stable across files and reorderings, used to group answers."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def sample_seed(base_seed: int, prompt_index: int, sample: int) -> int:
    """The seed of one answer, a pure function of where it sits (so a resumed run redraws it identically)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class RespondSettings:
    """How answers are sampled; all of it goes into the log's header."""

    samples: int = 5
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    system: str | None = None

    def sampling(self, prompt_index: int, sample: int) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, sample_seed(self.seed, prompt_index, sample))


@dataclass
class RespondReport:
    total: int
    already_done: int
    generated: int
    path: Path


def _row_key(row: dict) -> tuple[int, int]:
    return int(row["prompt_index"]), int(row["sample"])


def respond_config(model_path: str | Path, settings: RespondSettings, prompts: Sequence[str], vectors=(), layer_range=None) -> dict:
    """Everything that decides the answers: model file, steering, sampling, the prompt list."""
    model_path = Path(model_path)
    weights = file_identity(model_path)
    return {
        "model": model_path.name,
        "model_bytes": weights.get("size"),
        "model_edges": weights.get("edges"),  # a same-name, same-size model copied over it is another model
        # the contents, not only the path as typed: another vector at that relative path, or one refitted
        # in place, resumed the log and mixed two vectors' answers in it
        "vectors": [{"path": v.source or v.metadata.get("path"), "scale": s, "digest": v.digest()} for v, s in vectors],
        "layers": list(layer_range) if layer_range else None,
        "samples": settings.samples,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "seed": settings.seed,
        "system": settings.system,
        "prompts": prompts_hash(prompts),
        "n_prompts": len(prompts),
    }


def respond(
    runner,
    prompts: Sequence[str],
    output: str | Path,
    settings: RespondSettings = RespondSettings(),
    *,
    vectors: Sequence = (),
    layer_range: tuple[int, int] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> RespondReport:
    """Write ``settings.samples`` answers per prompt to ``output``, continuing a previous run of the same settings.

    ``vectors`` (``[(ControlVector, scale)]``) are applied for the whole run. Rows:
    ``prompt_id, prompt_index, sample, seed, prompt, response, mean_logprob, tokens, finish_reason``.
    """
    if settings.samples < 1:
        raise ValueError("samples must be >= 1")
    runner.set_vectors(list(vectors), layer_range)
    longest_prompt(runner, [one_turn(p, settings.system) for p in prompts], runner.n_ctx - 2,  # before the log opens
                   f"the context holds {runner.n_ctx:,} (use --ctx, or shorten it)")
    config = respond_config(runner.path, settings, prompts, vectors, layer_range)
    total = len(prompts) * settings.samples
    with AppendLog.open(output, RESPONSES_KIND, config, _row_key, force=force) as log:
        already = len(log.done)
        done = already
        if progress:
            progress(done, total)
        for pi, prompt in enumerate(prompts):
            messages = one_turn(prompt, settings.system)
            for si in range(settings.samples):
                if (pi, si) in log:
                    continue
                log.append(_answer_row(runner, messages, prompt, pi, si, settings))
                done += 1
                if progress:
                    progress(done, total)
    return RespondReport(total, already, done - already, Path(output))


def check_respond_output(output: str | Path, model_path: str | Path, settings: RespondSettings, prompts: Sequence[str],
                         vectors=(), layer_range=None, force: bool = False) -> None:
    """Fail before loading the model when ``output`` holds rows from other settings."""
    AppendLog.check(output, RESPONSES_KIND, respond_config(model_path, settings, prompts, vectors, layer_range), force)


def _answer_row(runner, messages, prompt: str, pi: int, si: int, settings: RespondSettings) -> dict:
    sampling = settings.sampling(pi, si)
    gen = runner.chat(messages, max_tokens=settings.max_tokens, sampling=sampling)
    return {
        "prompt_id": prompt_id(prompt),
        "prompt_index": pi,
        "sample": si,
        "seed": sampling.seed,
        "prompt": prompt,
        "response": gen.text,
        "mean_logprob": gen.mean_logprob,
        "tokens": len(gen.tokens),
        "finish_reason": gen.finish_reason,
    }
