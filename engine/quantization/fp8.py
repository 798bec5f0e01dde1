"""FP8 (e4m3) numerics and the FP8 checkpoint layouts, turned into one canonical form.

Canonical FP8 weights of a linear layer (`Fp8Weights`):
    weight       [out, in]  float8_e4m3fn
    weight_scale [out] float32 (per output row; a per-tensor scale is repeated), or
                 [ceil(out / bo), ceil(in / bi)] float32 for block scales (`block` = (bo, bi))
    input_scale  [] float32 for static activation scales, else None
The dequantized weight is `weight.float() * scale` (broadcast per row or per block).

Checkpoint tensors, per linear layer `<prefix>`:
    compressed-tensors "float-quantized": <prefix>.weight (e4m3 [out, in]),
        <prefix>.weight_scale ([1] or [] per tensor, [out, 1] per channel,
        [ceil(out/128), ceil(in/128)] per block), <prefix>.input_scale ([1], static only)
    fp8 (AutoFP8 / ModelOpt): <prefix>.weight, <prefix>.weight_scale ([] or [1]),
        <prefix>.input_scale (static); with weight_block_size: <prefix>.weight_scale_inv
        ([ceil(out/bo), ceil(in/bi)], a multiplier despite its name)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The smallest scale a dynamic quantizer uses: an all-zero row must not divide by zero.
MIN_SCALE = 1e-12


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3, saturated at +-448 (a plain cast does not saturate on CUDA)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_dynamic(x: torch.Tensor, strategy: str, group_size: int | None = None):
    """(fp8 x, float32 scale) with the scale taken from x's absolute maximum.

    x [M, K]. strategy "token": scale [M, 1]; "tensor": scale [] ; "group": scale
    [M, K / group_size] over consecutive columns (K must be a multiple of group_size).
    """
    xf = x.float()
    if strategy == "token":
        scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        scale = scale.clamp(min=MIN_SCALE)
        return to_fp8(xf, scale), scale
    if strategy == "tensor":
        scale = (xf.abs().amax() / FP8_MAX).clamp(min=MIN_SCALE)
        return to_fp8(xf, scale), scale
    if strategy == "group":
        m, k = xf.shape
        if k % group_size:
            raise ValueError(f"per-group activation scales need K ({k}) divisible by {group_size}")
        g = xf.view(m, k // group_size, group_size)
        scale = (g.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        return to_fp8(g, scale).view(m, k), scale[..., 0]
    raise ValueError(f"unknown dynamic activation strategy {strategy!r}")


def fake_quantize_activation(x: torch.Tensor, strategy: str, input_scale: torch.Tensor | None,
                             group_size: int | None = None) -> torch.Tensor:
    """x rounded through e4m3 the way the FP8 product sees it, back in float32 [M, K]."""
    if strategy == "static":
        return to_fp8(x, input_scale).float() * input_scale
    q, scale = quantize_dynamic(x, strategy, group_size)
    if strategy == "group":
        m, k = x.shape
        return (q.float().view(m, -1, group_size) * scale[..., None]).view(m, k)
    return q.float() * scale


@dataclass
class Fp8Weights:
    """Canonical FP8 weights of one linear layer (see the module docstring)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32."""
        w = self.weight.float()
        if self.block is None:
            return w * self.weight_scale[:, None]
        bo, bi = self.block
        out, k = w.shape
        s = self.weight_scale.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :k]
        return w * s


def quantize_weight_per_channel(w: torch.Tensor) -> Fp8Weights:
    """An unquantized [out, in] weight -> e4m3 with one scale per output row."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return Fp8Weights(to_fp8(w, scale[:, None]), scale)


def from_checkpoint(tensors: dict[str, torch.Tensor], block: tuple[int, int] | None, static_input: bool,
                    name: str) -> Fp8Weights:
    """One layer's checkpoint tensors (keys: the names after the layer prefix) -> `Fp8Weights`."""
    weight = tensors.get("weight")
    if weight is None or weight.dtype != FP8:
        got = None if weight is None else weight.dtype
        raise ValueError(f"{name}.weight: an FP8 checkpoint stores float8_e4m3fn weights, got {got}")
    out, k = weight.shape
    scale = tensors.get("weight_scale_inv", tensors.get("weight_scale"))
    if scale is None:
        raise ValueError(f"{name}: the FP8 checkpoint has no weight_scale (or weight_scale_inv)")
    scale = scale.float()
    if block is not None:
        want = (-(-out // block[0]), -(-k // block[1]))
        if tuple(scale.shape) != want:
            raise ValueError(f"{name}: block weight scale of shape {tuple(scale.shape)}, expected {want}")
    elif scale.numel() == 1:
        scale = scale.reshape(1).expand(out).contiguous()
    elif scale.numel() == out:
        scale = scale.reshape(out).contiguous()
    else:
        raise ValueError(f"{name}: weight_scale of shape {tuple(scale.shape)} fits neither per-tensor nor "
                         f"per-channel scales of a [{out}, {k}] weight")
    input_scale = None
    if static_input:
        if "input_scale" not in tensors:
            raise ValueError(f"{name}: static activation scales need {name}.input_scale in the checkpoint")
        input_scale = tensors["input_scale"].float().reshape(-1).max().reshape(())
    return Fp8Weights(weight, scale, input_scale, block)


def fuse(parts: list[Fp8Weights], name: str) -> Fp8Weights:
    """Shards along the output dimension (q/k/v, gate/up) -> one layer. Static input scales
    (one per shard, the same input) become their maximum: rounding the input with the
    largest shard's scale never saturates another's."""
    if len(parts) == 1:
        return parts[0]
    block = parts[0].block
    if block is not None and any(p.weight.shape[0] % block[0] for p in parts[:-1]):
        raise ValueError(f"{name}: block-scaled shards must have output sizes divisible by {block[0]}")
    scales = [p.input_scale for p in parts]
    input_scale = None if scales[0] is None else torch.stack(scales).max()
    return Fp8Weights(
        torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]), input_scale, block,
    )
