"""The replaced-layer interface: a linear layer as the fast path runs it.

`apply_fast_path` replaces every `nn.Linear` of the reference model with a `Projection`.
A projection computes `x @ weight.T (+ bias)` (`forward`) and may also carry the work of the
kernels around the product (`silu`, `add_norm`, `qkv_rope`); each fused form returns None
where this projection cannot do it for these rows, and the fast model then runs the
product and the separate kernel. `Projection` itself is the plain form (torch's product,
no fused forms); `FewRowLinear` runs decode steps through the measured-fastest few-row
kernel. A quantized, tensor-parallel or LoRA layer is another `Projection` subclass: it
implements `forward` (and the fused forms it can) and `kernel` (what `explain` prints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.config import KernelConfig
from baton.engine.fastpath.few_row import NormPending, RopeStore, silu_fits, skinny_mm
from baton.engine.fastpath.few_row_tuning import FewRowTuning, launch_options


class Projection(nn.Module):
    """y = x @ weight.T (+ bias) over the weights of a reference `nn.Linear` (shared, not copied).

    x is [T, in] or a `NormPending` (the output of an RMSNorm whose 1/rms is not applied yet:
    only `add_norm` of the projection before it makes one, and only where the projection
    after it said it can take one, `takes_pending`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # [out, in]
        self.bias = linear.bias  # [out] or None

    def forward(self, x: torch.Tensor | NormPending) -> torch.Tensor:
        """[T, in] -> [T, out]."""
        if isinstance(x, NormPending):
            x = x.normalized()
        return F.linear(x, self.weight, self.bias)

    def silu(self, x: torch.Tensor | NormPending) -> torch.Tensor | None:
        """For the fused [gate; up] projection: SiLU(gate) * up [T, out / 2] in the product's
        kernel, or None (the caller runs `forward` and the activation)."""
        return None

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 consumer: Projection, consumer_silu: bool, sums: torch.Tensor | None) -> NormPending | None:
        """RMSNorm(self(x) + residual) as a `NormPending` for `consumer` (its SiLU form with
        `consumer_silu`), the sum written into `residual` [T, out]; sums: a zeroed row of
        `few_row.norm_sums`. None where this cannot be done (the caller runs `forward` and
        the norm kernel)."""
        return None

    def takes_pending(self, rows: int, silu: bool) -> bool:
        """Whether `forward` (or `silu`, with `silu`) takes a `NormPending` of `rows` rows in
        its own epilogue; a producer only makes one for a consumer that does."""
        return False

    def qkv_rope(self, x: torch.Tensor | NormPending, rope: RopeStore) -> torch.Tensor | None:
        """For the fused Q/K/V projection: keys and values rotated and stored in the cache,
        the rotated queries [T, heads, head_dim] returned, in the product's kernel; or None
        (the caller runs `forward` and the rotary + KV store kernel)."""
        return None

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        """What computes this product for `rows` rows in `form` ("plain", "silu", "add_norm",
        "rope"; `pending`: x a `NormPending`): a kernel's name, or None where the form does
        not apply (for `explain`; the same choice `forward` and the fused forms make)."""
        return "cuBLAS" if form == "plain" else None


class FewRowLinear(Projection):
    """A projection whose steps of <= 64 rows run the few-row Triton kernel where the
    engine's tuning measured it faster than cuBLAS (`FewRowTuning.choose`), in the form the
    decode step needs. `form`: the form decode steps run it in (what the tuning times, see
    `few_row_tuning.FORMS`); `rope_heads`: (heads, KV heads, head dim) of a Q/K/V projection
    whose epilogue can take the rotary and KV store."""

    def __init__(self, linear: nn.Linear, form: str, tuning: FewRowTuning, kernels: KernelConfig,
                 rope_heads: tuple[int, int, int] | None = None):
        super().__init__(linear)
        self.form = form
        self.rope_heads = rope_heads
        self.tuning = tuning
        self.kernels = kernels
        self._launch = launch_options(kernels)

    def _config(self, x: torch.Tensor | NormPending, credit_us: float = 0.0, fits_form=None,
                form: str = "") -> tuple | None:
        rows = x.rows if isinstance(x, NormPending) else x  # [T, in]
        if rows.stride(-1) != 1:
            return None
        return self.tuning.choose(self.weight, rows.shape[0], self.kernels, credit_us, fits_form, form)

    def forward(self, x: torch.Tensor | NormPending) -> torch.Tensor:
        pending = isinstance(x, NormPending)  # then the norm goes in this product's epilogue
        config = self._config(x, self.kernels.fused_credit_us if pending else 0.0)
        if config is None:
            return F.linear(x.normalized() if pending else x, self.weight, self.bias)
        return skinny_mm(x, self.weight, self.bias, config, **self._launch)

    def silu(self, x: torch.Tensor | NormPending) -> torch.Tensor | None:
        config = self._config(x, self.kernels.fused_credit_us, silu_fits)
        return None if config is None else skinny_mm(x, self.weight, self.bias, config, silu=True, **self._launch)

    def takes_pending(self, rows: int, silu: bool) -> bool:
        return self.tuning.choose(self.weight, rows, self.kernels, self.kernels.fused_credit_us,
                                  silu_fits if silu else None) is not None

    def add_norm(self, x, residual, norm_weight, eps, consumer, consumer_silu, sums):
        if not self.kernels.fuse_norms or sums is None:
            return None
        config = self._config(x, self.kernels.fused_credit_us)
        if config is None or self.bias is not None or residual.stride(-1) != 1:
            return None
        if not consumer.takes_pending(x.shape[0], consumer_silu):
            return None
        return skinny_mm(x, self.weight, None, config, add_norm=(residual, norm_weight, eps, sums), **self._launch)

    def qkv_rope(self, x, rope):
        config = self._config(x, self.kernels.fused_credit_us, rope.fits, "rope_row_scale")
        return None if config is None else skinny_mm(x, self.weight, self.bias, config, rope=rope, **self._launch)

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        credit = self.kernels.fused_credit_us
        if form == "plain":
            config = self.tuning.choose(self.weight, rows, self.kernels, credit if pending else 0.0)
            return "cuBLAS" if config is None else f"few-row {config}"
        if form == "silu":
            config = self.tuning.choose(self.weight, rows, self.kernels, credit, silu_fits)
        elif form == "add_norm":
            ok = self.kernels.fuse_norms and self.bias is None
            config = self.tuning.choose(self.weight, rows, self.kernels, credit) if ok else None
        elif form == "rope" and self.rope_heads is not None:
            heads, kv_heads, head_dim = self.rope_heads
            fits_rope = RopeStore(*[None] * 5, heads, kv_heads, head_dim).fits
            config = self.tuning.choose(self.weight, rows, self.kernels, credit, fits_rope, "rope_row_scale")
        else:
            config = None
        return None if config is None else f"few-row {config}"
