"""Completions' echo, vLLM's prompt_logprobs and best_of through the router with the official
`openai` client, in every deployment mode and through `baton serve` (the prefill worker
computes prompt logprobs when disaggregated), checked against the offline engine on the same weights."""

from __future__ import annotations

import grpc
import httpx
import pytest

from baton.protos import worker_pb2, worker_pb2_grpc

PROMPT = "The quick brown fox"
MODEL = "tiny-llama-v1"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module", params=["disaggregated", "disaggregated_ucx", "colocated", "served_embed"])
def deployment(request):
    """Every `baton up` mode, and `baton serve` (vLLM's drop-in)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from baton.engine import LLM

    return LLM(model=str(tiny_model_dir), device="cpu", num_gpu_blocks_override=64)


def offline_prompt_logprobs(offline, prompt, k):
    from baton.engine import SamplingParams

    out = offline.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=k, **GREEDY))[0]
    return out.prompt_token_ids, out.prompt_logprobs


def test_echo_with_logprobs_returns_the_prompt_tokens_first(deployment, offline):
    out = deployment.client().completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=1,
                                                 logprobs=1, **GREEDY)
    ids, expected = offline_prompt_logprobs(offline, PROMPT, 1)
    choice = out.choices[0]
    plain = deployment.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, **GREEDY)
    assert choice.text == PROMPT + plain.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(expected[pos][ids[pos]], abs=1e-4)
        assert len(lp.top_logprobs[pos]) >= 1
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert out.usage.completion_tokens == 1


def test_echo_streamed_equals_echo_whole(deployment):
    client = deployment.client()
    kwargs = dict(model=MODEL, prompt=[PROMPT, "Hello"], echo=True, max_tokens=5, **GREEDY)
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert texts[0].startswith(PROMPT) and texts[1].startswith("Hello")


def test_prompt_logprobs_match_the_offline_engine(deployment, offline):
    out = deployment.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                                 extra_body={"prompt_logprobs": 3}, **GREEDY)
    ids, expected = offline_prompt_logprobs(offline, PROMPT, 3)
    got = out.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for pos in range(1, len(ids)):
        entry = got[pos]
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(expected[pos][ids[pos]], abs=1e-4)
        ranked = sorted(((v["logprob"], int(t)) for t, v in entry.items() if v["rank"] is not None), reverse=True)
        assert [entry[str(t)]["rank"] for _, t in ranked] == list(range(1, len(ranked) + 1))
        assert len(ranked) >= 3
        top = sorted(((lp, t) for t, lp in expected[pos].items()), reverse=True)[:3]
        assert [t for _, t in ranked[:3]] == [t for _, t in top]


def test_chat_prompt_logprobs_are_per_response(deployment):
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=2,
        extra_body={"prompt_logprobs": 0}, **GREEDY)
    body = out.model_extra["prompt_logprobs"]
    assert body[0] is None and len(body) > 3
    assert all(len(entry) == 1 for entry in body[1:])  # just the prompt's own token


def test_best_of_returns_the_n_most_likely_of_the_candidates(deployment):
    client = deployment.client()
    sampled = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11,
                   extra_body={"ignore_eos": True})
    every = client.completions.create(n=4, logprobs=0, **sampled)
    best = client.completions.create(n=2, best_of=4, **sampled)
    ranked = sorted(every.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert len({c.text for c in every.choices}) > 2
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 4 * 6  # every candidate ran, as OpenAI counts it


@pytest.mark.parametrize("body, param", [
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": "3"}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"echo": "yes"}, "echo"),
])
def test_bad_extras_are_a_400_naming_the_parameter(deployment, body, param):
    headers = {"Authorization": f"Bearer {deployment.api_key}"} if deployment.api_key else {}
    r = httpx.post(f"{deployment.url}/v1/completions", headers=headers, timeout=30,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_detokenize_false_reaches_the_worker(colocated, tiny_model_dir):
    """A worker asked for token ids only sends no text (vLLM's SamplingParams.detokenize)."""
    from baton.tokenizer import Tokenizer

    ids = Tokenizer(tiny_model_dir).encode(PROMPT)
    address = colocated.workers()[0].grpc

    def generate(detokenize: bool):
        params = worker_pb2.SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=6,
                                           ignore_eos=True, skip_special_tokens=True, detokenize=detokenize)
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            request = worker_pb2.GenerateRequest(request_id=f"detok-{detokenize}", prompt_token_ids=ids,
                                                 params=params)
            chunks = list(stub.Generate(request, timeout=60))
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

    tokens, text = generate(True)
    bare_tokens, bare_text = generate(False)
    assert bare_tokens == tokens and len(tokens) == 6
    assert text and bare_text == ""


def test_a_stream_carries_prompt_logprobs_in_its_first_chunk(deployment):
    client = deployment.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                      extra_body={"prompt_logprobs": 1}, **GREEDY)
    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True,
                                                   extra_body={"prompt_logprobs": 1}, **GREEDY) if c.choices]
    assert chunks[0].choices[0].model_extra["prompt_logprobs"] == whole.choices[0].model_extra["prompt_logprobs"]
    assert all("prompt_logprobs" not in c.choices[0].model_extra for c in chunks[1:])
    chat = [c for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
        extra_body={"prompt_logprobs": 0}, **GREEDY)]
    firsts = [c.model_extra.get("prompt_logprobs") for c in chat]
    assert firsts[0][0] is None and len(firsts[0]) > 2 and all(f is None for f in firsts[1:])
