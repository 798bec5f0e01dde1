"""Architecture name (config.json `architectures`) -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

MODELS: dict[str, str] = {
    "LlamaForCausalLM": "baton.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "baton.engine.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "baton.engine.models.llama:Qwen2ForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        )
    module_name, cls_name = MODELS[architecture].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
