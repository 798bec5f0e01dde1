"""Reading a PEFT LoRA adapter directory into host memory, checked against the model.

A PEFT adapter is `adapter_config.json` (rank `r`, `lora_alpha`, `target_modules`, ...) and
`adapter_model.safetensors` with, per adapted linear layer, `...layers.{i}.{self_attn|mlp}.
{q,k,v,o,gate,up,down}_proj.lora_A.weight` [r, in] and `lora_B.weight` [out, r]; the layer
computes `W x + (alpha / r) * B A x` (`alpha / sqrt(r)` with `use_rslora`). The engine fuses
q/k/v and gate/up into one product each (engine/models/llama.py), so an adapter's modules
land as slices of those fused projections (`LoRALayout`). The scaling is folded into B
at load time.

Everything that cannot be applied as written is refused with a `LoRAError` naming it
(DoRA, trained biases, `modules_to_save`, embedding or lm_head adapters, ranks above
`max_lora_rank`, shapes that do not match the base model).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.engine.errors import InvalidRequestError
from baton.engine.lora.request import LoRARequest

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoRAError(InvalidRequestError):
    """An adapter that cannot be loaded or applied (the request that named it is refused)."""


@dataclass(frozen=True)
class ProjectionLayout:
    """One (fused) projection of a decoder layer as adapters see it: `slices` are the PEFT
    modules it computes, in order, with their output widths."""

    name: str  # the model's attribute ("qkv_proj")
    in_features: int
    slices: tuple[tuple[str, int], ...]  # (PEFT module name, out features)

    @property
    def out_features(self) -> int:
        return sum(width for _, width in self.slices)

    def offsets(self) -> list[int]:
        """Start column of each slice in the fused output."""
        out, start = [], 0
        for _, width in self.slices:
            out.append(start)
            start += width
        return out


@dataclass(frozen=True)
class LoRALayout:
    """Where adapter weights go in a model: the same projections in every decoder layer."""

    num_layers: int
    projections: tuple[ProjectionLayout, ...]

    def find(self, module: str) -> tuple[ProjectionLayout, int]:
        """(projection, slice index) computing PEFT module `module`; KeyError if none."""
        for proj in self.projections:
            for i, (name, _) in enumerate(proj.slices):
                if name == module:
                    return proj, i
        raise KeyError(module)


def llama_layout(a) -> LoRALayout:
    """The layout of a Llama-family model of `LlamaArgs` `a` (engine/models/llama.py: fused
    Q/K/V and gate/up)."""
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    return LoRALayout(a.num_layers, (
        ProjectionLayout("qkv_proj", a.hidden_size, (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
        ProjectionLayout("o_proj", q, (("o_proj", a.hidden_size),)),
        ProjectionLayout("gate_up_proj", a.hidden_size,
                         (("gate_proj", a.intermediate_size), ("up_proj", a.intermediate_size))),
        ProjectionLayout("down_proj", a.intermediate_size, (("down_proj", a.hidden_size),)),
    ))


@dataclass
class LoRAAdapter:
    """One adapter in host memory. `weights[(layer, module)]` = (A [r, in], B [out, r]
    with the scaling folded in), in the model dtype; modules the adapter does not train
    are absent."""

    request: LoRARequest
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise LoRAError(f"LoRA adapter path {str(path)!r} is not a directory")
    if not config_file.exists():
        raise LoRAError(f"LoRA adapter {str(path)!r} has no adapter_config.json (is it a PEFT adapter?)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"LoRA adapter {str(path)!r}: adapter_config.json is not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoRAError(f"LoRA adapter {str(path)!r}: adapter_config.json is not an object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoRAError(f"LoRA adapter {str(path)!r} is a {kind} adapter; only LORA is supported")
    refused = {
        "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out layers",
        "modules_to_save": "modules_to_save (fully trained layers)", "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
    }
    for key, what in refused.items():
        if config.get(key):
            raise LoRAError(f"LoRA adapter {str(path)!r} uses {what}, which Baton does not apply")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"LoRA adapter {str(path)!r} trains biases (bias={config['bias']!r}); only bias='none'")
    return config


def load_adapter(request: LoRARequest, layout: LoRALayout, max_rank: int, dtype: torch.dtype,
                 pin: bool = False, cut=None) -> LoRAAdapter:
    """Read `request`'s adapter directory; raises LoRAError for anything it cannot apply.
    `pin`: page-locked host tensors (faster copies into GPU slots). `cut(module, A, B)`:
    a tensor-parallel rank's part of each pair (checked against the whole model's `layout`
    first)."""
    from safetensors import SafetensorError, safe_open

    path = Path(request.lora_local_path)
    config = _read_config(path)
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise LoRAError(f"LoRA adapter {str(path)!r}: adapter_config.json needs an integer r >= 1 and lora_alpha")
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {request.lora_name!r} has rank {rank}, above max_lora_rank={max_rank}; "
                        f"start the engine with a larger max_lora_rank")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.exists():
        hint = " (convert adapter_model.bin to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise LoRAError(f"LoRA adapter {str(path)!r} has no adapter_model.safetensors{hint}")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None or m.group(2) not in TARGET_MODULES:
                    raise LoRAError(f"LoRA adapter {request.lora_name!r}: tensor {key!r} adapts a layer Baton does "
                                    f"not apply adapters to (only {', '.join(TARGET_MODULES)})")
                pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(key)
    except SafetensorError as exc:
        raise LoRAError(f"LoRA adapter {str(path)!r}: adapter_model.safetensors is not readable ({exc})") from exc
    if not pairs:
        raise LoRAError(f"LoRA adapter {request.lora_name!r} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"LoRA adapter {request.lora_name!r}, layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where}: lora_A and lora_B must both be present")
        if layer >= layout.num_layers:
            raise LoRAError(f"{where}: the base model has {layout.num_layers} layers")
        proj, i = layout.find(module)
        a, b = ab["A"], ab["B"]
        want_a, want_b = (rank, proj.in_features), (proj.slices[i][1], rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LoRAError(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the base model "
                            f"(A {want_a}, B {want_b}): was it trained on another model?")
        a, b = a.to(dtype), (b.double() * scaling).to(dtype)
        if cut is not None:
            a, b = cut(module, a, b)
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        weights[(layer, module)] = (a, b)
    return LoRAAdapter(request, rank, weights)
