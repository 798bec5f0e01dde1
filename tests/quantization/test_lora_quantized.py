"""LoRA adapters over quantized base weights: an int4 (AWQ) checkpoint with adapters gives
the tokens its dequantized model gives with the same adapters (weight-only int4 computes
exactly what its dequantized weights do; tests/engine/test_lora.py checks the dequantized
path against transformers + PEFT). FP8 also rounds activations, so FP8 with adapters is
compared by teacher forcing, within the FP8 tests' tolerance (quant_compare.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from quant_checkpoints import FP8_MAX, ct_group_fp8, linear_names, write_awq, write_ct, write_dense
from quant_compare import assert_predicts_like

from baton.engine import LLM, LoRARequest, SamplingParams
from baton.engine.quantization.linear import Fp8Linear, Int4Linear

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from lora_helpers import ALL, write_adapter  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[0, 17, 250, 33], [0, 5, 6, 7, 8, 9, 10], [0, 400, 9]]


# At TP 2 the adapters are cut with the int4 layers (tests/engine/test_tensor_parallel.py
# checks LoRA at TP 2 on dense weights); the dequantized model runs at TP 1.
@pytest.mark.parametrize("tp", [1, 2])
def test_adapters_over_int4_weights_equal_adapters_over_the_dequantized_model(tmp_path, tp):
    qdir, config, dense = write_awq(tmp_path / "q", 64)
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    loras = [LoRARequest("a", 1, str(write_adapter(ddir, tmp_path / "a", 8, ["q_proj", "v_proj"], seed=7))),
             LoRARequest("b", 2, str(write_adapter(ddir, tmp_path / "b", 16, ALL, seed=8)))]
    plan = [(p, lora) for p in PROMPTS for lora in (None, *loras)]

    def run(model_dir, tp=1):
        llm = LLM(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks_override=64, block_size=8,
                  enable_lora=True, max_loras=2, max_lora_rank=16, tensor_parallel_size=tp)
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], GREEDY,
                            lora_request=[lora for _, lora in plan])
        return llm, [o.outputs[0].token_ids for o in outs]

    llm, got = run(qdir, tp)
    down = llm.engine.runner.reference.layers[0].mlp.down_proj
    lora = down.linear if tp > 1 else down  # at TP 2 inside the row-parallel layer, before its all-reduce
    assert isinstance(lora.base, Int4Linear)  # the adapters wrap the int4 layer itself
    llm.engine.runner.close()
    _, want = run(ddir)
    assert got == want
    assert got[1] != got[0] and got[2] != got[0]  # the adapters change the output


# An adapter whose B @ A is smaller than the base weights, as a trained adapter's is.
# write_adapter's default makes it larger than down_proj's weights: the adapter then swamps
# the base model, down_proj's inputs grow several-fold past the static activation scales
# (calibrated on the base model, they clip) and the amplified activation rounding exceeds
# the FP8 tolerance even against the same weights.
STD = 0.06
FP8 = {  # (checkpoint writer, engine arguments that make its layers FP8)
    "ct-fp8-dynamic": (lambda d: write_ct(d, ct_group_fp8("channel", "token"), "float-quantized")[:3], {}),
    "ct-fp8-static": (lambda d: write_ct(d, ct_group_fp8("tensor", "static"), "float-quantized")[:3], {}),
    "online": (lambda d: write_awq(d, 64), {"quantization": "fp8"}),  # its dense model, quantized at load
}


def fp8_rounded(config: dict, dense: dict) -> dict:
    """`dense` with every projection rounded to e4m3 with one scale per output row, as
    `quantization="fp8"` rounds it at load: the dequantized model of the online FP8 one."""
    out = dict(dense)
    for name in linear_names(config):
        w = dense[name + ".weight"]
        s = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        out[name + ".weight"] = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return out


@pytest.mark.parametrize("fmt", sorted(FP8))
def test_adapters_over_fp8_weights_predict_like_adapters_over_the_dequantized_model(tmp_path, fmt):
    write, kwargs = FP8[fmt]
    qdir, config, dense = write(tmp_path / "q")
    ddir = write_dense(tmp_path / "dense", qdir, config, dense)
    model_dir = ddir if kwargs else qdir
    if kwargs:  # the reference: the dense model with the weights quantization="fp8" computes with
        ddir = write_dense(tmp_path / "rounded", qdir, config, fp8_rounded(config, dense))
    lora = LoRARequest("b", 1, str(write_adapter(ddir, tmp_path / "b", 16, ALL, seed=8, std=STD)))
    llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks_override=16, enable_lora=True,
              max_lora_rank=16, **kwargs)
    assert isinstance(llm.engine.runner.reference.layers[0].mlp.down_proj.base, Fp8Linear)
    # The adapter moves the FP8 model's predictions by far more than FP8 rounding may.
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[1]}] * 2, params, lora_request=[None, lora])
    plain, adapted = ([getattr(pos[t], "logprob", pos[t]) for pos, t in zip(o.prompt_logprobs[1:], PROMPTS[1][1:])]
                      for o in outs)  # each prompt token's log-probability
    assert sum(abs(a - b) for a, b in zip(plain, adapted)) / len(plain) > 1.0
    llm.engine.runner.close()
    assert_predicts_like(model_dir, ddir, lora, **kwargs)
