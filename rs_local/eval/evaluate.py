"""Refusal rates and coherence of a steering vector, per scale and per prompt set.

For each scale: answer every prompt of every set with the vector applied (greedy by
default, short answers: a refusal shows in the first few dozen tokens), judge each answer
with the chosen judge and with the keyword baseline beside it, flag degenerate answers, and
on the KL set (harmless prompts) measure ``KL(plain || steered)`` over the first tokens of
the plain model's answer. Scale 0 is the plain model; its answers and KL references come
from the disk cache when they were computed before (:mod:`rs_local.eval.baseline_cache`).

:class:`Evaluator` evaluates one point at a time (what a sweep needs: it can ask for the KL
first and skip generating when the KL is already too high); :func:`evaluate` runs a list
of scales and returns an :class:`EvalReport`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from rs_local.callbacks import Say
from rs_local.errors import RsLocalError
from rs_local.eval import metrics
from rs_local.eval.baseline_cache import EvalCache, digest, model_key
from rs_local.eval.engines import make_engine, slot_size
from rs_local.eval.prompt_sets import PromptSet
from rs_local.runtime.engine import Engine
from rs_local.runtime.runner import Generation, Runner
from rs_local.runtime.sampling import SamplingParams
from rs_local.templating import one_turn
from rs_local.vectors.control_vector import ControlVector

if TYPE_CHECKING:  # the judge package is imported lazily (HTTP and llama.cpp backends)
    from rs_local.judge.backends import Judge

DEFAULT_KL_SET = "harmless"
_UNSET = object()


@dataclass
class EvalSettings:
    """What decides the answers and the metrics (all of it goes into report.json)."""

    max_tokens: int = 48
    kl_tokens: int = 16
    kl_set: str | None = DEFAULT_KL_SET
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch: int | None = None  # None: chosen from the model's KV size (rs_local.runtime.batched.default_batch)
    seq_ctx: int = 1024
    #: 0: whole answers. n >= 1: with the keyword judge, an answer stops as soon as its verdict
    #: and its first n words can no longer change (``rs_local.judge.keywords.settled``); for
    #: labelling, where only the verdict and the first tokens are read. Needs the batched
    #: engine; the KL set's answers (teacher-forced for the KL) are never cut.
    settle: int = 0
    #: True: a KV stream per sequence (~0.6x the speed): each answer independent of the batch where
    #: llama.cpp's kernels allow it (not Qwen2.5's Q4_K_M on AVX-512; see make_engine);
    #: False: one shared KV pool, faster, repeatable for the same prompts and batch
    #: (see :func:`rs_local.eval.engines.make_engine`).
    exact: bool = False

    def check(self) -> None:
        if self.max_tokens < 1:
            raise RsLocalError("max tokens must be >= 1")
        if self.kl_tokens < 1:
            raise RsLocalError("KL tokens must be >= 1")
        if self.batch is not None and self.batch < 1:
            raise RsLocalError("batch must be >= 1")
        if self.settle < 0:
            raise RsLocalError("settle (words) must be >= 0")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sampling"] = asdict(self.sampling)
        return d


@dataclass
class AnswerRecord:
    """One answer with every verdict and metric (a row of answers.jsonl)."""

    set: str
    scale: float
    layers: str | None
    prompt: str
    answer: str
    n_tokens: int
    finish_reason: str
    refusal: bool
    verdict: int
    confidence: float | None
    refusal_type: str | None
    keyword_refusal: bool
    degenerate: str | None
    kl: float | None = None


@dataclass
class SetScore:
    """Rates of one prompt set at one point."""

    set: str
    n: int
    refusal_rate: float
    keyword_rate: float
    degenerate_rate: float
    unparsed: int = 0
    kl: float | None = None


@dataclass
class EvalPoint:
    """Everything measured at one (scale, layer band)."""

    scale: float
    layers: tuple[int, int] | None
    sets: dict[str, SetScore] = field(default_factory=dict)
    answers: list[AnswerRecord] = field(default_factory=list)
    kl: float | None = None
    seconds: float = 0.0

    def rate(self, name: str) -> float:
        """The judge's refusal rate on set ``name`` (KeyError if it was not evaluated)."""
        return self.sets[name].refusal_rate

    @property
    def layers_label(self) -> str | None:
        return None if self.layers is None else f"{self.layers[0]}-{self.layers[1]}"


