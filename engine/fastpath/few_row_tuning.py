"""Which few-row kernel configuration computes each product, chosen by measurement at engine start.

No configuration of `few_row._skinny_kernel` wins everywhere, so `FewRowTuning.tune` times,
for every weight shape of the model and every row bucket, cuBLAS and each configuration as
CUDA-graph replays (launch overhead excluded, weights of different layers so the L2 cache
does not help), in the form decode steps run the product in; `choose` then gives the
winner for a product, or None where cuBLAS is faster. The results belong to one engine (its
`ModelRunner`): two engines in one process tune apart.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
import triton

from baton.engine.config import KernelConfig
from baton.engine.fastpath.few_row import (
    BUCKETS,
    CONFIGS,
    MAX_ROWS,
    NormPending,
    RopeStore,
    fits,
    m_pad,
    rope_fits,
    silu_fits,
    skinny_mm,
)
from baton.engine.fastpath.timing import graph_time

log = logging.getLogger(__name__)

# The forms a decode step runs a product in: "plain"; "row_scale" (x a pending norm);
# "silu_row_scale" (the fused gate/up product of a pending norm, SiLU * up in the epilogue);
# "rope_row_scale" (the fused Q/K/V product of a pending norm with the rotary and KV store
# in the epilogue); "add_norm" (a residual add + norm in the epilogue).
FORMS = ("plain", "row_scale", "silu_row_scale", "rope_row_scale", "add_norm")


class TunedLayer(Protocol):
    """What the tuning needs of a product: its weights, the form decode steps run it in, and
    for a Q/K/V product that can take the rotary epilogue (heads, KV heads, head dim)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    form: str
    rope_heads: tuple[int, int, int] | None


def launch_options(kernels: KernelConfig) -> dict:
    """`skinny_mm`'s launch arguments under `kernels` (PDL and the L2 prefetch)."""
    return {"pdl": kernels.pdl, "prefetch_bytes": kernels.prefetch_bytes, "prefetch_mode": kernels.prefetch_mode}


def _key(n: int, k: int, bucket: int, dtype: torch.dtype, form: str = "") -> tuple:
    """`times`' key: the rotary-epilogue form of Q/K/V has its own, the others the shape's."""
    return (n, k, bucket, dtype, "rope") if form == "rope_row_scale" else (n, k, bucket, dtype)


# What `choose` weighs for a product in each form it runs in: whether a fused form's credit
# applies (it replaces a kernel of its own) and which configurations fit the form.
CHOICES = ("plain", "pending", "silu", "add_norm", "rope")


