"""Quantized linear layers: what replaces `nn.Linear` in a quantized model.

Each holds its canonical weights (see fp8.py and int4.py) as buffers, an optional bias
parameter (Qwen2's Q/K/V bias stays unquantized in every format), and computes
`y = x @ W.T + b` [M, N] for x [M, K]:

- `reference(x)` is the plain torch computation on any device: the weight is dequantized
  and, for FP8 activations, x is rounded through e4m3 with the scheme's scales, so the
  result is what an FP8 product computes, up to its float32 accumulation order.
- `forward(x)` runs `self.kernel(self, x)` when a kernel is set, else `reference(x)`. The
  engine's fast-path transform sets `kernel` on CUDA; nothing else does.

They are deliberately not `nn.Linear` subclasses: code that reads `layer.weight` as a dense
matrix must not mistake an int4-packed or e4m3 weight for one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.quantization.fp8 import Fp8Weights, fake_quantize_activation
from baton.engine.quantization.int4 import Int4Weights
from baton.engine.quantization.schemes import ActivationScheme

Kernel = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class QuantLinear(nn.Module):
    """Common part: sizes, bias, the kernel hook."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        if self.kernel is not None:
            return self.kernel(self, x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self.prepare_input(x.reshape(-1, shape[-1]))
        w = self.dequantize().to(x2.dtype)
        y = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def dequantize(self) -> torch.Tensor:
        """The dense [N, K] float32 weight this layer computes with."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp8Linear(QuantLinear):
    """FP8 weights (e4m3, per-row or block scales), FP8 activations (W8A8) per `act`:
    static (`input_scale`), or dynamic per token, per tensor, or per group of columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool, act: ActivationScheme,
                 block: tuple[int, int] | None = None):
        super().__init__(in_features, out_features, bias)
        self.act = act
        self.block = block
        self.register_buffer("weight", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_scale", None)

    def set_weights(self, w: Fp8Weights) -> None:
        if tuple(w.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"FP8 weight of shape {tuple(w.weight.shape)} for a layer "
                             f"[{self.out_features}, {self.in_features}]")
        self.weight, self.weight_scale, self.input_scale = w.weight, w.weight_scale, w.input_scale

    @property
    def weights(self) -> Fp8Weights:
        return Fp8Weights(self.weight, self.weight_scale, self.input_scale, self.block)

    def dequantize(self) -> torch.Tensor:
        return self.weights.dequantize()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.act.strategy, self.input_scale, self.act.group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act.strategy}, block={self.block}"


class Int4Linear(QuantLinear):
    """Int4 weights with per-group scales and zero points, activations in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size or in_features
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)
        self.register_buffer("zeros", None)
        self.register_buffer("perm", None)

    def set_weights(self, w: Int4Weights) -> None:
        if (w.in_features, w.out_features) != (self.in_features, self.out_features) or w.group_size != self.group_size:
            raise ValueError(f"int4 weight [{w.out_features}, {w.in_features}] group {w.group_size} for a layer "
                             f"[{self.out_features}, {self.in_features}] group {self.group_size}")
        self.qweight, self.scales, self.zeros, self.perm = w.qweight, w.scales, w.zeros, w.perm

    @property
    def weights(self) -> Int4Weights:
        return Int4Weights(self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    def dequantize(self) -> torch.Tensor:
        return self.weights.dequantize()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, act_order={self.perm is not None}"
