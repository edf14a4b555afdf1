"""Recipes: code that *fits* something end to end (a steering vector, a policy), as opposed
to :mod:`rs_local.eval`, which only measures.

A recipe may use both sides of the house (Transformers for gradients or activations, llama.cpp
to answer and judge), which is why it lives here and not in ``eval/``: ``eval/`` imports no
torch. Modules: :mod:`~rs_local.recipes.isolate` (the default refusal-isolation recipe behind
``rs-local isolate``), :mod:`~rs_local.recipes.demo` (``rs-local demo``),
:mod:`~rs_local.recipes.policy_fit` (``rs-local policy fit``).
"""
