"""Asynchronous scheduling on CUDA: graph replays (and eager steps) fed by the previous
step's tokens on the device give exactly the synchronous engine's outputs."""

from __future__ import annotations

import pytest
import torch

from baton.engine import EngineArgs, LLMEngine, SamplingParams
from baton.engine.tiny_model import write_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REQUESTS = [
    (f"Count {i} ways to " * (i % 3 + 1),
     SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=10 + 4 * i, ignore_eos=i % 3 == 0))
    for i in range(10)
]


def _run(engine: LLMEngine) -> dict:
    for i, (prompt, params) in enumerate(REQUESTS):
        engine.add_request(f"r{i}", prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
    assert engine.stats().kv_cache_usage == 0.0
    return finals


@pytest.mark.parametrize("enforce_eager,side_stream_inputs", [(False, False), (False, True), (True, False)])
def test_async_scheduling_equals_synchronous_on_cuda(tmp_path, enforce_eager, side_stream_inputs):
    from baton.engine.config import KernelConfig

    model = write_tiny_model(tmp_path)
    outs = {}
    for async_scheduling in (False, True):
        engine = LLMEngine.from_engine_args(EngineArgs(
            model=str(model), device="cuda", dtype="float32", max_num_seqs=8, max_model_len=512,
            num_gpu_blocks_override=256, enforce_eager=enforce_eager, async_scheduling=async_scheduling,
            kernel_config=KernelConfig(side_stream_inputs=side_stream_inputs)))
        outs[async_scheduling] = _run(engine)
    assert outs[True] == outs[False]
