"""The GPU kernels' logic on the CPU, through Triton's interpreter.

Run by test_kernels_interpreted.py in a child process with `TRITON_INTERPRET=1`: the switch
is read when `@triton.jit` decorates a function, Triton's own library included, so it must be
set before anything imports triton. The interpreter's bf16 products are wrong (Triton 3.x
numpy emulation), so these run in float32 and float16; bf16 is covered by the `gpu` tests.
Sizes are small: the interpreter runs one program at a time.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import TOLERANCE, fused_rope_decode, make_case, reference, rel_err

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_kernels_interpreted.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

triton = pytest.importorskip("triton")

from baton.engine.attention import triton_decode, triton_prefill  # noqa: E402
from baton.engine.fastpath import few_row, triton_ops  # noqa: E402

SHAPES = [(4, 2, 16, 4), (6, 6, 32, 8), (8, 1, 80, 16)]  # heads, KV heads, head dim, block size
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merge_in_splits", [False, True])
def test_decode_with_and_without_splits(shape, dtype, merge_in_splits):
    """With split counters the last split merges (twice: the counters are left at zero)."""
    counts = triton_decode.SplitCounts() if merge_in_splits else None
    heads, kv_heads, head_dim, block_size = shape
    case = make_case([1, 9, 70, 33], [1] * 4, heads, kv_heads, head_dim, block_size, dtype, "cpu")
    want = reference(case)
    for splits in (1, 3, 3):
        out = torch.full_like(case.q, float("nan"))
        triton_decode.paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t,
                                   case.scale, out, num_splits=splits, block_n=16, split_counts=counts)
        assert rel_err(out, want) < TOLERANCE[dtype]
    if merge_in_splits:  # the split kernel counted (and merged), and left the counters at zero
        assert not counts.get(1, torch.device("cpu")).any()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_with_fused_rotary_and_kv_store(shape, dtype):
    heads, kv_heads, head_dim, block_size = shape
    for splits in (1, 3):
        got, want, caches, ref_caches = fused_rope_decode([1, 9, 0, 70, 33], heads, kv_heads, head_dim, block_size,
                                                          dtype, "cpu", splits)
        torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        assert (got[2] == 0).all()  # the padding row
        for cache, ref in zip(caches, ref_caches):
            assert torch.equal(cache, ref)  # the same rounding as rope_store, nothing stored for padding


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_with_prefixes_and_chunks(shape, dtype):
    heads, kv_heads, head_dim, block_size = shape
    pairs = [(20, 20), (7, 3), (45, 17), (3, 1)]
    case = make_case([c for c, _ in pairs], [q for _, q in pairs], heads, kv_heads, head_dim, block_size, dtype,
                     "cpu", seed=2)
    out = torch.full_like(case.q, float("nan"))
    config = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    triton_prefill.paged_prefill(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t,
                                 case.query_start_loc, case.query_lens, case.seq_lens, case.scale, out, config=config)
    assert rel_err(out, reference(case)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,k,bias", [(1, 48, 64, False), (5, 40, 96, True), (33, 64, 300, False)])
def test_few_row_matmul(dtype, rows, n, k, bias):
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    for config in [(16, 32, 4, 1), (32, 128, 4, 2), (16, 32, 4, 1, 1)]:  # the last: the transposed product
        assert rel_err(few_row.skinny_mm(x, w, b, config), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,bias", [(1, 64, False), (5, 96, True), (33, 300, False)])
def test_few_row_matmul_with_silu(dtype, rows, k, bias):
    """SiLU(gate) * up of the fused gate/up projection, in the product's kernel."""
    import torch.nn.functional as F

    inter = 40
    x, w = torch.randn(rows, k).to(dtype), torch.randn(2 * inter, k).to(dtype)
    b = torch.randn(2 * inter).to(dtype) if bias else None
    gate, up = F.linear(x.double(), w.double(), None if b is None else b.double()).chunk(2, dim=-1)
    for config in [(32, 32, 4, 1), (64, 128, 4, 2), (32, 32, 4, 1, 1)]:
        act = few_row.skinny_mm(x, w, b, config, silu=True)
        assert act.shape == (rows, inter)
        assert rel_err(act, F.silu(gate) * up) < 3 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden,config", [(1, 96, (16, 32, 4, 1)), (5, 96, (32, 64, 4, 2)),
                                                (33, 1056, (16, 32, 4, 1)), (5, 96, (32, 64, 4, 2, 1))])
