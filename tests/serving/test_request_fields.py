"""Every request field OpenAI or vLLM defines is honoured (the output shows it) or refused
with a 400 whose `param` names it, on completions and chat, through a real `baton up`
deployment (disaggregated). The table of refused fields is router/fields.py."""

from __future__ import annotations

import json

import httpx
import pytest

from baton.router.fields import refused

M = "tiny-llama-v1"
HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0.0}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def base(path: str, **fields) -> dict:
    prompt = {"prompt": "The quick brown fox"} if path == "completions" else {"messages": HI}
    return {"model": M, "max_tokens": 4, **GREEDY, **prompt, **fields}


def post(deployment, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{deployment.url}{PATHS[path]}", json=body, timeout=60)


# A value that asks for something, per refused field (a no-op value is accepted: below).
ASKING = {
    "service_tier": "flex", "store": True, "metadata": {"k": "v"},
    "prompt_cache_key": "abc", "use_beam_search": True, "length_penalty": 2.0, "logits_processors": ["x"],
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "structured_outputs": {"regex": "a"},
    "priority": 1, "cache_salt": "s", "kv_transfer_params": {}, "vllm_xargs": {"a": 1},
    "suffix": " end", "prompt_embeds": "AAAA",
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low", "verbosity": "low",
    "web_search_options": {}, "documents": [{"a": "b"}],
    "mm_processor_kwargs": {},
}
REFUSED_CASES = [(path, name) for path in PATHS for name in refused(path == "chat")]


@pytest.mark.parametrize("path,name", REFUSED_CASES, ids=[f"{p}-{n}" for p, n in REFUSED_CASES])
def test_unimplemented_fields_are_refused_by_name(disaggregated, path, name):
    response = post(disaggregated, path, base(path, **{name: ASKING[name]}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"], error


def texts(response: httpx.Response) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in response.json()["choices"]]


NO_OPS = [("completions", {"store": False, "service_tier": "auto", "suffix": "", "add_special_tokens": True,
                           "use_beam_search": False, "length_penalty": 1, "priority": 0, "logit_bias": {}}),
          ("chat", {"store": False, "modalities": ["text"], "echo": False, "metadata": {}, "audio": None,
                    "spaces_between_special_tokens": True, "add_special_tokens": False,
                    "continue_final_message": False, "an_unknown_field": 5})]


@pytest.mark.parametrize("path,fields", NO_OPS, ids=[p for p, _ in NO_OPS])
def test_no_op_values_of_refused_fields_are_accepted(disaggregated, path, fields):
    plain = post(disaggregated, path, base(path))
    response = post(disaggregated, path, base(path, **fields))
    assert response.status_code == 200, response.text
    assert texts(response) == texts(plain)


def test_a_bool_field_takes_no_zero(disaggregated):
    response = post(disaggregated, "completions", base("completions", use_beam_search=0))
    assert response.status_code == 400 and response.json()["error"]["param"] == "use_beam_search"


@pytest.mark.parametrize("path", PATHS)
def test_stream_options_without_stream_is_refused(disaggregated, path):
    response = post(disaggregated, path, base(path, stream_options={"include_usage": True}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("option", ["continuous_usage_stats", "include_obfuscation"])
def test_unimplemented_stream_options_are_refused_by_name(disaggregated, option):
    body = base("chat", stream=True, stream_options={"include_usage": True, option: True})
    response = post(disaggregated, "chat", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == f"stream_options.{option}"


def test_add_special_tokens_false_leaves_bos_out(disaggregated):
    def ids(add: bool) -> tuple[list[int], list[int]]:
        body = base("completions", return_token_ids=True, add_special_tokens=add)
        served = post(disaggregated, "completions", body).json()["choices"][0]["prompt_token_ids"]
        tokenized = httpx.post(f"{disaggregated.url}/tokenize", timeout=30, json={
            "model": M, "prompt": body["prompt"], "add_special_tokens": add}).json()["tokens"]
        return served, tokenized

    with_special, without = ids(True), ids(False)
    assert with_special[0] == with_special[1] and without[0] == without[1]
    assert with_special[0] != without[0]


@pytest.mark.parametrize("path", PATHS)
def test_return_token_ids_returns_the_prompt_and_output_ids(disaggregated, path):
    body = base(path, return_token_ids=True, max_tokens=5)
    out = post(disaggregated, path, body).json()
    tokenized = httpx.post(f"{disaggregated.url}/tokenize", timeout=30, json={
        "model": M, **({"prompt": body["prompt"]} if path == "completions" else {"messages": HI})}).json()
    choice = out["choices"][0]
    prompt_ids = choice["prompt_token_ids"] if path == "completions" else out["prompt_token_ids"]
    assert prompt_ids == tokenized["tokens"]
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] >= 1
    text = choice["text"] if path == "completions" else choice["message"]["content"]
    detok = httpx.post(f"{disaggregated.url}/detokenize", json={"model": M, "tokens": choice["token_ids"]},
                       timeout=30).json()["prompt"]
    assert detok == text
    assert "token_ids" not in post(disaggregated, path, base(path)).json()["choices"][0]


@pytest.mark.parametrize("path", PATHS)
def test_return_token_ids_streamed_equals_whole(disaggregated, path):
    body = base(path, return_token_ids=True, max_tokens=5)
    whole = post(disaggregated, path, body).json()
    ids, prompt_ids = [], None
    with httpx.stream("POST", f"{disaggregated.url}{PATHS[path]}", json={**body, "stream": True},
                      timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                ids += choice.get("token_ids", [])
                prompt_ids = choice.get("prompt_token_ids", prompt_ids)
            prompt_ids = chunk.get("prompt_token_ids", prompt_ids)
    assert ids == whole["choices"][0]["token_ids"]
    expected = whole["choices"][0]["prompt_token_ids"] if path == "completions" else whole["prompt_token_ids"]
    assert prompt_ids == expected


@pytest.mark.parametrize("path", PATHS)
def test_min_tokens_keeps_stop_tokens_back(disaggregated, path):
    first = post(disaggregated, path, base(path, return_token_ids=True, max_tokens=1)).json()["choices"][0]["token_ids"][0]
    stopped = post(disaggregated, path, base(path, stop_token_ids=[first], max_tokens=6)).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = post(disaggregated, path, base(path, stop_token_ids=[first], min_tokens=6, max_tokens=6)).json()
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", PATHS)
def test_prompt_logprobs_on_both_endpoints(disaggregated, path):
    out = post(disaggregated, path, base(path, prompt_logprobs=1, return_token_ids=True)).json()
    choice = out["choices"][0]
    body = choice["prompt_logprobs"] if path == "completions" else out["prompt_logprobs"]
    prompt_ids = choice["prompt_token_ids"] if path == "completions" else out["prompt_token_ids"]
    assert body[0] is None and len(body) == len(prompt_ids)
    assert all(str(t) in entry for t, entry in zip(prompt_ids[1:], body[1:]))


@pytest.mark.parametrize("path", PATHS)
def test_logit_bias_forces_and_bans_tokens(disaggregated, path):
    plain = post(disaggregated, path, base(path, return_token_ids=True)).json()["choices"][0]["token_ids"]
    forced = post(disaggregated, path, base(path, return_token_ids=True, logit_bias={"42": 100})).json()
    assert forced["choices"][0]["token_ids"] == [42] * 4
    banned = post(disaggregated, path, base(path, return_token_ids=True, logit_bias={str(plain[0]): -100})).json()
    assert banned["choices"][0]["token_ids"][0] != plain[0]


@pytest.mark.parametrize("path", PATHS)
def test_allowed_token_ids_limits_the_output(disaggregated, path):
    out = post(disaggregated, path, base(path, return_token_ids=True, max_tokens=8, temperature=1.0, seed=3,
                                         ignore_eos=True, allowed_token_ids=[42, 43, 44])).json()
    ids = out["choices"][0]["token_ids"]
    assert len(ids) == 8 and set(ids) <= {42, 43, 44}
    refused = post(disaggregated, path, base(path, allowed_token_ids=[42, 99999999]))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "allowed_token_ids"


@pytest.mark.parametrize("path", PATHS)
def test_seed_makes_sampling_repeatable(disaggregated, path):
    body = base(path, temperature=1.0, seed=7, max_tokens=8, n=2, return_token_ids=True)
    a, b = (post(disaggregated, path, body).json() for _ in range(2))
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
