"""Sharding a Llama-family model: the rank's slices of the checkpoint, then its parallel layers.

`load_model(config, layout)` (`engine/loader.py`) builds the reference model at the rank's
shape (`ShardLayout.rank_hf_config`) and feeds it `shard_weights` of the checkpoint, so the
model's own `load_weights` fuses and checks the slices as it does whole tensors;
`parallelize` then wraps the layers whose rank-local results must be combined. The model
file stays the single-device reference; nothing in it knows about ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from baton.engine.parallel.layers import (
    Collectives,
    GatheredLMHead,
    RowParallel,
    VocabParallelEmbedding,
)
from baton.engine.parallel.layout import ShardLayout

# The architectures whose layers `parallelize` knows (by exact class, as the fast path: a
# registered subclass may compute something else).
SHARDABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def shardable(cls: type) -> bool:
    return cls.__module__ == "baton.engine.models.llama" and cls.__qualname__ in SHARDABLE


def _rows(tensor: torch.Tensor, heads: range, head_dim: int, dim: int) -> torch.Tensor:
    return tensor.narrow(dim, heads.start * head_dim, len(heads) * head_dim)


def shard_tensor(name: str, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The rank's part of the checkpoint tensor `name` (a Hugging Face name): rows of
    q/k/v (weights and biases), gate and up; columns of o and down; vocabulary rows of the
    embedding and the LM head (zero-padded to `vocab_per_rank`); anything else whole."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    d = layout.head_dim
    if module == "q_proj":
        return _rows(tensor, layout.heads, d, 0)
    if module in ("k_proj", "v_proj"):
        return _rows(tensor, layout.kv_heads, d, 0)
    if module == "o_proj":
        return _rows(tensor, layout.heads, d, 1)
    if module in ("gate_proj", "up_proj"):
        return tensor.narrow(0, layout.inter.start, len(layout.inter))
    if module == "down_proj":
        return tensor.narrow(1, layout.inter.start, len(layout.inter))
    if module in ("embed_tokens", "lm_head"):
        vocab = layout.vocab
        part = tensor.narrow(0, vocab.start, len(vocab))
        if len(vocab) < layout.vocab_per_rank:
            pad = tensor.new_zeros((layout.vocab_per_rank - len(vocab), *tensor.shape[1:]))
            part = torch.cat([part, pad])
        return part
    return tensor


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], layout: ShardLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream with every tensor cut to the rank's part (`shard_tensor`)."""
    for name, tensor in weights:
        yield name, shard_tensor(name, tensor, layout)


def parallelize(model: nn.Module, layout: ShardLayout, comm: Collectives) -> nn.Module:
    """Wrap, in place, the layers of a loaded rank model whose results the ranks combine:
    o_proj and down_proj (all-reduce), the embedding (vocabulary-parallel) and the LM head
    (gathered to rank 0). Returns the model; its forward gives the same hidden states on
    every rank, its `compute_logits` the whole logits on rank 0 (None elsewhere)."""
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, layout.vocab, comm)
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, comm)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, comm)
    model.lm_head = GatheredLMHead(model.lm_head, layout.vocab_size, comm)
    return model
