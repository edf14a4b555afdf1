"""The policy file: per-prompt category probes and the vector each category gets, in one GGUF.

A policy says, for every prompt, which of a few named categories it belongs to (a linear
probe on one block's output at the last prompt token) and what to do about it: ``remove``
(steer away from refusal: a vector at a negative scale), ``refuse`` (steer toward refusal: a
positive scale) or ``keep`` (no vector; the plain model answers). See
:mod:`rs_local.runtime.policy` for the gate that applies it.

Why GGUF with its own ``general.architecture`` (``rs_local_policy``): one self-describing
file (probe, calibration, thresholds, held-out accuracy, the model it was fitted for and
every category's direction) that the project's bounded GGUF walker
(:func:`rs_local.converters.gguf_check.parse_gguf`) already validates. llama.cpp cannot take
it for a control vector: its loader accepts only ``direction.N`` tensors and none is named
that here (``probe.*`` and ``steer.<category>.<block>``), and rs-local's vector reader
refuses any architecture but ``controlvector``.

Layout:

* keys ``rs_local_policy.{kind,version,model_arch,model_name,n_embd,n_layer,layer}``, the optional
  ``pool_tokens`` (the probe reads the mean of the prompt's last N tokens; absent: 1, the last
  token) and ``decision`` (``normalised``: the one-vs-rest probabilities are divided by their
  sum before the threshold; absent or ``ovr``: compared as they are), and two
  JSON strings: ``categories`` (name, action, scale, threshold, calibration, held-out
  accuracy, prompts, where the vector came from, the blocks it steers) and ``training``;
* tensors ``probe.mean`` / ``probe.std`` (the standardisation shared by all probes),
  ``probe.weight.<i>`` (category i's one-vs-rest ridge direction) and ``steer.<i>.<N>``
  (category i's direction for block N, as ``direction.N`` would hold it; ``keep``
  categories have none).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rs_local.errors import FileProblem
from rs_local.files import is_json_int, is_json_number
from rs_local.vectors.control_vector import ControlVector

ARCH = "rs_local_policy"
KIND = "conditional-steering"
VERSION = 1
ACTIONS = ("remove", "refuse", "keep")
#: The scale sign each steering action takes (rs-local's convention: negative removes refusal).
ACTION_SIGN = {"remove": -1.0, "refuse": 1.0, "keep": 0.0}
MAX_CATEGORIES = 64
#: Decision rules: ``ovr`` compares the calibrated one-vs-rest probabilities as they are (files
#: written before the rule was recorded); ``normalised`` divides them by their sum first, so
#: categories compete (a prompt every probe finds a little unlike its training set is still
#: routed to the likeliest category instead of abstaining; see benchmarks/RESULTS.md).
DECISIONS = ("ovr", "normalised")
MAX_POOL_TOKENS = 64


@dataclass
class Category:
    """One category: its one-vs-rest probe, its action, and (unless ``keep``) its vector."""

    name: str
    action: str
    weight: np.ndarray
    slope: float = 1.0
    bias: float = 0.0
    threshold: float = 0.5
    scale: float = 0.0
    vector: ControlVector | None = None
    accuracy: float | None = None
    n_prompts: int = 0
    vector_source: str = ""

    def prob(self, z: np.ndarray) -> np.ndarray:
        """Calibrated P(this category) from standardised features ``z``."""
        s = self.slope * (np.asarray(z, np.float64) @ self.weight) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(s, -60, 60)))


def normalised(p: np.ndarray) -> np.ndarray:
    """One-vs-rest probabilities ``[..., n_categories]`` divided by their sum (the ``normalised`` rule)."""
    return p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)


def advice_line(name: str, points: Sequence[dict]) -> str:
    """One line of a fit's threshold frontier for ``name`` (``training.threshold_advice``, written by
    :func:`rs_local.recipes.policy_fit.threshold_advice`; the current threshold first)."""
    now, *higher = points
    steps = "; ".join(f"{float(p['threshold']):g}: {int(p['keep_steered'])} steered, {float(p['routed']):.0%} routed"
                      for p in higher)
    return (f"raising the threshold of '{name}', in cross-validation (now {float(now['threshold']):g}: "
            f"{int(now['keep_steered'])} keep prompts steered, {float(now['routed']):.0%} of '{name}' routed): {steps}")


def training_notes(summary: dict) -> list[str]:
    """What the fit warned about, from a policy's summary: keep prompts cross-validation steered, and
    the threshold frontier (``policy show`` and ``inspect`` print these; not yet terminal-safe).

    The training record is anyone's to edit, so shapes the fit never writes are skipped, not a
    traceback.
    """
    training = summary.get("training") or {}
    actions = {c["name"]: c["action"] for c in summary.get("categories", [])}
    lines = []
    leaks = training.get("keep_steered")
    for keep, went in (leaks.items() if isinstance(leaks, dict) else ()):
        went = {k: n for k, n in went.items() if isinstance(n, int)} if isinstance(went, dict) else {}
        if went:
            lines.append(f"warning: cross-validation steered {sum(went.values())} of the '{keep}' (keep) prompts: "
                         + ", ".join(f"{n} to '{name}' ({actions.get(name, '?')})" for name, n in went.items()))
    advice = training.get("threshold_advice")
    for name, points in (advice.items() if isinstance(advice, dict) else ()):
        try:
            lines.append(advice_line(str(name), list(points)))
        except (TypeError, KeyError, ValueError, OverflowError):
            continue
    return lines


@dataclass
class Policy:
    """Categories sharing one probe block, plus the model the policy was fitted for."""

    categories: list[Category]
    layer: int
    mean: np.ndarray
    std: np.ndarray
    model_arch: str
    n_embd: int
    n_layer: int
    model_name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    pool_tokens: int = 1  # the probe reads the mean of the prompt's last N tokens at ``layer``
    decision: str = "ovr"

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) / self.std

    def probs(self, x: np.ndarray) -> np.ndarray:
        """``[..., n_categories]`` calibrated one-vs-rest probabilities."""
        z = self.standardise(x)
        p = np.stack([c.prob(z) for c in self.categories], axis=-1)
        return normalised(p) if self.decision == "normalised" else p

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(name)

    def check_model(self, runner: Any, path: str | Path) -> None:
        """Refuse a model the policy was not fitted on: its probes and vectors mean nothing there."""
        mismatch = runner.mismatches(self.model_arch, self.n_embd, self.n_layer)
        if mismatch:
            raise FileProblem(path, f"policy was fitted for another model ({'; '.join(mismatch)})")

    def summary(self) -> dict[str, Any]:
        """What ``rs-local policy show`` prints (also JSON-safe)."""
        return {
            "kind": KIND, "model": self.model_name, "model_arch": self.model_arch, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "probe_block": self.layer, "pool_tokens": self.pool_tokens,
            "decision": self.decision,
            "categories": [{
                "name": c.name, "action": c.action, "scale": c.scale, "threshold": c.threshold,
                "heldout_accuracy": c.accuracy, "prompts": c.n_prompts,
                "blocks": _band(c.vector.layers) if c.vector is not None else None, "vector": c.vector_source or None,
                "vector_meta": _vector_meta(c.vector),
            } for c in self.categories],
            "training": self.training,
        }


def _band(layers: list[int]) -> str:
    from rs_local.runtime.vector_specs import band_label

    return band_label(layers)


# --------------------------------------------------------------------------- writing


#: a category vector's own metadata kept in the file (how it was fitted: recipe, refusal text,
#: system prompt, bfloat16): at most this many scalar entries, each string at most MAX_META_TEXT
MAX_VECTOR_META, MAX_META_TEXT = 64, 4096


def _vector_meta(vec: ControlVector | None) -> dict[str, Any]:
    """The scalar metadata of a category's vector, as the file stores it (``path`` names a file of the fit's
    machine, and the policy names its own source)."""
    if vec is None:
        return {}
    keep = {k: v for k, v in vec.metadata.items() if k not in ("path", "policy_category") and isinstance(k, str)
            and (isinstance(v, (str, bool, int)) or isinstance(v, float) and math.isfinite(v))}
    return {k: v[:MAX_META_TEXT] if isinstance(v, str) else v for k, v in list(keep.items())[:MAX_VECTOR_META]}


def _category_record(c: Category) -> dict[str, Any]:
    return {"name": c.name, "action": c.action, "slope": c.slope, "bias": c.bias, "threshold": c.threshold,
            "scale": c.scale, "accuracy": c.accuracy, "n_prompts": c.n_prompts, "vector_source": c.vector_source,
            "blocks": c.vector.layers if c.vector is not None else [], "vector_meta": _vector_meta(c.vector)}


def _policy_tensors(policy: Policy) -> dict[str, np.ndarray]:
    """The file's tensors by name, float32, in the order they are written."""
    out = {"probe.mean": np.ascontiguousarray(policy.mean, np.float32),
           "probe.std": np.ascontiguousarray(policy.std, np.float32)}
    for i, c in enumerate(policy.categories):
        out[f"probe.weight.{i}"] = np.ascontiguousarray(c.weight, np.float32)
        if c.vector is not None:
            for layer, d in sorted(c.vector.directions.items()):
                out[f"steer.{i}.{layer}"] = np.ascontiguousarray(d, np.float32)
    return out


def tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over the tensors' names and float32 bytes, in name order.

    Why: a GGUF has no checksum, and a file damaged in place (a bad disk, a partial copy padded with
    zeros) still parses: its probe and vectors changed silently (up to 0.9 per element in a test).
    Files written before the digest have none and are read as before."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(tensors[name], np.float32).tobytes())
    return h.hexdigest()


def write_policy(policy: Policy, path: str | Path, *, force: bool = False) -> Path:
    """Save as one GGUF (atomic; refuses to overwrite without ``force``)."""
    import gguf

    from rs_local.converters.gguf_io import finish_gguf
    from rs_local.files import atomic_output

    validate_policy(policy, Path(path))
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        for key, value in (("kind", KIND), ("model_arch", policy.model_arch), ("model_name", policy.model_name),
                           ("decision", policy.decision),
                           ("categories", json.dumps([_category_record(c) for c in policy.categories])),
                           ("training", json.dumps(policy.training, sort_keys=True))):
            w.add_string(f"{ARCH}.{key}", value)
        for key, value in (("version", VERSION), ("layer", policy.layer), ("n_embd", policy.n_embd),
                           ("n_layer", policy.n_layer), ("pool_tokens", policy.pool_tokens)):
            w.add_uint32(f"{ARCH}.{key}", value)
        tensors = _policy_tensors(policy)
        w.add_string(f"{ARCH}.tensor_sha256", tensor_digest(tensors))
        for name, array in tensors.items():
            w.add_tensor(name, array)
        finish_gguf(w, tmp, path)
    return path


