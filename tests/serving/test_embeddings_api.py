"""/v1/embeddings through the router with the official `openai` client: `baton up --task embed`
(colocated, and disaggregated where the prefill workers pool) and `baton serve --task embed`, against transformers' model on
the same saved weights (a plain decoder: last token, normalized)."""

from __future__ import annotations

import openai
import pytest
import torch
from serving_harness import baton_up, wait_until

from baton.tokenizer import Tokenizer

MODEL = "tiny-llama-v1"
TEXTS = ["The quick brown fox", "Hello", "Embeddings are the final hidden states, pooled."]


@pytest.fixture(scope="module", params=["colocated", "disaggregated", "served_embed"])
def embed_deployment(request, _tiny_model_cache):
    if request.param == "served_embed":  # `baton serve MODEL --task embed`, shared by other modules
        yield request.getfixturevalue("served_embed")
        return
    dep = baton_up("--mode", request.param, "--task", "embed")
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer(tiny_model_dir)

    def embed(ids: list[int] | str) -> torch.Tensor:
        ids = tokenizer.encode(ids) if isinstance(ids, str) else ids
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden[-1], dim=0)

    return embed


def test_a_batch_of_texts_equals_the_torch_reference(embed_deployment, reference, tiny_model_dir):
    out = embed_deployment.client().embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in out.data] == [0, 1, 2] and out.object == "list"
    for text, item in zip(TEXTS, out.data):
        assert torch.allclose(torch.tensor(item.embedding), reference(text), atol=1e-4)
    tokenizer = Tokenizer(tiny_model_dir)
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS) == out.usage.total_tokens
    # Nothing stays in the KV pool once the embeddings are computed.
    for worker in embed_deployment.workers():
        wait_until(lambda w=worker: embed_deployment.metric("baton:kv_cache_usage_perc", w.name) == 0.0,
                   timeout=30, what=f"{worker.name}'s KV pool to be empty")


def test_base64_and_token_inputs_give_the_same_vectors(embed_deployment, reference):
    client = embed_deployment.client()
    # The client asks for base64 by default and decodes it to floats itself.
    b64 = client.embeddings.create(model=MODEL, input=TEXTS[0])
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert torch.allclose(torch.tensor(b64.data[0].embedding), torch.tensor(floats.data[0].embedding))
    tokens = [[0, 40, 41, 42], [0, 7, 300]]
    by_ids = client.embeddings.create(model=MODEL, input=tokens, encoding_format="float")
    for ids, item in zip(tokens, by_ids.data):
        assert torch.allclose(torch.tensor(item.embedding), reference(ids), atol=1e-4)
    again = client.embeddings.create(model=MODEL, input=tokens, encoding_format="float")
    assert [d.embedding for d in again.data] == [d.embedding for d in by_ids.data]


@pytest.mark.parametrize("kwargs, param", [
    ({"input": TEXTS[0], "dimensions": 8}, "dimensions"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": "x " * 5000}, "input"),
    ({"input": [[10**6]]}, "input"),
    ({"input": [[0, 1], [0, 10**6]]}, "input.1"),
    ({"input": TEXTS[0], "encoding_format": "hex"}, "encoding_format"),
])
def test_bad_embedding_requests_are_a_400_naming_the_parameter(embed_deployment, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        embed_deployment.client().embeddings.create(model=MODEL, **kwargs)
    assert caught.value.body["param"] == param


def test_a_model_not_served_for_embeddings_is_a_400(colocated):
    with pytest.raises(openai.BadRequestError) as caught:
        colocated.client().embeddings.create(model=MODEL, input="hi")
    assert caught.value.body["param"] == "model" and "--task embed" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        colocated.client().embeddings.create(model="other", input="hi")
