"""What a checkpoint's `quantization_config` says, as one frozen `QuantConfig`.

Four checkpoint layouts are recognised from `config.json` alone (no flag needed):

- `compressed-tensors` (llm-compressor's output): `format` "float-quantized" (FP8 weights, the
  "-FP8" and "-FP8-dynamic" checkpoints; per-tensor, per-channel or 128x128-block weight
  scales; static per-tensor or dynamic per-token/per-group activation scales) and
  "pack-quantized" (int4 weights in int32 words, grouped or per-channel, symmetric or with
  zero points, optional activation-order `g_idx`); an optional `kv_cache_scheme` (FP8 KV,
  per-tensor or per-head scales).
- `fp8` (AutoFP8, ModelOpt exports, the Qwen3/DeepSeek "-FP8" checkpoints): FP8 weights with a
  per-tensor `weight_scale` or, with `weight_block_size`, a block `weight_scale_inv`;
  `activation_scheme` "static" (an `input_scale`) or "dynamic".
- `awq` (AutoAWQ "gemm" packing) and `gptq` (AutoGPTQ/GPTQModel v1 packing, `desc_act`).

`EngineArgs(quantization="fp8")` on an unquantized checkpoint quantizes it at load
(per-channel weight scales, dynamic per-token activation scales).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Names users type (vLLM's) -> the method they mean.
METHOD_ALIASES = {
    "fp8": "fp8",
    "awq": "awq",
    "gptq": "gptq",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


class QuantizationConfigError(ValueError):
    """A quantization setting or checkpoint layout Baton does not run; the message says which."""


@dataclass(frozen=True)
class WeightScheme:
    """How a linear layer's weight is stored.

    kind: "fp8" (e4m3) or "int4".
    strategy: "tensor", "channel" (one scale per output row), "block" (`block` = (rows, cols)
      of one scale) or "group" (`group_size` input columns per scale, int4).
    packing: the checkpoint's tensor layout: "ct-float", "fp8", "awq", "gptq", "ct-pack", or
      "online" (quantized at load from an unquantized checkpoint).
    """

    kind: str
    strategy: str
    packing: str
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    zero_offset: int = 0  # GPTQ v1 stores each zero point minus one
    # Activation order (GPTQ desc_act, compressed-tensors actorder "group"): the input rows of
    # a group are spread over the whole input (`int4.py`'s perm).
    act_order: bool = False


@dataclass(frozen=True)
class ActivationScheme:
    """FP8 activation scales: "static" (the checkpoint's `input_scale`, per tensor) or dynamic
    per "token" (one scale per row), per "tensor", or per "group" of `group_size` columns."""

    strategy: str
    group_size: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.strategy != "static"


@dataclass(frozen=True)
class QuantConfig:
    """One model's quantization: the weights' scheme, the activations' (None: weights only,
    products in the model dtype), which linear layers stay unquantized, and whether the
    checkpoint carries FP8 KV-cache scales ("tensor" or "head", None: none)."""

    method: str
    weights: WeightScheme
    activations: ActivationScheme | None = None
    ignore: tuple[str, ...] = ()
    kv_scales: str | None = None

    def is_ignored(self, hf_module: str) -> bool:
        """Whether the checkpoint left the module (Hugging Face name, e.g.
        "model.layers.0.mlp.down_proj" or "lm_head") unquantized. Entries are names, name
        suffixes, or "re:" regular expressions, as compressed-tensors and AutoFP8 write them."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], hf_module) or re.match(entry[3:], hf_module):
                    return True
            elif hf_module == entry or hf_module.endswith("." + entry) or entry.endswith("." + hf_module):
                return True
        return False

    @property
    def description(self) -> str:
        w = self.weights
        what = f"{w.kind} weights ({w.packing}, {w.strategy}"
        what += f" {w.group_size})" if w.strategy == "group" else ")"
        if self.activations is not None:
            what += f", fp8 activations ({self.activations.strategy})"
        return f"{self.method}: {what}"


def online_fp8() -> QuantConfig:
    """`quantization="fp8"` on an unquantized checkpoint: the FP8-dynamic scheme, at load."""
    return QuantConfig(
        method="fp8",
        weights=WeightScheme(kind="fp8", strategy="channel", packing="online"),
        activations=ActivationScheme("token"),
        ignore=("lm_head",),
    )


