"""Helpers of the speculative decoding tests (this folder is put on `sys.path` by conftest).

A random model rarely repeats itself, so prompts here repeat a pattern: n-gram lookup then
drafts from the prompt, the model disagrees with most drafts (rejections) and agrees with
some, mostly once its greedy output loops (acceptances). Tests assert both happened.
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from baton.engine import EngineArgs, LLMEngine

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def make_engine(model: Path, **overrides) -> LLMEngine:
    args = dict(model=str(model), device="cpu", num_gpu_blocks_override=256, block_size=4, max_model_len=256)
    args.update(overrides)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def perturbed_copy(model: Path, out: Path) -> Path:
    """`model` copied to `out` with noise on its last layer's weights: the same tokenizer, a
    different (and disagreeing) distribution: a draft model for the target `model`."""
    shutil.copytree(model, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if "layers.1." in name and tensor.dim() == 2:
            tensor += 0.3 * tensor.std() * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def repetitive_prompts(count: int, seed: int = 0) -> list[dict]:
    """Prompts of a short random pattern repeated six times."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pattern = [rng.randrange(4, 500) for _ in range(rng.randrange(2, 6))]
        prompts.append({"prompt_token_ids": [0] + pattern * 6})
    return prompts


def run(engine: LLMEngine, prompts, params, max_steps: int = 5000) -> list:
    """Add every prompt (one params or one each), step until done; final outputs in order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"r{next(_ids)}" for _ in prompts]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return [finals[rid] for rid in ids]
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("the engine did not finish its requests")


_ids = itertools.count()


def decode_handed_off(prefill: LLMEngine, decode: LLMEngine, prompt: dict, params) -> list[int]:
    """Disaggregation in one process: `prefill` computes the prompt's KV and first token,
    the blocks are copied into `decode` (as a KV transport would), which continues the
    request to the end. Returns the output tokens."""
    prefill.add_request("handoff", prompt, params, hold_kv=True)
    first = None
    while prefill.has_unfinished_requests():
        first = next((o.outputs[0].token_ids[0] for o in prefill.step() if o.finished), first)
    ids = prompt["prompt_token_ids"]
    reserved = decode.reserve_blocks(len(ids))
    decode.kv_cache[torch.tensor(reserved)] = prefill.kv_cache[torch.tensor(prefill.held_blocks("handoff"))]
    prefill.release_held("handoff")
    decode.add_prefilled_request("handoff", ids, params, reserved, first)
    finals = {}
    while decode.has_unfinished_requests():
        finals.update({o.request_id: o for o in decode.step() if o.finished})
    return finals["handoff"].outputs[0].token_ids


def assert_no_leaked_blocks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
