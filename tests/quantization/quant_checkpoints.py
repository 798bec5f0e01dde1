"""Tiny Llama checkpoints in every quantized layout, written as the producers write them.

compressed-tensors checkpoints are packed by the `compressed-tensors` package itself (its
`compress`), from scales computed the way llm-compressor's min-max observers compute them.
AWQ and GPTQ have no installable producer here, so their packing is written out below
following AutoAWQ's `WQLinear_GEMM.from_linear` and AutoGPTQ's `QuantLinear.pack` (v1
format: zero points stored minus one), independently of Baton's unpacking code.

Each writer returns the checkpoint directory and the dense weights it represents (each
layer's dequantized weight), which `write_dense` saves as the "dequantized model".
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from baton.engine.tiny_model import random_llama_weights, write_tiny_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,  # q: 256 rows, k and v: 128 rows each (whole 128x128 scale blocks)
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8_MAX = 448.0


_TINY: list[Path] = []  # the embedded tiny model's files, written once per process


def base_model(out: Path, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Tokenizer files in `out`, and (config, dense float32 weights) of the tiny model."""
    if not _TINY:
        tiny = Path(tempfile.mkdtemp(prefix="baton-quant-tiny-"))
        atexit.register(shutil.rmtree, tiny, True)
        _TINY.append(write_tiny_model(tiny))
    out.mkdir(parents=True, exist_ok=True)
    for f in _TINY[0].iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    config = dict(json.loads((out / "config.json").read_text()), **CONFIG, vocab_size=vocab)
    return config, random_llama_weights(config, seed)


def linear_names(config: dict) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(config["num_hidden_layers"]) for p in PROJ]


def order_key(name: str, shared: bool = True) -> str:
    """Layers reading the same input (q/k/v, gate/up) get one activation order, as GPTQ gives
    them (the order comes from that input's statistics); `shared=False` breaks that."""
    if not shared:
        return name
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for part in group:
            if name.endswith(part):
                return name.removesuffix(part) + group[0]
    return name


