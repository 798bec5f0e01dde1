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


def _drain(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def _first_streamed(engine, rid, prompt, params):
    """What a colocated engine streams for a request's first token."""
    engine.add_request(rid, prompt, params)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = out.outputs[0]
    return first


@pytest.mark.parametrize("stop", [[], ["\x00\x00\x00\x00"]], ids=["no-stop", "stop-string"])
def test_a_hold_kv_request_ends_after_its_first_token_showing_what_decode_shows(engine, stop):
    """The prefill engine stops a handoff after one token, keeps its blocks, and shows the
    token's text as a running request does (the last len(stop) - 1 characters held back):
    what a colocated engine streams for that token, and a prefix of the decode engine's."""
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop)
    prompt = {"prompt_token_ids": list(range(40, 60))}
    engine.add_request("h", prompt, greedy, hold_kv=True)
    handoff = _drain(engine)["h"].outputs[0]
    assert handoff.finish_reason == "handoff" and len(handoff.token_ids) == 1
    held = engine.held_blocks("h")
    assert held
    reserved = engine.reserve_blocks(20)
    engine.kv_cache[reserved] = engine.kv_cache[held]
    engine.release_held("h")
    engine.add_prefilled_request("d", prompt["prompt_token_ids"], greedy, reserved, handoff.token_ids[0])
    decoded = engine.step()[0].outputs[0]  # admitted, then one decode step
    assert decoded.token_ids[0] == handoff.token_ids[0] and decoded.text.startswith(handoff.text)
    engine.abort_request("d")
    colocated = _first_streamed(engine, "c", prompt, greedy)
    assert colocated.token_ids == handoff.token_ids and colocated.text == handoff.text
    if stop:
        full = engine.tokenizer.decode(handoff.token_ids)
        assert handoff.text == full[: max(0, len(full) - 3)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_hold_kv_request_that_ends_on_its_first_token_says_so(engine):
    """max_tokens=1: the output really ends there, so the reason is "length" and the text is
    final (nothing held back), as a colocated engine reports it."""
    params = SamplingParams(temperature=0, max_tokens=1, stop=["\x00\x00\x00\x00"])
    prompt = {"prompt_token_ids": list(range(40, 60))}
    engine.add_request("h1", prompt, params, hold_kv=True)
    out = _drain(engine)["h1"].outputs[0]
    assert out.finish_reason == "length" and engine.held_blocks("h1")
    engine.release_held("h1")
    engine.add_request("c1", prompt, params)
    colocated = _drain(engine)["c1"].outputs[0]
    assert (out.token_ids, out.text) == (colocated.token_ids, colocated.text)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "seeded"])
def test_a_failover_handoff_prefills_the_streamed_tokens_and_continues_the_same_output(engine, sampling):
    """A decode failover through a prefill worker: prompt + the 7 tokens already streamed are
    prefilled with `hold_kv`, the blocks handed over, and the decode side admits them as
    resumed outputs: tokens and text are those of an undisturbed run, the KV all comes back."""
    params = SamplingParams(max_tokens=16, ignore_eos=True, **sampling)
    prompt = list(range(40, 58))
    engine.add_request("whole", {"prompt_token_ids": prompt}, params)
    whole = _drain(engine)["whole"].outputs[0]
    streamed = whole.token_ids[:7]
    engine.add_request("p", {"prompt_token_ids": prompt}, params, hold_kv=True, resume_token_ids=streamed)
    prefilled = _drain(engine)["p"].outputs[0]
    assert prefilled.finish_reason == "handoff" and prefilled.token_ids == whole.token_ids[:8]
    held = engine.held_blocks("p")
    reserved = engine.reserve_blocks(len(prompt) + len(streamed))
    assert len(held) == len(reserved)
    engine.kv_cache[reserved] = engine.kv_cache[held]
    engine.release_held("p")
    engine.add_prefilled_request("d", prompt, params, reserved, prefilled.token_ids[-1], resume_token_ids=streamed)
    resumed = _drain(engine)["d"].outputs[0]
    assert (resumed.token_ids, resumed.text) == (whole.token_ids, whole.text)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(ValueError, match="7 resumed"):
        engine.add_prefilled_request("e", prompt, params, engine.reserve_blocks(len(prompt)), 9,
                                     resume_token_ids=streamed)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_errors_are_typed(engine):
    from baton.engine.errors import DuplicateRequestError, InvalidRequestError, NoCapacityError

    engine.add_request("dup", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1))
    with pytest.raises(DuplicateRequestError, match="already in use"):
        engine.add_request("dup", {"prompt_token_ids": [5, 6, 7]})
    _drain(engine)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []})
    with pytest.raises(InvalidRequestError, match="integers"):
        engine.add_request("big", {"prompt_token_ids": [10**9]})
    taken = engine.reserve_blocks(4 * (engine.block_manager.num_free_blocks - 1))
    with pytest.raises(NoCapacityError, match="free"):
        engine.reserve_blocks(8)
    engine.release_blocks(taken)
    # vLLM-style callers that catch ValueError keep working.
    assert issubclass(DuplicateRequestError, ValueError) and issubclass(NoCapacityError, ValueError)


def test_the_kv_pool_accessor_is_the_tensor_a_handoff_reads(kv_tiny_dir):
    from baton.kvtransfer.pool import EnginePool

    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(kv_tiny_dir), num_gpu_blocks_override=32, block_size=4, device="cpu"))
    try:
        pool = EnginePool(engine)
        assert pool.kv is engine.kv_cache is engine.engine.kv_cache
        assert pool.kv.shape[0] == 32 and pool.layout.block_size == 4
    finally:
        asyncio.run(engine.shutdown())
