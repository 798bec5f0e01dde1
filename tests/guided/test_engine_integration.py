"""Guided decoding through everything a request goes through in the engine."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from baton.engine import GuidedDecodingParams, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "array", "maxItems": 4, "items": {"enum": ["mon", "tue", "wed"]}},
        "temp": {"type": "integer", "minimum": -40, "maximum": 50},
    },
    "required": ["city", "days", "temp"],
    "additionalProperties": False,
}
GUIDED = GuidedDecodingParams(json=SCHEMA)
LONG_PROMPT = "The router speaks the OpenAI API and streams every token. " * 4


def _valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_and_free_requests_share_a_batch(clean_engine, run_all):
    free = {
        f"free-{i}": (f"Story {i}:", SamplingParams(temperature=t, seed=i, max_tokens=40, ignore_eos=True))
        for i, t in enumerate([0.0, 0.9, 1.3])
    }
    alone = run_all(clean_engine, free)
    guided = {
        f"json-{i}": (f"City {i}:", SamplingParams(temperature=1.0, seed=i, max_tokens=200, guided_decoding=GUIDED))
        for i in range(4)
    }
    mixed = run_all(clean_engine, {**guided, **free})
    for rid in free:  # the masks touch guided rows only
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
        assert mixed[rid].outputs[0].finish_reason == "length"
    for rid in guided:
        assert mixed[rid].outputs[0].finish_reason == "stop"
        _valid(mixed[rid].outputs[0].text)


def test_state_survives_chunked_prefill_and_preemption(tiny_model, make_engine, clean_engine, run_all):
    requests = {
        f"r{i}": (f"{LONG_PROMPT} Report {i}:", SamplingParams(temperature=0.0, max_tokens=200, guided_decoding=GUIDED))
        for i in range(4)
    }
    roomy = run_all(clean_engine, dict(requests))
    # 16-token steps chunk every prompt; 14 blocks of 16 tokens cannot hold four sequences.
    tight = make_engine(tiny_model, num_gpu_blocks_override=14, max_num_batched_tokens=16)
    squeezed = run_all(tight, requests)
    assert tight.stats().num_preemptions > 0
    for rid in requests:
        out = squeezed[rid].outputs[0]
        assert out.finish_reason == "stop"
        _valid(out.text)
        # Greedy: recompute resumed the grammar exactly where it was.
        assert out.token_ids == roomy[rid].outputs[0].token_ids
    assert tight.stats().kv_cache_usage == 0.0


def _handoff(prefill, decode, rid: str, prompt: str, params: SamplingParams, drain):
    """Prefill on one engine (first token under the grammar), continue on the other, as the
    prefill and decode workers do."""
    prefill.add_request(rid, prompt, params, hold_kv=True)
    first = drain(prefill)[rid]
    held = prefill.held_blocks(rid)
    prompt_ids = first.prompt_token_ids
    reserved = decode.reserve_blocks(len(prompt_ids))
    decode.kv_cache[torch.tensor(reserved)] = prefill.kv_cache[torch.tensor(held)]
    prefill.release_held(rid)
    decode.add_prefilled_request(rid, prompt_ids, params, reserved, first.outputs[0].token_ids[0])
    return first, drain(decode)[rid]


def test_prefill_engine_hands_the_grammar_to_the_decode_engine(tiny_model, make_engine, clean_engine, run_all, drain):
    decode = make_engine(tiny_model)
    cases = {
        "greedy": SamplingParams(temperature=0.0, max_tokens=200, guided_decoding=GUIDED),
        **{f"t{i}": SamplingParams(temperature=1.2, seed=i, max_tokens=200, guided_decoding=GUIDED) for i in range(3)},
    }
    colocated = run_all(clean_engine, {"greedy": ("Weather:", cases["greedy"])})["greedy"]
    for rid, params in cases.items():
        first, out = _handoff(clean_engine, decode, rid, "Weather:", params, drain)
        completion = out.outputs[0]
        assert completion.token_ids[0] == first.outputs[0].token_ids[0]
        assert completion.finish_reason == "stop"
        _valid(completion.text)
        if rid == "greedy":
            assert completion.token_ids == colocated.outputs[0].token_ids
    assert decode.stats().kv_cache_usage == 0.0


def test_a_grammar_completed_by_the_prefill_token_ends_on_the_decode_engine(tiny_model, make_engine, clean_engine, drain):
    decode = make_engine(tiny_model)
    assert len(clean_engine.tokenizer.encode("a", add_special_tokens=False)) == 1
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=50, guided_decoding=GuidedDecodingParams(choice=["a"]))
    first, out = _handoff(clean_engine, decode, "one", "Agree?", params, drain)
    assert first.outputs[0].text == "a"
    # The decode engine's matcher continued after "a": only the stop token was left.
    assert out.outputs[0].text == "a" and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[1] in decode.eos_token_ids
    assert not decode.has_unfinished_requests() and decode.stats().kv_cache_usage == 0.0


def test_a_first_token_outside_the_grammar_fails_the_request_and_frees_its_blocks(tiny_model, make_engine, drain):
    decode = make_engine(tiny_model)
    prompt_ids = decode.tokenizer.encode("Number:")
    letter = decode.tokenizer.encode("x", add_special_tokens=False)[0]
    reserved = decode.reserve_blocks(len(prompt_ids))
    params = SamplingParams(max_tokens=10, guided_decoding=GuidedDecodingParams(regex="[0-9]+"))
    decode.add_prefilled_request("bad", prompt_ids, params, reserved, letter)
    assert decode.has_unfinished_requests()  # its final output is still to be delivered
    out = drain(decode)["bad"]
    assert out.outputs[0].finish_reason == "error"
    assert "does not match" in out.error
    assert decode.stats().kv_cache_usage == 0.0


def test_a_grammar_that_completes_ends_with_stop_despite_ignore_eos_and_min_tokens(clean_engine, run_all):
    guided = GuidedDecodingParams(choice=["alpha", "beta"])
    requests = {
        "ignore_eos": ("Pick:", SamplingParams(max_tokens=50, ignore_eos=True, guided_decoding=guided)),
        "min_tokens": ("Pick:", SamplingParams(max_tokens=50, min_tokens=20, guided_decoding=guided)),
    }
    for rid, out in run_all(clean_engine, requests).items():
        assert out.outputs[0].text in ("alpha", "beta"), rid
        assert out.outputs[0].finish_reason == "stop", rid
        assert out.error is None


def test_padded_vocabulary_ids_are_never_sampled(padded_vocab_model, make_engine, run_all):
    engine = make_engine(padded_vocab_model, num_gpu_blocks_override=64)
    assert engine.config.vocab_size == 600 > engine.tokenizer.vocab_size

    def favour_padding(token_ids, logits):
        logits[512:] += 100.0  # a processor pushing ids the tokenizer does not have
        return logits

    params = SamplingParams(temperature=1.0, seed=0, max_tokens=200, guided_decoding=GUIDED, logits_processors=[favour_padding])
    out = run_all(engine, {"p": ("Padded:", params)})["p"].outputs[0]
    assert max(out.token_ids) < 512
    _valid(out.text)


@pytest.mark.parametrize(
    "guided,message",
    [
        (GuidedDecodingParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "guided_decoding.json"),
        (GuidedDecodingParams(json="{not json"), "not valid JSON"),
        (GuidedDecodingParams(regex="(unclosed"), "guided_decoding.regex"),
        (GuidedDecodingParams(grammar="root ::= undefined_rule"), "guided_decoding.grammar"),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_value_error_at_add_request(clean_engine, guided, message):
    with pytest.raises(ValueError, match=message):
        clean_engine.add_request("bad", "x", SamplingParams(n=2, guided_decoding=guided))
    assert "bad" not in clean_engine.requests
    assert not clean_engine.has_unfinished_requests()
    # The decode side refuses it the same way, and releases the reserved blocks.
    reserved = clean_engine.reserve_blocks(2)
    with pytest.raises(ValueError, match=message):
        clean_engine.add_prefilled_request("bad", [0, 5], SamplingParams(guided_decoding=guided), reserved, 9)
    assert not clean_engine.has_unfinished_requests()