def test_residual_add_and_rms_norm_in_the_products_epilogues(dtype, rows, hidden, config):
    """o_proj's epilogue adds the residual and sums squares, the next product scales its rows."""
    import torch.nn.functional as F

    attn, inter, eps = 64, 40, 1e-5
    x, w_o = torch.randn(rows, attn).to(dtype), (torch.randn(hidden, attn) / attn**0.5).to(dtype)
    residual = torch.randn(rows, hidden).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    w_up, w_qkv = (torch.randn(2 * inter, hidden) / hidden**0.5).to(dtype), torch.randn(48, hidden).to(dtype)
    b_qkv = torch.randn(48).to(dtype)
    h = residual.double() + F.linear(x.double(), w_o.double())
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
    res = residual.clone()
    sums = few_row.norm_sums(1, x.device)[0]
    pending = few_row.skinny_mm(x, w_o, None, config, add_norm=(res, norm_w, eps, sums))
    assert rel_err(sums[:rows], res.double().pow(2).sum(-1)) < 1e-6 and not sums[rows:].any()  # of rounded h
    assert rel_err(res, h) < TOLERANCE[dtype]
    assert rel_err(pending.normalized(), normed) < 2 * TOLERANCE[dtype]
    got = few_row.skinny_mm(pending, w_qkv, b_qkv, config)
    assert rel_err(got, F.linear(normed, w_qkv.double(), b_qkv.double())) < 2 * TOLERANCE[dtype]
    gate, up = F.linear(normed, w_up.double()).chunk(2, dim=-1)
    act = few_row.skinny_mm(pending, w_up, None, (32, *config[1:]), silu=True)
    assert rel_err(act, F.silu(gate) * up) < 3 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [(32, 32, 4, 1), (64, 64, 4, 2), (32, 64, 4, 2, 1)], ids=str)
