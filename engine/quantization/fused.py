"""The e4m3 quantizer of an FP8 product's input, in the kernel before the product.

An FP8 (W8A8) product first rounds its input to e4m3 (`kernels.quantize_fp8`, a kernel of
its own that reads the activations once more and writes them again). In a Llama layer each
FP8 product's input comes out of a kernel that holds whole rows: the input RMSNorm (for
Q/K/V), the post-attention RMSNorm (gate/up) and SiLU * up (down). These kernels also
quantize what they compute (`add_rms_norm_fp8`, `silu_mul_fp8`), per token (the row's
absolute maximum) or with the checkpoint's static input scale, and the product takes the
`Fp8Rows` as they are (`QuantProjection.forward`). Each equals the two kernels it replaces:
the model-dtype output, rounded as the torch code rounds it, then `quantize_fp8`.
Imported by the fast path only (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.engine.fastpath.pdl import enter, launch_kwargs
from baton.engine.fastpath.triton_ops import add_rms_norm_row, silu_mul_cols
from baton.engine.quantization.fp8 import FP8, FP8_MAX, MIN_SCALE
from baton.engine.quantization.kernels import dynamic_scale, store_e4m3


@dataclass(frozen=True)
class Fp8Input:
    """How an FP8 product quantizes its input: "token" (a scale per row, from the row) or
    "static" (`scale`, the checkpoint's input scale: [1] float32 on the device)."""

    strategy: str
    scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Fp8Rows:
    """An FP8 product's input, quantized already: q [T, K] e4m3 and its float32 scales
    ([T, 1] per token, [1, 1] static); `dtype`: the model dtype the product returns."""

    q: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


@triton.jit
def _add_rms_norm_fp8_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, stride_x, stride_r, stride_q, n_cols, eps,
                             HAS_RESIDUAL: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr,
                             FP8_LIMIT: tl.constexpr, MIN_S: tl.constexpr, USE_PDL: tl.constexpr):
    """One row: RMSNorm(x + residual) (the sum into the residual) as `add_rms_norm`, then e4m3."""
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    y = add_rms_norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RESIDUAL,
                         BLOCK).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(s_ptr)
    else:
        scale = dynamic_scale(y, FP8_LIMIT, MIN_S)
        tl.store(s_ptr + row, scale)
    store_e4m3(q_ptr + row * stride_q + cols, y, scale, cols < n_cols, FP8_LIMIT)


@triton.jit
def _silu_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, n_cols, STATIC: tl.constexpr,
                         BLOCK: tl.constexpr, FP8_LIMIT: tl.constexpr, MIN_S: tl.constexpr, USE_PDL: tl.constexpr):
    """One row: SiLU(gate) * up as `silu_mul`, then e4m3. Per token the row is computed twice
    (its absolute maximum first, in BLOCK-column chunks): a chunked row does not stay in
    registers, and the second pass reads [gate | up] back from L2."""
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    if STATIC:
        scale = tl.load(s_ptr)
    else:
        amax = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, n_cols, BLOCK):
            act = silu_mul_cols(x_ptr, row, stride_x, n_cols, c0 + tl.arange(0, BLOCK)).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(act))
        scale = dynamic_scale(amax, FP8_LIMIT, MIN_S)
        tl.store(s_ptr + row, scale)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        act = silu_mul_cols(x_ptr, row, stride_x, n_cols, cols).to(tl.float32)
        store_e4m3(q_ptr + row * stride_q + cols, act, scale, cols < n_cols, FP8_LIMIT)


def _outputs(rows: int, cols: int, quant: Fp8Input, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty((rows, cols), dtype=FP8, device=device)
    if quant.strategy == "static":
        return q, quant.scale.reshape(1, 1)
    if quant.strategy != "token":
        raise ValueError(f"a fused e4m3 quantizer is per token or static, not {quant.strategy!r}")
    return q, torch.empty((rows, 1), dtype=torch.float32, device=device)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     quant: Fp8Input, pdl: bool = False) -> Fp8Rows:
    """`triton_ops.add_rms_norm(x, residual, weight, eps)` (the sum written into the residual)
    quantized by `quant` in the same kernel. x, residual [T, hidden], last dimension contiguous."""
    rows, n_cols = x.shape
    q, scales = _outputs(rows, n_cols, quant, x.device)
    if rows:
        block = triton.next_power_of_2(n_cols)
        res = residual if residual is not None else x
        _add_rms_norm_fp8_kernel[(rows,)](
            x, res, weight, q, scales, x.stride(0), res.stride(0), q.stride(0), n_cols, eps,
            HAS_RESIDUAL=residual is not None, STATIC=quant.strategy == "static", BLOCK=block,
            FP8_LIMIT=FP8_MAX, MIN_S=MIN_SCALE, num_warps=min(16, max(1, block // 512)), **launch_kwargs(pdl),
        )
    return Fp8Rows(q, scales, x.dtype)


def silu_mul_fp8(gate_up: torch.Tensor, quant: Fp8Input, pdl: bool = False, block: int = 2048) -> Fp8Rows:
    """`triton_ops.silu_mul(gate_up)` ([T, 2 I] -> [T, I]) quantized by `quant` in the same
    kernel, the row in chunks of at most `block` columns."""
    rows, width = gate_up.shape
    inter = width // 2
    q, scales = _outputs(rows, inter, quant, gate_up.device)
    if rows:
        block = min(block, triton.next_power_of_2(inter))
        _silu_mul_fp8_kernel[(rows,)](
            gate_up, q, scales, gate_up.stride(0), q.stride(0), inter, STATIC=quant.strategy == "static",
            BLOCK=block, FP8_LIMIT=FP8_MAX, MIN_S=MIN_SCALE, num_warps=8, **launch_kwargs(pdl),
        )
    return Fp8Rows(q, scales, gate_up.dtype)
