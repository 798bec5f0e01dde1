"""How far each quantization moves a Llama-3.1-8B-shaped model's logits from bf16.

The engine's random-weight 8B checkpoint (`engine_workload.py`) is read by one prefill of
random prompts in bf16, then with each format (FP8 quantized at load, the AWQ int4 group-128
copy, the FP8 KV cache): the relative error of the logits (||q - bf16|| / ||bf16|| over all
positions) and the share of positions whose top-1 token agrees. Random weights give flatter
distributions than a trained model, so agreement here is a floor for what a trained model
keeps.

    python3 bench/quant_accuracy.py --out bench/results/quant-accuracy-h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_workload import LLAMA31_8B, write_awq_checkpoint, write_random_checkpoint  # noqa: E402

from baton.engine.config import EngineArgs  # noqa: E402
from baton.engine.model_runner import ModelRunner  # noqa: E402
from baton.engine.scheduler import ScheduledBatch  # noqa: E402
from baton.engine.sequence import Sequence  # noqa: E402
from baton.sampling_params import SamplingParams  # noqa: E402
from engine import run_record  # noqa: E402


@torch.inference_mode()
def prompt_logits(model_dir: Path, prompts: list[list[int]], **engine_args) -> list[torch.Tensor]:
    """Logits [len, vocab] (bf16, on the GPU) of every position of each prompt, one prefill each."""
    length = max(len(p) for p in prompts)
    config = EngineArgs(model=str(model_dir), dtype="bfloat16", device="cuda", max_model_len=length + 16,
                        max_num_batched_tokens=length, num_gpu_blocks_override=-(-length // 16) + 1,
                        enforce_eager=True, **engine_args).create_engine_config()
    runner = ModelRunner(config, eos_token_ids=[])
    out = []
    for i, ids in enumerate(prompts):
        seq = Sequence(f"p{i}", 0, ids, SamplingParams(), 0.0)
        seq.block_table = list(range(-(-len(ids) // config.block_size)))
        _, hidden = runner._forward(ScheduledBatch([seq], [len(ids)]))
        out.append(runner.model.compute_logits(hidden).to(torch.bfloat16))
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    num = sum(((g.float() - w.float()) ** 2).sum().item() for g, w in zip(got, want))
    den = sum((w.float() ** 2).sum().item() for w in want)
    agree = sum((g.argmax(-1) == w.argmax(-1)).sum().item() for g, w in zip(got, want))
    total = sum(w.shape[0] for w in want)
    return {"logits_rel_err": (num / den) ** 0.5, "top1_agreement": agree / total, "positions": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quant-accuracy-h200.json")
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    from baton.engine.tiny_model import ensure_tiny_model

    model_dir = write_random_checkpoint(Path(args.model_dir), LLAMA31_8B, ensure_tiny_model())
    awq_dir = write_awq_checkpoint(model_dir, Path(args.model_dir + "-awq-g128"))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, LLAMA31_8B["vocab_size"], (args.length,), generator=gen).tolist()
               for _ in range(args.prompts)]
    want = prompt_logits(model_dir, prompts)
    result = {**run_record(), "prompts": args.prompts, "length": args.length, "formats": {}}
    for name, directory, kwargs in (("fp8 (quantized at load, per-token activations)", model_dir, {"quantization": "fp8"}),
                                    ("awq int4 group 128", awq_dir, {}),
                                    ("fp8 KV cache", model_dir, {"kv_cache_dtype": "fp8"}),
                                    ("fp8 weights + fp8 KV cache", model_dir,
                                     {"quantization": "fp8", "kv_cache_dtype": "fp8"})):
        result["formats"][name] = compare(prompt_logits(directory, prompts, **kwargs), want)
        print(name, result["formats"][name], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
