"""The few-row matrix product kernel (decode steps): x [M <= 64, K] @ W[N, K].T on the tensor cores.

A decode step multiplies a handful of rows by every weight matrix: the time is the weight
bytes over memory bandwidth, and cuBLAS reaches only part of it at these shapes.
`_skinny_kernel` streams a `BLOCK_N`-row slice of the weight per program through a
pipelined K loop, with the few input rows padded to `M_PAD` (16, 32 or 64) for the tensor
cores. Its epilogue can carry the work of the kernels around the product (SiLU * up, a
residual add + RMSNorm, the rotary and KV store: `skinny_mm`'s forms). No configuration
wins everywhere: `few_row_tuning.py` times them per shape, `engine/fastpath/projection.py`
uses the winner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.engine.fastpath.pdl import enter, launch_kwargs

MAX_ROWS = 64
BUCKETS = (16, 32, 64)
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (16, 128, 4, 8), (32, 256, 4, 4), (32, 128, 4, 6),
           (32, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]
# A fifth entry 1: the transposed product (`SWAP`), which wins some shapes at 16-64 rows on
# an H100 (Q/K/V, gate/up, lm_head); `KernelConfig.use_swap` False leaves these out of the choice.
CONFIGS += [(64, 128, 4, 4, 1), (64, 128, 4, 6, 1), (64, 256, 4, 3, 1), (128, 128, 4, 3, 1), (128, 128, 8, 3, 1),
            (128, 64, 4, 6, 1), (128, 256, 8, 2, 1)]


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
    its own. (Work on x inside the loop does not pay: a residual add or an RMSNorm's sum of
    squares there slows the loop by more than the kernel it would save.)

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
    before the norm (`FewRowLinear.add_norm`) in its epilogue. The product after it scales its rows
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
        return rope_fits(config, self.head_dim)


def rope_fits(config: tuple, head_dim: int) -> bool:
    """Whether a configuration's tiles pair up inside a head of `head_dim` (the ROPE form):
    BLOCK_N / 2 rows (16 or more, for the tensor cores) dividing half a head."""
    cols = config[0] // 2
    return cols >= 16 and (head_dim // 2) % cols == 0


def skinny_mm(x: torch.Tensor | NormPending, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple, *,
              silu: bool = False, add_norm: tuple | None = None, rope: RopeStore | None = None,
              pdl: bool = False, prefetch_bytes: int = 0, prefetch_mode: int = 2):
    """x [M, K] (M <= MAX_ROWS, contiguous rows) @ weight[N, K].T (+ bias) with one configuration.

    silu: weight is the fused [gate; up] and the result SiLU(gate) * up [M, N / 2].
    x a `NormPending`: the product of its normalised rows.
    add_norm (residual, norm weight, eps, sums): RMSNorm(result + residual) as a
    `NormPending`, the sum written into the residual; sums: a zeroed float64 [MAX_ROWS]
    (`norm_sums`) the programs add their sums of squares into.
    rope: weight is the fused Q/K/V projection; keys and values go into the cache and the
    result is the rotated queries [M, num_heads, head_dim] (`config` must fit `rope`).
    pdl: launch with programmatic dependent launch; then each program first asks for its
    share of `prefetch_bytes` of the weights in L2 (`prefetch_mode` 2: the start of each of
    its rows; 1: its first rows whole), which does not wait for the previous kernel.
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
    launch = launch_kwargs(pdl)
    aligned = weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0  # bulk copies
    per_program = prefetch_bytes // grid // 16 * 16 if launch["USE_PDL"] and aligned else 0
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
        PREFETCH=prefetch_mode if per_program > 0 else 0, SILU=silu, ROW_SCALE=pending is not None,
        ADD_NORM=add_norm is not None, ROPE=rope is not None, HEAD_DIM=rope.head_dim if rope else 0,
        BLOCK_SIZE=rope.k_cache.shape[1] if rope else 0, SWAP=bool(swap), num_warps=warps, num_stages=stages,
        **launch,
    )
    if rope is not None:
        return out.view(rows, rope.num_heads, rope.head_dim)
    return out if add_norm is None else NormPending(out, sums_out, eps)


def silu_fits(config: tuple) -> bool:
    """Whether a configuration can take the SiLU form: BLOCK_N / 2 >= 16 gate rows, for the tensor cores."""
    return config[0] >= 32


def norm_sums(count: int, device: torch.device) -> torch.Tensor:
    """Zeroed sums of squares for `count` fused norms of one forward pass ([count, MAX_ROWS]
    float64, one memset): each row is one `add_norm`'s `sums`."""
    return torch.zeros((count, MAX_ROWS), dtype=torch.float64, device=device)
