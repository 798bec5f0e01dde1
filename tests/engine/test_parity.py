"""Greedy output equals Hugging Face transformers token for token, on every architecture."""

from __future__ import annotations

import pytest
import torch

from baton.engine import LLM, SamplingParams

ARCHS = ["llama", "llama31", "llama32", "mistral", "qwen2", "qwen3"]  # built in conftest.py

PROMPTS = [
    [0, 17, 250, 33],
    [0] + list(range(40, 93)),  # 54 tokens: several blocks
    [0, 400],
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def _generate(model_dir, prompts=PROMPTS, params=GREEDY, **engine_args):
    engine_args.setdefault("num_gpu_blocks_override", 256)
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batch_of_prompts_matches_transformers(hf_models, hf, arch):
    _, got = _generate(hf_models[arch], block_size=16)
    want = [hf.greedy(hf_models[arch], p, MAX_NEW) for p in PROMPTS]
    assert got == want


def test_embedded_tiny_model_matches_transformers(tiny_dir, hf):
    _, got = _generate(tiny_dir)
    assert got == [hf.greedy(tiny_dir, p, MAX_NEW) for p in PROMPTS]


def test_chunked_prefill_with_budget_smaller_than_prompt(hf_models, hf):
    model = hf_models["llama"]
    llm, got = _generate(model, block_size=4, max_num_batched_tokens=7)
    assert got == [hf.greedy(model, p, MAX_NEW) for p in PROMPTS]


def test_shared_prefix_hits_the_cache_and_gives_the_same_tokens(hf_models, hf):
    model = hf_models["llama"]
    llm = LLM(model=str(model), device="cpu", num_gpu_blocks_override=64, block_size=4)
    prefix = list(range(100, 130))
    first = llm.generate([{"prompt_token_ids": [0] + prefix + [7]}], GREEDY)[0]
    hits_before = llm.engine.stats().prefix_cache_hits
    second_prompt = [0] + prefix + [9, 10]
    second = llm.generate([{"prompt_token_ids": second_prompt}], GREEDY)[0]
    stats = llm.engine.stats()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 28  # 7 full blocks of 4 of the shared 31 tokens
    assert stats.prefix_cache_hits - hits_before == 28
    assert second.outputs[0].token_ids == hf.greedy(model, second_prompt, MAX_NEW)


def test_preemption_by_recompute_keeps_outputs_exact(hf_models, hf):
    model = hf_models["llama"]
    # 14 blocks of 4 tokens cannot hold all four sequences at once: some are preempted.
    llm, got = _generate(model, block_size=4, num_gpu_blocks_override=20, max_num_batched_tokens=64)
    assert llm.engine.stats().num_preemptions > 0
    assert got == [hf.greedy(model, p, MAX_NEW) for p in PROMPTS]
    assert llm.engine.block_manager.num_free_blocks == 20


def test_abort_mid_generation_returns_every_block(tiny_dir):
    llm = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=64, block_size=4)
    engine = llm.engine
    free = engine.block_manager.num_free_blocks
    engine.add_request("a", {"prompt_token_ids": list(range(4, 30))}, SamplingParams(max_tokens=100))
    engine.add_request("b", {"prompt_token_ids": list(range(4, 12))}, SamplingParams(max_tokens=100, n=2))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < free
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == free
    assert all(r == 0 for r in engine.block_manager.ref_counts)


def test_logprobs_match_transformers_log_softmax(hf_models, hf):
    model = hf_models["qwen2"]
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    llm = LLM(model=str(model), device="cpu", num_gpu_blocks_override=64)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    completion = out.outputs[0]
    full = prompt + completion.token_ids
    ref = torch.log_softmax(hf.logits(model, full).float(), dim=-1)
    for step, entry in enumerate(completion.logprobs):
        row = ref[len(prompt) - 1 + step]
        token = completion.token_ids[step]
        assert len(entry) == 5 or (len(entry) == 6 and token not in row.topk(5).indices.tolist())
        for tok, lp in entry.items():
            assert lp == pytest.approx(row[tok].item(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(completion.logprobs, completion.token_ids)), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][prompt[pos]] == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
