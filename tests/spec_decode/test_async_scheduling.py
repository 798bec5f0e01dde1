"""Speculative decoding with asynchronous scheduling (forced on here, on the CPU): steps that
verify drafts run synchronously, draft-free decode steps are launched ahead while the
load-adaptive rule drafts nothing (large batches). Outputs equal synchronous speculation and
no speculation, token for token."""

from __future__ import annotations

import pytest
import torch
from spec_helpers import (
    NGRAM,
    assert_no_leaked_blocks,
    make_engine,
    repetitive_prompts,
    run,
)

from baton.engine import EngineArgs, SamplingParams

# Drafting off from 4 decoding sequences, halved at 2 and 3, full k for one: six requests of
# different lengths start as a chain of launched-ahead steps and end speculating.
ADAPTIVE = dict(NGRAM, shorten_by_batch_size=2, disable_by_batch_size=4)


def greedy(i: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=8 + 8 * i, ignore_eos=True)


def outputs(finals) -> list[list[tuple]]:
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in f.outputs] for f in finals]


@pytest.fixture(scope="module")
def sync_spec(tiny_model):
    return make_engine(tiny_model, speculative_config=ADAPTIVE)


def test_greedy_equals_synchronous_speculation_and_no_speculation(tiny_model, plain, sync_spec):
    prompts = repetitive_prompts(6, seed=20)
    params = [greedy(i) for i in range(6)]
    engine = make_engine(tiny_model, speculative_config=ADAPTIVE, async_scheduling=True)
    got = outputs(run(engine, prompts, params))
    assert got == outputs(run(sync_spec, prompts, params)) == outputs(run(plain, prompts, params))
    stats = engine.stats()
    assert engine.async_steps.num_launched_ahead > 0  # the large batch ran as a chain
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # the small one speculated
    assert_no_leaked_blocks(engine)


def test_seeded_sampling_stop_strings_and_n_are_exact_and_reproducible(tiny_model, plain, sync_spec):
    prompts = repetitive_prompts(4, seed=21)
    stop = outputs(run(plain, prompts[:1], greedy(3)))[0][0][1][6:9]
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=30, ignore_eos=True)]
    params += [SamplingParams(temperature=0.5, seed=i, max_tokens=10 + 25 * i, ignore_eos=True, top_p=0.9)
               for i in (1, 2)]
    engine = make_engine(tiny_model, speculative_config=ADAPTIVE, async_scheduling=True)
    got = outputs(run(engine, prompts, params))
    assert got[0][0][2] == "stop" and got[0][0][3] == stop
    assert got == outputs(run(sync_spec, prompts, params)) == outputs(run(plain, prompts, params))
    assert got == outputs(run(engine, prompts, params))  # the same seeds draw the same tokens again
    # Sampled rows were verified against drafts (acceptance: the greedy tests).
    assert engine.async_steps.num_launched_ahead > 0 and engine.stats().spec_num_drafts > 0
    assert_no_leaked_blocks(engine)


def test_preemption_and_prefix_caching_keep_greedy_exact(tiny_model, plain):
    # 40 blocks of 4 tokens cannot hold five sequences of 40 to 90 tokens: some are
    # preempted, and their shared prefix is found in the prefix cache.
    shared = repetitive_prompts(1, seed=22)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][1:]} for p in repetitive_prompts(5, seed=23)]
    params = [greedy(i) for i in range(5)]
    tight = make_engine(tiny_model, speculative_config=ADAPTIVE, async_scheduling=True,
                        num_gpu_blocks_override=40, max_num_batched_tokens=16)
    assert outputs(run(tight, prompts, params)) == outputs(run(plain, prompts, params))
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert tight.async_steps.num_launched_ahead > 0 and stats.spec_num_accepted_tokens > 0
    assert_no_leaked_blocks(tight)


def test_draft_model_speculation_catches_up_after_a_chain(tiny_model, plain, draft_dir):
    """The draft model drafts nothing during the chain; its first verify step after it
    computes the draft KV of every token the chain emitted."""
    config = {"model": str(draft_dir), "num_speculative_tokens": 3, "shorten_by_batch_size": 2,
              "disable_by_batch_size": 4}
    prompts = repetitive_prompts(5, seed=24)
    params = [greedy(i) for i in range(5)]
    engine = make_engine(tiny_model, speculative_config=config, async_scheduling=True)
    assert outputs(run(engine, prompts, params)) == outputs(run(plain, prompts, params))
    assert engine.async_steps.num_launched_ahead > 0 and engine.stats().spec_num_accepted_tokens > 0
    assert_no_leaked_blocks(engine)


def test_a_step_before_drafting_is_never_launched_ahead(tiny_model, plain):
    """Below `disable_by_batch_size` every step may draft, so none is launched before the
    previous step's tokens are read."""
    prompts = repetitive_prompts(3, seed=25)
    engine = make_engine(tiny_model, speculative_config=NGRAM, async_scheduling=True)
    params = [greedy(i) for i in range(3)]
    assert outputs(run(engine, prompts, params)) == outputs(run(plain, prompts, params))
    assert engine.async_steps.num_launched_ahead == 0 and engine.stats().spec_num_drafts > 0


def test_speculation_is_accepted_with_async_scheduling_and_cuda_turns_it_on(tiny_model):
    ngram = {"speculative_config": NGRAM}
    assert EngineArgs(model=str(tiny_model), device="cpu", async_scheduling=True,
                      **ngram).create_engine_config().async_scheduling
    assert not EngineArgs(model=str(tiny_model), device="cpu", **ngram).create_engine_config().async_scheduling
    if torch.cuda.is_available():
        assert EngineArgs(model=str(tiny_model), device="cuda", **ngram).create_engine_config().async_scheduling
