"""What rank 0 tells the other ranks, op by op, and how a rank rebuilds a step from it.

Every call of rank 0's model that holds a collective is an op: rank 0 sends the op's
header (a small tuple) down each rank's control pipe, then the op's tensors travel by
broadcast on the ranks' process group, then every rank runs the same call. Ops:

- `("kv", num_blocks)`: (re)allocate the rank's KV pool (0: free it);
- `("forward", T, S, B, query_lens, seq_lens, block_size)`: one model forward over T
  tokens of S sequences (block tables B wide); broadcast: int64 [3, T] (ids, positions,
  slots), then int32 [2 S + 1 + S B] (query starts, lengths, block tables);
- `("logits", N)`: the LM head over N hidden rows; broadcast: those rows [N, hidden];
- `("kv_gather", block_ids)`: send those blocks of the rank's pool to rank 0 (gather), which
  puts each rank's KV heads in place in a pool of the whole model's layout (a KV handoff
  out of this engine);
- `("kv_scatter", block_ids)`: broadcast: those blocks in the whole model's layout, of which
  each rank keeps its KV heads (a KV handoff into this engine);
- `("lora", requests, counts, keep)`: before a forward with LoRA on, the step's adapters
  (each sequence's `LoRARequest` or None, and its token rows), which the rank takes from its
  prefetch or reads from disk if it has not yet (its part of each, `shard.py:shard_lora`)
  and puts in its slots; `keep`: the ids in rank 0's host memory, which the rank's mirrors;
- `("lora_prefetch", request)`: rank 0 started reading an adapter (a request named it):
  the rank starts reading its part on a thread, which the `lora` op of the step using it
  takes in (waiting if the read has not ended);
- `("lora_reads",)`: the rank answers `("lora_reads", (prefetched, read on the step))`, its
  `LoRAManager` counters;
- `("stop",)`: leave the loop and exit.

A rank answers on its pipe only at start (`("hello",)`, `("ready",)`), to `lora_reads`, and
when it fails (`("error", traceback)`, then it exits, which fails rank 0's next collective).
"""

from __future__ import annotations

import torch

from baton.engine.attention.base import AttentionMetadata
from baton.engine.parallel.layers import Collectives


def forward_header(input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple:
    return ("forward", int(input_ids.shape[0]), meta.num_seqs, int(meta.block_tables.shape[1]),
            list(meta.query_lens), list(meta.seq_lens), meta.block_size)


def send_forward(comm: Collectives, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> None:
    """Rank 0: broadcast a forward's tensors (after its header went down the pipes)."""
    comm.broadcast(torch.stack([input_ids, positions, meta.slot_mapping]))
    comm.broadcast(torch.cat([meta.query_start_loc, meta.seq_lens_t, meta.block_tables.reshape(-1)]))


def receive_forward(comm: Collectives, header: tuple, device: torch.device):
    """Another rank: (input_ids [T], positions [T], meta) of the forward `header` announced."""
    _, t, s, b, query_lens, seq_lens, block_size = header
    longs = comm.broadcast(torch.empty((3, t), dtype=torch.int64, device=device))
    ints = comm.broadcast(torch.empty(2 * s + 1 + s * b, dtype=torch.int32, device=device))
    meta = AttentionMetadata(
        slot_mapping=longs[2],
        query_start_loc=ints[: s + 1],
        seq_lens_t=ints[s + 1 : 2 * s + 1],
        block_tables=ints[2 * s + 1 :].view(s, b),
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_size=block_size,
    )
    return longs[0], longs[1], meta
