"""The replaced-layer interface: a linear layer as the fast path runs it.

`apply_fast_path` replaces every `nn.Linear` of the reference model with a `Projection`.
A projection computes `x @ weight.T (+ bias)` (`forward`) and may also carry the work of the
kernels around the product in fused forms (`silu`, `add_norm`, `qkv_rope`). `kernel(rows,
form)` says what computes a form for a step of `rows` rows, or None where the form does not
apply: the fast model decides once per step which forms every layer runs (its `StepPlan`)
from these answers, and calls a fused form only where `kernel` named a kernel for it.
`Projection` itself is the plain form (torch's product, no fused forms); `FewRowLinear`
runs decode steps through the measured-fastest few-row kernel. A quantized, tensor-parallel
or LoRA layer is another `Projection` subclass: it implements `forward`, `kernel` and the
fused forms it names a kernel for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.config import KernelConfig
from baton.engine.fastpath.few_row import NormPending, RopeStore, skinny_mm
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

    def silu(self, x: torch.Tensor | NormPending) -> torch.Tensor:
        """For the fused [gate; up] projection: SiLU(gate) * up [T, out / 2] in the product's
        kernel (where `kernel(T, "silu")` names one)."""
        raise NotImplementedError(f"{type(self).__name__} has no SiLU form")

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 sums: torch.Tensor) -> NormPending:
        """RMSNorm(self(x) + residual) as a `NormPending` for the projection after it (which
        `takes_pending`), the sum written into `residual` [T, out]; sums: a zeroed row of
        `few_row.norm_sums` (where `kernel(T, "add_norm")` names a kernel)."""
        raise NotImplementedError(f"{type(self).__name__} has no residual add + norm form")

    def takes_pending(self, rows: int, silu: bool) -> bool:
        """Whether `forward` (or `silu`, with `silu`) takes a `NormPending` of `rows` rows in
        its own epilogue; a producer only makes one for a consumer that does."""
        return False

    def qkv_rope(self, x: torch.Tensor | NormPending, rope: RopeStore) -> torch.Tensor:
        """For the fused Q/K/V projection: keys and values rotated and stored in the cache,
        the rotated queries [T, heads, head_dim] returned, in the product's kernel (where
        `kernel(T, "rope")` names one)."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary form")

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        """What computes this product for `rows` rows in `form` ("plain", "silu", "add_norm",
        "rope"; `pending`: x a `NormPending`): a kernel's name, or None where the form does
        not apply. The step plan (and `explain`) ask this once per step shape."""
        return "cuBLAS" if form == "plain" else None

    def input_quantizer(self):
        """For an FP8 product: how it rounds its input to e4m3 (an `Fp8Input` of
        engine/quantization/fused.py), where the norm or SiLU * up kernel before it may do
        that and hand `forward` the `Fp8Rows`; None: it takes rows in the model dtype."""
        return None


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

    def _fused(self, rows: int, form: str, head_dim: int = 0) -> tuple:
        config = self.tuning.choose(self.weight, rows, self.kernels, form, head_dim)
        if config is None:
            raise ValueError(f"no few-row {form} form for {rows} rows of {tuple(self.weight.shape)}: "
                             "the step plan asks `kernel` first")
        return config

    def forward(self, x: torch.Tensor | NormPending) -> torch.Tensor:
        pending = isinstance(x, NormPending)  # then the norm goes in this product's epilogue
        rows = x.rows if pending else x  # [T, in]
        config = None
        if rows.stride(-1) == 1:
            config = self.tuning.choose(self.weight, rows.shape[0], self.kernels, "pending" if pending else "plain")
        if config is None:
            return F.linear(x.normalized() if pending else x, self.weight, self.bias)
        return skinny_mm(x, self.weight, self.bias, config, **self._launch)

    def silu(self, x):
        return skinny_mm(x, self.weight, self.bias, self._fused(x.shape[0], "silu"), silu=True, **self._launch)

    def takes_pending(self, rows: int, silu: bool) -> bool:
        return self.tuning.choose(self.weight, rows, self.kernels, "silu" if silu else "pending") is not None

    def add_norm(self, x, residual, norm_weight, eps, sums):
        return skinny_mm(x, self.weight, None, self._fused(x.shape[0], "add_norm"),
                         add_norm=(residual, norm_weight, eps, sums), **self._launch)

    def qkv_rope(self, x, rope):
        config = self._fused(x.shape[0], "rope", rope.head_dim)
        return skinny_mm(x, self.weight, self.bias, config, rope=rope, **self._launch)

    def kernel(self, rows: int, form: str = "plain", pending: bool = False) -> str | None:
        if form == "plain":
            config = self.tuning.choose(self.weight, rows, self.kernels, "pending" if pending else "plain")
            return "cuBLAS" if config is None else f"few-row {config}"
        if form == "silu":
            config = self.tuning.choose(self.weight, rows, self.kernels, "silu")
        elif form == "add_norm" and self.kernels.fuse_norms and self.bias is None:
            config = self.tuning.choose(self.weight, rows, self.kernels, "add_norm")
        elif form == "rope" and self.rope_heads is not None:
            config = self.tuning.choose(self.weight, rows, self.kernels, "rope", self.rope_heads[2])
        else:
            config = None
        return None if config is None else f"few-row {config}"
