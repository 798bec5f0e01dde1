"""Matrix products with few rows (decode steps), chosen per shape by measurement.

A decode step multiplies a handful of rows by every weight matrix: the time is the weight
bytes over memory bandwidth, and cuBLAS reaches only 45-80% of it at these shapes on an H100
(docs/architecture.md). `_skinny_kernel` streams a `BLOCK_N`-row slice of the weight per
program through a pipelined K loop, with the few input rows padded to `M_PAD` (16, 32 or 64)
for the tensor cores. No configuration wins everywhere, so `tune` times, for every weight
shape of the model and every row bucket, cuBLAS and each configuration as CUDA-graph replays
(launch overhead excluded, weights of different layers so the L2 cache does not help) and
`linear` uses the winner. Untuned shapes, more than `MAX_ROWS` rows, or float32 use cuBLAS.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from baton.engine.models.pdl import enter, launch_kwargs

log = logging.getLogger(__name__)

MAX_ROWS = 64
# Bytes of each product's weights (all programs together) prefetched into L2 before waiting
# on the previous kernel, when PDL is on. 0 turns it off.
PREFETCH_BYTES = int(float(os.environ.get("BATON_PREFETCH_MB", "8")) * 2**20)
# 2: each program prefetches the start of each of its rows (what its K loop reads first);
# 1: its first rows, whole. 2 with 8 MiB beat 1 with 4 MiB in decode graphs on an H100 (by
# 36 / 22 us a step at batch 8 / 32, bench/results/decode-profile-swap-prefetch-h100.json).
PREFETCH_MODE = int(os.environ.get("BATON_PREFETCH_MODE", "2"))
BUCKETS = (16, 32, 64)
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (16, 128, 4, 8), (32, 256, 4, 4), (32, 128, 4, 6),
           (32, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]
# A fifth entry 1: the transposed product (`SWAP`): on an H100 it wins Q/K/V at 16-32 rows,
# gate/up at 32-64 and lm_head (bench/results/skinny-tuning-h100.json); decode graphs took
# 80-110 us less a step at batch 1-32 with it (decode-profile-swap-prefetch-h100.json).
# USE_SWAP = False leaves these out of the choice (benchmarks flip it and recapture).
USE_SWAP = True
CONFIGS += [(64, 128, 4, 4, 1), (64, 128, 4, 6, 1), (64, 256, 4, 3, 1), (128, 128, 4, 3, 1), (128, 128, 8, 3, 1),
            (128, 64, 4, 6, 1), (128, 256, 8, 2, 1)]

# (N, K, M_PAD, dtype) -> {configuration or "cublas": microseconds per product}. Kept for the
# process: later engines with the same shapes reuse it.
_times: dict[tuple[int, int, int, torch.dtype], dict] = {}
# The SiLU-fused variant replaces a separate ~2-3 us kernel: it is used when its
# configuration is at most this much slower than cuBLAS without the fusion.
FUSED_CREDIT_US = 2.0
# Residual add + RMSNorm in the epilogues of the products around it (`linear_add_norm`);
# BATON_FUSE_NORMS=0 runs the norm kernel instead (benchmarks flip it and recapture).
FUSE_NORMS = os.environ.get("BATON_FUSE_NORMS", "1") != "0"
# The rotary + KV store in the Q/K/V product's epilogue (`qkv_rope`), for steps whose
# attention does not do them itself (decode steps of more than triton_backend.ROPE_MAX_PAIRS
# pairs, other steps of a row count the tuning timed); BATON_ROPE_EPILOGUE=0 runs rope_store
# instead. On an H100 the batch-32 / 64 decode graphs took 7.064 / 8.643 ms with it against
# 7.134 / 8.685 (bench/results/decode-profile-switches-h100.json). With it on at engine start
# the Q/K/V shape is tuned in both forms, and benchmarks may flip it off and recapture.
ROPE_EPILOGUE = os.environ.get("BATON_ROPE_EPILOGUE", "1") != "0"
REPORT: dict[str, dict] = {}  # "NxK/M_PAD" -> {"best": ..., "us": {candidate: microseconds}}, for benchmarks


@triton.jit
def _prefetch_l2(ptr, nbytes):
    """One thread of the program asks the copy engine to bring `nbytes` (a multiple of 16)
    from `ptr` into the L2 cache (`cp.async.bulk.prefetch.L2`, Hopper); nothing waits for it."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_rows_l2(ptr, nbytes, rows, stride_bytes):
    """Threads 0..rows-1 each ask for the first `nbytes` (a multiple of 16) of one row,
    `stride_bytes` apart from `ptr`, in L2 (as `_prefetch_l2`)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; .reg .b64 a; mov.u32 t, %tid.x; setp.lt.u32 p, t, $3; "
        "mul.wide.u32 a, t, $4; add.s64 a, a, $1; @p cp.async.bulk.prefetch.L2.global [a], $2; mov.u32 $0, 0; }",
        "=r,l,r,r,r", [ptr, nbytes, rows, stride_bytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, prefetch_bytes,
                   sums_in_ptr, inv_dim, eps, res_ptr, stride_rm, norm_w_ptr, sums_out_ptr,
                   pos_ptr, cs_ptr, stride_cs, slot_ptr, k_ptr, v_ptr, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, num_heads, num_kv_heads,
                   HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, SILU: tl.constexpr, ROW_SCALE: tl.constexpr,
                   ADD_NORM: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   SWAP: tl.constexpr, USE_PDL: tl.constexpr):
    """out = x @ W.T (+ bias), each program `BLOCK_N` output columns over the whole K.

    SILU: W is the fused [gate; up] (N = 2 I); a program takes BLOCK_N / 2 gate rows and the
    matching up rows and writes SiLU(gate) * up [M, I]: the activation costs no kernel of
    its own. (Work on x inside the loop does not pay: a residual add there costs 1.5-6 us
    per product, an RMSNorm's sum of squares 12-80 us, docs/architecture.md.)

    ADD_NORM (the epilogue of the product before an RMSNorm, see `NormPending`): h = out +
    residual is written into the residual, the program's sums of h^2 over its columns added
    atomically to `sums_out` [MAX_ROWS] (float64, zeroed beforehand), and out = h * norm
    weight. ROW_SCALE (the product after it): x is such rows; the accumulator's row m is
    scaled by rsqrt(sums_in[m] * inv_dim + eps) before the bias.

    ROPE: W is the fused Q/K/V projection (heads of HEAD_DIM rows: `num_heads` query heads,
    then `num_kv_heads` key heads, then as many value heads); a program takes BLOCK_N / 2
    rows of one head's first half and the matching rows of its second half, rotates query
    and key rows at each row's position (`pos`, rotate-half with the float32 table `cs`:
    cos, then sin), writes queries to out [M, num_heads * HEAD_DIM] and stores keys and
    values in the paged cache at `slot` (none for a negative slot): rope_store's work, with
    its rounding, in the product's epilogue.
    """
    pid = tl.program_id(0)
    PAIRED: tl.constexpr = SILU or ROPE  # two streams of weight rows, `pair` rows apart
    COLS: tl.constexpr = BLOCK_N // 2 if PAIRED else BLOCK_N
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        PER_HALF: tl.constexpr = HALF // COLS
        head = pid // PER_HALF
        dim0 = (pid % PER_HALF) * COLS  # the program's first dimension in the head's first half
        n0 = head * HEAD_DIM + dim0
        N_OUT = N
        pair = HALF
    else:
        N_OUT = N // 2 if SILU else N
        n0 = pid * COLS
        pair = N_OUT
    row_bytes = stride_wn * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    if PREFETCH == 1:
        # The weights do not depend on the previous kernel: start streaming this program's
        # first rows into L2 before waiting for it (with PDL this runs while it finishes).
        nbytes = tl.minimum(tl.minimum(N_OUT - n0, COLS) * row_bytes, prefetch_bytes)
        if PAIRED:
            nbytes = nbytes // 2
            _prefetch_l2(w_ptr + (n0 + pair).to(tl.int64) * stride_wn, (nbytes // 16 * 16).to(tl.int32))
        _prefetch_l2(w_ptr + n0.to(tl.int64) * stride_wn, (nbytes // 16 * 16).to(tl.int32))
    if PREFETCH == 2:  # the same bytes spread over the starts of all the program's rows
        per_row = (tl.minimum(prefetch_bytes // BLOCK_N, row_bytes) // 16 * 16).to(tl.int32)
        rows = tl.where(per_row > 0, tl.minimum(N_OUT - n0, COLS), 0)
        if PAIRED:
            _prefetch_rows_l2(w_ptr + (n0 + pair).to(tl.int64) * stride_wn, per_row, rows, row_bytes)
        _prefetch_rows_l2(w_ptr + n0.to(tl.int64) * stride_wn, per_row, rows, row_bytes)
    enter(USE_PDL)
    n = n0 + tl.arange(0, COLS)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N_OUT
    m_mask = m < M
    x_ptrs = x_ptr + m[:, None] * stride_xm + k[None, :]
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    # The epilogue's operands are loaded before the loop: their latency hides behind it.
    if ROW_SCALE:
        ss = tl.load(sums_in_ptr + m, mask=m_mask, other=0.0).to(tl.float32)
    if ADD_NORM:
        mn_mask = m_mask[:, None] & n_mask[None, :]
        res_ptrs = res_ptr + m[:, None] * stride_rm + n[None, :]
        res = tl.load(res_ptrs, mask=mn_mask, other=0.0)
        norm_w = tl.load(norm_w_ptr + n, mask=n_mask, other=0.0)
    if ROPE:  # (the cos/sin rows are loaded after the loop: a load that waits on these would stall it)
        pos = tl.load(pos_ptr + m, mask=m_mask, other=0)
        slot = tl.load(slot_ptr + m, mask=m_mask, other=-1).to(tl.int64)
    # SWAP: the transposed product, acc.T = W x.T, whose M side is BLOCK_N (>= 64 lets
    # Hopper's warpgroup MMA read both operands from shared memory).
    ACC_SHAPE: tl.constexpr = [COLS, M_PAD] if SWAP else [M_PAD, COLS]
    acc = tl.zeros(ACC_SHAPE, tl.float32)
    if PAIRED:
        up_ptrs = w_ptrs + stride_wn.to(tl.int64) * pair
        acc_up = tl.zeros(ACC_SHAPE, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = m_mask[:, None]
            w_mask = n_mask[:, None]
        else:
            k_mask = (k0 + k) < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            w_mask = n_mask[:, None] & k_mask[None, :]
        xk = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if SWAP:
            acc = tl.dot(tl.load(w_ptrs, mask=w_mask, other=0.0), tl.trans(xk), acc)
            if PAIRED:
                acc_up = tl.dot(tl.load(up_ptrs, mask=w_mask, other=0.0), tl.trans(xk), acc_up)
        else:
            acc += tl.dot(xk, tl.trans(tl.load(w_ptrs, mask=w_mask, other=0.0)))
            if PAIRED:
                acc_up += tl.dot(xk, tl.trans(tl.load(up_ptrs, mask=w_mask, other=0.0)))
        if PAIRED:
            up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
        if PAIRED:
            acc_up = tl.trans(acc_up)
    if ROW_SCALE:  # the pending RMSNorm's 1/rms
        scale = 1.0 / tl.sqrt(ss * inv_dim + eps)
        acc = acc * scale[:, None]
        if PAIRED:
            acc_up = acc_up * scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if PAIRED:
            acc_up += tl.load(b_ptr + pair + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:  # as F.silu(gate) * up on the rounded products
        g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = act * acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    if ADD_NORM:  # as the torch code: h = residual + out rounded, its squares in float32
        h = (acc.to(out_ptr.dtype.element_ty).to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(res_ptrs, h, mask=mn_mask)
        hf = h.to(tl.float32)
        tl.atomic_add(sums_out_ptr + m, tl.sum(hf * hf, axis=1).to(tl.float64), mask=m_mask, sem="relaxed")
        acc = hf * norm_w.to(tl.float32)[None, :]
    if ROPE:  # as rope_store on the rounded product: x * cos + rotate_half(x) * sin
        d = dim0 + tl.arange(0, COLS)
        cs_ptrs = cs_ptr + pos[:, None].to(tl.int64) * stride_cs + d[None, :]
        cos = tl.load(cs_ptrs, mask=m_mask[:, None], other=0.0)
        sin = tl.load(cs_ptrs + HALF, mask=m_mask[:, None], other=0.0)
        x1 = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        x2 = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
        if head < num_heads + num_kv_heads:  # queries and keys rotate, values do not
            lo = x1 * cos - x2 * sin
            hi = x2 * cos + x1 * sin
        else:
            lo = x1
            hi = x2
        if head < num_heads:
            q_ptrs = out_ptr + m[:, None] * stride_om + (head * HEAD_DIM + d)[None, :]
            tl.store(q_ptrs, lo.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
            tl.store(q_ptrs + HALF, hi.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
        else:
            page = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            if head < num_heads + num_kv_heads:
                c_ptrs = (k_ptr + page[:, None] * stride_kb + off[:, None] * stride_kt
                          + (head - num_heads) * stride_kh + d[None, :])
            else:
                c_ptrs = (v_ptr + page[:, None] * stride_vb + off[:, None] * stride_vt
                          + (head - num_heads - num_kv_heads) * stride_vh + d[None, :])
            keep = (m_mask & (slot >= 0))[:, None]
            tl.store(c_ptrs, lo.to(k_ptr.dtype.element_ty), mask=keep)
            tl.store(c_ptrs + HALF, hi.to(k_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def fits(config: tuple, rows_pad: int, element_bytes: int = 2, shared_bytes: int = 227 * 1024) -> bool:
    """Whether a configuration's pipelined tiles fit in shared memory (227 KiB on an H100)."""
    block_n, block_k, _, stages, *_ = config
    return stages * (block_n + rows_pad) * block_k * element_bytes <= shared_bytes


