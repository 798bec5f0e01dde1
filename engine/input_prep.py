"""Turn a scheduled batch into the step's input tensors, cheaply.

The Python work per step grows with the batch (256 sequences) and with prefill chunks (up
to thousands of tokens), so it is done with numpy on preallocated rows: each sequence's
block table is kept as a cached int32 array that is rebuilt only when the table grows (one
new block every `block_size` tokens), and a chunk's positions and slots are computed with
vector arithmetic. On CUDA the integers travel in two pinned buffers (one int64, one int32)
with non-blocking copies: two transfers a step, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baton.engine.attention.base import AttentionMetadata
from baton.engine.scheduler import ScheduledBatch
from baton.engine.sequence import Sequence


def table_array(seq: Sequence) -> np.ndarray:
    """The sequence's block table as int32, cached until the table changes.

    A block table only grows while its list object lives (the block manager replaces the
    list when it frees a sequence), so the cache is keyed on the list itself and its length.
    """
    table = seq.block_table
    cached = seq.table_array_cache
    if cached is not None and cached[0] is table and len(cached[1]) == len(table):
        return cached[1]
    arr = np.array(table, dtype=np.int32)
    seq.table_array_cache = (table, arr)
    return arr


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor through pinned memory, without waiting for the device."""
    if device.type == "cpu":
        return torch.from_numpy(array)
    staged = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
    staged.numpy()[...] = array
    return staged.to(device, non_blocking=True)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor | None  # rows of the hidden states to sample from; None = all
    sample_seqs: list[int]  # batch index of each sampled row
    num_draft_rows: int  # sampled rows past a sequence's known tokens (speculative decoding)
    prompt_rows: list[tuple[int, int, int]]  # (batch index, first flat row, count) for prompt logprobs


def prepare(batch: ScheduledBatch, block_size: int, device: torch.device) -> StepInputs:
    """Flatten the batch: token ids, positions, slots, lengths, padded block tables."""
    seqs, counts = batch.seqs, batch.num_new_tokens
    num_seqs, num_tokens = len(seqs), sum(counts)
    tables = [table_array(seq) for seq in seqs]
    max_blocks = max(len(t) for t in tables)
    longs = np.empty((4, num_tokens), dtype=np.int64)  # ids, positions, slots, sample rows
    ints = np.zeros(2 * num_seqs + 1 + num_seqs * max_blocks, dtype=np.int32)
    ids, positions, slots = longs[0], longs[1], longs[2]
    starts = ints[: num_seqs + 1]
    seq_lens = ints[num_seqs + 1 : 2 * num_seqs + 1]
    block_tables = ints[2 * num_seqs + 1 :].reshape(num_seqs, max_blocks)
    sample_rows: list[int] = []
    sample_seqs: list[int] = []
    prompt_rows: list[tuple[int, int, int]] = []
    num_draft_rows = 0
    row = 0
    for i, (seq, n) in enumerate(zip(seqs, counts)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        table = tables[i]
        if n == 1:
            ids[row] = seq.token_ids[start]
            positions[row] = start
            slots[row] = int(table[start // block_size]) * block_size + start % block_size
        else:
            pos = np.arange(start, end, dtype=np.int64)
            # Past the known tokens: drafts this step verifies (engine/spec_decode).
            ids[row : row + n] = (seq.token_ids[start:end] if end <= seq.num_tokens
                                  else seq.token_ids[start:] + seq.spec_token_ids[: end - seq.num_tokens])
            positions[row : row + n] = pos
            slots[row : row + n] = table[pos // block_size].astype(np.int64) * block_size + pos % block_size
        block_tables[i, : len(table)] = table
        seq_lens[i] = end
        if end >= seq.num_tokens and not seq.pooled:  # the last known token's row, then one per draft
            first = row + seq.num_tokens - 1 - start
            sample_rows.extend(range(first, row + n))
            sample_seqs.extend([i] * (row + n - first))
            num_draft_rows += row + n - 1 - first
        if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
            prompt_rows.append((i, row, min(end, seq.num_prompt_tokens - 1) - start))
        row += n
        starts[i + 1] = row
    all_rows = len(sample_rows) == num_tokens
    longs[3, : len(sample_rows)] = sample_rows
    longs_d = to_device(longs, device)
    ints_d = to_device(ints, device)
    meta = AttentionMetadata(
        slot_mapping=longs_d[2],
        query_start_loc=ints_d[: num_seqs + 1],
        seq_lens_t=ints_d[num_seqs + 1 : 2 * num_seqs + 1],
        block_tables=ints_d[2 * num_seqs + 1 :].view(num_seqs, max_blocks),
        query_lens=list(counts),
        seq_lens=seq_lens.tolist(),
        block_size=block_size,
    )
    return StepInputs(
        input_ids=longs_d[0],
        positions=longs_d[1],
        meta=meta,
        sample_rows=None if all_rows else longs_d[3, : len(sample_rows)],
        sample_seqs=sample_seqs,
        num_draft_rows=num_draft_rows,
        prompt_rows=prompt_rows,
    )
