"""A tensor-parallel rank's part of a quantized layer, cut from the checkpoint's own tensors.

A rank of a tensor-parallel engine holds output rows of the column-parallel layers (q/k/v,
gate/up) and input columns of the row-parallel ones (o, down): a `Cut` (`engine/parallel`
says which). Its quantized tensors are cut in the checkpoint's layout, as they stream in,
before they are converted and fused (`loading.py`), so a rank reads, converts and keeps its
part only. Each leaf (a tensor of the layer) has an axis for the output and one for the
input dimension, each in a unit: 1 (an element per row or column), 8 (int4 codes packed
eight to an int32 word), the group size (int4 scales and zero points) or the FP8 block:

    FP8:   weight [N, K]; weight_scale per tensor (whole), per channel [N] or [N, 1],
           or per block [N / bo, K / bi] (weight_scale_inv too); input_scale (whole)
    AWQ:   qweight [K, N / 8], qzeros [G, N / 8], scales [G, N]
    GPTQ:  qweight [K / 8, N], qzeros [G, N / 8], scales [G, N], g_idx [K]
    compressed-tensors int4: weight_packed [N, K / 8], weight_scale [N, G],
           weight_zero_point [N / 8, G], weight_g_idx [K], weight_shape [2] (rewritten)

So a column-parallel rank takes its output rows with their per-channel scales and the
whole per-tensor and static input scales (every rank rounds its input as TP 1 does), and a
row-parallel rank its input columns in whole groups (or blocks) with the per-tensor scale
shared. A cut that would split a pack, a group or a block is refused (`check_cuts`, at
engine start), as is an activation order (GPTQ `desc_act`, compressed-tensors `actorder`):
its groups are spread over the whole input, so a row-parallel rank's columns are not whole
groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.engine.loader import read_part
from baton.engine.quantization.schemes import QuantConfig, QuantizationConfigError, WeightScheme


@dataclass(frozen=True)
class Cut:
    """A rank's part of a linear layer: along `axis` "out" (column-parallel: output rows) or
    "in" (row-parallel: input columns), elements [start, start + size) of `total`."""

    axis: str
    start: int
    size: int
    total: int


def _units(w: WeightScheme, leaf: str) -> dict[str, tuple[int, int | None]] | None:
    """{axis: (tensor dimension, unit)} of a quantized layer's checkpoint tensor `leaf`; an
    axis it lacks is absent (the rank takes it whole); a unit None: the one group of a
    per-channel int4 layer (whole); None for a leaf this format does not store."""
    g = w.group_size
    if w.kind == "fp8":
        if leaf == "weight":
            return {"out": (0, 1), "in": (1, 1)}
        if leaf in ("weight_scale", "weight_scale_inv"):
            if w.strategy == "block":
                return {"out": (0, w.block[0]), "in": (1, w.block[1])}
            return {"out": (0, 1)} if w.strategy == "channel" else {}
        return {} if leaf == "input_scale" else None
    table = {
        "awq": {"qweight": {"out": (1, 8), "in": (0, 1)}, "qzeros": {"out": (1, 8), "in": (0, g)},
                "scales": {"out": (1, 1), "in": (0, g)}},
        "gptq": {"qweight": {"out": (1, 1), "in": (0, 8)}, "qzeros": {"out": (1, 8), "in": (0, g)},
                 "scales": {"out": (1, 1), "in": (0, g)}, "g_idx": {"in": (0, 1)}},
        "ct-pack": {"weight_packed": {"out": (0, 1), "in": (1, 8)}, "weight_scale": {"out": (0, 1), "in": (1, g)},
                    "weight_zero_point": {"out": (0, 8), "in": (1, g)}, "weight_g_idx": {"in": (0, 1)},
                    "weight_shape": {}},
    }
    return table[w.packing].get(leaf)


_LEAVES = ("weight", "weight_scale", "weight_scale_inv", "qweight", "qzeros", "scales", "weight_packed",
           "weight_zero_point")


def _pieces(w: WeightScheme, axis: str) -> dict[int, str]:
    """unit -> what it is, for every unit a cut along `axis` must keep whole in this format."""
    names = {8: "packed int32 words of 8 codes", w.group_size: f"groups of {w.group_size}"}
    if w.block is not None:
        names[w.block[0 if axis == "out" else 1]] = f"{w.block[0]}x{w.block[1]} scale blocks"
    found = {}
    for leaf in _LEAVES:
        dim, unit = (_units(w, leaf) or {}).get(axis, (None, None))
        if unit not in (None, 1):
            found[unit] = names[unit]
    return found


def check_cuts(config: QuantConfig, cuts: dict[str, list[Cut]]) -> None:
    """Refuse (QuantizationConfigError, naming the layer and the size) a tensor-parallel
    split of this quantized model that would cut a pack, a group or a block; `cuts`: each
    layer kind's cuts, one per rank."""
    w = config.weights
    tp = len(next(iter(cuts.values())))
    if w.act_order:
        raise QuantizationConfigError(
            f"tensor_parallel_size={tp}: this {config.method} checkpoint uses activation order (GPTQ desc_act, "
            f"compressed-tensors actorder), whose groups spread over the whole input of o_proj and down_proj, so "
            f"their row-parallel shards would not hold whole groups; use a checkpoint without activation order, "
            f"or tensor_parallel_size=1")
    for layer, per_rank in cuts.items():
        for cut in per_rank:
            for unit, what in _pieces(w, cut.axis).items():
                if cut.start % unit or cut.size % unit:
                    side = "output rows" if cut.axis == "out" else "input columns"
                    raise QuantizationConfigError(
                        f"tensor_parallel_size={tp}: {layer}'s {side} per rank ({cut.size}) are not whole {what} "
                        f"of this {config.method} checkpoint ({config.description}); choose a "
                        f"tensor_parallel_size that splits them whole, or 1")


