"""A quantized layer as the CUDA fast path runs it: a `Projection` (engine/fastpath) over a
`QuantLinear`, whose product is the layer's Triton kernel (kernels.py).

The fused forms of the bf16 few-row kernel (SiLU, residual add + norm, rotary in its
epilogue) are not offered: around a quantized product the fast path runs those kernels
separately. What is fused instead is the FP8 product's own first step: an FP8 layer with
per-token or static activation scales names its quantizer (`input_quantizer`), the norm or
SiLU * up kernel before it quantizes what it computes (fused.py), and `forward` takes those
`Fp8Rows`. Imported by the fast path only (CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from baton.engine.fastpath.few_row import NormPending
from baton.engine.fastpath.projection import Projection
from baton.engine.quantization import kernels
from baton.engine.quantization.fused import Fp8Input, Fp8Rows
from baton.engine.quantization.linear import Fp8Linear, QuantLinear


class QuantProjection(Projection):
    """y = layer(x), through the layer's Triton product."""

    def __init__(self, layer: QuantLinear):
        nn.Module.__init__(self)  # not Projection's: there is no dense weight to share
        self.layer = layer
        self.bias = layer.bias
        layer.kernel = kernels.fp8_linear if isinstance(layer, Fp8Linear) else kernels.int4_linear
        self._input = None  # the quantizer a kernel before this product may run (see the module docstring)
        if isinstance(layer, Fp8Linear) and layer.block is None and layer.act.strategy in ("token", "static"):
            static = layer.act.strategy == "static"
            self._input = Fp8Input(layer.act.strategy, layer.input_scale.float().reshape(1) if static else None)

    def forward(self, x: torch.Tensor | NormPending | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            return kernels.fp8_matmul(self.layer, x.q, x.scales, x.dtype)
        if isinstance(x, NormPending):
            x = x.normalized()
        return self.layer(x)

    def input_quantizer(self) -> Fp8Input | None:
        return self._input

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
