"""vLLM's /tokenize and /detokenize on the router (real processes, loopback)."""

from __future__ import annotations

import httpx
import pytest

from baton.tokenizer import Tokenizer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def post(dep, path, body):
    return httpx.post(f"{dep.url}{path}", json=body, timeout=30)


def test_tokenize_a_prompt_as_the_completions_api_does(colocated, tokenizer):
    r = post(colocated, "/tokenize", {"model": "tiny-llama-v1", "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > body["count"] and body["token_strs"] is None
    bare = post(colocated, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False,
                                         "return_token_strs": True}).json()
    assert bare["tokens"] == tokenizer.encode(PROMPT, add_special_tokens=False)
    assert bare["token_strs"] == [tokenizer.id_to_token(t) for t in bare["tokens"]]
    usage = colocated.client().completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=1).usage
    assert usage.prompt_tokens == body["count"]


def test_tokenize_messages_counts_what_a_chat_request_sends(colocated):
    body = post(colocated, "/tokenize", {"messages": MESSAGES}).json()
    usage = colocated.client().chat.completions.create(model="tiny-llama-v1", messages=MESSAGES,
                                                       max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens
    without = post(colocated, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without["count"] < body["count"]


def test_detokenize_inverts_tokenize(colocated, tokenizer):
    ids = post(colocated, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    r = post(colocated, "/detokenize", {"model": "tiny-llama-v1", "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
    assert PROMPT in r.json()["prompt"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "no"}, 400,
     "add_generation_prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
])
def test_bad_requests_name_the_parameter(colocated, path, body, status, param):
    r = post(colocated, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_info_gives_the_special_tokens_and_the_template(colocated, tokenizer):
    info = httpx.get(f"{colocated.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] > 0
