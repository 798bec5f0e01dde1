"""The engine hooks a handoff relies on (baton.engine.LLMEngine, AsyncLLMEngine)."""

import asyncio

import pytest

from baton.engine import AsyncLLMEngine, EngineArgs, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(kv_tiny_dir):
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(kv_tiny_dir), num_gpu_blocks_override=32, block_size=4, device="cpu"))


def test_add_prefilled_request_releases_the_blocks_when_it_refuses(engine):
    free = engine.block_manager.num_free_blocks
    blocks = engine.reserve_blocks(10)
    with pytest.raises(ValueError, match="do not match"):
        engine.add_prefilled_request("r1", list(range(5, 25)), SamplingParams(), blocks, 7)
    assert engine.block_manager.num_free_blocks == free
    blocks = engine.reserve_blocks(10)
    with pytest.raises(ValueError, match="n=1"):
        engine.add_prefilled_request("r1", list(range(5, 15)), SamplingParams(n=2), blocks, 7)
    assert engine.block_manager.num_free_blocks == free


async def test_a_prefilled_request_that_ends_on_its_first_token_still_reports(kv_tiny_dir):
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(kv_tiny_dir), num_gpu_blocks_override=32, device="cpu"))
    try:
        blocks = await engine.run(lambda e: e.reserve_blocks(10))
        stream = engine.generate_prefilled(
            "r1", prompt_token_ids=list(range(5, 15)), params=SamplingParams(max_tokens=1),
            block_ids=blocks, first_token_id=9)
        async with asyncio.timeout(5):
            outputs = [out async for out in stream]
        assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == [9]
        assert await engine.run(lambda e: e.block_manager.num_free_blocks) == 32
    finally:
        await engine.shutdown()
