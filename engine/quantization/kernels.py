"""Triton products for quantized linear layers: FP8 W8A8 and int4 W4A16.

Each computes what the layer's `reference` computes (linear.py), up to float32 summation
order, and is set on a layer as its `kernel` (`use_kernels`); the CPU path never imports
this module. Both kernels tile [M, N] outputs over a K loop, so one kernel serves prefill
(many rows) and decode steps (few rows: BLOCK_M 16, the smallest tensor-core tile, and
narrower N tiles so that enough programs cover the weight, which is what bounds the step).

- `fp8_linear`: x is rounded to e4m3 first (`quantize_fp8`: per token, per tensor, per
  128-column group, or with the static input scale), then an e4m3 x e4m3 tensor-core product
  accumulates in float32 and the epilogue applies row scale x column scale (+ bias). With
  block weight scales (and per-group activation scales) the scales apply per K block.
- `int4_linear`: int4 codes packed along K are unpacked in registers, `(code - zero) * scale`
  in the activation dtype, and multiplied on the tensor cores; activation-order layers read
  x's columns through `perm`.

Products of more than `MANY_ROWS` rows (prefill) are compute-bound, where these simple tiles
lose to the vendor's GEMMs (bench/results/quant-products-h100.json): FP8 with per-row or
per-tensor scales then goes to cuBLASLt's scaled FP8 product (`torch._scaled_mm`, row-wise
scales, bf16 out), and int4 dequantizes its weight once per call (`dequantize_int4`) and
multiplies in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.engine.quantization.fp8 import FP8, FP8_MAX, MIN_SCALE
from baton.engine.quantization.linear import Fp8Linear, Int4Linear, QuantLinear

MANY_ROWS = 64


def _tiles(m: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): few-row steps take 16-row tiles and narrower N tiles."""
    if m <= 16:
        return 16, 32 if n <= 8192 else 64
    if m <= 64:
        return 64, 64
    return 128, 128


@triton.jit
def _tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of the output tile this program computes (grid: M tiles, N tiles)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn


@triton.jit
def _store_tile(acc, bias_ptr, c_ptr, rm, rn, stride_cm, M, N, HAS_BIAS: tl.constexpr):
    """Epilogue of both products: + bias, rounded to c's dtype, stored inside [M, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# -- FP8 ------------------------------------------------------------------------------------


@triton.jit
def dynamic_scale(x, FP8_LIMIT: tl.constexpr, MIN_S: tl.constexpr):
    """The e4m3 scale of float32 values `x` (masked-out ones zero): absmax / 448, at least MIN_S."""
    return tl.maximum(tl.max(tl.abs(x), 0) / FP8_LIMIT, MIN_S)


@triton.jit
def store_e4m3(q_ptrs, x, scale, mask, FP8_LIMIT: tl.constexpr):
    """x / scale saturated at +-448, stored as e4m3 (as `fp8.to_fp8`)."""
    q = tl.clamp(x / scale, -FP8_LIMIT, FP8_LIMIT)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                          FP8_LIMIT: tl.constexpr, MIN_S: tl.constexpr):
    """One row (program 0) and one group of GROUP columns (program 1) of x -> e4m3, with
    the scale absmax / 448 over the group (GROUP = K: per token)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, BLOCK)
    mask = (cols < K) & (tl.arange(0, BLOCK) < GROUP)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = dynamic_scale(x, FP8_LIMIT, MIN_S)
    tl.store(s_ptr + row * tl.num_programs(1) + g, scale)
    store_e4m3(q_ptr + row * stride_q + cols, x, scale, mask, FP8_LIMIT)


