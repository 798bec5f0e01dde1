"""JSON Schema guided decoding: every output of the random tiny model parses and validates."""

from __future__ import annotations

import json

import jsonschema

from baton.engine import GuidedDecodingParams, SamplingParams

# Bounded (maxLength, maxItems, enums, integer ranges) so a random model terminates.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": -1.5, "maximum": 99.5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "customer": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "maxLength": 10},
                "vip": {"type": "boolean"},
            },
            "required": ["email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "status": {"type": "string", "enum": ["new", "paid", "shipped"]},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["id", "customer", "items", "status", "note"],
    "additionalProperties": False,
}
MATRIX = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {"type": "integer", "minimum": -9, "maximum": 9},
            },
        },
        "label": {"const": "m"},
    },
    "required": ["rows", "label"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "order": ORDER, "matrix": MATRIX}
TEMPERATURES = [0.0, 0.7, 1.0, 1.5]
SEEDS = range(4)


def test_every_output_parses_and_validates(clean_engine, run_all):
    requests = {}
    for name, schema in SCHEMAS.items():
        as_text = name == "order"  # a schema given as a JSON string works the same
        guided = GuidedDecodingParams(json=json.dumps(schema) if as_text else schema)
        for temp in TEMPERATURES:
            for seed in SEEDS if temp > 0 else [None]:
                params = SamplingParams(temperature=temp, seed=seed, max_tokens=400, guided_decoding=guided)
                requests[f"{name}-{temp}-{seed}"] = (f"Write {name} number {seed}:", params)
    finals = run_all(clean_engine, requests)
    assert set(finals) == set(requests)
    for rid, out in finals.items():
        completion = out.outputs[0]
        assert out.error is None, rid
        assert completion.finish_reason == "stop", (rid, completion.text)
        value = json.loads(completion.text)  # strict: no raw control characters
        jsonschema.validate(value, SCHEMAS[rid.split("-")[0]])
        assert completion.text == json.dumps(value, ensure_ascii=False), "compact separators"


def test_output_follows_the_schema_property_order(clean_engine, run_all):
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
    }
    params = SamplingParams(temperature=0.0, max_tokens=50, guided_decoding=GuidedDecodingParams(json=schema))
    out = run_all(clean_engine, {"order": ("Flags:", params)})["order"].outputs[0]
    assert list(json.loads(out.text)) == ["zeta", "alpha"]


def test_json_object_is_one_json_object(clean_engine, run_all):
    guided = GuidedDecodingParams(json_object=True)
    requests = {
        f"obj-{seed}": ("JSON:", SamplingParams(temperature=1.0, seed=seed, max_tokens=300, guided_decoding=guided))
        for seed in range(6)
    }
    finals = run_all(clean_engine, requests)
    stopped = 0
    for out in finals.values():
        completion = out.outputs[0]
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
            stopped += 1
        else:  # unbounded: a random model may not close it in time
            assert completion.finish_reason == "length" and len(completion.token_ids) == 300
    assert stopped >= 3


def test_many_outputs_of_one_request_each_follow_the_schema(clean_engine, run_all):
    params = SamplingParams(
        n=4, temperature=1.2, seed=7, max_tokens=200, guided_decoding=GuidedDecodingParams(json=PERSON)
    )
    out = run_all(clean_engine, {"n4": ("People:", params)})["n4"]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), PERSON)
    assert len({c.text for c in out.outputs}) > 1
