"""Reference attention in plain torch: correct on CPU and CUDA, not fast.

Gathers each sequence's KV from its blocks and calls `scaled_dot_product_attention` with an
explicit causal mask offset by the cached prefix. Decode-only steps are batched (padded);
steps with prefill chunks loop over sequences.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from baton.engine.attention.base import AttentionBackend, AttentionMetadata


class TorchAttention(AttentionBackend):
    name = "torch"

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        bs = meta.block_size
        starts = [0, *itertools.accumulate(meta.query_lens)]  # host copy: no device sync
        for i, (qlen, slen) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            nblocks = -(-slen // bs)
            table = meta.block_tables[i, :nblocks].long()
            keys = k_cache[table].reshape(-1, self.num_kv_heads, self.head_dim)[:slen]
            values = v_cache[table].reshape(-1, self.num_kv_heads, self.head_dim)[:slen]
            qi = q[starts[i] : starts[i] + qlen]
            # Query j sits at position slen - qlen + j and sees keys 0..that position.
            qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
            mask = torch.arange(slen, device=q.device)[None, :] <= qpos
            out[starts[i] : starts[i] + qlen] = self._sdpa(qi[None], keys[None], values[None], mask)[0]
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        bs = meta.block_size
        max_blocks = -(-meta.max_seq_len // bs)
        table = meta.block_tables[:, :max_blocks].long()
        n = meta.num_seqs
        # In q's dtype from here: an e4m3 cache (kv_cache_dtype="fp8") has no masked_fill.
        keys = k_cache[table].reshape(n, -1, self.num_kv_heads, self.head_dim).to(q.dtype)
        values = v_cache[table].reshape(n, -1, self.num_kv_heads, self.head_dim).to(q.dtype)
        mask = torch.arange(keys.shape[1], device=q.device)[None, :] < meta.seq_lens_t[:, None]
        # Slots past a sequence's end hold whatever the pool held (uninitialised memory, or
        # another request's KV): a NaN there would survive masking (0 * NaN), so zero them.
        keys = keys.masked_fill(~mask[:, :, None, None], 0)
        values = values.masked_fill(~mask[:, :, None, None], 0)
        return self._sdpa(q[:, None], keys, values, mask[:, None, :])[:, 0]

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        """q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask [B or 1, Lq, Lk] (True = attend)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k.to(q.dtype), v.to(q.dtype)))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None] if mask.dim() == 3 else mask,
            scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)
