"""Multi-LoRA: adapters written by PEFT, mixed in one batch, equal PEFT's own forward.

Adapters are made by `peft` on the tiny transformers models of conftest.py (random A and B,
so every adapted projection changes the output; `lora_helpers.write_adapter`) and saved as
PEFT saves them; the
reference for each request is transformers + PEFT with that one adapter (or none).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from lora_helpers import GREEDY, PROMPTS, PeftReference, lora_requests, write_three_adapters

from baton.engine import LLM, LoRARequest, SamplingParams
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


def _error(out) -> str:
    assert out.finished and out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
    return out.error


def test_bad_adapters_fail_only_their_requests_clearly_and_leak_nothing(hf_models, adapters, tmp_path):
    base, loras = hf_models["llama"], lora_requests(adapters["llama"])
    llm = _llm(base, max_loras=2, max_lora_rank=8)
    prompts = [{"prompt_token_ids": PROMPTS[0]}] * 2
    missing = LoRARequest("missing", 9, str(tmp_path / "nowhere"))
    good, bad = llm.generate(prompts, GREEDY, lora_request=[loras["a"], missing])
    assert good.outputs[0].finish_reason == "length" and good.error is None
    assert "nowhere' is not a directory" in _error(bad)
    _nothing_held(llm)
    assert "rank 16, above max_lora_rank=8" in _error(llm.generate(prompts[:1], GREEDY, lora_request=loras["b"])[0])
    # An id is one adapter: naming it with another path is refused at once (nothing queued).
    with pytest.raises(LoRAError, match="lora_int_id 1 is adapter 'a'"):
        llm.generate(prompts, GREEDY, lora_request=[loras["a"], LoRARequest("c", 1, str(adapters["llama"]["c"]))])
    other_model = tmp_path / "other"
    other_model.mkdir()
    (other_model / "adapter_config.json").write_text((adapters["llama"]["a"] / "adapter_config.json").read_text())
    (other_model / "adapter_model.safetensors").write_bytes(
        (adapters["qwen3"]["a"] / "adapter_model.safetensors").read_bytes())  # head_dim 32: other shapes
    out = llm.generate(prompts[:1], GREEDY, lora_request=LoRARequest("other", 5, str(other_model)))[0]
    assert "do not fit the base model" in _error(out)
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["llama"]["a"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "DoRA" in _error(llm.generate(prompts[:1], GREEDY, lora_request=LoRARequest("dora", 6, str(dora)))[0])
    _nothing_held(llm)
    assert llm.engine.stats().lora.reading == []
    # The engine still serves, adapters and all.
    assert llm.generate(prompts, GREEDY, lora_request=loras["a"])[0].outputs[0].token_ids


def _slow_adapter(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` whose adapter_config.json is a FIFO: reading the adapter blocks
    until a test writes the config into it (`_release`), a real disk read we control."""
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    os.mkfifo(out / "adapter_config.json")
    return out


def _release(slow: Path, text: str) -> None:
    with open(slow / "adapter_config.json", "w") as fifo:  # blocks until the reader opened it
        fifo.write(text)


