"""Tensor parallelism on CUDA (NCCL, one process per GPU): TP 2 gives transformers' greedy
tokens in float32, as TP 1 does, and the same tokens as TP 1 in bfloat16 within ties.
Also quantized checkpoints with an FP8 KV cache, and LoRA, at TP 2. Needs two GPUs
(skipped with fewer); this folder is on `sys.path` (conftest.py) for its shared helpers."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import lora_requests, write_three_adapters
from test_engine_cuda import GREEDY, MAX_NEW, PROMPTS, assert_greedy_close
from test_quant_engine_cuda import CHECKPOINTS, outputs

from baton.engine import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def generate(model_dir, **engine_args) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(model_dir), device="cuda", num_gpu_blocks_override=256, block_size=16, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_float32_matches_transformers_and_tp1(hf_models, hf, arch):
    llm, got = generate(hf_models[arch], dtype="float32", tensor_parallel_size=2)
    ranks = llm.engine.runner.model.ranks
    assert llm.engine.runner.kv.device == torch.device("cuda", 0)
    assert [p.poll() for p in ranks.procs] == [None]  # rank 1 runs, on cuda:1
    want = [hf.greedy(hf_models[arch], p, MAX_NEW) for p in PROMPTS]
    assert got == want
    llm.engine.runner.close()
    _, one = generate(hf_models[arch], dtype="float32")
    assert one == want


def test_tp2_bfloat16_decodes_like_tp1(hf_models):
    two_llm, two = generate(hf_models["llama"], dtype="bfloat16", tensor_parallel_size=2)
    two_llm.engine.runner.close()
    _, one = generate(hf_models["llama"], dtype="bfloat16")
    # bf16 sums in another order across ranks: the first tokens agree; a near-tie may part later.
    assert [t[:4] for t in two] == [t[:4] for t in one]


@pytest.mark.parametrize("fmt", ["awq-g128", "ct-fp8-static-kv"])
def test_tp2_quantized_with_an_fp8_kv_cache_decodes_like_tp1(tmp_path, fmt):
    """Each rank's cut of the quantized tensors and its e4m3 KV pool over NCCL (e4m3 tensors
    move as bytes): TP 2 against TP 1's reference path (torch layers, torch attention)."""
    model_dir = CHECKPOINTS[fmt](tmp_path)
    two, got = outputs(model_dir, True, kv_cache_dtype="fp8", tensor_parallel_size=2)
    assert two.engine.runner.kv.dtype == torch.float8_e4m3fn
    two.engine.runner.close()
    _, want = outputs(model_dir, True, kv_cache_dtype="fp8")
    assert_greedy_close(got, want, tol=0.15)


def test_tp2_mixed_adapters_decode_like_tp1(hf_models, tmp_path):
    """LoRA at TP 2 on CUDA (the Triton shrink and expand on each rank, the row-parallel
    adapters' partial products in the layers' NCCL all-reduce) against TP 1, float32."""
    loras = lora_requests(write_three_adapters(hf_models["llama"], tmp_path))
    plan = [(p, name) for p in PROMPTS for name in (None, "a", "b", "c")]
    runs = []
    for tp in (2, 1):
        llm = LLM(model=str(hf_models["llama"]), device="cuda", dtype="float32", num_gpu_blocks_override=256,
                  enable_lora=True, max_loras=3, max_lora_rank=16, tensor_parallel_size=tp)
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], GREEDY,
                            lora_request=[loras[n] if n else None for _, n in plan])
        runs.append([o.outputs[0].token_ids for o in outs])
        if tp == 2:
            llm.engine.runner.close()
    assert runs[0] == runs[1]
