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
    from baton.engine.models.skinny_gemm import CONFIGS, fits, m_pad, skinny_mm

    n, k = shape
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    configs = [c for c in CONFIGS if fits(c, m_pad(rows))]
    assert len(configs) >= 4
    for config in configs:
        got = skinny_mm(x, w, b, config)
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()) < 1e-2, config


def test_tuned_linear_equals_the_layer():
    from baton.engine.models import skinny_gemm

    model = torch.nn.Sequential(*(torch.nn.Linear(512, 1536, bias=False) for _ in range(3))).to("cuda", torch.bfloat16)
    report = skinny_gemm.tune(model, max_rows=32)
    assert {key[2] for key in report} == {16, 32}
    layer = model[0]
    for rows in (1, 20, 64, 65):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        got, want = skinny_gemm.linear(layer, x), layer(x)
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_silu_fused_into_every_config(rows):
    """SiLU(gate) * up in the product's kernel equals the product then F.silu(gate) * up."""
    from baton.engine.models.skinny_gemm import CONFIGS, fits, m_pad, skinny_mm

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
    from baton.engine.models.skinny_gemm import CONFIGS, MAX_ROWS, fits, m_pad, skinny_mm

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
