"""Tensor parallelism on the CPU: TP 2 (two real processes over gloo on loopback) computes
what TP 1 computes, through every engine feature, and a dead rank fails the engine clearly."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from lora_helpers import lora_requests, write_three_adapters

from baton.engine import LLM, GuidedDecodingParams, SamplingParams
from baton.engine.errors import RankFailedError
from baton.engine.parallel.layout import ShardLayout

PROMPTS = [
    [0, 17, 250, 33],
    [0] + list(range(40, 93)),  # 54 tokens: chunked, several blocks
    [0, 400],
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
]
# Blocks of 4 tokens, 16-token steps (every long prompt is chunked), 20 blocks: too few for
# the four sequences at once, so some are preempted and recomputed.
TIGHT = dict(block_size=4, num_gpu_blocks_override=20, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def mqa_odd_vocab(tmp_path_factory, hf_models):
    """One KV head (fewer than the ranks: replicated) and a vocabulary TP 2 does not divide."""
    import shutil

    import transformers

    llama = hf_models["llama"]
    out = tmp_path_factory.mktemp("mqa")
    config = transformers.LlamaConfig.from_pretrained(llama)
    config.num_key_value_heads, config.vocab_size = 1, 515
    torch.manual_seed(99)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, out / name)
    return out


# Per-KV-head scales far apart: a rank that scaled its heads' keys and values by another
# head's scales would store bytes a TP 1 engine reads as other values (the handoff test).
KV_SCALES = {"k": torch.tensor([0.25, 2.0]), "v": torch.tensor([3.0, 0.5])}


@pytest.fixture(scope="module")
def fp8_kv(tmp_path_factory, hf_models):
    """Llama with per-KV-head FP8 KV-cache scales in its checkpoint (compressed-tensors'
    names), served with kv_cache_dtype='fp8' (`ENGINE_ARGS`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("fp8_kv")
    shutil.copytree(hf_models["llama"], out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    for i in range(2):
        for which, scale in KV_SCALES.items():
            tensors[f"model.layers.{i}.self_attn.{which}_scale"] = scale * (i + 1)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# Two slots for three adapters: steps evict and reload adapters on every rank.
ENGINE_ARGS = {"fp8_kv": dict(kv_cache_dtype="fp8"),
               "lora": dict(enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16)}


@pytest.fixture(scope="module")
def models(hf_models, mqa_odd_vocab, fp8_kv):
    return {"llama": hf_models["llama"], "qwen2": hf_models["qwen2"], "qwen3": hf_models["qwen3"],
            "mqa_odd_vocab": mqa_odd_vocab, "fp8_kv": fp8_kv, "lora": hf_models["llama"]}


@pytest.fixture(scope="module")
def engines(models):
    """(model name, tp) -> an LLM over the TIGHT pool, built once per module."""
    built: dict[tuple[str, int], LLM] = {}

    def get(name: str, tp: int) -> LLM:
        if (name, tp) not in built:
            built[name, tp] = LLM(model=str(models[name]), device="cpu", dtype="float32",
                                  tensor_parallel_size=tp, **TIGHT, **ENGINE_ARGS.get(name, {}))
        return built[name, tp]

    yield get
    for llm in built.values():
        llm.engine.runner.close()


def _run(llm: LLM, prompts, params):
    return llm.generate([{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts], params)


def _assert_same(a, b, atol=1e-4):
    """Same tokens, logprobs within `atol` (the all-reduce sums in another order)."""
    for x, y in zip(a, b):
        for cx, cy in zip(x.outputs, y.outputs):
            assert cx.token_ids == cy.token_ids
            assert cx.text == cy.text
            if cx.logprobs is not None:
                for px, py in zip(cx.logprobs, cy.logprobs):
                    assert px.keys() == py.keys()
                    for t in px:
                        assert px[t] == pytest.approx(py[t], abs=atol)


# Qwen2: Q/K/V biases sliced with their rows; Qwen3: q/k norms and a tied LM head; fp8_kv:
# each rank's pool in e4m3 with its KV heads' scales.
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mqa_odd_vocab", "fp8_kv"])
def test_tp2_greedy_equals_tp1_with_chunking_and_preemption(engines, name):
    one, two = engines(name, 1), engines(name, 2)
    preempted = [llm.engine.stats().num_preemptions for llm in (one, two)]
    want, got = _run(one, PROMPTS, GREEDY), _run(two, PROMPTS, GREEDY)
    _assert_same(want, got)
    assert one.engine.stats().num_preemptions > preempted[0]
    assert two.engine.stats().num_preemptions - preempted[1] == one.engine.stats().num_preemptions - preempted[0]
    assert two.engine.block_manager.num_free_blocks == TIGHT["num_gpu_blocks_override"]


def test_each_rank_holds_its_heads_kv_only(engines):
    two = engines("mqa_odd_vocab", 2)
    assert two.engine.runner.kv.shape[-2] == 1  # its one (replicated) KV head
    llama = engines("llama", 2).engine.runner
    assert llama.kv.shape[-2] == 1 and llama.layout.kv_heads == range(0, 1)  # 2 KV heads over 2 ranks


def test_each_rank_holds_its_kv_heads_in_fp8_with_their_scales(engines):
    runner = engines("fp8_kv", 2).engine.runner
    assert runner.kv.dtype == torch.float8_e4m3fn and runner.handoff_kv.dtype == torch.float8_e4m3fn
    scales = runner.reference.layers[1].self_attn.kv_scales  # rank 0: KV head 0, layer 1's scales
    assert scales.k_scale.tolist() == [0.5] and scales.v_scale.tolist() == [6.0]


def test_seeded_sampling_is_the_same(engines):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, n=2, max_tokens=12, ignore_eos=True)
    _assert_same(_run(engines("llama", 1), PROMPTS[:2], params), _run(engines("llama", 2), PROMPTS[:2], params))


def test_prompt_logprobs_are_the_same(engines):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    want, got = _run(engines("llama", 1), PROMPTS[1:2], params), _run(engines("llama", 2), PROMPTS[1:2], params)
    for pw, pg in zip(want[0].prompt_logprobs[1:], got[0].prompt_logprobs[1:]):
        assert pw.keys() == pg.keys()
        assert all(pw[t] == pytest.approx(pg[t], abs=1e-4) for t in pw)


def test_guided_decoding_is_the_same(engines):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                            guided_decoding=GuidedDecodingParams(regex="[a-z]{3,8}"))
    want = _run(engines("llama", 1), ["Name a colour:"], params)
    got = _run(engines("llama", 2), ["Name a colour:"], params)
    _assert_same(want, got)
    assert re.fullmatch("[a-z]{3,8}", got[0].outputs[0].text)


def test_logits_processors_see_the_whole_vocabulary(engines):
    seen = []

    def odd_only(ids, logits):
        seen.append(logits.shape[-1])
        logits[0::2] = float("-inf")
        return logits

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logits_processors=[odd_only])
    want, got = _run(engines("mqa_odd_vocab", 1), PROMPTS[:1], params), _run(engines("mqa_odd_vocab", 2), PROMPTS[:1], params)
    _assert_same(want, got)
    assert all(t % 2 == 1 for t in got[0].outputs[0].token_ids)
    assert set(seen) == {515}  # gathered from both ranks, the padding cut off


