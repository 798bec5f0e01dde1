"""Multi-LoRA: adapters written by PEFT, mixed in one batch, equal PEFT's own forward.

Adapters are made by `peft` on the tiny transformers models of conftest.py (random A and B,
so every adapted projection changes the output; `lora_helpers.write_adapter`) and saved as
PEFT saves them; the
reference for each request is transformers + PEFT with that one adapter (or none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import GREEDY, PROMPTS, PeftReference, lora_requests, write_three_adapters

from baton.engine import LLM, LoRARequest
from baton.engine.errors import InvalidRequestError
from baton.engine.lora.adapter import LoRAError
from baton.engine.lora.ops import add_lora_reference


@pytest.fixture(scope="module")
def peft_ref() -> PeftReference:
    return PeftReference()


@pytest.fixture(scope="module")
def adapters(hf_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: the three adapters of `write_three_adapters` (ranks 8, 16 and 4)."""
    return {arch: write_three_adapters(base, tmp_path_factory.mktemp(f"lora-{arch}")) for arch, base in hf_models.items()}


def _llm(model: Path, **kwargs) -> LLM:
    kwargs.setdefault("num_gpu_blocks_override", 128)
    kwargs.setdefault("block_size", 4)
    return LLM(model=str(model), device="cpu", dtype="float32", enable_lora=True, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "llama32", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_of_adapters_equals_peft_per_request(hf_models, adapters, peft_ref, arch):
    base, paths = hf_models[arch], adapters[arch]
    loras = lora_requests(paths)
    llm = _llm(base, max_loras=3, max_lora_rank=16)
    # Every prompt under every adapter and the base model, all in one generate: mixed steps.
    plan = [(p, name) for p in PROMPTS for name in (None, "a", "b", "c")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], GREEDY,
                        lora_request=[loras[n] if n else None for _, n in plan])
    for (prompt, name), out in zip(plan, outs):
        tokens, logprobs = peft_ref.greedy(base, paths[name] if name else None, prompt)
        got = out.outputs[0]
        assert got.token_ids == tokens, (name, prompt)
        assert [lp[t] for lp, t in zip(got.logprobs, tokens)] == pytest.approx(logprobs, abs=2e-3)
    assert llm.engine.stats().lora.evictions == 0  # three adapters, three slots


def test_adapters_change_the_output(hf_models, adapters):
    """Guard for the test above: each adapter's tokens differ from the base model's."""
    base, loras = hf_models["llama"], lora_requests(adapters["llama"])
    llm = _llm(base, max_loras=3)
    prompt = [{"prompt_token_ids": PROMPTS[1]}]
    plain = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    for lora in loras.values():
        assert llm.generate(prompt, GREEDY, lora_request=lora)[0].outputs[0].token_ids != plain


def test_one_slot_serialises_adapters_evicts_and_reloads(hf_models, adapters, peft_ref):
    base, paths = hf_models["llama"], adapters["llama"]
    loras = lora_requests(paths)
    llm = _llm(base, max_loras=1, max_cpu_loras=1)
    plan = ["a", "b", None, "c", "a"]
    prompt = PROMPTS[0]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(plan), GREEDY,
                        lora_request=[loras[n] if n else None for n in plan])
    for name, out in zip(plan, outs):
        assert out.outputs[0].token_ids == peft_ref.greedy(base, paths[name] if name else None, prompt)[0]
    stats = llm.engine.stats().lora
    # One slot: each adapter loaded into it in turn, the two "a" requests together.
    assert stats.loads == 3 and stats.evictions == 2
    assert stats.resident == ["c"] or stats.resident == ["a"]
    assert stats.cached == [stats.resident[0]]  # one host copy kept, the others dropped
    assert stats.requests == {"a": 2, "b": 1, "c": 1}
    # "b" left host memory: naming it again reads it from disk again, and it still matches.
    disk_loads = stats.disk_loads
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=loras["b"])[0]
    assert again.outputs[0].token_ids == peft_ref.greedy(base, paths["b"], prompt)[0]
    assert llm.engine.stats().lora.disk_loads == disk_loads + 1


