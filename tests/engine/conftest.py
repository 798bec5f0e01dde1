"""Tiny random models of every supported architecture, saved in Hugging Face format.

This folder is put on `sys.path` for the shared `lora_helpers` (the project imports test
modules with `--import-mode=importlib`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from baton.engine.tiny_model import write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Large init: peaked logits, so float rounding between implementations cannot flip argmax.
    initializer_range=0.3,
    bos_token_id=0,
    eos_token_id=[1, 3],
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama31": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    # Llama 3.2 (1B/3B): tied embeddings and llama3 rope scaling with factor 32.
    "llama32": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    # Qwen3 dense: q/k RMSNorm per head; head_dim 32 while hidden / heads is 16 (as Qwen3's
    # 128 against 1024 / 16), tied as the small Qwen3 models are.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
}


def make_hf_model(out: Path, arch: str) -> Path:
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**BASE, **extra)
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)(config).eval()
    if arch == "qwen2":  # make the QKV biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "qwen3":  # q/k norm weights away from 1, so a skipped norm changes the output
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.normal_(1.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Baton's embedded tiny model (written by our own writer, no transformers)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    models = {}
    for arch in ARCHS:
        out = make_hf_model(tmp_path_factory.mktemp(arch), arch)
        for name in TOKENIZER_FILES:
            if not (out / name).exists() or name != "generation_config.json":
                shutil.copy(tiny_dir / name, out / name)
        models[arch] = out
    return models


class HFReference:
    """Reference outputs from transformers (models loaded once per session)."""

    def __init__(self):
        self._models: dict[Path, object] = {}

    def model(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        if model_dir not in self._models:
            self._models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return self._models[model_dir]

    def greedy(self, model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy generate, no EOS stopping."""
        ids = torch.tensor([prompt_ids])
        out = self.model(model_dir).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
        return out[0, len(prompt_ids) :].tolist()

    def logits(self, model_dir: Path, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(model_dir)(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="session")
def hf() -> HFReference:
    return HFReference()
