"""The engine on quantized checkpoints, against the same model with dequantized weights.

Weight-only formats (AWQ, GPTQ, compressed-tensors int4) compute exactly what their
dequantized model computes, so greedy outputs are equal token for token (in float32 and in
bfloat16). FP8 formats also round activations to e4m3, so they are compared by teacher
forcing: the quantized model reads the dequantized model's greedy text and must predict
its tokens nearly everywhere. The FP8 KV cache is compared the same way, and must give the
same outputs through prefix-cache hits and preemption as without them.
"""

from __future__ import annotations

import pytest
import torch
from quant_checkpoints import (
    ct_group_fp8,
    ct_group_int4,
    write_awq,
    write_ct,
    write_dense,
    write_fp8,
    write_gptq,
)
from quant_compare import CPU, GREEDY, PROMPTS, assert_predicts_like, greedy

from baton.engine import LLM, SamplingParams
from baton.engine.config import EngineArgs
from baton.engine.quantization import QuantizationConfigError
from baton.engine.quantization.linear import Fp8Linear, Int4Linear

WEIGHT_ONLY = {
    "awq-g64": lambda d: write_awq(d, 64),
    "gptq-g32-desc_act": lambda d: write_gptq(d, 32, desc_act=True),
    "gptq-g128-asym": lambda d: write_gptq(d, 128, sym=False),
    "ct-int4-g128": lambda d: write_ct(d, ct_group_int4(128, True), "pack-quantized")[:3],
}


@pytest.mark.parametrize("fmt", sorted(WEIGHT_ONLY))
def test_int4_checkpoints_generate_what_their_dequantized_model_generates(tmp_path, fmt):
    qdir, config, dense = WEIGHT_ONLY[fmt](tmp_path / "q")
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    llm = LLM(model=str(qdir), **CPU)
    assert isinstance(llm.engine.runner.reference.layers[0].mlp.down_proj, Int4Linear)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == greedy(ddir)


def test_int4_in_bfloat16_generates_what_the_dequantized_model_does_in_bfloat16(tmp_path):
    qdir, config, dense = write_gptq(tmp_path / "q", 64, desc_act=True)
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    assert greedy(qdir, dtype="bfloat16") == greedy(ddir, dtype="bfloat16")


FP8 = {
    "ct-fp8-dynamic": lambda d: write_ct(d, ct_group_fp8("channel", "token"), "float-quantized")[:3],
    "ct-fp8-static": lambda d: write_ct(d, ct_group_fp8("tensor", "static"), "float-quantized")[:3],
    "ct-fp8-block": lambda d: write_ct(d, ct_group_fp8("block", "group"), "float-quantized")[:3],
    "fp8-static": lambda d: write_fp8(d, static=True),
    "fp8-block": lambda d: write_fp8(d, block=True),
}


@pytest.mark.parametrize("fmt", sorted(FP8))
def test_fp8_checkpoints_predict_what_their_dequantized_model_generates(tmp_path, fmt):
    qdir, config, dense = FP8[fmt](tmp_path / "q")
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    llm = LLM(model=str(qdir), **CPU)
    assert isinstance(llm.engine.runner.reference.layers[1].self_attn.qkv_proj, Fp8Linear)
    assert_predicts_like(qdir, ddir)


