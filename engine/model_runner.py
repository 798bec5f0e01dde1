"""The one object that owns the device: model weights, the KV pool, the attention backend.

`execute(batch)` turns a scheduled batch into input tensors, runs the model once over all
its tokens, and samples the next token for every sequence whose step reaches the end of its
known tokens. Everything else in the engine is CPU bookkeeping.

The model is built as the torch reference (`engine/models`); on CUDA the runner runs it
through the fast path (`engine/fastpath.apply_fast_path`, under the engine's
`KernelConfig`), tunes its few-row kernels and logs which kernel computes each op.
On CUDA, decode-only steps replay CUDA graphs captured at start-up (`cuda_graphs.py`) unless
`enforce_eager` is set or the attention backend cannot be captured; other steps run eagerly.
Inputs go to the device with non-blocking copies and sampling stays on the device, so the
only host sync of a step is the read of the sampled token ids.
With LoRA (`config.lora`) the runner owns the adapters' GPU slots too (`self.lora`, a
`LoRAManager`): the projections of the model that runs are wrapped once it is built and
tuned (`lora.layers.apply_lora`), and every step first puts its adapters into slots.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from baton.engine.attention.base import create_backend, pick_backend_name
from baton.engine.config import EngineConfig, KernelConfig
from baton.engine.fastpath import apply_fast_path, explain
from baton.engine.input_prep import prepare
from baton.engine.kv_cache import KVCacheSpec
from baton.engine.loader import load_model
from baton.engine.parallel.layout import ShardLayout
from baton.engine.sampler import Sampler, prompt_logprobs
from baton.engine.scheduler import ScheduledBatch
from baton.engine.sequence import Sequence
from baton.engine.spec_decode.verify import verify_drafts
from baton.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one sequence got from a step."""

    token_id: int | None = None  # None while the step did not reach the end (prefill chunk)
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None  # for the chunk's positions
    error: str | None = None
    hidden: torch.Tensor | None = None  # a pooling sequence's final hidden states [n, hidden] of the step
    # Speculative decoding (engine/spec_decode): the tokens after `token_id` the step also
    # emitted (accepted drafts, then the target's own), as (id, logprob, top logprobs), and
    # how many drafts it verified.
    next_tokens: list[tuple[int, float | None, dict[int, float] | None]] = field(default_factory=list)
    num_drafts: int = 0


def kv_cache_spec(config: EngineConfig, layout: ShardLayout) -> KVCacheSpec:
    """The KV pool of one rank: the KV heads of `layout` (all of them at TP 1)."""
    return KVCacheSpec(num_layers=config.num_layers, num_kv_heads=len(layout.kv_heads), head_dim=config.head_dim,
                       block_size=config.block_size, dtype=config.kv_cache_dtype)


def lora_manager(config: EngineConfig, layout: ShardLayout, model, device: torch.device):
    """The `LoRAManager` of one rank (None without LoRA): slots for `model`'s projections
    (the rank's shapes), adapters checked against the whole model and cut to the rank's part."""
    if config.lora is None:
        return None
    from baton.engine.lora.adapter import llama_layout
    from baton.engine.lora.manager import LoRAManager
    from baton.engine.models.llama import LlamaArgs, LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"enable_lora: {type(model).__name__} has no LoRA layout (supported: the "
                         f"Llama family, Mistral, Qwen2, Qwen3)")
    shard = None
    if layout.tp > 1:
        from baton.engine.parallel.shard import shard_lora

        shard = (llama_layout(LlamaArgs.from_hf(config.hf_config)), functools.partial(shard_lora, layout=layout))
    return LoRAManager(config.lora, llama_layout(model.args), config.dtype, device,
                       max(config.max_num_batched_tokens, config.max_num_seqs), shard)


