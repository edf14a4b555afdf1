"""Fuzz rs-local's readers at scale (issue 10) and print the count of each outcome per case class.

    python benchmarks/fuzz.py                      # 10,000 cases, seed 1, every class
    python benchmarks/fuzz.py --n 2000 --seed 7 --classes names,offsets,npz

Each case runs in a worker process under RLIMIT_AS = 2 GB with a per-case timeout (10 s by
default); a worker that hangs is killed and the case counted as ``hang``, one that dies is
counted as ``crash`` (``memory`` when it ran out of address space), and a fresh worker takes
the next case. A case whose run raises the worker's peak RSS by more than 1 GB also counts as
``memory``. After each batch, a family's oracle cross-checks the batch in the parent; for
control vectors that is llama.cpp's own GGUF parser and loader (tests/fuzz/ggml_oracle.py).

Outcomes (columns): ``accepted`` and ``clean error`` are the good ones; ``bad error`` (an
RsLocalError not of the form "path: one-line problem"), ``traceback``, ``hang``, ``crash``,
``memory``, ``llama.cpp disagrees`` (we accepted a file llama.cpp rejects, or read other values)
and ``wrong verdict`` (a case that must be accepted was rejected or the reverse) are failures;
``stricter`` counts files llama.cpp accepts that rs-local refuses on purpose (NaN values,
non-canonical names, ...). Exit status 1 when any failure occurred.

Plug-in structure: ``CASE_CLASSES`` maps a class name to a :class:`CaseClass` -- how to make a
case (in the parent), the ``"module:function"`` that runs it (in the worker) and an optional
batch oracle. :func:`register_family` adds a whole family; ``vector_family()`` below is the
example to follow for prompt-file, judge-file or CLI classes: give a ``make(seed, index,
workdir)`` that returns a picklable case, a runner that returns :class:`Result`, and call
``register_family`` at import.
"""

from __future__ import annotations

import argparse
import base64
import collections
import importlib
import json
import os
import pickle
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
FUZZ_DIR = REPO / "tests" / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))

ADDRESS_LIMIT = 2 << 30
GROWTH_LIMIT_MB = 1024
GOOD = ("accepted", "clean error")
FAILURES = ("bad error", "traceback", "hang", "crash", "memory", "llama.cpp disagrees", "wrong verdict")
COLUMNS = GOOD + FAILURES + ("stricter",)


# --------------------------------------------------------------------------- plug-in registry


@dataclass
class Result:
    """What a runner reports for one case: an outcome label, a detail line, data for the oracle."""

    outcome: str
    detail: str = ""
    payload: Any = None
    seconds: float = 0.0
    growth_mb: float = 0.0


# An oracle gets the batch's cases and results and returns extra labels per case
# (e.g. ["llama.cpp disagrees"] or ["stricter"]).
Oracle = Callable[[list[Any], list[Result]], list[list[str]]]


@dataclass(frozen=True)
class CaseClass:
    """One class of fuzz cases: made in the parent, run in the worker, checked by an oracle."""

    family: str
    make: Callable[[int, int, Path], Any]  # (seed, index, workdir) -> a picklable case
    run: str  # "module:function", called in the worker with the case, returns Result
    oracle: Oracle | None = None
    expectation: Callable[[Any, Result], bool] | None = None  # False: a wrong verdict


CASE_CLASSES: dict[str, CaseClass] = {}


def register_family(classes: dict[str, CaseClass]) -> None:
    """Add a family's classes; names must be unique across families."""
    clash = set(classes) & set(CASE_CLASSES)
    if clash:
        raise ValueError(f"case classes registered twice: {sorted(clash)}")
    CASE_CLASSES.update(classes)


# --------------------------------------------------------------------------- the vector family


def run_vector_case(case: Any) -> Result:
    """Worker side: read one vector file with rs-local; accepted vectors travel back for the oracle."""
    import vector_cases

    outcome = vector_cases.classify(case.path)
    payload = {k: base64.b64encode(v.astype("<f4").tobytes()).decode() for k, v in outcome.directions.items()}
    return Result(outcome.kind, outcome.detail[:300], payload or None)


def vector_oracle(cases: list[Any], results: list[Result]) -> list[list[str]]:
    """llama.cpp's parser and loader on every regular .gguf case of the batch."""
    import ggml_oracle
    import numpy as np

    labels: list[list[str]] = [[] for _ in cases]
    if not ggml_oracle.available():
        return labels
    picked = [i for i, c in enumerate(cases) if c.path.suffix == ".gguf" and c.path.is_file() and not c.path.is_symlink()]
    verdicts = ggml_oracle.verdicts([cases[i].path for i in picked])
    for i, verdict in zip(picked, verdicts):
        result = results[i]
        if result.outcome == "accepted":
            ours = {int(k): np.frombuffer(base64.b64decode(v), "<f4") for k, v in (result.payload or {}).items()}
            why = ggml_oracle.disagreement(ours, verdict)
            if why:
                labels[i].append("llama.cpp disagrees")
                result.detail = why
        elif result.outcome == "clean error" and verdict.accepts:
            labels[i].append("stricter")
    return labels