# --------------------------------------------------------------------------- reading


def _refuse_other_files(path: Path):
    """Stop at ``general.architecture`` when it is not ours (a model given by mistake is not walked)."""

    def check(key: str, entry: Any) -> None:
        if key == "general.architecture" and entry.value != ARCH:
            what = repr(entry.value)[:80] if isinstance(entry.value, str) else "not a string"
            raise FileProblem(path, f"not an rs-local policy (general.architecture is {what}, expected '{ARCH}')")

    return check


def read_policy(path: str | Path) -> Policy:
    """Load and check a policy file; every problem is one line naming the file."""
    from rs_local.converters.gguf_check import parse_gguf, read_tensors_f64
    from rs_local.converters.gguf_cursor import open_regular_file
    from rs_local.errors import VectorFileError

    path = Path(path)
    try:
        fh, size = open_regular_file(path)
        with fh:
            parsed = parse_gguf(fh, path, size, want=lambda key: key.startswith(ARCH) or key == "general.architecture",
                                on_key=_refuse_other_files(path))
            kv = {key: entry.value for key, entry in parsed.kv.items()}
            tensors = read_tensors_f64(fh, parsed)
    except VectorFileError as exc:  # the walker's messages say "vector"; the problem is what matters
        raise FileProblem(path, exc.problem) from None
    if kv.get("general.architecture") != ARCH or kv.get(f"{ARCH}.kind") != KIND:
        raise FileProblem(path, f"not an rs-local policy (general.architecture is {kv.get('general.architecture')!r})")
    policy = _policy_from(path, kv, tensors)  # its own checks first: they name what is wrong
    digest = kv.get(f"{ARCH}.tensor_sha256")
    if digest is not None and digest != tensor_digest(tensors):
        raise FileProblem(path, "its tensor data does not match the checksum written with it: the file is damaged "
                                "(copy it again, or fit it again)")
    validate_policy(policy, path)
    return policy


