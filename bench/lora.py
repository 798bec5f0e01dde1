"""Multi-LoRA decode cost on one GPU: batch 32, rank 16 on all seven projections.

    python bench/lora.py --out bench/results/lora-h100.json

Llama-3.1-8B-shaped model with random bf16 weights (`engine_workload.py`) and 32 random
PEFT adapters (rank 16 on q/k/v/o/gate/up/down) written as PEFT writes them. Times a
decode step (`ModelRunner.execute`, CUDA graphs, context 1024) of 32 sequences with the
base model alone (an engine without LoRA), then with LoRA on and 0, 1, 8 and 32 distinct
adapters among the 32 sequences; the target is at most 1.15x the base step with 32
distinct adapters. Also the time to copy one adapter from host memory into a GPU slot.
`--smoke` runs the same steps on a 2-layer model of the same widths' ratios on the CPU (it
checks the script, its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_workload import LLAMA31_8B, write_random_checkpoint  # noqa: E402

from baton.engine.config import EngineArgs  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.lora.request import LoRARequest  # noqa: E402
from baton.engine.scheduler import ScheduledBatch  # noqa: E402
from engine import release, run_record, synthetic_seqs, timed  # noqa: E402

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(out: Path, cfg: dict, rank: int, seed: int) -> Path:
    """A PEFT adapter directory of random A and B on all seven projections."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (d_in, d_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.01).bfloat16()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(dims), "bias": "none"}))
    return out


SMOKE = {**LLAMA31_8B, "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512}


def step_ms(engine: LLMEngine, batch: int, context: int, rng, adapters: list[LoRARequest]) -> float:
    """Median decode step of `batch` sequences, sequence i running adapters[i % len] (none
    if the list is empty)."""
    seqs = synthetic_seqs(engine, batch, context, rng)
    vocab = engine.config.vocab_size  # the smoke model's is smaller than the ids drawn
    for i, seq in enumerate(seqs):
        seq.token_ids[:] = [t % vocab for t in seq.token_ids]
        if adapters:
            seq.lora_request = adapters[i % len(adapters)]
    step = timed(lambda: engine.runner.execute(ScheduledBatch(seqs, [1] * batch)), repeats=30)
    release(engine, seqs)
    return 1e3 * step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/lora-h100.json")
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    ap.add_argument("--adapter-dir", default="/tmp/lora-adapters-r16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true", help="a small model on the CPU: checks the script only")
    args = ap.parse_args()
    cfg, device = (SMOKE, "cpu") if args.smoke else (LLAMA31_8B, "cuda")
    from baton.engine.tiny_model import ensure_tiny_model

    result = {"command": " ".join(sys.argv), "smoke": True} if args.smoke else run_record()
    result.update(batch=args.batch, rank=args.rank, context=args.context, targets=list(MODULES))
    model_dir = write_random_checkpoint(Path(args.model_dir), cfg, ensure_tiny_model(), device=device)
    common = dict(model=str(model_dir), dtype="bfloat16" if device == "cuda" else "float32", device=device,
                  max_model_len=4096, max_num_seqs=args.batch, gpu_memory_utilization=0.85,
                  num_gpu_blocks_override=None if device == "cuda" else args.batch * (args.context // 16 + 2))

    engine = LLMEngine.from_engine_args(EngineArgs(**common))
    engine.runner.kv.normal_()
    result["base_step_ms"] = step_ms(engine, args.batch, args.context, np.random.default_rng(0), [])
    print("base", result["base_step_ms"], flush=True)
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    paths = [write_adapter(Path(args.adapter_dir) / f"a{i}", cfg, args.rank, i) for i in range(args.batch)]
    adapters = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    engine = LLMEngine.from_engine_args(EngineArgs(**common, enable_lora=True, max_loras=args.batch,
                                                   max_lora_rank=args.rank))
    engine.runner.kv.normal_()
    lora = engine.runner.lora
    t = time.perf_counter()
    for a in adapters:  # read here (the engine reads on a thread of its own), then held
        lora.install(lora.read(a))
        lora.acquire(a)
    result["disk_read_s_per_adapter"] = (time.perf_counter() - t) / len(adapters)
    result["kernels"] = engine.runner.explain()
    result["lora"] = {}
    for distinct in sorted({0, 1, min(8, args.batch), args.batch}):
        ms = step_ms(engine, args.batch, args.context, np.random.default_rng(0), adapters[:distinct])
        result["lora"][distinct] = {"step_ms": ms, "ratio_to_base": ms / result["base_step_ms"]}
        print(distinct, result["lora"][distinct], flush=True)
    # One adapter copied from host memory into a slot: evict slot 1's and load another.
    loads = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(5):
        sync()
        t = time.perf_counter()
        lora._load(1, lora.host[adapters[i % len(adapters)].lora_int_id])
        sync()
        loads.append(time.perf_counter() - t)
    result["host_to_slot_ms"] = 1e3 * float(np.median(loads))
    result["adapter_mib"] = lora.host[1].nbytes / 2**20
    target = result["lora"][args.batch]["ratio_to_base"]
    result["target"] = {"max_ratio": 1.15, "ratio": target, "met": target <= 1.15}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["target"]))


if __name__ == "__main__":
    main()
