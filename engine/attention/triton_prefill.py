"""Paged prefill attention in Triton: causal attention of a chunk of queries over the cache.

A sequence's step computes `query_len` new tokens that sit at the end of its context of
`seq_len` tokens; everything before them (a cached prefix, earlier chunks) is already in the
paged cache, and the new tokens' keys and values were stored before this kernel runs. So one
kernel serves fresh prompts, chunked prefill and prefix-cache hits alike: keys and values are
always read through the block table.

The grid is (query head, work item), one work item per `BLOCK_M` query rows of one sequence,
listed on the host from the step's lengths (no empty programs for short sequences), the
longest first and all heads of an item side by side, so the causal mask's uneven work does
not leave a tail of long programs at the end. Key tiles left of the block's first query
position need no causal mask; the tiles after that are masked. Only the head dimension must
be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.engine.attention.triton_tile import attend_tile


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, work_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    w = tl.program_id(1)
    seq = tl.load(work_ptr + 2 * w)
    m0 = tl.load(work_ptr + 2 * w + 1)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    kvh = h // GROUP

    rows = m0 + tl.arange(0, BLOCK_M)
    r_mask = rows < q_len
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q_off = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_off[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + rows  # each query's position in its sequence
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    # Every query of this block sees all keys before its first position: no mask there.
    full_end = (prefix + m0) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(q, k_ptr, v_ptr, bt_row, kvh, n0, q_pos, seq_len, d, d_mask, m_i, l_i, acc,
                                    qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                    BLOCK_SIZE, BLOCK_N, False, False, PRECISION)
    end = tl.minimum(seq_len, prefix + m0 + BLOCK_M)
    for n0 in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = attend_tile(q, k_ptr, v_ptr, bt_row, kvh, n0, q_pos, seq_len, d, d_mask, m_i, l_i, acc,
                                    qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                    BLOCK_SIZE, BLOCK_N, True, True, PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_off[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def prefill_config(head_dim: int, dtype: torch.dtype, max_query_len: int = 0) -> dict:
    """Tile shapes and launch settings (measured on an H100: docs/performance.md)."""
    if dtype == torch.float32:
        return {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2}
    if head_dim > 128:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    if max_query_len >= 4096:  # enough work items to fill the GPU with large tiles
        return {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
    return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}


def prefill_work(query_lens: list[int], seq_lens: list[int], block_m: int, device: torch.device,
                 seqs: list[int] | None = None) -> torch.Tensor:
    """[W, 2] int32 (sequence, first query row), one per `block_m` rows of each sequence,
    ordered by the keys each item reads, most first."""
    items = [
        (seq_lens[s] - query_lens[s] + m0, s, m0)
        for s in (range(len(query_lens)) if seqs is None else seqs)
        for m0 in range(0, query_lens[s], block_m)
    ]
    items.sort(reverse=True)
    flat = [v for _, s, m0 in items for v in (s, m0)]
    return torch.tensor(flat, dtype=torch.int32).view(-1, 2).to(device, non_blocking=True)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens_t: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    out: torch.Tensor,
    seqs: list[int] | None = None,
    config: dict | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    q [T, H, D] flat over sequences (sequence i owns rows query_start_loc[i]:[i+1], the last
    `query_lens[i]` positions of its `seq_lens[i]` tokens; `seq_lens_t` is the device copy);
    k_cache, v_cache [num_blocks, block_size, Hkv, D] already hold every token's keys and
    values; block_tables [S, max_blocks] int32. `seqs` limits the work to those sequences (the
    others' rows of `out` are left alone). `work` is `prefill_work(...)` for the same lengths
    and config, when the caller keeps it across layers. Returns `out` [T, H, D].
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    cfg = config or prefill_config(head_dim, q.dtype, max(query_lens))
    if work is None:
        work = prefill_work(query_lens, seq_lens, cfg["block_m"], q.device, seqs)
    if work.shape[0] == 0:
        return out
    _prefill_kernel[(num_heads, work.shape[0])](
        q, k_cache, v_cache, out, block_tables, seq_lens_t, query_start_loc, work,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
