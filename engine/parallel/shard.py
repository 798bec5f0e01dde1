"""Sharding a Llama-family model: the rank's slices of the checkpoint, then its parallel layers.

`load_model(config, layout)` (`engine/loader.py`) builds the reference model at the rank's
shape (`ShardLayout.rank_hf_config`) and feeds it `shard_weights` of the checkpoint, so the
model's own `load_weights` fuses and checks the slices as it does whole tensors (a
quantized layer's tensors are cut in their checkpoint layout, `quantization/sharding.py`);
`parallelize` then wraps the layers whose rank-local results must be combined. The model
file stays the single-device reference; nothing in it knows about ranks. `shard_lora` cuts
a LoRA adapter the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from baton.engine.loader import read_part
from baton.engine.parallel.layers import (
    Collectives,
    GatheredLMHead,
    RowParallel,
    VocabParallelEmbedding,
)
from baton.engine.parallel.layout import ShardLayout
from baton.engine.quantization import sharding
from baton.engine.quantization.schemes import QuantConfig
from baton.engine.quantization.sharding import Cut

# The architectures whose layers `parallelize` knows (by exact class, as the fast path: a
# registered subclass may compute something else).
SHARDABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def shardable(cls: type) -> bool:
    return cls.__module__ == "baton.engine.models.llama" and cls.__qualname__ in SHARDABLE


def layer_cut(module: str, layout: ShardLayout) -> Cut | None:
    """The rank's part of a linear layer, by its Hugging Face module name ("q_proj"): output
    rows of q (its heads), k and v (its KV heads), gate and up (its intermediate rows);
    input columns of o and down (the same); None for anything else."""
    d = layout.head_dim
    if module in ("q_proj", "o_proj"):
        heads, total = layout.heads, layout.num_heads * d
        return Cut("out" if module == "q_proj" else "in", heads.start * d, len(heads) * d, total)
    if module in ("k_proj", "v_proj"):
        return Cut("out", layout.kv_heads.start * d, len(layout.kv_heads) * d, layout.num_kv_heads * d)
    if module in ("gate_proj", "up_proj", "down_proj"):
        inter = layout.inter
        return Cut("in" if module == "down_proj" else "out", inter.start, len(inter), layout.intermediate_size)
    return None


def layer_cuts(layouts: list[ShardLayout]) -> dict[str, list[Cut]]:
    """Every linear layer kind's cuts, one per rank of `layouts`."""
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {kind: [layer_cut(kind, layout) for layout in layouts] for kind in kinds}


def shard_tensor(name: str, tensor, layout: ShardLayout, quantization: QuantConfig | None = None) -> torch.Tensor:
    """The rank's part of the checkpoint tensor `name` (a Hugging Face name; `tensor` a
    tensor or a safetensors slice, of which only that part is read): the `layer_cut`
    of a linear layer's weight (an FP8 weight too) and bias, and of a quantized layer's
    other tensors as their layout stores them (`quantization/sharding.py`); vocabulary rows
    of the embedding and the LM head (zero-padded to `vocab_per_rank`); anything else whole
    (norms, KV-cache scales)."""
    parts = name.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    if module in ("embed_tokens", "lm_head"):
        vocab = layout.vocab
        part = read_part(tensor, 0, vocab.start, len(vocab))
        if len(vocab) < layout.vocab_per_rank:
            pad = part.new_zeros((layout.vocab_per_rank - len(vocab), *part.shape[1:]))
            part = torch.cat([part, pad])
        return part
    cut = layer_cut(module, layout)
    if cut is None:
        return read_part(tensor)
    if leaf in ("weight", "bias"):
        part = read_part(tensor, 0 if cut.axis == "out" or leaf == "bias" else 1, cut.start, cut.size)
        # A quantized layer's tensors wait in the loader until the layer is complete: a copy
        # lets a whole tensor read at once go now.
        return part.clone() if quantization is not None and isinstance(tensor, torch.Tensor) else part
    if quantization is not None and sharding.stores(quantization.weights, leaf):
        return sharding.shard_leaf(quantization.weights, leaf, tensor, cut, name)
    return read_part(tensor)


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], layout: ShardLayout,
                  quantization: QuantConfig | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream with every tensor cut to the rank's part (`shard_tensor`)."""
    for name, tensor in weights:
        yield name, shard_tensor(name, tensor, layout, quantization)


def shard_lora(module: str, a: torch.Tensor, b: torch.Tensor, layout: ShardLayout):
    """The rank's part of an adapter's pair for PEFT module `module` (A [r, in], B [out, r]):
    of a column-parallel layer A whole and B's output rows of the cut; of a row-parallel
    one (o, down) A's input columns and B whole, so the rank's B (A_r x_r) is a partial sum
    that the layer's all-reduce completes with the base product's (`lora/layers.py`)."""
    cut = layer_cut(module, layout)
    if cut.axis == "out":
        return a, b.narrow(0, cut.start, cut.size).clone()
    return a.narrow(1, cut.start, cut.size).contiguous(), b


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
