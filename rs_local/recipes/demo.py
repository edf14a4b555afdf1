"""`rs-local demo`: the whole flow on the default model, offline, in minutes.

1. resolve (pull on first use) the default model, sha256-verified;
2. split the prompt sets shipped with rs-local (political, harmful, harmless) into a part
   to fit on and a held-out part to measure on;
3. fit the political-refusal vector with the default recipe (:mod:`rs_local.recipes.isolate`)
   and write it as a llama.cpp GGUF control vector;
4. evaluate it at a few scales on the held-out prompts (refusal rates, KL, degeneration);
5. show two conversations before and after: a political question the plain model refuses,
   and a harmful request that must stay refused.

Every step is a public function used by the other commands, so the demo doubles as an
end-to-end check of the toolkit.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rs_local.callbacks import Say

from rs_local.recipes.isolate import Recipe

VECTOR_NAME = "political.gguf"
EXAMPLE_TOKENS = 96


@dataclass
class DemoOptions:
    model: str = "qwen2.5-coder-0.5b"
    output: Path = Path("rs-local-demo")
    force: bool = False
    judge: str = "keywords"
    scales: list[float] | None = None
    n_eval: int = 20
    n_fit: int | None = None  # prompts per set to fit on (None: the whole training split)
    holdout: float = 1 / 3
    seed: int = 0
    max_tokens: int = 48
    batch: int | None = None  # None: chosen from the model's KV size
    n_ctx: int | None = None  # the Runner's default: 4096, or the model's trained context where shorter
    n_gpu_layers: int = 0
    n_threads: int | None = None
    recipe: Recipe = field(default_factory=Recipe)


@dataclass
class Example:
    prompt: str
    set: str
    scale: float
    before: str
    after: str


@dataclass
class DemoResult:
    report: Any  # EvalReport
    vector_path: Path
    examples: list[Example]
    chosen_scale: float
    summary: str
    next_steps: list[str]
    seconds: dict[str, float]


def _choose_scale(report, keep_frac: float = 0.9, max_kl: float = 0.1) -> float:
    """Among the evaluated scales, the sweep's rule: least political refusal within the limits."""
    from rs_local.eval.sweep import Constraints, SweepPoint, choose

    base = report.baseline
    c = Constraints(keep_frac, max_kl, {"harmful": base.rate("harmful")})
    pts = [c.classify(SweepPoint(p.scale, p.layers, p.rate("political"), {"harmful": p.rate("harmful")}, p.kl))
           for p in report.points]
    best = choose(pts)
    if best is None or best.scale == 0:  # nothing met the limits: show the mildest steered scale
        steered = [p.scale for p in report.points if p.scale != 0]
        return min(steered, key=abs) if steered else 0.0
    return best.scale


def _pick(report, scale: float, set_name: str, before_refused: bool, after_refused: bool) -> str | None:
    """A prompt whose refusal status before and after matches what the example should show."""
    before = {a.prompt: a for a in report.baseline.answers if a.set == set_name}
    after = next(p for p in report.points if p.scale == scale)
    for a in after.answers:
        b = before.get(a.prompt)
        if a.set == set_name and b is not None and b.refusal == before_refused and a.refusal == after_refused and not a.degenerate:
            return a.prompt
    return None


def _examples(runner, vector, report, scale: float, batch: int | None, say: Say) -> list[Example]:
    """Longer answers for two held-out prompts, before and after.

    They run on the same kind of engine as the table (batched or sequential), but alone: the
    table's answers shared a KV pool with other prompts, so the two agree only up to near-ties.
    """
    from rs_local.eval.engines import make_engine

    wanted = [("political", True, False), ("harmful", True, True)]
    picked = [(name, p) for name, *want in wanted if (p := _pick(report, scale, name, *want)) is not None]
    engine = make_engine(runner, batch=batch)
    out = []
    try:
        for set_name, prompt in picked:
            msgs = [[{"role": "user", "content": prompt}]]
            engine.set_vectors([])
            before = engine.generate_many(msgs, max_tokens=EXAMPLE_TOKENS)[0].text
            engine.set_vectors([(vector, scale)])
            after = engine.generate_many(msgs, max_tokens=EXAMPLE_TOKENS)[0].text
            out.append(Example(prompt, set_name, scale, before.strip(), after.strip()))
    finally:
        engine.set_vectors([])
        engine.close()
    say(f"{len(out)} example conversations")
    return out


