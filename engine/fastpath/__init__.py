"""The CUDA fast path: the reference model's computation through fused Triton kernels.

The model files (`engine/models`) are plain torch. `apply_fast_path` is the one step that
turns a built reference model into what CUDA runs (as gpt-fast applies tensor parallelism
and quantization after building the model): a model of the same contract whose linear
layers are `Projection`s (`projection.py`, the interface a quantized, tensor-parallel or
LoRA layer implements) and whose forward fuses the kernels around them (`llama.py`, which
also says which kernel computes what). The rest of the package is the kernels:

- `few_row.py`: the few-row product kernel (decode steps) and its fused epilogues;
- `few_row_tuning.py`: which of its configurations wins per shape, measured at engine start;
- `timing.py`: timing a launch sequence from CUDA-graph replays;
- `triton_ops.py`: residual add + RMSNorm, rotary + KV store, SiLU * up, argmax;
- `pdl.py`: programmatic dependent launch (Hopper and later).

Every switch comes from the engine's `KernelConfig`; the tuning results belong to the model
built here (one engine's), never to the process. The CPU path imports this module only
(`apply_fast_path` returns the reference model there), never the kernels.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from baton.engine.config import KernelConfig

log = logging.getLogger(__name__)


def apply_fast_path(model: nn.Module, kernels: KernelConfig, device: torch.device, tuning=None) -> nn.Module:
    """The model to run on `device`: on CUDA with `kernels.fused_kernels`, `model` (left as it
    is, weights shared) with the fast path's kernels, else `model` itself (also for an
    architecture the fast path has no form of, with a warning in the log). The result is
    not tuned yet: its `tune(max_rows)` times the few-row kernels (until then every product
    runs on cuBLAS). `tuning`: a `FewRowTuning` to start from (a model applied again with
    other switches keeps its measurements)."""
    if device.type != "cuda" or not kernels.fused_kernels:
        return model
    from baton.engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    # By exact class: a subclass (a registered architecture, Qwen3's q/k norms) may compute
    # something FastLlama does not, so it runs its own torch forward.
    if type(model) not in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
        log.warning("the fast path has no form of %s: it runs its torch reference forward on %s",
                    type(model).__name__, device)
        return model
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.llama import FastLlama

    return FastLlama(model, kernels, tuning if tuning is not None else FewRowTuning())


def explain(model: nn.Module, backend, sizes: list[int]) -> str:
    """Which kernel computes each op of a decode step of each batch size in `sizes` (sizes
    whose choices are the same as the size before share a block) and of a prefill step, as
    text: what the engine logs at start and `baton generate --explain` prints."""
    if hasattr(model, "decode_kernels"):
        groups: list[tuple[list[int], dict]] = []
        for b in sizes:
            kernels = model.decode_kernels(b, backend)
            if groups and groups[-1][1] == kernels:
                groups[-1][0].append(b)
            else:
                groups.append(([b], kernels))
        columns = {f"decode, batch {g[0]}" + (f"-{g[-1]}" if len(g) > 1 else ""): k for g, k in groups}
        columns["prefill (more than 64 tokens)"] = model.decode_kernels(None, backend)
    else:
        columns = {"every step": {
            "model": f"the torch reference ({type(model).__name__}), no fast path",
            "attention": f"{backend.name} attention backend",
        }}
    width = max(len(op) for kernels in columns.values() for op in kernels)
    lines = []
    for title, kernels in columns.items():
        lines.append(f"{title}:")
        lines += [f"  {op:<{width}}  {text}" for op, text in kernels.items()]
    return "\n".join(lines)
