"""Prefill and eager decode steps of the Llama-3.1-8B shape, quickly: the figures the fast
path's host work shows in (a step without CUDA graphs pays every Python call of the forward).

`bench/engine.py` measures the same steps among many others and takes minutes to start (it
captures a graph per batch size); this starts an eager engine (no graphs) and times
512- and 2,048-token prefills and decode steps at batch 1 and 64 (context 1,024), so that two
trees can be compared in one device call:

    python3 bench/kernels/prefill_steps.py --label new --out new.json
    PYTHONPATH=/tmp/old python3 bench/kernels/prefill_steps.py --label old --out old.json

(`/tmp/old/baton` a link to the other tree: a path on PYTHONPATH is searched before the
editable install's finder). The result records which tree's `baton` ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_workload import LLAMA31_8B, write_random_checkpoint  # noqa: E402

import baton  # noqa: E402
from baton.engine.config import EngineArgs  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.scheduler import ScheduledBatch  # noqa: E402
from engine import bench_prefill, release, run_record, synthetic_seqs, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    args = ap.parse_args()
    from baton.engine.tiny_model import ensure_tiny_model

    result = {**run_record(), "label": args.label, "baton": str(Path(baton.__file__).resolve().parent)}
    model_dir = write_random_checkpoint(Path(args.model_dir), LLAMA31_8B, ensure_tiny_model())
    t = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="bfloat16", device="cuda", max_model_len=4096, max_num_seqs=64,
        max_num_batched_tokens=4096, gpu_memory_utilization=0.85, enforce_eager=True))
    result["engine_start_s"] = time.perf_counter() - t
    engine.runner.kv.normal_()
    rng = np.random.default_rng(0)
    result["prefill_ms"] = {n: v["ms"] for n, v in bench_prefill(engine, [512, 2048], rng).items()}
    result["eager_step_ms"] = {}
    for b in (1, 64):
        seqs = synthetic_seqs(engine, b, 1024, rng)
        batch = ScheduledBatch(seqs, [1] * b)
        result["eager_step_ms"][b] = 1e3 * timed(lambda batch=batch: engine.runner.execute(batch), repeats=20)
        release(engine, seqs)
    print(json.dumps({k: result[k] for k in ("label", "baton", "engine_start_s", "prefill_ms", "eager_step_ms")}),
          flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