@pytest.mark.parametrize("bias,pending", [(False, False), (True, True)])
def test_qkv_product_with_rotary_and_kv_store(dtype, config, bias, pending):
    """The Q/K/V product's epilogue does rope_store's work: the same queries, and the same
    keys and values in the cache (nothing for a negative slot)."""
    import torch.nn.functional as F

    heads, kv_heads, head_dim, block_size, hidden = 4, 2, 64, 16, 96
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(5, hidden).to(dtype)
    w = (torch.randn(n, hidden) / hidden**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    positions, slots = torch.tensor([3, 0, 17, 9, 30]), torch.tensor([5, 40, -1, 12, 33])
    cos_sin = torch.randn(32, head_dim)
    arg = x
    if pending:  # the Q/K/V product after a fused norm: x = h * weight, scaled by 1/rms here
        arg = few_row.NormPending(x, x.double().pow(2).sum(-1).repeat(13)[:few_row.MAX_ROWS], 1e-5)
        x = arg.normalized()

    def pools():
        pool = torch.zeros(4, 2, block_size, kv_heads, head_dim, dtype=dtype)
        return pool, pool[:, 0], pool[:, 1]

    want_pool, k_ref, v_ref = pools()
    q_ref = triton_ops.rope_store(F.linear(x, w, b), positions, cos_sin, k_ref, v_ref, slots, heads, kv_heads,
                                  head_dim)
    pool, k_cache, v_cache = pools()
    rope = few_row.RopeStore(positions, cos_sin, k_cache, v_cache, slots, heads, kv_heads, head_dim)
    q = few_row.skinny_mm(arg, w, b, config, rope=rope)
    assert q.shape == (5, heads, head_dim)
    assert rel_err(q, q_ref) < 2 * TOLERANCE[dtype]
    assert rel_err(pool, want_pool) < 2 * TOLERANCE[dtype]
    stored = pool.abs().sum(dim=(1, 3, 4)).nonzero().tolist()  # [block, offset] of every stored slot
    assert stored == [[0, 5], [0, 12], [2, 1], [2, 8]]  # slots 5, 12, 33, 40; nothing for -1


def test_fused_ops_equal_the_torch_code():
    import torch.nn.functional as F

    from baton.engine.models.llama import LlamaArgs, RMSNorm, Rotary

    ops = triton_ops
    norm = RMSNorm(96, 1e-5).requires_grad_(False)
    norm.weight.normal_(1.0, 0.1)
    x, residual = torch.randn(5, 96), torch.randn(5, 96)
    want_out, want_res = norm(x, residual.clone())  # CPU tensors: the torch path
    res = residual.clone()
    torch.testing.assert_close(ops.add_rms_norm(x, res, norm.weight, 1e-5), want_out)  # the variance sums in another order
    assert torch.equal(res, want_res)
    gate_up = torch.randn(5, 80)
    gate, up = gate_up.split(40, -1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up)

    heads, kv_heads, head_dim, block_size = 6, 2, 16, 4
    cfg = {"hidden_size": 96, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": 8, "max_position_embeddings": 64}
    rotary = Rotary(LlamaArgs.from_hf(cfg))
    rotary.build(torch.device("cpu"), 64)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([0, 3, 7, 63, 10])
    slots = torch.tensor([5, 0, -1, 15, 9])
    pool = torch.zeros(4, 2, 2, block_size, kv_heads, head_dim)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    q_ref, k_ref = rotary(positions, qkv[:, :96].view(5, heads, head_dim), qkv[:, 96:128].view(5, kv_heads, head_dim))
    v_ref = qkv[:, 128:].view(5, kv_heads, head_dim).clone()
    q = ops.rope_store(qkv, positions, rotary.cos_sin, k_cache, v_cache, slots, heads, kv_heads, head_dim)
    assert torch.equal(q, q_ref)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], k_ref[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], v_ref[t])
    assert int((pool[:, 1].abs().sum(dim=(1, 3, 4)) != 0).sum()) == 4 and (pool[:, 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_rows_takes_the_first_maximum(dtype):
    x = torch.randn(5, 1000).to(dtype)
    x[1, 300] = x[1, 900] = 50  # a tie across chunks
    x[2, 10] = x[2, 20] = 50  # within a chunk
    x[3] = float("-inf")
    x[4, 255] = x[4, 256] = 50  # on a chunk boundary
    got = triton_ops.argmax_rows(x, block=256)
    assert got.tolist() == x.argmax(dim=-1).tolist() == [got[0].item(), 300, 10, 0, 255]


@pytest.mark.parametrize("head_dim", [16, 32])
def test_fast_path_with_norms_in_the_products_epilogues_matches_the_torch_path(tiny_dir, tmp_path, monkeypatch,
                                                                               head_dim):
    """The fast path on the CPU (`FastLlama` over the engine's reference model: `NormPending`
    rows handed from product to product, the residual updated in place, one sums row per
    norm), and with 32-dimension heads the rotary + KV store in the Q/K/V product's epilogue:
    with every product of <= 64 rows through the few-row kernel, the engine generates the
    tokens of the torch path."""
    import json
    import shutil

    from safetensors.torch import save_file

    from baton.engine import LLM, SamplingParams
    from baton.engine.config import KernelConfig
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.llama import FastLlama
    from baton.engine.fastpath.projection import FewRowLinear
    from baton.engine.tiny_model import random_llama_weights

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["head_dim"] = head_dim
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in random_llama_weights(config).items()}, str(model_dir / "model.safetensors"))
    prompts = [list(range(5, 30)), [0, 400, 7]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def generate(fast: bool):
        llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks_override=32, block_size=4,
                  max_num_batched_tokens=16)
        runner = llm.engine.runner
        if fast:  # (the CPU's torch backend never fuses the rotary: the Q/K/V epilogue does)
            runner.model = FastLlama(runner.reference, KernelConfig(pdl=False), tuning)
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    want = generate(fast=False)
    # Every product shape of the model (hidden 64, 4 + 2 + 2 heads, MLP 176, vocab 512)
    # "measured" with one fast Triton configuration.
    tuning = FewRowTuning()
    attn = 4 * head_dim
    for n, k, *form in [(2 * attn, 64), (2 * attn, 64, "rope"), (64, attn), (352, 64), (64, 176), (512, 64)]:
        for bucket in few_row.BUCKETS:
            tuning.times[(n, k, bucket, torch.float32, *form)] = {"cublas": 1e9, (16, 32, 4, 1): 1.0,
                                                                  (32, 32, 4, 1): 1.0}
    fused, rotated = [], []
    add_norm, qkv_rope = FewRowLinear.add_norm, FewRowLinear.qkv_rope

    def counted(self, x, *args):
        fused.append(x.shape[0])
        return add_norm(self, x, *args)

    def counted_rope(self, x, *args):
        rotated.append(x.shape[0])
        return qkv_rope(self, x, *args)

    monkeypatch.setattr(FewRowLinear, "add_norm", counted)
    monkeypatch.setattr(FewRowLinear, "qkv_rope", counted_rope)
    assert generate(fast=True) == want
    # 3 of the 4 norms of each step of this 2-layer model (the first layer's input norm has
    # no product before it), in every step (all of <= 16 rows)
    assert fused and len(fused) % 3 == 0
    assert bool(rotated) == (head_dim == 32)  # 16-dimension heads have no fitting tile


def test_engine_with_triton_backend_matches_torch_backend(tiny_dir):
    """Whole engine on the CPU through the Triton backend: chunked prefill makes mixed steps."""
    from baton.engine import LLM, SamplingParams

    prompts = [list(range(5, 30)), [0, 400, 7]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=str(tiny_dir), device="cpu", attention_backend=backend, num_gpu_blocks_override=32,
                  block_size=4, max_num_batched_tokens=16)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]
