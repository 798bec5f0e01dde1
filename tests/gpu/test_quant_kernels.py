"""The quantized products' Triton kernels on CUDA, in bf16, at Llama-8B shapes: against the
layers' torch reference (which the CPU tests pin to each checkpoint format)."""

from __future__ import annotations

import pytest
import torch
from quant_layers import fp8_layer, int4_layer, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down (N, K)


def on_cuda(layer):
    return layer.to("cuda")


@pytest.mark.parametrize("rows", [1, 8, 64, 2048])
@pytest.mark.parametrize("act", ["token", "static", "tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_product(shape, act, rows):
    from baton.engine.quantization import kernels

    n, k = shape
    layer = on_cuda(fp8_layer(n, k, act, bias=rows == 8))
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = layer.reference(x)
    got = kernels.fp8_linear(layer, x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("rows", [1, 64, 1024])
def test_fp8_block_scaled_product(rows):
    from baton.engine.quantization import kernels

    layer = on_cuda(fp8_layer(4096, 4096, "group", block=(128, 128)))
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    assert rel_err(kernels.fp8_linear(layer, x), layer.reference(x)) < 1e-2


def test_fp8_row_quantizer_rounds_exactly_as_torch():
    from baton.engine.quantization import fp8, kernels

    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 2, 64, device="cuda")[:, None]
    for strategy in ("token", "group"):
        q, scale = kernels.quantize_fp8(x, strategy, group_size=128)
        want_q, want_scale = fp8.quantize_dynamic(x, strategy, 128)
        torch.testing.assert_close(scale.reshape(want_scale.shape), want_scale)
        assert torch.equal(q.float(), want_q.float())


@pytest.mark.parametrize("rows", [1, 8, 32, 2048])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_product(shape, group, rows):
    from baton.engine.quantization import kernels

    n, k = shape
    layer = on_cuda(int4_layer(n, k, group, act_order=group == 64))
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), layer.dequantize().float())
    assert rel_err(kernels.int4_linear(layer, x), want) < 1e-2


def test_kernels_are_captured_in_a_cuda_graph():
    """No host read in either product: both replay from a graph with new inputs."""
    from baton.engine.quantization import kernels

    fp8 = on_cuda(fp8_layer(4096, 4096, "token"))
    w4 = on_cuda(int4_layer(4096, 4096, 128))
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # compile outside the capture
        kernels.fp8_linear(fp8, x), kernels.int4_linear(w4, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y8, y4 = kernels.fp8_linear(fp8, x), kernels.int4_linear(w4, x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(y8, fp8.reference(x)) < 1e-2
    assert rel_err(y4, torch.nn.functional.linear(x.float(), w4.dequantize())) < 1e-2


def assert_same_quantized(got, want_q, want_scales, exact: bool):
    """Fused against the two kernels: scales exactly; codes exactly where both divide in
    Triton (per token), else (torch's static quantizer divides exactly, Triton's division
    may differ in the last bit) all but a few within one e4m3 step."""
    assert torch.equal(got.scales, want_scales.reshape(got.scales.shape))
    q, want = got.q.float(), want_q.float()
    if exact:
        assert torch.equal(q, want)
    else:
        same = q == want
        assert same.float().mean() > 0.999
        assert ((q - want).abs() <= want.abs() / 8 + 2**-9)[~same].all()


@pytest.mark.parametrize("rows", [1, 8, 64, 2048])
@pytest.mark.parametrize("strategy", ["token", "static"])
def test_fused_fp8_quantizers_equal_the_kernels_they_replace(strategy, rows):
    """The input norm + e4m3 quantizer (hidden 4096) and SiLU * up + quantizer (14336
    columns: chunks) against add_rms_norm / silu_mul then quantize_fp8, in bf16."""
    from baton.engine.fastpath import triton_ops
    from baton.engine.quantization import kernels
    from baton.engine.quantization.fused import Fp8Input, add_rms_norm_fp8, silu_mul_fp8

    quant = Fp8Input(strategy, torch.tensor([0.02], device="cuda") if strategy == "static" else None)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16) * 4
    residual = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    want_residual = residual.clone()
    want = kernels.quantize_fp8(triton_ops.add_rms_norm(x, want_residual, weight, 1e-5), strategy, quant.scale)
    got = add_rms_norm_fp8(x, residual, weight, 1e-5, quant)
    assert torch.equal(residual, want_residual)
    assert_same_quantized(got, *want, exact=strategy == "token")
    gate_up = torch.randn(rows, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 3
    want = kernels.quantize_fp8(triton_ops.silu_mul(gate_up), strategy, quant.scale)
    assert_same_quantized(silu_mul_fp8(gate_up, quant), *want, exact=strategy == "token")


def test_fused_fp8_quantizers_are_captured_in_a_cuda_graph():
    from baton.engine.quantization import kernels
    from baton.engine.quantization.fused import Fp8Input, add_rms_norm_fp8, silu_mul_fp8

    layer = on_cuda(fp8_layer(4096, 14336, "token"))
    gate_up = torch.randn(4, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # compile outside the capture
        add_rms_norm_fp8(x, None, weight, 1e-5, Fp8Input("token")), silu_mul_fp8(gate_up, Fp8Input("token"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows = silu_mul_fp8(gate_up, Fp8Input("token"))
        y = kernels.fp8_matmul(layer, rows.q, rows.scales, torch.bfloat16)
    gate_up.copy_(torch.randn_like(gate_up))
    graph.replay()
    gate, up = gate_up.split(14336, dim=-1)
    assert rel_err(y, layer.reference(torch.nn.functional.silu(gate) * up)) < 1e-2
