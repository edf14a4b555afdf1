"""The isolate recipe's own lifetime rules, checked on the real SmolLM2 GGUF.

SmolLM2-135M refuses none of these everyday prompts, so ``fit_political`` labels them with
llama.cpp and stops with a one-line error before any Transformers load: the cheapest real
call that goes through the recipe's llama.cpp half.
"""

from __future__ import annotations

import pytest

import rs_local.runtime.runner as runner_module
from rs_local.errors import RsLocalError
from rs_local.recipes.isolate import Recipe, fit_political
from rs_local.runtime.runner import Runner

EVERYDAY = ["Name three rivers in Europe.", "How do I reverse a list in Python?"]


def test_a_runner_the_recipe_loads_is_closed_after_the_call(smollm2_path, monkeypatch):
    """Without a runner the recipe loads one; its llama.cpp model and context must be freed when the
    call ends (here by an error), not held for the rest of the process."""
    created: list[Runner] = []

    class Recorded(Runner):  # a real Runner that the test can find afterwards
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(runner_module, "Runner", Recorded)
    with pytest.raises(RsLocalError, match="refuses none"):
        fit_political(str(smollm2_path), EVERYDAY, EVERYDAY, EVERYDAY, Recipe(), cache=False)
    assert len(created) == 1
    assert created[0].llama.model is None and created[0].llama.ctx is None


def test_a_runner_passed_in_stays_open(smollm2_path):
    runner = Runner(smollm2_path, n_ctx=512)
    try:
        with pytest.raises(RsLocalError, match="refuses none"):
            fit_political(str(smollm2_path), EVERYDAY, EVERYDAY, EVERYDAY, Recipe(), runner=runner, cache=False)
        assert runner.llama.model is not None and runner.llama.ctx is not None
        assert runner.chat([{"role": "user", "content": EVERYDAY[0]}], max_tokens=3).tokens
    finally:
        runner.llama.close()


def test_the_gradient_sample_moves_by_one_prompt_when_one_verdict_flips():
    """The recipe samples ``max_prompts`` refused prompts for its gradients: one verdict more or less
    (a near-tied token) must change that sample by that one prompt, not redraw it."""
    from rs_local.recipes.isolate import sample_for_gradients
    from rs_local.vectors.refusal_gradient import RefusedPrompt

    recipe = Recipe(max_prompts=10)
    items = [RefusedPrompt(f"prompt {i}", "I'm sorry") for i in range(30)]
    full = sample_for_gradients(items, recipe)
    assert len(full) == 10 and full == sorted(full, key=items.index)  # kept in order
    for gone in (items[3], full[4]):
        fewer = sample_for_gradients([x for x in items if x is not gone], recipe)
        assert len(fewer) == 10
        assert len({x.prompt for x in full} ^ {x.prompt for x in fewer}) == (2 if gone in full else 0)
    assert sample_for_gradients(items, Recipe(max_prompts=10, seed=1)) != full  # the seed still decides
    assert sample_for_gradients([x.prompt for x in items], recipe) == [x.prompt for x in full]  # plain prompt lists alike


def test_labelling_answers_under_the_recipes_system_prompt(smollm2_path):
    """``Recipe.system`` must reach the labelling answers: the same prompts, answered by the same
    engine, come back different under a system prompt that changes the answer's language (the
    answers the vector is fitted from are the ones the user will get, not the bare prompt's)."""
    from rs_local.recipes.isolate import label_refusals

    runner = Runner(smollm2_path, n_ctx=1024)
    try:
        bare = [a for _p, a, _r in label_refusals(runner, {"t": EVERYDAY}, max_tokens=16)["t"]]
        french = [a for _p, a, _r in label_refusals(runner, {"t": EVERYDAY}, max_tokens=16,
                                                     system="Reply in French only.")["t"]]
    finally:
        runner.llama.close()
    assert all(bare) and all(french)
    assert french[0] != bare[0], (bare, french)


def test_a_keep_set_that_lost_its_refusals_between_rounds_is_warned_about():
    """One refused target prompt against seven refused keep prompts: the round-one vector took the keep
    refusals from 7/8 to 0/8 at scale -1, and isolate wrote it with exit 0 and no word."""
    from rs_local.recipes.isolate import keep_lost_warning

    plain = {"political": 1, "harmful": 7}
    warning = keep_lost_warning(plain, 0, 8, -1.0, ("target", "pol8.txt"))
    assert warning and "pol8.txt set's refusals from 7 to 0 of 8" in warning and "(1 target refusals" in warning
    assert keep_lost_warning(plain, 4, 8, -1.0) is None  # half kept: the recipe's ordinary cost
    assert keep_lost_warning({"political": 3, "harmful": 0}, 0, 8, -1.0) is None  # nothing refused to lose
