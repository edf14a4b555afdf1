"""Where the seconds of ``isolate`` and ``eval`` go (issue 16), with peak RSS.

    python benchmarks/speed_profile.py                      # small settings, a few minutes on 2 cores
    python benchmarks/speed_profile.py --n 0 --rounds 2     # the shipped sets whole (isolate target)
    python benchmarks/speed_profile.py --json out.json      # also write the profile as JSON
    python benchmarks/speed_profile.py --n 0 --vector v.gguf  # the evaluation alone (no isolate before it)
    python benchmarks/speed_profile.py --labelling --n 0    # labelling only: whole answers vs early stop
    python benchmarks/speed_profile.py --labelling --head --n 0 --repeat 2  # template head per prompt vs shared

Settings (printed with the result): Qwen2.5-Coder-0.5B (the default model, the one that
refuses), the shipped political/harmful/harmless sets cut to ``--n`` prompts each (0 = whole
sets), the default recipe (blocks 8-16, 2-token openings, 32-token labelling answers, two
rounds), the keyword judge, then an evaluation of the fitted vector at ``--scales`` on the
same prompts (48-token answers, 16 KL tokens). Every cache is off (activations, labels, evaluation
baselines) except the dequantized-model cache of ``rs_local.vectors.hf_cache``, which a user has
from their second fit on: the settings line says whether the Transformers load read it.

Phases are measured by wrapping the library's own functions with timers (model loads,
labelling generation, judging, activation capture, gradient passes, KL teacher forcing);
nothing is replaced. ``other`` is the wall time no phase accounts for. The machine is shared:
absolute seconds are upper bounds, the split between phases is what to read.

``--labelling`` measures only isolate's labelling step (the plain model's greedy 32-token
answers to the sets, keyword verdicts), twice in the same run on the same model load: whole
answers, then answers that stop once the keyword verdict and the first two words are settled
(``EvalSettings(settle=2)``). It prints the seconds of each and their ratio, the generated
tokens (exact, machine-independent), and checks that both give the same verdicts and the same
first two tokens. ``--repeat 2`` runs whole, early, early, whole, so a change in the machine's
load during the run weighs on both modes alike. ``--labelling --head`` compares, the same way, the
chat template's head evaluated with every prompt against evaluated once per call and restored.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Profile:
    """Seconds and calls per phase; phases may nest (an outer phase includes its inner ones)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        """Time every call of ``owner.attr`` under ``phase`` (the original still runs)."""
        original = getattr(owner, attr)
        prof = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                prof.seconds[phase] += time.perf_counter() - start
                prof.calls[phase] += 1

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _instrument(prof: Profile) -> None:
    """Timers on the functions the two commands spend their time in."""
    import rs_local.eval.engines as engines
    import rs_local.eval.evaluate as evaluate
    import rs_local.runtime.batched as batched
    import rs_local.runtime.runner as runner
    import rs_local.vectors.capture as capture
    import rs_local.vectors.hf_model as hf_model
    import rs_local.vectors.refusal_gradient as rg

    prof.wrap(runner.Runner, "__init__", "llama.cpp model load")
    prof.wrap(hf_model, "load_model", "transformers model load")
    prof.wrap(batched.BatchEngine, "generate_many", "generation (llama.cpp)")
    prof.wrap(batched.BatchEngine, "forced_logprobs", "teacher forcing: KL refs + KL (llama.cpp)")
    prof.wrap(engines.SequentialEngine, "generate_many", "generation (llama.cpp)")
    prof.wrap(engines.SequentialEngine, "forced_logprobs", "teacher forcing: KL refs + KL (llama.cpp)")
    prof.wrap(evaluate.Evaluator, "_verdict", "judge")
    prof.wrap(evaluate.Evaluator, "__init__", "batch context setup")
    prof.wrap(capture, "capture", "activation capture (band lengths)")
    for where in ("rs_local.recipes.isolate", "rs_local.eval.recipe"):
        try:
            mod = __import__(where, fromlist=["label_refusals"])
        except ImportError:
            continue
        if hasattr(mod, "label_refusals"):
            prof.wrap(mod, "label_refusals", "labelling: generation + judge")
            break
    for name in ("refusal_gradients", "batched_refusal_gradients"):
        if hasattr(rg, name):
            prof.wrap(rg, name, "gradient passes (transformers)")


