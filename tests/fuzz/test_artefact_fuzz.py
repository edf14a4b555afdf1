"""Damaged policy and probe-judge files: a few hundred seeded cases (``benchmarks/fuzz.py`` runs more).

Each must be accepted or refused with one line naming the file, with no traceback and no numpy
warning printed above the error (a policy that reads is also shown: ``policy show``, its JSON and
``inspect``, whatever its ``training`` record holds); a category record with a field of the wrong JSON type is
always refused (no coercion of ``"3"`` or ``3.5`` into a block, no ``int(inf)``).
"""

from __future__ import annotations

from collections import Counter

import artefact_cases

SEED = 20261
PER_CLASS = 60


def test_damaged_artefacts_are_read_or_refused_in_one_line(tmp_path):
    outcomes: Counter = Counter()
    failures = []
    for cls in artefact_cases.CLASSES:
        for index in range(PER_CLASS):
            case = artefact_cases.make_case(cls, SEED, index, tmp_path)
            outcome, detail = artefact_cases.classify(case)
            outcomes[(cls, outcome)] += 1
            if outcome not in ("accepted", "clean error"):
                failures.append(f"{case.path.name}: {outcome}: {detail}")
    assert not failures, "\n".join(failures[:5])
    for cls in artefact_cases.CLASSES:  # the generator damages files: most must be refused
        if cls != "policy_training":
            assert outcomes[(cls, "clean error")] > PER_CLASS // 2, outcomes
    # a training record is what the fit noted, not what the gate runs on: odd ones are shown, not refused
    assert outcomes[("policy_training", "accepted")] == PER_CLASS, outcomes


def test_wrongly_typed_record_fields_are_refused(tmp_path):
    """Values no writer produces for the field are damage; the ones it does produce still read."""
    from rs_local.errors import FileProblem
    from rs_local.runtime.policy_file import read_policy

    refused = {("blocks", "3"), ("blocks", True), ("n_prompts", 2.0), ("n_prompts", float("inf")), ("slope", "1"),
               ("accuracy", float("nan")), ("name", 7), ("vector_source", None)}
    for key, value in refused:
        path = artefact_cases._policy(tmp_path / "bad.gguf", {key: value})
        try:
            read_policy(path)
        except FileProblem as exc:
            assert str(exc).startswith(f"{path}: category 0") and key in str(exc)
        else:
            raise AssertionError(f"{key}={value!r} was accepted")
    for key, value in {("n_prompts", 12), ("accuracy", 0.9), ("accuracy", None), ("slope", -2)}:
        policy = read_policy(artefact_cases._policy(tmp_path / "good.gguf", {key: value}))
        assert getattr(policy.categories[0], "n_prompts" if key == "n_prompts" else key) == value
