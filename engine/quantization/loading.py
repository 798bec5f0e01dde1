"""Putting a quantized checkpoint into a model built from plain `nn.Linear` layers.

The model is built as usual (on the meta device); `replace_linears` swaps each quantized
`nn.Linear` for an `Fp8Linear` or `Int4Linear` of the same sizes; `CheckpointReader` takes
the quantized layers' tensors (and the KV-cache scales) out of the checkpoint stream, hands
every other tensor (embeddings, norms, biases, unquantized layers) on to the model's own
`load_weights`, and at the end converts each layer's tensors to the canonical form and fuses
the shards the model fuses (q/k/v, gate/up). `quantize_at_load` turns an unquantized
checkpoint's linear weights into FP8 ones as they stream in (`quantization="fp8"`), so the
rest reads them as it reads an FP8 checkpoint (and a tensor-parallel rank cuts them as it
cuts one: its row-parallel shards keep the whole rows' scales).

The model tells which checkpoint modules it fuses through its `_FUSED` table (Hugging Face
module name -> (fused module name, shard index)); the LM head and embeddings stay in the
model dtype in every format.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from baton.engine.quantization import fp8, int4
from baton.engine.quantization.linear import Fp8Linear, Int4Linear, QuantLinear
from baton.engine.quantization.schemes import QuantConfig, QuantizationConfigError, WeightScheme

# Checkpoint tensors that belong to a quantized layer (besides `weight`, which FP8 formats use).
_LAYER_LEAVES = {
    "weight", "weight_scale", "weight_scale_inv", "input_scale", "qweight", "qzeros", "scales", "g_idx",
    "weight_packed", "weight_shape", "weight_zero_point", "weight_g_idx",
}
# KV-cache scales, by the names checkpoints use: self_attn.{k,v}_scale (compressed-tensors,
# ModelOpt, AutoFP8), self_attn.{k,v}_proj.output_scale (older llm-compressor), self_attn.kv_scale.
_KV_SCALE_NAMES = {
    "self_attn.k_scale": "k", "self_attn.v_scale": "v",
    "self_attn.k_proj.output_scale": "k", "self_attn.v_proj.output_scale": "v",
    "self_attn.kv_scale": "kv",
}
# Checkpoint tensors no format needs at inference (calibration leftovers).
_SKIPPED_LEAVES = {"output_scale", "weight_zero_point_scale", "input_zero_point"}
# An unquantized model: the reader only takes the KV-cache scales out of the stream.
_NO_LAYERS = QuantConfig("none", WeightScheme("none", "none", "none"))


def _shards(model: nn.Module) -> dict[str, list[str]]:
    """Fused module name -> its checkpoint modules in shard order ({"qkv_proj": [q, k, v]})."""
    table: dict[str, list[str]] = defaultdict(list)
    for hf, (fused, _shard) in sorted(getattr(model, "_FUSED", {}).items(), key=lambda kv: kv[1]):
        table[fused].append(hf)
    return dict(table)


def checkpoint_names(module_name: str, shards: dict[str, list[str]]) -> list[str]:
    """A model module's Hugging Face module names ("layers.0.mlp.gate_up_proj" ->
    ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])."""
    head, _, leaf = module_name.rpartition(".")
    prefix = "model." + (head + "." if head else "")
    if module_name == "lm_head":
        return ["lm_head"]
    return [prefix + part for part in shards.get(leaf, [leaf])]


def _is_head(module_name: str) -> bool:
    return module_name == "lm_head"


def replace_linears(model: nn.Module, config: QuantConfig) -> list[str]:
    """Swap the model's quantized `nn.Linear` layers for quantized ones (still empty); returns
    their names. Call on the meta-device model, before `to_empty` and loading."""
    shards = _shards(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _is_head(name):
            continue
        hf = checkpoint_names(name, shards)
        ignored = [config.is_ignored(h) for h in hf]
        if any(ignored) and not all(ignored):
            raise QuantizationConfigError(
                f"{name}: the checkpoint quantizes some of {hf} and not others; Baton fuses them into one layer"
            )
        if all(ignored):
            continue
        has_bias = module.bias is not None
        with torch.device("meta"):
            if config.weights.kind == "fp8":
                new = Fp8Linear(module.in_features, module.out_features, has_bias, config.activations,
                                config.weights.block)
            else:
                new = Int4Linear(module.in_features, module.out_features, has_bias, config.weights.group_size)
        if has_bias:
            new.bias = nn.Parameter(torch.empty_like(module.bias), requires_grad=False)
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced


class CheckpointReader:
    """Reads one quantized checkpoint into a model prepared by `replace_linears`.

    `filter(weights)` yields the tensors the model's `load_weights` takes and keeps the rest;
    `finish(model)` then fills every quantized layer (raising if one is incomplete) and
    returns the KV-cache scales found: {layer index: {"k": tensor, "v": tensor}}.
    """

    def __init__(self, model: nn.Module, config: QuantConfig):
        self.config = config
        self.shards = _shards(model)
        self.quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
        self._where = {}  # checkpoint module name -> (model module name, shard index)
        for name in self.quantized:
            for i, hf in enumerate(checkpoint_names(name, self.shards)):
                self._where[hf] = (name, i)
        self._tensors: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
        self.kv_scales: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            if module in self._where and leaf in _LAYER_LEAVES:
                target, shard = self._where[module]
                self._tensors[target][shard][leaf] = tensor
                continue
            if module in self._where and leaf == "bias" and self.quantized[self._where[module][0]].bias is None:
                # AutoGPTQ saves a bias for every layer, zeros where the model has none.
                if tensor.any():
                    raise ValueError(f"checkpoint tensor {name!r} is a nonzero bias for a layer without one")
                continue
            kv = self._kv_scale(name)
            if kv is not None:
                layer, which = kv
                for part in ("k", "v") if which == "kv" else (which,):
                    self.kv_scales[layer][part] = tensor.float().reshape(-1)
                continue
            if leaf in _SKIPPED_LEAVES:
                continue
            if leaf in _LAYER_LEAVES - {"weight"}:
                raise ValueError(f"checkpoint tensor {name!r} is quantization data for a layer this model "
                                 f"keeps unquantized ({self.config.method}); is the checkpoint's ignore list complete?")
            yield name, tensor

    @staticmethod
    def _kv_scale(name: str) -> tuple[int, str] | None:
        parts = name.removeprefix("model.").split(".")
        if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit():
            return None
        which = _KV_SCALE_NAMES.get(".".join(parts[2:]))
        return None if which is None else (int(parts[1]), which)

    def finish(self) -> dict[int, dict[str, torch.Tensor]]:
        w = self.config.weights
        for name, module in self.quantized.items():
            hf = checkpoint_names(name, self.shards)
            got = self._tensors.pop(name, {})
            missing = [hf[i] for i in range(len(hf)) if i not in got]
            if missing:
                raise ValueError(f"checkpoint is missing quantized weights of {missing[:4]}")
            parts = []
            for i, hf_name in enumerate(hf):
                t = got[i]
                try:
                    parts.append(self._convert(t, hf_name))
                except KeyError as e:
                    raise ValueError(f"{hf_name}: the {w.packing} layout needs {hf_name}.{e.args[0]}, "
                                     f"which the checkpoint lacks") from None
            module.set_weights((fp8.fuse if w.kind == "fp8" else int4.fuse)(parts, name))
        return dict(self.kv_scales)

    def _convert(self, t: dict[str, torch.Tensor], name: str):
        w = self.config.weights
        if w.kind == "fp8":
            static = self.config.activations is not None and self.config.activations.strategy == "static"
            return fp8.from_checkpoint(t, w.block, static, name)
        if w.packing == "awq":
            return int4.from_awq(t, w.group_size, name)
        if w.packing == "gptq":
            return int4.from_gptq(t, w.group_size, w.zero_offset, name)
        return int4.from_compressed_tensors(t, w.group_size, w.symmetric, name)


def quantize_at_load(model: nn.Module, config: QuantConfig | None,
                     weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """With `quantization="fp8"` on an unquantized checkpoint (`packing` "online"): the
    stream with each weight of a layer `prepare_model` made FP8 (all linear layers but the
    LM head) replaced by its e4m3 weight and per-row `weight_scale`; else the stream as it is."""
    if config is None or config.weights.packing != "online":
        yield from weights
        return
    shards = _shards(model)
    quantized = {hf for name, m in model.named_modules() if isinstance(m, QuantLinear)
                 for hf in checkpoint_names(name, shards)}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in quantized:
            w = fp8.quantize_weight_per_channel(tensor)
            yield name, w.weight
            yield module + ".weight_scale", w.weight_scale
        else:
            yield name, tensor


def prepare_model(model: nn.Module, config: QuantConfig | None) -> None:
    """Before `to_empty`: swap in the quantized layers the checkpoint (or `quantize_at_load`) fills."""
    if config is not None:
        replace_linears(model, config)


def load_weights(model: nn.Module, config: QuantConfig | None,
                 weights: Iterable[tuple[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Load a checkpoint into a model prepared by `prepare_model` (through the model's own
    `load_weights` for every unquantized tensor); returns the KV-cache scales it holds."""
    reader = CheckpointReader(model, config or _NO_LAYERS)
    model.load_weights(reader.filter(weights))
    return reader.finish()
