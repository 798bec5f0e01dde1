"""The paged KV cache: one tensor, block-major.

Layout (`KV_LAYOUT = "block_major_v1"`):

    kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

`kv[b]` holds every layer's keys (index 0) and values (index 1) of block `b`, contiguous.
A prompt's KV is therefore the blocks in its block table and nothing else: a handoff of
blocks `[7, 8, 9, 10]` is one contiguous region of `4 * block_bytes` bytes, and contiguous
block runs reserved on the decode side keep a handoff to a handful of large copies
(a transfer's cost is set by its number of messages more than by its bytes). Within a layer, `kv[:, l, 0]` is a
`[num_blocks, block_size, num_kv_heads, head_dim]` view with a block stride of
`num_layers * 2 * block_size * num_kv_heads * head_dim` elements, the per-layer paged layout
attention kernels read (token-major inside a block, so one token's heads are contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_LAYOUT = "block_major_v1"


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and dtype of a KV pool; `block_bytes` is what one block costs in memory."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def allocate(self, num_blocks: int, device: torch.device) -> torch.Tensor:
        """The pool. On CPU it is left uninitialised, so the OS commits pages only as blocks
        are used (the reference backend zeroes what it reads past a sequence's end); on CUDA
        it is zero-filled."""
        if device.type == "cpu":
            return torch.empty(self.shape(num_blocks), dtype=self.dtype, device=device)
        return torch.zeros(self.shape(num_blocks), dtype=self.dtype, device=device)


def layer_view(kv: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer: two `[num_blocks, block_size, kv_heads, head_dim]` views."""
    return kv[:, layer, 0], kv[:, layer, 1]
