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
PREFETCH_BYTES = int(float(os.environ.get("BATON_PREFETCH_MB", "4")) * 2**20)
BUCKETS = (16, 32, 64)
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (16, 128, 4, 8), (32, 256, 4, 4), (32, 128, 4, 6),
           (32, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]

# (N, K, M_PAD, dtype) -> {configuration or "cublas": microseconds per product}. Kept for the
# process: later engines with the same shapes reuse it.
_times: dict[tuple[int, int, int, torch.dtype], dict] = {}
# The SiLU-fused variant replaces a separate ~2-3 us kernel: it is used when its
# configuration is at most this much slower than cuBLAS without the fusion.
FUSED_CREDIT_US = 2.0
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
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, prefetch_bytes,
                   HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, SILU: tl.constexpr, USE_PDL: tl.constexpr):
    """out = x @ W.T (+ bias), each program `BLOCK_N` output columns over the whole K.

    SILU: W is the fused [gate; up] (N = 2 I); a program takes BLOCK_N / 2 gate rows and the
    matching up rows and writes SiLU(gate) * up [M, I]: the activation costs no kernel of
    its own. (Work on x inside the loop does not pay: a residual add there costs 1.5-6 us
    per product, an RMSNorm's sum of squares 12-80 us, docs/architecture.md.)
    """
    pid = tl.program_id(0)
    COLS: tl.constexpr = BLOCK_N // 2 if SILU else BLOCK_N
    N_OUT = N // 2 if SILU else N
    n0 = pid * COLS
    if PREFETCH:
        # The weights do not depend on the previous kernel: start streaming this program's
        # first rows into L2 before waiting for it (with PDL this runs while it finishes).
        rows = tl.minimum(N_OUT - n0, COLS)
        nbytes = tl.minimum(rows * stride_wn * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), prefetch_bytes)
        if SILU:
            nbytes = nbytes // 2
            _prefetch_l2(w_ptr + (n0 + N_OUT).to(tl.int64) * stride_wn, (nbytes // 16 * 16).to(tl.int32))
        _prefetch_l2(w_ptr + n0.to(tl.int64) * stride_wn, (nbytes // 16 * 16).to(tl.int32))
    enter(USE_PDL)
    n = n0 + tl.arange(0, COLS)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N_OUT
    m_mask = m < M
    x_ptrs = x_ptr + m[:, None] * stride_xm + k[None, :]
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    acc = tl.zeros([M_PAD, COLS], tl.float32)
    if SILU:
        up_ptrs = w_ptrs + N_OUT.to(tl.int64) * stride_wn
        acc_up = tl.zeros([M_PAD, COLS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = m_mask[:, None]
            w_mask = n_mask[:, None]
        else:
            k_mask = (k0 + k) < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            w_mask = n_mask[:, None] & k_mask[None, :]
        xk = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc += tl.dot(xk, tl.trans(tl.load(w_ptrs, mask=w_mask, other=0.0)))
        if SILU:
            acc_up += tl.dot(xk, tl.trans(tl.load(up_ptrs, mask=w_mask, other=0.0)))
            up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc_up += tl.load(b_ptr + N_OUT + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:  # as F.silu(gate) * up on the rounded products
        g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = act * acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def fits(config: tuple, rows_pad: int, element_bytes: int = 2, shared_bytes: int = 227 * 1024) -> bool:
    """Whether a configuration's pipelined tiles fit in shared memory (227 KiB on an H100)."""
    block_n, block_k, _, stages = config
    return stages * (block_n + rows_pad) * block_k * element_bytes <= shared_bytes


def m_pad(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


def skinny_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple, *,
              silu: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, contiguous rows) @ weight[N, K].T (+ bias) with one configuration.

    silu: weight is the fused [gate; up] and the result SiLU(gate) * up [M, N / 2].
    """
    rows, k = x.shape
    n = weight.shape[0]
    block_n, block_k, warps, stages = config
    cols = block_n // 2 if silu else block_n
    out = torch.empty((rows, n // 2 if silu else n), dtype=x.dtype, device=x.device)
    grid = triton.cdiv(out.shape[1], cols)
    launch = launch_kwargs()
    aligned = weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0  # bulk copies
    per_program = PREFETCH_BYTES // grid // 16 * 16 if launch["USE_PDL"] and aligned else 0
    _skinny_kernel[(grid,)](
        x, weight, bias if bias is not None else weight, out, rows, n, k, x.stride(0), weight.stride(0),
        out.stride(0), per_program, HAS_BIAS=bias is not None, M_PAD=m_pad(rows), BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, PREFETCH=per_program > 0, SILU=silu, num_warps=warps,
        num_stages=stages, **launch,
    )
    return out


def _config(layer: nn.Linear, x: torch.Tensor, credit_us: float = 0.0, min_block_n: int = 0) -> tuple | None:
    """The fastest measured configuration for this product, or None where cuBLAS is faster
    by more than `credit_us` (what a fused variant saves: the kernel it replaces)."""
    rows = x.shape[0]
    w = layer.weight
    if rows == 0 or rows > MAX_ROWS or x.stride(-1) != 1:
        return None
    times = _times.get((w.shape[0], w.shape[1], m_pad(rows), w.dtype))
    if times is None:
        return None
    ours = [c for c in times if c != "cublas" and c[0] >= min_block_n]
    if not ours:
        return None
    best = min(ours, key=times.get)
    return best if times[best] <= times["cublas"] + credit_us else None


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through the measured-fastest kernel for this shape and row count."""
    config = _config(layer, x)
    return layer(x) if config is None else skinny_mm(x, layer.weight, layer.bias, config)


def silu_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """SiLU(gate) * up of the fused gate/up projection `layer(x)` in one kernel, or None where
    this shape has no fast configuration (the caller runs the product and the activation)."""
    config = _config(layer, x, FUSED_CREDIT_US, min_block_n=32)
    return None if config is None else skinny_mm(x, layer.weight, layer.bias, config, silu=True)


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


@torch.inference_mode()
def tune(model: nn.Module, max_rows: int = MAX_ROWS) -> dict:
    """Time cuBLAS and every configuration for each linear shape of `model`; keep the fastest.

    Returns {(N, K, M_PAD): (best name, {name: microseconds per product})} for the log.
    """
    by_shape: dict[tuple, list[nn.Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_cuda and module.weight.dtype != torch.float32:
            by_shape[(*module.weight.shape, module.weight.dtype)].append(module)
    report = {}
    for (n, k, dtype), layers in by_shape.items():
        layers = layers[:8]  # a product per layer in the graph: weights too big for L2 together
        for bucket in (b for b in BUCKETS if b <= max(16, max_rows)):
            if (n, k, bucket, dtype) in _times:
                continue
            x = torch.randn((bucket, k), dtype=dtype, device=layers[0].weight.device)

            def run(fn, x=x, layers=layers):
                def launch():
                    for layer in layers:
                        fn(layer, x)
                return graph_time(launch) / len(layers)

            times = {"cublas": run(lambda layer, x: F.linear(x, layer.weight, layer.bias))}
            want = F.linear(x, layers[0].weight, layers[0].bias).float()
            for config in (c for c in CONFIGS if fits(c, bucket, x.element_size())):
                try:
                    got = skinny_mm(x, layers[0].weight, layers[0].bias, config).float()
                    if not (got - want).norm() <= 1e-2 * want.norm():
                        raise ValueError(f"wrong result ({(got - want).norm() / want.norm():.2e} relative)")
                    times[config] = run(lambda layer, x, c=config: skinny_mm(x, layer.weight, layer.bias, c))
                except Exception as exc:  # a configuration this GPU cannot compile or run right
                    log.warning("few-row product config %s skipped for %s: %s", config, (n, k), exc)
            best = min(times, key=times.get)
            _times[(n, k, bucket, dtype)] = {c: t * 1e6 for c, t in times.items()}
            report[(n, k, bucket)] = (best, {str(c): round(t * 1e6, 1) for c, t in times.items()})
            REPORT[f"{n}x{k}/{bucket}"] = {"best": str(best), "us": report[(n, k, bucket)][1]}
    log.info("few-row matrix products: %s", {key: value[0] for key, value in report.items()})
    return report
