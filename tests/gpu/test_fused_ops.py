"""The fused Llama kernels compute what the torch code they replace computes (on CUDA).

Float32 must agree to rounding; in bf16/fp16 an element may differ in the last place or two
(the kernels sum the variance in another order, contract multiply-adds and use a faster exp;
a result rounded twice can carry a one-unit difference into the second rounding), no more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def assert_close_ulp(got: torch.Tensor, want: torch.Tensor, ulps: int = 1) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    eps = torch.finfo(want.dtype).eps
    diff = (got.float() - want.float()).abs()
    assert (diff <= ulps * eps * want.float().abs().clamp_min(1e-3) * 1.01).all()
    assert (diff == 0).float().mean() > 0.9  # last-place differences stay rare


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 4096, 5120])
def test_add_rms_norm(dtype, hidden):
    from baton.engine.fastpath.triton_ops import add_rms_norm
    from baton.engine.models.llama import RMSNorm

    norm = RMSNorm(hidden, 1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(37, hidden, device="cuda", dtype=dtype)
    residual = torch.randn_like(x) * 4
    want_out, want_res = norm(x, residual.clone())  # the reference model's torch code
    want_plain = norm(x)
    res = residual.clone()
    got_out = add_rms_norm(x, res, norm.weight, norm.eps)
    assert torch.equal(res, want_res)  # the sum is written into the residual buffer
    assert_close_ulp(got_out, want_out, ulps=2)  # normalised and rounded, then scaled and rounded
    assert_close_ulp(add_rms_norm(x, None, norm.weight, norm.eps), want_plain, ulps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul(dtype):
    from baton.engine.fastpath.triton_ops import silu_mul

    gate_up = torch.randn(9, 2 * 14336, device="cuda", dtype=dtype) * 3
    gate, up = gate_up.split(14336, dim=-1)
    assert_close_ulp(silu_mul(gate_up), F.silu(gate) * up, ulps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(32, 8, 128, 16), (12, 4, 80, 4), (4, 4, 64, 1)])
def test_rope_store_rotates_q_and_stores_k_v(dtype, heads, kv_heads, head_dim, block_size):
    from baton.engine.fastpath.triton_ops import rope_store
    from baton.engine.models.llama import LlamaArgs, Rotary

    cfg = {"hidden_size": heads * head_dim, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
           "vocab_size": 8, "max_position_embeddings": 4096, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024}}
    rotary = Rotary(LlamaArgs.from_hf(cfg))
    rotary.build(torch.device("cuda"), 4096)
    t = 11
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    positions = torch.randint(0, 4096, (t,), device="cuda")
    pool = torch.zeros((16, 3, 2, block_size, kv_heads, head_dim), device="cuda", dtype=dtype)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    slots = torch.randperm(16 * block_size, device="cuda")[:t]
    slots[3] = -1  # a padding row: rotated q, nothing stored
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q_ref, k_ref = rotary(positions, qkv[:, :q_size].view(t, heads, head_dim),
                          qkv[:, q_size : q_size + kv_size].view(t, kv_heads, head_dim))
    v_ref = qkv[:, q_size + kv_size :].view(t, kv_heads, head_dim).clone()
    q = rope_store(qkv, positions, rotary.cos_sin, k_cache, v_cache, slots, heads, kv_heads, head_dim)
    assert q.data_ptr() == qkv.data_ptr()  # rotated in place
    assert_close_ulp(q.contiguous(), q_ref)
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    assert_close_ulp(k_cache[blocks, offsets], k_ref[keep])
    assert torch.equal(v_cache[blocks, offsets], v_ref[keep])
    stored = torch.zeros(16 * block_size, dtype=torch.bool, device="cuda")
    stored[slots[keep]] = True
    assert (k_cache.reshape(16 * block_size, -1)[~stored] == 0).all()  # nothing else written
    assert (pool[:, 0] == 0).all() and (pool[:, 2] == 0).all()  # other layers untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (8, 32000), (64, 128256), (3, 100)])
def test_argmax_rows_equals_torch(dtype, rows, vocab):
    from baton.engine.fastpath.triton_ops import argmax_rows

    x = torch.randn(rows, vocab, device="cuda").to(dtype)
    x[0, vocab // 3] = x[0, vocab - 1] = 100  # a tie: the first wins
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x)[0].item() == vocab // 3
