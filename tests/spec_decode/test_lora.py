"""Speculation with LoRA adapters: a verify step's drafted rows run through their
sequence's adapter (the adapter mapping is per token of the step), so greedy is exact."""

from __future__ import annotations

import sys
from pathlib import Path

from spec_helpers import NGRAM, repetitive_prompts

from baton.engine import LLM, LoRARequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from lora_helpers import write_adapter  # noqa: E402


def test_greedy_with_adapters_and_speculation_equals_without(tiny_model, tmp_path):
    adapter = LoRARequest("a", 1, str(write_adapter(tiny_model, tmp_path / "adapter", 4, ["q_proj", "v_proj", "down_proj"],
                                                     seed=5)))
    first, second = repetitive_prompts(2, seed=12)
    prompts, loras = [first, first, second], [adapter, None, adapter]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(model=str(tiny_model), device="cpu", dtype="float32", enable_lora=True,
                  num_gpu_blocks_override=256, block_size=4, max_model_len=256)
    plain = LLM(**common).generate(prompts, params, lora_request=loras)
    spec = LLM(**common, speculative_config=NGRAM)
    outs = spec.generate(prompts, params, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert plain[0].outputs[0].token_ids != plain[1].outputs[0].token_ids  # same prompt: the adapter mattered
    assert spec.engine.stats().spec_num_draft_tokens > 0
