"""The attention backend interface.

A backend does two things per layer: write the step's new keys and values into the paged
KV cache, and compute attention of the step's queries over each sequence's whole context
(cached prefix plus the new tokens), causally. Backends are chosen by name
(`attention_backend` in `EngineArgs`) and imported only when chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from baton.engine.config import KernelConfig


@dataclass
class AttentionMetadata:
    """One step's batch layout, built once per step by the model runner.

    Tokens of all sequences are flattened: sequence i owns query rows
    `query_start_loc[i]:query_start_loc[i+1]`, which are the last `query_lens[i]` positions
    of its context of `seq_lens[i]` tokens. Device tensors:
      slot_mapping    [num_tokens] int64  block_id * block_size + offset of each new token
      query_start_loc [num_seqs + 1] int32
      seq_lens_t      [num_seqs] int32
      block_tables    [num_seqs, max_blocks] int32, padded with 0
    Host copies (`query_lens`, `seq_lens`) let backends plan without a device sync; a
    backend may keep what it derives from them in `plan`, so each layer reuses it.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens_t: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)


class AttentionBackend(ABC):
    """Paged attention for one model. Stateless between steps except for caches of plans.

    `forward` = `store` + `attend`. A model whose fused rotary kernel already wrote the
    step's keys and values into the cache calls `attend` alone. A backend with
    `supports_cuda_graphs` computes decode-only steps from device tensors and the number of
    sequences only (never from the host lengths), so that step can be captured in a CUDA
    graph and replayed with other lengths.
    """

    name: str
    supports_cuda_graphs = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 kernels: KernelConfig | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kernels = kernels or KernelConfig(pdl=False)  # the engine's kernel switches, PDL resolved

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Store k, v at `meta.slot_mapping`, then attend.

        q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim];
        k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (strided views of
        the block-major pool). Returns [num_tokens, num_heads, head_dim] in q's dtype.
        """
        self.store(k, v, k_cache, v_cache, meta)
        return self.attend(q, k_cache, v_cache, meta)

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """Write the step's keys and values into their slots."""
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, meta.block_size)

    def fuses_rope(self, meta: AttentionMetadata) -> bool:
        """Whether `rope_attend` takes this step (then the model leaves the rotary to it)."""
        return False

    def rope_attend(self, qkv, cos_sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's rotary, KV store and attention in one kernel, from the fused Q/K/V
        projection [T, (H + 2 Hkv) D] not yet rotated (cos_sin [max_position, D], cos then
        sin); None where this backend has no such kernel or it does not pay for this step
        (`fuses_rope` is False)."""
        return None

    def decode_kernel(self, num_seqs: int) -> str:
        """What computes a decode-only step of `num_seqs` sequences (for the engine's log)."""
        return f"{self.name} attention"

    @abstractmethod
    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q over each sequence's cached context (the step's keys included).

        q [num_tokens, num_heads, head_dim], rows may be strided (the head dimension is
        contiguous). Returns a new [num_tokens, num_heads, head_dim] tensor in q's dtype.
        """


def write_kv(k, v, k_cache, v_cache, slot_mapping, block_size: int) -> None:
    """Scatter new keys/values into their slots (works on the strided per-layer views).

    Every slot must be valid: padding rows with negative slots only occur in captured decode
    steps, which run on backends whose `store` skips them.
    """
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


# name -> "module:Class"; imported only when chosen.
BACKENDS: dict[str, str] = {
    "torch": "baton.engine.attention.torch_ref:TorchAttention",
    "triton": "baton.engine.attention.triton_backend:TritonAttention",
    "flash_attn": "baton.engine.attention.flash_attn:FlashAttnBackend",
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pick_backend_name(requested: str, device: torch.device) -> str:
    """"auto": the Triton kernels on CUDA (measured fastest: docs/performance.md), else torch.

    `flash_attn` is chosen by name only: its paged kernels need blocks of 256 tokens.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda" and _importable("triton"):
        return "triton"
    return "torch"


def create_backend(name: str, device: torch.device, **kwargs) -> AttentionBackend:
    name = pick_backend_name(name, device)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    module_name, cls_name = BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)
