"""Fused CUDA kernels (Triton) for the Llama block; each equals the plain torch code it replaces.

- `add_rms_norm`: residual add and RMSNorm in one pass (Hugging Face's rounding: the sum is
  rounded to the model dtype, normalised in float32, rounded, then scaled by the weight).
- `rope_store`: rotary embedding of q (in place, inside the fused QKV output) and k, and the
  store of the rotated k and of v into the paged KV cache, in one pass; rows whose slot is
  negative (padding of a captured batch) are not stored.
- `silu_mul`: SiLU(gate) * up over the fused gate/up projection.
- `argmax_rows`: the greedy token of each logits row, the vocabulary in chunks across SMs.

Each saves several small kernels and round trips through memory per layer, which is what
bounds a batch-1 decode step once the matrix products are at the bandwidth floor. The fast
path (`engine/fastpath`) calls them; the CPU path never imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.engine.fastpath.pdl import enter, launch_kwargs


@triton.jit
def add_rms_norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                     BLOCK: tl.constexpr):
    """One row's RMSNorm(x + residual) [BLOCK] (columns past `n_cols` zero), rounded to x's
    dtype; with a residual the sum is stored into it. For `_add_rms_norm_kernel` and the
    kernels that also quantize the result (engine/quantization/fused.py)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as a torch add would be
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    y = add_rms_norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RESIDUAL, BLOCK)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 pdl: bool = False) -> torch.Tensor:
    """RMSNorm of `x + residual` (or of `x`); with a residual, the sum is written into it.

    x, residual [T, hidden] with a contiguous last dimension. Returns the normalised [T, hidden].
    pdl: launch with programmatic dependent launch (`pdl.py`), as every wrapper here.
    """
    num_rows, n_cols = x.shape
    out = torch.empty((num_rows, n_cols), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(num_rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        **launch_kwargs(pdl),
    )
    return out


@triton.jit
def _rope_store_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qkv, stride_cs,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALF_PAD)
    j_mask = j < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j_mask, other=0.0)[None, :]
    row = qkv_ptr + t * stride_qkv

    # Queries, rotated in place: out = x * cos + rotate_half(x) * sin, in float32.
    h = tl.arange(0, H_PAD)
    mask = (h[:, None] < NUM_HEADS) & j_mask[None, :]
    ptr1 = row + h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr1, (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        kh = tl.arange(0, KV_PAD)
        kmask = (kh[:, None] < NUM_KV_HEADS) & j_mask[None, :]
        kptr = row + NUM_HEADS * HEAD_DIM + kh[:, None] * HEAD_DIM + j[None, :]
        k1 = tl.load(kptr, mask=kmask, other=0.0)
        k2 = tl.load(kptr + HALF, mask=kmask, other=0.0)
        g1, g2 = k1.to(tl.float32), k2.to(tl.float32)
        dst = k_cache_ptr + block * stride_kb + offset * stride_kt + kh[:, None] * stride_kh + j[None, :]
        tl.store(dst, (g1 * cos - g2 * sin).to(k_cache_ptr.dtype.element_ty), mask=kmask)
        tl.store(dst + HALF, (g2 * cos + g1 * sin).to(k_cache_ptr.dtype.element_ty), mask=kmask)
        vptr = kptr + NUM_KV_HEADS * HEAD_DIM
        vdst = v_cache_ptr + block * stride_vb + offset * stride_vt + kh[:, None] * stride_vh + j[None, :]
        tl.store(vdst, tl.load(vptr, mask=kmask, other=0.0).to(v_cache_ptr.dtype.element_ty), mask=kmask)
        tl.store(vdst + HALF, tl.load(vptr + HALF, mask=kmask, other=0.0).to(v_cache_ptr.dtype.element_ty),
                 mask=kmask)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    pdl: bool = False,
) -> torch.Tensor:
    """Rotate q and k of the fused projection, store k and v in the cache; return q.

    qkv [T, (H + 2 * Hkv) * D] contiguous (q is rotated in place); positions [T];
    cos_sin [max_position, D] float32 (cos in the first half, sin in the second);
    k_cache, v_cache [num_blocks, block_size, Hkv, D] strided views. Returns q as a
    [T, H, D] view of `qkv`.
    """
    num_tokens = qkv.shape[0]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if num_tokens:
        half = head_dim // 2
        _rope_store_kernel[(num_tokens,)](
            qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos_sin.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            H_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half),
            BLOCK_SIZE=k_cache.shape[1], num_warps=4, **launch_kwargs(pdl),
        )
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)


@triton.jit
def silu_mul_cols(x_ptr, row, stride_x, n_cols, cols):
    """SiLU(gate) * up at columns `cols` of one row of [gate | up] (n_cols each), rounded to
    the input dtype as the torch code rounds (columns past `n_cols` zero)."""
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds to the input dtype
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * stride_o + cols, silu_mul_cols(x_ptr, row, stride_x, n_cols, cols), mask=cols < n_cols)


def silu_mul(gate_up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """[T, 2 * I] (gate then up) -> SiLU(gate) * up [T, I]."""
    num_rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows:
        block = min(2048, triton.next_power_of_2(inter))
        _silu_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4, **launch_kwargs(pdl),
        )
    return out


@triton.jit
def _argmax_chunks_kernel(x_ptr, val_ptr, idx_ptr, stride_x, n_cols, num_chunks, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    value, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * num_chunks + chunk, value)
    tl.store(idx_ptr + row * num_chunks + chunk, chunk * BLOCK + index)


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_PAD)
    mask = c < num_chunks
    values = tl.load(val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    best = tl.argmax(values, 0, tie_break_left=True)  # the first chunk holding the maximum
    tl.store(out_ptr + row, tl.load(idx_ptr + row * num_chunks + best).to(tl.int64))


def argmax_rows(x: torch.Tensor, block: int = 4096, pdl: bool = False) -> torch.Tensor:
    """`x.argmax(dim=-1)` [N] int64 of x [N, V] (rows contiguous), the first index of the
    maximum as torch gives it (NaN excepted): every row in V / block chunks at once, then the
    chunks merged (torch's reduction runs a row per block, slow for a large vocabulary at
    few rows)."""
    rows, cols = x.shape
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    if rows == 0:
        return out
    if x.stride(-1) != 1:
        raise ValueError("argmax_rows needs a contiguous last dimension")
    chunks = triton.cdiv(cols, block)
    values = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
    indices = torch.empty((rows, chunks), dtype=torch.int32, device=x.device)
    _argmax_chunks_kernel[(rows, chunks)](x, values, indices, x.stride(0), cols, chunks, BLOCK=block, num_warps=8,
                                          **launch_kwargs(pdl))
    _argmax_merge_kernel[(rows,)](values, indices, out, chunks, CHUNKS_PAD=triton.next_power_of_2(chunks),
                                  num_warps=1, **launch_kwargs(pdl))
    return out
