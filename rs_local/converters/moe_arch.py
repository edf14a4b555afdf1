"""Mixture-of-Experts architectures: which are which, and what the GGUF loaders need told.

Checked against llama-cpp-python 0.3.36's vendored llama.cpp (``src/models/*.cpp``: every MoE
graph below calls ``build_cvec``, so control vectors are applied) and Transformers 5.23's GGUF
loader (``GGUF_SUPPORTED_ARCHITECTURES``). Families both read: Qwen2-MoE, Qwen3-MoE, gpt-oss
and MiniMax-M2. Mixtral-style models are ``llama`` GGUFs with experts, which Transformers'
GGUF loader reads as a dense llama (it maps no expert keys for ``llama``), so they cannot be
fitted from the GGUF.

Control-vector files carry a free-text ``model_hint`` (repeng writes the Hugging Face
``model_type``, llama.cpp's tools the GGUF architecture). Only a hint that puts the vector on
the other side of the dense / MoE divide is treated as an error: directions fitted on a dense
model mean nothing in a routed one, and the reverse, even when the widths happen to agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rs_local.errors import VectorFileError

#: GGUF architecture -> Transformers ``model_type``, MoE families both loaders read.
BOTH_LOADERS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}

#: Normalised names (lowercase, no separators) of architectures that route tokens to experts.
_MOE_NAMES = {
    "mixtral", "qwen2moe", "qwen3moe", "qwen3next", "qwen35moe", "qwen3vlmoe", "gptoss", "minimaxm2", "deepseek2",
    "deepseekv2", "deepseekv3", "phimoe", "olmoe", "granitemoe", "dbrx", "jamba", "arctic", "grok", "jetmoe",
    "llama4", "glm4moe", "ernie45moe", "bailingmoe", "hunyuanmoe", "openaimoe",
}

#: GGUF metadata key (after ``<arch>.``) -> Transformers config field, per architecture. The
#: GGUF config mapping of Transformers 5.23 skips the experts' width, so a model whose experts
#: are not the config class's default width fails to load without these.
_HF_OVERRIDES = {
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
    "qwen2moe": {"expert_feed_forward_length": "moe_intermediate_size",
                 "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
}


def normalise(name: str) -> str:
    """``qwen3_moe``, ``Qwen3-MoE`` and ``qwen3moe`` all become ``qwen3moe``."""
    text = re.sub(r"[^a-z0-9]", "", name.lower())
    return text[:-4] if text.endswith("text") else text  # gemma3_text is gemma3


def is_moe_name(name: str) -> bool:
    """Whether an architecture name (GGUF or Transformers spelling) is a routed-experts one."""
    norm = normalise(name)
    return norm in _MOE_NAMES or "moe" in norm


def expert_count(metadata: dict[str, Any]) -> int:
    """``<arch>.expert_count`` of a model GGUF's metadata (0 for a dense model)."""
    arch = str(metadata.get("general.architecture", ""))
    try:
        return int(metadata.get(f"{arch}.expert_count", 0) or 0)
    except (TypeError, ValueError):
        return 0


def transformers_overrides(metadata: dict[str, Any]) -> dict[str, int]:
    """Config fields Transformers' GGUF loader misses for this model, read from its metadata."""
    arch = str(metadata.get("general.architecture", ""))
    out = {}
    for key, field in _HF_OVERRIDES.get(arch, {}).items():
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, int) and value > 0:
            out[field] = value
    return out


def vector_arch_problem(hint: str, model_arch: str, model_experts: int) -> str | None:
    """Why a vector with ``hint`` does not belong on this model, or None.

    Silent when the hint is empty or names the model's own architecture; an error only when
    the hint is on the other side of the dense / MoE divide from the model.
    """
    if not hint or normalise(hint) == normalise(model_arch):
        return None
    hint_moe, model_moe = is_moe_name(hint), model_experts > 0
    if hint_moe == model_moe:
        return None
    kind = {True: "a Mixture-of-Experts", False: "a dense"}
    model_kind = f"{model_experts} experts" if model_moe else "dense"
    return (f"vector was made for {kind[hint_moe]} model ('{hint}'), this model is '{model_arch}' ({model_kind}); "
            f"fit a vector on this model")


def check_vector_arch(hint: str, model_arch: str, model_experts: int, path: str | Path) -> None:
    """:func:`vector_arch_problem` as the one error every place a vector meets a model raises."""
    problem = vector_arch_problem(hint, model_arch, model_experts)
    if problem:
        raise VectorFileError(path, problem)
