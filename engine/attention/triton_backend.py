"""The Triton attention backend (CUDA): paged decode and prefill kernels, KV store.

A decode-only step runs the split-K decode kernel over all sequences; its grid depends on
the number of sequences only, so the step can be captured in a CUDA graph. Called through
`rope_attend`, that kernel also does the step's rotary and KV store. A step with
prefill chunks sends its one-token sequences to the decode kernel (through index lists) and
the rest to the prefill kernel; what it derives from the host lengths is planned once per
step in `meta.plan` and reused by every layer.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from baton.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.engine.attention.triton_decode import SplitCounts, num_splits_for, paged_decode
from baton.engine.attention.triton_prefill import paged_prefill, prefill_config, prefill_work


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # a negative slot is a padding row of a captured batch
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(k_cache_ptr + block * stride_cb + offset * stride_ct + h[:, None] * stride_ch + d[None, :],
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vct + h[:, None] * stride_vch + d[None, :],
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [T, Hkv, D] -> their slots in the paged views; rows with slot < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        num_warps=1,
    )


class TritonAttention(AttentionBackend):
    """The Triton kernels, under the engine's `KernelConfig`: the decode kernel's split rule,
    the merge in the last split (its counters are this backend's), the rotary + KV store in
    the decode kernel for decode-only steps of at most `rope_attention_max_pairs` (sequence,
    KV head) pairs (beyond, the kernel slows by about what the saved kernel took), PDL."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._split_counts = SplitCounts() if self.kernels.merge_in_splits else None

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, out: torch.Tensor, num_programs: int,
                **kwargs) -> torch.Tensor:
        """`paged_decode` for `num_programs` sequences under this backend's settings."""
        k = self.kernels
        splits = num_splits_for(num_programs, self.num_kv_heads, programs=k.split_programs,
                                until_pairs=k.split_until_pairs)
        return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, self.scale, out,
                            num_splits=splits, split_counts=self._split_counts, pdl=k.pdl, **kwargs)

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta, out, meta.block_tables.shape[0])
        plan = meta.plan.get("triton")
        if plan is None:
            plan = meta.plan["triton"] = self._plan(meta, q)
        if plan["decode_seqs"] is not None:
            self._decode(q, k_cache, v_cache, meta, out, plan["decode_seqs"].shape[0],
                         seq_ids=plan["decode_seqs"], q_rows=plan["decode_rows"])
        paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, meta.query_start_loc,
                      meta.query_lens, meta.seq_lens, self.scale, out, config=plan["config"], work=plan["work"])
        return out

    def fuses_rope(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_seqs * self.num_kv_heads <= self.kernels.rope_attention_max_pairs

    def rope_attend(self, qkv, cos_sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor | None:
        """Decode-only steps of at most `rope_attention_max_pairs` (sequence, KV head) pairs:
        the decode kernel rotates and stores too, saving the rope_store kernel."""
        if not self.fuses_rope(meta):
            return None
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rope = (cos_sin, qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :], meta.slot_mapping)
        return self._decode(q, k_cache, v_cache, meta, out, meta.block_tables.shape[0], rope=rope)

    def decode_kernel(self, num_seqs: int) -> str:
        k = self.kernels
        splits = num_splits_for(num_seqs, self.num_kv_heads, programs=k.split_programs, until_pairs=k.split_until_pairs)
        text = f"Triton paged decode, {splits} split{'s' if splits > 1 else ''}"
        if splits > 1:
            text += ", merged in the last" if self._split_counts is not None else " + merge kernel"
        if num_seqs * self.num_kv_heads <= k.rope_attention_max_pairs:
            text += ", with rotary + KV store"
        return text

    def _plan(self, meta: AttentionMetadata, q: torch.Tensor) -> dict:
        """Split a mixed step: one-token sequences go to the decode kernel."""
        device = q.device
        starts = [0, *itertools.accumulate(meta.query_lens)]
        decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        config = prefill_config(self.head_dim, q.dtype, max((meta.query_lens[i] for i in prefill), default=0))
        plan: dict = {
            "config": config,
            "work": prefill_work(meta.query_lens, meta.seq_lens, config["block_m"], device, prefill),
            "decode_seqs": None,
            "decode_rows": None,
        }
        if decode:
            lists = torch.tensor([decode, [starts[i] for i in decode]], dtype=torch.int32)
            on_device = lists.to(device, non_blocking=True)
            plan["decode_seqs"], plan["decode_rows"] = on_device[0], on_device[1]
        return plan
