"""Which extra work a few-row product (engine/fastpath/few_row.py) can carry without slowing down.

Microseconds per product (best of a few configurations, graph replays over 6 weight copies,
no PDL) of x [rows, K] @ W.T with, inside the K loop: nothing (mode 0); the residual add,
its store by program 0, RMSNorm's sum of squares and the norm weight (mode 1); the same
without the store (2); the sum of squares only (3); the residual add only (4); and with
SiLU(gate) * up in the epilogue (silu). Decided which fusions the few-row kernel has
(docs/performance.md, "Tried and not kept").

    python3 bench/kernels/fused_gemv_probe.py   # writes $OUT/fused_variants.json (default /tmp)
"""

import datetime
import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from baton.engine.fastpath.few_row import fits
from baton.engine.fastpath.timing import graph_time


@triton.jit
def kern(x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, ro_ptr, M, N, K, eps,
         M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, SILU: tl.constexpr):
    pid = tl.program_id(0)
    COLS: tl.constexpr = BLOCK_N // 2 if SILU else BLOCK_N
    N_OUT = N // 2 if SILU else N
    n = pid * COLS + tl.arange(0, COLS)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    m_mask = m < M
    x_offs = m[:, None] * K + k[None, :]
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * K + k[None, :]
    acc = tl.zeros([M_PAD, COLS], tl.float32)
    acc2 = tl.zeros([M_PAD, COLS], tl.float32)
    sumsq = tl.zeros([M_PAD], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xk = tl.load(x_ptr + x_offs, mask=m_mask[:, None], other=0.0)
        if MODE == 1:  # add + store(pid0) + sumsq + nw
            xk = (xk.to(tl.float32) + tl.load(res_ptr + x_offs, mask=m_mask[:, None], other=0.0).to(tl.float32)).to(tl.bfloat16)
            if pid == 0:
                tl.store(ro_ptr + x_offs, xk, mask=m_mask[:, None])
            h = xk.to(tl.float32)
            sumsq += tl.sum(h * h, 1)
            xk = (h * tl.load(nw_ptr + k0 + k).to(tl.float32)[None, :]).to(tl.bfloat16)
        if MODE == 2:  # add + sumsq + nw, no store
            xk = (xk.to(tl.float32) + tl.load(res_ptr + x_offs, mask=m_mask[:, None], other=0.0).to(tl.float32)).to(tl.bfloat16)
            h = xk.to(tl.float32)
            sumsq += tl.sum(h * h, 1)
            xk = (h * tl.load(nw_ptr + k0 + k).to(tl.float32)[None, :]).to(tl.bfloat16)
        if MODE == 3:  # sumsq only, A unmodified
            h = xk.to(tl.float32)
            sumsq += tl.sum(h * h, 1)
        if MODE == 4:  # add only (no sumsq, no nw)
            xk = (xk.to(tl.float32) + tl.load(res_ptr + x_offs, mask=m_mask[:, None], other=0.0).to(tl.float32)).to(tl.bfloat16)
        acc += tl.dot(xk, tl.trans(tl.load(w_ptrs)))
        if SILU:
            acc2 += tl.dot(xk, tl.trans(tl.load(w_ptrs + N_OUT.to(tl.int64) * K)))
        x_offs += BLOCK_K
        w_ptrs += BLOCK_K
    if MODE == 1 or MODE == 2 or MODE == 3:
        acc *= tl.rsqrt(sumsq / K + eps)[:, None]
    if SILU:
        g = acc
        acc = g / (1.0 + tl.exp(-g)) * acc2
    tl.store(out_ptr + m[:, None] * N_OUT + n[None, :], acc.to(tl.bfloat16), mask=m_mask[:, None])

CONFIGS = [(16, 256, 4, 4), (32, 128, 4, 6), (64, 256, 4, 3), (128, 128, 8, 3)]  # from few_row.CONFIGS
MODES = [(0, False), (1, False), (2, False), (3, False), (4, False), (0, True), (3, True)]


def time_variant(n: int, k: int, rows: int, mode: int, silu: bool, config: tuple) -> float:
    """Microseconds per product, over 6 weight copies (too big for L2 together)."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    residual, residual_out = torch.randn_like(x), torch.empty_like(x)
    norm_weight = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    block_n, block_k, warps, stages = config
    grid = (triton.cdiv(n // 2 if silu else n, block_n // 2 if silu else block_n),)

    def launch():
        for w in weights:
            kern[grid](x, w, out, residual, norm_weight, residual_out, rows, n, k, 1e-5, M_PAD=16 if rows <= 16 else 32,
                       BLOCK_N=block_n, BLOCK_K=block_k, MODE=mode, SILU=silu, num_warps=warps, num_stages=stages)

    return graph_time(launch) / len(weights) * 1e6


def main() -> None:
    results = {}
    for (n, k), rows, (mode, silu) in itertools.product([(6144, 4096), (28672, 4096)], [1, 32], MODES):
        best = None
        for config in CONFIGS:
            if not fits(config, 16 if rows <= 16 else 32) or (silu and config[0] < 32):
                continue
            t = time_variant(n, k, rows, mode, silu, config)
            if best is None or t < best[0]:
                best = (round(t, 1), config)
        key = f"{n}x{k}/m{rows}/mode{mode}{'/silu' if silu else ''}"
        results[key] = best
        print(key, best, flush=True)
    out = {"machine": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": "python3 bench/kernels/fused_gemv_probe.py", "us_per_product_and_best_config": results}
    Path(os.environ.get("OUT", "/tmp"), "fused_variants.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
