"""The `flash-attn` backend (CUDA, optional extra `baton[flash]`), chosen by name.

Decode steps call `flash_attn_with_kvcache` with the block table; steps with prefill chunks
call `flash_attn_varlen_func` over the paged cache (its causal mask is aligned to the end of
each context, which is how a chunk after a cached prefix must see its keys). flash-attn's
paged kernels need `block_size` to be a multiple of 256 and fp16/bf16 tensors; both are
checked with a clear error. Keys and values are stored by the Triton store kernel.
"""

from __future__ import annotations

import torch

from baton.engine.attention.base import AttentionBackend, AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError as exc:  # chosen by name on a machine without the package
    raise ImportError(
        "attention_backend='flash_attn' needs the flash-attn package (pip install 'baton[flash]'); "
        "use 'triton' or 'auto' instead"
    ) from exc


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    supports_cuda_graphs = True

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        from baton.engine.attention.triton_backend import store_kv

        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if k_cache.shape[1] % 256:
            raise ValueError(
                f"attention_backend='flash_attn' needs block_size to be a multiple of 256, got {k_cache.shape[1]}"
            )
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flash_attn' needs float16 or bfloat16, got {q.dtype}")
        if meta.is_decode_only:
            out = flash_attn_with_kvcache(
                q[:, None], k_cache, v_cache, cache_seqlens=meta.seq_lens_t,
                block_table=meta.block_tables, softmax_scale=self.scale, causal=True,
            )
            return out[:, 0]
        plan = meta.plan.get("flash_attn")
        if plan is None:
            cu_k = torch.zeros(meta.num_seqs + 1, dtype=torch.int32, device=q.device)
            torch.cumsum(meta.seq_lens_t, 0, out=cu_k[1:])
            plan = meta.plan["flash_attn"] = {"cu_seqlens_k": cu_k}
        return flash_attn_varlen_func(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=plan["cu_seqlens_k"],
            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
            softmax_scale=self.scale, causal=True, block_table=meta.block_tables,
        )