def _get(path: Path, kv: dict[str, Any], key: str, kind: type) -> Any:
    value = kv.get(f"{ARCH}.{key}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FileProblem(path, f"{ARCH}.{key} is missing or not a {kind.__name__}")
    return value


def _optional_str(path: Path, kv: dict[str, Any], key: str) -> str:
    """A string key the writer may have left out (gguf-py skips empty strings)."""
    return _get(path, kv, key, str) if f"{ARCH}.{key}" in kv else ""


def _json(path: Path, kv: dict[str, Any], key: str) -> Any:
    try:
        return json.loads(_get(path, kv, key, str))
    except (ValueError, RecursionError):
        raise FileProblem(path, f"{ARCH}.{key} is not valid JSON") from None


def _policy_from(path: Path, kv: dict[str, Any], tensors: dict[str, np.ndarray]) -> Policy:
    if _get(path, kv, "version", int) != VERSION:
        raise FileProblem(path, f"policy format version {kv.get(ARCH + '.version')} (this rs-local reads {VERSION})")
    n_embd, n_layer = _get(path, kv, "n_embd", int), _get(path, kv, "n_layer", int)
    records = _json(path, kv, "categories")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_CATEGORIES:
        raise FileProblem(path, f"{ARCH}.categories must list 1-{MAX_CATEGORIES} categories")

    def tensor(name: str) -> np.ndarray:
        arr = tensors.get(name)
        if arr is None or arr.shape != (n_embd,) or not np.all(np.isfinite(arr)):
            raise FileProblem(path, f"tensor {name} is missing or not {n_embd} finite values")
        return arr

    cats = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise FileProblem(path, f"category {i} is not an object")
        field_of = _record_reader(path, i, rec)
        blocks = field_of("blocks", list, [])
        if not all(is_json_int(b) and 1 <= b < n_layer for b in blocks) or len(set(blocks)) != len(blocks):
            # block 0's output is never steered (ARCHITECTURE: the layer convention)
            raise FileProblem(path, f"category {i}: blocks must be distinct integers 1-{n_layer - 1}")
        name = field_of("name", str)
        meta = _read_vector_meta(path, i, field_of("vector_meta", dict, {}))
        vector = None
        if blocks:
            vector = ControlVector({b: tensor(f"steer.{i}.{b}") for b in blocks}, str(kv.get(f"{ARCH}.model_arch", "")),
                                   {**meta, "policy_category": name}, source=f"{path}#{name}")
        cats.append(Category(name, field_of("action", str), tensor(f"probe.weight.{i}"), field_of("slope", float),
                             field_of("bias", float), field_of("threshold", float), field_of("scale", float), vector,
                             field_of("accuracy", float, None), field_of("n_prompts", int, 0),
                             field_of("vector_source", str, "")))
    training = _json(path, kv, "training")
    return Policy(cats, _get(path, kv, "layer", int), tensor("probe.mean"), tensor("probe.std"),
                  _get(path, kv, "model_arch", str), n_embd, n_layer, _optional_str(path, kv, "model_name"),
                  training if isinstance(training, dict) else {},
                  _get(path, kv, "pool_tokens", int) if f"{ARCH}.pool_tokens" in kv else 1,
                  _optional_str(path, kv, "decision") or "ovr")


_MISSING = object()
_KIND_NAMES = {float: "a finite number", int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _read_vector_meta(path: Path, i: int, meta: dict[str, Any]) -> dict[str, Any]:
    """A record's ``vector_meta`` as the writer makes it (files written before have none): a few scalar
    entries, finite numbers, bounded strings; anything else is damage, one line."""
    ok = len(meta) <= MAX_VECTOR_META and all(
        isinstance(v, (str, bool)) and (not isinstance(v, str) or len(v) <= MAX_META_TEXT)
        or is_json_number(v) and math.isfinite(v) for v in meta.values())
    if not ok:
        raise FileProblem(path, f"category {i}: 'vector_meta' must hold at most {MAX_VECTOR_META} strings or finite numbers")
    return meta


def _record_reader(path: Path, i: int, rec: dict[str, Any]):
    """``field(key, kind, default)`` for one category record: the value if it has the JSON type the writer
    gives it (a float field takes any finite JSON number, never a bool), the default if absent and
    allowed, else a one-line error. No coercion: ``"3"``, ``3.5`` for an int, ``true`` or ``1e400`` are
    damage, not data."""
    def field_of(key: str, kind: type, default: Any = _MISSING) -> Any:
        value = rec.get(key, _MISSING)
        if value is _MISSING or (value is None and default is None):
            if default is _MISSING:
                raise FileProblem(path, f"category {i} has no {key!r}")
            return default
        if kind is float and is_json_number(value) and math.isfinite(value):
            return float(value)
        if kind is int and is_json_int(value) or kind in (str, list, dict) and isinstance(value, kind):
            return value
        raise FileProblem(path, f"category {i}: {key!r} is not {_KIND_NAMES[kind]}")
    return field_of


def validate_policy(policy: Policy, path: Path) -> None:
    """The rules every policy obeys, checked on write (a bug) and on read (a bad file)."""
    from rs_local.runtime.vector_specs import MAX_SCALE

    if not 0 <= policy.layer < policy.n_layer:
        raise FileProblem(path, f"probe block {policy.layer} is outside the model's 0-{policy.n_layer - 1}")
    if policy.decision not in DECISIONS:
        raise FileProblem(path, f"unknown decision rule {policy.decision!r} (expected {', '.join(DECISIONS)})")
    if not 1 <= policy.pool_tokens <= MAX_POOL_TOKENS:
        raise FileProblem(path, f"pool_tokens {policy.pool_tokens} is outside 1-{MAX_POOL_TOKENS}")
    if np.any(np.asarray(policy.std) <= 0):
        raise FileProblem(path, "probe.std must be positive")
    names = [c.name for c in policy.categories]
    if len(set(names)) != len(names) or not all(names):
        raise FileProblem(path, "category names must be unique and non-empty")
    for c in policy.categories:
        numbers = (c.slope, c.bias, c.threshold, c.scale)
        if c.action not in ACTIONS:
            raise FileProblem(path, f"category {c.name!r}: unknown action {c.action!r} (expected {', '.join(ACTIONS)})")
        if not all(math.isfinite(v) for v in numbers) or not 0 < c.threshold < 1 or abs(c.scale) > MAX_SCALE:
            raise FileProblem(path, f"category {c.name!r}: calibration, threshold (0-1) or scale out of range")
        if c.accuracy is not None and not 0 <= c.accuracy <= 1 or c.n_prompts < 0:
            raise FileProblem(path, f"category {c.name!r}: held-out accuracy outside 0-1 or a negative prompt count")
        if c.action == "keep" and c.vector is not None:
            raise FileProblem(path, f"category {c.name!r} keeps the plain model but carries a vector")
        if c.action != "keep":
            if c.vector is None:
                raise FileProblem(path, f"category {c.name!r} ({c.action}) has no vector")
            if c.vector.n_embd != policy.n_embd or c.vector.max_layer >= policy.n_layer:
                raise FileProblem(path, f"category {c.name!r}: vector does not fit the policy's model")
