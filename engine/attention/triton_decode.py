"""Paged decode attention in Triton: one query token per sequence over its paged KV.

Split-K ("flash decoding"): the grid is (sequence, KV head, split). Each program takes the
`GROUP` query heads that share one KV head (padded to 16 rows so the two products run on
the tensor cores), walks its split of the context in tiles of `BLOCK_N` tokens, gathering
each token's key and value rows through the block table, and keeps an online softmax. With
one split the program writes the final output; with several, each writes a normalised
partial output and its log-sum-exp (base 2), and the split that finishes last for its
sequence and KV head merges them (with `split_counts`, the default of the Triton backend;
else a second kernel).

With `rope` (a decode-only step of a Llama-family model), the kernel also does the rotary
embedding and the KV store that `triton_ops.rope_store` would do in a kernel of its own:
each program rotates its query heads as it loads them; the new token's key and value never
go through the cache in this kernel (the walk covers the `seq_len - 1` cached tokens): split
0 starts its softmax with them, from registers, and stores them in the cache for later steps.

The grid depends only on the number of sequences (never on their lengths), so a decode
step can be captured in a CUDA graph once per batch size and replayed for any lengths.
KV views are strided (the block stride of the block-major pool is not
`block_size * kv_heads * head_dim`); only the head dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.engine.attention.triton_tile import attend_tile
from baton.engine.fastpath.pdl import enter, launch_kwargs

# `num_splits_for`'s defaults (`KernelConfig.split_programs`, `split_until_pairs`).
SPLIT_PROGRAMS = 320
SPLIT_UNTIL_PAIRS = 256


@triton.jit
def _rope_factors(cs_ptr, seq_len, stride_cs, d, d_mask, HEAD_DIM: tl.constexpr):
    """Rotate-half rotary at position seq_len - 1 as rope_store computes it, in float32:
    x * cos + x[partner] * sin gives x1 cos - x2 sin and x2 cos + x1 sin (sin carries the sign)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    row = cs_ptr + tl.maximum(seq_len - 1, 0).to(tl.int64) * stride_cs
    first = d < HALF
    cos = tl.load(row + d % HALF, mask=d_mask, other=0.0)
    sin = tl.load(row + HALF + d % HALF, mask=d_mask, other=0.0) * tl.where(first, -1.0, 1.0)
    return cos, sin, tl.where(first, d + HALF, d - HALF)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, seq_ids_ptr, q_rows_ptr,
    out_ptr, part_o_ptr, part_lse_ptr, count_ptr,
    cs_ptr, kn_ptr, vn_ptr, slot_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_cs, stride_nt,
    num_heads, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr, INDIRECT: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
    MERGE: tl.constexpr, GROUP_P2: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if INDIRECT:  # a mixed batch: this program's sequence and query row come from lists
        seq = tl.load(seq_ids_ptr + pid)
        q_row = tl.load(q_rows_ptr + pid)
    else:
        seq = pid
        q_row = pid
    seq_len = tl.load(seq_lens_ptr + seq)
    # With ROPE the new token (the last) comes from registers, not from the cache.
    cached = tl.maximum(seq_len - 1, 0) if ROPE else seq_len
    # Splits are whole tiles; trailing splits of a short sequence are empty.
    per_split = tl.cdiv(tl.cdiv(cached, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, cached)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_ptrs = q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    if ROPE:
        cos, sin, partner = _rope_factors(cs_ptr, seq_len, stride_cs, d, d_mask, HEAD_DIM)
        q_partner = tl.load(q_ptrs + partner[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q.dtype)
        if (split == 0) & (seq_len > 0):
            # The new token first, before the walk (its loads overlap the walk's first ones
            # instead of adding a chain of them at the end): rotate its key, start split
            # 0's softmax with it and its value, and store both where later steps read them.
            kn_row = kn_ptr + q_row.to(tl.int64) * stride_nt + kvh * HEAD_DIM
            k_new = tl.load(kn_row + d, mask=d_mask, other=0.0)
            k_partner = tl.load(kn_row + partner, mask=d_mask, other=0.0)
            k_rot = (k_new.to(tl.float32) * cos + k_partner.to(tl.float32) * sin).to(k_ptr.dtype.element_ty)
            v_new = tl.load(vn_ptr + q_row.to(tl.int64) * stride_nt + kvh * HEAD_DIM + d, mask=d_mask, other=0.0)
            m_i = tl.sum(q.to(tl.float32) * k_rot.to(tl.float32)[None, :], 1) * qk_scale
            l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
            acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32) + v_new.to(tl.float32)[None, :]
            slot = tl.load(slot_ptr + seq)
            if slot >= 0:  # a negative slot: a padding row of a captured batch
                page = slot // BLOCK_SIZE
                off = slot % BLOCK_SIZE
                tl.store(k_ptr + page * stride_kb + off * stride_kt + kvh * stride_kh + d, k_rot, mask=d_mask)
                tl.store(v_ptr + page * stride_vb + off * stride_vt + kvh * stride_vh + d,
                         v_new.to(v_ptr.dtype.element_ty), mask=d_mask)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = attend_tile(q, k_ptr, v_ptr, bt_row, kvh, n0, m_i, end, d, d_mask, m_i, l_i, acc, qk_scale,
                                    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                    BLOCK_SIZE, BLOCK_N, False, True, PRECISION)

    out_mask = g_mask[:, None] & d_mask[None, :]
    safe_l = tl.where(l_i > 0, l_i, 1.0)  # an empty split (or length 0) writes zeros
    o = acc / safe_l[:, None]
    if SINGLE:
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        # part_o [programs, num_heads, num_splits, D_PAD], part_lse [programs, num_heads, num_splits]
        row = (pid * num_heads + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * D_PAD + d[None, :], o, mask=out_mask)
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        if MERGE:
            # The split that finishes last for this (sequence, KV head) merges all of them
            # (the merge kernel's work, for its GROUP heads): the others' partial results are
            # visible to it after its acquiring count (theirs released after a barrier).
            tl.debug_barrier()
            count = count_ptr + pid * tl.num_programs(1) + kvh
            if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                _merge_group(out_ptr, part_o_ptr, part_lse_ptr, q_row, pid, kvh, d, d_mask, stride_ot, stride_oh,
                             num_heads, num_splits, GROUP, GROUP_P2, D_PAD, SPLITS_PAD)
                tl.store(count, 0)  # every split has counted: zero for the next launch


@triton.jit
def _merge_group(out_ptr, part_o_ptr, part_lse_ptr, q_row, pid, kvh, d, d_mask, stride_ot, stride_oh,
                 num_heads, num_splits, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D_PAD: tl.constexpr,
                 SPLITS_PAD: tl.constexpr):
    """`_decode_merge_kernel`'s combination for the GROUP query heads of one KV head."""
    g = tl.arange(0, GROUP_P2)
    s = tl.arange(0, SPLITS_PAD)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    base = (pid * num_heads + heads) * num_splits  # [GROUP_P2]
    gs_mask = g_mask[:, None] & (s < num_splits)[None, :]
    lse = tl.load(part_lse_ptr + base[:, None] + s[None, :], mask=gs_mask, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 1)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m[:, None]), 0.0)
    total = tl.sum(w, 1)
    o = tl.load(part_o_ptr + (base[:, None, None] + s[None, :, None]) * D_PAD + d[None, None, :],
                mask=gs_mask[:, :, None], other=0.0, cache_modifier=".cg")
    res = tl.sum(o * w[:, :, None], 1) / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, q_rows_ptr,
    stride_ot, stride_oh, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr, INDIRECT: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(q_rows_ptr + pid) if INDIRECT else pid
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < num_splits
    base = (pid * num_heads + h) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    total = tl.sum(w, 0)
    o = tl.load(part_o_ptr + (base + s)[:, None] * D_PAD + d[None, :], mask=s_mask[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + h * stride_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


class SplitCounts:
    """The counters with which the last split of each (sequence, KV head) merges the splits
    itself instead of a second kernel doing it (`_merge_group`): zeroed int32, kept by one
    attention backend (each launch leaves them zero), sized on first use per device."""

    def __init__(self):
        self._counts: dict[torch.device, torch.Tensor] = {}

    def get(self, n: int, device: torch.device) -> torch.Tensor | None:
        """At least `n` zeroed counters; None while a CUDA graph is being captured and they are
        too few (an allocation there would be replayed as a memset): that step merges in its
        own kernel. Warm-up steps before each capture size them."""
        counts = self._counts.get(device)
        if counts is None or counts.numel() < n:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            self._counts[device] = counts = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        return counts


def num_splits_for(num_seqs: int, num_kv_heads: int, max_splits: int = 32, programs: int = SPLIT_PROGRAMS,
                   until_pairs: int = SPLIT_UNTIL_PAIRS) -> int:
    """Splits for about `programs` programs in all (2.5 per SM of an H100); none from
    `until_pairs` (sequence, KV head) pairs on, where one split beat two plus the merge
    (bench/attention_kernels.py)."""
    pairs = max(1, num_seqs * num_kv_heads)
    return 1 if pairs >= until_pairs else max(1, min(max_splits, -(-programs // pairs)))


def decode_config(head_dim: int, num_seqs: int, num_kv_heads: int) -> tuple[int, int]:
    """(BLOCK_N, num_stages) by the number of (sequence, KV head) pairs, from the same
    measurements: short splits (few pairs) want small tiles, 64-256 pairs (batch 8-32 of an
    8-KV-head model) 128-token tiles, more want 64."""
    if head_dim > 128:
        return 32, 2
    pairs = num_seqs * num_kv_heads
    if pairs < 64:
        return 32, 2
    return (128, 2) if pairs <= 256 else (64, 3)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    seq_ids: torch.Tensor | None = None,
    q_rows: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    split_counts: SplitCounts | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q [T, H, D] (rows may be strided); k_cache, v_cache [num_blocks, block_size, Hkv, D];
    block_tables [S, max_blocks] int32; seq_lens [S] int32 (context length including the
    query's own token, already stored); out [T, H, D]. Without `seq_ids`, program i serves
    sequence i from q row i. With `seq_ids`/`q_rows` ([P] int32 each), program i serves
    sequence `seq_ids[i]` from q row `q_rows[i]` (a mixed prefill/decode step). A sequence of
    length 0 gets zeros. Returns `out`.

    rope = (cos_sin [max_position, D] float32, k_new [S, Hkv * D], v_new [S, Hkv * D],
    slot_mapping [S]): q is not rotated yet and the new token's key and value are not in the
    cache (see the module docstring); k_new/v_new rows share one stride (views of the fused
    Q/K/V projection). Not with `seq_ids`.

    split_counts: the last split merges (else a merge kernel); pdl: launch with
    programmatic dependent launch.
    """
    num_programs = (seq_ids.shape[0] if seq_ids is not None else block_tables.shape[0])
    if num_programs == 0:
        return out
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    for t in (q, k_cache, v_cache, out):
        if t.stride(-1) != 1:
            raise ValueError("attention tensors need a contiguous head dimension")
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = num_splits_for(num_programs, num_kv_heads)
    auto_block_n, auto_stages = decode_config(head_dim, num_programs, num_kv_heads)
    block_n = block_n or auto_block_n
    num_stages = num_stages or auto_stages
    d_pad = triton.next_power_of_2(head_dim)
    indirect = seq_ids is not None
    dummy = seq_lens  # an int32 pointer the kernel never reads when INDIRECT is off
    if rope is not None:
        if indirect:
            raise ValueError("the fused rotary runs on decode-only steps (no seq_ids)")
        cos_sin, k_new, v_new, slots = rope
        if head_dim % 2 or k_new.stride(0) != v_new.stride(0) or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
            raise ValueError("the fused rotary needs an even head_dim and k/v rows of one stride")
        rope_args, stride_cs, stride_nt = (cos_sin, k_new, v_new, slots), cos_sin.stride(0), k_new.stride(0)
    else:
        rope_args, stride_cs, stride_nt = (q, q, q, dummy), 0, 0
    if num_splits > 1:
        part_o = torch.empty((num_programs, num_heads, num_splits, d_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_programs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    counts = None
    if num_splits > 1 and split_counts is not None:
        counts = split_counts.get(num_programs * num_kv_heads, q.device)
    _decode_split_kernel[(num_programs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        seq_ids if indirect else dummy, q_rows if indirect else dummy,
        out, part_o, part_lse, counts if counts is not None else dummy,
        *rope_args,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        stride_cs, stride_nt,
        num_heads, num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SINGLE=num_splits == 1, INDIRECT=indirect, ROPE=rope is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        MERGE=counts is not None, GROUP_P2=triton.next_power_of_2(group),
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(pdl),
    )
    if num_splits > 1 and counts is None:
        _decode_merge_kernel[(num_programs, num_heads)](
            out, part_o, part_lse, q_rows if indirect else dummy,
            out.stride(0), out.stride(1), num_heads, num_splits,
            HEAD_DIM=head_dim, D_PAD=d_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits), INDIRECT=indirect,
            num_warps=1 if d_pad <= 128 else 2, **launch_kwargs(pdl),
        )
    return out
