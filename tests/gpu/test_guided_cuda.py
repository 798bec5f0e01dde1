"""Guided decoding on CUDA: the bitmask (and, in a mixed batch, its row indices) reach the
device from pinned memory and mask only the guided rows, inside decode steps that replay
CUDA graphs."""

from __future__ import annotations

import json

import pytest
import torch

from baton.engine import EngineArgs, GuidedDecodingParams, LLMEngine, SamplingParams
from baton.engine.tiny_model import write_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_guided_and_free_rows_in_one_cuda_batch(tmp_path, run_all):
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(write_tiny_model(tmp_path)), device="cuda", dtype="float32", num_gpu_blocks_override=256,
        max_model_len=512))
    free = {f"free-{i}": (f"Story {i}:", SamplingParams(temperature=t, seed=i, max_tokens=30, ignore_eos=True))
            for i, t in enumerate([0.0, 1.0])}
    alone = run_all(engine, free, max_steps=2000)
    guided = {f"json-{i}": (f"City {i}:", SamplingParams(temperature=1.0, seed=i, max_tokens=120,
                                                          guided_decoding=GuidedDecodingParams(json=SCHEMA)))
              for i in range(3)}
    replays = engine.runner.graphs.num_replays
    mixed = run_all(engine, {**guided, **free}, max_steps=2000)
    assert engine.runner.graphs.num_replays > replays  # decode steps ran as graphs
    for rid in free:
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    for rid in guided:
        out = mixed[rid].outputs[0]
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"city", "days"} and 1 <= value["days"] <= 9 and len(value["city"]) <= 12
    assert engine.stats().kv_cache_usage == 0.0
