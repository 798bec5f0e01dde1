"""The tensor-parallel layers and the collectives under them.

A rank's model computes partial results where its weights are a slice of the input
dimension; these layers finish them:

- `RowParallel` wraps o_proj and down_proj (their input columns are the rank's heads and
  intermediate rows): each rank's product is a partial sum, all-reduced (the two
  all-reduces of a decoder layer);
- `VocabParallelEmbedding`: each rank looks up the ids in its vocabulary rows and zeroes
  the others; an all-reduce assembles every token's row;
- `GatheredLMHead`: each rank's logits of its vocabulary rows, gathered to rank 0, which
  alone samples (the other ranks get None).

Q/K/V and gate/up need no layer: they are column-parallel, each rank's rows of the fused
weight produce its own heads and intermediate rows, nothing to combine.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Collectives:
    """The ranks' process group (gloo on the CPU, NCCL on CUDA), for the few operations the
    layers and the driver need. Each is a collective: every rank calls it, in the same order.
    Built on a process group object of its own (not torch's global default group), so one
    process may hold several engines."""

    def __init__(self, store, rank: int, size: int, device: torch.device, timeout: datetime.timedelta):
        self.rank, self.size, self.device = rank, size, device
        prefixed = dist.PrefixStore("baton-tp", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            # The ranks are processes of one host (one pod): loopback, whatever the hostname.
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = timeout
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, options)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` (contiguous) over the ranks, in place; returns it."""
        self.group.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere), in place."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([_bits(x)], options).wait()
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank == 0:
            out = [torch.empty_like(x) for _ in range(self.size)]
            self.group.gather([[_bits(o) for o in out]], [_bits(x)], options).wait()
            return out
        self.group.gather([], [_bits(x)], options).wait()
        return None


def _bits(x: torch.Tensor) -> torch.Tensor:
    """`x` as the backend can move it: an e4m3 tensor (an FP8 KV pool's blocks) as its bytes,
    which gloo does not take as float8; a copy moves bits, so nothing is lost."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


class RowParallel(nn.Module):
    """A linear layer holding the rank's input columns: y = all_reduce(x @ w_r.T)."""

    def __init__(self, linear: nn.Linear, comm: Collectives):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("a row-parallel layer with a bias would add it on every rank")
        self.linear = linear
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in / tp] -> [T, out], the same on every rank."""
        return self.comm.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding rows `vocab` (range) of the vocabulary; ids outside it give zeros here."""

    def __init__(self, embedding: nn.Embedding, vocab: range, comm: Collectives):
        super().__init__()
        self.embedding = embedding
        self.weight = embedding.weight  # [vocab_per_rank, hidden] (an LM head tied to it shares it)
        self.start, self.stop = vocab.start, vocab.stop
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden], the same on every rank."""
        mine = (ids >= self.start) & (ids < self.stop)
        rows = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return self.comm.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))


class GatheredLMHead(nn.Module):
    """The LM head's rows of the rank's vocabulary; the whole logits on rank 0."""

    def __init__(self, head: nn.Linear, vocab_size: int, comm: Collectives):
        super().__init__()
        self.head = head
        self.vocab_size = vocab_size
        self.comm = comm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] on rank 0 (None on the others)."""
        parts = self.comm.gather(self.head(hidden).contiguous())  # [N, vocab_per_rank] each
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
