"""The few-row product tuning (skinny_gemm.tune) for Llama-3.1-8B's shapes, without an engine.

Eight random bf16 weights per shape, each product timed in the form decode steps run it;
writes skinny_gemm.REPORT (microseconds per product for cuBLAS and every configuration).

    python3 bench/skinny_tuning.py --out bench/results/skinny-tuning-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baton.engine.models import skinny_gemm  # noqa: E402
from engine import run_record  # noqa: E402

# (N, K, form) of Llama-3.1-8B's products: Q/K/V, o_proj, gate/up, down_proj, lm_head
SHAPES = [(6144, 4096, "row_scale"), (4096, 4096, "add_norm"), (28672, 4096, "silu_row_scale"),
          (4096, 14336, "add_norm"), (128256, 4096, "plain")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="skinny-tuning.json")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--rope-epilogue", action="store_true",
                    help="also time Q/K/V with the rotary + KV store in its epilogue (skinny_gemm.ROPE_EPILOGUE)")
    args = ap.parse_args()
    skinny_gemm.ROPE_EPILOGUE = args.rope_epilogue
    model = torch.nn.Module()
    for i, (n, k, form) in enumerate(SHAPES):
        layers = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                                     for _ in range(8))
        for layer in layers:
            layer.skinny_form = form
            if i == 0:
                layer.skinny_rope = (32, 8, 128)  # Llama-3.1-8B's heads, KV heads, head dim
        model.add_module(f"shape{i}", layers)
    skinny_gemm.tune(model, max_rows=args.max_rows)
    result = {**run_record(), "prefetch_bytes": skinny_gemm.PREFETCH_BYTES, "prefetch_mode": skinny_gemm.PREFETCH_MODE,
              "tuning": skinny_gemm.REPORT}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for shape, row in skinny_gemm.REPORT.items():
        top = sorted(row["us"].items(), key=lambda kv: kv[1])[:5]
        print(f"{shape:16s} {row['form']:15s} cublas {row['us']['cublas']:6.1f}  " + "  ".join(f"{c} {t}" for c, t in top))


if __name__ == "__main__":
    main()