def test_quantization_fp8_quantizes_an_unquantized_checkpoint_at_load(tmp_path):
    qdir, config, dense = write_gptq(tmp_path / "q", 128)  # any model: its dense weights are used
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    llm = LLM(model=str(ddir), quantization="fp8", **CPU)
    model = llm.engine.runner.reference
    assert isinstance(model.layers[0].self_attn.o_proj, Fp8Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the LM head stays in the model dtype
    assert_predicts_like(ddir, ddir, quantization="fp8")


def test_fp8_kv_cache_predicts_what_the_model_dtype_cache_generates(tmp_path):
    qdir, config, dense = write_gptq(tmp_path / "q", 128)
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    llm = LLM(model=str(ddir), kv_cache_dtype="fp8", **CPU)
    assert llm.engine.runner.kv.dtype == torch.float8_e4m3fn
    assert_predicts_like(ddir, ddir, kv_cache_dtype="fp8")


def test_fp8_kv_cache_uses_the_checkpoint_scales(tmp_path):
    qdir = write_ct(tmp_path, ct_group_fp8("channel", "token"), "float-quantized", kv="head")[0]
    llm = LLM(model=str(qdir), kv_cache_dtype="fp8", **CPU)
    attn = llm.engine.runner.reference.layers[1].self_attn
    from safetensors import safe_open

    with safe_open(str(qdir / "model.safetensors"), "pt") as f:
        want = f.get_tensor("model.layers.1.self_attn.k_scale").float().reshape(-1)
    assert torch.equal(attn.kv_scales.k_scale, want)
    assert all(len(t) == GREEDY.max_tokens for t in [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)])


def test_fp8_kv_cache_through_prefix_hits_and_preemption(tiny_dir):
    shared = "The same long prefix for every request, long enough to fill blocks. " * 3
    prompts = [shared + f"variant {i}" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    roomy = LLM(model=str(tiny_dir), device="cpu", kv_cache_dtype="fp8", num_gpu_blocks_override=400, block_size=8)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    small = LLM(model=str(tiny_dir), device="cpu", kv_cache_dtype="fp8", num_gpu_blocks_override=40, block_size=8)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == want
    again = small.generate(prompts, params, use_tqdm=False)  # the shared prefix comes from the cache
    assert sum(o.num_cached_tokens for o in again) > 0
    assert [o.outputs[0].token_ids for o in again] == want
    assert small.engine.block_manager.num_free_blocks == 40


def test_kv_layout_names_the_kv_dtype_and_a_mismatch_is_refused(tiny_dir):
    from baton.kvtransfer import KVLayout, LayoutMismatchError

    fp8 = KVLayout.from_engine_config(EngineArgs(model=str(tiny_dir), device="cpu", kv_cache_dtype="fp8")
                                      .create_engine_config())
    plain = KVLayout.from_engine_config(EngineArgs(model=str(tiny_dir), device="cpu").create_engine_config())
    assert fp8.dtype == "float8_e4m3fn" and plain.dtype == "float32"
    assert fp8.fingerprint() != plain.fingerprint()
    assert fp8.block_bytes * 4 == plain.block_bytes
    with pytest.raises(LayoutMismatchError, match="dtype: 'float8_e4m3fn' here, 'float32' at the peer") as info:
        fp8.check_compatible(plain)
    assert info.value.field == "dtype"


def test_bad_quantization_knobs_are_refused_with_their_name(tiny_dir):
    with pytest.raises(QuantizationConfigError, match="quantization='awq' needs a checkpoint quantized with awq"):
        EngineArgs(model=str(tiny_dir), device="cpu", quantization="awq").create_engine_config()
    with pytest.raises(QuantizationConfigError, match="kv_cache_dtype must be one of"):
        EngineArgs(model=str(tiny_dir), device="cpu", kv_cache_dtype="int8").create_engine_config()
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs the triton or torch attention backend"):
        EngineArgs(model=str(tiny_dir), device="cpu", kv_cache_dtype="fp8",
                   attention_backend="flash_attn").create_engine_config()


def test_baton_generate_takes_the_quantization_flags(tiny_dir, capsys):
    from baton.engine.offline import main

    assert main(["--model", str(tiny_dir), "--device", "cpu", "--num-gpu-blocks-override", "32", "--max-tokens", "3",
                 "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--explain", "Hello"]) == 0
    assert "torch reference" in capsys.readouterr().out
    assert main(["--model", str(tiny_dir), "--device", "cpu", "--quantization", "awq", "Hello"]) == 2
    assert "quantization='awq' needs a checkpoint quantized with awq" in capsys.readouterr().err