def _unblocking(*slow: Path) -> threading.Event:
    """Until the returned event is set, end every read stuck on these FIFOs (it sees an
    empty file): a failed test's clean-up cannot hang on them."""
    stop = threading.Event()

    def run():
        while not stop.wait(0.05):
            for path in slow:
                try:
                    os.close(os.open(path / "adapter_config.json", os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader waits
                    pass

    threading.Thread(target=run, daemon=True).start()
    return stop


def test_a_prefilled_request_waiting_for_a_failed_read_frees_its_blocks(hf_models, adapters, tmp_path):
    """The decode side of a KV handoff: the request holds reserved blocks while its adapter
    is read; a read that fails ends it and gives the blocks back."""
    llm = _llm(hf_models["llama"], max_loras=2)
    engine = llm.engine
    slow = _slow_adapter(adapters["llama"]["a"], tmp_path / "slow")
    blocks = engine.reserve_blocks(len(PROMPTS[1]))
    engine.add_prefilled_request("p", PROMPTS[1], GREEDY, blocks, first_token_id=7,
                                 lora_request=LoRARequest("slow", 4, str(slow)))
    for _ in range(3):  # it waits (its adapter is being read) with its first token only
        assert all(not o.finished and o.outputs[0].token_ids == [7] for o in engine.step())
    assert engine.stats().lora.reading == ["slow"] and engine.scheduler.waiting
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks - len(blocks)
    threading.Thread(target=_release, args=(slow, "{not json"), daemon=True).start()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert "adapter_config.json is not readable JSON" in outs[-1].error
    _nothing_held(llm)


async def _until(check, timeout: float = 60.0) -> None:
    """Poll the coroutine function `check` until it returns true; fail after `timeout` s."""
    async def poll():
        while not await check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_running_requests_keep_going_while_an_adapter_is_read(hf_models, adapters, tmp_path):
    """The engine thread never waits on a disk: while one adapter's read is stuck, a
    running request keeps producing tokens and the requests naming it wait; once the read
    ends they run (equal to the adapter read at once); a read that fails ends only the
    requests naming that adapter."""
    from baton.engine import AsyncLLMEngine, EngineArgs
    from baton.metrics import EngineCollector

    base, paths = hf_models["llama"], adapters["llama"]
    want = _llm(base).generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY,
                               lora_request=LoRARequest("b", 1, str(paths["b"])))[0].outputs[0].token_ids
    slow = _slow_adapter(paths["b"], tmp_path / "slow")
    broken = _slow_adapter(paths["a"], tmp_path / "broken")
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=str(base), device="cpu", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
        num_gpu_blocks_override=256, block_size=4))
    try:
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        tokens_seen = []

        async def run_long():
            async for out in engine.generate({"prompt_token_ids": PROMPTS[1]}, long, "long"):
                tokens_seen.append(len(out.outputs[0].token_ids))
            return out

        async def final(rid, lora):
            outs = [o async for o in engine.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, rid, lora_request=lora)]
            return outs

        running = asyncio.create_task(run_long())

        async def started():
            return bool(tokens_seen)

        await _until(started)
        waiting = asyncio.create_task(final("slow", LoRARequest("slow", 2, str(slow))))
        failing = asyncio.create_task(final("broken", LoRARequest("broken", 3, str(broken))))
        await _until(lambda: engine.run(lambda e: sorted(e.stats().lora.reading) == ["broken", "slow"]))
        before = tokens_seen[-1]

        async def went_on():  # the running request goes on meanwhile
            return tokens_seen[-1] >= before + 20

        await _until(went_on)
        assert not waiting.done() and not failing.done()
        waiting_seqs = await engine.run(lambda e: [s.request_id for s in e.scheduler.waiting])
        assert sorted(waiting_seqs) == ["broken", "slow"]
        stats = await engine.run(lambda e: e.stats())
        [reading] = [m for m in EngineCollector(lambda: stats, "tiny", "colocated").collect()
                     if m.name == "baton:lora_adapters_reading"]
        assert reading.samples[0].value == 2

        config = (paths["a"] / "adapter_config.json").read_text()
        await asyncio.to_thread(_release, broken, config.replace('"r": 8', '"r": 99'))
        outs = await asyncio.wait_for(failing, 60)
        assert len(outs) == 1 and "rank 99, above max_lora_rank=16" in _error(outs[0])
        assert not waiting.done() and not running.done()

        await asyncio.to_thread(_release, slow, (paths["b"] / "adapter_config.json").read_text())
        outs = await asyncio.wait_for(waiting, 60)
        assert outs[-1].outputs[0].token_ids == want
        assert not running.done()  # it ran beside the adapter's request
        await engine.abort("long")
        await asyncio.wait_for(running, 60)
        engine_state = await engine.run(lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks,
                                                   dict(e.runner.lora.refs), e.stats().lora))
        free, total, refs, stats = engine_state
        assert free == total and not refs
        assert stats.reading == [] and stats.cached == ["slow"] and stats.disk_loads == 1
    finally:
        unblocking = _unblocking(slow, broken)
        await engine.shutdown()
        unblocking.set()


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
