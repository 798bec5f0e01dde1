"""The Llama reference model (`engine/models/llama.py`) as CUDA runs it: the same computation
through fused Triton kernels. This file is where to look for which kernel computes what.

Every step, whatever its size:
- residual add + RMSNorm in one kernel (`triton_ops.add_rms_norm`), the sum written into
  the residual stream in place;
- rotary + KV store in one kernel (`triton_ops.rope_store`), or inside the attention
  kernel (`backend.rope_attend`: decode-only steps of few (sequence, KV head) pairs);
- SiLU * up in one kernel (`triton_ops.silu_mul`).
Steps of <= 64 rows (decode) run each product through its `Projection` (`projection.py`:
the few-row kernel where the tuning measured it faster than cuBLAS), which can also take:
- SiLU * up into the gate/up product's epilogue (`Projection.silu`);
- the residual add + RMSNorm into the epilogues of the products around it: the product
  before the norm (o_proj, or the previous layer's down_proj) adds the residual and sums
  squares (`Projection.add_norm`), the product after it (gate/up, Q/K/V) scales its rows
  by 1/rms; the norm costs no kernel and the layer's input is then a `NormPending`;
- with `KernelConfig.rope_epilogue`, the rotary and KV store into the Q/K/V product's
  epilogue in steps whose attention kernel does not do them (`Projection.qkv_rope`).
Around FP8 (W8A8) products, whose quantized layers have no such epilogues, the input norms
and SiLU * up also quantize their output to e4m3 for the product after them
(`quantization/fused.py`, with `KernelConfig.fuse_fp8_quant`).
Which of these forms a step runs is decided once per forward, not per layer: the step's
`StepPlan` (from its row count and whether the attention kernel does the rotary) asks the
projections which forms they can run at that many rows (`Projection.kernel`), and every
layer follows it; plans are kept per row count. `explain` prints the plans per decode batch
size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baton.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.engine.config import KernelConfig
from baton.engine.fastpath.few_row import MAX_ROWS, NormPending, RopeStore, norm_sums
from baton.engine.fastpath.few_row_tuning import FewRowTuning
from baton.engine.fastpath.projection import FewRowLinear, Projection
from baton.engine.fastpath.triton_ops import add_rms_norm, rope_store, silu_mul
from baton.engine.kv_cache import layer_view
from baton.engine.models.llama import DecoderLayer, LlamaForCausalLM, RMSNorm
from baton.engine.quantization.fused import add_rms_norm_fp8, silu_mul_fp8
from baton.engine.quantization.linear import QuantLinear


def project(linear: nn.Module, form: str, tuning: FewRowTuning, kernels: KernelConfig,
            rope_heads: tuple[int, int, int] | None = None) -> Projection:
    """The projection for a reference layer: a `Projection` placed there already (a
    tensor-parallel or LoRA layer) as it is, a quantized layer as a `QuantProjection` (its
    Triton product), an `nn.Linear` as a `FewRowLinear` in `form`."""
    if isinstance(linear, Projection):
        return linear
    if isinstance(linear, QuantLinear):
        from baton.engine.quantization.projection import QuantProjection

        return QuantProjection(linear)
    return FewRowLinear(linear, form, tuning, kernels, rope_heads)


@dataclass(frozen=True)
class StepPlan:
    """Which form each op of every layer runs in, for one step shape (`FastLlama.plan`).

    fuse_input_norm: a layer's input norm in the previous layer's down_proj epilogue (its
    1/rms in Q/K/V's); fuse_post_norm: the post-attention norm in o_proj's (its 1/rms in
    gate/up's); silu: SiLU * up in gate/up's epilogue; rope: where the rotary and KV store
    run: "attention" (the attention kernel, `backend.rope_attend`), "epilogue" (Q/K/V's,
    `Projection.qkv_rope`), "kernel" (`triton_ops.rope_store`), or "reference" (an FP8 KV
    cache: the reference layer's scaled store). fp8_qkv, fp8_gate_up, fp8_down: the FP8
    product's input quantized by the input norm's, the post-attention norm's, the SiLU *
    up kernel."""

    fuse_input_norm: bool
    fuse_post_norm: bool
    silu: bool
    rope: str
    fp8_qkv: bool = False
    fp8_gate_up: bool = False
    fp8_down: bool = False

    @property
    def norm_sums(self) -> bool:
        """Whether the step needs sums of squares (`few_row.norm_sums`, two rows a layer)."""
        return self.fuse_input_norm or self.fuse_post_norm


class FastDecoderLayer(nn.Module):
    """One `DecoderLayer` (its weights, shared) as the fast path runs it."""

    def __init__(self, layer: DecoderLayer, tuning: FewRowTuning, kernels: KernelConfig):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.args = a = attn.args
        self.layer_idx = attn.layer_idx
        self.q_size = attn.q_size
        self.kernels = kernels
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        # The forms decode steps run the products in (what the tuning times).
        self.qkv_proj = project(attn.qkv_proj, "row_scale", tuning, kernels, (a.num_heads, a.num_kv_heads, a.head_dim))
        self.o_proj = project(attn.o_proj, "add_norm", tuning, kernels)
        self.gate_up_proj = project(mlp.gate_up_proj, "silu_row_scale", tuning, kernels)
        self.down_proj = project(mlp.down_proj, "add_norm", tuning, kernels)
        # With an FP8 KV cache the reference layer's attention (it scales what it stores and
        # reads); the fused rotary + KV store kernels store unscaled values.
        self.fp8_kv_attention = attn if attn.kv_scales is not None else None

    def forward(self, x, residual, positions, rotary, kv, meta, backend, plan: StepPlan,
                next_layer: FastDecoderLayer | None, sums: tuple[torch.Tensor, ...] | None):
        """(layer input [T, hidden] or a `NormPending`, residual stream or None) -> (MLP output,
        residual stream), as `DecoderLayer.forward`, in the forms `plan` says. A `NormPending`
        input is this layer's input norm, done by the previous layer's down_proj (the stream
        already added); with `plan.fuse_input_norm` the output is `next_layer`'s. sums: two
        zeroed [MAX_ROWS] sums of squares for the two norms this layer may fuse, or None."""
        pdl = self.kernels.pdl
        if isinstance(x, NormPending):
            h = x
        else:  # residual += x, or the stream starts at x
            h = self.rms_norm(x, residual, self.input_layernorm, self.qkv_proj if plan.fp8_qkv else None)
            residual = x if residual is None else residual
        a = self.attention(h, positions, rotary, kv, meta, backend, plan.rope)  # [T, H * D]
        norm = self.post_attention_layernorm
        if plan.fuse_post_norm:
            h = self.o_proj.add_norm(a, residual, norm.weight, norm.eps, sums[0])
        else:
            h = self.rms_norm(self.o_proj(a), residual, norm, self.gate_up_proj if plan.fp8_gate_up else None)
        if plan.silu:
            act = self.gate_up_proj.silu(h)  # [T, I]
        elif plan.fp8_down:
            act = silu_mul_fp8(self.gate_up_proj(h), self.down_proj.input_quantizer(), pdl)
        else:
            act = silu_mul(self.gate_up_proj(h), pdl)
        if next_layer is not None and plan.fuse_input_norm:
            norm = next_layer.input_layernorm
            return self.down_proj.add_norm(act, residual, norm.weight, norm.eps, sums[1]), residual
        return self.down_proj(act), residual

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                 fp8_for: Projection | None) -> torch.Tensor:
        """RMSNorm(x + residual) [T, hidden] (the sum written into `residual`), or for an FP8
        product `fp8_for` the same quantized to its input in the same kernel (`Fp8Rows`)."""
        if fp8_for is not None:
            return add_rms_norm_fp8(x, residual, norm.weight, norm.eps, fp8_for.input_quantizer(), self.kernels.pdl)
        return add_rms_norm(x, residual, norm.weight, norm.eps, self.kernels.pdl)

    def attention(self, h, positions, rotary, kv, meta: AttentionMetadata, backend: AttentionBackend, rope: str):
        """h [T, hidden] or a `NormPending` -> attention output [T, H * D] (before o_proj), the
        rotary and KV store where `rope` (`StepPlan.rope`) says."""
        if rope == "reference":
            return self.fp8_kv_attention.attend(self.qkv_proj(h), positions, rotary, kv, meta, backend)
        a = self.args
        k_cache, v_cache = layer_view(kv, self.layer_idx)
        if rope == "epilogue":
            store = RopeStore(positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping,
                              a.num_heads, a.num_kv_heads, a.head_dim)
            q = self.qkv_proj.qkv_rope(h, store)  # [T, H, D], keys and values stored
            return backend.attend(q, k_cache, v_cache, meta).reshape(-1, self.q_size)
        qkv = self.qkv_proj(h)  # [T, (H + 2 Hkv) D]
        if rope == "attention":
            out = backend.rope_attend(qkv, rotary.cos_sin, k_cache, v_cache, meta)
        else:
            q = rope_store(qkv, positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping,
                           a.num_heads, a.num_kv_heads, a.head_dim, self.kernels.pdl)
            out = backend.attend(q, k_cache, v_cache, meta)
        return out.reshape(-1, self.q_size)


class FastLlama(nn.Module):
    """A built `LlamaForCausalLM` (weights shared, the reference left as it is) with the fast
    path's kernels; the same `forward` and `compute_logits` contract."""

    def __init__(self, model: LlamaForCausalLM, kernels: KernelConfig, tuning: FewRowTuning):
        super().__init__()
        self.reference = model
        self.kernels = kernels
        self.tuning = tuning
        self.layers = nn.ModuleList(FastDecoderLayer(layer, tuning, kernels) for layer in model.layers)
        self.norm: RMSNorm = model.norm
        self.lm_head = project(model.lm_head, "plain", tuning, kernels)
        self._plans: dict[tuple[int, bool], StepPlan] = {}

    def projections(self) -> list[Projection]:
        """Every projection, in model order."""
        return [p for layer in self.layers for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                                      layer.down_proj)] + [self.lm_head]

    def tune(self, max_rows: int = MAX_ROWS) -> dict:
        """Time the few-row kernels for this model's product shapes (`FewRowTuning.tune`)."""
        self._plans.clear()
        return self.tuning.tune([p for p in self.projections() if isinstance(p, FewRowLinear)], self.kernels,
                                max_rows)

    def plan(self, rows: int, rope_in_attention: bool) -> StepPlan:
        """The forms of a step of `rows` rows (`rope_in_attention`: the attention backend
        rotates and stores, `backend.fuses_rope`); a fused form where every layer's
        projections can run it at that many rows. Kept per (rows, rope_in_attention) until
        the next `tune`; more than 64 rows all share one."""
        key = (min(rows, MAX_ROWS + 1), rope_in_attention)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(*key)
        return plan

    def _make_plan(self, rows: int, rope_in_attention: bool) -> StepPlan:
        layers = list(self.layers)
        norms = rows <= MAX_ROWS and self.kernels.fuse_norms
        fuse_input = norms and all(
            before.down_proj.kernel(rows, "add_norm") and after.qkv_proj.takes_pending(rows, False)
            for before, after in zip(layers, layers[1:]))
        fuse_post = norms and all(
            layer.o_proj.kernel(rows, "add_norm") and layer.gate_up_proj.takes_pending(rows, True)
            for layer in layers)
        silu = all(layer.gate_up_proj.kernel(rows, "silu") for layer in layers)
        if any(layer.fp8_kv_attention is not None for layer in layers):
            rope = "reference"
        elif rope_in_attention:
            rope = "attention"
        elif self.kernels.rope_epilogue and all(layer.qkv_proj.kernel(rows, "rope") for layer in layers):
            rope = "epilogue"
        else:
            rope = "kernel"
        fp8 = self.kernels.fuse_fp8_quant

        def fp8_input(role: str) -> bool:  # every layer's `role` product takes its input quantized
            return fp8 and all(getattr(layer, role).input_quantizer() is not None for layer in layers)

        return StepPlan(bool(fuse_input), bool(fuse_post), bool(silu), rope,
                        fp8_qkv=not fuse_input and fp8_input("qkv_proj"),
                        fp8_gate_up=not fuse_post and fp8_input("gate_up_proj"),
                        fp8_down=not silu and fp8_input("down_proj"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        model = self.reference
        x = model.embed_tokens(input_ids)  # [T, hidden]
        plan = self.plan(x.shape[0], backend.fuses_rope(meta))
        layers = self.layers
        # Each layer's two zeroed rows of sums of squares, cut with one op, not per layer.
        sums = norm_sums(2 * len(layers), x.device).unbind() if plan.norm_sums else None
        residual = None
        for i, layer in enumerate(layers):
            following = layers[i + 1] if i + 1 < len(layers) else None
            x, residual = layer(x, residual, positions, model.rotary, kv, meta, backend, plan, following,
                                None if sums is None else sums[2 * i : 2 * i + 2])
        return add_rms_norm(x, residual, self.norm.weight, self.norm.eps, self.kernels.pdl)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""
        return self.lm_head(hidden)

    def decode_kernels(self, batch: int | None, backend: AttentionBackend) -> dict[str, str]:
        """{op: what computes it} in a layer after the first of a decode step of `batch`
        sequences (None: a prefill step of more than 64 rows): the step's `plan`, with the
        kernel of each product (for `fastpath.explain`)."""
        rows = batch if batch is not None else MAX_ROWS + 1
        lens = [1] * rows if batch is not None else [rows]
        meta = AttentionMetadata(None, None, None, None, lens, lens, 16)  # the layout is all that is read
        plan = self.plan(rows, backend.fuses_rope(meta))
        layer = self.layers[-1]
        qkv, o, gate_up, down = layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj
        quantizing = ", e4m3 quantizer of {}'s input in it"
        ops = {"input norm": ("in the previous down_proj's epilogue, 1/rms in Q/K/V's" if plan.fuse_input_norm
                              else "Triton add_rms_norm" + (quantizing.format("Q/K/V") if plan.fp8_qkv else ""))}
        if plan.rope == "epilogue":
            ops["Q/K/V"] = f"{qkv.kernel(rows, 'rope')}, rotary + KV store in its epilogue"
        else:
            ops["Q/K/V"] = qkv.kernel(rows, "plain", plan.fuse_input_norm)
            ops["rotary + KV store"] = {"reference": "torch: rotary, FP8 KV scales, the backend's store",
                                        "attention": "in the attention kernel",
                                        "kernel": "Triton rope_store"}[plan.rope]
        ops["attention"] = backend.decode_kernel(rows) if batch is not None else f"{backend.name} prefill"
        if plan.fuse_post_norm:
            ops["o_proj"] = f"{o.kernel(rows, 'add_norm')}, residual add + norm in its epilogue, 1/rms in gate/up's"
        else:
            ops["o_proj"] = o.kernel(rows, "plain")
            ops["post-attention norm"] = "Triton add_rms_norm" + (quantizing.format("gate/up") if plan.fp8_gate_up
                                                                  else "")
        if plan.silu:
            ops["gate/up"] = f"{gate_up.kernel(rows, 'silu')}, SiLU * up in its epilogue"
        else:
            ops["gate/up"] = gate_up.kernel(rows, "plain", plan.fuse_post_norm)
            ops["SiLU * up"] = "Triton silu_mul" + (quantizing.format("down_proj") if plan.fp8_down else "")
        if plan.fuse_input_norm:
            ops["down_proj"] = f"{down.kernel(rows, 'add_norm')}, residual add + next norm in its epilogue"
        else:
            ops["down_proj"] = down.kernel(rows, "plain")
        ops["final norm"] = "Triton add_rms_norm"
        ops["lm_head"] = self.lm_head.kernel(rows, "plain")
        ops["greedy sampling"] = "Triton argmax_rows"
        ops["PDL"] = "on" if self.kernels.pdl else "off"
        return ops
