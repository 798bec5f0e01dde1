"""The engine on CUDA (Triton kernels, fused ops, CUDA graphs) equals transformers token for token.

Float32 on the GPU against transformers' float32 on the CPU: greedy tokens must be equal, as
on the CPU path. bf16: the fast path against the engine's own reference path (torch
attention, no fused kernels, no graphs) on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from baton.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [
    [0, 17, 250, 33],
    [0] + list(range(40, 93)),
    [0, 400],
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def generate(model_dir, prompts=PROMPTS, params=GREEDY, **engine_args):
    engine_args.setdefault("num_gpu_blocks_override", 256)
    engine_args.setdefault("dtype", "float32")
    llm = LLM(model=str(model_dir), device="cuda", **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "llama31", "llama32", "mistral", "qwen2", "qwen3"])
def test_fast_path_matches_transformers(hf_models, hf, arch):
    llm, got = generate(hf_models[arch], block_size=16)
    runner = llm.engine.runner
    assert runner.backend_name == "triton" and runner.graphs is not None
    assert runner.graphs.num_replays > 0  # decode steps ran as graph replays
    # Qwen3's q/k norms have no fast-path form: it runs its reference forward on CUDA.
    assert (runner.model is runner.reference) == (arch == "qwen3")
    assert got == [hf.greedy(hf_models[arch], p, MAX_NEW) for p in PROMPTS]


def test_chunked_prefill_prefix_cache_and_eager_mode_match_transformers(hf_models, hf):
    model = hf_models["llama"]
    want = [hf.greedy(model, p, MAX_NEW) for p in PROMPTS]
    _, chunked = generate(model, block_size=4, max_num_batched_tokens=7)
    assert chunked == want
    _, eager = generate(model, block_size=8, enforce_eager=True)
    assert eager == want
    llm, first = generate(model, prompts=PROMPTS[1:2], block_size=4)
    again = llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first[0] == want[1]


def test_bf16_fast_path_matches_the_reference_path(hf_models):
    from baton.engine.config import KernelConfig

    model = hf_models["llama31"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    fast, fast_tokens = generate(model, params=params, dtype="bfloat16")
    ref, ref_tokens = generate(model, params=params, dtype="bfloat16", attention_backend="torch",
                               enforce_eager=True, kernel_config=KernelConfig(fused_kernels=False))
    assert ref.engine.runner.graphs is None and ref.engine.runner.model is ref.engine.runner.reference
    assert fast_tokens == ref_tokens


def assert_greedy_close(got, want, tol=0.1):
    """Greedy bf16 outputs of two paths agree: each token's logprob within `tol` of the other
    path's, and where the tokens part, the reference's choice led by at most `tol` (a near
    tie: 0.0625 is a bf16 step of logits between 8 and 16); the rest of that output is free."""
    for g, w in zip(got, want, strict=True):
        for pos, (g_tok, w_tok) in enumerate(zip(g.token_ids, w.token_ids, strict=True)):
            g_lp, w_lp = g.logprobs[pos], w.logprobs[pos]
            if g_tok != w_tok:
                assert g_tok in w_lp and w_lp[w_tok] - w_lp[g_tok] <= tol, (pos, g_lp, w_lp)
                break
            assert abs(g_lp[g_tok] - w_lp[w_tok]) <= tol, (pos, g_lp, w_lp)


def test_rotary_epilogue_matches_the_reference_path(tmp_path, monkeypatch):
    """With `KernelConfig.rope_epilogue` the steps the attention does not rotate for (here
    every step: the prompts' chunks of 16 tokens, and decode steps with
    `rope_attention_max_pairs` 0, as batch 32 of Llama-3.1-8B) rotate and store keys and values in the Q/K/V product's
    epilogue; greedy bf16 outputs agree with the reference path's. The credit makes the tiny
    model's products take the few-row kernels, which cuBLAS beats at these shapes; 32-dimension
    heads: the smallest the epilogue's tiles fit."""
    import json

    from safetensors.torch import save_file

    from baton.engine.config import KernelConfig
    from baton.engine.fastpath.projection import FewRowLinear
    from baton.engine.tiny_model import random_llama_weights, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["head_dim"] = 32
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in random_llama_weights(config).items()}, str(model_dir / "model.safetensors"))
    kernels = KernelConfig(rope_epilogue=True, fused_credit_us=1e9, rope_attention_max_pairs=0)
    rotated = []
    qkv_rope = FewRowLinear.qkv_rope

    def counted(self, x, rope):
        out = qkv_rope(self, x, rope)
        rotated.append((out is not None, len(rope.slots)))
        return out

    monkeypatch.setattr(FewRowLinear, "qkv_rope", counted)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    fast = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256, max_num_seqs=8,
               max_num_batched_tokens=16, kernel_config=kernels)  # tuned row counts: up to max(16, max_num_seqs)
    got = fast.generate(prompts, params)
    assert fast.engine.runner.graphs.num_replays > 0
    used = {rows for done, rows in rotated if done}
    assert 16 in used and 8 in used, rotated  # a prompt chunk, and the batch-8 decode graph's capture
    ref = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256,
              attention_backend="torch", enforce_eager=True, max_num_batched_tokens=16,
              kernel_config=KernelConfig(fused_kernels=False))
    want = ref.generate(prompts, params)
    assert_greedy_close([o.outputs[0] for o in got], [o.outputs[0] for o in want])


def test_embeddings_on_cuda_match_transformers_beside_running_decodes(hf_models):
    """Pooled prefills share steps with decodes (graph-replayed when alone): a one-token
    prompt makes a step that looks decode-only, which must still run eagerly for its hidden
    states."""
    from transformers import AutoModel

    from baton.engine import PoolingParams

    model_dir = hf_models["llama"]
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", task="embed", num_gpu_blocks_override=256)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"g{i}", {"prompt_token_ids": p}, GREEDY)
    engine.step()  # the generations are decoding when the embeddings arrive
    embeds = [*PROMPTS, [5]]
    for i, p in enumerate(embeds):
        engine.add_request(f"e{i}", {"prompt_token_ids": p}, PoolingParams())
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, p in enumerate(embeds):
        with torch.no_grad():
            hidden = model(torch.tensor([p])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(hidden, dim=0)
        assert torch.allclose(torch.tensor(finals[f"e{i}"].outputs.embedding), want, atol=1e-3)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
