"""`ModelRegistry`: architecture name (config.json `architectures[0]`) -> model class.

Built-in architectures are registered as "module:Class" strings and imported only when a
checkpoint names them; user code adds its own, before the engine is built:

    from baton.engine import ModelRegistry

    @ModelRegistry.register_model("MyForCausalLM")
    class MyForCausalLM(nn.Module): ...

    ModelRegistry.register_model("OtherForCausalLM", OtherForCausalLM)
    ModelRegistry.register_model("LazyForCausalLM", "my_pkg.models:LazyForCausalLM")

A worker imports such code with `--model-module MODULE` (`EngineArgs.model_module`).

The model interface (what `engine/loader.py` and `engine/model_runner.py` call):

- `cls(hf_config: dict)`: build from config.json's dict. The loader calls it under the meta
  device with the target dtype as torch's default, so parameters are created empty; a
  random init does not survive (`to_empty` follows).
- `load_weights(weights: Iterable[tuple[str, Tensor]])`: the checkpoint's (Hugging Face
  name, tensor) pairs, already on the target device; copy each into place, and raise on a
  name with no place or a weight that never came.
- `finish_loading(device, max_position: int)`: after the weights: tie embeddings, build
  tables (rotary cos/sin up to `max_position`), whatever needs the real weights.
- `forward(input_ids [T], positions [T], kv, meta, backend) -> hidden [T, hidden]`: one
  flat step over every scheduled token of every sequence. `kv` is the whole paged pool
  (`engine/kv_cache.py`: `layer_view(kv, i)` gives layer i's `[blocks, block_size, Hkv, D]`
  keys and values); attention goes through `backend.forward(q, k, v, k_cache, v_cache,
  meta)` (`engine/attention/base.py`), which stores the step's keys and values into the
  cache and attends over each sequence's blocks. The pool's shape comes from config.json
  (`num_hidden_layers`, `num_key_value_heads`, `head_dim` or hidden / heads).
- `compute_logits(hidden [N, hidden]) -> [N, vocab]` (float or the model dtype).

What may replace parts of a built model: quantization swaps its `nn.Linear` layers for
quantized ones before loading (by the checkpoint names its `_FUSED` table maps, e.g.
"q_proj" -> ("qkv_proj", 0); `engine/quantization/loading.py`), so a model that fuses
checkpoint modules names them there, and the LM head and embeddings stay unquantized.
`Projection` (`engine/fastpath/projection.py`) is the interface a layer put in an
`nn.Linear`'s place implements (the fast path's products; tensor-parallel and LoRA layers
when they are built).
The CUDA fast path (`engine/fastpath.apply_fast_path`) knows the built-in Llama-family
classes only, by exact class: any other registered class (a subclass too) runs as written,
its torch forward, on CUDA as on the CPU, and the engine's start log says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# What the loader and the runner call on a model class's instances.
INTERFACE = ("forward", "compute_logits", "load_weights", "finish_loading")

_BUILTIN = {
    "LlamaForCausalLM": "baton.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "baton.engine.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "baton.engine.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "baton.engine.models.llama:Qwen3ForCausalLM",
}


def import_model_module(spec: str) -> None:
    """Import the user code that registers architectures: a module name ("my_pkg.models",
    on `sys.path`) or a path to a .py file (imported as a module named after the file)."""
    import sys
    from pathlib import Path

    if spec.endswith(".py") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model_module {spec!r}: no such file")
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) == str(path.resolve()):
            return  # imported already (an engine built before in this process)
        module_spec = importlib.util.spec_from_file_location(name, path.resolve())
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so the classes pickle and import by name, as a module would
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise ValueError(f"model_module {spec!r}: no module named {exc.name!r} (not on sys.path)") from exc
        raise


class ModelRegistry:
    """The process's architectures (class-level state: one registry per process, as vLLM's)."""

    _models: dict[str, type | str] = dict(_BUILTIN)

    @classmethod
    def register_model(cls, architecture: str, model_cls: type | str | None = None) -> Any:
        """Register `model_cls` (a class, or "module:Class" imported when first used) for
        `architecture`; without `model_cls`, a class decorator that registers the class it
        decorates and returns it unchanged. Registering a name again replaces it (a warning
        in the log): user code may override a built-in architecture."""
        if not isinstance(architecture, str) or not architecture:
            raise TypeError(f"architecture must be a non-empty string, got {architecture!r}")
        if model_cls is None:
            def decorator(klass: type) -> type:
                cls.register_model(architecture, klass)
                return klass

            return decorator
        if isinstance(model_cls, str):
            module_name, sep, cls_name = model_cls.partition(":")
            if not sep or not module_name or not cls_name:
                raise ValueError(f"register_model({architecture!r}, {model_cls!r}): a lazy class is 'module:Class'")
        elif isinstance(model_cls, type):
            _check_interface(architecture, model_cls)
        else:
            raise TypeError(f"register_model({architecture!r}, ...): expected a class or 'module:Class', "
                            f"got {type(model_cls).__name__}")
        if architecture in cls._models and cls._models[architecture] is not model_cls:
            log.warning("model architecture %s registered again: %s replaces %s",
                        architecture, _name(model_cls), _name(cls._models[architecture]))
        cls._models[architecture] = model_cls
        return model_cls

    @classmethod
    def get_supported_archs(cls) -> list[str]:
        return sorted(cls._models)

    @classmethod
    def is_registered(cls, architecture: str) -> bool:
        return architecture in cls._models

    @classmethod
    def resolve(cls, architecture: str) -> type:
        """The class registered for `architecture` (a lazy one imported now)."""
        if architecture not in cls._models:
            raise ValueError(
                f"model architecture {architecture!r} is not supported; supported: "
                f"{', '.join(cls.get_supported_archs())}. Register a class with "
                f"ModelRegistry.register_model({architecture!r}, cls) (a worker: --model-module MODULE)"
            )
        entry = cls._models[architecture]
        if isinstance(entry, str):
            module_name, _, cls_name = entry.partition(":")
            try:
                klass = getattr(importlib.import_module(module_name), cls_name)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"model architecture {architecture!r}: cannot import {entry!r}: {exc}") from exc
            _check_interface(architecture, klass)
            return klass
        return entry


def _check_interface(architecture: str, klass: Any) -> None:
    missing = [m for m in INTERFACE if not callable(getattr(klass, m, None))]
    if not isinstance(klass, type) or missing:
        raise TypeError(f"model architecture {architecture!r}: {_name(klass)} lacks the model interface "
                        f"({', '.join(missing) or 'not a class'}); see baton.engine.models.registry")


def _name(entry: type | str | Callable) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}.{entry.__qualname__}"
