"""The model runtime: paged KV cache, scheduler, sampler, engines (vLLM's API).

Importing `baton.engine` is cheap; torch is loaded when an engine class is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from baton.sampling_params import GuidedDecodingParams, PoolingParams, SamplingParams

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "GuidedDecodingParams",
    "LLMEngine",
    "LoRARequest",
    "ModelRegistry",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
]

_LAZY = {
    "LLM": "baton.engine.llm",
    "LLMEngine": "baton.engine.llm_engine",
    "LoRARequest": "baton.engine.lora.request",
    "AsyncLLMEngine": "baton.engine.async_engine",
    "EngineArgs": "baton.engine.config",
    "ModelRegistry": "baton.engine.models.registry",
    "RequestOutput": "baton.engine.outputs",
    "CompletionOutput": "baton.engine.outputs",
    "EmbeddingRequestOutput": "baton.engine.outputs",
}

if TYPE_CHECKING:
    from baton.engine.async_engine import AsyncLLMEngine
    from baton.engine.config import EngineArgs
    from baton.engine.llm import LLM
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.lora.request import LoRARequest
    from baton.engine.models.registry import ModelRegistry
    from baton.engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'baton.engine' has no attribute {name!r}")