def parse_quantization(hf_config: dict, requested: str | None) -> QuantConfig | None:
    """The model's quantization, from `config.json` and `EngineArgs.quantization`.

    `requested` None: whatever the checkpoint says (None for an unquantized one). Naming a
    method that differs from the checkpoint's is refused, as is naming one that needs a
    quantized checkpoint (awq, gptq, compressed-tensors) for an unquantized one.
    """
    if requested is not None and requested not in METHOD_ALIASES:
        raise QuantizationConfigError(
            f"quantization={requested!r} is not supported; choose one of "
            f"{sorted(set(METHOD_ALIASES.values()))} (or leave it unset to follow config.json)"
        )
    want = METHOD_ALIASES.get(requested) if requested else None
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not qc:
        if want is None:
            return None
        if want == "fp8":
            return online_fp8()
        raise QuantizationConfigError(
            f"quantization={requested!r} needs a checkpoint quantized with {want}, but this "
            f"model's config.json has no quantization_config (only 'fp8' quantizes at load)"
        )
    have = METHOD_ALIASES.get(str(qc.get("quant_method", "")).lower())
    if have is None:
        raise QuantizationConfigError(
            f"config.json's quantization_config has quant_method {qc.get('quant_method')!r}, "
            f"which Baton does not load; supported: {sorted(set(METHOD_ALIASES.values()))}"
        )
    if want is not None and want != have:
        raise QuantizationConfigError(
            f"quantization={requested!r} does not match the checkpoint, which is quantized "
            f"with {have!r} (config.json's quantization_config); leave quantization unset"
        )
    return {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "awq": _awq, "gptq": _gptq}[have](qc)


def _int4_group(bits, group_size, method: str) -> int | None:
    if bits != 4:
        raise QuantizationConfigError(f"{method}: only 4-bit weights are supported, got bits={bits}")
    group_size = int(group_size if group_size is not None else 128)
    if group_size == -1:
        return None  # one scale per output channel
    if group_size not in (32, 64, 128):
        raise QuantizationConfigError(f"{method}: group_size must be 32, 64, 128 or -1, got {group_size}")
    return group_size


def _awq(qc: dict) -> QuantConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationConfigError(f"awq: only the 'gemm' packing is supported, got version={version!r}")
    group = _int4_group(qc.get("bits", qc.get("w_bit", 4)), qc.get("group_size", qc.get("q_group_size")), "awq")
    zero_point = bool(qc.get("zero_point", True))
    return QuantConfig(
        method="awq",
        weights=WeightScheme("int4", "group" if group else "channel", "awq", group, symmetric=not zero_point),
        ignore=tuple(qc.get("modules_to_not_convert") or ()),
    )


