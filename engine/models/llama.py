"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over a paged KV cache.

The forward pass works on a flat batch: `input_ids` and `positions` are `[T]` for all the
step's tokens of all sequences; attention finds each sequence's rows through
`AttentionMetadata`. Q/K/V and gate/up projections are fused at load time (one matmul
each); Hugging Face checkpoint names are mapped onto the fused weights in `load_weights`.

On CUDA (with Triton) three fused kernels replace chains of small ones: residual add +
RMSNorm, rotary + KV store, SiLU * up (`triton_ops`); in decode steps (few rows) SiLU * up
runs inside the gate/up product's kernel and the residual add + RMSNorm inside the
epilogues of the products before and after it (`skinny_gemm`); in small decode-only steps
the rotary and KV store run inside the attention kernel (a backend's `rope_attend`), and,
with `skinny_gemm.ROPE_EPILOGUE` (on by default), in the Q/K/V product's epilogue in other
steps of <= 64 rows.
They compute what the torch code below computes; the CPU path runs the torch code.
`set_fused_kernels(False)` turns them off (for measuring what they buy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.engine.kv_cache import layer_view

_fused = {"enabled": True, "ops": None}


def set_fused_kernels(enabled: bool) -> None:
    """Use the fused Triton kernels on CUDA tensors (default) or the plain torch code."""
    _fused["enabled"] = enabled


def _few_rows(x: torch.Tensor):
    """The few-row product module (skinny_gemm) for a CUDA step of <= 64 rows, else None."""
    if x.is_cuda and _fused["enabled"] and x.shape[0] <= 64:
        from baton.engine.models import skinny_gemm

        return skinny_gemm
    return None


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; on CUDA with few rows, through the measured-fastest kernel (skinny_gemm)."""
    few = _few_rows(x)
    return layer(x) if few is None else few.linear(layer, x)


def _add_norm_fused(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm,
                    consumer: nn.Linear, consumer_silu: bool, sums: torch.Tensor | None):
    """norm(layer(x) + residual), the sum written into `residual`, with the add and the norm
    in the epilogues of `layer`'s product and of `consumer`'s after it (a pending norm, see
    skinny_gemm.NormPending); None where that does not apply (CPU, many rows, no fast
    configuration): the caller runs the product and the norm."""
    few = _few_rows(x)
    if few is None:
        return None
    return few.linear_add_norm(layer, x, residual, norm.weight, norm.eps, consumer, consumer_silu, sums)


def _fused_ops(x: torch.Tensor):
    """The fused-kernel module when `x` is on CUDA and they are on, else None."""
    if not (x.is_cuda and _fused["enabled"]):
        return None
    if _fused["ops"] is None:
        from baton.engine.models import triton_ops

        _fused["ops"] = triton_ops
    return _fused["ops"]


@dataclass(frozen=True)
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict, qkv_bias: bool = False) -> LlamaArgs:
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(rope_scaling, dict):
            rope_theta = rope_scaling.get("rope_theta")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position=cfg.get("max_position_embeddings", 2048),
            qkv_bias=qkv_bias or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with a residual: (RMSNorm(x + residual), x + residual).

        On the fused path the sum is written into `residual` in place.
        """
        ops = _fused_ops(x)
        if ops is not None:
            out = ops.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        # As Hugging Face does: normalise in float32, scale in the input dtype.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3.1 ("llama3") or linear scaling."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class Rotary(nn.Module):
    """Rotary embedding (Hugging Face's rotate-half convention), cos/sin cached per position."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device, max_position: int) -> None:
        inv_freq = rope_inv_freq(self.args).to(device)
        t = torch.arange(max_position, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D] float32

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        half = self.args.head_dim // 2
        cos_sin = self.cos_sin[positions]
        cos = cos_sin[:, None, :half].repeat(1, 1, 2)
        sin = cos_sin[:, None, half:].repeat(1, 1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.args = args
        self.layer_idx = layer_idx
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        # The form decode steps run these products in, which skinny_gemm.tune times.
        self.qkv_proj.skinny_form = "row_scale"
        self.qkv_proj.skinny_rope = (args.num_heads, args.num_kv_heads, args.head_dim)  # and with the rotary
        self.o_proj.skinny_form = "add_norm"

    def forward(self, x, positions, rotary: Rotary, kv: torch.Tensor, meta, backend: AttentionBackend):
        a = self.args
        k_cache, v_cache = layer_view(kv, self.layer_idx)
        few = _few_rows(x)
        if few is not None and few.ROPE_EPILOGUE and not backend.fuses_rope(meta):  # rotary + KV store in it
            q = few.qkv_rope(self.qkv_proj, x, few.RopeStore(positions, rotary.cos_sin, k_cache, v_cache,
                                                             meta.slot_mapping, a.num_heads, a.num_kv_heads,
                                                             a.head_dim))
            if q is not None:
                return backend.attend(q, k_cache, v_cache, meta).reshape(-1, self.q_size)
        qkv = _linear(self.qkv_proj, x)
        ops = _fused_ops(qkv)
        if ops is not None:
            out = backend.rope_attend(qkv, rotary.cos_sin, k_cache, v_cache, meta)
            if out is None:
                q = ops.rope_store(qkv, positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping,
                                   a.num_heads, a.num_kv_heads, a.head_dim)
                out = backend.attend(q, k_cache, v_cache, meta)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, a.num_heads, a.head_dim)
            k = k.view(-1, a.num_kv_heads, a.head_dim)
            v = v.view(-1, a.num_kv_heads, a.head_dim)
            q, k = rotary(positions, q, k)
            out = backend.forward(q, k, v, k_cache, v_cache, meta)
        return out.reshape(-1, self.q_size)  # the layer applies o_proj (with the add and norm after it)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj.skinny_form = "silu_row_scale"
        self.down_proj.skinny_form = "add_norm"

    def act(self, x) -> torch.Tensor:
        """SiLU(gate) * up: the down projection's input (the layer applies down_proj, with the
        add and norm after it)."""
        few = _few_rows(x)
        if few is not None:  # SiLU * up in the product's kernel
            act = few.silu_linear(self.gate_up_proj, x)
            if act is not None:
                return act
        gate_up = _linear(self.gate_up_proj, x)
        ops = _fused_ops(gate_up)
        if ops is not None:
            return ops.silu_mul(gate_up)
        gate, up = gate_up.split(self.inter, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, positions, rotary, kv, meta, backend, next_layer: DecoderLayer | None = None,
                norm_sums: torch.Tensor | None = None):
        """(layer input, residual stream or None) -> (MLP output, residual stream).

        The residual add of each sub-block happens inside the next RMSNorm, so that on CUDA
        it fuses with it: the stream after this layer is `mlp_out + residual`. In CUDA
        decode steps the add and the norm move into the products around them: the input
        may then be this layer's input norm already (a pending norm, see `_add_norm_fused`),
        and the output `next_layer`'s, with the stream already added. norm_sums: two zeroed
        sums-of-squares vectors for those two norms (skinny_gemm.norm_sums), or None.
        """
        sums = (None, None) if norm_sums is None else norm_sums
        if hasattr(x, "sums"):  # skinny_gemm.NormPending: the previous layer did this norm
            h = x
        elif residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        a = self.self_attn(h, positions, rotary, kv, meta, backend)
        o_proj = self.self_attn.o_proj
        h = _add_norm_fused(o_proj, a, residual, self.post_attention_layernorm, self.mlp.gate_up_proj, True, sums[0])
        if h is None:
            h, residual = self.post_attention_layernorm(_linear(o_proj, a), residual)
        act = self.mlp.act(h)
        if next_layer is not None:
            out = _add_norm_fused(self.mlp.down_proj, act, residual, next_layer.input_layernorm,
                                  next_layer.self_attn.qkv_proj, False, sums[1])
            if out is not None:
                return out, residual
        return _linear(self.mlp.down_proj, act), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False

    def __init__(self, hf_config: dict):
        super().__init__()
        self.args = args = LlamaArgs.from_hf(hf_config, qkv_bias=self.qkv_bias)
        # An explicit (empty) weight skips the random init: under the loader's meta device
        # that init imports torch._dynamo, seconds of every worker's startup.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args)

    def finish_loading(self, device: torch.device, max_position: int) -> None:
        """After weights are in place: tie embeddings, build the rotary table."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary.build(device, max(max_position, 1))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        few = _few_rows(x)
        sums = few.norm_sums(2 * len(self.layers), x.device) if few is not None else None
        residual = None
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            x, residual = layer(x, residual, positions, self.rotary, kv, meta, backend, following,
                                None if sums is None else sums[2 * i : 2 * i + 2])
        if residual is None:  # a model with no layers
            return self.norm(x)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _linear(self.lm_head, hidden)

    # Hugging Face name -> (our parameter name, slice index in the fused tensor or None).
    _FUSED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (already on the target device) into the parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        a = self.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        fused_splits = {"qkv_proj": [0, q, q + kv, q + 2 * kv], "gate_up_proj": [0, a.intermediate_size, 2 * a.intermediate_size]}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and a.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, shard = name, None
            for i, part in enumerate(parts):
                if part in self._FUSED:
                    fused, shard = self._FUSED[part]
                    target = ".".join(parts[:i] + [fused] + parts[i + 1 :])
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                dest = param.data
            else:
                splits = fused_splits[target.split(".")[-2]]
                dest = param.data[splits[shard] : splits[shard + 1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            if pname == "lm_head.weight" and a.tie_word_embeddings:
                continue
            module = pname.split(".")[-2]
            if module in fused_splits:
                n = len(fused_splits[module]) - 1
                if pname.endswith("bias"):
                    n = 3
                expected.update(f"{pname}#{i}" for i in range(n))
            else:
                expected.add(f"{pname}#None")
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
