"""A seeded generator of damaged policy and probe-judge files (rs-local's own GGUF artefacts).

A policy (``rs_local_policy``) and a probe (``rs_local_probe``) share the control-vector walker
for their GGUF structure, which the vector family fuzzes at length; what is theirs is the
layer above it: a category record in JSON, its numbers, its blocks, tensors by name. Three
classes:

* ``policy_record``: a valid policy whose first category record has one field replaced by a
  value of the wrong JSON type or range (``1e400``, ``NaN``, ``"3"``, ``3.5``, ``true``, nulls,
  nested lists, repeated or out-of-range blocks);
* ``policy_bytes`` and ``probe_bytes``: a valid file (the probe shipped with rs-local) with bit
  flips, overwritten bytes, a cut tail or a spliced run of its own bytes.

Every case must be accepted or refused with one line naming the file (``FileProblem``); a
traceback or a numpy warning printed above the error is a failure. Same seed and index give
the same case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIPPED_PROBE = Path(__file__).resolve().parents[2] / "rs_local" / "data" / "judge-probe-qwen2.5-coder-0.5b.gguf"
FIELDS = ("name", "action", "slope", "bias", "threshold", "scale", "accuracy", "n_prompts", "vector_source", "blocks",
          "vector_meta")
VALUES: tuple[Any, ...] = (float("inf"), float("-inf"), float("nan"), 1e300, -1.0, 0, 2, 10 ** 30, True, None, "",
                           "3", "x", [], [3.5], ["3"], [3, 3], [3, 30], [1e400], [[3]], {}, {"a": 1})
#: what the fit records in a policy's ``training`` and ``policy show`` reads back
TRAINING_KEYS = ("keep_steered", "threshold_advice", "system", "files", "heldout_below_threshold")
CLASSES = ("policy_record", "policy_training", "policy_bytes", "probe_bytes")


@dataclass
class Case:
    cls: str
    index: int
    path: Path


def _policy(path: Path, record_patch: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> Path:
    """A small valid policy (16-wide, 30 blocks), optionally with its first record patched as written
    and a ``training`` record as a hand-edited file might hold."""
    import numpy as np

    from rs_local.runtime import policy_file
    from rs_local.vectors.control_vector import ControlVector

    d = 16
    vec = ControlVector({3: np.ones(d, np.float32), 4: np.full(d, 0.5, np.float32)}, "llama")
    cats = [policy_file.Category("pol", "remove", np.linspace(-1, 1, d), threshold=0.5, scale=-1.0, vector=vec),
            policy_file.Category("ok", "keep", np.ones(d))]
    policy = policy_file.Policy(cats, 3, np.full(d, 0.125), np.ones(d), "llama", d, 30, decision="normalised",
                                pool_tokens=5, training=training or {})
    write_record = policy_file._category_record
    if record_patch:
        first = cats[0]
        policy_file._category_record = lambda c: {**write_record(c), **(record_patch if c is first else {})}
    try:
        return policy_file.write_policy(policy, path, force=True)
    finally:
        policy_file._category_record = write_record


def _damage(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    how = rng.choice(("flip", "overwrite", "cut", "splice"))
    if how == "cut":
        return bytes(out[:rng.randrange(len(out))])
    if how == "splice":
        at, src = rng.randrange(len(out)), rng.randrange(len(out))
        out[at:at] = out[src:src + rng.randint(1, 64)]
        return bytes(out)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        out[at] = out[at] ^ (1 << rng.randrange(8)) if how == "flip" else rng.choice((0, 0xFF, 0x7F, 0x80, 0x22, 0x5B))
    return bytes(out)


def make_case(cls: str, seed: int, index: int, workdir: Path) -> Case:
    """Case ``index`` of class ``cls`` written under ``workdir``."""
    rng = random.Random(f"{cls}:{seed}:{index}")
    path = workdir / f"{index:06d}-{cls}.gguf"
    if cls == "policy_record":
        _policy(path, {rng.choice(FIELDS): rng.choice(VALUES)})
    elif cls == "policy_training":
        value = rng.choice(VALUES)
        shaped = rng.choice((value, {"pol": value}, {"ok": {"pol": value}}, {"pol": {"threshold": value}}))
        _policy(path, training={rng.choice(TRAINING_KEYS): shaped})
    elif cls == "policy_bytes":
        _policy(path)
        path.write_bytes(_damage(rng, path.read_bytes()))
    elif cls == "probe_bytes":
        path.write_bytes(_damage(rng, SHIPPED_PROBE.read_bytes()))
    else:
        raise ValueError(f"unknown artefact case class {cls!r}")
    return Case(cls, index, path)


def classify(case: Case) -> tuple[str, str]:
    """(outcome, detail): ``accepted``, ``clean error``, ``bad error`` or ``traceback``."""
    import traceback
    import warnings

    from rs_local.errors import FileProblem, RsLocalError
    from rs_local.judge.probe import read_probe
    from rs_local.runtime.policy_file import read_policy

    reader = read_probe if case.cls == "probe_bytes" else read_policy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning printed above the one-line error is a defect too
            reader(case.path)
    except FileProblem as exc:
        message, prefix = str(exc), f"{case.path}: "
        ok = message.startswith(prefix) and "\n" not in message and "\r" not in message
        return ("clean error" if ok else "bad error"), message
    except RsLocalError as exc:
        return "bad error", f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - what the fuzzer looks for
        return "traceback", traceback.format_exc(limit=-3)
    if reader is read_policy:
        return _shown(case.path)
    return "accepted", ""


def _shown(path: Path) -> tuple[str, str]:
    """A policy that reads must also be shown (``policy show``, its JSON, ``inspect``) without a traceback:
    its records are anyone's."""
    import traceback

    from click.testing import CliRunner

    from rs_local.cli.main import cli

    for args in (["policy", "show", str(path)], ["policy", "show", "--json", str(path)], ["inspect", str(path)]):
        res = CliRunner().invoke(cli, args)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            return "traceback", f"{' '.join(args[:-1])}: " + "".join(traceback.format_exception(res.exception, limit=-3))
        if res.exit_code != 0:
            return "bad error", f"{' '.join(args[:-1])} exit {res.exit_code}: {res.output[-200:]}"
    return "accepted", ""