@dataclass
class EvalReport:
    """All points of an evaluation plus the settings that produced them."""

    points: list[EvalPoint]
    settings: EvalSettings
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> EvalPoint | None:
        return next((p for p in self.points if p.scale == 0), None)

    def set_names(self) -> list[str]:
        names: list[str] = []
        for p in self.points:
            names += [n for n in p.sets if n not in names]
        return names


def _sampling_key(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling settings as a cache key. ``logprobs`` (added later, for the server) is left out at its
    default, True, so answers cached before it existed keep their keys; False (NaN log-probs) keys apart."""
    d = asdict(sampling)
    if d.get("logprobs", True):
        d.pop("logprobs", None)
    return d


class Evaluator:
    """Evaluates a vector on prompt sets at any scale; holds the model, judges and caches.

    ``judge`` is any rs_local.judge backend (``judge(prompt, answer) -> Verdict``); None or
    the keyword judge means refusal is decided by keywords alone. The model runs through an
    :class:`Engine` made from ``runner`` and the settings (and closed with the evaluator), or
    through ``engine`` when one is given (it stays the caller's; ``runner`` may then be None).
    """

    def __init__(
        self,
        runner: Runner | None,
        sets: Sequence[PromptSet],
        *,
        engine: Engine | None = None,
        vector: ControlVector | None = None,
        judge: Judge | None = None,
        settings: EvalSettings | None = None,
        cache: EvalCache | None = None,
        say: Say | None = None,
    ):
        from rs_local.judge.keywords import KeywordJudge, settled

        self.runner = runner
        self.sets = {s.name: s for s in sets}
        if not self.sets:
            raise RsLocalError("no prompt sets to evaluate")
        self.vector = vector
        self.settings = replace(settings) if settings is not None else EvalSettings()
        self.settings.check()
        if self.settings.kl_set is not None and self.settings.kl_set not in self.sets:
            self.settings.kl_set = None
        self.keywords = KeywordJudge()
        self.judge = judge if judge is not None else self.keywords
        self.cache = cache if cache is not None else EvalCache(None)
        #: this run's answers and KL references by cache key, whatever the disk cache does: the KL
        #: reads the plain answers of its set several times per point (references, continuations,
        #: the set's own score), and with the disk cache off (``--no-cache``, the Python API's
        #: default) each read generated them again (an evaluation at two scales generated the
        #: harmless answers five times; 2x the run's seconds).
        self._memo: dict[str, Any] = {}
        self.say = say or (lambda _m: None)
        if engine is None and runner is None:
            raise RsLocalError("an evaluator needs a runner or an engine")
        if vector is not None and runner is not None:  # before the plain model's whole pass, not after it
            runner.check_vector(vector)
        self._owns_engine = engine is None
        s = self.settings
        if engine is None:  # slots large enough for the longest prompt and its answer (or one line naming it)
            s.seq_ctx = slot_size(runner, [(f"set {ps.name}", [self._messages(p) for p in ps.prompts])
                                           for ps in self.sets.values()], max(s.max_tokens, s.kl_tokens), s.seq_ctx)
        self.engine: Engine = engine if engine is not None else make_engine(runner, s.batch, s.seq_ctx, s.exact)
        self._model_key = model_key(self.engine.model_path)
        self._judge_key = self.judge.describe()
        words = self.settings.settle
        early = words > 0 and isinstance(self.judge, KeywordJudge) and hasattr(self.engine, "generate_until")
        self._settle: Callable[[str], bool] | None = (lambda text: settled(text, words)) if early else None
        self._applied: Any = _UNSET
        self.seconds_generating = 0.0

    def close(self) -> None:
        """Leave the model as it was found (no vector) and free the batch context (if ours)."""
        self.engine.set_vectors([])
        self._applied = _UNSET
        if self._owns_engine:
            self.engine.close()

    # -- steering state ------------------------------------------------------------------

    def use_vector(self, vector: ControlVector | None) -> None:
        """Evaluate another vector from now on (a policy's categories each bring their own)."""
        self.vector = vector
        self._applied = _UNSET

    def _apply(self, scale: float, layers: tuple[int, int] | None) -> None:
        state = (scale, layers) if (scale != 0 and self.vector is not None) else None
        if self._applied is not _UNSET and state == self._applied:
            return
        if state is None:
            self.engine.set_vectors([])
        else:
            self.engine.set_vectors([(self.vector, scale)], layers)
        self._applied = state

    def _steer_key(self, scale: float, layers) -> Any:
        """None for the plain model; otherwise what makes the steered model what it is."""
        if scale == 0 or self.vector is None:
            return None
        buf = np.ascontiguousarray(self.vector.to_buffer(self.engine.n_layer), dtype=np.float32)
        return {"vector": digest(buf.tobytes().hex()), "scale": float(scale), "layers": list(layers) if layers else None}

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        return one_turn(prompt, self.settings.system)

    def _gen_key(self, prompt: str, steer: Any, cut: bool = False) -> dict[str, Any]:
        """What decides an answer. A cut answer (settled early) is cached under its own key, which
        names the stop rule (the keyword judge's phrases and opening length, and the words kept):
        a later evaluation that wants whole answers must never be served a cut one, and a cut
        answer is only valid for the rule that cut it. Whole answers keep the key they always
        had, so existing caches stay valid. (A whole answer would also serve labelling, but
        looking up both keys would count a miss on every labelling hit.)"""
        s = self.settings
        key = {"model": self._model_key, "prompt": prompt, "system": s.system, "max_tokens": s.max_tokens,
               "sampling": _sampling_key(s.sampling), "engine": self.engine.kind, "steer": steer}
        if cut:
            key["settle"] = {"words": s.settle, "rule": self.keywords.describe()}
        return key

    def _stop_rule(self, set_name: str, whole: bool) -> Callable[[str], bool] | None:
        """The early-stop test for this set's answers, or None for whole answers (see ``EvalSettings.settle``)."""
        return None if whole or set_name == self.settings.kl_set else self._settle

    # -- generation ----------------------------------------------------------------------

    def answers(self, set_name: str, scale: float, layers: tuple[int, int] | None = None, *,
                whole: bool = False) -> list[Generation]:
        """Answers to one set at one scale (cached ones reused, the rest generated in batches).

        With ``settle`` on they may stop early, unless ``whole`` (the KL's continuations)."""
        prompts = self.sets[set_name].prompts
        steer = self._steer_key(scale, layers)
        stop = self._stop_rule(set_name, whole)
        keys = [self._gen_key(p, steer, cut=stop is not None) for p in prompts]
        out: list[Generation | None] = [self._recall("generation", k, self.cache.get_generation) for k in keys]
        todo = [i for i, g in enumerate(out) if g is None]
        if todo:
            self._apply(scale, layers)
            start = time.perf_counter()
            msgs = [self._messages(prompts[i]) for i in todo]
            opts = {"max_tokens": self.settings.max_tokens, "sampling": self.settings.sampling}
            gens = (self.engine.generate_until(msgs, stop, **opts) if stop is not None  # type: ignore[attr-defined]
                    else self.engine.generate_many(msgs, **opts))
            self.seconds_generating += time.perf_counter() - start
            for i, g in zip(todo, gens):
                out[i] = g
                self._keep("generation", keys[i], g, self.cache.put_generation)
        return [g for g in out if g is not None]

    def _recall(self, kind: str, key: Any, get: Callable[[Any], Any]) -> Any:
        """This run's result for ``key`` if it has one, else the disk cache's (kept for the run)."""
        slot = digest([kind, key])
        if slot not in self._memo:
            found = get(key)
            if found is None:
                return None
            self._memo[slot] = found
        return self._memo[slot]

    def _keep(self, kind: str, key: Any, value: Any, put: Callable[[Any, Any], None]) -> None:
        """Keep a new result for the run (where :meth:`_recall` looks first) and in the disk cache."""
        self._memo[digest([kind, key])] = value
        put(key, value)

    # -- KL ------------------------------------------------------------------------------

    def references(self, set_name: str) -> list[metrics.Reference]:
        """The plain model's top-k next-token rows along its own answers (cached)."""
        prompts = self.sets[set_name].prompts
        base = self.answers(set_name, 0.0, whole=True)
        conts = [g.tokens[: self.settings.kl_tokens] for g in base]
        keys = [{"model": self._model_key, "prompt": p, "system": self.settings.system, "answer": c,
                 "engine": self.engine.kind, "k": metrics.TOP_K} for p, c in zip(prompts, conts)]
        refs: list[metrics.Reference | None] = [self._recall("reference", k, self.cache.get_reference) for k in keys]
        todo = [i for i, r in enumerate(refs) if r is None]
        if todo:
            self._apply(0.0, None)
            got = self.engine.forced_logprobs([self._messages(prompts[i]) for i in todo], [conts[i] for i in todo],
                                              reduce=lambda _i, rows: metrics.topk_reference(rows))
            for i, ref in zip(todo, got):
                refs[i] = ref
                self._keep("reference", keys[i], ref, self.cache.put_reference)
        return [r for r in refs if r is not None]

    def kl(self, scale: float, layers: tuple[int, int] | None = None, set_name: str | None = None) -> list[float]:
        """Per-prompt mean KL(plain || steered) over the first ``kl_tokens`` answer tokens."""
        set_name = set_name or self.settings.kl_set
        if set_name is None:
            raise RsLocalError("no KL set: add a harmless set (e.g. --set harmless=FILE) or name one with --kl-set")
        prompts = self.sets[set_name].prompts
        if self._steer_key(scale, layers) is None:  # the plain model against itself: no pass needed
            return [0.0] * len(prompts)
        refs = self.references(set_name)
        base = self.answers(set_name, 0.0, whole=True)
        conts = [g.tokens[: self.settings.kl_tokens] for g in base]
        self._apply(scale, layers)

        def reduce(i: int, rows: np.ndarray) -> float:
            per_pos = metrics.kl_to_reference(refs[i], rows)
            return float(per_pos.mean()) if per_pos.size else 0.0

        return list(self.engine.forced_logprobs([self._messages(p) for p in prompts], conts, reduce=reduce))

    # -- judging -------------------------------------------------------------------------

    def _verdict(self, prompt: str, answer: str):
        from rs_local.judge.verdict import Verdict

        if self.judge is self.keywords:
            return self.keywords.judge(prompt, answer)
        key = {"judge": self._judge_key, "prompt": prompt, "answer": answer}
        cached = Verdict.from_row(self.cache.get_verdict(key))  # None: a miss, or an entry to judge again
        if cached is not None:
            return cached
        verdict = self.judge.judge(prompt, answer)
        self.cache.put_verdict(key, verdict.as_row())
        return verdict

    # -- one point -----------------------------------------------------------------------

    def score_set(self, set_name: str, scale: float, layers: tuple[int, int] | None = None,
                  kl_values: Sequence[float] | None = None) -> tuple[SetScore, list[AnswerRecord]]:
        """Answers, verdicts and rates of one set at one point."""
        prompts = self.sets[set_name].prompts
        gens = self.answers(set_name, scale, layers)
        label = None if layers is None else f"{layers[0]}-{layers[1]}"
        records = []
        for i, (p, g) in enumerate(zip(prompts, gens)):
            v = self._verdict(p, g.text)
            kw = self.keywords.judge(p, g.text).verdict > 0
            records.append(AnswerRecord(
                set=set_name, scale=float(scale), layers=label, prompt=p, answer=g.text, n_tokens=len(g.tokens),
                finish_reason=g.finish_reason, refusal=v.verdict > 0, verdict=int(v.verdict), confidence=v.confidence,
                refusal_type=v.refusal_type, keyword_refusal=kw, degenerate=metrics.degeneration(g.text, g.tokens),
                kl=None if kl_values is None else float(kl_values[i]),
            ))
        score = SetScore(
            set=set_name, n=len(records),
            refusal_rate=metrics.rate(r.refusal for r in records),
            keyword_rate=metrics.rate(r.keyword_refusal for r in records),
            degenerate_rate=metrics.rate(r.degenerate is not None for r in records),
            unparsed=sum(r.verdict == 0 for r in records),
            kl=None if kl_values is None else float(np.mean(kl_values)) if len(kl_values) else 0.0,
        )
        return score, records

    def point(self, scale: float, layers: tuple[int, int] | None = None, sets: Sequence[str] | None = None,
              with_kl: bool = True) -> EvalPoint:
        """Evaluate the named sets (all by default) at one scale and layer band."""
        start = time.perf_counter()
        names = list(sets) if sets is not None else list(self.sets)
        unknown = [n for n in names if n not in self.sets]
        if unknown:
            raise RsLocalError(f"unknown prompt set(s): {', '.join(unknown)} (have: {', '.join(self.sets)})")
        pt = EvalPoint(float(scale), layers)
        kl_set = self.settings.kl_set
        if with_kl and kl_set is not None:
            kl_values = self.kl(scale, layers)
            pt.kl = float(np.mean(kl_values)) if kl_values else 0.0
        for name in names:
            score, records = self.score_set(name, scale, layers, kl_values if (with_kl and name == kl_set) else None)
            pt.sets[name] = score
            pt.answers += records
        pt.seconds = time.perf_counter() - start
        self.say(_point_line(pt))
        return pt


def _point_line(pt: EvalPoint) -> str:
    rates = ", ".join(f"{n} {s.refusal_rate:.0%}" for n, s in pt.sets.items())
    kl = f", KL {pt.kl:.3f}" if pt.kl is not None else ""
    band = f" (blocks {pt.layers_label})" if pt.layers else ""
    return f"scale {pt.scale:+g}{band}: refusal {rates}{kl} [{pt.seconds:.0f}s]"


def evaluate(
    runner: Runner | None,
    sets: Sequence[PromptSet],
    scales: Sequence[float],
    *,
    engine: Engine | None = None,
    vector: ControlVector | None = None,
    layers: tuple[int, int] | None = None,
    judge: Judge | None = None,
    settings: EvalSettings | None = None,
    cache: EvalCache | None = None,
    say: Say | None = None,
    meta: dict[str, Any] | None = None,
) -> EvalReport:
    """Evaluate ``vector`` at every scale (0, the plain model, is always included first).

    The model runs on ``runner`` (an engine made for it) or on ``engine`` (see :class:`Evaluator`).
    """
    from rs_local.runtime.vector_specs import check_layer_range, check_scale

    for ps in sets:  # a rate over no prompts read 0%; a string was taken letter by letter
        if not isinstance(ps.prompts, (list, tuple)) or not all(isinstance(p, str) for p in ps.prompts):
            raise RsLocalError(f"set {ps.name}: prompts must be a list of strings, not {type(ps.prompts).__name__}")
        if not ps.prompts:
            raise RsLocalError(f"set {ps.name} has no prompts")
    scales = [check_scale(s) for s in scales]
    if any(s != 0 for s in scales) and vector is None:
        raise RsLocalError("a non-zero scale needs a vector")
    if vector is not None and layers is not None:
        check_layer_range([(vector, 1.0)], layers)  # a band missing every direction measured the plain model
    ordered = [0.0] + [s for s in dict.fromkeys(scales) if s != 0]
    ev = Evaluator(runner, sets, engine=engine, vector=vector, judge=judge, settings=settings, cache=cache, say=say)
    try:
        points = [ev.point(s, layers if s != 0 else None) for s in ordered]
    finally:
        ev.close()
    info = {
        "model": ev.engine.model_path.name,
        "model_key": ev._model_key,
        "judge": ev._judge_key,
        "engine": ev.engine.kind,
        "sets": {s.name: {"n": len(s), "source": s.source} for s in sets},
        "layers": list(layers) if layers else None,
        "cache": {"hits": ev.cache.hits, "misses": ev.cache.misses},
        "seconds_generating": round(ev.seconds_generating, 2),
    }
    if vector is not None:
        info["vector"] = {k: v for k, v in vector.metadata.items() if k in ("path", "source_file", "method", "layers", "model")}
    info.update(meta or {})
    return EvalReport(points, ev.settings, info)