def quantize_fp8(x: torch.Tensor, strategy: str, input_scale: torch.Tensor | None = None,
                 group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales): [M, 1] per "token", [M, K / group_size] per
    "group", [1, 1] for "static" (`input_scale`) and "tensor" (absmax over all of x). The
    scales stay on the device: no host read, so the step can be captured in a CUDA graph."""
    m, k = x.shape
    if strategy in ("static", "tensor"):
        if strategy == "tensor":
            input_scale = (x.float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE)
        scale = input_scale.reshape(1, 1).float()
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    group = group_size if strategy == "group" else k
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m, k // group)](
            x, q, scale, k, x.stride(0), q.stride(0),
            GROUP=group, BLOCK=triton.next_power_of_2(group), FP8_LIMIT=FP8_MAX, MIN_S=MIN_SCALE,
        )
    return q, scale


@triton.jit
def _fp8_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                       stride_am, stride_bn, stride_cm, stride_as, stride_bs,
                       A_PER_ROW: tl.constexpr, BLOCK_SCALED: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """c[M, N] = (a[M, K] e4m3 . b[N, K] e4m3) * scales (+ bias).

    Plain: a's scale per row ([M, 1], stride_as) or one ([1, 1]), b's per column ([N]).
    BLOCK_SCALED: a's per row and K block of BLOCK_K ([M, K / BLOCK_K]), b's per
    (SCALE_BLOCK_N rows, BLOCK_K columns) block ([N / SCALE_BLOCK_N, K / BLOCK_K]).
    """
    rm, rn = _tile(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + (k0 + rk)[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_bn + (k0 + rk)[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        part = tl.dot(a, b, out_dtype=tl.float32)
        if BLOCK_SCALED:
            kb = k0 // BLOCK_K
            sa = tl.load(as_ptr + rm * stride_as + kb, mask=m_mask, other=0.0)
            sb = tl.load(bs_ptr + (rn // SCALE_BLOCK_N) * stride_bs + kb, mask=n_mask, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        else:
            acc += part
    if not BLOCK_SCALED:
        if A_PER_ROW:
            sa = tl.load(as_ptr + rm * stride_as, mask=m_mask, other=0.0)
        else:
            sa = tl.load(as_ptr + rm * 0)
        sb = tl.load(bs_ptr + rn, mask=n_mask, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    _store_tile(acc, bias_ptr, c_ptr, rm, rn, stride_cm, M, N, HAS_BIAS)


def fp8_linear(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's product for x [..., K] (a `QuantLinear.kernel`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer.block is not None:  # per-group activation scales over the weight's K blocks
        q, xs = quantize_fp8(x2, "group", group_size=layer.block[1])
    else:
        q, xs = quantize_fp8(x2, layer.act.strategy, layer.input_scale, layer.act.group_size)
    return fp8_matmul(layer, q, xs, x.dtype).reshape(*shape[:-1], layer.out_features)


def fp8_matmul(layer: Fp8Linear, q: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 activations q [M, K] with their scales (from `quantize_fp8`) times the layer's
    weight -> [M, N] in `dtype`."""
    m, k = q.shape
    n = layer.out_features
    block = layer.block
    if (m > MANY_ROWS and block is None and xs.shape[1] == 1 and q.is_cuda and dtype == torch.bfloat16
            and k % 16 == 0 and n % 16 == 0):
        out = torch._scaled_mm(q, layer.weight.t(), scale_a=xs.float().expand(m, 1).contiguous(),
                               scale_b=layer.weight_scale.float().reshape(1, n), out_dtype=dtype)
        return out if layer.bias is None else out.add_(layer.bias.to(dtype))
    out = torch.empty((m, n), dtype=dtype, device=q.device)
    if m == 0:
        return out
    block_k = block[1] if block is not None else 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    bm, bn = _tiles(m, n)
    ws = layer.weight_scale
    bias = layer.bias if layer.bias is not None else out
    _fp8_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        q, xs, layer.weight, ws, bias, out, m, n, k,
        q.stride(0), layer.weight.stride(0), out.stride(0), xs.stride(0), ws.stride(0),
        A_PER_ROW=xs.shape[0] == m,
        BLOCK_SCALED=block is not None, SCALE_BLOCK_N=block[0] if block else 1,
        HAS_BIAS=layer.bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, num_warps=4,
    )
    return out


