"""LoRA adapters over quantized base weights: an int4 (AWQ) checkpoint with adapters gives
the tokens its dequantized model gives with the same adapters (weight-only int4 computes
exactly what its dequantized weights do; tests/engine/test_lora.py checks the dequantized
path against transformers + PEFT)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from quant_checkpoints import write_awq, write_dense

from baton.engine import LLM, LoRARequest, SamplingParams
from baton.engine.quantization.linear import Int4Linear

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
