"""The Triton paged-attention kernels equal a float64 reference on CUDA.

Across block sizes, head dims, GQA ratios (1, 4, 7, 8, MQA), ragged batches, cached prefix
lengths and dtypes; outputs are poisoned with NaN first, so an unwritten row fails. Also: a
captured decode graph replayed with other lengths equals an eager launch, the backend's
mixed decode + prefill step equals the torch reference backend, and the decode kernel with
the rotary and KV store fused in equals `rope_store` followed by the plain kernel.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import TOLERANCE, fused_rope_decode, make_case, reference, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (query heads, KV heads, head dim, block size)
SHAPES = [(32, 8, 128, 16), (8, 8, 64, 8), (16, 2, 128, 32), (28, 4, 128, 16), (8, 1, 256, 16), (12, 4, 80, 4),
          (4, 2, 16, 1)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_matches_reference(shape, dtype, num_splits):
    from baton.engine.attention.triton_decode import paged_decode

    heads, kv_heads, head_dim, block_size = shape
    seq_lens = [1, 17, 300, 1000, 64, 129]
    case = make_case(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, block_size, dtype, "cuda")
    out = torch.full_like(case.q, float("nan"))
    paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t, case.scale, out,
                 num_splits=num_splits)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(case)) < TOLERANCE[dtype]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] % 2 == 0], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_with_fused_rotary_and_kv_store(shape, dtype, num_splits):
    heads, kv_heads, head_dim, block_size = shape
    lens = [1, 17, 0, 300, 1000, 64, 129]
    got, want, caches, ref_caches = fused_rope_decode(lens, heads, kv_heads, head_dim, block_size, dtype, "cuda",
                                                      num_splits)
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    assert rel_err(got, want.double()) < TOLERANCE[dtype]
    for cache, ref in zip(caches, ref_caches):
        # The rotation rounds as rope_store's, up to contracted multiply-adds: a last place of
        # the operands (standard normal here), which float32 keeps and bf16/fp16 rarely show.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(cache, ref, rtol=2 * eps, atol=8 * eps)
        if dtype != torch.float32:
            assert (cache == ref).float().mean() > 0.99


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_reference_with_prefixes_and_chunks(shape, dtype):
    from baton.engine.attention.triton_prefill import paged_prefill

    heads, kv_heads, head_dim, block_size = shape
    # (context, new tokens): fresh prompts, chunks after a cached prefix, a one-token chunk.
    pairs = [(5, 5), (300, 300), (1000, 37), (129, 1), (64, 63), (200, 130)]
    case = make_case([c for c, _ in pairs], [q for _, q in pairs], heads, kv_heads, head_dim, block_size, dtype,
                     "cuda", seed=1)
    out = torch.full_like(case.q, float("nan"))
    paged_prefill(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t, case.query_start_loc,
                  case.query_lens, case.seq_lens, case.scale, out)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(case)) < TOLERANCE[dtype]


def test_decode_zero_length_rows_give_zeros():
    from baton.engine.attention.triton_decode import paged_decode

    case = make_case([40, 1], [1, 1], 8, 2, 64, 16, torch.bfloat16, "cuda")
    case.seq_lens_t[1] = 0  # a padding row of a captured batch
    out = torch.full_like(case.q, float("nan"))
    for splits in (1, 4):
        paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t, case.scale, out,
                     num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_captured_decode_replays_with_new_lengths():
    from baton.engine.attention.triton_decode import paged_decode

    case = make_case([900, 33, 500, 7], [1] * 4, 32, 8, 128, 16, torch.bfloat16, "cuda")
    lens = case.seq_lens_t.clone()
    out = torch.empty_like(case.q)
    paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, lens, case.scale, out)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, lens, case.scale, out)
    for new in ([900, 33, 500, 7], [12, 800, 1, 450]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        want = torch.empty_like(out)
        paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, lens, case.scale, want)
        assert torch.equal(out, want)


def test_backend_mixed_step_equals_torch_reference():
    from baton.engine.attention.base import AttentionMetadata
    from baton.engine.attention.torch_ref import TorchAttention
    from baton.engine.attention.triton_backend import TritonAttention

    pairs = [(50, 1), (300, 44), (17, 1), (64, 64), (129, 1)]
    case = make_case([c for c, _ in pairs], [q for _, q in pairs], 16, 4, 128, 16, torch.bfloat16, "cuda", seed=3)
    slots = []
    for i, (c, qn) in enumerate(pairs):
        table = case.block_tables[i].tolist()
        slots += [table[p // 16] * 16 + p % 16 for p in range(c - qn, c)]
    k = torch.randn(case.q.shape[0], 4, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)

    def meta():
        return AttentionMetadata(torch.tensor(slots, device="cuda"), case.query_start_loc, case.seq_lens_t,
                                 case.block_tables, case.query_lens, case.seq_lens, 16)

    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    want = TorchAttention(16, 4, 128, case.scale).forward(case.q, k, v, kc, vc, meta())
    got = TritonAttention(16, 4, 128, case.scale).forward(case.q, k, v, case.k_cache, case.v_cache, meta())
    assert torch.equal(case.k_cache, kc) and torch.equal(case.v_cache, vc)  # same stores
    assert rel_err(got, want.double()) < 1e-2


@pytest.mark.parametrize("shape", [(32, 8, 128, 16), (28, 4, 128, 16), (12, 4, 80, 4)], ids=str)
@pytest.mark.parametrize("num_splits", [None, 5, 13])
def test_decode_with_the_merge_in_the_last_split(shape, num_splits):
    """With split counters the split that finishes last merges, eagerly and in a replayed
    graph (the same result every time), and the counters are left at zero."""
    from baton.engine.attention import triton_decode

    heads, kv_heads, head_dim, block_size = shape
    seq_lens = [1, 17, 300, 1000, 64, 129, 0, 2000]
    case = make_case(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, block_size, torch.bfloat16, "cuda")
    counts = triton_decode.SplitCounts()

    def run(out):
        triton_decode.paged_decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t,
                                   case.scale, out, num_splits=num_splits, split_counts=counts)
        return out

    want = run(torch.full_like(case.q, float("nan")))
    assert rel_err(want, reference(case)) < TOLERANCE[torch.bfloat16]
    for _ in range(2):
        assert torch.equal(run(torch.full_like(case.q, float("nan"))), want)
    out = torch.full_like(case.q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, want)
    torch.cuda.synchronize()
    assert not counts.get(1, case.q.device).any()
