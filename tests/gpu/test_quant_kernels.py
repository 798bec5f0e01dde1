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
