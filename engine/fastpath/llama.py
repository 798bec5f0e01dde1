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
Each fused form falls back to the product and the separate kernel where it does not apply.
`explain` prints the choices per decode batch size.
"""

from __future__ import annotations

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

    def forward(self, x, residual, positions, rotary, kv, meta, backend, next_layer: FastDecoderLayer | None,
                sums: torch.Tensor | None):
        """(layer input [T, hidden] or a `NormPending`, residual stream or None) -> (MLP output,
        residual stream), as `DecoderLayer.forward`. A `NormPending` input is this layer's input
        norm, done by the previous layer's down_proj (the stream already added); the output
        is `next_layer`'s when this layer's down_proj can do it. sums [2, MAX_ROWS]: zeroed
        sums of squares for the two norms this layer may fuse, or None."""
        pdl = self.kernels.pdl
        sums_attn, sums_mlp = (None, None) if sums is None else sums
        norm = self.input_layernorm
        if isinstance(x, NormPending):
            h = x
        elif residual is None:
            h, residual = add_rms_norm(x, None, norm.weight, norm.eps, pdl), x
        else:
            h = add_rms_norm(x, residual, norm.weight, norm.eps, pdl)  # residual += x
        a = self.attention(h, positions, rotary, kv, meta, backend)  # [T, H * D]
        norm = self.post_attention_layernorm
        h = self.o_proj.add_norm(a, residual, norm.weight, norm.eps, self.gate_up_proj, True, sums_attn)
        if h is None:
            h = add_rms_norm(self.o_proj(a), residual, norm.weight, norm.eps, pdl)
        act = self.gate_up_proj.silu(h)  # [T, I]
        if act is None:
            act = silu_mul(self.gate_up_proj(h), pdl)
        if next_layer is not None:
            norm = next_layer.input_layernorm
            out = self.down_proj.add_norm(act, residual, norm.weight, norm.eps, next_layer.qkv_proj, False, sums_mlp)
            if out is not None:
                return out, residual
        return self.down_proj(act), residual

    def attention(self, h, positions, rotary, kv, meta: AttentionMetadata, backend: AttentionBackend):
        """h [T, hidden] or a `NormPending` -> attention output [T, H * D] (before o_proj)."""
        if self.fp8_kv_attention is not None:
            return self.fp8_kv_attention.attend(self.qkv_proj(h), positions, rotary, kv, meta, backend)
        a = self.args
        k_cache, v_cache = layer_view(kv, self.layer_idx)
        if self.kernels.rope_epilogue and not backend.fuses_rope(meta):
            rope = RopeStore(positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping,
                             a.num_heads, a.num_kv_heads, a.head_dim)
            q = self.qkv_proj.qkv_rope(h, rope)  # [T, H, D], keys and values stored
            if q is not None:
                return backend.attend(q, k_cache, v_cache, meta).reshape(-1, self.q_size)
        qkv = self.qkv_proj(h)  # [T, (H + 2 Hkv) D]
        out = backend.rope_attend(qkv, rotary.cos_sin, k_cache, v_cache, meta)
        if out is None:
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

    def projections(self) -> list[Projection]:
        """Every projection, in model order."""
        return [p for layer in self.layers for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                                      layer.down_proj)] + [self.lm_head]

    def tune(self, max_rows: int = MAX_ROWS) -> dict:
        """Time the few-row kernels for this model's product shapes (`FewRowTuning.tune`)."""
        return self.tuning.tune([p for p in self.projections() if isinstance(p, FewRowLinear)], self.kernels,
                                max_rows)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        model = self.reference
        x = model.embed_tokens(input_ids)  # [T, hidden]
        sums = None
        if x.shape[0] <= MAX_ROWS and self.kernels.fuse_norms:  # two norms a layer may fuse
            sums = norm_sums(2 * len(self.layers), x.device)
        residual = None
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            x, residual = layer(x, residual, positions, model.rotary, kv, meta, backend, following,
                                None if sums is None else sums[2 * i : 2 * i + 2])
        return add_rms_norm(x, residual, self.norm.weight, self.norm.eps, self.kernels.pdl)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""
        return self.lm_head(hidden)

    def decode_kernels(self, batch: int | None, backend: AttentionBackend) -> dict[str, str]:
        """{op: what computes it} in a layer after the first of a decode step of `batch`
        sequences (None: a prefill step of more than 64 rows): the choices `forward` makes,
        from the same tuning and switches (for `fastpath.explain`)."""
        rows = batch if batch is not None else MAX_ROWS + 1
        lens = [1] * rows if batch is not None else [rows]
        meta = AttentionMetadata(None, None, None, None, lens, lens, 16)  # the layout is all that is read
        layer = self.layers[-1]
        qkv, o, gate_up, down = layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj
        sums = rows <= MAX_ROWS and self.kernels.fuse_norms
        input_pending = bool(sums and down.kernel(rows, "add_norm") and qkv.takes_pending(rows, False))
        post_pending = bool(sums and o.kernel(rows, "add_norm") and gate_up.takes_pending(rows, True))
        ops = {"input norm": ("in the previous down_proj's epilogue, 1/rms in Q/K/V's" if input_pending
                              else "Triton add_rms_norm")}
        rope_in_attention = backend.fuses_rope(meta)
        rope = self.kernels.rope_epilogue and not rope_in_attention and qkv.kernel(rows, "rope")
        if layer.fp8_kv_attention is not None:
            ops["Q/K/V"] = qkv.kernel(rows, "plain", input_pending)
            ops["rotary + KV store"] = "torch: rotary, FP8 KV scales, the backend's store"
        elif rope:
            ops["Q/K/V"] = f"{rope}, rotary + KV store in its epilogue"
        else:
            ops["Q/K/V"] = qkv.kernel(rows, "plain", input_pending)
            ops["rotary + KV store"] = "in the attention kernel" if rope_in_attention else "Triton rope_store"
        ops["attention"] = backend.decode_kernel(rows) if batch is not None else f"{backend.name} prefill"
        if post_pending:
            ops["o_proj"] = f"{o.kernel(rows, 'add_norm')}, residual add + norm in its epilogue, 1/rms in gate/up's"
        else:
            ops["o_proj"] = o.kernel(rows, "plain")
            ops["post-attention norm"] = "Triton add_rms_norm"
        silu = gate_up.kernel(rows, "silu")
        if silu:
            ops["gate/up"] = f"{silu}, SiLU * up in its epilogue"
        else:
            ops["gate/up"] = gate_up.kernel(rows, "plain", post_pending)
            ops["SiLU * up"] = "Triton silu_mul"
        if input_pending:
            ops["down_proj"] = f"{down.kernel(rows, 'add_norm')}, residual add + next norm in its epilogue"
        else:
            ops["down_proj"] = down.kernel(rows, "plain")
        ops["final norm"] = "Triton add_rms_norm"
        ops["lm_head"] = self.lm_head.kernel(rows, "plain")
        ops["greedy sampling"] = "Triton argmax_rows"
        ops["PDL"] = "on" if self.kernels.pdl else "off"
        return ops
