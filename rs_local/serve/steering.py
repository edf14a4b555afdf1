"""Named vectors loaded at start, and the steering each request asks for.

A request never names a file: it names one of the vectors the operator loaded when the server
started (``--vector NAME=PATH[:SCALE]``, ``--vectors DIR``), so a client cannot make the server
read a path. Steering comes from three places, most specific first:

* the body field ``"steering": {"vectors": [{"name": N, "scale": S}], "layers": "8-16"}``
  (``{"vectors": []}`` turns steering off for that request);
* a model name with a suffix, ``"<model>+political:-1+other"``, for clients that can only
  choose a model (Open WebUI, editors);
* the server default (``--default-steering NAME:SCALE``).

A request may instead name a conditional-steering policy loaded at start (``--policy
NAME=policy.gguf``): ``"steering": {"policy": "NAME"}`` or the model name ``"<model>+@NAME"``.
The worker then lets the policy's probes choose, per prompt, one category's vector or none
(:mod:`rs_local.runtime.policy`), and the response names the category it chose. A policy brings
its own vectors and blocks, so a policy together with ``vectors`` or ``layers`` is refused (400):
summing a fixed vector onto a gated one would give answers neither the policy nor the vector
was measured for.

Giving both of the first two is refused rather than silently preferring one.
Everything resolves to a :class:`Steering`, a hashable value the scheduler compares to decide
when llama.cpp's control vector must change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from rs_local.errors import RsLocalError
from rs_local.runtime.vector_specs import MAX_SCALE, band_label, parse_layer_range, parse_scale, parse_vector_spec
from rs_local.serve.errors import ApiError, bad_request
from rs_local.vectors.control_vector import ControlVector

#: A vector name: what a model-name suffix can carry unambiguously (no '+', ':', '/', spaces).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: More vectors than this in one request is a mistake, not a recipe.
MAX_PARTS = 16


@dataclass(frozen=True)
class Steering:
    """What to add to the residual stream: ``(name, scale)`` pairs, a block range, and who chose it."""

    parts: tuple[tuple[str, float], ...] = ()
    layers: tuple[int, int] | None = None
    source: str = "default"
    #: a policy's name: its gate picks the parts per prompt (``parts`` stays empty until it has)
    policy: str | None = None
    #: the gate's :class:`~rs_local.runtime.policy.Decision`, once made (not part of the key)
    decision: Any = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        """Equal keys mean the same control vector in llama.cpp (the source does not matter)."""
        return (tuple(sorted(self.parts)), self.layers if self.parts else None)

    @property
    def active(self) -> bool:
        return bool(self.parts)

    @property
    def undecided(self) -> bool:
        """A policy whose gate has not yet read the prompt."""
        return self.policy is not None and self.decision is None

    def describe(self) -> dict[str, Any]:
        """The ``steering`` field of a response: what was actually applied (and, for a policy, why)."""
        out: dict[str, Any] = {
            "vectors": [{"name": n, "scale": s} for n, s in self.parts],
            "layers": band_label(self.layers) if self.parts and self.layers else None,
            "source": self.source,
        }
        if self.policy is not None:
            out["policy"] = {"name": self.policy, **(self.decision.to_dict() if self.decision is not None else {})}
        return out

    def label(self) -> str:
        """A short header value, e.g. ``political:-1@8-16``, ``@strict/political:-1`` or ``none``."""
        if not self.parts:
            return f"@{self.policy}:keep" if self.policy else "none"
        text = "+".join(f"{n}:{s:g}" for n, s in self.parts)
        text = f"@{text}" if self.policy else text
        return f"{text}@{band_label(self.layers)}" if self.layers else text

    def decided(self, decision: Any) -> "Steering":
        """This policy steering once the gate has chosen: the category's vector (``POLICY/CATEGORY``) or none."""
        steered = decision.action != "keep" and decision.category is not None
        parts = ((f"{self.policy}/{decision.category}", decision.scale),) if steered else ()
        return Steering(parts, None, self.source, self.policy, decision)


@dataclass
class NamedVector:
    """A vector loaded at start: its name, directions, default scale and the file it came from."""

    name: str
    vector: ControlVector
    scale: float
    file: str

    def catalog_entry(self) -> dict[str, Any]:
        """``GET /v1/steering/vectors`` row; shows the file name, never the server's directory."""
        provenance = {k: v for k, v in self.vector.metadata.items() if k != "path"}
        return {
            "name": self.name,
            "default_scale": self.scale,
            "layers": self.vector.layers,
            "n_embd": self.vector.n_embd,
            "norms": {str(k): round(v, 6) for k, v in self.vector.norms().items()},
            "model_hint": self.vector.model_hint,
            "file": self.file,
            "provenance": _json_safe(provenance),
        }


