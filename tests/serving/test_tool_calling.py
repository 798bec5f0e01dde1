"""Tool calling through the router with the official `openai` client, on the random tiny model.

`required` and named choices run under guided decoding, so even random weights produce calls
whose arguments parse and match the function's schema (colocated, and disaggregated where the
prefill worker samples the first token under the grammar). `auto` needs the router's parser:
the tiny model's own text is never a call, so the auto tests make it write one with a guided
constraint and check that the parser reads it.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from serving_harness import baton_up

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = range(6)


@pytest.fixture(scope="module")
def with_parser(_tiny_model_cache):
    dep = baton_up("--mode", "colocated", "--tool-call-parser", "llama3_json", "--enable-auto-tool-choice")
    yield dep
    dep.stop()


@pytest.fixture(params=["with_parser", "disaggregated"])
def server(request):
    return request.getfixturevalue(request.param)


def chat(client, **kwargs):
    return client.chat.completions.create(model="tiny-llama-v1", messages=kwargs.pop("messages", MESSAGES),
                                          tools=kwargs.pop("tools", TOOLS), max_tokens=kwargs.pop("max_tokens", 400),
                                          temperature=1.0, **kwargs)


def check_calls(calls) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream) -> tuple[str, dict[int, dict], str]:
    """(content, calls by index, finish_reason) from a streamed chat, checking OpenAI's shape:
    a call's first delta has its id, type, name and empty arguments; later ones add arguments."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name
                assert call.function.arguments == ""
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            else:
                assert call.id is None and call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_required_always_calls_a_function_with_valid_arguments(server):
    client = server.client()
    for seed in SEEDS:
        out = chat(client, tool_choice="required", parallel_tool_calls=False, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_required_with_parallel_calls(server):
    client = server.client()
    finished = 0
    for seed in SEEDS:
        choice = chat(client, tool_choice="required", seed=seed, max_tokens=600).choices[0]
        if choice.finish_reason == "tool_calls":  # the random model may add calls until max_tokens
            finished += 1
            assert len(choice.message.tool_calls) >= 1
            check_calls(choice.message.tool_calls)
            assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        else:
            assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert finished >= len(SEEDS) // 2


def test_named_function_is_called_with_arguments_matching_its_schema(server):
    client = server.client()
    for seed in SEEDS:
        for name in SCHEMAS:
            out = chat(client, tool_choice={"type": "function", "function": {"name": name}}, seed=seed)
            calls = out.choices[0].message.tool_calls
            assert out.choices[0].finish_reason == "tool_calls"
            assert [c.function.name for c in calls] == [name]
            check_calls(calls)


def test_streamed_calls_are_shaped_as_openai_streams_them_and_match_the_whole_response(server):
    client = server.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        whole = chat(client, tool_choice=choice, seed=11).choices[0].message.tool_calls
        content, calls, finish = collect_stream(chat(client, tool_choice=choice, seed=11, stream=True))
        assert content == "" and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in whole]
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_each_of_n_choices_gets_its_own_calls(server):
    out = chat(server.client(), tool_choice="required", parallel_tool_calls=False, n=3, seed=4)
    assert len(out.choices) == 3
    ids = set()
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
        ids |= {c.id for c in choice.message.tool_calls}
    assert len(ids) == 3


def test_a_conversation_with_tool_calls_and_tool_results(server):
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    client = server.client()
    short = chat(client, tool_choice="none", max_tokens=4, extra_body={"ignore_eos": True})
    long = chat(client, messages=history, tool_choice="none", max_tokens=4, extra_body={"ignore_eos": True})
    assert long.choices[0].message.tool_calls is None and long.choices[0].finish_reason == "length"
    # The template rendered the call and its result into the prompt.
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20
    bad = [*history[:1], {**history[1], "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "add", "arguments": "{not json"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=bad, tool_choice="none")
    assert err.value.body["param"] == "messages.1.tool_calls.0.function.arguments"


def test_the_chat_template_renders_the_tools():
    """The tools reach the model: its prompt lists them (the tiny model's template renders
    them as Llama 3.1 does)."""
    from baton.engine.tiny_model import ensure_tiny_model
    from baton.tokenizer import Tokenizer

    tokenizer = Tokenizer(ensure_tiny_model())
    text = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS)
    assert json.dumps(TOOLS[0]) in text and '"parameters": dictionary of argument name' in text
    assert tokenizer.apply_chat_template(MESSAGES) == (
        "<|begin_of_text|><|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_renders_the_tools_too(with_parser):
    def count(**extra) -> int:
        response = httpx.post(f"{with_parser.url}/tokenize", json={"model": "tiny-llama-v1", "messages": MESSAGES,
                                                                    **extra}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["count"]

    assert count(tools=TOOLS) > count() + 50


def forced_call(text: str) -> dict:
    """A guided constraint that makes the random model write exactly `text`."""
    return {"guided_choice": [text]}


def test_auto_reads_a_call_the_model_writes(with_parser):
    client = with_parser.client()
    written = '{"name": "add", "parameters": {"a": 2, "b": 40}}; {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    out = chat(client, tool_choice="auto", extra_body=forced_call(written))
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("add", {"a": 2, "b": 40}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    content, calls, finish = collect_stream(chat(client, extra_body=forced_call(written), stream=True))
    assert content == "" and finish == "tool_calls"
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"a": 2, "b": 40}, {"city": "Oslo", "unit": "celsius"}]
    single = chat(client, parallel_tool_calls=False, extra_body=forced_call(written)).choices[0]
    assert [c.function.name for c in single.message.tool_calls] == ["add"]


def test_auto_answers_text_as_content(with_parser):
    client = with_parser.client()
    out = chat(client, extra_body=forced_call("It is sunny in Paris."))
    assert out.choices[0].message.content == "It is sunny in Paris." and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    # A call cut off by max_tokens is not a call: the text comes back as content.
    cut = chat(client, max_tokens=5, extra_body=forced_call('{"name": "add", "parameters": {"a": 1, "b": 2}}'))
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content.startswith("{")


def test_auto_is_refused_on_a_router_without_a_parser(disaggregated):
    with pytest.raises(openai.BadRequestError) as err:
        chat(disaggregated.client())  # tool_choice defaults to auto
    assert err.value.body["param"] == "tool_choice" and "--tool-call-parser" in err.value.body["message"]


def _bad(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-llama-v1", "messages": MESSAGES,
                                                               "max_tokens": 5, **body}, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize("body,param", [
    ({"tools": []}, "tools"),
    ({"tools": [{"function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": [1]}}]},
     "tools.1.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "unknown"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a+"}, "guided_regex"),
    ({"tools": "not a list"}, "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [TOOLS[0]["function"]]}, "functions"),
    ({"tools": TOOLS, "function_call": "auto"}, "function_call"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
])
def test_bad_tools_are_400_naming_the_parameter(with_parser, body, param):
    error = _bad(with_parser.url, body)
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_a_schema_the_grammar_cannot_compile_is_400_naming_tools(with_parser):
    # A valid JSON Schema whose pattern (a lookbehind) the grammar compiler does not support.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}, "required": ["a"]}}}]
    error = _bad(with_parser.url, {"tools": tools, "tool_choice": "required"})
    assert error["param"] == "tools" and "Lookbehind" in error["message"], error
    out = chat(with_parser.client(), tool_choice="required", parallel_tool_calls=False, seed=1)  # still serves
    check_calls(out.choices[0].message.tool_calls)
