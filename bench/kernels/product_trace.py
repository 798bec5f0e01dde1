"""When each program of a chain of few-row products starts and ends (%globaltimer, %smid).

A copy of the few-row product's plain loop (engine/fastpath/few_row.py) (same PDL wait, same L2 prefetch) that also
writes each program's SM and its start (after the PDL wait) and end times. For a chain of
products over different weights (as in a decode step) it reports, per product, the gap from
the previous product's last program to its first start, the spread of its programs' ends,
and the share of the product's span that the weight stream was below 90% of its median rate
(from spreading each program's bytes over its own interval).

    python3 bench/kernels/product_trace.py --out bench/results/product-trace-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.engine.fastpath import few_row  # noqa: E402
from baton.engine.fastpath.pdl import enter  # noqa: E402
from baton.engine.fastpath.timing import graph_time  # noqa: E402
from engine import run_record  # noqa: E402


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_rows_l2(ptr, nbytes, rows, stride_bytes):
    """Threads 0..rows-1 each ask for the first `nbytes` of one row (`stride_bytes` apart) in L2."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; .reg .b64 a; mov.u32 t, %tid.x; setp.lt.u32 p, t, $3; "
        "mul.wide.u32 a, t, $4; add.s64 a, a, $1; @p cp.async.bulk.prefetch.L2.global [a], $2; mov.u32 $0, 0; }",
        "=r,l,r,r,r", [ptr, nbytes, rows, stride_bytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _traced_kernel(x_ptr, w_ptr, out_ptr, trace_ptr, M, N, K, prefetch_bytes, M_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    arrive = _now()
    n0 = pid * BLOCK_N
    if PREFETCH == 1:  # the first rows, whole (few_row)
        nbytes = tl.minimum(tl.minimum(N - n0, BLOCK_N) * K * 2, prefetch_bytes)
        few_row._prefetch_l2(w_ptr + n0.to(tl.int64) * K, (nbytes // 16 * 16).to(tl.int32))
    if PREFETCH == 2:  # the start of every row: what the K loop reads first
        per_row = tl.minimum(prefetch_bytes // BLOCK_N, K * 2) // 16 * 16
        _prefetch_rows_l2(w_ptr + n0.to(tl.int64) * K, per_row.to(tl.int32), tl.minimum(N - n0, BLOCK_N), K * 2)
    enter(USE_PDL)
    start = _now()
    n = n0 + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + m[:, None] * K + k[None, :]
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * K + k[None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc += tl.dot(tl.load(x_ptrs, mask=m[:, None] < M, other=0.0), tl.trans(tl.load(w_ptrs)))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m[:, None] < M)
    end = _now()
    tl.store(trace_ptr + pid * 4, start)
    tl.store(trace_ptr + pid * 4 + 1, end)
    tl.store(trace_ptr + pid * 4 + 2, _smid().to(tl.int64))
    tl.store(trace_ptr + pid * 4 + 3, arrive)


SHAPES = {"qkv": (6144, 4096, (16, 512, 4, 3)), "o": (4096, 4096, (16, 256, 4, 6)),
          "gate_up": (28672, 4096, (64, 256, 4, 3)), "down": (4096, 14336, (16, 256, 4, 6)),
          # the same programs, as many on every SM of an H100 (132 SMs)
          "qkv_even": (132 * 3 * 16, 4096, (16, 512, 4, 3)), "o_even": (132 * 2 * 16, 4096, (16, 256, 4, 6)),
          "down_even": (132 * 2 * 16, 14336, (16, 256, 4, 6))}


def analyse(traces: list[np.ndarray], bytes_per_program: float) -> dict:
    rows = []
    prev_end = None
    for tr in traces:
        start, end, arrive = (tr[:, i].astype(np.float64) / 1e3 for i in (0, 1, 3))  # us
        t0, t1 = start.min(), end.max()
        grid = np.linspace(t0, t1, 400)
        rate = np.zeros_like(grid)
        for s, e in zip(start, end):
            rate[(grid >= s) & (grid < e)] += bytes_per_program / max(e - s, 1e-3)
        steady = np.median(rate)
        sm = tr[:, 2]
        per_sm = {int(i): (int((sm == i).sum()), float(end[sm == i].max())) for i in np.unique(sm)}
        by_count = {}
        for count, sm_end in per_sm.values():
            by_count.setdefault(count, []).append(t1 - sm_end)
        early = {} if prev_end is None else {
            "arrived_before_previous_end": int((arrive < prev_end).sum()),
            "arrival_p10_before_previous_end_us": float(prev_end - np.percentile(arrive, 10)),
            "arrival_first_before_previous_end_us": float(prev_end - arrive.min())}
        rows.append({**early, "span_us": t1 - t0, "gap_from_previous_us": None if prev_end is None else t0 - prev_end,
                     "start_spread_us": float(np.percentile(start, 100) - t0),
                     "end_p10_to_max_us": float(t1 - np.percentile(end, 10)),
                     "end_p50_to_max_us": float(t1 - np.percentile(end, 50)),
                     "program_us_median": float(np.median(end - start)),
                     "below_90pct_rate_us": float((rate < 0.9 * steady).mean() * (t1 - t0)),
                     "median_rate_tb_s": float(steady / 1e6), "sms_used": len(per_sm),
                     **{f"sm_end_before_max_us_{c}_programs": float(np.median(v)) for c, v in by_count.items()},
                     **{f"sms_with_{c}_programs": len(v) for c, v in by_count.items()}})
        prev_end = t1
    keys = {key for r in rows[1:] for key in r}
    return {key: float(np.median([r[key] for r in rows[1:] if r.get(key) is not None])) for key in sorted(keys)}


@torch.inference_mode()
def trace(name: str, copies: int, rows: int, prefetch: int, use_pdl: bool, mode: int = 1) -> dict:
    n, k, (block_n, block_k, warps, stages) = SHAPES[name]
    weights = [torch.randn((n, k), dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty((rows, n), dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    grid = triton.cdiv(n, block_n)
    buf = torch.zeros((copies, grid, 4), dtype=torch.int64, device="cuda")
    per_program = prefetch // grid // 16 * 16

    def chain():
        for i in range(copies):
            _traced_kernel[(grid,)](x, weights[i], outs[i], buf[i], rows, n, k, per_program, M_PAD=16,
                                    BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=mode if per_program > 0 else 0, USE_PDL=use_pdl,
                                    num_warps=warps, num_stages=stages, launch_pdl=use_pdl)

    per_product = graph_time(chain, repeats=10) / copies * 1e6  # also leaves the last replay's trace
    result = analyse(list(buf.cpu().numpy()), block_n * k * 2)
    result.update(name=name, programs=grid, us_per_product=per_product, prefetch_bytes=prefetch, pdl=use_pdl,
                  prefetch="row starts" if mode == 2 else "first rows",
                  tb_s=n * k * 2 / per_product / 1e6)
    print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in result.items()}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="product-trace.json")
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = ap.parse_args()
    result = {**run_record(), "runs": []}
    for name in args.shapes:
        for prefetch, use_pdl, mode in ((0, True, 1), (4 << 20, True, 1), (16 << 20, True, 1), (2 << 20, True, 2),
                                        (4 << 20, True, 2), (8 << 20, True, 2), (16 << 20, True, 2)):
            result["runs"].append(trace(name, args.copies, args.rows, prefetch, use_pdl, mode))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
