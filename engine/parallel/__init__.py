"""Tensor parallelism: one model over `tensor_parallel_size` processes, one per device.

Rank 0 is the engine process; it keeps the scheduler, the block manager and the sampler,
and drives ranks 1..N-1 (processes it spawns) op by op. Each rank holds a shard: its
attention heads (and their KV heads, so its own KV pool), its rows of the MLP, its part of
the vocabulary. Map of the package:

- `layout.py`: `ShardLayout`, which heads, rows and vocabulary a rank holds (torch-free);
- `shard.py`: a rank's model, the reference model at the rank's shape loaded with its
  slices of the checkpoint (`shard_weights`, quantized tensors included), then
  `parallelize`d; its part of each LoRA adapter (`shard_lora`);
- `layers.py`: the collectives and the layers that use them (row-parallel o/down with an
  all-reduce, vocabulary-parallel embedding, the LM head gathered to rank 0);
- `driver.py`: rank 0's side, `RankGroup` (spawning, failures) and `DrivenModel`;
- `steps.py`: what rank 0 sends per op; `worker.py`: the other ranks' process.

`ModelRunner` uses this package only when `tensor_parallel_size > 1` (`start`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from baton.engine.parallel.layout import ShardLayout  # torch-free: the KV transfer layer uses it

if TYPE_CHECKING:
    from baton.engine.config import EngineConfig
    from baton.engine.parallel.driver import DrivenModel

__all__ = ["ShardLayout", "start"]


def start(config: EngineConfig, load) -> DrivenModel:
    """Rank 0's model of a tensor-parallel engine: spawns ranks 1..N-1 (they load their shards
    meanwhile), loads rank 0's shard with `load(config, layout)`, parallelizes it, waits for
    the other ranks, and returns the `DrivenModel` the runner calls."""
    from baton.engine.parallel.driver import DrivenModel, RankGroup
    from baton.engine.parallel.shard import parallelize

    layout = ShardLayout.of(config.hf_config, config.tensor_parallel_size, 0)
    ranks = RankGroup(config)
    try:
        model = parallelize(load(config, layout), layout, ranks.comm)
        ranks.wait_for("ready")
    except BaseException:
        ranks.close()
        raise
    return DrivenModel(model, ranks)
