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
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from baton.engine.models.pdl import enter, launch_kwargs

log = logging.getLogger(__name__)

MAX_ROWS = 64
BUCKETS = (16, 32, 64)
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 3), (16, 128, 4, 8), (32, 256, 4, 4), (32, 128, 4, 6),
           (32, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]

# (N, K, M_PAD, dtype) -> the winning configuration, or None where cuBLAS won. Kept for the
# process: later engines with the same shapes reuse it.
_choice: dict[tuple[int, int, int, torch.dtype], tuple | None] = {}
REPORT: dict[str, dict] = {}  # "NxK/M_PAD" -> {"best": ..., "us": {candidate: microseconds}}, for benchmarks


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    enter(USE_PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N
    m_mask = m < M
    x_ptrs = x_ptr + m[:, None] * stride_xm + k[None, :]
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xk = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            wk = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + k) < K
            xk = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wk = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(xk, tl.trans(wk))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def fits(config: tuple, rows_pad: int, element_bytes: int = 2, shared_bytes: int = 227 * 1024) -> bool:
    """Whether a configuration's pipelined tiles fit in shared memory (227 KiB on an H100)."""
    block_n, block_k, _, stages = config
    return stages * (block_n + rows_pad) * block_k * element_bytes <= shared_bytes


def m_pad(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


def skinny_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, contiguous rows) @ weight[N, K].T (+ bias) with one configuration."""
    rows, k = x.shape
    n = weight.shape[0]
    block_n, block_k, warps, stages = config
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, rows, n, k, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, M_PAD=m_pad(rows), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages, **launch_kwargs(),
    )
    return out


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through the measured-fastest kernel for this shape and row count."""
    rows = x.shape[0]
    if rows == 0 or rows > MAX_ROWS:
        return layer(x)
    w = layer.weight
    config = _choice.get((w.shape[0], w.shape[1], m_pad(rows), w.dtype))
    if config is None or x.stride(-1) != 1:
        return layer(x)
    return skinny_mm(x, w, layer.bias, config)


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
            if (n, k, bucket, dtype) in _choice:
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
            _choice[(n, k, bucket, dtype)] = None if best == "cublas" else best
            report[(n, k, bucket)] = (best, {str(c): round(t * 1e6, 1) for c, t in times.items()})
            REPORT[f"{n}x{k}/{bucket}"] = {"best": str(best), "us": report[(n, k, bucket)][1]}
    log.info("few-row matrix products: %s", {key: value[0] for key, value in report.items()})
    return report