def vector_expectation(case: Any, result: Result) -> bool:
    """A case marked accept/reject by the generator must get that verdict."""
    if case.expect == "accept":
        return result.outcome == "accepted"
    if case.expect == "reject":
        return result.outcome != "accepted"
    return True


def vector_family() -> dict[str, CaseClass]:
    """Every class of tests/fuzz/vector_cases.py: GGUF structure and values, .npz, .safetensors."""
    import vector_cases

    def maker(cls: str) -> Callable[[int, int, Path], Any]:
        return lambda seed, index, workdir: vector_cases.make_case(cls, seed, index, workdir)

    return {name: CaseClass("vector", maker(name), "fuzz_bench_main:run_vector_case", vector_oracle, vector_expectation)
            for name in vector_cases.CLASSES}


register_family(vector_family())


# --------------------------------------------------------------------------- the input family


def run_input_case(case: Any) -> Result:
    """Worker side: a malformed prompt/scores/judge file, output path or option value, through CLI and library."""
    import input_cases

    problems = input_cases.run_case(case)
    return Result(input_cases.outcome_label(problems), "; ".join(problems)[:300])


def input_family() -> dict[str, CaseClass]:
    """Every class of tests/fuzz/input_cases.py: text and JSON inputs, output paths, CLI values."""
    import input_cases

    def maker(cls: str) -> Callable[[int, int, Path], Any]:
        return lambda seed, index, workdir: input_cases.make_case(cls, seed, index, workdir)

    return {name: CaseClass("input", maker(name), "fuzz_bench_main:run_input_case") for name in input_cases.CLASSES}


register_family(input_family())


# --------------------------------------------------------------------------- the artefact family


def run_artefact_case(case: Any) -> Result:
    """Worker side: read one damaged policy or probe-judge file with rs-local."""
    import artefact_cases

    outcome, detail = artefact_cases.classify(case)
    return Result(outcome, detail[:300])


def artefact_family() -> dict[str, CaseClass]:
    """Every class of tests/fuzz/artefact_cases.py: policy records, policy and probe bytes."""
    import artefact_cases

    def maker(cls: str) -> Callable[[int, int, Path], Any]:
        return lambda seed, index, workdir: artefact_cases.make_case(cls, seed, index, workdir)

    return {name: CaseClass("artefact", maker(name), "fuzz_bench_main:run_artefact_case") for name in artefact_cases.CLASSES}


register_family(artefact_family())


# --------------------------------------------------------------------------- worker


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resolve(ref: str) -> Callable[[Any], Result]:
    module, _, name = ref.partition(":")
    if module == "__main__":
        module = "fuzz_bench_main"
    return getattr(importlib.import_module(module), name)


