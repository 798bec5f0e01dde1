"""Paged-attention test cases and a float64 reference, shared by the CUDA and interpreter tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], a strided view of a block-major pool
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [S, max_blocks] int32, shuffled blocks, extra padding columns
    seq_lens_t: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: list[int]
    query_lens: list[int]
    scale: float


def make_case(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device,
              seed=0, layers=3) -> PagedCase:
    """Random q and a random KV pool laid out as the engine's (block-major, several layers)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    pool = torch.randn((num_blocks, layers, 2, block_size, num_kv_heads, head_dim), generator=gen)
    pool = pool.to(dtype=dtype, device=device)
    layer = layers // 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros((len(seq_lens), max(blocks_per_seq) + 2), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = torch.tensor(order[used : used + nb])
        used += nb
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(dtype=dtype, device=device)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedCase(
        q=q,
        k_cache=pool[:, layer, 0],
        v_cache=pool[:, layer, 1],
        block_tables=tables.to(device),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=list(seq_lens),
        query_lens=list(query_lens),
        scale=head_dim**-0.5,
    )


def reference(case: PagedCase) -> torch.Tensor:
    """Causal attention in float64: query j of sequence i sits at seq_len - query_len + j."""
    q = case.q.double()
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = case.k_cache.shape[2], case.k_cache.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for i, (n, qn) in enumerate(zip(case.seq_lens, case.query_lens)):
        table = case.block_tables[i, : -(-n // block_size)].long()
        keys = case.k_cache[table].reshape(-1, num_kv_heads, head_dim)[:n].double()
        values = case.v_cache[table].reshape(-1, num_kv_heads, head_dim)[:n].double()
        group = num_heads // num_kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("thd,nhd->htn", q[start : start + qn], keys) * case.scale
        pos = torch.arange(n - qn, n, device=q.device)[:, None]
        visible = torch.arange(n, device=q.device)[None, :] <= pos
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + qn] = torch.einsum("htn,nhd->thd", probs, values)
        start += qn
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


# Relative error allowed per dtype: bf16 operands land between 1e-3 and 1e-2, fp16 near 3e-4.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def fused_rope_decode(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, num_splits, seed=0):
    """A decode step through the decode kernel's fused rotary + KV store, and the same step
    through `rope_store` then the plain decode kernel. A length-0 row is a padding row (slot
    -1). Returns (fused out, reference out, fused (K, V) caches, reference (K, V) caches)."""
    from baton.engine.attention.triton_decode import paged_decode
    from baton.engine.fastpath.triton_ops import rope_store
    from baton.engine.models.llama import LlamaArgs, Rotary

    case = make_case(lens, [1] * len(lens), num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn((len(lens), q_size + 2 * kv_size), generator=gen).to(dtype=dtype, device=device)
    cfg = {"hidden_size": q_size, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": num_heads,
           "num_key_value_heads": num_kv_heads, "head_dim": head_dim, "vocab_size": 8,
           "max_position_embeddings": max(lens) + 1, "rope_theta": 500000.0}
    rotary = Rotary(LlamaArgs.from_hf(cfg))
    rotary.build(torch.device(device), max(lens) + 1)
    slots = []
    for i, n in enumerate(lens):
        page = int(case.block_tables[i, (n - 1) // block_size]) if n else 0
        slots.append(page * block_size + (n - 1) % block_size if n else -1)
    slots_t = torch.tensor(slots, dtype=torch.long, device=device)
    positions = (case.seq_lens_t.long() - 1).clamp(min=0)
    args = (case.block_tables, case.seq_lens_t, case.scale)

    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    q_ref = rope_store(qkv.clone(), positions, rotary.cos_sin, k_ref, v_ref, slots_t, num_heads, num_kv_heads,
                       head_dim)
    want = paged_decode(q_ref, k_ref, v_ref, *args, torch.full_like(q_ref, float("nan")), num_splits=num_splits)

    q = qkv[:, :q_size].view(-1, num_heads, head_dim)
    rope = (rotary.cos_sin, qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :], slots_t)
    got = paged_decode(q, case.k_cache, case.v_cache, *args, torch.full_like(q, float("nan")),
                       num_splits=num_splits, rope=rope)
    return got, want, (case.k_cache, case.v_cache), (k_ref, v_ref)
