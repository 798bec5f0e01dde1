"""The official `openai` client against `baton up`, in both modes (disaggregated with gRPC KV
transfer, and colocated behind an API key)."""

from __future__ import annotations

import re

import httpx
import pytest

from baton.tokenizer import Tokenizer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # vLLM extra: outputs run to max_tokens, so counts are known


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def test_models_lists_the_served_name(deployment):
    models = deployment.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llama-v1"]


def test_completion_counts_tokens_exactly(deployment, tokenizer):
    out = deployment.client().completions.create(
        model="tiny-llama-v1", prompt=PROMPT, max_tokens=7, logprobs=1, extra_body=NO_EOS, **GREEDY)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 7
    assert "".join(choice.logprobs.tokens) == choice.text
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert out.object == "text_completion" and out.id.startswith("cmpl-")


def test_completion_stream_equals_non_stream(deployment):
    client = deployment.client()
    whole = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=12,
                                      extra_body=NO_EOS, **GREEDY)
    chunks = list(client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 12
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_stream_equals_non_stream(deployment, tokenizer):
    client = deployment.client()
    whole = client.chat.completions.create(model="tiny-llama-v1", messages=MESSAGES, max_tokens=10,
                                           extra_body=NO_EOS, **GREEDY)
    message = whole.choices[0].message
    assert message.role == "assistant" and whole.object == "chat.completion"
    prompt = tokenizer.apply_chat_template(MESSAGES)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert whole.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny-llama-v1", messages=MESSAGES, max_tokens=10,
                                            stream=True, extra_body=NO_EOS, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_outputs_with_seed_are_reproducible(deployment):
    client = deployment.client()
    kwargs = dict(model="tiny-llama-v1", prompt=PROMPT, max_tokens=6, n=2, seed=1234, temperature=1.0,
                  extra_body=NO_EOS)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # seed + i: different samples
    assert first.usage.completion_tokens == 12
    assert first.usage.prompt_tokens == second.usage.prompt_tokens  # the prompt counts once


def test_n_outputs_stream_interleave(deployment):
    chunks = list(deployment.client().chat.completions.create(
        model="tiny-llama-v1", messages=MESSAGES, max_tokens=5, n=2, seed=3, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_cuts_the_output(deployment):
    client = deployment.client()
    base = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=16,
                                     extra_body=NO_EOS, **GREEDY).choices[0].text
    assert len(base) > 8, base
    stop = base[4:7]
    expected = base[: base.find(stop)]
    cut = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=16, stop=[stop],
                                    extra_body=NO_EOS, **GREEDY)
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=16, stop=stop,
                                         stream=True, extra_body=NO_EOS, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_completion_logprobs(deployment):
    out = deployment.client().completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=5,
                                                 logprobs=3, extra_body=NO_EOS, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token_logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 and token_logprob <= 0.0
        assert token_logprob == pytest.approx(max(top.values()))  # greedy takes the argmax
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(deployment):
    out = deployment.client().chat.completions.create(
        model="tiny-llama-v1", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2,
        extra_body=NO_EOS, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token


def test_token_id_prompts_and_batches(deployment, tokenizer):
    ids = tokenizer.encode(PROMPT)
    client = deployment.client()
    by_text = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=6, **GREEDY)
    batch = client.completions.create(model="tiny-llama-v1", prompt=[ids, ids], max_tokens=6, **GREEDY)
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1]
    assert all(c.text == by_text.choices[0].text for c in batch.choices)
    assert batch.usage.prompt_tokens == 2 * len(ids)


def test_max_tokens_default_for_chat_fills_the_context(deployment):
    # No max_tokens: the output may run to the context limit; with a stop it ends early.
    out = deployment.client().chat.completions.create(
        model="tiny-llama-v1", messages=MESSAGES, max_completion_tokens=3, **GREEDY)
    assert out.usage.completion_tokens <= 3


def test_workers_expose_prometheus_metrics(deployment):
    deployment.client().completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=3)
    names = ["baton:time_to_first_token_seconds_count", "baton:e2e_request_latency_seconds_count",
             "baton:num_requests_running", "baton:num_requests_waiting", "baton:kv_cache_usage_perc",
             "baton:prefix_cache_queries_total", "baton:prefix_cache_hits_total",
             "baton:prompt_tokens_total", "baton:generation_tokens_total"]
    for worker in deployment.workers():
        role = worker.name.split("-")[0]
        text = httpx.get(worker.metrics_url).text
        for name in names:
            assert f'{name}{{model_name="tiny-llama-v1",role="{role}"}}' in text, (worker.name, name)
        if role == "decode":
            assert deployment.metric("baton:kv_transfer_bytes_total", worker.name) > 0
    assert deployment.metric("baton:generation_tokens_total", "router") > 0


def test_stop_string_inside_the_first_token(deployment):
    """The first token comes from the prefill worker in disaggregated mode: a stop string that
    starts in it must be cut the same way."""
    client = deployment.client()
    base = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=8,
                                     extra_body=NO_EOS, **GREEDY).choices[0].text
    for stop in (base[:2], base[1:3]):
        for stream in (False, True):
            out = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=8, stop=stop,
                                            stream=stream, extra_body=NO_EOS, **GREEDY)
            text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
            assert text == base[: base.find(stop)], (stop, stream)


def test_structured_output_is_enforced(deployment):
    client = deployment.client()
    choice = client.chat.completions.create(model="tiny-llama-v1", messages=MESSAGES, max_tokens=10,
                                            extra_body={"guided_choice": ["Paris", "Lyon"]}, **GREEDY)
    assert choice.choices[0].message.content in ("Paris", "Lyon")
    assert choice.choices[0].finish_reason == "stop"
    digits = client.completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=10, temperature=1.0,
                                       seed=5, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", digits.choices[0].text), digits.choices[0].text
