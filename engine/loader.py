"""Build a model and load a Hugging Face checkpoint straight onto the target device.

The module is created on the meta device (no memory), materialised empty on the target
device in the target dtype, and each safetensors tensor is read directly onto that device
and copied into place: the weights are never held twice in host memory. A quantized model
(`config.quantization`) gets its quantized linear layers before it is materialised, and
the quantization package reads their tensors out of the stream (`engine/quantization`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from baton.engine.config import EngineConfig
from baton.engine.models.registry import ModelRegistry
from baton.engine.parallel.layout import ShardLayout
from baton.engine.quantization import kv_scales, loading

log = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    return found


def iter_weights(model_dir: Path, device: torch.device, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) pairs, read onto `device`; `lazy`: (name, safetensors
    slice), valid until the next pair, of which `read_part` reads only what is asked."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_slice(name) if lazy else f.get_tensor(name)


def read_part(source, dim: int | None = None, start: int = 0, length: int = 0) -> torch.Tensor:
    """Elements [start, start + length) of `source` along `dim` (None: all of it): a view of
    a tensor, or a read of that part only from a safetensors slice (`iter_weights(lazy=True)`)."""
    if isinstance(source, torch.Tensor):
        return source if dim is None else source.narrow(dim, start, length)
    return source[...] if dim is None else source[(slice(None),) * dim + (slice(start, start + length),)]


def load_model(config: EngineConfig, layout: ShardLayout | None = None) -> nn.Module:
    """The model of `config`; with a tensor-parallel `layout`, the rank's shard: the model
    built at the rank's shape and loaded with its slices of each tensor (`engine/parallel`)."""
    cls = ModelRegistry.resolve(config.architecture)
    sharded = layout is not None and layout.tp > 1
    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)  # parameters are born in the target dtype
    try:
        with torch.device("meta"):
            model = cls(layout.rank_hf_config(config.hf_config) if sharded else config.hf_config)
    finally:
        torch.set_default_dtype(previous)
    loading.prepare_model(model, config.quantization)
    model = model.to_empty(device=config.device)
    # A tensor-parallel rank reads its part of each tensor only, unless the weights are
    # quantized at load: that needs whole rows (a row-parallel layer's scales).
    online = config.quantization is not None and config.quantization.weights.packing == "online"
    weights = iter_weights(config.model_dir, config.device, lazy=sharded and not online)
    weights = loading.quantize_at_load(model, config.quantization, weights)
    if sharded:
        from baton.engine.parallel.shard import shard_weights

        weights = shard_weights(weights, layout, config.quantization)
    with torch.no_grad():
        scales = loading.load_weights(model, config.quantization, weights)
    if config.kv_cache_dtype == torch.float8_e4m3fn:
        kv_scales.attach(model, scales, layout or ShardLayout.of(config.hf_config), config.device)
    elif scales:
        log.warning("the checkpoint has FP8 KV-cache scales; they apply with kv_cache_dtype='fp8' only")
    model.finish_loading(config.device, config.max_model_len)
    return model.eval()