def stores(w: WeightScheme, leaf: str) -> bool:
    """Whether `leaf` is one of a quantized layer's tensors in this format."""
    return _units(w, leaf) is not None


def shard_leaf(w: WeightScheme, leaf: str, tensor, cut: Cut, name: str) -> torch.Tensor:
    """The rank's part of checkpoint tensor `name` (leaf `leaf` of a quantized layer; a
    tensor, or a safetensors slice of which only that part is read), copied out of a whole
    tensor (so that one is freed), or the whole tensor where the rank takes it whole."""
    units = _units(w, leaf)
    if units is None or leaf == "weight":
        raise ValueError(f"{name}: not a quantized tensor of the {w.packing} layout")
    if leaf == "weight_shape":
        shape = read_part(tensor).clone()
        shape[0 if cut.axis == "out" else 1] = cut.size
        return shape
    if cut.axis not in units:
        return read_part(tensor)
    dim, unit = units[cut.axis]
    if unit is None:
        return read_part(tensor)  # one group over the whole input: every rank's columns are in it
    part = read_part(tensor, dim, cut.start // unit, -(-cut.size // unit))
    if isinstance(tensor, torch.Tensor):
        part = part.clone()  # the whole tensor goes now
    if leaf in ("g_idx", "weight_g_idx"):
        return _own_groups(part, cut, w.group_size or cut.total, name)
    return part


def _own_groups(g_idx: torch.Tensor, cut: Cut, group_size: int, name: str) -> torch.Tensor:
    """A row-parallel rank's g_idx, numbered from its first group; refused unless its
    columns are whole groups in order (no activation order)."""
    own = g_idx.to(torch.int64) - cut.start // group_size
    if not torch.equal(own, torch.arange(cut.size, device=own.device) // min(group_size, cut.size)):
        raise QuantizationConfigError(
            f"{name}: an activation-order g_idx (GPTQ desc_act) cannot be split over tensor-parallel ranks; "
            f"use a checkpoint without activation order, or tensor_parallel_size=1")
    return own.to(g_idx.dtype)
