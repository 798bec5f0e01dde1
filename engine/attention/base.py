"""The attention backend interface.

A backend does two things per layer: write the step's new keys and values into the paged
KV cache, and compute attention of the step's queries over each sequence's whole context
(cached prefix plus the new tokens), causally. Backends are chosen by name
(`attention_backend` in `EngineArgs`) and imported only when chosen.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
    Host copies (`query_lens`, `seq_lens`) let backends plan without a device sync.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens_t: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int

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
    """Paged attention for one model. Stateless between steps except for caches of plans."""

    name: str

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
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


def write_kv(k, v, k_cache, v_cache, slot_mapping, block_size: int) -> None:
    """Scatter new keys/values into their slots (works on the strided per-layer views)."""
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


# name -> "module:Class"; imported only when chosen.
BACKENDS: dict[str, str] = {
    "torch": "baton.engine.attention.torch_ref:TorchAttention",
}


def pick_backend_name(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "torch"


def create_backend(name: str, device: torch.device, **kwargs) -> AttentionBackend:
    name = pick_backend_name(name, device)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    module_name, cls_name = BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)
