"""Pieces of the H100 engine benchmark (`bench/engine.py`): the model, the workload, the floors.

The model is Llama-3.1-8B's Hugging Face config with random bf16 weights drawn on the GPU
and written as a sharded safetensors checkpoint on local disk (no hub), so the engine loads
it through its ordinary loader and `transformers` loads the same files for the baseline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16 (datasheet)
PEAK_HBM_BYTES_S = 3.35e12  # H100 SXM HBM3 (datasheet)

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

# The dimensions `--small` puts over LLAMA31_8B's: a model the CPU runs in milliseconds a step.
SMALL_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


def hf_weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def write_random_checkpoint(out: Path, cfg: dict, tokenizer_dir: Path, device: str = "cuda", seed: int = 0) -> Path:
    """Random bf16 weights drawn on `device`, one safetensors shard per 4 layers, + index.

    A directory this function completed before with the same config, device and seed is
    kept as it is (`random_checkpoint.json`, written last, records them): several
    benchmarks of one run share one checkpoint, written once."""
    from safetensors.torch import save_file

    marker = out / "random_checkpoint.json"
    recipe = {"config": cfg, "device": torch.device(device).type, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    marker.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = hf_weight_shapes(cfg)
    weight_map: dict[str, str] = {}
    for name in shapes:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        weight_map[name] = f"model-{(layer // 4) + 1 if layer >= 0 else 0:03d}.safetensors"
    for shard in sorted(set(weight_map.values())):  # one shard in host memory at a time
        tensors = {}
        for name in (n for n, s in weight_map.items() if s == shard):
            shape = shapes[name]
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
            else:
                t = torch.randn(shape, generator=gen, device=device) * (shape[1] ** -0.5)
            tensors[name] = t.to(torch.bfloat16).cpu()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    marker.write_text(json.dumps(recipe))
    return out


def weight_bytes(cfg: dict) -> int:
    """Bytes a decode step reads: every weight except the embedding table (only B rows)."""
    return sum(
        int(np.prod(s)) * 2 for n, s in hf_weight_shapes(cfg).items() if n != "model.embed_tokens.weight"
    )


def kv_bytes_per_token(cfg: dict) -> int:
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2


def decode_floor_s(cfg: dict, batch: int, context: int) -> float:
    """Bandwidth floor of one decode step: weights + every sequence's KV, read once."""
    return (weight_bytes(cfg) + batch * context * kv_bytes_per_token(cfg)) / PEAK_HBM_BYTES_S


def prefill_flops(cfg: dict, num_tokens: int) -> float:
    """Model FLOPs of one fresh prompt: the matrix products of every token, causal attention
    (each query against its own prefix only, no masked work counted), the LM head of the
    last token."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_token = h * (q + 2 * kv) + q * h + 3 * h * inter
    linear = 2 * num_tokens * per_token * cfg["num_hidden_layers"]
    pairs = num_tokens * (num_tokens + 1) / 2
    attention = 4 * pairs * q * cfg["num_hidden_layers"]
    return linear + attention + 2 * h * cfg["vocab_size"]


def offline_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """n seeded (prompt ids, output length): prompts 128..1024 tokens, outputs 128..512."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(128, 1025, n)
    outs = rng.integers(128, 513, n)
    return [(rng.integers(0, vocab, int(p)).tolist(), int(o)) for p, o in zip(lens, outs)]


def write_awq_checkpoint(src: Path, out: Path, group_size: int = 128, device: str = "cuda") -> Path:
    """`src`'s decoder projections as an AWQ ("gemm", min-max, zero points) int4 checkpoint of
    `group_size`, everything else copied (the LM head and embeddings stay bf16, as in AWQ)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from baton.engine.quantization.int4 import AWQ_ORDER, pack_cols

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(src / shard), "pt", device=device) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
                    tensors[name] = t
                    continue
                n, k = t.shape
                g = t.float().t().reshape(k // group_size, group_size, n)  # [G, g, N]
                lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
                scales = ((hi - lo) / 15).clamp(min=1e-8)
                zeros = torch.round(-lo / scales).clamp(0, 15)
                codes = torch.clamp(torch.round(g / scales[:, None]) + zeros[:, None], 0, 15).reshape(k, n)
                prefix = name.removesuffix(".weight")
                tensors[prefix + ".qweight"] = pack_cols(codes.to(torch.int32), AWQ_ORDER)
                tensors[prefix + ".qzeros"] = pack_cols(zeros.to(torch.int32), AWQ_ORDER)
                tensors[prefix + ".scales"] = scales.half()
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python bench/engine_workload.py DIR`: write the Llama-3.1-8B-shaped random checkpoint
    into DIR once (the multi-GPU runbook's first step; later benchmarks reuse it)."""
    import argparse
    import time

    from baton.engine.tiny_model import ensure_tiny_model

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--device", default="cuda", help="where the weights are drawn")
    parser.add_argument("--small", action="store_true",
                        help="tiny dimensions, the 8B's vocabulary, rope and token ids kept (CPU checks of the scripts)")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    cfg = {**LLAMA31_8B, **SMALL_DIMS} if args.small else LLAMA31_8B
    write_random_checkpoint(args.dir, cfg, ensure_tiny_model(), device=args.device)
    shape = "small Llama-3.1-8B-vocabulary" if args.small else "Llama-3.1-8B-shaped"
    print(f"{args.dir}: {shape} random checkpoint ready ({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
