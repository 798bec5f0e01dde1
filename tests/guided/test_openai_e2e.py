"""Structured output through the `openai` client against `baton up`, colocated and
disaggregated (the prefill worker samples the first token under the grammar, the decode
worker continues it): response_format and vLLM's guided_* extras."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

# The serving tests' harness starts `baton up` and reads what it prints.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_harness import baton_up  # noqa: E402

MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 10},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["drama", "comedy", "noir"]}},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "director": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8}, "alive": {"type": "boolean"}},
            "required": ["name", "alive"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "year", "genres", "director"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Describe a film as JSON."}]
SAMPLING = [(0.0, None), (0.8, 1), (1.0, 2), (1.3, 3)]  # (temperature, seed)


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def client(request, tiny_model):
    dep = baton_up("--mode", request.param, "--model", str(tiny_model), "--served-model-name", MODEL)
    yield dep.client()
    dep.stop()


def test_response_format_json_schema_on_chat(client):
    for temperature, seed in SAMPLING:
        out = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=300, temperature=temperature, seed=seed,
            response_format=RESPONSE_FORMAT,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_output_parses(client):
    chunks = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, temperature=1.0, seed=5,
        response_format=RESPONSE_FORMAT, stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_json_and_json_object_on_completions(client):
    out = client.completions.create(
        model=MODEL, prompt="Film:", max_tokens=300, temperature=1.0, seed=7, extra_body={"guided_json": SCHEMA}
    )
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, temperature=1.0, seed=1,
        response_format={"type": "json_object"},
    )
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":  # unbounded: it may not close in 300 tokens
        assert isinstance(json.loads(content), dict)


def test_guided_regex(client):
    pattern = r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}"
    for temperature, seed in SAMPLING:
        out = client.completions.create(
            model=MODEL, prompt="Call me at", max_tokens=60, temperature=temperature, seed=seed,
            extra_body={"guided_regex": pattern},
        )
        assert re.fullmatch(pattern, out.choices[0].text), out.choices[0].text
        assert out.choices[0].finish_reason == "stop"


def test_guided_choice_with_n(client):
    choices = ["sunny", "rainy", "cloudy", "snowy"]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], max_tokens=20, n=4,
        temperature=1.5, seed=11, extra_body={"guided_choice": choices},
    )
    assert len(out.choices) == 4
    for choice in out.choices:
        assert choice.message.content in choices and choice.finish_reason == "stop"


def test_guided_grammar(client):
    grammar = 'root ::= num (" + " num){0,3}\nnum ::= [1-9] [0-9]{0,2}'
    for temperature, seed in SAMPLING:
        out = client.completions.create(
            model=MODEL, prompt="Sum:", max_tokens=60, temperature=temperature, seed=seed,
            extra_body={"guided_grammar": grammar},
        )
        text = out.choices[0].text
        assert re.fullmatch(r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){0,3}", text), text
        assert sum(int(x) for x in text.split(" + ")) == eval(text)


def test_guided_and_free_requests_run_together(client):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=60)
        guided = [
            aclient.completions.create(model=MODEL, prompt=f"Film {i}:", max_tokens=300, temperature=1.0, seed=i,
                                       extra_body={"guided_json": SCHEMA})
            for i in range(4)
        ]
        free = [
            aclient.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=30, temperature=1.0, seed=i,
                                       extra_body={"ignore_eos": True})
            for i in range(4)
        ]
        try:
            return await asyncio.gather(*guided), await asyncio.gather(*free)
        finally:
            await aclient.close()

    guided, free = asyncio.run(run())
    for out in guided:
        jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    for out in free:
        assert out.usage.completion_tokens == 30 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"guided_regex": "(unclosed"}, "guided_decoding.regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "guided_decoding.json"),
        ({"guided_grammar": "root ::= missing"}, "guided_decoding.grammar"),
        ({"guided_choice": []}, "choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one structured-output constraint"),
    ],
)
def test_invalid_constraints_are_400(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=extra)
    # The worker is unharmed.
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_choice": ["ok"]})
    assert out.choices[0].text == "ok"


def test_response_format_without_a_schema_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