@dataclass
class NamedPolicy:
    """A conditional-steering policy loaded at start (``--policy NAME=PATH``)."""

    name: str
    policy: Any  # rs_local.runtime.policy_file.Policy
    file: str

    def catalog_entry(self) -> dict[str, Any]:
        """``GET /v1/steering/policies`` row: what ``rs-local inspect`` shows of the file, with the
        training sets' paths cut to their file names (like the vector catalog, it never shows the
        directories of the machine that fitted or serves it)."""
        summary = self.policy.summary()
        training = dict(summary.get("training") or {})
        if isinstance(training.get("files"), dict):
            training["files"] = {k: Path(str(v)).name for k, v in training["files"].items()}
        return {"name": self.name, "file": self.file, **_json_safe({**summary, "training": training})}


def _json_safe(value: Any) -> Any:
    """Metadata as strict JSON: numpy values unwrapped, non-finite floats as null."""
    from rs_local.converters.gguf_io import to_jsonable

    value = to_jsonable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def check_name(name: str, what: str = "vector name") -> str:
    """A name as the server accepts it (letters, digits, ``_.-``); RsLocalError otherwise."""
    if not NAME_RE.fullmatch(name):
        raise RsLocalError(f"bad {what} {name[:80]!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


def parse_named_spec(spec: str) -> tuple[str, Path, float]:
    """``NAME=PATH[:SCALE]`` (the ``--vector`` option of ``rs-local serve``)."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise RsLocalError(f"bad --vector '{spec[:120]}': expected NAME=PATH[:SCALE], e.g. political=political.gguf:-1")
    path, scale = parse_vector_spec(rest)
    return check_name(name.strip()), path, scale


def parse_policy_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` (the ``--policy`` option of ``rs-local serve``)."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise RsLocalError(f"bad --policy '{spec[:120]}': expected NAME=PATH, e.g. strict=policy.gguf")
    return check_name(name.strip(), "policy name"), Path(path)


def parse_default_spec(spec: str) -> tuple[str, float | None]:
    """``NAME[:SCALE]`` (``--default-steering``); a missing scale takes the vector's own; ``@NAME`` a policy."""
    if spec.startswith("@"):
        return "@" + check_name(spec[1:].strip(), "policy name"), None
    name, sep, scale = spec.partition(":")
    return check_name(name.strip()), (parse_scale(scale, f"scale in '{spec}'") if sep else None)


class VectorLibrary:
    """The vectors a request may name, each checked against the model once, at start."""

    def __init__(self, n_embd: int, n_layer: int, check: Callable[[ControlVector, str], None] | None = None):
        """``check`` is the model's own vector check (``Runner.check_vector``: sizes and the dense/MoE
        divide); without one, sizes only."""
        self.n_embd, self.n_layer = n_embd, n_layer
        self.check = check or self._check_sizes
        self.vectors: dict[str, NamedVector] = {}
        self.policies: dict[str, NamedPolicy] = {}

    def add_policy(self, name: str, policy: Any, file: str) -> None:
        """Register a policy (already checked against the model by its gate)."""
        check_name(name, "policy name")
        if name in self.policies:
            raise RsLocalError(f"two policies are named '{name}'")
        self.policies[name] = NamedPolicy(name, policy, Path(file).name)

    def add(self, name: str, vector: ControlVector, scale: float, file: str) -> None:
        """Register a vector; one that does not fit the model fails here, before serving."""
        check_name(name)
        if name in self.vectors:
            raise RsLocalError(f"two vectors are named '{name}'")
        self.check(vector, file)
        self.vectors[name] = NamedVector(name, vector, scale, Path(file).name)

    def _check_sizes(self, vector: ControlVector, file: str) -> None:
        from rs_local.converters.gguf_io import validate_for_model

        validate_for_model(vector, n_embd=self.n_embd, n_layer=self.n_layer, path=file)

    def load_specs(self, specs: Iterable[str]) -> None:
        """Every ``NAME=PATH[:SCALE]``."""
        from rs_local.converters.formats import load_vector

        for spec in specs:
            name, path, scale = parse_named_spec(spec)
            self.add(name, load_vector(path), scale, str(path))

    def load_directory(self, directory: Path) -> None:
        """Every ``*.gguf`` in ``directory`` (not recursive), named by its stem, scale 1."""
        from rs_local.converters.formats import load_vector

        if not directory.is_dir():
            raise RsLocalError(f"{directory}: not a directory")
        for path in sorted(directory.glob("*.gguf")):
            self.add(check_name(path.stem, f"vector name (from {path.name})"), load_vector(path), 1.0, str(path))

    def parts(self, steering: Steering) -> list[tuple[ControlVector, float]]:
        """``(vector, scale)`` pairs for :meth:`Runner.set_vectors` (``POLICY/CATEGORY`` names a policy's vector).

        In the key's order, not the request's: float32 sums of three or more vectors depend on
        their order, and a steering's cached head (and, with the prefix cache, its applied vector)
        is found by the key, so ``[a, b, c]`` after ``[c, b, a]`` answered with the other's sum."""
        return [(self._vector(name), scale) for name, scale in sorted(steering.parts)]

    def _vector(self, name: str) -> ControlVector:
        policy, sep, category = name.partition("/")
        if sep:
            return self.policies[policy].policy.category(category).vector
        return self.vectors[name].vector

    def catalog(self) -> list[dict[str, Any]]:
        return [v.catalog_entry() for v in self.vectors.values()]

    def policy_catalog(self) -> list[dict[str, Any]]:
        return [p.catalog_entry() for p in self.policies.values()]

    def lookup_policy(self, name: Any, param: str) -> NamedPolicy:
        """A loaded policy by name: 400 for a malformed name, 404 for an unknown one."""
        return _by_name(self.policies, name, param, "policy")

    # -- resolving requests -------------------------------------------------------------

    def lookup(self, name: Any, param: str) -> NamedVector:
        """A loaded vector by name: 400 for a malformed name (paths included), 404 for an unknown one."""
        return _by_name(self.vectors, name, param, "vector")

    def steering(self, parts: list[tuple[str, float]], layers: tuple[int, int] | None, source: str,
                 param: str) -> Steering:
        """Check a range against the model and the named vectors; drop zero scales."""
        if len(parts) > MAX_PARTS:
            raise bad_request(f"at most {MAX_PARTS} vectors per request", param)
        parts = [(n, s) for n, s in parts if s != 0.0]
        if layers is not None:
            lo, hi = layers
            if not 1 <= lo <= hi <= self.n_layer - 1:
                raise bad_request(f"layer range {lo}-{hi} is outside 1-{self.n_layer - 1} for this model",
                                  f"{param}.layers", "layers_out_of_range")
            for name, _ in parts:
                if not any(lo <= layer <= hi for layer in self.vectors[name].vector.layers):
                    raise bad_request(f"vector {name!r} has directions for blocks "
                                      f"{band_label(self.vectors[name].vector.layers)}; layers {lo}-{hi} select none",
                                      f"{param}.layers", "layers_out_of_range")
        return Steering(tuple(parts), layers if parts else None, source)

    def from_field(self, value: Any) -> Steering:
        """The request body's ``steering`` object."""
        if not isinstance(value, Mapping):
            raise bad_request("steering must be an object like {\"vectors\": [{\"name\": ..., \"scale\": ...}]}",
                              "steering", "invalid_type")
        unknown = set(value) - {"vectors", "layers", "policy"}
        if unknown:
            raise bad_request(f"unknown steering field {sorted(unknown)[0]!r} (expected vectors, layers or policy)",
                              "steering")
        if value.get("policy") is not None:
            return self._policy_field(value)
        vectors = value.get("vectors", [])
        if not isinstance(vectors, list):
            raise bad_request("steering.vectors must be a list", "steering.vectors", "invalid_type")
        parts = [self._part(item, f"steering.vectors[{i}]") for i, item in enumerate(vectors[: MAX_PARTS + 1])]
        return self.steering(parts, _layers(value.get("layers")), "request", "steering")

    def _policy_field(self, value: Mapping[str, Any]) -> Steering:
        """``{"policy": NAME}``: alone, since a policy brings its own vectors and blocks."""
        named = self.lookup_policy(value["policy"], "steering.policy")
        others = [k for k in ("vectors", "layers") if value.get(k) is not None]
        if others:
            raise bad_request(f"steering.policy cannot be combined with steering.{others[0]}: the policy's gate "
                              "chooses the vector and its blocks per prompt", "steering", "conflicting_steering")
        return Steering((), None, "request", named.name)

    def _part(self, item: Any, param: str) -> tuple[str, float]:
        if not isinstance(item, Mapping):
            raise bad_request(f"{param} must be an object with name and scale", param, "invalid_type")
        unknown = set(item) - {"name", "scale"}
        if unknown:
            raise bad_request(f"unknown field {sorted(unknown)[0]!r} in {param}", param)
        named = self.lookup(item.get("name"), f"{param}.name")
        return named.name, _scale(item.get("scale", named.scale), f"{param}.scale")

    def from_suffix(self, suffix: str) -> Steering:
        """``political:-1+other`` from a model name ``<model>+political:-1+other``; ``@NAME`` names a policy."""
        if suffix.startswith("@"):
            return Steering((), None, "model", self.lookup_policy(suffix[1:], "model").name)
        if "+@" in suffix:
            raise bad_request("a policy cannot be combined with vectors in the model name", "model",
                              "conflicting_steering")
        parts = []
        for i, piece in enumerate(suffix.split("+")[: MAX_PARTS + 1]):
            name, sep, scale_text = piece.partition(":")
            named = self.lookup(name, "model")
            try:
                scale = parse_scale(scale_text) if sep else named.scale
            except RsLocalError as exc:
                raise bad_request(f"model name: {exc}", "model") from None
            parts.append((named.name, scale))
        return self.steering(parts, None, "model", "model")

    def default(self, specs: Iterable[tuple[str, float | None]]) -> Steering:
        """The server default from ``--default-steering``; errors are start-up errors."""
        specs = list(specs)
        policies = [name[1:] for name, _ in specs if name.startswith("@")]
        if policies:
            if len(specs) > 1:
                raise RsLocalError("--default-steering: a policy (@NAME) cannot be combined with other steering")
            if policies[0] not in self.policies:
                raise RsLocalError(f"--default-steering names policy '{policies[0]}', which no --policy loaded")
            return Steering((), None, "default", policies[0])
        parts = []
        for name, scale in specs:
            if name not in self.vectors:
                raise RsLocalError(f"--default-steering names '{name}', which no --vector/--vectors loaded")
            parts.append((name, self.vectors[name].scale if scale is None else scale))
        return Steering(tuple((n, s) for n, s in parts if s != 0.0), None, "default")


def _scale(value: Any, param: str) -> float:
    """A JSON number that is a usable scale (booleans are numbers to Python, not to us)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{param} must be a number", param, "invalid_type")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise bad_request(f"{param} must be finite with |scale| <= {MAX_SCALE:g}", param)
    return value


def _layers(value: Any) -> tuple[int, int] | None:
    """``"8-16"``, ``"12"``, ``12`` or ``[8, 16]``; null means every block."""
    param = "steering.layers"
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        value = f"{value[0]}-{value[1]}"
    elif type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise bad_request("steering.layers must be a string like \"8-16\"", param, "invalid_type")
    try:
        return parse_layer_range(value)
    except RsLocalError as exc:
        raise bad_request(str(exc), param) from None


def resolve(library: VectorLibrary, default: Steering, body: Mapping[str, Any], suffix: str | None) -> Steering:
    """The steering for one request: body field, else model-name suffix, else the server default.

    ``suffix`` is what followed ``<model>+`` in the model name (None when there was no ``+``).
    """
    has_field = "steering" in body and body["steering"] is not None
    if has_field and suffix is not None:
        raise bad_request("steering is given both in the model name and in the steering field; use one", "steering",
                          "conflicting_steering")
    if has_field:
        return library.from_field(body["steering"])
    if suffix is not None:
        return library.from_suffix(suffix)
    return default



def _by_name(table: dict[str, Any], name: Any, param: str, kind: str) -> Any:
    """One entry loaded at start, by name only: requests never carry paths (400), and a name that
    was not loaded is a 404 that lists what was."""
    if not isinstance(name, str):
        raise bad_request(f"{param} must be a string", param, "invalid_type")
    if not NAME_RE.fullmatch(name):
        raise bad_request(f"{param} {name[:80]!r} is not a {kind} name (names only, never paths)", param)
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ApiError(404, f"no {kind} named {name!r} is loaded (loaded: {known})", param=param,
                       code=f"{kind}_not_found")
    return table[name]
