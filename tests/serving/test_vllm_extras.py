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


# -- chat: echo, continue_final_message, add_special_tokens, chat_template ------------------

STORY = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon"}]
CHATML = "<|begin_of_text|><|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\nOnce upon"
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}{{ greeting }}assistant:{% endif %}")


@pytest.fixture(scope="module")
def trusting(_tiny_model_cache, tiny_model_dir):
    """`baton serve` (in-process) with --trust-request-chat-template."""
    from serving_harness import baton_up

    dep = baton_up(str(tiny_model_dir), "--trust-request-chat-template", command="serve")
    yield dep
    dep.stop()


def test_continue_final_message_continues_the_last_message(dep, tokenizer):
    out = chat(dep, messages=STORY, continue_final_message=True, add_generation_prompt=False)
    assert out.prompt_token_ids == tokenizer.encode(CHATML, add_special_tokens=False)
    assert tokenize(dep, messages=STORY, continue_final_message=True) == out.prompt_token_ids  # vLLM's /tokenize too
    assert out.choices[0].message.role == "assistant"
    # without add_generation_prompt given, continuing implies none
    implied = chat(dep, messages=STORY, continue_final_message=True)
    assert implied.prompt_token_ids == out.prompt_token_ids
    message = refused(lambda: chat(dep, messages=STORY, continue_final_message=True, add_generation_prompt=True),
                      "continue_final_message")
    assert "add_generation_prompt" in message


def test_echo_puts_the_continued_message_before_the_reply(dep):
    plain = chat(dep, messages=STORY, continue_final_message=True).choices[0].message
    echoed = chat(dep, messages=STORY, continue_final_message=True, echo=True).choices[0].message
    assert echoed.content == "Once upon" + plain.content and echoed.role == "assistant"
    # the last message is the user's and a generation prompt follows: roles differ, no echo
    assert chat(dep, echo=True).choices[0].message.content == chat(dep).choices[0].message.content
    # no generation prompt: the reply continues the user's message, in its role
    user = chat(dep, echo=True, add_generation_prompt=False).choices[0].message
    assert user.role == "user" and user.content.startswith(HI[0]["content"])


def test_echo_streamed(colocated):
    stream = colocated.client().chat.completions.create(
        model=M, messages=STORY, max_tokens=4, temperature=0.0, stream=True,
        extra_body={"echo": True, "continue_final_message": True})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert deltas[0].role == "assistant" and deltas[1].content == "Once upon"
    whole = chat(colocated, messages=STORY, continue_final_message=True, echo=True).choices[0].message.content
    assert "".join(d.content or "" for d in deltas) == whole


def test_chat_add_special_tokens(colocated, tokenizer):
    text = tokenizer.decode(tokenize(colocated, messages=HI), skip_special_tokens=False)
    plain = chat(colocated).prompt_token_ids
    special = chat(colocated, add_special_tokens=True).prompt_token_ids
    assert plain == tokenizer.encode(text, add_special_tokens=False)
    assert special == tokenizer.encode(text, add_special_tokens=True) != plain


def test_a_request_chat_template_needs_trust(colocated):
    message = refused(lambda: chat(colocated, chat_template=PLAIN_TEMPLATE), "chat_template")
    assert "--trust-request-chat-template" in message
    response = httpx.post(f"{colocated.url}/tokenize", json={"model": M, "messages": HI,
                                                             "chat_template": PLAIN_TEMPLATE}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template"


def test_a_request_chat_template_renders_the_prompt(trusting, tokenizer):
    out = chat(trusting, chat_template=PLAIN_TEMPLATE, chat_template_kwargs={"greeting": "Hi! "})
    assert out.prompt_token_ids == tokenizer.encode(f"user: {HI[0]['content']}\nHi! assistant:",
                                                    add_special_tokens=False)
    # the model's own template otherwise
    assert chat(trusting).prompt_token_ids == tokenize(trusting, messages=HI)
    # /tokenize renders the request's own template too, and refuses it where chat does
    assert tokenize(trusting, messages=HI, chat_template=PLAIN_TEMPLATE,
                    chat_template_kwargs={"greeting": "Hi! "}) == out.prompt_token_ids
    refused(lambda: chat(trusting, chat_template="{% for %}"), "chat_template")
    # the sandbox refuses what a template may not touch: a 400, never a 500
    with pytest.raises(openai.BadRequestError):
        chat(trusting, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_a_long_conversation_with_its_own_template_continued(trusting, tokenizer):
    # long enough for the tokenizer's child process; truncated to fit the context
    long = "story " * 15000
    messages = [{"role": "user", "content": long}, {"role": "assistant", "content": "Once upon"}]
    out = chat(trusting, messages=messages, chat_template=PLAIN_TEMPLATE, continue_final_message=True,
               add_special_tokens=True, truncate_prompt_tokens=8)
    expected = tokenizer.encode(f"user: {long}\nassistant: Once upon", add_special_tokens=True)
    assert out.prompt_token_ids == expected[-8:] and out.usage.prompt_tokens == 8


# -- request_id -----------------------------------------------------------------------------

def test_request_id_is_the_response_id(dep):
    assert complete(dep, request_id="my-id-1").id == "cmpl-my-id-1"
    assert chat(dep, request_id="my-id-1").id == "chatcmpl-my-id-1"
    stream = dep.client().completions.create(model=M, prompt=PROMPT, max_tokens=3, stream=True,
                                             extra_body={"request_id": "streamed"})
    assert {chunk.id for chunk in stream} == {"cmpl-streamed"}
    assert complete(dep).id.startswith("cmpl-")


def test_one_request_id_twice_at_once(dep):
    """Both run (the engines' ids stay unique), and ending one early leaves the other be."""
    import threading

    results = {}

    def long_one():
        results["whole"] = complete(dep, request_id="twice", max_tokens=120, ignore_eos=True)

    runner = threading.Thread(target=long_one)
    runner.start()
    stream = dep.client().completions.create(model=M, prompt=PROMPT, max_tokens=120, stream=True,
                                             extra_body={"request_id": "twice", "ignore_eos": True})
    next(iter(stream))
    stream.close()  # the router aborts this one's streams in the engine
    runner.join(120)
    whole = results["whole"]
    assert whole.id == "cmpl-twice" and whole.usage.completion_tokens == 120
    assert whole.choices[0].finish_reason == "length"
    from serving_harness import kv_usage, wait_until

    for worker in dep.workers():  # nothing of either stays held
        wait_until(lambda name=worker.name: kv_usage(dep, name) == 0, timeout=30, what=f"{worker.name}'s KV freed")


@pytest.mark.parametrize("value", ["", "a\nb", "x" * 257, 5])
def test_invalid_request_id_is_refused(colocated, value):
    refused(lambda: complete(colocated, request_id=value), "request_id")