# -- int4 -----------------------------------------------------------------------------------


@triton.jit
def _int4_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, K,
                        stride_xm, stride_qk, stride_sg, stride_cm, GROUP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """c[M, N] = x[M, K] . dequant(qw)[K, N] (+ bias); qw [K / 8, N] int32 codes packed along K,
    s, z [K / GROUP, N] float32. BLOCK_K divides GROUP, so a K tile has one group."""
    rm, rn = _tile(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    shifts = ((rk % 8) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None],
                    other=0.0)
        words = tl.load(qw_ptr + ((k0 + rk) // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :],
                        mask=n_mask[None, :], other=0)
        codes = ((words >> shifts) & 0xF).to(tl.float32)
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)
        zero = tl.load(z_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)
        w = ((codes - zero[None, :]) * scale[None, :]).to(x.dtype)
        acc += tl.dot(x, w, out_dtype=tl.float32)
    _store_tile(acc, bias_ptr, c_ptr, rm, rn, stride_cm, M, N, HAS_BIAS)


@triton.jit
def _int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, stride_qk, stride_sg, stride_wk, GROUP: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[K, N] = (code - zero) * scale for one [BLOCK_K, BLOCK_N] tile (BLOCK_K divides GROUP)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    words = tl.load(qw_ptr + (rk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :], mask=n_mask[None, :], other=0)
    codes = ((words >> ((rk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
    g = (tl.program_id(0) * BLOCK_K) // GROUP
    scale = tl.load(s_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)
    zero = tl.load(z_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)
    w = (codes - zero[None, :]) * scale[None, :]
    tl.store(w_ptr + rk[:, None].to(tl.int64) * stride_wk + rn[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[None, :])


def dequantize_int4(layer: Int4Linear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as [K, N] in `dtype`, rows in the grouped order (`perm` applied)."""
    k, n = layer.in_features, layer.out_features
    w = torch.empty((k, n), dtype=dtype, device=layer.qweight.device)
    block_k = min(layer.group_size, 32)
    _int4_dequant_kernel[(k // block_k, triton.cdiv(n, 128))](
        layer.qweight, layer.scales, layer.zeros, w, n, layer.qweight.stride(0), layer.scales.stride(0), w.stride(0),
        GROUP=layer.group_size, BLOCK_K=block_k, BLOCK_N=128, num_warps=4,
    )
    return w


def int4_linear(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's product for x [..., K] (a `QuantLinear.kernel`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer.perm is not None:
        x2 = x2[:, layer.perm]
    x2 = x2.contiguous()
    m, k = x2.shape
    n = layer.out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    block_k = min(layer.group_size, 64)
    if k % block_k or layer.group_size % block_k:
        raise ValueError(f"int4 kernel: K ({k}) and group size ({layer.group_size}) must be multiples of {block_k}")
    if m > MANY_ROWS:
        torch.mm(x2, dequantize_int4(layer, x.dtype), out=out)
        if layer.bias is not None:
            out.add_(layer.bias.to(out.dtype))
        return out.reshape(*shape[:-1], n)
    bm, bn = _tiles(m, n)
    bias = layer.bias if layer.bias is not None else out
    _int4_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2, layer.qweight, layer.scales, layer.zeros, bias, out, m, n, k,
        x2.stride(0), layer.qweight.stride(0), layer.scales.stride(0), out.stride(0),
        GROUP=layer.group_size, HAS_BIAS=layer.bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
        num_warps=4,
    )
    return out.reshape(*shape[:-1], n)


def use_kernels(model: torch.nn.Module) -> int:
    """Set the Triton product as the kernel of every quantized layer; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernel = fp8_linear if isinstance(module, Fp8Linear) else int4_linear
            count += 1
    return count