def _one_line(exc: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame, for the table's examples."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} at {Path(frame.filename).name}:{frame.lineno}"[:300]


def worker_main() -> None:
    """Run cases sent as base64 pickles, one per line; answer JSON lines on a private stdout.

    Anything the code under test prints to fd 1 goes to stderr instead, so it cannot be
    mistaken for an answer.
    """
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        ref, case = pickle.loads(base64.b64decode(line))
        before = _peak_mb()
        start = time.perf_counter()
        try:
            result = _resolve(ref)(case)
        except MemoryError:
            result = Result("memory", "MemoryError escaped the runner")
        except Exception as exc:  # noqa: BLE001 - a runner bug is still an outcome to count
            result = Result("traceback", _one_line(exc))
        result.seconds = time.perf_counter() - start
        result.growth_mb = _peak_mb() - before
        if result.growth_mb > GROWTH_LIMIT_MB:
            result.outcome, result.detail = "memory", f"peak RSS grew {result.growth_mb:.0f} MB"
        answers.write(json.dumps(result.__dict__) + "\n")
        answers.flush()


# --------------------------------------------------------------------------- parent


def _limit_worker() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()


class Worker:
    """A worker process under the address-space limit, restarted after a hang or a crash."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "GGML_NO_BACKTRACE": "1"}
        return subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, preexec_fn=_limit_worker, env=env, cwd=REPO)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def run(self, ref: str, case: Any) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = time.perf_counter()
        try:
            self.proc.stdin.write(base64.b64encode(pickle.dumps((ref, case))).decode() + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died(start)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.stop()
            return Result("hang", f"no answer within {self.timeout:.0f} s", seconds=self.timeout)
        line = self.proc.stdout.readline()
        if not line:
            return self._died(start)
        return Result(**json.loads(line))

    def _died(self, start: float) -> Result:
        assert self.proc is not None
        code = self.proc.wait()
        self.proc = None
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        outcome = "memory" if code == -signal.SIGKILL else "crash"  # SIGKILL here is the kernel's OOM killer
        return Result(outcome, f"worker died ({how})", seconds=time.perf_counter() - start)


@dataclass
class Tally:
    """Counts per class and outcome, the slowest case, the largest growth, a few examples."""

    counts: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    slowest: tuple[float, str] = (0.0, "")
    growth: tuple[float, str] = (0.0, "")

    def add(self, cls: str, case_name: str, labels: list[str], result: Result, show: int) -> None:
        for label in labels:
            self.counts[cls][label] += 1
            if label in FAILURES and len(self.examples[cls]) < show:
                self.examples[cls].append(f"{case_name}: {label}: {result.detail}"[:300])
        self.slowest = max(self.slowest, (result.seconds, case_name))
        self.growth = max(self.growth, (result.growth_mb, case_name))


def _labels(cc: CaseClass, case: Any, result: Result, extra: list[str]) -> list[str]:
    labels = [result.outcome] + extra
    if cc.expectation is not None and result.outcome in GOOD and not cc.expectation(case, result):
        labels.append("wrong verdict")
    return labels


def _run_batch(names: list[str], seed: int, indices: range, worker: Worker, tally: Tally, show: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="rs-local-fuzz-"))
    try:
        made = [(names[i % len(names)], CASE_CLASSES[names[i % len(names)]].make(seed, i, workdir)) for i in indices]
        results = [worker.run(CASE_CLASSES[cls].run, case) for cls, case in made]
        extra: list[list[str]] = [[] for _ in made]
        for family in {CASE_CLASSES[cls].family for cls, _ in made}:
            members = [j for j, (cls, _) in enumerate(made) if CASE_CLASSES[cls].family == family]
            oracle = CASE_CLASSES[made[members[0]][0]].oracle
            if oracle is not None:
                for j, labels in zip(members, oracle([made[j][1] for j in members], [results[j] for j in members])):
                    extra[j] += labels
        for (cls, case), result, more in zip(made, results, extra):
            name = getattr(case, "path", Path(str(case))).name
            tally.add(cls, name, _labels(CASE_CLASSES[cls], case, result, more), result, show)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _print(tally: Tally, names: list[str], n: int, seconds: float) -> None:
    heads = ["class", "cases", *COLUMNS]
    rows = []
    total: collections.Counter = collections.Counter()
    for cls in names:
        c = tally.counts[cls]
        cases = c["accepted"] + c["clean error"] + sum(c[k] for k in ("bad error", "traceback", "hang", "crash", "memory"))
        rows.append([cls, str(cases), *(str(c[k]) for k in COLUMNS)])
        total.update(c)
        total["cases"] += cases
    rows.append(["TOTAL", str(total["cases"]), *(str(total[k]) for k in COLUMNS)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(f"{n} cases in {seconds:.0f} s; slowest case {tally.slowest[0]:.2f} s ({tally.slowest[1]}), "
          f"largest peak-RSS growth {tally.growth[0]:.0f} MB ({tally.growth[1]})")
    print(line(heads))
    for r in rows:
        print(line(r))
    for cls in names:
        for ex in tally.examples[cls]:
            print(f"  {cls}: {ex}")
    failures = sum(total[k] for k in FAILURES)
    print(f"failures: {failures} ({', '.join(f'{k} {total[k]}' for k in FAILURES)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="Number of cases (round robin over the classes).")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--classes", default=None, help="Comma-separated subset of: " + ", ".join(CASE_CLASSES))
    ap.add_argument("--timeout", type=float, default=10.0, help="Seconds one case may run.")
    ap.add_argument("--batch", type=int, default=500, help="Cases generated, run and cross-checked together.")
    ap.add_argument("--show", type=int, default=3, help="Failure examples printed per class.")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main()
        return 0
    names = args.classes.split(",") if args.classes else list(CASE_CLASSES)
    unknown = set(names) - set(CASE_CLASSES)
    if unknown:
        ap.error(f"unknown classes: {', '.join(sorted(unknown))}")
    tally, worker, start = Tally(), Worker(args.timeout), time.monotonic()
    try:
        for first in range(0, args.n, args.batch):
            _run_batch(names, args.seed, range(first, min(first + args.batch, args.n)), worker, tally, args.show)
    finally:
        worker.stop()
    _print(tally, names, args.n, time.monotonic() - start)
    return 1 if any(tally.counts[c][k] for c in names for k in FAILURES) else 0


if __name__ == "__main__":
    sys.modules.setdefault("fuzz_bench_main", sys.modules["__main__"])
    sys.exit(main())