def test_prefix_cache_hits_as_at_tp1(engines):
    prefix = list(range(100, 130))
    results = []
    for tp in (1, 2):
        llm = engines("llama", tp)
        _run(llm, [[0] + prefix + [7]], GREEDY)
        second = _run(llm, [[0] + prefix + [9, 10]], GREEDY)
        results.append(second)
        assert second[0].num_cached_tokens == 28  # 7 full blocks of 4 of the shared 31 tokens
    _assert_same(*results)


def test_mixed_adapter_batch_is_the_same(engines, hf_models, tmp_path_factory):
    """Adapters on q/v ("a"), on all seven projections ("b"), on o/gate/down only ("c", the
    row-parallel ones: each rank's B (A_r x_r) summed by the layer's all-reduce), and the
    base model, mixed in the steps of one generate, with preemption and chunking; two slots
    for three adapters, so the ranks evict and reload them as rank 0 does."""
    loras = lora_requests(write_three_adapters(hf_models["llama"], tmp_path_factory.mktemp("tp-lora")))
    plan = [(p, name) for p in PROMPTS[:3] for name in (None, "a", "b", "c")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    want, got = ([o for o in engines("lora", tp).generate([{"prompt_token_ids": p} for p, _ in plan], params,
                                                          lora_request=[loras[n] if n else None for _, n in plan])]
                 for tp in (1, 2))
    _assert_same(want, got, atol=2e-3)  # test_lora.py's tolerance against PEFT
    assert len({tuple(o.outputs[0].token_ids) for o in got[:4]}) == 4  # each adapter changed the output
    two = engines("lora", 2).engine
    assert two.stats().lora.evictions > 0
    # Rank 1 started each adapter's read when rank 0 started its own (at the request's
    # add), so no step had to start one: each was taken in from its prefetch.
    assert two.runner.model.lora_reads() == [(3, 0)]
    assert two.block_manager.num_free_blocks == TIGHT["num_gpu_blocks_override"]


def _final(engine, request_id: str):
    """Step `engine` until it is idle; the request's final output."""
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return next(o for o in outputs if o.request_id == request_id and o.finished)


@pytest.mark.parametrize("name", ["llama", "mqa_odd_vocab", "fp8_kv"])
@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (2, 2)])
def test_kv_handed_off_between_tp_layouts_continues_as_a_colocated_run(engines, name, prefill_tp, decode_tp):
    """A prompt prefilled at one TP and decoded at another: the handoff pool is in the whole
    model's layout on both sides (each rank's KV heads gathered into it, or spread from it),
    so the bytes a transport copies are the same whatever the TP, and decoding continues
    exactly as a colocated TP 1 run."""
    prompt = [0] + list(range(40, 60))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [want] = _run(engines(name, 1), [prompt], greedy)
    prefill, decode = engines(name, prefill_tp).engine, engines(name, decode_tp).engine
    prefill.add_request("h", {"prompt_token_ids": prompt}, greedy, hold_kv=True)
    first = _final(prefill, "h").outputs[0]
    assert first.finish_reason == "handoff"
    held = prefill.held_blocks("h")
    assert prefill.kv_cache.shape[-2] == 1 if name == "mqa_odd_vocab" else 2  # every KV head
    reserved = decode.reserve_blocks(len(prompt))
    decode.kv_cache[reserved] = prefill.kv_cache[held]  # what a transport does, byte for byte
    prefill.release_held("h")
    decode.add_prefilled_request("d", prompt, greedy, reserved, first.token_ids[0])
    got = _final(decode, "d").outputs[0]
    assert got.token_ids == want.outputs[0].token_ids
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == TIGHT["num_gpu_blocks_override"]


