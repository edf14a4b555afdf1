"""Choose the blocks a vector is written on from an ``rs-local experts`` routing report.

The experts report gives, per MoE block and expert, Cohen's d of the routing probability
between refused and answered prompts. A block whose routing separates the two sets strongly is
one where the model processes them differently, so ``fit --routing`` writes the vector only on
the K blocks with the largest ``max |d|`` over their experts. The rule, in full:

* strength of block N = max over experts of |Cohen's d| (the report's ``cohen_d`` row);
* ``direction.N`` for MoE block N: the vector is added to that block's output, which carries
  what its experts wrote (block 0 cannot be steered and is skipped);
* the K strongest blocks, ties broken by the lower block; K larger than the steerable MoE
  blocks is an error, not a silent cap.

We choose, we do not weight: the fit's scale rule (``gap/cos/k``) already sets each block's
norm from the activations, and nothing measured here says routing strength should rescale it.
The report is checked against the model (architecture and block count) so a report made for
another model is one clear error before any forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rs_local.errors import FileProblem, ModelError
from rs_local.files import is_json_int

DEFAULT_TOP = 3  # blocks when --routing-top is not given
RULE = "top-K blocks by max |Cohen's d| of expert routing, refused vs answered (rs-local experts report)"


class RoutingReportError(FileProblem):
    """A routing report is malformed or was made for another model."""


@dataclass(frozen=True)
class RoutingReport:
    """What ``fit`` needs from an experts report: per MoE block, how strongly routing separates the sets."""

    path: Path
    arch: str
    n_layer: int | None  # None for a report written before it was recorded
    strength: dict[int, float]  # MoE block -> max |d| over its experts


def read_routing(path: str | Path) -> RoutingReport:
    """Parse and check an experts report; every problem is one :class:`RoutingReportError` naming the file."""
    from rs_local.files.reading import load_json

    path = Path(path)
    data = load_json(path, what="routing report", error=RoutingReportError)
    if not isinstance(data, dict) or "cohen_d" not in data or "blocks" not in data:
        raise RoutingReportError(path, "not an `rs-local experts` report (needs 'blocks' and 'cohen_d')")
    blocks = _block_ids(path, data["blocks"])
    rows = data["cohen_d"]
    if not isinstance(rows, list) or len(rows) != len(blocks):
        raise RoutingReportError(path, f"'cohen_d' must have one row per block ({len(blocks)})")
    strength = {b: _row_strength(path, b, row) for b, row in zip(blocks, rows)}
    n_layer = data.get("n_layer")
    if n_layer is not None and (not is_json_int(n_layer) or n_layer < 1 or max(blocks) >= n_layer):
        raise RoutingReportError(path, f"'n_layer' {n_layer!r} is not a block count covering blocks {min(blocks)}-{max(blocks)}")
    arch = data.get("arch", "")
    if not isinstance(arch, str):
        raise RoutingReportError(path, "'arch' must be a string")
    return RoutingReport(path, arch, n_layer, strength)


def _block_ids(path: Path, blocks: Any) -> list[int]:
    if not isinstance(blocks, list) or not blocks:
        raise RoutingReportError(path, "'blocks' must be a non-empty list")
    ids = [b.get("block") if isinstance(b, dict) else None for b in blocks]
    if not all(is_json_int(b) and b >= 0 for b in ids):
        raise RoutingReportError(path, "every entry of 'blocks' needs a block index >= 0")
    if len(set(ids)) != len(ids):
        raise RoutingReportError(path, "a block is listed twice in 'blocks'")
    return ids


def _row_strength(path: Path, block: int, row: Any) -> float:
    """max |d| of one block's row; a row that is not finite numbers is an error."""
    if not isinstance(row, list) or not row:
        raise RoutingReportError(path, f"'cohen_d' row of block {block} must be a non-empty list of numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
        raise RoutingReportError(path, f"'cohen_d' row of block {block} holds a value that is not a finite number")
    return max(abs(float(x)) for x in row)


def check_model(report: RoutingReport, arch: str, n_layer: int) -> None:
    """Refuse a report made for another model: other architecture, or other block count."""
    from rs_local.converters.moe_arch import normalise

    if report.arch and arch and normalise(report.arch) != normalise(arch):
        raise RoutingReportError(report.path, f"made for a '{report.arch}' model, this model is '{arch}'; "
                                 "run `rs-local experts` on this model")
    if report.n_layer is not None and report.n_layer != n_layer:
        raise RoutingReportError(report.path, f"made for a model with {report.n_layer} blocks, this model has {n_layer}; "
                                 "run `rs-local experts` on this model")
    if max(report.strength) >= n_layer:
        raise RoutingReportError(report.path, f"names block {max(report.strength)}, this model has {n_layer} blocks")


def check_model_file(report: RoutingReport, model: str) -> None:
    """The same check from a local GGUF's header, before the model is loaded (minutes for a large MoE).

    Anything that is not a local GGUF (a Hugging Face directory, a model not pulled yet) is
    checked after loading instead.
    """
    from rs_local import models
    from rs_local.converters.gguf_header import gguf_scalars

    try:
        path = models.resolve(model, auto_pull=False)
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            return
        meta = gguf_scalars(path)
    except (ModelError, OSError):
        return  # the loader reports these
    arch = str(meta.get("general.architecture", ""))
    n_layer = meta.get(f"{arch}.block_count")
    if is_json_int(n_layer):
        check_model(report, arch, n_layer)


def choose_blocks(report: RoutingReport, top: int) -> list[int]:
    """The ``top`` steerable MoE blocks with the largest routing effect, in block order."""
    steerable = {b: s for b, s in report.strength.items() if b >= 1}
    if top < 1 or top > len(steerable):
        raise RoutingReportError(report.path, f"--routing-top {top}: the report has {len(steerable)} steerable MoE "
                                 f"block(s) ({', '.join(map(str, sorted(steerable))) or 'none'})")
    ranked = sorted(steerable, key=lambda b: (-steerable[b], b))
    return sorted(ranked[:top])


def provenance(report: RoutingReport, chosen: list[int], top: int) -> dict[str, Any]:
    """What goes into the vector's metadata, so ``inspect``/``layers`` can say how blocks were chosen."""
    return {
        "layer_rule": "routing",
        "routing_report": str(report.path),
        "routing_rule": RULE,
        "routing_top": top,
        "routing_strength": {str(b): round(report.strength[b], 4) for b in sorted(report.strength)},
        "routing_blocks": ",".join(map(str, chosen)),
    }