def test_prefix_cache_is_not_shared_across_adapters(hf_models, adapters):
    loras = lora_requests(adapters["llama"])
    llm = _llm(hf_models["llama"], max_loras=2)
    prompt = [{"prompt_token_ids": PROMPTS[1]}]  # 34 tokens: 8 full blocks of 4
    first = llm.generate(prompt, GREEDY, lora_request=loras["a"])[0]
    other = llm.generate(prompt, GREEDY, lora_request=loras["b"])[0]
    plain = llm.generate(prompt, GREEDY)[0]
    same = llm.generate(prompt, GREEDY, lora_request=loras["a"])[0]
    assert first.num_cached_tokens == 0
    assert other.num_cached_tokens == 0 and plain.num_cached_tokens == 0
    assert same.num_cached_tokens == 32
    assert same.outputs[0].token_ids == first.outputs[0].token_ids


def _nothing_held(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.requests and not engine.scheduler.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.runner.lora.refs


def test_bad_adapters_are_refused_clearly_and_leak_nothing(hf_models, adapters, tmp_path):
    base, loras = hf_models["llama"], lora_requests(adapters["llama"])
    llm = _llm(base, max_loras=2, max_lora_rank=8)
    prompts = [{"prompt_token_ids": PROMPTS[0]}] * 2
    missing = LoRARequest("missing", 9, str(tmp_path / "nowhere"))
    with pytest.raises(LoRAError, match="nowhere.*is not a directory"):
        llm.generate(prompts, GREEDY, lora_request=[loras["a"], missing])
    _nothing_held(llm)
    with pytest.raises(LoRAError, match="rank 16, above max_lora_rank=8"):
        llm.generate(prompts[:1], GREEDY, lora_request=loras["b"])
    with pytest.raises(LoRAError, match="lora_int_id 1 is adapter 'a'"):
        llm.generate(prompts, GREEDY, lora_request=[loras["a"], LoRARequest("c", 1, str(adapters["llama"]["c"]))])
    other_model = tmp_path / "other"
    other_model.mkdir()
    (other_model / "adapter_config.json").write_text((adapters["llama"]["a"] / "adapter_config.json").read_text())
    (other_model / "adapter_model.safetensors").write_bytes(
        (adapters["qwen3"]["a"] / "adapter_model.safetensors").read_bytes())  # head_dim 32: other shapes
    with pytest.raises(LoRAError, match="do not fit the base model"):
        llm.generate(prompts[:1], GREEDY, lora_request=LoRARequest("other", 5, str(other_model)))
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["llama"]["a"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="DoRA"):
        llm.generate(prompts[:1], GREEDY, lora_request=LoRARequest("dora", 6, str(dora)))
    _nothing_held(llm)
    # The engine still serves, adapters and all.
    assert llm.generate(prompts, GREEDY, lora_request=loras["a"])[0].outputs[0].token_ids


def test_lora_needs_enable_lora(hf_models, adapters):
    llm = LLM(model=str(hf_models["llama"]), device="cpu", dtype="float32", num_gpu_blocks_override=32)
    lora = LoRARequest("a", 1, str(adapters["llama"]["a"]))
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, lora_request=lora)
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished()


def test_engine_args_are_checked():
    from baton.engine import EngineArgs

    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineArgs(enable_lora=True, max_loras=4, max_cpu_loras=2)._lora_config()
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineArgs(enable_lora=True, max_lora_rank=0)._lora_config()
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/tmp")
    assert EngineArgs(enable_lora=True, max_loras=3)._lora_config().max_cpu_loras == 3


def test_reference_product_equals_per_token_adapters():
    """`add_lora_reference` over zero-padded slots of mixed ranks equals each token's own
    adapter applied alone (two slices, as a fused gate/up)."""
    gen = torch.Generator().manual_seed(0)
    rank, d_in, widths = 8, 12, [5, 7]
    ranks = {1: 3, 2: 8}
    a = torch.zeros(3, 2 * rank, d_in)
    b = torch.zeros(3, sum(widths), rank)
    own = {}
    for s, r in ranks.items():
        pieces = []
        for i, (off, w) in enumerate(zip([0, 5], widths)):
            ai, bi = torch.randn(r, d_in, generator=gen), torch.randn(w, r, generator=gen)
            a[s, i * rank : i * rank + r] = ai
            b[s, off : off + w, :r] = bi
            pieces.append((ai, bi))
        own[s] = pieces
    x = torch.randn(6, d_in, generator=gen)
    slots = torch.tensor([0, 2, 1, 1, 0, 2], dtype=torch.int32)
    y = torch.randn(6, sum(widths), generator=gen)
    want = y.clone()
    for t, s in enumerate(slots.tolist()):
        if s:
            want[t] += torch.cat([bi @ (ai @ x[t]) for ai, bi in own[s]])
    got = add_lora_reference(y.clone(), x, a, b, slots, [0, 5], rank)
    torch.testing.assert_close(got, want)
