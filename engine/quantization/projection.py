"""A quantized layer as the CUDA fast path runs it: a `Projection` (engine/fastpath) over a
`QuantLinear`, whose product is the layer's Triton kernel (kernels.py).

It offers the plain form only: the fused forms (SiLU, residual add + norm, rotary) live in
the bf16 few-row kernel's epilogues, so around a quantized product the fast path runs their
separate kernels. Imported by the fast path only (CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from baton.engine.fastpath.few_row import NormPending
from baton.engine.fastpath.projection import Projection
from baton.engine.quantization import kernels
from baton.engine.quantization.linear import Fp8Linear, QuantLinear


class QuantProjection(Projection):
    """y = layer(x), through the layer's Triton product."""

    def __init__(self, layer: QuantLinear):
        nn.Module.__init__(self)  # not Projection's: there is no dense weight to share
        self.layer = layer
        self.bias = layer.bias
        layer.kernel = kernels.fp8_linear if isinstance(layer, Fp8Linear) else kernels.int4_linear

    def forward(self, x: torch.Tensor | NormPending) -> torch.Tensor:
        if isinstance(x, NormPending):
            x = x.normalized()
        return self.layer(x)

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        if form != "plain":
            return None
        layer = self.layer
        many = rows > kernels.MANY_ROWS
        if isinstance(layer, Fp8Linear):
            scales = "128x128 blocks" if layer.block else f"{layer.act.strategy} activation scales"
            if many and not layer.block:
                return f"cuBLASLt FP8 e4m3 product, torch._scaled_mm ({scales})"
            return f"Triton FP8 e4m3 product ({scales})"
        order = ", activation order" if layer.perm is not None else ""
        if many:
            return f"int4 weight dequantized by Triton (group {layer.group_size}{order}), then a cuBLAS product"
        return f"Triton int4 W4A16 product (group {layer.group_size}{order})"
