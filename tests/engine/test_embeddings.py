"""Embeddings (task "embed"): the engine's pooled hidden states against transformers' model
on the same weights, the pooling read from a sentence-transformers config, and no KV kept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from baton.engine import LLM, EngineArgs, LLMEngine, PoolingParams, SamplingParams

PROMPTS = [{"prompt_token_ids": [0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]},
           {"prompt_token_ids": [0, 7, 300, 12]}]


def reference(model_dir, ids, kind: str, normalize: bool = True) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    vec = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[kind]
    return torch.nn.functional.normalize(vec, dim=0) if normalize else vec


def embed_llm(model_dir, **kwargs) -> LLM:
    return LLM(model=str(model_dir), device="cpu", dtype="float32", task="embed", num_gpu_blocks_override=64,
               block_size=4, **kwargs)


@pytest.mark.parametrize("pooling_type", [None, "mean", "cls"])
def test_embedding_equals_transformers_pooled_hidden_states(hf_models, pooling_type):
    model_dir = hf_models["llama"]
    # A step budget of 4 tokens: the prompts are pooled over several prefill chunks.
    llm = embed_llm(model_dir, pooling_type=pooling_type, max_num_batched_tokens=4)
    outs = llm.embed(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        ids = prompt["prompt_token_ids"]
        ref = reference(model_dir, ids, pooling_type or "last")
        assert out.finished and out.prompt_token_ids == ids
        assert torch.allclose(torch.tensor(out.outputs.embedding), ref, atol=1e-4)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # no KV kept after


def test_sentence_transformers_pooling_config_is_read(tmp_path, hf_models):
    model_dir = tmp_path / "st"
    shutil.copytree(hf_models["llama"], model_dir)
    (model_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    llm = embed_llm(model_dir)
    assert llm.engine.config.pooling.type == "mean" and not llm.engine.config.pooling.normalize
    ids = PROMPTS[0]["prompt_token_ids"]
    out = llm.embed([PROMPTS[0]])[0]
    assert torch.allclose(torch.tensor(out.outputs.embedding), reference(model_dir, ids, "mean", False), atol=1e-4)
    normalized = llm.embed([PROMPTS[0]], PoolingParams(normalize=True))[0].outputs.embedding
    assert torch.linalg.vector_norm(torch.tensor(normalized)).item() == pytest.approx(1.0, abs=1e-5)


def test_embeddings_and_generation_share_an_engine(tiny_dir):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_dir), device="cpu", task="embed",
                                                   num_gpu_blocks_override=64, max_model_len=64))
    engine.add_request("gen", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("emb", PROMPTS[1], PoolingParams())
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.finished or out.request_id == "gen"  # an embedding has only its final output
            finals[out.request_id] = out
    assert len(finals["gen"].outputs[0].token_ids) == 4
    assert len(finals["emb"].outputs.embedding) == engine.config.hf_config["hidden_size"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_an_engine_not_run_for_embeddings_refuses_them(tiny_dir):
    llm = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="not served for embeddings"):
        llm.embed(["hello"])
    with pytest.raises(ValueError, match="dimensions is not supported"):
        PoolingParams(dimensions=8)
    with pytest.raises(ValueError, match="task must be one of"):
        EngineArgs(model=str(tiny_dir), task="classify").create_engine_config()


def test_a_preempted_embedding_is_pooled_again_from_its_first_token(hf_models):
    """A pooled prompt preempted mid-prefill is recomputed from position 0: the mean starts
    over rather than counting the first chunks twice."""
    model_dir = hf_models["llama"]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), device="cpu", dtype="float32", task="embed", pooling_type="mean", block_size=4,
        num_gpu_blocks_override=8, max_model_len=32, max_num_batched_tokens=5, enable_prefix_caching=False))
    # The generation's prompt and output fill 8 blocks: it outgrows the pool while the
    # embedding (lower priority) is still in prefill.
    engine.add_request("gen", {"prompt_token_ids": [0, *range(40, 59)]},
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    ids = PROMPTS[0]["prompt_token_ids"]  # 11 tokens: 3 blocks, pooled over several steps
    engine.add_request("emb", {"prompt_token_ids": ids}, PoolingParams(), priority=1)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_preemptions > 0
    got = torch.tensor(finals["emb"].outputs.embedding)
    assert torch.allclose(got, reference(model_dir, ids, "mean", normalize=True), atol=1e-4)
