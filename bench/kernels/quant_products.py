"""The quantized products against bf16 at Llama-3.1-8B shapes: time and accuracy per row count.

For each decoder product shape (qkv, o, gate_up, down) and row count, a CUDA-graph replay of:
bf16 `F.linear` (cuBLAS), the FP8 product with dynamic per-token activation scales (the
"-FP8-dynamic" layout: the row quantizer and the e4m3 product), and the int4 product of
group 128 (AWQ/GPTQ, W4A16). Weights are random (normal, 1/sqrt(K)) and quantized the way
the checkpoints are (per-row e4m3 scales; min-max int4 per group of 128). Reported per
product: microseconds, weight bandwidth (GB/s of the quantized bytes), and the relative
error against the bf16 product of the unquantized weight; per row count: a decode step's
products summed over 32 layers (the LM head, bf16 in every format, added once); and the FP8
products' input quantizer fused into the kernel before them (`engine/quantization/fused.py`:
the input norm at hidden 4096, SiLU * up at 14336) against that kernel then `quantize_fp8`.

    python3 bench/kernels/quant_products.py --out bench/results/quant-products-h200.json \
        --png bench/results/quant-products-h200.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.engine.fastpath.timing import graph_time  # noqa: E402
from baton.engine.quantization import fp8, int4, kernels  # noqa: E402
from baton.engine.quantization.linear import Fp8Linear, Int4Linear  # noqa: E402
from baton.engine.quantization.schemes import ActivationScheme  # noqa: E402
from engine import run_record  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LM_HEAD = (128256, 4096)
LAYERS = 32
ROWS = [1, 8, 32, 64, 256, 2048]


def fp8_layer(w: torch.Tensor) -> Fp8Linear:
    layer = Fp8Linear(w.shape[1], w.shape[0], False, ActivationScheme("token"))
    layer.set_weights(fp8.quantize_weight_per_channel(w))
    return layer


def int4_layer(w: torch.Tensor, group: int = 128) -> Int4Linear:
    n, k = w.shape
    g = w.float().t().reshape(k // group, group, n)  # [G, g, N]
    lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    codes = torch.clamp(torch.round(g / scales[:, None]) + zeros[:, None], 0, 15).reshape(k, n).to(torch.int32)
    layer = Int4Linear(k, n, False, group)
    layer.set_weights(int4.Int4Weights(int4.pack_rows(codes), scales, zeros, group))
    return layer


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def measure_shape(n: int, k: int, repeats: int) -> dict:
    """{rows: {format: {us, weight_gbps, rel_err_vs_bf16}}} for one [N, K] product."""
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    q8, q4 = fp8_layer(w).cuda(), int4_layer(w).cuda()
    kernels.use_kernels(torch.nn.ModuleList([q8, q4]))
    products = {"bf16": (lambda x: F.linear(x, w), 2 * n * k),
                "fp8": (q8, n * k + 4 * n),
                "int4_g128": (q4, n * k // 2 + 8 * n * k // 128)}
    out = {}
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, w)
        entry = {}
        for label, (fn, nbytes) in products.items():
            seconds = graph_time(lambda fn=fn, x=x: fn(x), repeats)
            entry[label] = {"us": seconds * 1e6, "weight_gbps": nbytes / seconds / 1e9,
                            "rel_err_vs_bf16": rel_err(fn(x), want)}
        out[m] = entry
        print(n, k, m, {lbl: round(v["us"], 1) for lbl, v in entry.items()}, flush=True)
    return out


def measure_fused_quantizers(repeats: int) -> dict:
    """{rows: {op: {"separate_us", "fused_us"}}}: per-token e4m3 quantization of an input
    norm's and of SiLU * up's output, in their kernel or after it."""
    from baton.engine.fastpath import triton_ops
    from baton.engine.quantization.fused import Fp8Input, add_rms_norm_fp8, silu_mul_fp8

    token = Fp8Input("token")
    weight = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    out = {}
    for m in ROWS:
        x, residual = (torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gate_up = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16)
        ops = {
            "norm": (lambda x=x, r=residual: kernels.quantize_fp8(triton_ops.add_rms_norm(x, r, weight, 1e-5), "token"),
                     lambda x=x, r=residual: add_rms_norm_fp8(x, r, weight, 1e-5, token)),
            "silu_mul": (lambda g=gate_up: kernels.quantize_fp8(triton_ops.silu_mul(g), "token"),
                         lambda g=gate_up: silu_mul_fp8(g, token)),
        }
        out[m] = {op: {"separate_us": graph_time(separate, repeats) * 1e6, "fused_us": graph_time(fused, repeats) * 1e6}
                  for op, (separate, fused) in ops.items()}
        print("fused quantizers", m, out[m], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quant-products-h200.json")
    ap.add_argument("--png", default="bench/results/quant-products-h200.png")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {**run_record(), "shapes": {}, "decode_step_products_us": {}}
    for name, (n, k) in SHAPES.items():
        results["shapes"][name] = {"n": n, "k": k, "rows": measure_shape(n, k, args.repeats)}
        torch.cuda.empty_cache()
    head = (torch.randn(*LM_HEAD, device="cuda") * LM_HEAD[1] ** -0.5).to(torch.bfloat16)
    for m in ROWS:
        x = torch.randn(m, LM_HEAD[1], device="cuda", dtype=torch.bfloat16)
        head_us = graph_time(lambda x=x: F.linear(x, head), args.repeats) * 1e6
        results["decode_step_products_us"][m] = {
            fmt: LAYERS * sum(results["shapes"][s]["rows"][m][fmt]["us"] for s in SHAPES) + head_us
            for fmt in ("bf16", "fp8", "int4_g128")
        }
    results["fused_input_quantizers"] = measure_fused_quantizers(args.repeats)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["decode_step_products_us"], indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for fmt in ("bf16", "fp8", "int4_g128"):
            ax.plot(ROWS, [results["decode_step_products_us"][m][fmt] / 1e3 for m in ROWS], marker="o", label=fmt)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (tokens in the step)")
        ax.set_ylabel("ms: 32 layers' products + bf16 LM head")
        ax.set_title(f"Llama-3.1-8B products, {results['machine']['gpu']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
