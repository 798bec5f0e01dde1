"""AsyncLLMEngine: streaming, abort, bad input, many requests at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from baton.engine import AsyncLLMEngine, EngineArgs, SamplingParams


@pytest.fixture
async def engine(tiny_dir):
    eng = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=64, block_size=4)
    )
    yield eng
    await eng.shutdown()


def free_blocks(engine) -> int:
    return engine.engine.block_manager.num_free_blocks


async def test_streamed_deltas_concatenate_to_the_final_text(engine):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)
    seen = ""
    last = None
    async for out in engine.generate("Hello", params, "r1"):
        text = out.outputs[0].text
        assert text.startswith(seen)  # cumulative and never rewritten
        seen = text
        last = out
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert seen == last.outputs[0].text and len(last.outputs[0].token_ids) == 30


async def test_closing_the_stream_aborts_and_frees_blocks(engine):
    start = free_blocks(engine)
    stream = engine.generate({"prompt_token_ids": list(range(4, 40))}, SamplingParams(max_tokens=500, ignore_eos=True), "r2")
    async for out in stream:
        if len(out.outputs[0].token_ids) >= 3:
            break
    await stream.aclose()
    await engine.run(lambda e: None)  # the abort is applied before this command returns
    for _ in range(50):
        if free_blocks(engine) == start:
            break
        await asyncio.sleep(0.01)
    assert free_blocks(engine) == start
    assert not engine.engine.has_unfinished_requests()


async def test_abort_by_id_ends_the_stream(engine):
    outs = []

    async def consume():
        async for out in engine.generate("Hi", SamplingParams(max_tokens=1000, ignore_eos=True), "r3"):
            outs.append(out)

    task = asyncio.create_task(consume())
    while not outs:
        await asyncio.sleep(0.01)
    await engine.abort("r3")
    await asyncio.wait_for(task, 5)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


async def test_bad_prompt_raises_before_any_output(engine):
    with pytest.raises(ValueError, match="empty"):
        async for _ in engine.generate({"prompt_token_ids": []}, SamplingParams(), "bad"):
            pass
    # The id is free again and the engine still serves.
    async for out in engine.generate("ok", SamplingParams(max_tokens=2), "bad"):
        pass
    assert out.finished


async def test_many_concurrent_requests_all_finish_and_free_everything(engine):
    start = free_blocks(engine)

    async def one(i):
        async for out in engine.generate(f"request {i}", SamplingParams(max_tokens=5 + i % 7, ignore_eos=True), f"c{i}"):
            pass
        return out

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert [len(r.outputs[0].token_ids) for r in results] == [5 + i % 7 for i in range(40)]
    assert free_blocks(engine) == start


async def test_a_failing_logits_processor_fails_only_its_request(engine):
    def broken(ids, row):
        raise ValueError("processor exploded")

    async def run(params, rid):
        async for out in engine.generate("x", params, rid):
            pass
        return out

    bad, good = await asyncio.gather(
        run(SamplingParams(max_tokens=5, logits_processors=[broken]), "p-bad"),
        run(SamplingParams(max_tokens=5, ignore_eos=True), "p-good"),
    )
    assert bad.finished and bad.outputs[0].finish_reason == "error" and "processor exploded" in bad.error
    assert good.outputs[0].finish_reason == "length"


# Found by the serving path (a router cancelling a Decode call): a consumer cancelled while
# its generate_prefilled add is still queued must not leak the blocks it handed over.
async def test_cancel_while_the_add_is_queued_frees_the_blocks(engine):
    ids = list(range(4, 30))
    total = engine.engine.block_manager.num_blocks
    blocks = await engine.run(lambda e: e.reserve_blocks(len(ids)))
    # Keep the engine thread busy so the add below waits in the command queue.
    busy = asyncio.ensure_future(engine.run(lambda e: time.sleep(0.3)))
    stream = engine.generate_prefilled(
        "p1", prompt_token_ids=ids, params=SamplingParams(max_tokens=50, ignore_eos=True),
        block_ids=blocks, first_token_id=7)
    consumer = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await busy
    for _ in range(100):
        if await engine.run(lambda e: e.block_manager.num_free_blocks) == total:
            break
        await asyncio.sleep(0.02)
    assert await engine.run(lambda e: e.block_manager.num_free_blocks) == total
    assert "p1" not in engine.engine.requests


async def test_a_release_whose_caller_is_cancelled_still_runs(engine):
    """A prefill handler that the router cancels while it releases the KV it held for the
    handoff: the release, already queued, must not be dropped with the handler."""
    from baton.kvtransfer.pool import EnginePool

    pool = EnginePool(engine)
    total = await pool.num_free_blocks()
    async for _ in engine.generate({"prompt_token_ids": list(range(4, 30))}, SamplingParams(max_tokens=1), "h1",
                                   hold_kv=True):
        pass
    assert await pool.held_blocks("h1")
    busy = asyncio.ensure_future(engine.run(lambda e: time.sleep(0.3)))  # the release waits in the queue
    await asyncio.sleep(0.05)
    releasing = asyncio.ensure_future(pool.release_held("h1"))
    await asyncio.sleep(0.01)
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing
    await busy
    assert await pool.held_blocks("h1") is None
    assert await pool.num_free_blocks() == total


async def test_a_reservation_whose_caller_is_cancelled_gives_its_blocks_back(engine):
    """Cancelled after the engine made the reservation but before the caller saw it."""
    from baton.kvtransfer.pool import EnginePool

    pool = EnginePool(engine)
    total = await pool.num_free_blocks()
    loop = asyncio.get_running_loop()
    gate, queued = threading.Event(), threading.Event()
    busy = asyncio.ensure_future(engine.run(lambda e: gate.wait(30)))  # holds the engine thread
    await asyncio.sleep(0.05)
    reserving = asyncio.ensure_future(pool.reserve(40))
    await asyncio.sleep(0.05)  # its reservation is queued on the engine thread
    # Queued behind the reservation: the cancel reaches the caller just after its result.
    cancel = asyncio.ensure_future(engine.run(
        lambda e: (loop.call_soon_threadsafe(reserving.cancel), queued.set())))
    await asyncio.sleep(0.05)
    gate.set()
    # The loop waits (blocked) until the engine thread has queued both the reservation's
    # result and the cancel, so the caller cannot see its result first, however loaded.
    assert queued.wait(30)
    await busy
    await cancel
    with pytest.raises(asyncio.CancelledError):
        await reserving
    for _ in range(100):
        if await pool.num_free_blocks() == total:
            break
        await asyncio.sleep(0.02)
    assert await pool.num_free_blocks() == total
