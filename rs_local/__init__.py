"""rs-local: refusal steering for local LLMs.

Public names are imported lazily so that ``import rs_local`` pulls in neither torch nor
llama.cpp: a user who only chats with a ready vector must not pay for Transformers, and a
user who only fits must not need a llama.cpp build at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ControlVector": "rs_local.vectors.control_vector",
    "RsLocalError": "rs_local.errors",
    "VectorFileError": "rs_local.errors",
    "ModelError": "rs_local.errors",
    "read_control_vector": "rs_local.converters.gguf_io",
    "write_control_vector": "rs_local.converters.gguf_io",
    "Runner": "rs_local.runtime.runner",
    "resolve_model": "rs_local.models:resolve",
    "pull_model": "rs_local.models:pull",
    "load_prompts": "rs_local.prompts",
    "load_scores": "rs_local.prompts",
    "fit_vector": "rs_local.vectors.fit",
    "FitOptions": "rs_local.vectors.fit",
    "respond": "rs_local.judge.respond",
    "judge_responses": "rs_local.judge.judging",
    "make_judge": "rs_local.judge.backends",
    "fit_political": "rs_local.recipes.isolate",
    "Recipe": "rs_local.recipes.isolate",
    "GradientContrast": "rs_local.vectors.refusal_gradient",
    "evaluate": "rs_local.eval.evaluate",
    "EvalSettings": "rs_local.eval.evaluate",
    "run_demo": "rs_local.recipes.demo",
    "llama_cpp_flags": "rs_local.runtime.llama_flags",
    "load_llama": "rs_local.runtime.loading",
    "decide_repack": "rs_local.runtime.host",
    "BlockReader": "rs_local.runtime.activations",
    "ProbeJudge": "rs_local.judge.probe",
    "train_probe": "rs_local.judge.probe_train",
    "capture_routing": "rs_local.vectors.experts",
    "expert_report": "rs_local.vectors.experts",
    "read_routing": "rs_local.vectors.routing_blocks",
    "choose_routing_blocks": "rs_local.vectors.routing_blocks:choose_blocks",
    "PolicyRunner": "rs_local.runtime.policy",
    "read_policy": "rs_local.runtime.policy_file",
    "write_policy": "rs_local.runtime.policy_file",
    "CategorySpec": "rs_local.recipes.policy_fit",
    "parse_category": "rs_local.recipes.policy_fit",
    "load_category_prompts": "rs_local.recipes.policy_fit",
    "fit_policy": "rs_local.recipes.policy_fit",
    "fit_category_vectors": "rs_local.recipes.policy_vectors",
    "fit_induced": "rs_local.recipes.induce",
}


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rs_local' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr or name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
