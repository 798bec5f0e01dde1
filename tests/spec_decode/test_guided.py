"""Guided decoding with speculation: drafts the grammar refuses are never accepted, the
grammar's state follows only accepted tokens, outputs stay valid and equal to no speculation."""

from __future__ import annotations

import json

import jsonschema
from spec_helpers import NGRAM, assert_no_leaked_blocks, make_engine, run

from baton.engine import GuidedDecodingParams, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "temp": {"type": "integer"}},
    "required": ["city", "temp"],
    "additionalProperties": False,
}
# The prompt repeats the very JSON the grammar forces the start of: n-gram drafts of
# '{"city": "' are accepted (the grammar leaves one token to choose), the model's own
# choices inside strings mostly reject them.
PROMPT = '{"city": "Paris", "temp": 21} ' * 4


def test_guided_json_with_speculation_is_valid_and_equals_no_speculation(tiny_model):
    params = [SamplingParams(temperature=t, seed=i, max_tokens=80, guided_decoding=GuidedDecodingParams(json=SCHEMA))
              for i, t in enumerate((0.0, 0.8))]
    prompts = [PROMPT, PROMPT + "City:"]
    spec = make_engine(tiny_model, speculative_config=NGRAM, max_model_len=512)
    with_spec = run(spec, prompts, params)
    without = run(make_engine(tiny_model, max_model_len=512), prompts, params)
    for a, b in zip(with_spec, without):
        assert a.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(a.outputs[0].text), SCHEMA)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    stats = spec.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert_no_leaked_blocks(spec)
