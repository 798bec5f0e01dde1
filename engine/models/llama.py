"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) over a paged KV cache, in plain torch.

The forward pass works on a flat batch: `input_ids` and `positions` are `[T]` for all the
step's tokens of all sequences; attention finds each sequence's rows through
`AttentionMetadata`. Q/K/V and gate/up projections are fused at load time (one matmul
each); Hugging Face checkpoint names are mapped onto the fused weights in `load_weights`.

This is the reference: the CPU runs it as written. On CUDA the engine runs it through the
fast path (`engine/fastpath`, applied to the built model by `apply_fast_path`), whose
kernels compute what this code computes.
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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before the rotary

    @classmethod
    def from_hf(cls, cfg: dict, qkv_bias: bool = False, qk_norm: bool = False) -> LlamaArgs:
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
            qk_norm=qk_norm,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with a residual: (RMSNorm(x + residual), x + residual). x, residual [T, dim]."""
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
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        # With an FP8 KV cache: this layer's `KVCacheScales` (engine/quantization/kv_scales.py).
        self.kv_scales = None

    def forward(self, x, positions, rotary: Rotary, kv: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]. The step's keys and values go into this layer's cache."""
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        return self.o_proj(self.attend(qkv, positions, rotary, kv, meta, backend))

    def attend(self, qkv: torch.Tensor, positions, rotary: Rotary, kv: torch.Tensor, meta: AttentionMetadata,
               backend: AttentionBackend) -> torch.Tensor:
        """The fused Q/K/V projection [T, (H + 2 Hkv) D] -> attention output [T, H D] (before o_proj)."""
        a = self.args
        k_cache, v_cache = layer_view(kv, self.layer_idx)  # [num_blocks, block_size, Hkv, D] each
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)  # [T, H, D]
        k = k.view(-1, a.num_kv_heads, a.head_dim)  # [T, Hkv, D]
        v = v.view(-1, a.num_kv_heads, a.head_dim)  # [T, Hkv, D]
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        scales = self.kv_scales
        if scales is not None:  # the cache holds k / k_scale and v / v_scale in e4m3
            q, k, v = scales.scale_inputs(q, k, v)
        out = backend.forward(q, k, v, k_cache, v_cache, meta)  # [T, H, D]
        if scales is not None:
            out = scales.scale_output(out)
        return out.reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> down(SiLU(gate) * up) [T, hidden]."""
        gate_up = self.gate_up_proj(x)  # [T, 2 I]
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, positions, rotary, kv, meta, backend):
        """(layer input, residual stream or None) -> (MLP output, residual stream), [T, hidden] each.

        The residual add of each sub-block happens inside the next RMSNorm (the stream after
        this layer is `mlp_out + residual`), so a fused kernel can do both.
        """
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, kv, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False

    def __init__(self, hf_config: dict):
        super().__init__()
        self.args = args = LlamaArgs.from_hf(hf_config, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)
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
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, kv, meta, backend)
        if residual is None:  # a model with no layers
            return self.norm(x)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""
        return self.lm_head(hidden)

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


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense: Llama with q/k RMSNorm per head (and `attention_bias` from the config).
    The fast path has no form of it (its Q/K/V epilogues do not apply the norms), so CUDA
    runs this forward as written."""

    qk_norm = True
