"""Arbitrary Unicode in every text field of both endpoints: never a 5xx.

Hypothesis draws any code point, lone UTF-16 surrogates included (JSON can carry them as
`\\uXXXX` escapes, UTF-8 cannot), puts the text into one field of an otherwise valid
request and sends it to a real deployment. Text that UTF-8 cannot encode must be a 400
naming that field; anything else a 200 or a 4xx with OpenAI's error body.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

M = "tiny-llama-v1"
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=24)


def _set(body: dict, path: str, value) -> dict:
    """Put `value` at a dotted path (list indices as numbers) of a copy of `body`."""
    body = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


CHAT = {"model": M, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
        "stop": ["zz"], "chat_template_kwargs": {"flag": "x"}}
COMPLETION = {"model": M, "max_tokens": 2, "prompt": ["hi", "there"], "stop": "zz"}
# Every field whose value is text, as (endpoint, path, base body).
FIELDS = [
    ("chat/completions", "messages.0.content", CHAT),
    ("chat/completions", "messages.0.role", CHAT),
    ("chat/completions", "messages.0.name", CHAT),
    ("chat/completions", "stop.0", CHAT),
    ("chat/completions", "model", CHAT),
    ("chat/completions", "user", CHAT),
    ("chat/completions", "chat_template_kwargs.flag", CHAT),
    ("chat/completions", "guided_regex", CHAT),
    ("chat/completions", "guided_grammar", CHAT),
    ("chat/completions", "guided_json", CHAT),
    ("chat/completions", "tool_choice", CHAT),
    ("completions", "prompt.1", COMPLETION),
    ("completions", "stop", COMPLETION),
    ("completions", "model", COMPLETION),
    ("completions", "suffix", COMPLETION),
    ("completions", "user", COMPLETION),
]
CONTENT_PART = ("chat/completions", "messages.0.content",
                {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(url: str, endpoint: str, path: str, body: dict, text: str) -> None:
    response = httpx.post(f"{url}/v1/{endpoint}", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, f"{path}={text!r}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"], response.text
    if not _encodable(text):
        assert response.status_code == 400, f"{path}={text!r}: {response.text[:300]}"
        assert response.json()["error"]["param"] == path, response.text


@pytest.fixture(scope="module")
def url(disaggregated) -> str:
    return disaggregated.url


@given(field=st.sampled_from(FIELDS), text=ANY_TEXT)
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_any_text_in_any_field_is_never_a_server_error(url, field, text):
    endpoint, path, base = field
    _check(url, endpoint, path, _set(base, path, text), text)


@given(text=ANY_TEXT)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_any_text_in_a_content_part(url, text):
    endpoint, _, base = CONTENT_PART
    _check(url, endpoint, "messages.0.content.0.text", _set(base, "messages.0.content.0.text", text), text)
