"""Engine configuration: `EngineArgs` (vLLM's names) and the frozen configs derived from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baton.engine.pooling import TASKS, PoolingConfig, read_pooling_config
from baton.engine.quantization import QuantConfig, parse_quantization, resolve_kv_cache_dtype
from baton.engine.spec_decode.config import SpeculativeConfig, parse_speculative

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class KernelConfig:
    """The fast path's kernel and performance switches (CUDA only: the CPU runs the torch
    reference model). Defaults are the measured-best settings; benchmarks vary them by
    building engines (or `ModelRunner.set_kernel_config`) with other values. The environment
    overrides the defaults of engines that are given none (`baton.settings.kernel_switches`,
    the BATON_* spellings); `--kernel-config NAME=VALUE,...` overrides them per worker."""

    # The fast path at all (engine/fastpath): off runs the torch reference model on CUDA too
    # (the attention backend's kernels still run).
    fused_kernels: bool = True
    # Programmatic dependent launch for the Triton kernels (engine/fastpath/pdl.py); only on
    # GPUs of compute capability 9.0 or more (`for_device`).
    pdl: bool = True
    # Weight bytes of each few-row product prefetched into L2 before its PDL wait (all
    # programs together; 0: none), and how (2: the start of each of a program's rows, what
    # its K loop reads first; 1: its first rows whole).
    prefetch_mb: float = 8.0
    prefetch_mode: int = 2
    # The transposed few-row product configurations take part in the choice.
    use_swap: bool = True
    # A fused few-row form (SiLU, residual add + norm, rotary) replaces a kernel of its own:
    # it is used while its configuration is at most this much slower than cuBLAS unfused.
    fused_credit_us: float = 2.0
    # Residual add + RMSNorm of decode steps in the epilogues of the products around it.
    fuse_norms: bool = True
    # Rotary + KV store in the Q/K/V product's epilogue for steps whose attention kernel
    # does not do them (with it on at engine start the Q/K/V shape is tuned in both forms).
    rope_epilogue: bool = True
    # An FP8 product's input quantized (per token or static) by the norm or SiLU * up kernel
    # before it, not by a kernel of its own (engine/quantization/fused.py).
    fuse_fp8_quant: bool = True
    # Decode-only steps of at most this many (sequence, KV head) pairs do the rotary and KV
    # store inside the decode attention kernel (larger ones: the kernel slows by about
    # what the saved kernel took).
    rope_attention_max_pairs: int = 128
    # The decode attention's last split merges the splits (else a merge kernel of its own).
    merge_in_splits: bool = True
    # Decode attention splits: about `split_programs` programs in all, none from
    # `split_until_pairs` (sequence, KV head) pairs on.
    split_programs: int = 320
    split_until_pairs: int = 256
    # The decode graphs' input copy on a side stream, overlapping the previous step's
    # sampling (engine/cuda_graphs.py); off: no gain measured.
    side_stream_inputs: bool = False

    @property
    def prefetch_bytes(self) -> int:
        return int(self.prefetch_mb * 2**20)

    def for_device(self, device: torch.device) -> KernelConfig:
        """This configuration with `pdl` resolved for `device` (off where it cannot run)."""
        on = self.pdl and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        return dataclasses.replace(self, pdl=on)

    @classmethod
    def from_env(cls, overrides: str | None = None) -> KernelConfig:
        """The defaults, with the environment's BATON_* switches over them, and `overrides`
        ("NAME=VALUE,...", field names; true/false/1/0 for switches) over those."""
        from baton.settings import kernel_switches

        values: dict[str, Any] = kernel_switches()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for item in filter(None, (overrides or "").split(",")):
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"kernel_config: {item!r} is not NAME=VALUE with NAME one of {sorted(fields)}")
            values[name] = _parse_switch(name, raw.strip(), type(getattr(cls(), name)))
        return cls(**values)


def _parse_switch(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "on", "off"):
            raise ValueError(f"kernel_config: {name}={raw!r} is not a switch (true/false, on/off, 1/0)")
        return raw.lower() in ("1", "true", "on")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"kernel_config: {name}={raw!r} is not a {kind.__name__}") from exc


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # The checkpoint's dtype on GPU; float32 on CPU, where half precision is slow.
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(config_dtype or "bfloat16", torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA (engine/lora): `max_loras` adapters in GPU slots at once (so at most that
    many distinct adapters run concurrently), up to `max_cpu_loras` kept in host memory,
    ranks up to `max_lora_rank` (every slot is that wide)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1


@dataclass
class EngineArgs:
    """Everything an engine needs, with vLLM's field names."""

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_gb: float = 1.0  # CPU pool size when no block count is given
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    # Launch the next decode step before the host processes the previous one
    # (async_scheduling.py; with speculation, steps that verify drafts still run synchronously);
    # None: on for CUDA, where the host's work then overlaps the GPU's, off on the CPU
    async_scheduling: bool | None = None
    disable_log_stats: bool = True
    # Kernel switches (`KernelConfig`); None: the defaults with the environment's BATON_*
    # switches over them; a string "NAME=VALUE,..." overrides those (the workers' flag).
    kernel_config: KernelConfig | str | None = None
    # None: as config.json's quantization_config says (unquantized without one); "fp8"
    # quantizes an unquantized checkpoint at load; naming another method than the
    # checkpoint's is refused (engine/quantization/schemes.py).
    quantization: str | None = None
    # "auto": the model dtype; "fp8" (or "fp8_e4m3"): e4m3 with the checkpoint's KV scales.
    kv_cache_dtype: str = "auto"
    # User code imported before the model is built, to register architectures with
    # `ModelRegistry` (engine/models/registry.py): a module name or a .py path.
    model_module: str | None = None
    # Processes (one per device) the model is split over (engine/parallel): heads, MLP rows
    # and vocabulary; rank 0 is this process.
    tensor_parallel_size: int = 1
    # "generate", or "embed": the engine also serves pooling requests (embeddings,
    # engine/pooling.py), pooled as the model directory says or as `pooling_type` (last,
    # mean, cls) overrides.
    task: str = "generate"
    pooling_type: str | None = None
    # Speculative decoding (engine/spec_decode/config.py): vLLM's dict (or its JSON text),
    # or the seed's spelling speculative_model="[ngram]" or a draft model's directory, with
    # num_speculative_tokens.
    speculative_config: dict | str | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    # Multi-LoRA (engine/lora, `LoRAConfig`): requests may name PEFT adapters
    # (`LoRARequest`); max_cpu_loras None: max_loras.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def create_engine_config(self) -> EngineConfig:
        model_dir = Path(self.model) if self.model else _default_model_dir()
        hf_config = json.loads((model_dir / "config.json").read_text())
        if self.model_module:
            from baton.engine.models.registry import import_model_module

            import_model_module(self.model_module)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, hf_config.get("torch_dtype") or hf_config.get("dtype"), device)
        derived_max = int(hf_config.get("max_position_embeddings", 2048))
        # Sliding-window attention is not implemented: within the window it equals full
        # attention, so contexts are capped at the window (Mistral v0.1: 4,096).
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
        if window:
            derived_max = min(derived_max, int(window))
            if self.max_model_len and self.max_model_len > window:
                raise ValueError(
                    f"max_model_len {self.max_model_len} exceeds this model's sliding_window "
                    f"({window}); Baton does not implement sliding-window attention, so contexts "
                    f"are limited to the window"
                )
        max_model_len = self.max_model_len or derived_max
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in [1, 256], got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({max_model_len})"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.pooling_type is not None and self.task != "embed":
            raise ValueError("pooling_type needs task='embed'")
        pooling = read_pooling_config(model_dir, self.pooling_type) if self.task == "embed" else None
        quantization = parse_quantization(hf_config, self.quantization)
        speculative = parse_speculative(self.speculative_config, self.speculative_model,
                                        self.num_speculative_tokens)
        kv_cache_dtype = torch.float8_e4m3fn if resolve_kv_cache_dtype(self.kv_cache_dtype) == "fp8" else dtype
        if kv_cache_dtype == torch.float8_e4m3fn and self.attention_backend == "flash_attn":
            raise ValueError("kv_cache_dtype='fp8' needs the triton or torch attention backend (flash_attn reads "
                             "only a cache in the model dtype)")
        _check_tensor_parallel(self.tensor_parallel_size, hf_config, device, quantization)
        config = EngineConfig(
            model_dir=model_dir,
            tokenizer_dir=Path(self.tokenizer) if self.tokenizer else model_dir,
            served_model_name=self.served_model_name or model_dir.name,
            hf_config=hf_config,
            dtype=dtype,
            device=device,
            seed=self.seed,
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_blocks_override=self.num_gpu_blocks_override,
            kv_cache_memory_bytes=int(self.kv_cache_memory_gb * (1 << 30)),
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_chunked_prefill=self.enable_chunked_prefill,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            async_scheduling=device.type == "cuda" if self.async_scheduling is None else self.async_scheduling,
            kernels=(self.kernel_config if isinstance(self.kernel_config, KernelConfig)
                     else KernelConfig.from_env(self.kernel_config)),
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            task=self.task,
            pooling=pooling,
            speculative=speculative,
            lora=self._lora_config(),
        )
        if speculative is not None and speculative.model is not None:
            from baton.engine.spec_decode.draft_model import draft_engine_config

            draft_engine_config(config)  # refuses a draft model this target cannot use
        return config

    def _lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in [1, 512], got {self.max_lora_rank}")
        cpu = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        if cpu < self.max_loras:
            raise ValueError(f"max_cpu_loras ({cpu}) must be >= max_loras ({self.max_loras})")
        return LoRAConfig(self.max_loras, self.max_lora_rank, cpu)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        return cls(**kwargs)


