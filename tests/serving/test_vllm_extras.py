"""vLLM's request extras that clients send, with the official `openai` client (`extra_body`)
against real deployments of the tiny model on loopback: colocated, and disaggregated where
the field must travel through a KV handoff. Invalid values are 400s naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest

M = "tiny-llama-v1"
PROMPT = "The quick brown fox jumps over the lazy dog"
HI = [{"role": "user", "content": "hi there, how are you"}]


@pytest.fixture(params=["colocated", "disaggregated"])
def dep(request):
    return request.getfixturevalue(request.param)


def complete(dep, prompt=PROMPT, **extra):
    return dep.client().completions.create(model=M, prompt=prompt, max_tokens=4, temperature=0.0,
                                           extra_body={"return_token_ids": True, **extra})


def chat(dep, messages=HI, **extra):
    return dep.client().chat.completions.create(model=M, messages=messages, max_tokens=4, temperature=0.0,
                                                extra_body={"return_token_ids": True, **extra})


def tokenize(dep, **body) -> list[int]:
    return httpx.post(f"{dep.url}/tokenize", json={"model": M, **body}, timeout=30).json()["tokens"]


def refused(call, param: str) -> str:
    """Run `call`, which must be refused with a 400 naming `param` (or an item of it:
    `param.0`); its message."""
    with pytest.raises(openai.BadRequestError) as err:
        call()
    error = err.value.body
    assert err.value.status_code == 400 and error["param"].split(".")[0] == param, error
    return error["message"]


# -- truncate_prompt_tokens -----------------------------------------------------------------

def test_truncate_prompt_tokens_keeps_the_last_tokens(dep):
    whole = tokenize(dep, prompt=PROMPT)
    out = complete(dep, truncate_prompt_tokens=3)
    choice = out.choices[0]
    assert out.usage.prompt_tokens == 3 and choice.prompt_token_ids == whole[-3:]
    # the same output as the kept tokens given as the prompt
    assert choice.token_ids == complete(dep, prompt=whole[-3:]).choices[0].token_ids
    # -1 (the context length) and a k above the prompt's length keep it whole
    for k in (-1, len(whole) + 5):
        assert complete(dep, truncate_prompt_tokens=k).choices[0].prompt_token_ids == whole


def test_truncate_prompt_tokens_on_chat_and_token_prompts(dep):
    whole = tokenize(dep, messages=HI)
    out = chat(dep, truncate_prompt_tokens=4)
    assert out.usage.prompt_tokens == 4 and out.prompt_token_ids == whole[-4:]
    ids = complete(dep, prompt=whole, truncate_prompt_tokens=2)
    assert ids.choices[0].prompt_token_ids == whole[-2:]


def test_truncate_prompt_tokens_lets_a_prompt_longer_than_the_context_run(colocated):
    long = " ".join(["fox"] * 3000)  # thousands of tokens: far past the context
    with pytest.raises(openai.BadRequestError):
        complete(colocated, prompt=long)
    out = complete(colocated, prompt=long, truncate_prompt_tokens=16)
    assert out.usage.prompt_tokens == 16


@pytest.mark.parametrize("value", [0, -2, 10**6, "3", 2.5])
def test_invalid_truncate_prompt_tokens_is_refused(colocated, value):
    refused(lambda: complete(colocated, truncate_prompt_tokens=value), "truncate_prompt_tokens")
    refused(lambda: chat(colocated, truncate_prompt_tokens=value), "truncate_prompt_tokens")


# -- bad_words ------------------------------------------------------------------------------

def a_word_written(tokenizer, ids: list[int], sizes=(3, 2)) -> tuple[str, list[list[int]]]:
    """A word of `sizes` tokens the output holds (as those tokens), and what banning it bans."""
    return next((w, banned) for i in range(len(ids)) for k in sizes
                if (w := tokenizer.decode(ids[i:i + k])).strip()
                and ids[i:i + k] in (banned := tokenizer.bad_words_token_ids([w])))


def holds(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i:i + len(seq)] == seq for i in range(len(ids)))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from baton.tokenizer import Tokenizer

    return Tokenizer(tiny_model_dir)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_words_are_never_generated(dep, tokenizer, endpoint):
    run = complete if endpoint == "completions" else chat
    plain = run(dep, max_tokens=12, ignore_eos=True).choices[0].token_ids
    # a word of several tokens (the decode worker's), and the first token's word (the prefill
    # worker's, disaggregated)
    for sizes, first in (((3, 2), False), ((1,), True)):
        ids = plain[:1] if first else plain
        word, banned = a_word_written(tokenizer, ids, sizes)
        out = run(dep, max_tokens=12, ignore_eos=True, bad_words=[word]).choices[0].token_ids
        assert out != plain and not any(holds(out, seq) for seq in banned), (word, banned, out)


@pytest.mark.parametrize("value", [["  "], "fox", [3]])
def test_invalid_bad_words_are_refused(colocated, value):
    refused(lambda: complete(colocated, bad_words=value), "bad_words")


# -- spaces_between_special_tokens, return_tokens_as_token_ids -------------------------------

@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_text_with_and_without_spaces_between(dep, tokenizer, spaces):
    # Only special tokens can be sampled; the tiny model's byte-level decoder puts no space
    # between them, so both settings give their bare texts (as vLLM's fast detokenizer does;
    # tests/engine/test_tokenizer.py has a decoder that does put spaces)
    out = complete(dep, max_tokens=6, ignore_eos=True, temperature=1.0, seed=1, allowed_token_ids=[0, 2],
                   skip_special_tokens=False, spaces_between_special_tokens=spaces).choices[0]
    assert len(out.token_ids) == 6 and out.text == "".join(tokenizer.added_tokens[t] for t in out.token_ids)


def test_invalid_spaces_between_special_tokens_is_refused(colocated):
    refused(lambda: complete(colocated, spaces_between_special_tokens="no"), "spaces_between_special_tokens")
    refused(lambda: chat(colocated, return_tokens_as_token_ids=1), "return_tokens_as_token_ids")


def test_return_tokens_as_token_ids_names_tokens_by_id(dep, tokenizer):
    out = complete(dep, logprobs=2, return_tokens_as_token_ids=True).choices[0]
    assert out.logprobs.tokens == [f"token_id:{t}" for t in out.token_ids]
    assert all(key.startswith("token_id:") for top in out.logprobs.top_logprobs for key in top)
    offsets = [0]
    for t in out.token_ids[:-1]:  # offsets stay those of the text
        offsets.append(offsets[-1] + len(tokenizer.decode([t], False)))
    assert out.logprobs.text_offset == offsets
    plain = complete(dep, logprobs=2).choices[0]
    assert plain.logprobs.tokens == [tokenizer.decode([t], False) for t in plain.token_ids]

    content = chat(dep, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True).choices[0]
    entries = content.logprobs.content
    assert [e.token for e in entries] == [f"token_id:{t}" for t in content.token_ids]
    assert all(e.bytes == list(tokenizer.decode([t], False).encode()) for e, t in zip(entries, content.token_ids))
    assert all(top.token.startswith("token_id:") for e in entries for top in e.top_logprobs)


def test_return_tokens_as_token_ids_in_a_stream(colocated):
    stream = colocated.client().chat.completions.create(
        model=M, messages=HI, max_tokens=4, temperature=0.0, logprobs=True, stream=True,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    tokens, ids = [], []
    for chunk in stream:
        for choice in chunk.choices:
            ids += getattr(choice, "token_ids", None) or []  # not in the role chunk
            tokens += [e.token for e in (choice.logprobs.content if choice.logprobs else [])]
    assert len(ids) == 4 and tokens == [f"token_id:{t}" for t in ids]
