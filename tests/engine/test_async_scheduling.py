"""Asynchronous scheduling (`EngineArgs(async_scheduling=True)`): a decode step is launched
before the previous step's tokens are read, with those tokens fed from the device. On the
CPU the steps still run one after another, which is enough to check that the bookkeeping
(placeholders, block slots, prefix cache, finishing, aborts) gives exactly the outputs of the
synchronous engine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from baton.engine import EngineArgs, GuidedDecodingParams, LLMEngine, SamplingParams
from baton.engine.async_scheduling import PLACEHOLDER


def make(tiny_dir, async_scheduling: bool, **kw) -> LLMEngine:
    args = dict(model=str(tiny_dir), max_num_seqs=8, max_model_len=512, async_scheduling=async_scheduling)
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def run(engine: LLMEngine, requests: list[tuple[object, SamplingParams]], prefix: str = "r") -> dict:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"{prefix}{i}", prompt, params)
    finals = {}
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                o = out.outputs[0]
                finals[out.request_id] = (o.token_ids, o.finish_reason, o.text, o.stop_reason)
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0.0  # no leaked blocks
    return finals


MIXED = [
    (f"Tell me {i} things about " * (i % 4 + 1),
     SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=12 + 5 * i, ignore_eos=i % 3 == 0,
                    stop=["e t", "of"] if i in (4, 7) else None, min_tokens=3 if i == 5 else 0))
    for i in range(14)
]


def test_outputs_equal_the_synchronous_engine_and_steps_overlap(tiny_dir):
    want = run(make(tiny_dir, False), MIXED)
    engine = make(tiny_dir, True)
    got = run(engine, MIXED)
    assert got == want
    assert engine.async_steps.num_launched_ahead > 50  # most decode steps were launched ahead


def test_preemption_prefix_cache_and_a_small_pool(tiny_dir):
    shared = "The same long prefix for every request, long enough to fill blocks. " * 3
    reqs = [(shared + f"variant {i}", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) for i in range(6)]
    small = dict(num_gpu_blocks_override=40, block_size=8)
    want = run(make(tiny_dir, False, **small), reqs)
    engine = make(tiny_dir, True, **small)
    got = run(engine, reqs)
    assert got == want
    assert engine.scheduler.num_preemptions > 0
    again = run(engine, reqs, prefix="again")  # prefix-cache hits on blocks registered ahead
    assert [v for _, v in sorted(again.items())] == [v for _, v in sorted(got.items())]


def test_requests_the_host_must_see_each_step_take_the_synchronous_path(tiny_dir):
    reqs = [
        ("a", SamplingParams(temperature=0, max_tokens=10, logprobs=2)),
        ("b", SamplingParams(temperature=0.7, seed=3, max_tokens=10, repetition_penalty=1.3)),
        ("c", SamplingParams(temperature=0.7, seed=4, max_tokens=30, guided_decoding=GuidedDecodingParams(regex="[ab]{5,9}"))),
        ("d", SamplingParams(temperature=0, max_tokens=10, logits_processors=[lambda ids, logits: logits])),
    ]
    want = run(make(tiny_dir, False), reqs)
    engine = make(tiny_dir, True)
    assert run(engine, reqs) == want
    assert engine.async_steps.num_launched_ahead == 0


def test_bad_words_take_the_synchronous_path(tiny_dir):
    # the ban of a word's last token depends on the token before it, which the host reads
    reqs = [(f"Story {i}:", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=["the", "a b"]))
            for i in range(3)]
    want = run(make(tiny_dir, False), reqs)
    engine = make(tiny_dir, True)
    assert run(engine, reqs) == want
    assert engine.async_steps.num_launched_ahead == 0


def test_abort_while_a_step_is_in_flight(tiny_dir):
    engine = make(tiny_dir, True)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"x{i}", f"Story {i}:", params)
    for _ in range(8):
        engine.step()
    assert engine.async_steps.inflight is not None
    (final,) = engine.abort_request("x1")
    assert final.outputs[0].finish_reason == "abort"
    assert PLACEHOLDER not in final.outputs[0].token_ids
    rest = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            rest[out.request_id] = out
    assert set(rest) == {"x0", "x2"}
    assert all(len(o.outputs[0].token_ids) == 50 and PLACEHOLDER not in o.outputs[0].token_ids for o in rest.values())
    assert engine.stats().kv_cache_usage == 0.0


def test_a_new_request_waiting_for_a_free_slot_is_admitted(tiny_dir):
    engine = make(tiny_dir, True, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", "one", params)
    engine.step()
    engine.step()
    engine.add_request("b", "two", params)  # a free slot: the chain yields to the scheduler
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = len(out.outputs[0].token_ids)
    assert got == {"a": 20, "b": 20}


@pytest.mark.parametrize("n", [2])
def test_parallel_samples(tiny_dir, n):
    reqs = [("Pick one:", SamplingParams(n=n, temperature=0.8, seed=11, max_tokens=15, ignore_eos=True))]
    want = run(make(tiny_dir, False), reqs)
    assert run(make(tiny_dir, True), reqs) == want


async def test_async_engine_streams_and_aborts_with_overlapped_steps(tiny_dir):
    from baton.engine import AsyncLLMEngine

    reqs = {f"s{i}": SamplingParams(temperature=0.8, seed=i, max_tokens=25, ignore_eos=True) for i in range(4)}
    results = {}
    for async_scheduling in (False, True):
        eng = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(tiny_dir), num_gpu_blocks_override=128, block_size=4, async_scheduling=async_scheduling))
        try:
            async def one(rid, params, eng=eng):
                text, final = "", None
                async for out in eng.generate(f"Prompt {rid}", params, rid):
                    assert out.outputs[0].text.startswith(text)  # cumulative, never rewritten
                    text, final = out.outputs[0].text, out
                return final.outputs[0].token_ids

            async def aborted(eng=eng):
                stream = eng.generate("abort me", SamplingParams(max_tokens=400, ignore_eos=True), "gone")
                async for out in stream:
                    if len(out.outputs[0].token_ids) >= 5:
                        break
                await stream.aclose()

            outs = await asyncio.gather(*(one(rid, p) for rid, p in reqs.items()), aborted())
            results[async_scheduling] = outs[:-1]
            await eng.run(lambda e: None)
            for _ in range(100):
                if await eng.run(lambda e: e.stats().kv_cache_usage) == 0.0:
                    break
                await asyncio.sleep(0.02)
            assert await eng.run(lambda e: e.stats().kv_cache_usage) == 0.0
        finally:
            await eng.shutdown()
    assert results[True] == results[False]


def test_prefilled_requests_continue_under_async_scheduling(tiny_dir):
    """A decode engine with asynchronous scheduling continues requests whose prompt KV was
    copied in from a prefill engine, exactly as one engine generates them."""
    prompts = [f"Handoff number {i} goes " * (i + 1) for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = run(make(tiny_dir, False), [(p, greedy) for p in prompts])
    prefill = make(tiny_dir, False)
    decode = make(tiny_dir, True)
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
    firsts = {}
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            firsts[out.request_id] = out
    for i in range(len(prompts)):
        out = firsts[f"p{i}"]
        src = prefill.held_blocks(f"p{i}")
        dst = decode.reserve_blocks(len(out.prompt_token_ids))
        decode.kv_cache[dst] = prefill.kv_cache[src]
        prefill.release_held(f"p{i}")
        decode.add_prefilled_request(f"r{i}", out.prompt_token_ids, greedy, dst, out.outputs[0].token_ids[0])
    got = {}
    while decode.has_unfinished_requests():
        for out in decode.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert got == {rid: v[0] for rid, v in want.items()}
    assert decode.stats().kv_cache_usage == 0.0


def test_the_model_length_limit_ends_requests_as_before(tiny_dir):
    reqs = [(f"Long {i} " * 6, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)) for i in range(3)]
    want = run(make(tiny_dir, False, max_model_len=96), reqs)
    assert all(v[1] == "length" for v in want.values())
    assert run(make(tiny_dir, True, max_model_len=96), reqs) == want


def test_default_is_on_for_cuda_only(tiny_dir):
    """Unset, asynchronous scheduling is on where the device runs apart from the host (CUDA)."""
    assert EngineArgs(model=str(tiny_dir), device="cpu").create_engine_config().async_scheduling is False
    assert EngineArgs(model=str(tiny_dir), device="cpu", async_scheduling=True).create_engine_config().async_scheduling
    if torch.cuda.is_available():
        assert EngineArgs(model=str(tiny_dir), device="cuda").create_engine_config().async_scheduling is True
