"""Multi-LoRA on CUDA: the Triton shrink/expand kernels inside the decode CUDA graphs.

Float32 on the GPU against transformers + PEFT's float32 on the CPU (greedy tokens equal,
as on the CPU path); bf16 kernels against the torch reference product.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from baton.engine import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _engine_lora_tests():
    path = Path(__file__).parents[1] / "engine" / "test_lora.py"
    spec = importlib.util.spec_from_file_location("engine_test_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lora_tests = _engine_lora_tests()


@pytest.fixture(scope="module")
def adapters(hf_models, tmp_path_factory):
    base = hf_models["llama"]
    root = tmp_path_factory.mktemp("lora-cuda")
    return {
        "a": lora_tests.write_adapter(base, root / "a", 8, ["q_proj", "v_proj"], seed=1),
        "b": lora_tests.write_adapter(base, root / "b", 16, lora_tests.ALL, seed=2),
        "c": lora_tests.write_adapter(base, root / "c", 4, ["o_proj", "gate_proj", "down_proj"], seed=3, rslora=True),
    }


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_mixed_adapters_on_cuda_equal_peft(hf_models, adapters, enforce_eager):
    base = hf_models["llama"]
    loras = lora_tests._requests(adapters)
    ref = lora_tests.PeftReference()
    llm = LLM(model=str(base), device="cuda", dtype="float32", enable_lora=True, max_loras=3,
              num_gpu_blocks_override=256, block_size=16, enforce_eager=enforce_eager)
    plan = [(p, n) for p in lora_tests.PROMPTS for n in (None, "a", "b", "c")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in plan], lora_tests.GREEDY,
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
