"""The one object that owns the device: model weights, the KV pool, the attention backend.

`execute(batch)` turns a scheduled batch into input tensors, runs the model once over all
its tokens, and samples the next token for every sequence whose step reaches the end of its
known tokens. Everything else in the engine is CPU bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from baton.engine.attention.base import AttentionMetadata, create_backend, pick_backend_name
from baton.engine.config import EngineConfig
from baton.engine.kv_cache import KVCacheSpec
from baton.engine.loader import load_model
from baton.engine.sampler import Sampler, prompt_logprobs
from baton.engine.scheduler import ScheduledBatch
from baton.engine.sequence import Sequence
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


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: list[int]):
        self.config = config
        self.device = config.device
        torch.manual_seed(config.seed)
        self.model = load_model(config)
        self.kv_spec = KVCacheSpec(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=config.block_size,
            dtype=config.dtype,
        )
        self.backend_name = pick_backend_name(config.attention_backend, self.device)
        self.backend = create_backend(
            self.backend_name,
            self.device,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            scale=config.head_dim**-0.5,
        )
        self.num_blocks = self._decide_num_blocks()
        self.kv = self.kv_spec.allocate(self.num_blocks, self.device)
        self.sampler = Sampler(self.device, config.seed, eos_token_ids)
        log.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB) on %s, attention backend %s",
            self.num_blocks, config.block_size,
            self.num_blocks * self.kv_spec.block_bytes / 2**20, self.device, self.backend_name,
        )

    def _decide_num_blocks(self) -> int:
        c = self.config
        if c.num_blocks_override is not None:
            return c.num_blocks_override
        # Never more than every sequence slot filled to max_model_len would use.
        ceiling = c.max_num_seqs * -(-c.max_model_len // c.block_size) + 1
        if self.device.type == "cpu":
            return max(1, min(ceiling, c.kv_cache_memory_bytes // self.kv_spec.block_bytes))
        return max(1, min(ceiling, self._profile_cuda_blocks()))

    def _profile_cuda_blocks(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of the card after a worst-case step."""
        c = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(c.max_num_batched_tokens, c.max_model_len)
        blocks = -(-n // c.block_size)
        self.kv = self.kv_spec.allocate(blocks, self.device)
        seq = Sequence("profile", 0, [0] * n, SamplingParams(), 0.0)
        seq.block_table = list(range(blocks))
        self.execute(ScheduledBatch([seq], [n]), sample=False)
        torch.cuda.synchronize(self.device)
        del self.kv
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use_by_us = torch.cuda.memory_allocated(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * c.gpu_memory_utilization - others - in_use_by_us - (peak - in_use_by_us)
        if budget < self.kv_spec.block_bytes:
            raise RuntimeError(
                f"no room for a KV cache: weights and activations use {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return int(budget // self.kv_spec.block_bytes)

    # -- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample: bool = True) -> list[StepOutput]:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # flat index of the last token of sequences that sample
        sample_seqs: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (seq index, first flat row, count)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if end == seq.num_tokens:
                sample_rows.append(starts[-1] + n - 1)
                sample_seqs.append(i)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                count = min(end, seq.num_prompt_tokens - 1) - start
                prompt_rows.append((i, starts[-1], count))
            starts.append(starts[-1] + n)

        dev = self.device
        max_blocks = max(len(t) for t in tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32, device=dev),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=bs,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv, meta, self.backend,
        )
        outputs = [StepOutput() for _ in batch.seqs]
        if not sample:
            return outputs

        for i, first_row, count in prompt_rows:
            seq = batch.seqs[i]
            start = seq.num_computed_tokens
            logits = self.model.compute_logits(hidden[first_row : first_row + count])
            next_ids = seq.token_ids[start + 1 : start + 1 + count]
            outputs[i].prompt_logprobs = prompt_logprobs(logits, next_ids, seq.params.prompt_logprobs)

        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
            seqs = [batch.seqs[i] for i in sample_seqs]
            result = self.sampler(logits, seqs)
            for j, i in enumerate(sample_seqs):
                out = outputs[i]
                out.token_id = result.token_ids[j]
                out.logprob = result.logprobs[j]
                out.top_logprobs = result.top_logprobs[j]
                out.error = result.errors.get(j)
        return outputs
