"""The warm-up before readiness (engine/warmup.py): which shapes it runs, and that it leaves
the engine as it found it (no request, no block held)."""

from __future__ import annotations

import pytest

from baton.engine import AsyncLLMEngine, EngineArgs
from baton.engine.warmup import prefill_lengths, should_warm_up, warm_up


def test_prefill_lengths_cover_every_bucket_up_to_the_chunk():
    assert prefill_lengths(2048, 4000) == [1, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_lengths(100, 4000) == [1, 16, 32, 64, 100]
    assert prefill_lengths(2048, 200) == [1, 16, 32, 64, 128]  # capped by context or KV pool


def test_auto_warms_up_on_cuda_only():
    assert should_warm_up("auto", "cuda") and not should_warm_up("auto", "cpu")
    assert should_warm_up("on", "cpu") and not should_warm_up("off", "cuda")
    with pytest.raises(ValueError):
        should_warm_up("sometimes", "cpu")


async def test_warm_up_runs_every_shape_and_leaves_nothing(tiny_dir):
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_dir), device="cpu", num_gpu_blocks_override=64, block_size=4, max_num_seqs=8,
        max_num_batched_tokens=64))
    try:
        report = await warm_up(engine)
        assert report.prefill_lengths == (1, 16, 32, 64)
        assert report.decode_batch == 8  # 8 requests of up to 11 tokens fit 64 blocks of 4
        stats = await engine.run(lambda e: e.stats())
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        assert stats.num_free_blocks == stats.num_blocks
        assert stats.generation_tokens_total == 2 * 4 + sum(i + 2 for i in range(8))
    finally:
        await engine.shutdown()
