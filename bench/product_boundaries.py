"""What the boundary between two few-row products costs, and what PDL and the two forms of
the L2 prefetch buy back.

For each Llama-3.1-8B product shape, 8 rows, the decode form and the configuration tuning
picks on an H100: a graph of 32 products over 32 different [N, K] weights (`chain`) against
one product over the same weights as one [32 N, K] matrix (`one`, same bytes, one
boundary). (chain - one) / 31 is the cost of a boundary; bytes / time the bandwidth.

    python3 bench/product_boundaries.py --out bench/results/product-boundaries-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baton.engine.models import pdl, skinny_gemm  # noqa: E402
from engine import run_record  # noqa: E402

# (N, K, form, configuration tuning picked at 16 rows on an H100, 2026-11-28 05:40 UTC)
SHAPES = {
    "qkv": (6144, 4096, "row_scale", (16, 512, 4, 3)),
    "o": (4096, 4096, "add_norm", (16, 256, 4, 6)),
    "gate_up": (28672, 4096, "silu_row_scale", (64, 256, 4, 3)),
    "down": (4096, 14336, "add_norm", (16, 256, 4, 6)),
}
SETTINGS = {
    "no_pdl": {"pdl.ENABLED": False, "skinny_gemm.PREFETCH_BYTES": 0},
    "pdl": {"pdl.ENABLED": True, "skinny_gemm.PREFETCH_BYTES": 0},
    "pdl_first_rows_4mb": {"pdl.ENABLED": True, "skinny_gemm.PREFETCH_BYTES": 4 << 20, "skinny_gemm.PREFETCH_MODE": 1},
    "pdl_row_starts_8mb": {"pdl.ENABLED": True, "skinny_gemm.PREFETCH_BYTES": 8 << 20, "skinny_gemm.PREFETCH_MODE": 2},
}
MODULES = {"pdl": pdl, "skinny_gemm": skinny_gemm}


class _Weight(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, None


def best_of(fn, tries: int = 3) -> float:
    return min(skinny_gemm.graph_time(fn, repeats=10) for _ in range(tries))


@torch.inference_mode()
def measure(name: str, copies: int, rows: int) -> dict:
    n, k, form, config = SHAPES[name]
    big = torch.randn((copies * n, k), dtype=torch.bfloat16, device="cuda") / k**0.5
    x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")
    parts = [_Weight(big[i * n:(i + 1) * n]) for i in range(copies)]
    whole = _Weight(big)
    chain_run, _ = skinny_gemm._form_runner(form, x, parts[0])
    one_run, _ = skinny_gemm._form_runner(form, x, whole)
    result = {"n": n, "k": k, "form": form, "config": str(config), "rows": rows, "copies": copies}
    for key, settings in SETTINGS.items():
        for attr, value in settings.items():
            mod, field = attr.split(".")
            setattr(MODULES[mod], field, value)

        def chain():
            for part in parts:
                chain_run(part, config)

        chain_s, one_s = best_of(chain), best_of(lambda: one_run(whole, config))
        boundary_us = (chain_s - one_s) / (copies - 1) * 1e6
        result[key] = {"chain_us_per_product": round(chain_s / copies * 1e6, 2),
                       "one_us_per_product": round(one_s / copies * 1e6, 2),
                       "boundary_us": round(boundary_us, 2),
                       "chain_tb_s": round(big.numel() * 2 / chain_s / 1e12, 3),
                       "one_tb_s": round(big.numel() * 2 / one_s / 1e12, 3)}
        print(name, key, result[key], flush=True)
    del big
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="product-boundaries.json")
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = ap.parse_args()
    result = {**run_record(), "shapes": {name: measure(name, args.copies, args.rows) for name in args.shapes}}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
