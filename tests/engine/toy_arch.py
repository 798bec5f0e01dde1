"""A custom architecture registered from user code, as a user would write one.

`ToyGPTForCausalLM` is not a Llama: learned absolute positions, LayerNorm with bias, GELU
MLP, separate q/k/v/o projections, no rotary. It registers itself at import (the decorator
form), so a worker serves it with `--model-module tests/engine/toy_arch.py`.
`write_toy_model` saves a random one in Hugging Face format; `reference_greedy` is the same
model in plain torch (full causal attention recomputed over the whole sequence every step,
no KV cache), which the engine's paged output must equal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from baton.engine import ModelRegistry
from baton.engine.kv_cache import layer_view

ARCH = "ToyGPTForCausalLM"
CONFIG = dict(architectures=[ARCH], vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=[1, 3])


class ToyLayer(nn.Module):
    def __init__(self, cfg: dict, idx: int):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.idx, self.heads = idx, cfg["num_attention_heads"]
        self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h) for _ in range(4))
        self.fc_in = nn.Linear(h, cfg["intermediate_size"])
        self.fc_out = nn.Linear(cfg["intermediate_size"], h)

    def forward(self, x, kv, meta, backend):
        k_cache, v_cache = layer_view(kv, self.idx)
        h = self.ln_1(x)
        q, k, v = (p(h).view(len(x), self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.o_proj(backend.forward(q, k, v, k_cache, v_cache, meta).reshape(len(x), -1))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


@ModelRegistry.register_model(ARCH)
class ToyGPTForCausalLM(nn.Module):
    def __init__(self, hf_config: dict):
        super().__init__()
        h = hf_config["hidden_size"]
        self.embed_tokens = nn.Embedding(hf_config["vocab_size"], h)
        self.embed_positions = nn.Embedding(hf_config["max_position_embeddings"], h)
        self.layers = nn.ModuleList(ToyLayer(hf_config, i) for i in range(hf_config["num_hidden_layers"]))
        self.ln_f = nn.LayerNorm(h, eps=hf_config["layer_norm_eps"])
        self.lm_head = nn.Linear(h, hf_config["vocab_size"], bias=False)

    def forward(self, input_ids, positions, kv, meta, backend):
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, kv, meta, backend)
        return self.ln_f(x)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        seen = set()
        for name, tensor in weights:
            target = name.removeprefix("model.")
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {ARCH}")
            params[target].data.copy_(tensor)
            seen.add(target)
        if seen != set(params):
            raise ValueError(f"checkpoint is missing {sorted(set(params) - seen)}")

    def finish_loading(self, device, max_position: int) -> None:
        pass


def write_toy_model(out: Path, tokenizer_dir: Path, seed: int = 7) -> Path:
    """A random ToyGPT (large weights: peaked logits) and `tokenizer_dir`'s tokenizer, in HF format."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, p in ToyGPTForCausalLM(CONFIG).named_parameters():
        key = name if name == "lm_head.weight" else "model." + name
        if name.endswith("bias") or "ln" in name:  # LayerNorm weights near 1, biases near 0
            base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
            weights[key] = base + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            weights[key] = torch.randn(p.shape, generator=gen) * (1.5 / p.shape[-1] ** 0.5)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def reference_greedy(model_dir: Path, prompt: list[int], max_new: int) -> list[int]:
    """Greedy tokens of the checkpoint in `model_dir`, computed without Baton."""
    w = load_file(str(model_dir / "model.safetensors"))
    cfg = json.loads((model_dir / "config.json").read_text())
    heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, w[p + ".weight"], w.get(p + ".bias"))

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            t = torch.tensor(ids)
            x = w["model.embed_tokens.weight"][t] + w["model.embed_positions.weight"][torch.arange(len(ids))]
            for i in range(cfg["num_hidden_layers"]):
                p = f"model.layers.{i}."
                h = ln(x, p + "ln_1")
                q, k, v = (lin(h, p + n).view(len(ids), heads, -1).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(len(ids), -1)
                x = x + lin(a, p + "o_proj")
                x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "fc_in")), p + "fc_out")
            logits = F.linear(ln(x[-1], "model.ln_f"), w["lm_head.weight"])
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]