def save(out: Path, config: dict, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    cfg = dict(config)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def _rest(weights: dict, tensors: dict, dense: dict, dtype: torch.dtype) -> None:
    """Embeddings, norms, LM head: stored in the checkpoint dtype, and the dense copy rounded alike."""
    for k, v in weights.items():
        tensors[k] = v.to(dtype)
        dense[k] = tensors[k].float()


def write_dense(out: Path, src: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    """The dequantized model: same tokenizer, float32 weights, no quantization_config."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return save(out, dict(config, torch_dtype="float32"), weights, None)


# -- compressed-tensors -----------------------------------------------------------------


def ct_scheme(group: dict):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme.model_validate(group)


def ct_group_fp8(weights: str, acts: str | None) -> dict:
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": weights, "dynamic": False}
    if weights == "block":
        w["block_structure"] = [128, 128]
    group = {"targets": ["Linear"], "weights": w, "input_activations": None, "output_activations": None}
    if acts == "static":
        group["input_activations"] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                      "dynamic": False}
    elif acts is not None:
        group["input_activations"] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": acts,
                                      "dynamic": True, **({"group_size": 128} if acts == "group" else {})}
    return group


def ct_group_int4(group_size: int | None, symmetric: bool, actorder: bool = False) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False,
         "strategy": "group" if group_size else "channel", "group_size": group_size}
    if actorder:
        w["actorder"] = "group"
    return {"targets": ["Linear"], "weights": w, "input_activations": None, "output_activations": None}


def _fp8_weight_scale(w: torch.Tensor, strategy: str) -> torch.Tensor:
    if strategy == "tensor":
        return (w.abs().amax() / FP8_MAX).reshape(1)
    if strategy == "channel":
        return w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    out, k = w.shape
    return w.reshape(out // 128, 128, k // 128, 128).abs().amax(dim=(1, 3)) / FP8_MAX


def write_ct(out: Path, group: dict, fmt: str, kv: str | None = None, seed: int = 0,
             ignore: tuple[str, ...] = ("lm_head",)):
    """A compressed-tensors checkpoint (`format` "float-quantized" or "pack-quantized"),
    packed by compressed-tensors; returns (dir, dense weights it represents, per-layer
    compressed tensors)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    config, weights = base_model(out, seed)
    # Checkpoints written before compressed-tensors 0.11 say actorder "group" and store
    # weight_g_idx; the package now refuses that value, so it validates the rest.
    scheme = ct_scheme({**group, "weights": {k: v for k, v in group["weights"].items() if k != "actorder"}})
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors, dense, per_layer, orders = {}, dict(weights), {}, {}
    gen = torch.Generator().manual_seed(seed + 1)
    for name in linear_names(config):
        w = weights.pop(name + ".weight")
        if any(name.endswith(i) for i in ignore):
            tensors[name + ".weight"] = w.to(torch.bfloat16)
            dense[name + ".weight"] = tensors[name + ".weight"].float()
            continue
        state = {"weight": w}
        if fmt == "float-quantized":
            state["weight_scale"] = _fp8_weight_scale(w, scheme.weights.strategy).to(torch.bfloat16)
            state["weight"] = w
            if scheme.input_activations is not None and not scheme.input_activations.dynamic:
                state["input_scale"] = (torch.rand(1, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
        else:
            gs = scheme.weights.group_size or w.shape[1]
            g = w.reshape(w.shape[0], -1, gs)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
            state["weight_scale"] = scale.to(torch.bfloat16)
            if not scheme.weights.symmetric:
                state["weight_zero_point"] = zp
            if group["weights"].get("actorder"):
                # Activation order: input row i belongs to group g_idx[i] (a random
                # permutation of the usual i // group_size, as GPTQ's act order gives).
                perm = orders.setdefault(order_key(name), torch.randperm(w.shape[1], generator=gen))
                state["weight_g_idx"] = (torch.argsort(perm) // gs).to(torch.int32)
        packed = compressor.compress(state, scheme)
        if "weight_g_idx" in state:
            packed = _ct_actorder(state, scheme, packed)
        # Decompressed with float32 scales: exact (the stored bfloat16 scales widen
        # losslessly), where decompressing in bfloat16 would round the product.
        decompressed = compressor.decompress(dict(packed, weight_scale=packed["weight_scale"].float()),
                                             scheme)["weight"]
        dense[name + ".weight"] = decompressed.float()
        per_layer[name] = packed
        for leaf, t in packed.items():
            tensors[f"{name}.{leaf}"] = t
    _rest(weights, tensors, dense, torch.bfloat16)
    if kv is not None:
        for i in range(config["num_hidden_layers"]):
            shape = (1,) if kv == "tensor" else (config["num_key_value_heads"], 1, 1)
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.rand(shape, generator=gen) * 0.02 + 0.005
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.rand(shape, generator=gen) * 0.02 + 0.005
    qc = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "kv_cache_scheme": None if kv is None else {
            "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": "tensor" if kv == "tensor" else "attn_head"},
    }
    return save(out, config, tensors, qc), config, dense, per_layer


def _ct_actorder(state, scheme, packed):
    """compressed-tensors' compress quantizes groups of consecutive columns; with activation
    order the group of column i is g_idx[i]. Quantize that way and pack with its packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    w, s, g_idx = state["weight"], state["weight_scale"].float(), state["weight_g_idx"].long()
    zp = state.get("weight_zero_point")
    zcol = 0 if zp is None else zp[:, g_idx].float()
    q = torch.clamp(torch.round(w / s[:, g_idx]) + zcol, -8, 7).to(torch.int8)
    out = dict(packed, weight_packed=pack_to_int32(q, 4), weight_g_idx=state["weight_g_idx"])
    return out


# -- plain fp8 ------------------------------------------------------------------------------


def write_fp8(out: Path, static: bool = False, block: bool = False, seed: int = 0):
    """An `fp8` checkpoint: AutoFP8's layout (per-tensor float32 scales) or, with `block`,
    the DeepSeek/Qwen3 layout (128x128 `weight_scale_inv`, dynamic activations)."""
    config, weights = base_model(out, seed)
    tensors, dense = {}, dict(weights)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in linear_names(config):
        w = weights.pop(name + ".weight")
        if block:
            s = _fp8_weight_scale(w, "block")
            q = (w.reshape(w.shape[0] // 128, 128, -1, 128) / s[:, None, :, None]).reshape(w.shape)
            q = q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[name + ".weight_scale_inv"] = s
            deq = (q.float().reshape(w.shape[0] // 128, 128, -1, 128) * s[:, None, :, None]).reshape(w.shape)
        else:
            s = w.abs().amax() / FP8_MAX
            q = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[name + ".weight_scale"] = s.reshape(())
            deq = q.float() * s
            if static:
                tensors[name + ".input_scale"] = (torch.rand((), generator=gen) * 0.02 + 0.01)
        tensors[name + ".weight"] = q
        dense[name + ".weight"] = deq
    _rest(weights, tensors, dense, torch.bfloat16)
    qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if block:
        qc["weight_block_size"] = [128, 128]
    return save(out, config, tensors, qc), config, dense


# -- AWQ and GPTQ -------------------------------------------------------------------------


def _asym_int4(w: torch.Tensor, group_of_col: torch.Tensor, groups: int):
    """Min-max asymmetric int4 per (output row, group): (codes [out, in], scales [G, out], zeros [G, out])."""
    out = w.shape[0]
    mins = torch.zeros(out, groups)
    maxs = torch.zeros(out, groups)
    for g in range(groups):
        cols = w[:, group_of_col == g]
        mins[:, g] = cols.amin(1).clamp(max=0)
        maxs[:, g] = cols.amax(1).clamp(min=0)
    scales = (maxs - mins) / 15
    zeros = torch.round(-mins / scales).clamp(0, 15)
    codes = torch.clamp(torch.round(w / scales[:, group_of_col]) + zeros[:, group_of_col], 0, 15).to(torch.int64)
    return codes, scales.t().contiguous().half(), zeros.t().contiguous().to(torch.int64)


def _sym_int4(w, group_of_col, groups):
    out = w.shape[0]
    absmax = torch.zeros(out, groups)
    for g in range(groups):
        absmax[:, g] = w[:, group_of_col == g].abs().amax(1)
    scales = 2 * absmax / 15
    codes = torch.clamp(torch.round(w / scales[:, group_of_col]) + 8, 0, 15).to(torch.int64)
    return codes, scales.t().contiguous().half(), torch.full((groups, out), 8, dtype=torch.int64)


def _or_pack(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[R, 8C] -> [R, C] int32: word c |= values[:, 8c + order[i]] << 4i (the producers' loops)."""
    r, c8 = values.shape
    packed = torch.zeros(r, c8 // 8, dtype=torch.int64)
    for col in range(c8 // 8):
        for i, j in enumerate(order):
            packed[:, col] |= (values[:, col * 8 + j] & 0xF) << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def write_awq(out: Path, group_size: int = 128, seed: int = 0):
    config, weights = base_model(out, seed)
    tensors, dense = {}, dict(weights)
    for name in linear_names(config):
        w = weights.pop(name + ".weight")
        k = w.shape[1]
        cols = torch.arange(k) // group_size
        codes, scales, zeros = _asym_int4(w, cols, k // group_size)
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        tensors[name + ".qweight"] = _or_pack(codes.t().contiguous(), order)  # [K, N/8]
        tensors[name + ".qzeros"] = _or_pack(zeros, order)  # [G, N/8]
        tensors[name + ".scales"] = scales  # [G, N] fp16
        dense[name + ".weight"] = ((codes - zeros.t()[:, cols]) * scales.float().t()[:, cols]).float()
    _rest(weights, tensors, dense, torch.float16)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    return save(out, dict(config, torch_dtype="float16"), tensors, qc), config, dense


def write_gptq(out: Path, group_size: int = 128, desc_act: bool = False, sym: bool = True, seed: int = 0,
               shared_order: bool = True):
    config, weights = base_model(out, seed)
    tensors, dense, orders = {}, dict(weights), {}
    gen = torch.Generator().manual_seed(seed + 2)
    for name in linear_names(config):
        w = weights.pop(name + ".weight")
        k = w.shape[1]
        if desc_act:  # GPTQ's act order: g_idx[perm[i]] = i // group_size
            perm = orders.setdefault(order_key(name, shared_order), torch.randperm(k, generator=gen))
            g_idx = torch.argsort(perm) // group_size
        else:
            g_idx = torch.arange(k) // group_size
        codes, scales, zeros = (_sym_int4 if sym else _asym_int4)(w, g_idx, k // group_size)
        tensors[name + ".qweight"] = _or_pack(codes.contiguous()).t().contiguous()  # [K/8, N] along K
        tensors[name + ".qzeros"] = _or_pack(zeros - 1)  # v1: stored minus one; [G, N/8]
        tensors[name + ".scales"] = scales
        tensors[name + ".g_idx"] = g_idx.to(torch.int32)
        dense[name + ".weight"] = ((codes - zeros.t()[:, g_idx]) * scales.float().t()[:, g_idx]).float()
    _rest(weights, tensors, dense, torch.float16)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": "gptq"}
    return save(out, dict(config, torch_dtype="float16"), tensors, qc), config, dense
