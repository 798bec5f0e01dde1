"""Speculative decoding at tensor_parallel_size 2 (two real processes over gloo on loopback):
rank 0 drafts (n-gram lookup, or the draft model run whole on rank 0), every rank runs the
verify forward over its shard; the tokens equal TP 1 without speculation."""

from __future__ import annotations

from spec_helpers import (
    NGRAM,
    assert_no_leaked_blocks,
    decode_handed_off,
    make_engine,
    repetitive_prompts,
    run,
)

from baton.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_ngram_speculation_at_tp2_equals_tp1_without_it(tiny_model, plain):
    # 40 blocks of 4 tokens and 16-token steps: prompts are chunked, sequences preempted,
    # the shared prefix found in the prefix cache; rejected drafts roll back on every rank.
    shared = repetitive_prompts(1, seed=30)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][1:]} for p in repetitive_prompts(4, seed=31)]
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=16, ignore_eos=True) for i in range(4)]
    engine = make_engine(tiny_model, speculative_config=NGRAM, tensor_parallel_size=2,
                         num_gpu_blocks_override=40, max_num_batched_tokens=16)
    try:
        assert engine.runner.kv.shape[-2] == 1  # rank 0 holds one of the two KV heads
        assert tokens(run(engine, prompts, GREEDY)) == tokens(run(plain, prompts, GREEDY))
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
        assert tokens(run(engine, prompts, seeded)) == tokens(run(plain, prompts, seeded))
        assert_no_leaked_blocks(engine)
    finally:
        engine.runner.close()


def test_draft_model_at_tp2_with_async_scheduling_equals_tp1_without_it(tiny_model, plain, draft_dir):
    """The draft model runs whole on rank 0; large batches chain launched-ahead decode steps
    across the ranks, small ones verify drafts. As a decode engine given a prompt's KV by a
    TP 1 prefill engine, it spreads that KV to the ranks and computes the draft's on rank 0."""
    config = {"model": str(draft_dir), "num_speculative_tokens": 3, "shorten_by_batch_size": 2,
              "disable_by_batch_size": 4}
    prompts = repetitive_prompts(5, seed=32)
    params = [SamplingParams(temperature=0, max_tokens=8 + 8 * i, ignore_eos=True) for i in range(5)]
    engine = make_engine(tiny_model, speculative_config=config, tensor_parallel_size=2, async_scheduling=True)
    try:
        assert engine.runner.draft.kv.shape[-2] == 2  # the draft's pool: every KV head, on rank 0
        assert tokens(run(engine, prompts, params)) == tokens(run(plain, prompts, params))
        assert engine.async_steps.num_launched_ahead > 0 and engine.stats().spec_num_accepted_tokens > 0
        assert_no_leaked_blocks(engine)

        prompt = repetitive_prompts(1, seed=33)[0]
        expected = tokens(run(plain, [prompt], GREEDY))[0]
        accepted = engine.stats().spec_num_accepted_tokens
        assert decode_handed_off(plain, engine, prompt, GREEDY) == expected
        assert engine.stats().spec_num_accepted_tokens > accepted
        assert_no_leaked_blocks(engine)
    finally:
        engine.runner.close()