class FewRowTuning:
    """One engine's measured times: (N, K, M_PAD, dtype[, "rope"]) -> {configuration or
    "cublas": microseconds per product}, and `report` ("NxK/M_PAD[ rope]" -> best, form,
    times) for benchmarks."""

    def __init__(self):
        self.times: dict[tuple, dict] = {}
        self.report: dict[str, dict] = {}
        # `choose`'s answers: a step asks the same questions of every layer's products
        # (same shapes), and a decode step's host time is what eager steps wait on.
        self._chosen: dict[tuple, tuple | None] = {}

    def choose(self, weight: torch.Tensor, rows: int, kernels: KernelConfig, form: str = "plain",
               head_dim: int = 0) -> tuple | None:
        """The fastest configuration measured for a product of `rows` rows by `weight` in
        `form` (`CHOICES`): "plain"; "pending" (x a `NormPending`, its 1/rms in the epilogue);
        "silu" (SiLU * up in the epilogue); "add_norm" (a residual add + norm in the
        epilogue); "rope" (the rotary + KV store of heads of `head_dim`, timed apart). None
        where cuBLAS is faster (a fused form by more than `kernels.fused_credit_us`: it saves
        a kernel), the shape was not tuned, no configuration fits the form, or the rows are
        too many. Answers are kept until the next `tune` (fill `times` before asking)."""
        if rows == 0 or rows > MAX_ROWS:
            return None
        key = (weight.shape, weight.dtype, rows, form, head_dim, kernels.use_swap, kernels.fused_credit_us)
        if key not in self._chosen:
            self._chosen[key] = self._best(weight, rows, kernels, form, head_dim)
        return self._chosen[key]

    def _best(self, weight, rows, kernels, form, head_dim):
        if form not in CHOICES:
            raise ValueError(f"unknown few-row product form {form!r}; one of {CHOICES}")
        times = self.times.get(_key(weight.shape[0], weight.shape[1], m_pad(rows), weight.dtype,
                                    "rope_row_scale" if form == "rope" else ""))
        if times is None:
            return None
        fits_form = silu_fits if form == "silu" else (lambda c: rope_fits(c, head_dim)) if form == "rope" else None
        ours = [c for c in times if c != "cublas" and (fits_form is None or fits_form(c))
                and (kernels.use_swap or len(c) == 4)]
        if not ours:
            return None
        best = min(ours, key=times.get)
        credit = 0.0 if form == "plain" else kernels.fused_credit_us
        return best if times[best] <= times["cublas"] + credit else None

    @torch.inference_mode()
    def tune(self, layers: Iterable[TunedLayer], kernels: KernelConfig, max_rows: int = MAX_ROWS) -> dict:
        """Time cuBLAS and every configuration for each shape of `layers` (CUDA, not float32;
        in model order); keep the fastest. Shapes and forms timed before are skipped.

        A configuration is timed in the form decode steps run the product in (the layer's
        `form`; see `form_runner`): a fused epilogue changes which tiles are fastest (a
        gate/up configuration that ties the best plain can lose in its SiLU form). cuBLAS
        runs the plain product. With `kernels.rope_epilogue` a Q/K/V shape is also timed in
        its rotary form.

        Returns {(N, K, M_PAD) (+ ("rope",)): (best name, {name: microseconds per product})} for the log.
        """
        launch = launch_options(kernels)
        by_shape: dict[tuple, list[TunedLayer]] = defaultdict(list)
        for layer in layers:
            if layer.weight.is_cuda and layer.weight.dtype != torch.float32:
                by_shape[(*layer.weight.shape, layer.weight.dtype)].append(layer)
        report = {}
        for (n, k, dtype), group in by_shape.items():
            group = group[:8]  # a product per layer in the graph: weights too big for L2 together
            form = group[0].form
            if form == "add_norm" and group[0].bias is not None:
                form = "plain"
            forms = [form]
            if kernels.rope_epilogue and form == "row_scale" and group[0].rope_heads is not None:
                forms.append("rope_row_scale")  # timed apart: `qkv_rope` looks it up by its own key
            for form, bucket in ((f, b) for f in forms for b in BUCKETS if b <= max(16, max_rows)):
                key = _key(n, k, bucket, dtype, form)
                if key in self.times:
                    continue
                self._chosen.clear()
                x = torch.randn((bucket, k), dtype=dtype, device=group[0].weight.device)

                def run(fn, x=x, group=group):
                    def launch_all():
                        for layer in group:
                            fn(layer, x)
                    return graph_time(launch_all) / len(group)

                times = {"cublas": run(lambda layer, x: F.linear(x, layer.weight, layer.bias))}
                want = F.linear(x, group[0].weight, group[0].bias).float()
                in_form, fits_form = form_runner(form, x, group[0], launch)
                for config in (c for c in CONFIGS if fits(c, bucket, x.element_size()) and (fits_form or bool)(c)):
                    try:
                        got = skinny_mm(x, group[0].weight, group[0].bias, config, **launch).float()
                        if not (got - want).norm() <= 1e-2 * want.norm():
                            raise ValueError(f"wrong result ({(got - want).norm() / want.norm():.2e} relative)")
                        times[config] = run(lambda layer, x, c=config, f=in_form: f(layer, c))
                    except Exception as exc:  # a configuration this GPU cannot compile or run right
                        log.warning("few-row product config %s skipped for %s: %s", config, (n, k), exc)
                best = min(times, key=times.get)
                self.times[key] = {c: t * 1e6 for c, t in times.items()}
                rope = form == "rope_row_scale"
                report[(n, k, bucket, *(("rope",) if rope else ()))] = row = (
                    best, {str(c): round(t * 1e6, 1) for c, t in times.items()})
                self.report[f"{n}x{k}/{bucket}" + (" rope" if rope else "")] = {
                    "best": str(best), "form": form, "us": row[1]}
        log.info("few-row matrix products: %s", {key: value[0] for key, value in report.items()})
        return report


def form_runner(form: str, x: torch.Tensor, layer: TunedLayer, launch: dict) -> tuple[Callable, Callable | None]:
    """(fn(layer, config) running one product in `form` the way decode steps run it, which
    configurations fit the form or None for all); see `FORMS`. "rope_row_scale" needs
    `layer.rope_heads`."""
    rows, k = x.shape
    n = layer.weight.shape[0]
    pending = NormPending(x, torch.full((MAX_ROWS,), float(k), dtype=torch.float64, device=x.device), 1e-5)
    if form == "plain":
        return (lambda layer, c: skinny_mm(x, layer.weight, layer.bias, c, **launch)), None
    if form == "row_scale":
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c, **launch)), None
    if form == "silu_row_scale":
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c, silu=True, **launch)), silu_fits
    if form == "rope_row_scale":
        heads, kv_heads, head_dim = layer.rope_heads
        cache = torch.zeros((triton.cdiv(rows, 16), 16, kv_heads, head_dim), dtype=x.dtype, device=x.device)
        slots = torch.arange(rows, device=x.device)
        rope = RopeStore(slots, torch.randn((rows, head_dim), device=x.device), cache, cache.clone(), slots,
                         heads, kv_heads, head_dim)
        return (lambda layer, c: skinny_mm(pending, layer.weight, layer.bias, c, rope=rope, **launch)), rope.fits
    if form == "add_norm":
        residual = torch.zeros((rows, n), dtype=x.dtype, device=x.device)
        norm = (residual, torch.ones(n, dtype=x.dtype, device=x.device), 1e-5,
                torch.zeros(MAX_ROWS, dtype=torch.float64, device=x.device))
        return (lambda layer, c: skinny_mm(x, layer.weight, None, c, add_norm=norm, **launch)), None
    raise ValueError(f"unknown few-row product form {form!r}")