@dataclass(frozen=True)
class EngineConfig:
    """The resolved, validated configuration an engine runs with."""

    model_dir: Path
    tokenizer_dir: Path
    served_model_name: str
    hf_config: dict
    dtype: torch.dtype
    device: torch.device
    seed: int
    block_size: int
    gpu_memory_utilization: float
    num_blocks_override: int | None
    kv_cache_memory_bytes: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    attention_backend: str
    enforce_eager: bool = False
    async_scheduling: bool = False
    kernels: KernelConfig = KernelConfig()
    quantization: QuantConfig | None = None  # None: unquantized
    kv_cache_dtype: torch.dtype | None = None  # None: the model dtype
    tensor_parallel_size: int = 1
    task: str = "generate"
    pooling: PoolingConfig | None = None  # with task "embed"
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    lora: LoRAConfig | None = None  # None: LoRA off (requests naming an adapter are refused)

    def __post_init__(self):
        if self.kv_cache_dtype is None:
            object.__setattr__(self, "kv_cache_dtype", self.dtype)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hf_config["hidden_size"] // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or []
        if not archs:
            raise ValueError(f"{self.model_dir}/config.json names no architectures")
        return archs[0]


def _check_tensor_parallel(tp, hf_config: dict, device: torch.device, quantization) -> None:
    """Refuse what tensor parallelism does not do (ValueError naming it); TP 1 passes."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    from baton.engine.models.registry import ModelRegistry
    from baton.engine.parallel.layout import ShardLayout
    from baton.engine.parallel.shard import SHARDABLE, layer_cuts, shardable

    arch = (hf_config.get("architectures") or ["(none)"])[0]
    if not ModelRegistry.is_registered(arch) or not shardable(ModelRegistry.resolve(arch)):
        raise ValueError(f"tensor_parallel_size={tp}: tensor parallelism shards the built-in "
                         f"{', '.join(SHARDABLE)} only, not {arch}; use tensor_parallel_size=1")
    layouts = [ShardLayout.of(hf_config, tp, rank) for rank in range(tp)]
    if quantization is not None:
        from baton.engine.quantization.sharding import check_cuts

        check_cuts(quantization, layer_cuts(layouts))
    if device.type == "cuda" and (device.index or 0) + tp > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs from {device}; this machine has "
                         f"{torch.cuda.device_count()}")


def _default_model_dir() -> Path:
    """The embedded tiny model, written once into the user cache."""
    from baton.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()