def _gptq(qc: dict) -> QuantConfig:
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizationConfigError(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    group = _int4_group(qc.get("bits", 4), qc.get("group_size"), "gptq")
    return QuantConfig(
        method="gptq",
        weights=WeightScheme("int4", "group" if group else "channel", "gptq", group,
                             symmetric=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0,
                             act_order=bool(qc.get("desc_act", False))),
        ignore=tuple(qc.get("modules_to_not_convert") or ()),
    )


def _fp8(qc: dict) -> QuantConfig:
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("static", "dynamic"):
        raise QuantizationConfigError(f"fp8: activation_scheme must be static or dynamic, got {scheme!r}")
    block = qc.get("weight_block_size")
    if block is not None:
        if scheme != "dynamic":
            raise QuantizationConfigError("fp8: block-wise weight scales need activation_scheme 'dynamic'")
        block = (int(block[0]), int(block[1]))
        weights = WeightScheme("fp8", "block", "fp8", block=block)
        acts = ActivationScheme("group", block[1])
    else:
        weights = WeightScheme("fp8", "tensor", "fp8")
        acts = ActivationScheme("static" if scheme == "static" else "tensor")
    ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
    return QuantConfig("fp8", weights, acts, ignore, kv_scales=_kv_scheme_of_fp8(qc))


def _kv_scheme_of_fp8(qc: dict) -> str | None:
    kv = qc.get("kv_cache_scheme") or qc.get("kv_cache_quant_algo")
    return "tensor" if kv else None


def _compressed_tensors(qc: dict) -> QuantConfig:
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise QuantizationConfigError(
            f"compressed-tensors: exactly one config group is supported, this checkpoint has {len(groups)}"
        )
    group = next(iter(groups.values()))
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise QuantizationConfigError(f"compressed-tensors: only targets ['Linear'] are supported, got {targets}")
    w = group.get("weights") or {}
    a = group.get("input_activations")
    if group.get("output_activations"):
        raise QuantizationConfigError("compressed-tensors: output activation quantization is not supported")
    strategy = w.get("strategy")
    if fmt == "float-quantized":
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise QuantizationConfigError("compressed-tensors float-quantized: only 8-bit float weights are supported")
        if not w.get("symmetric", True) or w.get("dynamic"):
            raise QuantizationConfigError("compressed-tensors FP8: weights must be static and symmetric")
        if strategy == "block":
            block = tuple(int(v) for v in w.get("block_structure") or (128, 128))
            weights = WeightScheme("fp8", "block", "ct-float", block=block)
        elif strategy in ("tensor", "channel"):
            weights = WeightScheme("fp8", strategy, "ct-float")
        else:
            raise QuantizationConfigError(f"compressed-tensors FP8: weight strategy {strategy!r} is not supported")
        acts = _ct_activations(a) if a else None
        if acts is not None and (acts.strategy == "group") != (weights.strategy == "block"):
            raise QuantizationConfigError(
                "compressed-tensors FP8: per-group activation scales go with block weight scales only"
            )
    elif fmt == "pack-quantized":
        if w.get("type") != "int" or w.get("num_bits") != 4:
            raise QuantizationConfigError("compressed-tensors pack-quantized: only 4-bit int weights are supported")
        if a:
            raise QuantizationConfigError("compressed-tensors pack-quantized: only weight-only (A16) schemes are supported")
        if strategy == "group":
            gs = _int4_group(4, w.get("group_size"), "compressed-tensors")
            weights = WeightScheme("int4", "group", "ct-pack", gs, symmetric=bool(w.get("symmetric", True)),
                                   act_order=w.get("actorder") in ("group", True))
        elif strategy == "channel":
            weights = WeightScheme("int4", "channel", "ct-pack", symmetric=bool(w.get("symmetric", True)))
        else:
            raise QuantizationConfigError(f"compressed-tensors int4: weight strategy {strategy!r} is not supported")
        acts = None
    else:
        raise QuantizationConfigError(
            f"compressed-tensors format {fmt!r} is not supported (float-quantized, pack-quantized)"
        )
    kv = qc.get("kv_cache_scheme")
    kv_scales = None
    if kv:
        if kv.get("type") != "float" or kv.get("num_bits") != 8 or kv.get("dynamic"):
            raise QuantizationConfigError("compressed-tensors kv_cache_scheme: only static 8-bit float is supported")
        kv_scales = {"tensor": "tensor", "attn_head": "head"}.get(kv.get("strategy", "tensor"))
        if kv_scales is None:
            raise QuantizationConfigError(f"kv_cache_scheme strategy {kv.get('strategy')!r} is not supported")
    return QuantConfig("compressed-tensors", weights, acts, tuple(qc.get("ignore") or ()), kv_scales)


def _ct_activations(a: dict) -> ActivationScheme:
    if a.get("type") != "float" or a.get("num_bits") != 8 or not a.get("symmetric", True):
        raise QuantizationConfigError("compressed-tensors: only symmetric 8-bit float activations are supported")
    strategy = a.get("strategy")
    if not a.get("dynamic"):
        if strategy != "tensor":
            raise QuantizationConfigError(f"compressed-tensors: static activation strategy {strategy!r} is not supported")
        return ActivationScheme("static")
    if strategy in ("token", "tensor"):
        return ActivationScheme(strategy)
    if strategy == "group":
        return ActivationScheme("group", int(a.get("group_size") or 128))
    raise QuantizationConfigError(f"compressed-tensors: dynamic activation strategy {strategy!r} is not supported")


def resolve_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """"auto" (the model's dtype) or "fp8" (e4m3); "fp8_e4m3" is an alias."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise QuantizationConfigError(
            f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
            + (" (e5m2 is not supported: use fp8, e4m3 with scales)" if "e5m2" in str(kv_cache_dtype) else "")
        )
    return "auto" if kv_cache_dtype == "auto" else "fp8"
