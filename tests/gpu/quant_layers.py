"""Quantized layers with random weights, for the kernel tests (interpreted and on the GPU)."""

from __future__ import annotations

import torch

from baton.engine.quantization import fp8, int4
from baton.engine.quantization.linear import Fp8Linear, Int4Linear
from baton.engine.quantization.schemes import ActivationScheme


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def fp8_layer(n, k, act, block=None, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    layer = Fp8Linear(k, n, bias, ActivationScheme(act, 128 if act == "group" else None), block)
    if block is None:
        weights = fp8.quantize_weight_per_channel(w)
    else:
        s = w.reshape(n // block[0], block[0], k // block[1], block[1]).abs().amax(dim=(1, 3)) / fp8.FP8_MAX
        q = fp8.to_fp8(w.reshape(n // block[0], block[0], k // block[1], block[1]), s[:, None, :, None])
        weights = fp8.Fp8Weights(q.reshape(n, k), s, None, block)
    if act == "static":
        weights.input_scale = torch.tensor(0.02)
    layer.set_weights(weights)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen))
    return layer



def int4_layer(n, k, group, act_order=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.05 + 0.01
    zeros = torch.randint(4, 12, (k // group, n), generator=gen).float()
    perm = torch.randperm(k, generator=gen) if act_order else None
    layer = Int4Linear(k, n, bias, group)
    layer.set_weights(int4.Int4Weights(int4.pack_rows(codes), scales, zeros, group, perm))
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen))
    return layer
