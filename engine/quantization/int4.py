"""Int4 weights (W4A16): the AWQ, GPTQ and compressed-tensors layouts, turned into one
canonical form.

Canonical int4 weights of a linear layer (`Int4Weights`), K = in_features, N = out_features:
    qweight [K / 8, N] int32   unsigned 4-bit codes packed along K: row 8r + j of the
                               [K, N] code matrix sits in bits 4j..4j+3 of word r
    scales  [K / g, N]         one scale per group of g input rows and output column
    zeros   [K / g, N]         the unsigned code that means 0 (8 for symmetric weights)
    perm    [K] int64 or None  activation order (GPTQ `desc_act`): the input columns are
                               stored grouped, and a product reads x[:, perm]
The dequantized weight is `(code - zero) * scale`; as an [N, K] nn.Linear weight with x's
columns in their original order: `W[:, perm] = ((codes - zeros) * scales).T`.

Checkpoint tensors, per linear layer `<prefix>` (K inputs, N outputs, G = K / g groups):
    awq ("gemm"): qweight [K, N/8] int32 (codes along N in the order 0 2 4 6 1 3 5 7),
        qzeros [G, N/8] int32 (same order), scales [G, N] fp16
    gptq: qweight [K/8, N] int32 (codes along K, sequential), qzeros [G, N/8] int32
        (sequential, minus one in the v1 format), scales [G, N] fp16, g_idx [K] int32
    compressed-tensors "pack-quantized": weight_packed [N, K/8] int32 (signed codes + 8,
        along K, sequential), weight_scale [N, G], weight_shape [2], and for asymmetric
        weights weight_zero_point [N/8, G] (signed + 8, packed along N); with activation
        order weight_g_idx [K]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# AWQ's packing puts code i of a word at nibble AWQ_ORDER.index(i).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = tuple(AWQ_ORDER.index(i) for i in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] int32 -> [R, 8 C] int32 codes 0..15; element 8c + i is nibble i of word c
    (or nibble `order.index(i)`, for AWQ's interleaved order)."""
    codes = (packed[..., None] >> _SHIFTS.to(packed.device)) & 0xF  # [R, C, 8]
    if order is not None:
        codes = codes[..., list(_AWQ_UNDO)]
    return codes.reshape(*packed.shape[:-1], -1)


def pack_cols(codes: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of `unpack_cols`: [R, 8 C] codes 0..15 -> [R, C] int32."""
    r, c8 = codes.shape
    grouped = codes.to(torch.int32).reshape(r, c8 // 8, 8)
    if order is not None:
        grouped = grouped[..., list(order)]
    words = (grouped << _SHIFTS.to(codes.device)).sum(-1, dtype=torch.int64)
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[8 R, C] codes -> [R, C] int32, packed along rows (the canonical and GPTQ layout)."""
    return pack_cols(codes.t().contiguous()).t().contiguous()


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 packed along rows -> [8 R, C] codes."""
    return unpack_cols(packed.t().contiguous()).t().contiguous()


@dataclass
class Int4Weights:
    """Canonical int4 weights of one linear layer (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, the nn.Linear weight with inputs in their original order."""
        codes = unpack_rows(self.qweight).float()  # [K, N], grouped order
        g = self.group_size
        w = (codes - self.zeros.float().repeat_interleave(g, 0)) * self.scales.float().repeat_interleave(g, 0)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[self.perm] = w
            w = out
        return w.t().contiguous()


def _groups(g_idx: torch.Tensor | None, k: int, group_size: int, name: str) -> torch.Tensor | None:
    """The input permutation that makes groups contiguous, or None when they already are.

    Activation-order checkpoints assign each input row to a group out of order (`g_idx`);
    every group must still hold exactly `group_size` rows.
    """
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64).reshape(-1)
    if g_idx.numel() != k:
        raise ValueError(f"{name}: g_idx has {g_idx.numel()} entries for {k} input features")
    if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=k // group_size)
    if counts.numel() != k // group_size or (counts != group_size).any():
        raise ValueError(f"{name}: g_idx does not put exactly {group_size} input rows in each group")
    return torch.argsort(g_idx, stable=True)


def _canonical(codes_kn: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None, name: str) -> Int4Weights:
    """[K, N] codes (original input order), [G, N] scales and zeros -> `Int4Weights`."""
    k, n = codes_kn.shape
    if k % 8 or k % group_size or scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(f"{name}: int4 weight [{k}, {n}] with scales {tuple(scales.shape)} and zeros "
                         f"{tuple(zeros.shape)} does not fit group size {group_size}")
    perm = _groups(g_idx, k, group_size, name)
    if perm is not None:
        codes_kn = codes_kn[perm]
    return Int4Weights(pack_rows(codes_kn), scales, zeros.to(scales.dtype), group_size, perm)


def from_awq(t: dict[str, torch.Tensor], group_size: int | None, name: str) -> Int4Weights:
    codes = unpack_cols(t["qweight"], AWQ_ORDER)  # [K, N]
    scales = t["scales"]
    k = codes.shape[0]
    g = group_size or k
    if "qzeros" in t:
        zeros = unpack_cols(t["qzeros"], AWQ_ORDER)
    else:
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    return _canonical(codes, scales, zeros, g, None, name)


def from_gptq(t: dict[str, torch.Tensor], group_size: int | None, zero_offset: int, name: str) -> Int4Weights:
    codes = unpack_rows(t["qweight"])  # [K, N]
    k = codes.shape[0]
    g = group_size or k
    zeros = (unpack_cols(t["qzeros"]) + zero_offset) & 0xF if zero_offset else unpack_cols(t["qzeros"])
    # v1 symmetric checkpoints store 7 (8 - 1); an asymmetric zero of 0 was stored as -1 & 0xF.
    return _canonical(codes, t["scales"], zeros, g, t.get("g_idx"), name)


def from_compressed_tensors(t: dict[str, torch.Tensor], group_size: int | None, symmetric: bool,
                            name: str) -> Int4Weights:
    packed = t["weight_packed"]
    n = packed.shape[0]
    k = int(t["weight_shape"][1]) if "weight_shape" in t else packed.shape[1] * 8
    codes = unpack_cols(packed)[:, :k].t().contiguous()  # [K, N]
    scales = t["weight_scale"].t().contiguous()  # [G, N]
    g = group_size or k
    if symmetric:
        zeros = torch.full(scales.shape, 8, dtype=torch.int32, device=scales.device)
    else:
        zeros = unpack_rows(t["weight_zero_point"])[:n].t().contiguous()  # [N, G] -> [G, N]
    return _canonical(codes, scales, zeros, g, t.get("weight_g_idx"), name)


def fuse(parts: list[Int4Weights], name: str) -> Int4Weights:
    """Shards along the output dimension -> one layer. The shards read the same input, so
    their activation orders must agree (GPTQ derives it from that input)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if p.group_size != first.group_size or p.in_features != first.in_features:
            raise ValueError(f"{name}: fused shards differ in group size or input features")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError(f"{name}: fused shards have different activation orders (g_idx); "
                             "Baton needs q/k/v and gate/up quantized with one order")
    return Int4Weights(
        torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
        torch.cat([p.zeros for p in parts], 1), first.group_size, first.perm,
    )
