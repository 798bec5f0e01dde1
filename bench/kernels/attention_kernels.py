"""Microbenchmark of the Triton attention kernels on Llama-3.1-8B shapes, with the ceilings.

    python bench/kernels/attention_kernels.py --out bench/results/attention-kernels-h100.json

Decode: each launch configuration of the paged decode kernel at several batch sizes with
1k-token contexts, timed as CUDA-graph replays (as the engine runs it), in bytes of KV read
per second; the torch reference (one launch at a time) for scale. Prefill:
tile configurations of the paged prefill kernel on fresh prompts against torch SDPA (flash)
on contiguous tensors, in causal TFLOP/s. Ceilings: a device-to-device copy and bf16 matrix
products of the model's shapes (M = 1 and 64 as bandwidth, M = 2048 as FLOP/s). Every kernel
output is checked against the torch reference before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from baton.engine.attention.base import AttentionMetadata
from baton.engine.attention.torch_ref import TorchAttention
from baton.engine.attention.triton_decode import (
    SplitCounts,
    decode_config,
    num_splits_for,
    paged_decode,
)
from baton.engine.attention.triton_prefill import paged_prefill
from baton.engine.config import KernelConfig
from baton.engine.fastpath.timing import graph_time

H, HKV, D, BS, LAYERS = 32, 8, 128, 16, 32
DT = torch.bfloat16
# The decode kernel's engine settings (merge in the last split, PDL as the GPU allows), set in main().
AS_ENGINE: dict = {}


def pool(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer K/V views of a block-major pool with the real model's strides (layer 0 filled)."""
    kv = torch.empty((num_blocks, LAYERS, 2, BS, HKV, D), dtype=DT, device="cuda")
    kv[:, 0].normal_()
    return kv[:, 0, 0], kv[:, 0, 1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_ms(fn, calls: int = 10) -> float:
    """Milliseconds per call from replays of a graph of `calls` calls: no launch overhead, which
    dominates small decode kernels timed one launch at a time."""

    def launch():
        for _ in range(calls):
            fn()

    return graph_time(launch) * 1e3 / calls


def bench_decode(batches, context) -> list[dict]:
    rows = []
    k_cache, v_cache = pool(max(batches) * context // BS + 1)
    for b in batches:
        rows += _decode_case(b, context, k_cache, v_cache)
    return rows


def _decode_case(b: int, context: int, k_cache, v_cache) -> list[dict]:
    ref = TorchAttention(H, HKV, D, D**-0.5)
    nb = context // BS
    tables = torch.randperm(b * nb, device="cuda", dtype=torch.int32).view(b, nb)
    lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
    q = torch.randn((b, H, D), dtype=DT, device="cuda")
    meta = AttentionMetadata(lens.long(), torch.arange(b + 1, dtype=torch.int32, device="cuda"), lens, tables,
                             [1] * b, [context] * b, BS)
    want = ref.attend(q, k_cache, v_cache, meta)
    kv_bytes = b * context * HKV * D * 2 * 2
    t_ref = do_bench(lambda: ref.attend(q, k_cache, v_cache, meta), return_mode="median")
    rows = [{"kernel": "torch_ref", "batch": b, "ms": t_ref, "kv_GBs": kv_bytes / t_ref / 1e6}]
    auto = num_splits_for(b, HKV)
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                for splits in sorted({auto, max(1, auto // 2), auto * 2}):
                    kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
                    out = torch.full_like(q, float("nan"))

                    def run(kw=kw, out=out):
                        return paged_decode(q, k_cache, v_cache, tables, lens, D**-0.5, out, **kw, **AS_ENGINE)

                    try:
                        run()
                    except Exception as exc:  # a configuration that does not compile
                        rows.append({"kernel": "triton_decode", "batch": b, **kw, "error": str(exc)[:200]})
                        continue
                    err = rel_err(out, want)
                    t = graph_ms(run)
                    rows.append({"kernel": "triton_decode", "batch": b, **kw, "auto_splits": auto, "ms": t,
                                 "kv_GBs": kv_bytes / t / 1e6, "rel_err": err})
    return rows


def _rope_step(tables: torch.Tensor, context: int, cos_sin: torch.Tensor):
    """(q [b, H, D] not rotated, out, rope args) of a fused-rotary decode step whose sequences
    hold `context` tokens, the last one new (its key and value still in the Q/K/V output)."""
    b = tables.shape[0]
    qkv = torch.randn((b, (H + 2 * HKV) * D), dtype=DT, device="cuda")
    q = qkv[:, : H * D].view(b, H, D)
    slots = (tables[:, (context - 1) // BS].long() * BS + (context - 1) % BS).contiguous()
    return q, torch.empty_like(q), (cos_sin, qkv[:, H * D : (H + HKV) * D], qkv[:, (H + HKV) * D :], slots)


def bench_decode_rope(batches, context) -> list[dict]:
    """The decode kernel with the rotary and KV store fused in (`rope`, as a decode-only
    step runs it) against the plain kernel, per tile configuration, at the default splits."""
    rows = []
    k_cache, v_cache = pool(max(batches) * (context + BS) // BS + 1)
    for b in batches:
        nb = context // BS + 1
        tables = torch.randperm(b * nb, device="cuda", dtype=torch.int32).view(b, nb)
        lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
        cos_sin = torch.randn((context + 1, D), dtype=torch.float32, device="cuda")
        q, out, rope = _rope_step(tables, context, cos_sin)
        for block_n, stages in ((None, None), (32, 2), (64, 2), (64, 3), (128, 2)):
            for fused in (False, True):
                kw = dict(block_n=block_n, num_stages=stages, rope=rope if fused else None)

                def run(kw=kw, args=(q, k_cache, v_cache, tables, lens, D**-0.5, out)):
                    return paged_decode(*args, **kw, **AS_ENGINE)

                run()
                t = graph_ms(run)
                rows.append({"kernel": "triton_decode_rope" if fused else "triton_decode", "batch": b,
                             "block_n": block_n, "num_stages": stages, "ms": t})
                print(rows[-1], flush=True)
    return rows


def bench_decode_cold(batches, context) -> list[dict]:
    """The fused-rotary decode kernel as a decode step runs it, per launch configuration, with
    cold KV: each call of the timed graph reads other sequences (disjoint pages), ~256 MB of
    KV per graph (more than the 50 MB L2), unlike the repeated calls of `bench_decode`, which
    at small batches read the same ~34 MB from L2 again."""
    rows = []
    nb = context // BS + 1
    for b in batches:
        kv_bytes = b * context * HKV * D * 2 * 2
        copies = max(4, -(-256 * 2**20 // kv_bytes))
        k_cache, v_cache = pool(copies * b * nb + 1)
        perm = torch.randperm(copies * b * nb, device="cuda", dtype=torch.int32).view(copies, b, nb)
        lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
        cos_sin = torch.randn((context + 1, D), dtype=torch.float32, device="cuda")
        calls = [(perm[c], *_rope_step(perm[c], context, cos_sin)) for c in range(copies)]
        split_options = {1: [1, 2, 4, 8, 16], 8: [1, 2, 3, 4, 5, 6, 8, 12], 32: [1, 2, 3], 64: [1, 2]}.get(b, [1, 2])
        auto = num_splits_for(b, HKV)
        for block_n in (32, 64, 128):
            for stages in (2, 3):
                for warps in (4, 8):
                    for splits in sorted({auto, *split_options}):
                        kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)

                        def run(kw=kw, calls=calls, caches=(k_cache, v_cache), lens=lens):
                            for tables, q, out, rope in calls:
                                paged_decode(q, *caches, tables, lens, D**-0.5, out, rope=rope, **kw, **AS_ENGINE)

                        try:
                            run()
                        except Exception as exc:  # a configuration that does not compile
                            rows.append({"batch": b, **kw, "error": str(exc)[:200]})
                            continue
                        t = graph_time(run, repeats=20) * 1e3 / copies
                        rows.append({"batch": b, **kw, "auto": splits == auto and (block_n, stages) == decode_config(
                            D, b, HKV) and warps == 4, "ms": t, "kv_GBs": kv_bytes / t / 1e6})
        best = sorted((r for r in rows if r["batch"] == b and "ms" in r), key=lambda r: r["ms"])
        print(f"cold decode b={b}: default", [r for r in best if r["auto"]], flush=True)
        for r in best[:8]:
            print("   ", r, flush=True)
        calls = k_cache = v_cache = None  # free the pool before the next batch's
        torch.cuda.empty_cache()
    return rows


def bench_prefill(lengths) -> list[dict]:
    rows = []
    for n in lengths:
        rows += _prefill_case(n)
    return rows


def _prefill_case(n: int) -> list[dict]:
    configs = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2)]
    k_cache, v_cache = pool(n // BS + 1)
    table = torch.randperm(n // BS, device="cuda", dtype=torch.int32)[None]
    q = torch.randn((n, H, D), dtype=DT, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    keys = k_cache[table[0].long()].reshape(n, HKV, D)
    vals = v_cache[table[0].long()].reshape(n, HKV, D)
    qt, kt, vt = (x.transpose(0, 1)[None].contiguous() for x in (q, keys, vals))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=D**-0.5, enable_gqa=True)

    want = sdpa()[0].transpose(0, 1)
    flops = 4 * H * D * n * (n + 1) / 2
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        t = do_bench(sdpa, return_mode="median")
    rows = [{"kernel": "sdpa_flash_gqa", "tokens": n, "ms": t, "tflop_s": flops / t / 1e9}]
    for bm, bn, warps, stages in configs:
        cfg = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
        out = torch.full_like(q, float("nan"))

        def run(cfg=cfg, out=out):
            return paged_prefill(q, k_cache, v_cache, table, lens, qsl, [n], [n], D**-0.5, out, config=cfg)

        try:
            run()
        except Exception as exc:
            rows.append({"kernel": "triton_prefill", "tokens": n, **cfg, "error": str(exc)[:200]})
            continue
        err = rel_err(out, want)
        t = do_bench(run, return_mode="median")
        rows.append({"kernel": "triton_prefill", "tokens": n, **cfg, "ms": t, "tflop_s": flops / t / 1e9,
                     "rel_err": err})
    return rows


def ceilings() -> dict:
    out = {}
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), return_mode="median")
    out["d2d_copy_TBs_read_plus_write"] = 2 * src.numel() / t / 1e9
    shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
              "lm_head": (4096, 128256)}
    for m in (1, 8, 64, 256, 2048, 8192):
        for name, (k, n) in shapes.items():
            ws = [torch.randn((n, k), dtype=DT, device="cuda") for _ in range(2)]  # rotate: no L2 reuse
            x = torch.randn((m, k), dtype=DT, device="cuda")
            state = {"i": 0}

            def mm(x=x, ws=ws, state=state):
                state["i"] ^= 1
                return x @ ws[state["i"]].t()

            t = do_bench(mm, return_mode="median")
            out[f"mm_m{m}_{name}"] = {"ms": t, "weight_TBs": k * n * 2 / t / 1e9, "tflop_s": 2 * m * k * n / t / 1e9}
            del ws
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    AS_ENGINE.update(split_counts=SplitCounts(), pdl=KernelConfig().for_device(torch.device("cuda")).pdl)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--decode-only", action="store_true", help="skip the ceilings and prefill")
    ap.add_argument("--rope-only", action="store_true", help="of the decode cases, only the fused-rotary ones")
    ap.add_argument("--cold-only", action="store_true", help="of the decode cases, only the cold-KV sweep")
    args = ap.parse_args()
    result = {"machine": torch.cuda.get_device_name(0), "command": " ".join(["python3", *sys.argv]),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    result["ceilings"] = {} if args.decode_only else ceilings()
    only = args.rope_only or args.cold_only
    result["decode"] = [] if only else bench_decode(args.decode_batches, 1024)
    result["decode_rope"] = [] if args.cold_only else bench_decode_rope(args.decode_batches, 1024)
    result["decode_cold"] = [] if args.rope_only else bench_decode_cold(args.decode_batches, 1024)
    result["prefill"] = [] if args.decode_only else bench_prefill([2048, 8192])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ok = [r for r in result["decode"] if "ms" in r and r["kernel"] == "triton_decode"]
    for b in sorted({r["batch"] for r in ok}):
        best = min((r for r in ok if r["batch"] == b), key=lambda r: r["ms"])
        auto = [r for r in ok if r["batch"] == b and r["num_splits"] == r["auto_splits"] and r["block_n"] == 64
                and r["num_warps"] == 4 and r["num_stages"] == 2]
        ref = next(r for r in result["decode"] if r["kernel"] == "torch_ref" and r["batch"] == b)
        print(f"decode b={b}: best {best['ms']*1e3:.1f}us {best['kv_GBs']:.0f}GB/s {best} | default "
              f"{auto[0]['ms']*1e3 if auto else float('nan'):.1f}us | torch {ref['ms']*1e3:.1f}us")
    for n in (2048, 8192):
        rows = [r for r in result["prefill"] if r["tokens"] == n and "ms" in r]
        for r in sorted(rows, key=lambda r: r["ms"]):
            print(f"prefill {n}: {r}")
    print({k: (round(v, 3) if isinstance(v, float) else {kk: round(vv, 3) for kk, vv in v.items()})
           for k, v in result["ceilings"].items()})


if __name__ == "__main__":
    main()
