"""The engine on CUDA (Triton kernels, fused ops, CUDA graphs) equals transformers token for token.

Float32 on the GPU against transformers' float32 on the CPU: greedy tokens must be equal, as
on the CPU path. bf16: the fast path against the engine's own reference path (torch
attention, no fused kernels, no graphs) on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from baton.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [
    [0, 17, 250, 33],
    [0] + list(range(40, 93)),
    [0, 400],
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def generate(model_dir, prompts=PROMPTS, params=GREEDY, **engine_args):
    engine_args.setdefault("num_gpu_blocks_override", 256)
    engine_args.setdefault("dtype", "float32")
    llm = LLM(model=str(model_dir), device="cuda", **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "llama31", "mistral", "qwen2"])
def test_fast_path_matches_transformers(hf_models, hf, arch):
    llm, got = generate(hf_models[arch], block_size=16)
    runner = llm.engine.runner
    assert runner.backend_name == "triton" and runner.graphs is not None
    assert runner.graphs.num_replays > 0  # decode steps ran as graph replays
    assert got == [hf.greedy(hf_models[arch], p, MAX_NEW) for p in PROMPTS]


def test_chunked_prefill_prefix_cache_and_eager_mode_match_transformers(hf_models, hf):
    model = hf_models["llama"]
    want = [hf.greedy(model, p, MAX_NEW) for p in PROMPTS]
    _, chunked = generate(model, block_size=4, max_num_batched_tokens=7)
    assert chunked == want
    _, eager = generate(model, block_size=8, enforce_eager=True)
    assert eager == want
    llm, first = generate(model, prompts=PROMPTS[1:2], block_size=4)
    again = llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first[0] == want[1]


def test_bf16_fast_path_matches_the_reference_path(hf_models):
    from baton.engine.models.llama import set_fused_kernels

    model = hf_models["llama31"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    fast, fast_tokens = generate(model, params=params, dtype="bfloat16")
    set_fused_kernels(False)
    try:
        ref, ref_tokens = generate(model, params=params, dtype="bfloat16", attention_backend="torch",
                                   enforce_eager=True)
    finally:
        set_fused_kernels(True)
    assert ref.engine.runner.graphs is None
    assert fast_tokens == ref_tokens


def test_rotary_epilogue_matches_the_reference_path(tmp_path, monkeypatch):
    """With `skinny_gemm.ROPE_EPILOGUE` (set before the engine starts, so that the tuning
    times the Q/K/V form with it) the steps the attention does not rotate for (here the
    prompts' chunks of 32 tokens) rotate and store keys and values in the Q/K/V product's
    epilogue; greedy bf16 tokens equal the reference path's. 32-dimension heads: the
    smallest the epilogue's tiles fit."""
    import json

    from safetensors.torch import save_file

    from baton.engine.models import skinny_gemm
    from baton.engine.models.llama import set_fused_kernels
    from baton.engine.tiny_model import random_llama_weights, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["head_dim"] = 32
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in random_llama_weights(config).items()}, str(model_dir / "model.safetensors"))
    monkeypatch.setattr(skinny_gemm, "ROPE_EPILOGUE", True)
    rotated = []
    qkv_rope = skinny_gemm.qkv_rope

    def counted(*args):
        out = qkv_rope(*args)
        rotated.append(out is not None)
        return out

    monkeypatch.setattr(skinny_gemm, "qkv_rope", counted)
    _, fast_tokens = generate(model_dir, dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=32)
    assert any(rotated)  # the prompts' chunks of 32 tokens
    set_fused_kernels(False)
    try:
        _, ref_tokens = generate(model_dir, dtype="bfloat16", attention_backend="torch", enforce_eager=True,
                                 max_num_batched_tokens=32)
    finally:
        set_fused_kernels(True)
    assert fast_tokens == ref_tokens