def m_pad(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


@dataclass(frozen=True)
class NormPending:
    """The output of an RMSNorm whose 1/rms is not applied yet: `rows` = h * norm weight, and
    `sums` [MAX_ROWS] the sums of h^2 of each row, added up by the programs of the product
    before the norm (`linear_add_norm`) in its epilogue. The product after it scales its rows
    by rsqrt(mean(h^2) + eps) in its own epilogue (`ROW_SCALE`), so the norm costs no kernel.

    Rounding: h * weight is rounded once before the product, where the torch code rounds
    h / rms and then its product with the weight (a few bf16 units in the last place). The
    programs add their float32 sums in float64 in whatever order they finish, and the total
    is rounded to float32 before use: a different order changes it only when the float64
    sum lies within a few of its units in the last place of a float32 rounding boundary."""

    rows: torch.Tensor
    sums: torch.Tensor
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    @property
    def is_cuda(self) -> bool:
        return self.rows.is_cuda

    def normalized(self) -> torch.Tensor:
        """The norm's output, for a product that cannot take the pending form."""
        ss = self.sums[: self.rows.shape[0]].float()
        scale = torch.rsqrt(ss / self.rows.shape[1] + self.eps)
        return (self.rows.float() * scale[:, None]).to(self.rows.dtype)


@dataclass(frozen=True)
class RopeStore:
    """What the Q/K/V product needs to rotate queries and keys and store keys and values in
    its epilogue (see `_skinny_kernel`'s ROPE): rope_store's arguments."""

    positions: torch.Tensor  # [M] int64
    cos_sin: torch.Tensor  # [max_position, head_dim] float32: cos, then sin
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] strided views
    v_cache: torch.Tensor
    slots: torch.Tensor  # [M] int64, negative: store nothing (a padding row)
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def fits(self, config: tuple) -> bool:
        """Whether a configuration's tiles pair up inside a head: BLOCK_N / 2 rows (16 or
        more, for the tensor cores) dividing half a head."""
        cols = config[0] // 2
        return cols >= 16 and (self.head_dim // 2) % cols == 0


def skinny_mm(x: torch.Tensor | NormPending, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple, *,
              silu: bool = False, add_norm: tuple | None = None, rope: RopeStore | None = None):
    """x [M, K] (M <= MAX_ROWS, contiguous rows) @ weight[N, K].T (+ bias) with one configuration.

    silu: weight is the fused [gate; up] and the result SiLU(gate) * up [M, N / 2].
    x a `NormPending`: the product of its normalised rows.
    add_norm (residual, norm weight, eps, sums): RMSNorm(result + residual) as a
    `NormPending`, the sum written into the residual; sums: a zeroed float64 [MAX_ROWS]
    (`norm_sums`) the programs add their sums of squares into.
    rope: weight is the fused Q/K/V projection; keys and values go into the cache and the
    result is the rotated queries [M, num_heads, head_dim] (`config` must fit `rope`).
    """
    pending = x if isinstance(x, NormPending) else None
    if pending is not None:
        x = pending.rows
    rows, k = x.shape
    n = weight.shape[0]
    block_n, block_k, warps, stages, *swap = config
    if rope is not None:
        assert not silu and add_norm is None and rope.fits(config)
        assert n == (rope.num_heads + 2 * rope.num_kv_heads) * rope.head_dim
        out = torch.empty((rows, rope.num_heads * rope.head_dim), dtype=x.dtype, device=x.device)
        grid = n // block_n
        r = rope
        rope_args = (r.positions, r.cos_sin, r.cos_sin.stride(0), r.slots, r.k_cache, r.v_cache,
                     *r.k_cache.stride()[:3], *r.v_cache.stride()[:3], r.num_heads, r.num_kv_heads)
    else:
        out = torch.empty((rows, n // 2 if silu else n), dtype=x.dtype, device=x.device)
        grid = triton.cdiv(out.shape[1], block_n // 2 if silu else block_n)
        rope_args = (out, out, 0, out, out, out, 0, 0, 0, 0, 0, 0, 0, 0)
    launch = launch_kwargs()
    aligned = weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0  # bulk copies
    per_program = PREFETCH_BYTES // grid // 16 * 16 if launch["USE_PDL"] and aligned else 0
    if add_norm is not None:
        assert not silu, "the SiLU product is never followed by a norm"
        residual, norm_weight, eps, sums_out = add_norm
    else:
        residual, norm_weight, eps, sums_out = out, weight, 0.0, out
    sums_in = pending.sums if pending is not None else out
    _skinny_kernel[(grid,)](
        x, weight, bias if bias is not None else weight, out, rows, n, k, x.stride(0), weight.stride(0),
        out.stride(0), per_program, sums_in, 1.0 / k, pending.eps if pending is not None else eps, residual,
        residual.stride(0), norm_weight, sums_out, *rope_args,
        HAS_BIAS=bias is not None, M_PAD=m_pad(rows), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PREFETCH=PREFETCH_MODE if per_program > 0 else 0, SILU=silu, ROW_SCALE=pending is not None,
        ADD_NORM=add_norm is not None, ROPE=rope is not None, HEAD_DIM=rope.head_dim if rope else 0,
        BLOCK_SIZE=rope.k_cache.shape[1] if rope else 0, SWAP=bool(swap), num_warps=warps, num_stages=stages,
        **launch,
    )
    if rope is not None:
        return out.view(rows, rope.num_heads, rope.head_dim)
    return out if add_norm is None else NormPending(out, sums_out, eps)


def _silu_fits(config: tuple) -> bool:
    return config[0] >= 32  # BLOCK_N / 2 >= 16 gate rows, for the tensor cores


def _key(n: int, k: int, bucket: int, dtype: torch.dtype, form: str = "") -> tuple:
    """`_times`' key: the rotary-epilogue form of Q/K/V has its own, the others the shape's."""
    return (n, k, bucket, dtype, "rope") if form == "rope_row_scale" else (n, k, bucket, dtype)


def _config(layer: nn.Linear, x: torch.Tensor | NormPending, credit_us: float = 0.0,
            fits_form: Callable[[tuple], bool] | None = None, form: str = "") -> tuple | None:
    """The fastest configuration measured for this product (in `form`, the layer's own by
    default; of those `fits_form` accepts), or None where cuBLAS is faster by more than
    `credit_us` (what a fused variant saves: the kernel it replaces)."""
    if isinstance(x, NormPending):
        x = x.rows
    rows = x.shape[0]
    w = layer.weight
    if rows == 0 or rows > MAX_ROWS or x.stride(-1) != 1:
        return None
    times = _times.get(_key(w.shape[0], w.shape[1], m_pad(rows), w.dtype, form))
    if times is None:
        return None
    ours = [c for c in times if c != "cublas" and (fits_form is None or fits_form(c)) and (USE_SWAP or len(c) == 4)]
    if not ours:
        return None
    best = min(ours, key=times.get)
    return best if times[best] <= times["cublas"] + credit_us else None


def linear(layer: nn.Linear, x: torch.Tensor | NormPending) -> torch.Tensor:
    """`layer(x)`, through the measured-fastest kernel for this shape and row count."""
    pending = isinstance(x, NormPending)  # then the norm goes in this product's epilogue
    config = _config(layer, x, FUSED_CREDIT_US if pending else 0.0)
    if config is None:
        return layer(x.normalized() if pending else x)
    return skinny_mm(x, layer.weight, layer.bias, config)


def silu_linear(layer: nn.Linear, x: torch.Tensor | NormPending) -> torch.Tensor | None:
    """SiLU(gate) * up of the fused gate/up projection `layer(x)` in one kernel, or None where
    this shape has no fast configuration (the caller runs the product and the activation)."""
    config = _config(layer, x, FUSED_CREDIT_US, _silu_fits)
    return None if config is None else skinny_mm(x, layer.weight, layer.bias, config, silu=True)


def qkv_rope(layer: nn.Linear, x: torch.Tensor | NormPending, rope: RopeStore) -> torch.Tensor | None:
    """The fused Q/K/V projection `layer(x)` with rope_store's work in its epilogue: keys and
    values stored in the cache, the rotated queries [M, heads, head_dim] returned; None
    where this shape has no fast configuration that fits (the caller runs the product and
    rope_store). Callers use it with `ROPE_EPILOGUE` on (the tuning times the form then)."""
    config = _config(layer, x, FUSED_CREDIT_US, rope.fits, "rope_row_scale")
    return None if config is None else skinny_mm(x, layer.weight, layer.bias, config, rope=rope)


def norm_sums(count: int, device: torch.device) -> torch.Tensor | None:
    """Zeroed sums of squares for `count` fused norms of one forward pass ([count, MAX_ROWS]
    float64, one memset), or None where norms are not fused."""
    return torch.zeros((count, MAX_ROWS), dtype=torch.float64, device=device) if FUSE_NORMS else None


def linear_add_norm(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float, consumer: nn.Linear, consumer_silu: bool,
                    sums: torch.Tensor | None) -> NormPending | None:
    """RMSNorm(layer(x) + residual) as a `NormPending` for the product `consumer` after it (its
    fused SiLU form with `consumer_silu`), the sum written into `residual`; None where either
    product has no fast configuration (the caller runs the product and the norm kernel).
    sums: a zeroed row of `norm_sums`."""
    if not FUSE_NORMS or sums is None:
        return None
    config = _config(layer, x, FUSED_CREDIT_US)
    if config is None or layer.bias is not None or residual.stride(-1) != 1:
        return None
    if _config(consumer, x, FUSED_CREDIT_US, _silu_fits if consumer_silu else None) is None:
        return None
    return skinny_mm(x, layer.weight, None, config, add_norm=(residual, norm_weight, eps, sums))


def graph_time(fn, repeats: int = 5) -> float:
    """Seconds per call of `fn` (which launches work on the current stream), from graph replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _form_runner(form: str, x: torch.Tensor, layer: nn.Linear) -> tuple[Callable, Callable | None]:
    """(fn(layer, config) running one product in `form` the way decode steps run it, which
    configurations fit the form or None for all): "plain"; "row_scale" (x a pending norm);
    "silu_row_scale" (the fused gate/up product of a pending norm); "rope_row_scale" (the
    fused Q/K/V product of a pending norm with the rotary and KV store, `layer.skinny_rope`
    = (heads, KV heads, head dim)); "add_norm" (a residual add + norm in the epilogue)."""
    rows, k = x.shape
    n = layer.weight.shape[0]
    pending = NormPending(x, torch.full((MAX_ROWS,), float(k), dtype=torch.float64, device=x.device), 1e-5)
    if form == "plain":
        return (lambda layer, c: skinny_mm(x, layer.weight, layer.bias, c)), None
    if form == "row_scale":
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c)), None
    if form == "silu_row_scale":
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c, silu=True)), _silu_fits
    if form == "rope_row_scale":
        heads, kv_heads, head_dim = layer.skinny_rope
        cache = torch.zeros((triton.cdiv(rows, 16), 16, kv_heads, head_dim), dtype=x.dtype, device=x.device)
        slots = torch.arange(rows, device=x.device)
        rope = RopeStore(slots, torch.randn((rows, head_dim), device=x.device), cache, cache.clone(), slots,
                         heads, kv_heads, head_dim)
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c, rope=rope)), rope.fits
    if form == "add_norm":
        residual = torch.zeros((rows, n), dtype=x.dtype, device=x.device)
        norm = (residual, torch.ones(n, dtype=x.dtype, device=x.device), 1e-5,
                torch.zeros(MAX_ROWS, dtype=torch.float64, device=x.device))
        return (lambda layer, c: skinny_mm(x, layer.weight, None, c, add_norm=norm)), None
    raise ValueError(f"unknown few-row product form {form!r}")


@torch.inference_mode()
def tune(model: nn.Module, max_rows: int = MAX_ROWS) -> dict:
    """Time cuBLAS and every configuration for each linear shape of `model`; keep the fastest.

    A configuration is timed in the form decode steps run the product in (the module's
    `skinny_form`, "plain" without one; see `_form_runner`): a fused epilogue changes which
    tiles are fastest. (On an H100 a gate/up configuration with 32-column tiles tied the
    best timed plain, 82.7 us at 16 rows, but took 90.8 in its SiLU form against 83.2; a
    batch-8 graph that used it took 6.45 ms instead of ~6.12.) cuBLAS runs the plain product.

    Returns {(N, K, M_PAD) (+ ("rope",)): (best name, {name: microseconds per product})} for the log.
    """
    by_shape: dict[tuple, list[nn.Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_cuda and module.weight.dtype != torch.float32:
            by_shape[(*module.weight.shape, module.weight.dtype)].append(module)
    report = {}
    for (n, k, dtype), layers in by_shape.items():
        layers = layers[:8]  # a product per layer in the graph: weights too big for L2 together
        form = getattr(layers[0], "skinny_form", "plain")
        if form == "add_norm" and layers[0].bias is not None:
            form = "plain"
        forms = [form]
        if ROPE_EPILOGUE and form == "row_scale" and hasattr(layers[0], "skinny_rope"):
            forms.append("rope_row_scale")  # timed apart: `qkv_rope` looks it up by its own key
        for form, bucket in ((f, b) for f in forms for b in BUCKETS if b <= max(16, max_rows)):
            key = _key(n, k, bucket, dtype, form)
            if key in _times:
                continue
            x = torch.randn((bucket, k), dtype=dtype, device=layers[0].weight.device)

            def run(fn, x=x, layers=layers):
                def launch():
                    for layer in layers:
                        fn(layer, x)
                return graph_time(launch) / len(layers)

            times = {"cublas": run(lambda layer, x: F.linear(x, layer.weight, layer.bias))}
            want = F.linear(x, layers[0].weight, layers[0].bias).float()
            in_form, fits_form = _form_runner(form, x, layers[0])
            for config in (c for c in CONFIGS if fits(c, bucket, x.element_size()) and (fits_form or bool)(c)):
                try:
                    got = skinny_mm(x, layers[0].weight, layers[0].bias, config).float()
                    if not (got - want).norm() <= 1e-2 * want.norm():
                        raise ValueError(f"wrong result ({(got - want).norm() / want.norm():.2e} relative)")
                    times[config] = run(lambda layer, x, c=config, f=in_form: f(layer, c))
                except Exception as exc:  # a configuration this GPU cannot compile or run right
                    log.warning("few-row product config %s skipped for %s: %s", config, (n, k), exc)
            best = min(times, key=times.get)
            _times[key] = {c: t * 1e6 for c, t in times.items()}
            rope = form == "rope_row_scale"
            report[(n, k, bucket, *(("rope",) if rope else ()))] = row = (
                best, {str(c): round(t * 1e6, 1) for c, t in times.items()})
            REPORT[f"{n}x{k}/{bucket}" + (" rope" if rope else "")] = {"best": str(best), "form": form, "us": row[1]}
    log.info("few-row matrix products: %s", {key: value[0] for key, value in report.items()})
    return report
