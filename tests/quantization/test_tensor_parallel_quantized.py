"""Quantized checkpoints at tensor_parallel_size 2 (two real processes over gloo): each rank
loads its cut of the quantized tensors, and the engine computes what TP 1 computes.

Weight-only int4 (AWQ, GPTQ, compressed-tensors) gives TP 1's greedy tokens exactly, as at
TP 1 it gives its dequantized model's. FP8 is compared as at TP 1, by teacher forcing: a
row-parallel rank's dynamic activation scales come from its own input columns (as in
vLLM), so the rounding differs from TP 1's a little. Splits that would cut a pack, a group
or a scale block, and activation order, are refused at engine start, by name.
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

from baton.engine import LLM
from baton.engine.config import EngineArgs
from baton.engine.parallel.layout import ShardLayout
from baton.engine.parallel.shard import layer_cut
from baton.engine.quantization import QuantizationConfigError
from baton.engine.quantization.linear import Fp8Linear, Int4Linear
from baton.engine.quantization.schemes import WeightScheme
from baton.engine.quantization.sharding import shard_leaf

TP2 = dict(tensor_parallel_size=2)

INT4 = {
    "awq-g64": lambda d: write_awq(d, 64),  # o/down: 128 input columns per rank, two groups
    "gptq-g128-asym": lambda d: write_gptq(d, 128, sym=False),
    "ct-int4-g128": lambda d: write_ct(d, ct_group_int4(128, True), "pack-quantized"),
}

# Per-tensor weight scales, static input scales, per-KV-head cache scales.
FP8_STATIC_KV = lambda d: write_ct(d, ct_group_fp8("tensor", "static"), "float-quantized", kv="head")  # noqa: E731


@pytest.mark.parametrize("fmt", sorted(INT4))
def test_int4_at_tp2_generates_what_tp1_generates(tmp_path, fmt):
    qdir = INT4[fmt](tmp_path)[0]
    llm = LLM(model=str(qdir), **CPU, **TP2)
    down = llm.engine.runner.reference.layers[0].mlp.down_proj.linear
    assert isinstance(down, Int4Linear) and down.in_features == 128  # rank 0's half of the 256 inputs
    assert down.qweight.shape == (128 // 8, 128)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm.engine.runner.close()
    assert got == greedy(qdir)


def test_fp8_static_at_tp2_with_an_fp8_kv_cache_predicts_like_tp1(tmp_path):
    """Per-tensor weight scales (shared by a row-parallel rank), static input scales
    (replicated), per-KV-head cache scales (each rank its heads')."""
    qdir = FP8_STATIC_KV(tmp_path)[0]
    assert_predicts_like(qdir, qdir, kv_cache_dtype="fp8", **TP2)


def test_fp8_per_channel_at_tp2_predicts_like_tp1(tmp_path):
    """Per-channel weight scales: cut with their output rows on q/k/v and gate/up."""
    qdir = write_ct(tmp_path, ct_group_fp8("channel", "token"), "float-quantized")[0]
    llm = LLM(model=str(qdir), device="cpu", num_gpu_blocks_override=16, **TP2)
    qkv = llm.engine.runner.reference.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight_scale.shape == (128 + 64 + 64,)  # q, k, v rows of rank 0
    llm.engine.runner.close()
    assert_predicts_like(qdir, qdir, **TP2)


def test_quantization_fp8_at_load_keeps_whole_row_scales_at_tp2(tmp_path):
    """`quantization="fp8"` quantizes the checkpoint's weights before they are cut, so a
    row-parallel rank's o/down scales are TP 1's (from the whole rows)."""
    qdir, config, dense = write_gptq(tmp_path / "q", 128)
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    tp1 = LLM(model=str(ddir), device="cpu", num_gpu_blocks_override=16, quantization="fp8")
    tp2 = LLM(model=str(ddir), device="cpu", num_gpu_blocks_override=16, quantization="fp8", **TP2)
    o1 = tp1.engine.runner.reference.layers[1].self_attn.o_proj
    o2 = tp2.engine.runner.reference.layers[1].self_attn.o_proj.linear
    assert torch.equal(o2.weight_scale, o1.weight_scale)
    assert torch.equal(o2.weight.view(torch.uint8), o1.weight[:, :128].view(torch.uint8))
    tp2.engine.runner.close()
    assert_predicts_like(ddir, ddir, quantization="fp8", **TP2)


@pytest.mark.parametrize("write, tp, message", [
    (lambda d: write_gptq(d, 32, desc_act=True), 2, r"activation order \(GPTQ desc_act"),
    (lambda d: write_ct(d, ct_group_int4(64, True, actorder=True), "pack-quantized"), 2, "activation order"),
    # k/v rows per rank: 64, half a 128x128 scale block.
    (lambda d: write_fp8(d, block=True), 2, r"k_proj's output rows per rank \(64\) are not whole 128x128 scale blocks"),
    # o/down input columns per rank: 64, half a group of 128.
    (lambda d: write_awq(d, 128), 4, r"o_proj's input columns per rank \(64\) are not whole groups of 128"),
])
def test_splits_that_cut_groups_blocks_or_an_activation_order_are_refused(tmp_path, write, tp, message):
    qdir = write(tmp_path)[0]
    with pytest.raises(QuantizationConfigError, match=message):
        EngineArgs(model=str(qdir), device="cpu", tensor_parallel_size=tp).create_engine_config()


def test_a_permuted_g_idx_is_refused_when_cut_even_without_desc_act():
    """A checkpoint whose config.json says no activation order but whose g_idx has one."""
    gptq = WeightScheme("int4", "group", "gptq", 4)
    layout = ShardLayout.of(dict(num_attention_heads=2, num_key_value_heads=2, head_dim=8, hidden_size=16,
                                 intermediate_size=16, vocab_size=10), 2, 1)
    cut = layer_cut("down_proj", layout)
    in_order = torch.arange(16, dtype=torch.int32) // 4
    assert shard_leaf(gptq, "g_idx", in_order, cut, "down_proj.g_idx").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(QuantizationConfigError, match="activation-order g_idx"):
        shard_leaf(gptq, "g_idx", in_order.flip(0), cut, "down_proj.g_idx")


@pytest.mark.parametrize("fmt", ["awq-g64", "ct-int4-g128", "ct-fp8-static-kv", "dense"])
def test_a_rank_reads_its_part_of_each_tensor_as_cutting_the_whole_one_gives(tmp_path, fmt):
    """What the loader reads through safetensors slices (a rank's part only) equals the
    whole tensors cut, for every tensor of the checkpoint and both ranks."""
    from baton.engine.loader import iter_weights
    from baton.engine.parallel.shard import shard_tensor
    from baton.engine.quantization import parse_quantization

    writers = dict(INT4, **{"ct-fp8-static-kv": FP8_STATIC_KV})
    if fmt == "dense":
        qdir, config, dense = write_gptq(tmp_path / "q", 128)
        model_dir = write_dense(tmp_path / "dense", qdir, config, dense)
    else:
        model_dir = writers[fmt](tmp_path)[0]
    hf_config = EngineArgs(model=str(model_dir), device="cpu").create_engine_config().hf_config
    quant = parse_quantization(hf_config, None)
    cpu = torch.device("cpu")
    for rank in range(2):
        layout = ShardLayout.of(hf_config, 2, rank)
        whole = {n: shard_tensor(n, t, layout, quant) for n, t in iter_weights(model_dir, cpu)}
        lazy = {n: shard_tensor(n, t, layout, quant) for n, t in iter_weights(model_dir, cpu, lazy=True)}
        assert whole.keys() == lazy.keys()
        for name in whole:
            assert torch.equal(_bits(whole[name]), _bits(lazy[name])), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
