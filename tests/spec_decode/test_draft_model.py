"""Draft-model speculation: a perturbed copy of the tiny model drafts (it agrees with the
target often, not always), outputs equal the target's alone, KV rolled back in both pools."""

from __future__ import annotations

import json
import shutil

import pytest
from spec_helpers import (
    assert_no_leaked_blocks,
    decode_handed_off,
    make_engine,
    repetitive_prompts,
    run,
)

from baton.engine import EngineArgs, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def spec_config(draft_dir, k: int = 3) -> dict:
    return {"model": str(draft_dir), "num_speculative_tokens": k}


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_and_seeded_sampling_equal_the_target_alone(tiny_model, draft_dir, plain):
    spec = make_engine(tiny_model, speculative_config=spec_config(draft_dir))
    prompts = repetitive_prompts(3, seed=7)
    assert tokens(run(spec, prompts, GREEDY)) == tokens(run(plain, prompts, GREEDY))
    stats = spec.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=16, ignore_eos=True) for i in range(3)]
    assert tokens(run(spec, prompts, seeded)) == tokens(run(plain, prompts, seeded))
    assert_no_leaked_blocks(spec)


def test_preemption_chunked_prefill_and_prefix_caching_keep_greedy_exact(tiny_model, draft_dir, plain):
    shared = repetitive_prompts(1, seed=8)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][1:]} for p in repetitive_prompts(3, seed=9)]
    tight = make_engine(tiny_model, speculative_config=spec_config(draft_dir), num_gpu_blocks_override=24,
                        max_num_batched_tokens=8)
    assert tokens(run(tight, prompts, GREEDY)) == tokens(run(plain, prompts, GREEDY))
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and stats.spec_num_accepted_tokens > 0
    assert_no_leaked_blocks(tight)


def test_a_decode_engine_given_the_prompts_kv_prefills_its_draft_model_locally(tiny_model, draft_dir, plain):
    """Disaggregation: the prompt's target KV arrives from a prefill engine; the decode engine
    speculates, computing the draft model's KV for the prompt itself."""
    prompt = repetitive_prompts(1, seed=10)[0]
    expected = tokens(run(plain, [prompt], GREEDY))[0]
    decode = make_engine(tiny_model, speculative_config=spec_config(draft_dir))
    assert decode_handed_off(plain, decode, prompt, GREEDY) == expected
    assert decode.stats().spec_num_accepted_tokens > 0
    assert_no_leaked_blocks(decode)
    assert_no_leaked_blocks(plain)


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_model, draft_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(draft_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 256
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size"):
        EngineArgs(model=str(tiny_model), device="cpu",
                   speculative_config={"model": str(other), "num_speculative_tokens": 2}).create_engine_config()
    with pytest.raises(ValueError, match="no config.json"):
        EngineArgs(model=str(tiny_model), device="cpu", speculative_model=str(tmp_path / "missing"),
                   num_speculative_tokens=2).create_engine_config()


def long_prompt(seed: int) -> dict:
    """A repetitive prompt of about 60 tokens: its draft catch-up spans many steps of a
    budget of 8 tokens."""
    pattern = repetitive_prompts(1, seed=seed)[0]["prompt_token_ids"][1:]
    return {"prompt_token_ids": [0] + (pattern * 12)[:60]}


@pytest.mark.parametrize("handed_off", [False, True])
def test_the_draft_catch_up_of_a_long_prompt_stays_within_the_token_budget(tiny_model, draft_dir, plain,
                                                                          handed_off):
    """Each step's target tokens plus the draft model's (its catch-up included) stay within
    `max_num_batched_tokens`: the prompt's draft KV is computed in chunks while the request
    decodes without drafts, then it speculates; outputs equal the target's alone, and for a
    prompt whose target KV was handed off by a prefill engine too."""
    budget = 8
    prompts = [long_prompt(11), long_prompt(12)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = tokens(run(plain, prompts, params))
    spec = make_engine(tiny_model, speculative_config=spec_config(draft_dir), max_num_batched_tokens=budget)
    if handed_off:
        assert decode_handed_off(plain, spec, prompts[0], params) == expected[0]
    else:
        assert tokens(run(spec, prompts, params)) == expected
        seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True) for i in range(2)]
        assert tokens(run(spec, prompts, seeded)) == tokens(run(plain, prompts, seeded))
    draft = spec.runner.draft
    assert draft.num_tokens >= 60  # the prompt's draft KV was computed, not skipped
    assert 0 < draft.max_step_tokens <= budget
    stats = spec.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0  # it speculated once caught up
    assert_no_leaked_blocks(spec)