def test_a_killed_rank_fails_the_engine_with_a_clear_error(tiny_dir):
    llm = LLM(model=str(tiny_dir), device="cpu", tensor_parallel_size=2, num_gpu_blocks_override=32)
    engine = llm.engine
    rank1 = engine.runner.model.ranks.procs[0]
    engine.add_request("r", {"prompt_token_ids": [0, 5, 6]}, SamplingParams(max_tokens=1000, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(rank1.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL.*restart the engine"):
        engine.step()
    assert time.monotonic() - started < 60  # failed, not waited out
    with pytest.raises(RankFailedError, match="rank 1"):  # and stays failed
        engine.step()
    engine.abort_request("r")
    assert engine.block_manager.num_free_blocks == 32


def test_ranks_exit_when_the_engine_process_is_killed(tiny_dir):
    """No orphaned rank holds a device after its engine process dies outright."""
    import subprocess
    import sys

    script = (f"from baton.engine import LLM; llm = LLM(model={str(tiny_dir)!r}, device='cpu', "
              f"tensor_parallel_size=2, num_gpu_blocks_override=8); "
              f"print(llm.engine.runner.model.ranks.procs[0].pid, flush=True); import time; time.sleep(600)")
    engine = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        rank1 = int(engine.stdout.readline())
        engine.kill()
        engine.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _running(rank1):
            time.sleep(0.2)
        assert not _running(rank1)
    finally:
        engine.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_close_stops_the_other_ranks(tiny_dir):
    llm = LLM(model=str(tiny_dir), device="cpu", tensor_parallel_size=2, num_gpu_blocks_override=8)
    proc = llm.engine.runner.model.ranks.procs[0]
    assert proc.poll() is None
    llm.engine.runner.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("args, message", [
    (dict(tensor_parallel_size=3), r"tensor_parallel_size=3 does not divide this model's 4 attention heads"),
    (dict(tensor_parallel_size=0), r"tensor_parallel_size must be an integer >= 1"),
])
def test_what_tensor_parallelism_cannot_do_is_refused(tiny_dir, args, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=8, **args)


def test_a_registered_architecture_is_refused(tmp_path, tiny_dir):
    import json
    import shutil

    from baton.engine import ModelRegistry
    from baton.engine.models.llama import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    ModelRegistry.register_model("MyTPLlamaForCausalLM", MyLlama)
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["MyTPLlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="shards the built-in .* only, not MyTPLlamaForCausalLM"):
        LLM(model=str(model), device="cpu", num_gpu_blocks_override=8, tensor_parallel_size=2)


def test_layout_of_heads_with_replicated_kv():
    cfg = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=32, vocab_size=10)
    layouts = [ShardLayout.of(cfg, 4, r) for r in range(4)]
    assert [(lay.heads, lay.kv_heads) for lay in layouts] == [
        (range(0, 2), range(0, 1)), (range(2, 4), range(0, 1)), (range(4, 6), range(1, 2)), (range(6, 8), range(1, 2))]
    assert [lay.vocab for lay in layouts] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert layouts[1].describe() == "TP 4 rank 1: heads 2-3, KV heads 0-0"