def attention_backend(config: EngineConfig, layout: ShardLayout, kernels: KernelConfig, name: str | None = None):
    """The attention backend of one rank, over its heads."""
    name = name or pick_backend_name(config.attention_backend, config.device)
    return create_backend(name, config.device, num_heads=len(layout.heads), num_kv_heads=len(layout.kv_heads),
                          head_dim=config.head_dim, scale=config.head_dim**-0.5, kernels=kernels)


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: list[int]):
        self.config = config
        self.device = config.device
        self.kernels = config.kernels.for_device(self.device)  # PDL resolved for this GPU
        torch.manual_seed(config.seed)
        # Rank 0's part of the model; the whole model at tensor_parallel_size 1.
        self.layout = ShardLayout.of(config.hf_config, config.tensor_parallel_size, 0)
        if config.tensor_parallel_size > 1:
            from baton.engine import parallel

            # Ranks 1..N-1 in processes of their own, driven by every call of the model
            # (engine/parallel); no fast path and no CUDA graphs for it yet (docs/limits.md).
            self.model = parallel.start(config, load_model)
            self.reference = self.model.model
        else:
            self.reference = load_model(config)  # the torch model, as engine/models writes it
            self.model = apply_fast_path(self.reference, self.kernels, self.device)  # what runs
        self.kv_spec = kv_cache_spec(config, self.layout)
        self.lora = self._create_lora()  # before the KV pool is sized: its slots take memory
        self.backend_name = pick_backend_name(config.attention_backend, self.device)
        self.backend = self._create_backend()
        self.graphs = None  # decode CUDA graphs, captured once the KV pool exists
        self._handoff_kv: torch.Tensor | None = None  # see handoff_kv
        # Draft-model speculation: loaded before the pools are sized, so both fit.
        self.draft = self._load_draft()
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv(self.num_blocks)
        if self.draft is not None:
            self.draft.allocate(self.num_blocks)
        self.sampler = Sampler(self.device, config.seed, eos_token_ids, pdl=self.kernels.pdl)
        self._tune()
        self._apply_lora()
        log.info("kernels of each step:\n%s", self.explain())
        self._capture_graphs()
        log.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB, %s) on %s, attention backend %s; weights: %s",
            self.num_blocks, config.block_size, self.num_blocks * self.kv_spec.block_bytes / 2**20,
            str(config.kv_cache_dtype).removeprefix("torch."), self.device, self.backend_name,
            config.quantization.description if config.quantization else str(config.dtype).removeprefix("torch."),
        )

    def _create_backend(self):
        return attention_backend(self.config, self.layout, self.kernels, self.backend_name)

    def _allocate_kv(self, num_blocks: int) -> None:
        """The KV pool of `num_blocks` blocks, on every rank (each holds its KV heads)."""
        self.kv = self.kv_spec.allocate(num_blocks, self.device)
        if self.config.tensor_parallel_size > 1:
            self.model.allocate_kv(num_blocks)

    @property
    def handoff_kv(self) -> torch.Tensor:
        """The pool a KV handoff reads and writes (`LLMEngine.kv_cache`): the KV pool itself at
        tensor_parallel_size 1; above, a host pool of as many blocks in the whole model's
        layout (every KV head), made on first use, which `export_kv` fills from the ranks and
        `import_kv` spreads to them, so both sides of a handoff see one layout whatever their
        TP (heads regrouped on the way)."""
        if self.config.tensor_parallel_size == 1:
            return self.kv
        if self._handoff_kv is None:
            whole = kv_cache_spec(self.config, ShardLayout.of(self.config.hf_config))
            self._handoff_kv = whole.allocate(self.num_blocks, torch.device("cpu"))
        return self._handoff_kv

    def export_kv(self, block_ids: list[int]) -> None:
        """Copy blocks from every rank into `handoff_kv` (a no-op at TP 1)."""
        if self.config.tensor_parallel_size > 1 and block_ids:
            self.model.gather_kv(block_ids, self.kv, self.handoff_kv)

    def import_kv(self, block_ids: list[int]) -> None:
        """Copy blocks of `handoff_kv` into every rank's pool, its heads each (a no-op at TP 1)."""
        if self.config.tensor_parallel_size > 1 and block_ids:
            self.model.scatter_kv(block_ids, self.kv, self.handoff_kv)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing at TP 1; also done when the runner
        is collected)."""
        if self.config.tensor_parallel_size > 1:
            self.model.ranks.close()

    def _create_lora(self):
        return lora_manager(self.config, self.layout, self.reference, self.device)

    def _apply_lora(self) -> None:
        if self.lora is not None:
            from baton.engine.lora.layers import apply_lora

            # At TP > 1 the rank-0 shard inside the driven model (the other ranks wrap theirs).
            apply_lora(self.reference if self.config.tensor_parallel_size > 1 else self.model, self.lora)
            if self.config.tensor_parallel_size > 1:  # the other ranks read as rank 0 starts to
                self.lora.on_read_start = self.model.prefetch_lora

    def _set_lora(self, batch: ScheduledBatch) -> None:
        """The step's adapters into GPU slots, its token -> slot index written (on every rank)."""
        if self.lora is not None:
            self.lora.activate([s.lora_int_id for s in batch.seqs], batch.num_new_tokens)
            if self.config.tensor_parallel_size > 1:
                self.model.set_lora([s.lora_request for s in batch.seqs], list(batch.num_new_tokens),
                                    list(self.lora.host))

    def _tune(self) -> None:
        """Time the fast path's few-row kernels for this model (not in float32, where cuBLAS runs)."""
        if hasattr(self.model, "tune") and self.config.dtype != torch.float32:
            from baton.engine.fastpath.few_row import MAX_ROWS

            self.model.tune(max_rows=min(MAX_ROWS, self.config.max_num_seqs))

    def _capture_graphs(self) -> None:
        c = self.config
        if (self.device.type == "cuda" and self.backend.supports_cuda_graphs and not c.enforce_eager
                and c.tensor_parallel_size == 1):
            from baton.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model, self.backend, self.kv, c.block_size, c.max_model_len, c.max_num_seqs, self.device,
                side_stream_inputs=self.kernels.side_stream_inputs,
            )
            if self.lora is not None:
                with self.lora.capturing():
                    self.graphs.capture()
            else:
                self.graphs.capture()

    def explain(self) -> str:
        """Which kernel computes each op of a step, per decode batch size (a text table)."""
        sizes = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64) if b <= self.config.max_num_seqs]
        return explain(self.model, self.backend, sizes)

    def set_kernel_config(self, kernels: KernelConfig) -> None:
        """Run with other kernel switches from now on (benchmarks compare them in one process):
        the fast path applied anew to the reference (its tuning kept; a form it did not time
        before is timed now), a new attention backend, the decode graphs captured again."""
        self.kernels = kernels.for_device(self.device)
        self.model = apply_fast_path(self.reference, self.kernels, self.device, getattr(self.model, "tuning", None))
        self._tune()
        self._apply_lora()
        self.backend = self._create_backend()
        self.sampler.pdl = self.kernels.pdl
        if self.graphs is not None:
            self.graphs = None
            torch.cuda.empty_cache()
            self._capture_graphs()

    def _decide_num_blocks(self) -> int:
        c = self.config
        if c.num_blocks_override is not None:
            return c.num_blocks_override
        # Never more than every sequence slot filled to max_model_len would use.
        ceiling = c.max_num_seqs * -(-c.max_model_len // c.block_size) + 1
        if self.device.type == "cpu":
            return max(1, min(ceiling, c.kv_cache_memory_bytes // self._block_bytes))
        return max(1, min(ceiling, self._profile_cuda_blocks()))

    def _profile_cuda_blocks(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of the card after a worst-case step."""
        c = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(c.max_num_batched_tokens, c.max_model_len)
        blocks = -(-n // c.block_size)
        self._allocate_kv(blocks)
        seq = Sequence("profile", 0, [0] * n, SamplingParams(), 0.0)
        seq.block_table = list(range(blocks))
        self.execute(ScheduledBatch([seq], [n]), sample=False)
        torch.cuda.synchronize(self.device)
        del self.kv
        if c.tensor_parallel_size > 1:
            self.model.allocate_kv(0)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use_by_us = torch.cuda.memory_allocated(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * c.gpu_memory_utilization - others - in_use_by_us - (peak - in_use_by_us)
        if budget < self._block_bytes:
            raise RuntimeError(
                f"no room for a KV cache: weights and activations use {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return int(budget // self._block_bytes)

    def _load_draft(self):
        spec = self.config.speculative
        if spec is None or spec.model is None:
            return None
        from baton.engine.spec_decode.draft_model import DraftModel, draft_engine_config

        return DraftModel(draft_engine_config(self.config), self.backend_name)

    @property
    def _block_bytes(self) -> int:
        """Device bytes one KV block costs: the target's, and the draft model's beside it."""
        return self.kv_spec.block_bytes + (self.draft.kv_spec.block_bytes if self.draft is not None else 0)

    # -- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample: bool = True) -> list[StepOutput]:
        outputs = [StepOutput() for _ in batch.seqs]
        if self.draft is not None:
            self.draft.propose(batch)  # the drafts this step verifies, and draft KV catch-up
        self._set_lora(batch)
        if (sample and self.graphs is not None and self.graphs.can_run(batch)
                and not any(seq.pooled for seq in batch.seqs)):
            logits = self.graphs.run(batch.seqs)
            self._sample(logits, batch.seqs, list(range(len(batch.seqs))), outputs)
            return outputs

        inputs, hidden = self._forward(batch)
        if not sample:
            return outputs

        row = 0
        for seq, out, n in zip(batch.seqs, outputs, batch.num_new_tokens):
            if seq.pooled:
                out.hidden = hidden[row : row + n]
            row += n

        for i, first_row, count in inputs.prompt_rows:
            seq = batch.seqs[i]
            start = seq.num_computed_tokens
            logits = self.model.compute_logits(hidden[first_row : first_row + count])
            next_ids = seq.token_ids[start + 1 : start + 1 + count]
            outputs[i].prompt_logprobs = prompt_logprobs(logits, next_ids, seq.params.prompt_logprobs)

        if inputs.num_draft_rows:
            verify_drafts(self.sampler, self._sampled_logits(inputs, hidden), batch.seqs, inputs.sample_seqs, outputs)
        elif inputs.sample_seqs:
            self._sample(self._sampled_logits(inputs, hidden), batch.seqs, inputs.sample_seqs, outputs)
        return outputs

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Queue a decode-only step (one token per sequence, every one sampled) and return its
        token ids on the device without waiting for them. `input_ids` [N] on the device
        replace the tokens the sequences hold (placeholders, under asynchronous scheduling).
        The sequences must need nothing from the host at sampling time (see
        `LLMEngine._overlappable`)."""
        self._set_lora(batch)
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(batch.seqs, input_ids)
        else:
            logits = self._sampled_logits(*self._forward(batch, input_ids))
        return self.sampler.sample_ids(logits, batch.seqs)

    def _forward(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None):
        """(the step's inputs, hidden states of every token) of an eager step; `input_ids` on
        the device replace the tokens the host prepared."""
        inputs = prepare(batch, self.config.block_size, self.device)
        if input_ids is not None:
            inputs.input_ids.copy_(input_ids)
        return inputs, self.model(inputs.input_ids, inputs.positions, self.kv, inputs.meta, self.backend)

    def _sampled_logits(self, inputs, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows the step samples from."""
        return self.model.compute_logits(hidden if inputs.sample_rows is None else hidden[inputs.sample_rows])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], which: list[int],
                outputs: list[StepOutput]) -> None:
        """Sample one token for each of `seqs[i] for i in which` (logits row j is `which[j]`)."""
        result = self.sampler(logits, [seqs[i] for i in which])
        for j, i in enumerate(which):
            out = outputs[i]
            out.token_id = result.token_ids[j]
            out.logprob = result.logprobs[j]
            out.top_logprobs = result.top_logprobs[j]
            out.error = result.errors.get(j)
