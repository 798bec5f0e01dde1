"""Quantized checkpoints and the FP8 KV cache on CUDA: the fast path (Triton quantized
products, CUDA graphs, Triton attention over an e4m3 cache) against the engine's own
reference path (torch reference layers, torch attention, eager) on the same checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_engine_cuda import assert_greedy_close

from baton.engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "quantization"))
from quant_checkpoints import (  # noqa: E402
    ct_group_fp8,
    ct_group_int4,
    write_awq,
    write_ct,
    write_dense,
    write_gptq,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[0, 17, 250, 33], [0] + list(range(40, 93)), [0, 400]]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
CHECKPOINTS = {
    "awq-g128": lambda d: write_awq(d, 128)[0],
    "gptq-g64-desc_act": lambda d: write_gptq(d, 64, desc_act=True)[0],
    "ct-int4-g32": lambda d: write_ct(d, ct_group_int4(32, True), "pack-quantized")[0],
    "ct-fp8-dynamic": lambda d: write_ct(d, ct_group_fp8("channel", "token"), "float-quantized")[0],
    "ct-fp8-static-kv": lambda d: write_ct(d, ct_group_fp8("tensor", "static"), "float-quantized", kv="tensor")[0],
    "ct-fp8-block": lambda d: write_ct(d, ct_group_fp8("block", "group"), "float-quantized")[0],
}


def outputs(model_dir, reference: bool, **kwargs):
    from baton.engine.config import KernelConfig

    if reference:
        kwargs.update(attention_backend="torch", enforce_eager=True, kernel_config=KernelConfig(fused_kernels=False))
    llm = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256, **kwargs)
    return llm, [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)]


@pytest.mark.parametrize("fmt", sorted(CHECKPOINTS))
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_quantized_fast_path_matches_the_reference_path(tmp_path, fmt, kv_cache_dtype):
    model_dir = CHECKPOINTS[fmt](tmp_path)
    fast, got = outputs(model_dir, False, kv_cache_dtype=kv_cache_dtype)
    _, want = outputs(model_dir, True, kv_cache_dtype=kv_cache_dtype)
    assert fast.engine.runner.graphs is not None and fast.engine.runner.graphs.num_replays > 0
    assert "Triton" in fast.engine.runner.explain()
    assert_greedy_close(got, want, tol=0.15)


def test_fp8_online_quantization_on_cuda(tmp_path):
    qdir, config, weights = write_gptq(tmp_path / "q", 128)  # its dense weights are what matters here
    dense = write_dense(tmp_path / "dense", qdir, config, weights)
    _, got = outputs(dense, False, quantization="fp8")
    _, want = outputs(dense, True, quantization="fp8")
    assert_greedy_close(got, want, tol=0.15)


@pytest.mark.parametrize("fmt", ["ct-fp8-dynamic", "ct-fp8-static-kv"])
def test_fp8_quantizers_in_the_norm_and_silu_kernels(tmp_path, fmt):
    """With `KernelConfig.fuse_fp8_quant` the input norms and SiLU * up quantize the FP8
    products' inputs (per token, or with the checkpoint's static scales), in prefill and in
    the decode graphs; the greedy text is the text of the quantizers in kernels of their own
    (the same codes per token; static: torch's quantizer divides exactly, so close)."""
    from baton.engine.config import KernelConfig

    model_dir = CHECKPOINTS[fmt](tmp_path)
    runs = {}
    for fuse in (True, False):
        llm, runs[fuse] = outputs(model_dir, False, kernel_config=KernelConfig(fuse_fp8_quant=fuse))
        assert ("e4m3 quantizer of down_proj's input" in llm.engine.runner.explain()) == fuse
        assert llm.engine.runner.graphs.num_replays > 0
    if fmt == "ct-fp8-dynamic":
        assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    assert_greedy_close(runs[True], runs[False], tol=0.05)
