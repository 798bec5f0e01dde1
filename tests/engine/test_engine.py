"""Engine behaviour through the public API: stops, limits, seeds, n, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from baton.engine import LLM, EngineArgs, LLMEngine, SamplingParams

PROMPT = {"prompt_token_ids": [0, 40, 41, 42, 43]}


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=128, block_size=4, max_model_len=64)


def greedy(llm, n=20, prompt=PROMPT):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0]


def test_stop_string_straddling_tokens_is_found_and_excluded(llm):
    full = greedy(llm)
    text = full.text
    # A stop string that starts inside one token's text and ends inside a later one.
    pieces = [llm.get_tokenizer().decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start : start + 3]
    assert len(pieces[1]) >= 1 and len(stop) == 3
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    kept = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == text[: text.find(stop) + 3]


def test_stop_token_ids_end_the_request_and_min_tokens_delays_it(llm):
    full = greedy(llm)
    stop_id = full.token_ids[2]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:3]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    later = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=5)
    )[0].outputs[0]
    assert len(later.token_ids) > 5 or later.finish_reason == "length"
    assert stop_id not in later.token_ids[:4]


def test_max_tokens_and_max_model_len_end_with_length(llm):
    assert greedy(llm, n=7).finish_reason == "length" and len(greedy(llm, n=7).token_ids) == 7
    out = greedy(llm, n=500)  # max_model_len is 64
    assert out.finish_reason == "length" and len(PROMPT["prompt_token_ids"]) + len(out.token_ids) == 64


def test_prompt_longer_than_max_model_len_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="maximum context length is 64"):
        llm.generate([{"prompt_token_ids": [5] * 80}], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [10**6]}], SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    a = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    b = llm.generate([PROMPT, PROMPT], [params, SamplingParams(temperature=1.0, max_tokens=16)])[0].outputs[0].token_ids
    c = llm.generate([PROMPT], params.clone(seed=8))[0].outputs[0].token_ids
    assert a == b and a != c


def test_top_k_one_equals_greedy(llm):
    sampled = llm.generate([PROMPT], SamplingParams(temperature=1.3, top_k=1, max_tokens=20, ignore_eos=True))
    assert sampled[0].outputs[0].token_ids == greedy(llm).token_ids


def test_n_returns_n_outputs_that_share_the_prompt(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 8 for o in out.outputs)


def test_text_prompt_uses_the_tokenizer_with_bos(llm):
    out = llm.generate("Hello, world", SamplingParams(max_tokens=2))[0]
    tok = llm.get_tokenizer()
    assert out.prompt == "Hello, world"
    assert out.prompt_token_ids == tok.encode("Hello, world") and out.prompt_token_ids[0] == 0


def test_request_metrics_are_ordered(llm):
    m = llm.generate([PROMPT], SamplingParams(max_tokens=3))[0].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_in_queue >= 0


def test_request_metrics_account_scheduling_forward_and_token_times(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2))[0]
    m = out.metrics
    assert m.num_token_steps == 6  # a step gives both outputs their token: counted once
    assert m.time_to_first_token == pytest.approx(m.first_token_time - m.arrival_time)
    assert m.time_per_output_token == pytest.approx((m.last_token_time - m.first_token_time) / 5)
    assert m.time_per_output_token > 0
    assert 0 < m.scheduler_time and 0 < m.model_forward_time
    # Both are parts of the request's life: they cannot exceed the time it took.
    assert m.scheduler_time + m.model_forward_time <= m.finished_time - m.arrival_time
    one = llm.generate([PROMPT], SamplingParams(max_tokens=1))[0].metrics
    assert one.time_to_first_token > 0 and one.time_per_output_token is None


def test_duplicate_request_id_is_rejected(llm):
    engine = llm.engine
    engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def test_priority_orders_waiting_requests(tiny_dir):
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=64, max_num_seqs=1)
    )
    engine.add_request("low", PROMPT, SamplingParams(max_tokens=2), priority=5)
    engine.add_request("high", PROMPT, SamplingParams(max_tokens=2), priority=0)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["high", "low"]


def test_unsupported_architecture_is_named(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported"):
        LLM(model=str(tmp_path / "m"), device="cpu", num_gpu_blocks_override=8)


def test_sharded_checkpoint_loads(tmp_path, hf_models, hf):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_models["mistral"])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_models["mistral"] / name, tmp_path / name)
    assert (tmp_path / "model.safetensors.index.json").exists()
    llm = LLM(model=str(tmp_path), device="cpu", num_gpu_blocks_override=32)
    got = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    assert got == hf.greedy(hf_models["mistral"], PROMPT["prompt_token_ids"], 10)


def test_unknown_engine_argument_is_rejected(tiny_dir):
    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM(model=str(tiny_dir), not_a_flag=1)


def test_a_pool_smaller_than_max_model_len_caps_generation_instead_of_hanging(tiny_dir):
    # 6 blocks of 4 tokens: one sequence can never grow past 24 tokens.
    small = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=6, block_size=4, max_model_len=512)
    assert small.engine.max_model_len == 24
    outs = small.generate([PROMPT, PROMPT], SamplingParams(max_tokens=100, ignore_eos=True))
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 24 - 5 for o in outs)
    with pytest.raises(ValueError, match="maximum context length is 24"):
        small.generate([{"prompt_token_ids": [5] * 30}], SamplingParams())


def test_sliding_window_models_are_capped_at_the_window(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], sliding_window=32)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(tmp_path / "m"), device="cpu", num_gpu_blocks_override=16)
    assert llm.engine.max_model_len == 32
    with pytest.raises(ValueError, match="sliding_window"):
        LLM(model=str(tmp_path / "m"), device="cpu", num_gpu_blocks_override=16, max_model_len=64)
    config["use_sliding_window"] = False  # Qwen2 style: the window is off
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert LLM(model=str(tmp_path / "m"), device="cpu", num_gpu_blocks_override=300).engine.max_model_len == 4096


def test_garbage_in_unused_kv_slots_never_reaches_the_output(tiny_dir):
    """The CPU pool is uninitialised memory: poison it and outputs must not change."""
    def run(poison: bool) -> list[list[int]]:
        llm = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=32, block_size=4)
        if poison:
            llm.engine.runner.kv.fill_(float("nan"))
        prompts = [PROMPT, {"prompt_token_ids": [0, 9, 8, 7, 6, 5, 4]}, {"prompt_token_ids": [0, 11]}]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs]

    assert run(poison=True) == run(poison=False)


def _run(engine, rid, params, resume=None):
    engine.add_request(rid, PROMPT, params, resume_token_ids=resume)
    last = None
    while engine.has_unfinished_requests():
        last = next((o for o in engine.step() if o.request_id == rid), last)
    return last.outputs[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=7, max_tokens=16, ignore_eos=True, presence_penalty=0.5, logprobs=1),
], ids=["greedy", "seeded-penalised"])
def test_a_resumed_request_continues_as_the_undisturbed_one(llm, params):
    """The router's failover: a request resumed from its first k streamed tokens draws what
    the original run drew after them (seed steps and penalties count the resumed tokens) and
    reports the whole output, text included."""
    engine = llm.engine
    full = _run(engine, "whole", params)
    free = engine.block_manager.num_free_blocks
    for k in (1, 6):
        resumed = _run(engine, f"resumed-{k}", params, full.token_ids[:k])
        assert resumed.token_ids == full.token_ids
        assert resumed.text == full.text
        if params.logprobs is not None:
            assert [set(e) for e in resumed.logprobs[k:]] == [set(e) for e in full.logprobs[k:]]
    assert engine.block_manager.num_free_blocks == free


def test_a_resumed_request_that_used_up_max_tokens_is_refused(llm):
    with pytest.raises(ValueError, match="max_tokens=3"):
        llm.engine.add_request("over", PROMPT, SamplingParams(max_tokens=3), resume_token_ids=[40, 41, 42])


def test_best_of_returns_the_n_candidates_with_the_highest_cumulative_logprob(llm):
    sampled = dict(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    every = llm.generate([PROMPT], SamplingParams(n=5, logprobs=0, **sampled))[0].outputs
    best = llm.generate([PROMPT], SamplingParams(n=2, best_of=5, **sampled))[0].outputs
    ranked = sorted(every, key=lambda o: o.cumulative_logprob, reverse=True)
    assert len({tuple(o.token_ids) for o in every}) > 2  # the candidates differ
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best] == [0, 1]
    assert best[0].logprobs is None and best[0].cumulative_logprob is None  # not asked for
    shown = llm.generate([PROMPT], SamplingParams(n=1, best_of=5, logprobs=1, **sampled))[0].outputs
    assert shown[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)
    assert len(shown[0].logprobs) == 8


def test_best_of_below_n_is_refused():
    with pytest.raises(ValueError, match="best_of must be an integer >= n"):
        SamplingParams(n=3, best_of=2)


def test_a_best_of_request_streams_only_its_final_output(tiny_dir):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=64,
                                                   max_model_len=64))
    engine.add_request("b", PROMPT, SamplingParams(n=1, best_of=3, max_tokens=5, temperature=1.0, seed=1))
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert len(seen) == 1 and seen[0].finished and len(seen[0].outputs) == 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_detokenize_false_returns_token_ids_without_text(llm):
    text = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    ids = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                detokenize=False))[0].outputs[0]
    assert ids.token_ids == text.token_ids and text.text and ids.text == ""
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)


def test_prompt_logprobs_survive_a_preemption(tiny_dir):
    """A request preempted after its prefill computes its prompt again: its prompt logprobs
    are not appended twice."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_dir), device="cpu", block_size=4,
                                                   num_gpu_blocks_override=8, max_model_len=32,
                                                   max_num_batched_tokens=32, enable_prefix_caching=False))
    prompt = {"prompt_token_ids": [0, *range(40, 51)]}  # 12 tokens: 3 blocks
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine.add_request("first", prompt, params)
    engine.add_request("late", prompt, params.clone(prompt_logprobs=2), priority=1)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_preemptions > 0
    alone = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=32, block_size=4).generate(
        [prompt], params.clone(prompt_logprobs=2))[0]
    late = finals["late"]
    assert len(late.prompt_logprobs) == 12 and late.prompt_logprobs[0] is None
    for got, want in zip(late.prompt_logprobs[1:], alone.prompt_logprobs[1:]):
        assert got.keys() == want.keys()
        assert all(got[t] == pytest.approx(want[t], abs=1e-5) for t in got)
    assert late.outputs[0].token_ids == alone.outputs[0].token_ids


def test_bad_words_are_never_generated(llm):
    tokenizer = llm.get_tokenizer()
    full = greedy(llm, n=24)
    # a word of several tokens the model writes, banned: its tokens (at a text's start and
    # after a space) never appear in that order again
    ids = full.token_ids
    word, banned = next((w, b) for i in range(len(ids)) for k in (3, 2)
                        if (w := tokenizer.decode(ids[i:i + k])).strip()
                        and ids[i:i + k] in (b := tokenizer.bad_words_token_ids([w])))
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                bad_words=[word]))[0].outputs[0]
    assert out.token_ids != full.token_ids
    for ids in banned:
        assert not any(out.token_ids[i:i + len(ids)] == ids for i in range(len(out.token_ids)))
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])
