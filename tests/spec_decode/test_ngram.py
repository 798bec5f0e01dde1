"""N-gram speculation through the engine: same tokens as without it, KV rolled back."""

from __future__ import annotations

import json

import pytest
from spec_helpers import NGRAM, assert_no_leaked_blocks, make_engine, repetitive_prompts, run

from baton.engine import EngineArgs, SamplingParams
from baton.engine.spec_decode.config import parse_speculative
from baton.engine.spec_decode.ngram import ngram_draft

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def spec(tiny_model):
    return make_engine(tiny_model, speculative_config=NGRAM)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_drafts_continue_the_latest_match_and_copy_themselves_past_the_end():
    assert ngram_draft([5, 1, 2, 3, 9, 1, 2], k=3, min_n=1, max_n=3) == [3, 9, 1]
    # A loop of period 2 drafts a full k, not just the 1 token left after the match.
    assert ngram_draft([7, 8, 7, 8, 7], k=5, min_n=1, max_n=2) == [8, 7, 8, 7, 8]
    # The longest n-gram wins: the 2-gram (1, 2) points elsewhere than the 1-gram (2).
    assert ngram_draft([1, 2, 4, 2, 6, 1, 2], k=1, min_n=1, max_n=2) == [4]
    assert ngram_draft([1, 2, 3, 4], k=3, min_n=1, max_n=3) == []
    assert ngram_draft([1, 2, 1, 2], k=2, min_n=3, max_n=3) == []


def test_greedy_with_ngram_speculation_equals_greedy_without(plain, spec):
    prompts = repetitive_prompts(4)
    before = spec.stats()
    assert tokens(run(spec, prompts, GREEDY)) == tokens(run(plain, prompts, GREEDY))
    stats = spec.stats()
    drafted = stats.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = stats.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert 0 < accepted < drafted  # both paths ran: drafts accepted and drafts rejected
    assert_no_leaked_blocks(spec)


def test_seeded_sampling_and_penalties_emit_the_same_tokens_with_and_without_speculation(plain, spec):
    # Each drafted row sees the drafts before it: penalties count them, min_tokens too.
    prompts = repetitive_prompts(3, seed=1)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=24, ignore_eos=True, top_p=0.9)
              for t, s in ((0.3, 1), (0.7, 2))]
    params.append(SamplingParams(temperature=0.8, seed=3, max_tokens=24, repetition_penalty=1.3,
                                 presence_penalty=0.4, frequency_penalty=0.2, min_tokens=6))
    with_spec = tokens(run(spec, prompts, params))
    assert with_spec == tokens(run(plain, prompts, params))
    assert with_spec == tokens(run(spec, prompts[::-1], params[::-1]))[::-1]  # batch order does not matter


def test_stop_strings_logprobs_and_n_compose(plain, spec):
    prompts = repetitive_prompts(2, seed=2)
    full = run(plain, prompts, GREEDY)
    stop = full[0].outputs[0].text[10:14]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2, stop=[stop], n=2)
    a, b = run(spec, prompts, params), run(plain, prompts, params)
    for x, y in zip(a, b):
        for ox, oy in zip(x.outputs, y.outputs):
            assert ox.token_ids == oy.token_ids and ox.text == oy.text and ox.finish_reason == oy.finish_reason
            assert [set(e) for e in ox.logprobs] == [set(e) for e in oy.logprobs]
            for ex, ey in zip(ox.logprobs, oy.logprobs):
                assert all(abs(ex[t] - ey[t]) < 1e-3 for t in ex)
    assert a[0].outputs[0].finish_reason == "stop" and a[0].outputs[0].stop_reason == stop
    assert_no_leaked_blocks(spec)


def test_chunked_prefill_prefix_caching_and_preemption_keep_greedy_exact(tiny_model, plain):
    # Shared prefixes hit the prefix cache; 8-token steps chunk every prompt; 40 blocks of 4
    # tokens cannot hold four sequences of 50 to 100 tokens, so sequences are preempted.
    shared = repetitive_prompts(1, seed=3)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][1:]} for p in repetitive_prompts(4, seed=4)]
    tight = make_engine(tiny_model, speculative_config=NGRAM, num_gpu_blocks_override=40, max_num_batched_tokens=8)
    assert tokens(run(tight, prompts, GREEDY)) == tokens(run(plain, prompts, GREEDY))
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert_no_leaked_blocks(tight)


def test_aborted_requests_leave_no_blocks(spec):
    before = spec.stats().spec_num_drafts
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(repetitive_prompts(4, seed=5)):
        spec.add_request(f"abort-{i}", prompt, long)
    for _ in range(60):  # until some drafts were verified (and their blocks allocated)
        spec.step()
        if spec.stats().spec_num_drafts > before:
            break
    assert spec.stats().spec_num_drafts > before and spec.has_unfinished_requests()
    spec.abort_request([f"abort-{i}" for i in range(4)])
    assert_no_leaked_blocks(spec)


def test_speculation_switches_off_when_the_batch_is_large(tiny_model):
    config = dict(NGRAM, shorten_by_batch_size=2, disable_by_batch_size=3)
    engine = make_engine(tiny_model, speculative_config=config)
    prompts = repetitive_prompts(3, seed=6)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"big-{i}", prompt, GREEDY)
    engine.step()  # prefill all three
    for _ in range(5):
        engine.step()
        assert engine.stats().spec_num_drafts == 0  # three decoding: off
    engine.abort_request(["big-1", "big-2"])
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    # One decoding sequence drafts the full k = 4 again.
    assert stats.spec_num_draft_tokens > 2 * stats.spec_num_drafts
    assert parse_speculative(config).num_drafts(2) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_config={"method": "ngram"}), "num_speculative_tokens must be"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}), "unknown keys"),
    (dict(speculative_config={"method": "eagle", "num_speculative_tokens": 2}), "method must be"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
                              "prompt_lookup_max": 2}), "exceeds prompt_lookup_max"),
    (dict(speculative_config="{not json"), "not JSON"),
    (dict(num_speculative_tokens=3), "needs speculative_model"),
])
def test_bad_speculative_settings_are_refused_at_engine_args(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(tiny_model), device="cpu", **kwargs).create_engine_config()


def test_vllm_and_seed_spellings_agree(tiny_model):
    as_json = parse_speculative('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    assert parse_speculative(None, "[ngram]", 3) == parse_speculative({"method": "ngram", "num_speculative_tokens": 3})
    assert as_json.prompt_lookup_min == as_json.prompt_lookup_max == 4  # one bound given sets both
    config = EngineArgs(model=str(tiny_model), device="cpu", speculative_model="[ngram]",
                        num_speculative_tokens=3).create_engine_config()
    assert config.speculative.method == "ngram" and not config.async_scheduling


def test_baton_generate_speculates_and_prints_the_same_tokens(tiny_model, capsys):
    from baton.engine.offline import main

    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    common = [prompt, "--model", str(tiny_model), "--device", "cpu", "--json", "--max-tokens", "16",
              "--ignore-eos", "--num-gpu-blocks-override", "64"]
    outputs = []
    for extra in ([], ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']):
        assert main(common + extra) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 16
    assert main(common + ["--speculative-config", '{"method": "ngram"}']) == 2
    assert "num_speculative_tokens" in capsys.readouterr().err
