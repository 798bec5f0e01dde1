"""Few-row matrix products: every configuration equals cuBLAS, and tuning picks a working one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("shape,bias", [((6144, 4096), False), ((1000, 896), True), ((512, 300), False)])
def test_every_config_matches_cublas(rows, shape, bias):
    from baton.engine.config import KernelConfig
    from baton.engine.fastpath.few_row import CONFIGS, fits, m_pad, skinny_mm
    from baton.engine.fastpath.few_row_tuning import launch_options

    launch = launch_options(KernelConfig().for_device(torch.device("cuda")))  # as the engine: PDL, L2 prefetch
    n, k = shape
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    configs = [c for c in CONFIGS if fits(c, m_pad(rows))]
    assert len(configs) >= 4
    for config in configs:
        got = skinny_mm(x, w, b, config, **launch)
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()) < 1e-2, config


def test_tuned_linear_equals_the_layer():
    from baton.engine.config import KernelConfig
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.projection import FewRowLinear

    model = torch.nn.Sequential(*(torch.nn.Linear(512, 1536, bias=False) for _ in range(3))).to("cuda", torch.bfloat16)
    kernels = KernelConfig().for_device(torch.device("cuda"))
    tuning = FewRowTuning()
    projections = [FewRowLinear(layer, "plain", tuning, kernels) for layer in model]
    report = tuning.tune(projections, kernels, max_rows=32)
    assert {key[2] for key in report} == {16, 32}
    layer = model[0]
    for rows in (1, 20, 64, 65):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        got, want = projections[0](x), layer(x)
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_silu_fused_into_every_config(rows):
    """SiLU(gate) * up in the product's kernel equals the product then F.silu(gate) * up."""
    from baton.engine.fastpath.few_row import CONFIGS, fits, m_pad, skinny_mm

    k, inter = 4096, 1024
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * inter, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    want = (F.silu(gate) * up).float()
    configs = [c for c in CONFIGS if fits(c, m_pad(rows)) and c[0] >= 32]
    assert len(configs) >= 4
    for config in configs:
        act = skinny_mm(x, w, None, config, silu=True)
        assert act.shape == (rows, inter) and act.dtype == torch.bfloat16
        assert ((act.float() - want).norm() / want.norm()) < 1e-2, config


@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_residual_add_and_norm_in_the_epilogues_of_every_config(rows):
    """RMSNorm(x @ Wo.T + residual) through the producer's epilogue (sum into the residual,
    partial sums of squares) and the consumer's row scale equals the torch code's norm then
    product, for every configuration on either side."""
    from baton.engine.fastpath.few_row import CONFIGS, MAX_ROWS, fits, m_pad, skinny_mm

    hidden, attn, inter = 4096, 2048, 1024
    x = torch.randn(rows, attn, device="cuda", dtype=torch.bfloat16)
    w_o = torch.randn(hidden, attn, device="cuda", dtype=torch.bfloat16) / attn**0.5
    w_up = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    residual = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    norm_weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    want_res = F.linear(x, w_o) + residual
    h = want_res.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.float()
    gate, up = F.linear(normed, w_up.float()).chunk(2, dim=-1)
    want_act = F.silu(gate) * up
    configs = [c for c in CONFIGS if fits(c, m_pad(rows))]
    for config in configs:
        res = residual.clone()
        sums = torch.zeros(MAX_ROWS, dtype=torch.float64, device="cuda")
        pending = skinny_mm(x, w_o, None, config, add_norm=(res, norm_weight, 1e-5, sums))
        assert ((res.float() - h).norm() / h.norm()) < 1e-2, config
        assert ((pending.normalized().float() - normed).norm() / normed.norm()) < 1e-2, config
        consumer = next(c for c in configs if c[0] >= 32 and c != config) if config[0] < 32 else config
        act = skinny_mm(pending, w_up, None, consumer, silu=True)
        assert ((act.float() - want_act).norm() / want_act.norm()) < 2e-2, (config, consumer)
        got = skinny_mm(pending, w_up, None, config)
        want = F.linear(normed, w_up.float())
        assert ((got.float() - want).norm() / want.norm()) < 1e-2, config


@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_rotary_and_kv_store_in_the_qkv_epilogue_of_every_fitting_config(rows):
    """Llama-3.1-8B's Q/K/V product with rope_store's work in its epilogue equals the product
    then rope_store: the same queries, and the same keys and values at the same slots."""
    from baton.engine.fastpath import triton_ops
    from baton.engine.fastpath.few_row import CONFIGS, RopeStore, fits, m_pad, skinny_mm

    heads, kv_heads, head_dim, hidden, block_size = 32, 8, 128, 4096, 16
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    positions = torch.randint(0, 8192, (rows,), device="cuda")
    slots = torch.randperm(16 * block_size, device="cuda")[:rows]
    if rows > 1:
        slots[0] = -1  # a padding row: stores nothing
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), 1e-4 ** torch.linspace(0, 1, head_dim // 2,
                                                                                          device="cuda"))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def pools():
        pool = torch.zeros(16, 2, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        return pool, pool[:, 0], pool[:, 1]

    want_pool, k_ref, v_ref = pools()
    want = triton_ops.rope_store(F.linear(x, w), positions, cos_sin, k_ref, v_ref, slots, heads, kv_heads, head_dim)
    configs = [c for c in CONFIGS if fits(c, m_pad(rows)) and RopeStore(*[None] * 5, heads, kv_heads, head_dim).fits(c)]
    assert len(configs) >= 4
    for config in configs:
        pool, k_cache, v_cache = pools()
        q = skinny_mm(x, w, None, config, rope=RopeStore(positions, cos_sin, k_cache, v_cache, slots, heads, kv_heads,
                                                         head_dim))
        assert ((q.float() - want.float()).norm() / want.float().norm()) < 1e-2, config
        assert ((pool.float() - want_pool.float()).norm() / want_pool.float().norm()) < 1e-2, config
        assert torch.equal(pool != 0, want_pool != 0), config  # the same slots written
