"""Tool-call parsers on crafted model outputs, fed in arbitrary pieces: whatever the chunking,
the streamed deltas are shaped as OpenAI streams them and add up to the whole-output result."""

from __future__ import annotations

import json
import random

import pytest

from baton.router.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    NamedCallParser,
    RequiredCallsParser,
    ToolParser,
)

SEEDS = range(12)


def chunks(text: str, seed: int) -> list[str]:
    """`text` cut at random places (pieces of 1 to 7 characters; seed 0: one character each)."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = 1 if seed == 0 else rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def stream(parser: ToolParser, text: str, seed: int) -> list[dict]:
    deltas = []
    for piece in chunks(text, seed):
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def accumulate(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What a client builds from the deltas, checking their shape as it goes: a call's first
    delta has its index, id, type, name and empty arguments; later ones only arguments."""
    content, calls = "", []
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] == len(calls) and call["type"] == "function"
                assert call["function"]["arguments"] == "" and call["function"]["name"]
                calls.append({"id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"], "arguments": ""}})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                assert call["function"]["arguments"]
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return content, calls


def whole(parser_type, text: str, **kwargs):
    parser = parser_type(**kwargs)
    parser.feed(text)
    parser.finish()
    return parser.result()


def check_every_chunking(parser_type, text: str, expected_content, expected_calls, **kwargs):
    """Every chunking streams the same calls and content, equal to the whole-output result."""
    for seed in SEEDS:
        parser = parser_type(**kwargs)
        content, calls = accumulate(stream(parser, text, seed))
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected_calls
        assert (content.strip() or None) == expected_content
        assert parser.result() == (expected_content, calls)


LLAMA_TWO_CALLS = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2], '
                   '"note": "a } and a \\" inside"}}; {"name": "get_time", "parameters": {}}')


def test_llama3_json_streams_each_call_whatever_the_chunking():
    check_every_chunking(Llama3JsonParser, LLAMA_TWO_CALLS, None, [
        ("get_weather", {"city": "Paris", "days": [1, 2], "note": 'a } and a " inside'}),
        ("get_time", {}),
    ])


def test_llama3_json_without_python_tag_with_arguments_first_or_missing():
    text = '  {"parameters": {"x": 1}, "name": "f"};{"name": "g"}'
    check_every_chunking(Llama3JsonParser, text, None, [("f", {"x": 1}), ("g", {})])


def test_llama3_json_arguments_as_a_json_string_are_unwrapped():
    text = '{"name": "f", "arguments": "{\\"x\\": 2}"}'
    check_every_chunking(Llama3JsonParser, text, None, [("f", {"x": 2})])


def test_llama3_json_plain_text_is_content_exactly():
    for text in ("The weather is fine.", "  <not a tag> {", "\n\nHello", "<|python", "   "):
        for seed in SEEDS:
            parser = Llama3JsonParser()
            content, calls = accumulate(stream(parser, text, seed))
            assert content == text and calls == []
            assert parser.result() == (text or None, [])


def test_llama3_json_that_breaks_off_is_not_a_call():
    parser = Llama3JsonParser()
    deltas = stream(parser, '{"name": "get_weather", "parameters": {"city": "Pa', 3)
    content, calls = accumulate(deltas)
    assert calls[0]["function"]["name"] == "get_weather"  # streamed as it came
    assert parser.has_calls and not parser.valid and parser.result() is None  # whole: content


def test_llama3_json_junk_after_a_call_makes_it_invalid():
    assert whole(Llama3JsonParser, '{"name": "f", "parameters": {}} and then some words') is None


def test_llama3_json_without_parallel_calls_keeps_the_first():
    check_every_chunking(Llama3JsonParser, LLAMA_TWO_CALLS, None, [
        ("get_weather", {"city": "Paris", "days": [1, 2], "note": 'a } and a " inside'})],
        parallel_tool_calls=False)


HERMES = ('I will look that up.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tōkyō 東京"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"q": "<tool_call> inside a string"}}\n'
          '</tool_call>')


def test_hermes_streams_content_then_calls_whatever_the_chunking():
    check_every_chunking(HermesParser, HERMES, "I will look that up.", [
        ("get_weather", {"city": "Tōkyō 東京"}),
        ("search", {"q": "<tool_call> inside a string"}),
    ])


def test_hermes_calls_only_and_a_missing_final_closing_tag():
    text = '<tool_call>{"name": "f", "arguments": {"a": [1, {"b": null}]}}</tool_call><tool_call>\n{"name": "g", "arguments": {}}'
    check_every_chunking(HermesParser, text, None, [("f", {"a": [1, {"b": None}]}), ("g", {})])


def test_hermes_plain_text_with_angle_brackets_is_content_exactly():
    for text in ("a < b and <tool but no call", "ends with a partial tag <tool_ca", "x\n\n"):
        for seed in SEEDS:
            parser = HermesParser()
            content, calls = accumulate(stream(parser, text, seed))
            assert content == text and calls == [] and parser.result() == (text, [])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": ',  # cut off inside the object
    '<tool_call>\nnot json</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
])
def test_hermes_broken_calls_do_not_parse(text):
    assert whole(HermesParser, text) is None


def test_hermes_without_parallel_calls_keeps_the_first():
    check_every_chunking(HermesParser, HERMES, "I will look that up.", [("get_weather", {"city": "Tōkyō 東京"})],
                         parallel_tool_calls=False)


def test_required_array_of_calls():
    text = '[{"name": "a", "parameters": {"k": "v, ]"}}, {"name": "b", "parameters": {"n": -1.5e3}}]'
    check_every_chunking(RequiredCallsParser, text, None, [("a", {"k": "v, ]"}), ("b", {"n": -1500.0})])
    assert whole(RequiredCallsParser, '[{"name": "a", "parameters": {}}') is None  # no closing bracket
    assert whole(RequiredCallsParser, 'free text') is None


def test_named_choice_streams_the_arguments_as_they_come():
    text = '{"city": "Paris", "unit": "c"}'
    for seed in SEEDS:
        parser = NamedCallParser("get_weather")
        deltas = stream(parser, text, seed)
        content, calls = accumulate(deltas)
        assert content == "" and calls[0]["function"] == {"name": "get_weather", "arguments": text}
        assert len(deltas) == 1 + len(chunks(text, seed))  # the first delta, then one per piece
    assert whole(NamedCallParser, '{"city": "Par', function="f") is None
