"""Quantized weights and KV cache: checkpoint formats, quantized linear layers, kernels.

Map of the package:
- `schemes.py`: `quantization_config` (and `EngineArgs.quantization`) -> a frozen `QuantConfig`.
- `fp8.py`, `int4.py`: the checkpoint layouts of each format -> one canonical form per kind
  (`Fp8Weights`, `Int4Weights`), with their dequantized reference.
- `linear.py`: `Fp8Linear` and `Int4Linear`, what replaces `nn.Linear`; `forward` runs the
  torch reference unless a GPU kernel was set on the layer.
- `loading.py`: swapping the layers in, reading a checkpoint's quantized tensors (and its
  FP8 KV-cache scales), FP8 at load.

Contract: a quantized model computes on the CPU exactly what its dequantized weights compute
(with activations rounded through e4m3 where the format quantizes them), so every format is
checked for correctness without a GPU; kernels must match that reference.
"""

from baton.engine.quantization.schemes import (
    QuantConfig,
    QuantizationConfigError,
    parse_quantization,
    resolve_kv_cache_dtype,
)

__all__ = ["QuantConfig", "QuantizationConfigError", "parse_quantization", "resolve_kv_cache_dtype"]