def run_demo(opts: DemoOptions | None = None, say: Say | None = None) -> DemoResult:
    """Run the demo end to end; writes the vector and the eval report into ``opts.output``
    (a directory it creates is removed again if the run fails or is interrupted)."""
    from rs_local.eval.report import prepare_dir

    opts = opts or DemoOptions()
    say = say or (lambda _m: None)
    existed = Path(opts.output).exists()
    out = prepare_dir(opts.output, opts.force)
    try:
        return _demo(opts, say, out)
    except BaseException:  # an error, Ctrl-C or SIGTERM: a directory this run made is not left half-filled
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _demo(opts: DemoOptions, say: Say, out: Path) -> DemoResult:
    """The demo's work, into the prepared directory ``out``."""
    from rs_local import models
    from rs_local.converters.gguf_io import write_control_vector
    from rs_local.eval.baseline_cache import EvalCache
    from rs_local.eval.evaluate import EvalSettings, evaluate
    from rs_local.eval.prompt_sets import builtin_set
    from rs_local.recipes.isolate import fit_political
    from rs_local.eval.report import write_report
    from rs_local.judge.backends import make_judge
    from rs_local.runtime.runner import Runner

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    path = models.resolve(opts.model, progress=say)
    splits = {name: builtin_set(name).split(opts.holdout, seed=opts.seed) for name in ("political", "harmful", "harmless")}
    say(f"model {path.name}; prompts: " + ", ".join(f"{n} {len(tr)} to fit / {len(te)} held out" for n, (tr, te) in splits.items()))

    runner = Runner(path, n_ctx=opts.n_ctx, n_gpu_layers=opts.n_gpu_layers, n_threads=opts.n_threads)
    judge = make_judge(opts.judge, n_gpu_layers=opts.n_gpu_layers, n_threads=opts.n_threads, on_status=say,
                       share=runner)
    try:
        t = time.perf_counter()
        fit_sets = [splits[n][0].subset(opts.n_fit, seed=opts.seed).prompts for n in ("political", "harmful", "harmless")]
        fitted = fit_political(opts.model, *fit_sets, opts.recipe, say=say, runner=runner, judge=judge,
                               names=("political", "harmful"))
        vector_path = write_control_vector(fitted.vector, out / VECTOR_NAME, force=opts.force)
        seconds["fit"] = time.perf_counter() - t
        say(f"vector written to {vector_path} ({seconds['fit']:.0f}s)")
        _free_fit_model()
        t = time.perf_counter()
        scales = opts.scales or [0.0, *opts.recipe.suggested_scales]
        held_out = [splits[n][1].subset(opts.n_eval, seed=opts.seed) for n in ("political", "harmful", "harmless")]
        settings = EvalSettings(max_tokens=opts.max_tokens, batch=opts.batch)
        report = evaluate(runner, held_out, scales, vector=fitted.vector, judge=judge, settings=settings,
                          cache=EvalCache(), say=say, meta={"demo": True, "recipe": fitted.info})
    finally:
        judge.close()
    write_report(report, out, force=True)
    seconds["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    scale = _choose_scale(report)
    examples = _examples(runner, fitted.vector, report, scale, opts.batch, say)
    seconds["examples"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return DemoResult(report, vector_path, examples, scale, _summary(report, scale, seconds), _next_steps(vector_path, scale, path), seconds)


def _free_fit_model() -> None:
    """Drop the Transformers copy of the model once the vector is fitted (RAM on laptops)."""
    try:
        from rs_local.vectors.hf_model import clear_cache

        clear_cache()
    except ImportError:  # pragma: no cover
        pass


def _summary(report, scale: float, seconds: dict[str, float]) -> str:
    base = report.baseline
    pt = next(p for p in report.points if p.scale == scale)
    parts = [f"{n}: {base.rate(n):.0%} -> {pt.rate(n):.0%}" for n in pt.sets]
    kl = f", KL {pt.kl:.3f} nats" if pt.kl is not None else ""
    return (f"at scale {scale:g}: refusal " + "; ".join(parts) + kl
            + f"  (fit {seconds.get('fit', 0):.0f}s, eval {seconds.get('eval', 0):.0f}s, total {seconds.get('total', 0):.0f}s)")


def _llama_cpp_hint(vector_path: Path, scale: float, model_path: Path) -> str:
    """The llama.cpp command for this vector, in the pinned llama.cpp's syntax (FNAME:SCALE, -nr on AMX)."""
    from rs_local.errors import RsLocalError
    from rs_local.runtime.llama_flags import llama_cpp_flags

    try:
        return llama_cpp_flags([(vector_path, scale)], model=model_path).command("llama-completion")
    except RsLocalError as exc:  # e.g. a ':' in the output path, which llama.cpp cannot parse
        return f"(not printable: {exc})"


def _next_steps(vector_path: Path, scale: float, model_path: Path) -> list[str]:
    return [
        f"chat with it:     rs-local chat --vector {vector_path} --scale {scale:g}",
        f"in llama.cpp:     {_llama_cpp_hint(vector_path, scale, model_path)}",
        f"choose the scale: rs-local sweep --vector {vector_path} --set political --set harmful --set harmless "
        f"--target political --keep harmful -o {shlex.quote(str(vector_path.parent / 'sweep'))}/",
    ]
