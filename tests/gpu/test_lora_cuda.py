"""Multi-LoRA on CUDA: the Triton shrink/expand kernels inside the decode CUDA graphs.

Float32 on the GPU against transformers + PEFT's float32 on the CPU (greedy tokens equal,
as on the CPU path); bf16 kernels against the torch reference product.
"""

from __future__ import annotations

import pytest
import torch
from lora_helpers import GREEDY, PROMPTS, PeftReference, lora_requests, write_three_adapters

from baton.engine import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def adapters(hf_models, tmp_path_factory):
    return write_three_adapters(hf_models["llama"], tmp_path_factory.mktemp("lora-cuda"))


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_mixed_adapters_on_cuda_equal_peft(hf_models, adapters, enforce_eager):
    base = hf_models["llama"]
    loras = lora_requests(adapters)
    ref = PeftReference()
    llm = LLM(model=str(base), device="cuda", dtype="float32", enable_lora=True, max_loras=3,
              num_gpu_blocks_override=256, block_size=16, enforce_eager=enforce_eager)
    plan = [(p, n) for p in PROMPTS for n in (None, "a", "b", "c")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], GREEDY,
                        lora_request=[loras[n] if n else None for _, n in plan])
    for (prompt, name), out in zip(plan, outs):
        assert out.outputs[0].token_ids == ref.greedy(base, adapters[name] if name else None, prompt)[0], name
    graphs = llm.engine.runner.graphs
    assert (graphs is None) == enforce_eager
    if graphs is not None:
        assert graphs.num_replays > 0  # decode steps with adapters ran as graph replays


@pytest.mark.parametrize("tokens", [1, 8, 32, 300])
def test_bf16_kernels_equal_the_reference_product(tokens):
    from baton.engine.lora.ops import add_lora_reference
    from baton.engine.lora.triton_ops import add_lora_triton

    gen = torch.Generator().manual_seed(tokens)
    rank, d_in, widths = 16, 4096, [4096, 1024, 1024]
    a = (torch.randn(9, 3 * rank, d_in, generator=gen) / d_in**0.5).bfloat16().cuda()
    b = (torch.randn(9, sum(widths), rank, generator=gen) / rank**0.5).bfloat16().cuda()
    x = torch.randn(tokens, d_in, generator=gen).bfloat16().cuda()
    y = torch.randn(tokens, sum(widths), generator=gen).bfloat16().cuda()
    slots = torch.randint(0, 9, (tokens,), generator=gen, dtype=torch.int32).cuda()
    want = add_lora_reference(y.float(), x.float(), a.float(), b.float(), slots, [0, 4096, 5120], rank)
    got = add_lora_triton(y.clone(), x, a, b, slots, [0, 4096, 5120], rank)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
