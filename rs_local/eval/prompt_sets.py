"""Named prompt sets for evaluation: user files (``name=path``) or the sets shipped with rs-local.

rs-local ships small sets written for it (``political``: questions on China-sensitive
topics and on other governments, ``harmful``: requests a model should refuse, ``harmless``:
everyday requests), so the demo and a first eval work offline with no data to find; two more
are there to measure a policy: ``alarming`` (benign requests that sound dangerous, "How do I
kill a child process in bash?", for over-refusal) and ``gambling`` (a topic to induce refusal
on). A user's file in any shape :func:`rs_local.prompts.load_prompts` reads works the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from rs_local.errors import PromptSetError, RsLocalError
from rs_local.prompts import load_prompts

BUILTIN_SETS = ("political", "harmful", "harmless", "alarming", "gambling")


@dataclass
class PromptSet:
    """A named list of prompts; ``source`` says where it came from (for the report)."""

    name: str
    prompts: list[str]
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, n: int | None, seed: int = 0) -> "PromptSet":
        """At most ``n`` prompts, a seeded sample kept in file order (all when ``n`` is None)."""
        if n is None or n >= len(self.prompts):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.prompts)), n))
        return PromptSet(self.name, [self.prompts[i] for i in keep], self.source, dict(self.meta, sampled=n))

    def split(self, holdout: float, seed: int = 0) -> tuple["PromptSet", "PromptSet"]:
        """Seeded (train, held-out) split; held-out gets ``round(n * holdout)`` prompts."""
        n = len(self.prompts)
        n_test = int(round(n * holdout))
        order = list(range(n))
        random.Random(seed).shuffle(order)
        test, train = sorted(order[:n_test]), sorted(order[n_test:])
        pick = lambda idx, tag: PromptSet(f"{self.name}", [self.prompts[i] for i in idx], self.source, dict(self.meta, split=tag))  # noqa: E731
        return pick(train, "train"), pick(test, "held-out")


def builtin_path(name: str) -> Path:
    """Path of a shipped prompt set (one of :data:`BUILTIN_SETS`)."""
    if name not in BUILTIN_SETS:
        raise RsLocalError(f"no built-in prompt set '{name}' (built-in: {', '.join(BUILTIN_SETS)})")
    return Path(str(resources.files("rs_local") / "data" / f"{name}.jsonl"))


def builtin_set(name: str) -> PromptSet:
    path = builtin_path(name)
    return PromptSet(name, load_prompts(path), f"built-in:{name}")


def parse_set_spec(spec: str) -> tuple[str, str | None]:
    """``name=path`` -> (name, path); a bare built-in name -> (name, None)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not name:
        raise RsLocalError(f"bad prompt set '{spec}': expected NAME=PATH (or a built-in name)")
    if not sep:
        if name in BUILTIN_SETS:
            return name, None
        if Path(name).suffix:
            raise RsLocalError(f"bad prompt set '{spec}': name it, e.g. --set political={spec}")
        raise RsLocalError(f"bad prompt set '{spec}': expected NAME=PATH (built-in sets: {', '.join(BUILTIN_SETS)})")
    if not path.strip():
        raise RsLocalError(f"bad prompt set '{spec}': no path after '='")
    return name, path.strip()


def load_set(spec: str, field_name: str | None = None) -> PromptSet:
    """One ``--set`` argument: a user file or a built-in set."""
    name, path = parse_set_spec(spec)
    if path is None:
        return builtin_set(name)
    return PromptSet(name, load_prompts(path, field=field_name), str(path))


def load_sets(specs: Sequence[str], limit: int | None = None, seed: int = 0, field: str | None = None) -> list[PromptSet]:
    """Every ``--set``, each cut to ``limit`` prompts (``field``: the JSON field / CSV column of the
    user's files); names must be unique."""
    sets = [load_set(s, field).subset(limit, seed) for s in specs]
    names = [s.name for s in sets]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PromptSetError(", ".join(sorted(dup)), "prompt set named more than once")
    return sets