def _sets(n: int) -> dict[str, list[str]]:
    from rs_local.eval.prompt_sets import builtin_set

    return {name: builtin_set(name).subset(n or None, seed=0).prompts for name in ("political", "harmful", "harmless")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rs_local import models
    from rs_local.eval.baseline_cache import EvalCache
    from rs_local.eval.evaluate import EvalSettings, evaluate
    from rs_local.eval.prompt_sets import PromptSet
    from rs_local.runtime.runner import Runner

    try:
        from rs_local.recipes.isolate import Recipe, fit_political
    except ImportError:  # before the recipe's move
        from rs_local.eval.recipe import Recipe, fit_political

    prof = Profile()
    _instrument(prof)
    sets = _sets(args.n)
    recipe = Recipe(rounds=args.rounds, max_prompts=args.max_prompts)
    path = models.resolve(args.model)
    out: dict[str, Any] = {"settings": {"model": path.name, "prompts_per_set": {k: len(v) for k, v in sets.items()},
                                        "rounds": recipe.rounds, "layers": recipe.layers, "label_tokens": recipe.label_tokens,
                                        "max_prompts": recipe.max_prompts, "eval_scales": args.scales,
                                        "eval_max_tokens": args.max_tokens, "batch": args.batch or "default", "judge": "keywords",
                                        "caches": "off", "transformers_load": _load_source(path, args.model),
                                        "transformers_passes": _passes_dtype()}}
    t0 = time.perf_counter()
    if args.vector is None:
        with prof.phase("TOTAL isolate"):
            runner = Runner(path, n_ctx=2048)
            fitted = fit_political(args.model, sets["political"], sets["harmful"], sets["harmless"], recipe,
                                   say=print if args.verbose else None, runner=runner, cache=False)
        out["isolate"] = _table(prof, "TOTAL isolate")
        out["isolate"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
        out["isolate"]["refused"] = fitted.info.get("refused")
        vector = fitted.vector
    else:  # --vector: the evaluation alone, in a process that never ran torch
        from rs_local.converters.formats import load_vector

        runner = Runner(path, n_ctx=2048)
        vector = load_vector(args.vector)
        out["settings"]["vector"] = str(args.vector)
    prof.seconds.clear()
    prof.calls.clear()
    with prof.phase("TOTAL eval"):
        settings = EvalSettings(max_tokens=args.max_tokens, batch=args.batch)
        report = evaluate(runner, [PromptSet(k, v) for k, v in sets.items()], args.scales, vector=vector,
                          settings=settings, cache=EvalCache(None))
    out["eval"] = _table(prof, "TOTAL eval")
    out["eval"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["eval"]["answers"] = sum(len(p.answers) for p in report.points)
    out["eval"]["answer_tokens"] = sum(a.n_tokens for p in report.points for a in p.answers)
    out["eval"]["rates"] = {f"{p.scale:g}": {n: round(s.refusal_rate, 3) for n, s in p.sets.items()} | {"kl": p.kl}
                            for p in report.points}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    prof.restore()
    return out


def labelling(args: argparse.Namespace) -> dict[str, Any]:
    """isolate's labelling in two modes on one model load, alternating ABBA: seconds, tokens and
    whether verdicts and openings agree. Modes: whole answers vs early stop (``settle``), or with
    ``--head`` the template head evaluated per prompt vs shared per call
    (:func:`rs_local.runtime.batched.shared_head`), both with early stop as the recipe runs."""
    import rs_local.runtime.batched as batched
    from rs_local import models
    from rs_local.eval.prompt_sets import PromptSet
    from rs_local.runtime.runner import Runner

    shared = batched.MIN_SHARED_HEAD
    # mode -> (settle words, MIN_SHARED_HEAD); the first mode is the baseline of the ratios
    modes = ({"per_prompt": (2, 10**9), "shared": (2, shared)} if args.head
             else {"whole": (0, shared), "early_stop": (2, shared)})
    sets = [PromptSet(k, v) for k, v in _sets(args.n).items()]
    runner = Runner(models.resolve(args.model), n_ctx=2048)
    _label_once(runner, [PromptSet("warm-up", sets[0].prompts[:args.batch or batched.MAX_DEFAULT_BATCH])], 0, args)  # page the weights in
    runs: dict[str, dict[str, Any]] = {}
    try:
        for k in range(args.repeat):  # ABBA...: drift in the machine's load falls on both modes alike
            for mode in (list(modes) if k % 2 == 0 else list(modes)[::-1]):
                settle, batched.MIN_SHARED_HEAD = modes[mode]
                got = _label_once(runner, sets, settle, args)
                if mode in runs:
                    runs[mode]["s"] += got["s"]
                    assert got["rows"] == runs[mode]["rows"], "greedy labelling changed between repeats"
                else:
                    runs[mode] = got
    finally:
        batched.MIN_SHARED_HEAD = shared
    base, other = list(modes)
    a, b = runs[base].pop("rows"), runs[other].pop("rows")
    return {"settings": {"model": runner.path.name, "prompts": len(a), "label_tokens": args.label_tokens,
                         "batch": args.batch, "judge": "keywords", "cache": "off", "repeat": args.repeat},
            "modes": [base, other], **runs,
            "time_ratio": round(runs[other]["s"] / runs[base]["s"], 3),
            "token_ratio": round(runs[other]["tokens"] / runs[base]["tokens"], 3),
            "same_verdict": sum(x[0] == y[0] for x, y in zip(a, b)),
            "same_first_2_tokens": sum(x[1] == y[1] for x, y in zip(a, b))}


def _label_once(runner, sets, settle: int, args: argparse.Namespace) -> dict[str, Any]:
    """What ``label_refusals`` does (one evaluator, every set, keyword verdicts), timed."""
    from rs_local.eval.baseline_cache import EvalCache
    from rs_local.eval.evaluate import EvalSettings, Evaluator

    settings = EvalSettings(max_tokens=args.label_tokens, kl_set=None, batch=args.batch, settle=settle)
    ev = Evaluator(runner, sets, settings=settings, cache=EvalCache(None))
    reused0 = getattr(ev.engine, "head_tokens_reused", 0)
    rows, tokens, settled = [], 0, 0
    start = time.perf_counter()
    try:
        for s in sets:
            # answers once, judged as score_set judges them: with caching off, answers() then
            # score_set() would generate every answer twice and double the seconds of both modes
            for p, g in zip(s.prompts, ev.answers(s.name, 0.0)):
                rows.append((ev.judge.judge(p, g.text).verdict > 0, g.tokens[:2]))
                tokens += len(g.tokens)
                settled += g.finish_reason == "settled"
        reused = getattr(ev.engine, "head_tokens_reused", 0) - reused0
    finally:
        ev.close()
    return {"s": round(time.perf_counter() - start, 2), "tokens": tokens, "settled": settled,
            "refused": sum(r for r, _ in rows), "head_tokens_reused": reused, "rows": rows}


def _print_labelling(r: dict[str, Any]) -> None:
    print("settings:", json.dumps(r["settings"]))
    for mode in r["modes"]:
        m = r[mode]
        print(f"  {mode:10s} {m['s']:8.1f} s over {r['settings']['repeat']} passes; per pass {m['tokens']} answer tokens "
              f"({m['settled']} settled early, {m['head_tokens_reused']} prompt tokens restored instead of evaluated, "
              f"{m['refused']} refused)")
    n = r["settings"]["prompts"]
    base, other = r["modes"]
    print(f"{other} / {base}: time {r['time_ratio']:.2f}, tokens {r['token_ratio']:.2f}; "
          f"same verdict {r['same_verdict']}/{n}, same first 2 tokens {r['same_first_2_tokens']}/{n}")


def _load_source(path: Path, name: str) -> str:
    """Whether the Transformers load will read the dequantized-model disk cache (a cold GGUF load costs minutes)."""
    from rs_local.vectors import hf_cache, hf_model

    if not hf_cache.enabled():
        return "GGUF (RS_LOCAL_FIT_CACHE=0)"
    import transformers

    identity = hf_model.model_identity(path, name) | {"dtype": "float32"}
    warm = (hf_cache.entry_dir(identity, transformers.__version__) / hf_cache.DONE).is_file()
    return "disk cache (warm)" if warm else "GGUF (cold; the cache is written now)"


def _table(prof: Profile, total: str) -> dict[str, Any]:
    total_s = prof.seconds.get(total, 0.0)
    phases = {k: {"s": round(v, 2), "calls": prof.calls[k], "share": round(v / total_s, 3) if total_s else None}
              for k, v in sorted(prof.seconds.items(), key=lambda kv: -kv[1]) if k != total}
    return {"total_s": round(total_s, 2), "phases": phases}


def _print(result: dict[str, Any]) -> None:
    print("settings:", json.dumps(result["settings"]))
    for cmd in ("isolate", "eval"):
        if cmd not in result:
            continue
        r = result[cmd]
        print(f"\n{cmd}: {r['total_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB (process so far)")
        for name, p in r["phases"].items():
            share = f"{p['share']:.0%}" if p["share"] is not None else "-"
            print(f"  {name:48s} {p['s']:8.2f} s  {share:>5s}  ({p['calls']} calls)")
    print(f"\neval answers: {result['eval']['answers']} ({result['eval']['answer_tokens']} tokens); "
          f"rates: {json.dumps(result['eval']['rates'])}")
    if "isolate" in result:
        print(f"isolate refused (political/harmful): {result['isolate']['refused']}")
    print("(nested phases overlap: judge and generation sit inside labelling; shares need not sum to 100%)")


def _passes_dtype() -> str:
    """isolate's precision for its Transformers passes on this machine (bfloat16 where the CPU has it natively)."""
    try:
        from rs_local.runtime.host import decide_bf16
    except ImportError:  # code from before the choice existed: always float32
        return "float32"
    decision = decide_bf16()
    return f"{'bfloat16' if decision.enabled else 'float32'} ({decision.reason})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=16, help="prompts per shipped set (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=40)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, -1.0])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default: rs-local's, sized from the KV cache)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--vector", type=Path, default=None,
                    help="profile only the evaluation, of this vector file (no isolate, no torch in the process)")
    ap.add_argument("--labelling", action="store_true", help="only labelling: whole answers vs early stop")
    ap.add_argument("--head", action="store_true",
                    help="with --labelling: the template head evaluated per prompt vs shared per call")
    ap.add_argument("--label-tokens", type=int, default=32, help="answer tokens for --labelling (the recipe's)")
    ap.add_argument("--repeat", type=int, default=1, help="--labelling passes per mode, order alternating (seconds summed)")
    args = ap.parse_args(argv)
    result = labelling(args) if args.labelling else run(args)
    (_print_labelling if args.labelling else _print)(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
