"""What the boundary between two few-row products costs, and what PDL and the two forms of
the L2 prefetch buy back.

For each Llama-3.1-8B product shape, 8 rows, the decode form and the configuration tuning
picks on an H100: a graph of 32 products over 32 different [N, K] weights (`chain`) against
one product over the same weights as one [32 N, K] matrix (`one`, same bytes, one
boundary). (chain - one) / 31 is the cost of a boundary; bytes / time the bandwidth.

    python3 bench/kernels/product_boundaries.py --out bench/results/product-boundaries-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.engine.config import KernelConfig  # noqa: E402
from baton.engine.fastpath.few_row_tuning import form_runner, launch_options  # noqa: E402
from baton.engine.fastpath.timing import graph_time  # noqa: E402
from engine import run_record  # noqa: E402

# (N, K, form, configuration tuning picked at 16 rows on an H100, 2026-11-28 05:40 UTC)
SHAPES = {
    "qkv": (6144, 4096, "row_scale", (16, 512, 4, 3)),
    "o": (4096, 4096, "add_norm", (16, 256, 4, 6)),
    "gate_up": (28672, 4096, "silu_row_scale", (64, 256, 4, 3)),
    "down": (4096, 14336, "add_norm", (16, 256, 4, 6)),
}
# KernelConfig fields of each variant
SETTINGS = {
    "no_pdl": {"pdl": False, "prefetch_mb": 0},
    "pdl": {"pdl": True, "prefetch_mb": 0},
    "pdl_first_rows_4mb": {"pdl": True, "prefetch_mb": 4, "prefetch_mode": 1},
    "pdl_row_starts_8mb": {"pdl": True, "prefetch_mb": 8, "prefetch_mode": 2},
}


class _Weight(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, None


def best_of(fn, tries: int = 3) -> float:
    return min(graph_time(fn, repeats=10) for _ in range(tries))


@torch.inference_mode()
def measure(name: str, copies: int, rows: int) -> dict:
    n, k, form, config = SHAPES[name]
    big = torch.randn((copies * n, k), dtype=torch.bfloat16, device="cuda") / k**0.5
    x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")
    parts = [_Weight(big[i * n:(i + 1) * n]) for i in range(copies)]
    whole = _Weight(big)
    result = {"n": n, "k": k, "form": form, "config": str(config), "rows": rows, "copies": copies}
    for key, settings in SETTINGS.items():
        launch = launch_options(KernelConfig(**settings).for_device(torch.device("cuda")))
        chain_run, _ = form_runner(form, x, parts[0], launch)
        one_run, _ = form_runner(form, x, whole, launch)

        def chain(chain_run=chain_run):
            for part in parts:
                chain_run(part, config)

        chain_s, one_s = best_of(chain), best_of(lambda one_run=one_run: one_run(whole, config))
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
