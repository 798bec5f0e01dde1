"""`LoRAProjection`: a model's projection plus its adapters' product.

`apply_lora` replaces each decoder layer's Q/K/V, o, gate/up and down projection of the
model that runs (the torch reference on the CPU, the fast path's model on CUDA) with a
`LoRAProjection` around it: the base product is the wrapped layer's own (cuBLAS, the
few-row kernel, a quantized kernel), the adapters' product is added after it
(`ops.add_lora`). The fast path's fused epilogues (SiLU, residual add + norm, rotary)
would have to see the sum, so a LoRA projection offers the plain form only (its `kernel`
names no other) and the fast model's step plan runs their separate kernels. It implements the
`Projection` interface (engine/fastpath/projection.py) without importing it: that module
loads Triton, which the CPU path never does.
"""

from __future__ import annotations

import torch
from torch import nn

from baton.engine.lora.ops import add_lora
from baton.engine.parallel.layers import RowParallel


class LoRAProjection(nn.Module):
    """y = base(x) + B[s_t] A[s_t] x[t] per token, reading the step's token slots from the
    `LoRAManager` (its `token_slots`, set before every forward). a, b: this projection's
    slot buffers (`ops.py` shapes), owned by the manager."""

    def __init__(self, base: nn.Module, manager, a: torch.Tensor, b: torch.Tensor, offsets: list[int]):
        super().__init__()
        self.base = base
        self.bias = getattr(base, "bias", None)
        self.manager = manager
        self.a, self.b, self.offsets = a, b, offsets

    def forward(self, x) -> torch.Tensor:
        """x [T, in] (or the fast path's `NormPending`) -> [T, out]."""
        if not isinstance(x, torch.Tensor):  # a NormPending: this form takes none
            x = x.normalized()
        y = self.base(x)
        m = self.manager
        if not m.active:  # an eager step with no adapter in it
            return y
        return add_lora(y, x, self.a, self.b, m.token_slots[: x.shape[0]], self.offsets, m.max_rank)

    # The fused forms: none (`kernel` names none, so the step plan never calls them).
    def silu(self, x):
        raise NotImplementedError("a LoRA projection has no SiLU form")

    def add_norm(self, x, residual, norm_weight, eps, sums):
        raise NotImplementedError("a LoRA projection has no residual add + norm form")

    def takes_pending(self, rows: int, silu: bool) -> bool:
        return False

    def qkv_rope(self, x, rope):
        raise NotImplementedError("a LoRA projection has no rotary form")

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        if form != "plain":
            return None
        base = self.base.kernel(rows) if hasattr(self.base, "kernel") else "torch"
        return f"{base}, then the LoRA shrink and expand kernels"


def apply_lora(model: nn.Module, manager) -> None:
    """Wrap every projection of `manager.layout` in each decoder layer of `model` (a Llama
    reference model, where they sit in `self_attn` and `mlp`, or the fast path's, where they
    sit in the layer) with a `LoRAProjection` over the manager's buffers."""
    for i, layer in enumerate(model.layers):
        for proj in manager.layout.projections:
            owner = layer
            if not hasattr(layer, proj.name):
                owner = layer.self_attn if hasattr(layer.self_attn, proj.name) else layer.mlp
            name = proj.name
            base = getattr(owner, name)
            if isinstance(base, RowParallel):
                # A tensor-parallel row-parallel layer (o, down): the
                # adapter's partial product (its A holds the rank's input columns) joins the
                # base's in the one all-reduce.
                owner, name, base = base, "linear", base.linear
            if isinstance(base, LoRAProjection):
                continue
            a, b = manager.buffers[(i, proj.name)]
            setattr(owner, name, LoRAProjection(base, manager, a, b, proj.offsets()))
    # The fast model's step plans were made from the projections it had: forget them.
    plans = getattr(model, "_plans", None)
    if plans is not None:
        plans.clear()
