"""FP8 (e4m3) KV cache: the scales, and where they apply.

With `kv_cache_dtype="fp8"` the pool holds `k / k_scale` and `v / v_scale` rounded to e4m3
(saturated at +-448). Scales come from the checkpoint when it has them (one per layer, or one
per KV head: see loading.py for the names), else 1.0 (the right range for keys and values of
the usual magnitude, as vLLM assumes too).

Attention never needs the dequantized cache: with per-KV-head scales ks, vs,
    softmax(q . (ks k8)) (vs v8) = softmax((ks q) . k8) v8 * vs,
so `scale_inputs` multiplies the queries by ks (per query head, through its KV head) and
divides the new keys and values by theirs before the backend stores them, the backend reads
the e4m3 cache as if it were the model dtype, and `scale_output` multiplies the result by vs.
The attention backends stay unaware of the scales; prefix caching, preemption and KV transfer
move the e4m3 blocks as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from baton.engine.parallel.layout import ShardLayout
from baton.engine.quantization.fp8 import FP8_MAX


class KVCacheScales(nn.Module):
    """One attention layer's FP8 KV scales: k_scale, v_scale [num_kv_heads] float32."""

    def __init__(self, num_heads: int, num_kv_heads: int, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.group = num_heads // num_kv_heads
        self.register_buffer("k_scale", _per_head(k_scale, num_kv_heads, device, "k_scale"))
        self.register_buffer("v_scale", _per_head(v_scale, num_kv_heads, device, "v_scale"))

    def scale_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q [T, H, D], k, v [T, Hkv, D] -> (q * ks in q's dtype, k / ks and v / vs in float32,
        saturated to e4m3's range; the store rounds them to e4m3)."""
        ks = self.k_scale[:, None]
        q = (q.float() * ks.repeat_interleave(self.group, 0)).to(q.dtype)
        k = (k.float() / ks).clamp(-FP8_MAX, FP8_MAX)
        v = (v.float() / self.v_scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
        return q, k, v

    def scale_output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [T, H, D] over e4m3 values -> over the real values."""
        vs = self.v_scale.repeat_interleave(self.group, 0)[:, None]
        return (out.float() * vs).to(out.dtype)


def _per_head(scale: torch.Tensor | None, num_kv_heads: int, device, name: str) -> torch.Tensor:
    if scale is None:
        return torch.ones(num_kv_heads, device=device)
    scale = scale.float().reshape(-1).to(device)
    if scale.numel() == 1:
        return scale.expand(num_kv_heads).contiguous()
    if scale.numel() != num_kv_heads:
        raise ValueError(f"checkpoint {name} has {scale.numel()} values; expected 1 or one per KV head "
                         f"({num_kv_heads})")
    return scale.contiguous()


def attach(model: nn.Module, scales: dict[int, dict[str, torch.Tensor]], layout: ShardLayout,
           device: torch.device) -> int:
    """Give each attention layer (a module with `layer_idx` and a `kv_scales` slot) its
    `KVCacheScales`, from the checkpoint's scales where present; returns how many layers.

    `layout`: the part of the model this one holds (`ShardLayout.of(hf_config)`: all of
    it); a tensor-parallel rank's layers get the checkpoint's scales of its KV heads, so
    every rank's pool holds each head scaled as a TP 1 pool does, and a KV handoff between
    TP layouts moves the e4m3 bytes as they are."""
    heads = layout.kv_heads
    count = 0
    for module in model.modules():
        if hasattr(module, "kv_scales") and hasattr(module, "layer_idx"):
            found = scales.get(module.layer_idx, {})
            k, v = (_per_head(found.get(x), layout.num_kv_heads, device, f"{x}_scale")[heads.start : heads.stop]
                    for x in ("k", "v"))
            module.kv_scales = KVCacheScales(len(layout.heads), len(heads), k, v, device)
            count += 1
    return count
