"""The few-row product tuning (`FewRowTuning.tune`) for Llama-3.1-8B's shapes, without an engine.

Eight random bf16 weights per shape, each product timed in the form decode steps run it,
under the default `KernelConfig` (PDL, L2 prefetch); writes the tuning's report
(microseconds per product for cuBLAS and every configuration).

    python3 bench/kernels/skinny_tuning.py --out bench/results/skinny-tuning-h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.engine.config import KernelConfig  # noqa: E402
from baton.engine.fastpath.few_row_tuning import FewRowTuning  # noqa: E402
from baton.engine.fastpath.projection import FewRowLinear  # noqa: E402
from engine import run_record  # noqa: E402

# (N, K, form) of Llama-3.1-8B's products: Q/K/V, o_proj, gate/up, down_proj, lm_head
SHAPES = [(6144, 4096, "row_scale"), (4096, 4096, "add_norm"), (28672, 4096, "silu_row_scale"),
          (4096, 14336, "add_norm"), (128256, 4096, "plain")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="skinny-tuning.json")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--rope-epilogue", action="store_true",
                    help="also time Q/K/V with the rotary + KV store in its epilogue (KernelConfig.rope_epilogue)")
    args = ap.parse_args()
    kernels = KernelConfig(rope_epilogue=args.rope_epilogue).for_device(torch.device("cuda"))
    tuning = FewRowTuning()
    layers = []
    for i, (n, k, form) in enumerate(SHAPES):
        rope_heads = (32, 8, 128) if i == 0 else None  # Llama-3.1-8B's heads, KV heads, head dim
        layers += [FewRowLinear(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), form, tuning,
                                kernels, rope_heads) for _ in range(8)]
    tuning.tune(layers, kernels, max_rows=args.max_rows)
    result = {**run_record(), "kernel_config": dataclasses.asdict(kernels), "tuning": tuning.report}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for shape, row in tuning.report.items():
        top = sorted(row["us"].items(), key=lambda kv: kv[1])[:5]
        print(f"{shape:16s} {row['form']:15s} cublas {row['us']['cublas']:6.1f}  " + "  ".join(f"{c} {t}" for c, t in top))


if __name__ == "__main__":
    main()
