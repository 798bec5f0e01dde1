"""Which part of a model one tensor-parallel rank holds (no torch: the KV transfer layer
describes layouts with it too).

A Llama-family model splits into `tp` ranks as Megatron-LM does:

- attention heads: rank r computes query heads `heads`, a contiguous `num_heads / tp` of
  them, and holds the KV heads they read, `kv_heads`: a contiguous `num_kv_heads / tp` when
  the model has at least `tp` KV heads, else the one KV head its query heads share
  (replicated on `tp / num_kv_heads` ranks);
- the MLP: rows `inter` of gate and up, the same columns of down;
- the vocabulary: rows `vocab` of the embedding and the LM head, `ceil(vocab / tp)` per
  rank, the last rank's padded with zeros.

A rank's model is the reference model built at the rank's shape (`rank_hf_config`) and
loaded with the rank's slices of the checkpoint (`parallel/shard.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `tp` over a model with these (whole-model) sizes."""

    tp: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, hf_config: dict, tp: int = 1, rank: int = 0) -> ShardLayout:
        """The layout of rank `rank` of `tp` for config.json's dict; raises ValueError
        (naming the sizes) where the model cannot be split `tp` ways."""
        heads = int(hf_config["num_attention_heads"])
        layout = cls(
            tp=tp,
            rank=rank,
            num_heads=heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
            head_dim=int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads),
            intermediate_size=int(hf_config["intermediate_size"]),
            vocab_size=int(hf_config["vocab_size"]),
        )
        layout.check()
        return layout

    def check(self) -> None:
        tp = self.tp
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if not 0 <= self.rank < tp:
            raise ValueError(f"rank {self.rank} is not in [0, {tp})")
        problems = []
        if self.num_heads % tp:
            problems.append(f"{self.num_heads} attention heads")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads (neither a multiple nor a divisor of {tp})")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size {self.intermediate_size}")
        if problems:
            raise ValueError(f"tensor_parallel_size={tp} does not divide this model's {', '.join(problems)}; "
                             f"choose a tensor_parallel_size that does")

    # -- what this rank holds -------------------------------------------------------------

    @property
    def heads(self) -> range:
        """This rank's query heads."""
        n = self.num_heads // self.tp
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        """The KV heads this rank's query heads read (and its KV cache holds)."""
        if self.num_kv_heads >= self.tp:
            n = self.num_kv_heads // self.tp
            return range(self.rank * n, (self.rank + 1) * n)
        head = self.rank * self.num_kv_heads // self.tp
        return range(head, head + 1)

    @property
    def inter(self) -> range:
        n = self.intermediate_size // self.tp
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.tp)

    @property
    def vocab(self) -> range:
        """This rank's (real, unpadded) rows of the embedding and the LM head."""
        start = min(self.rank * self.vocab_per_rank, self.vocab_size)
        return range(start, min(start + self.vocab_per_rank, self.vocab_size))

    def rank_hf_config(self, hf_config: dict) -> dict:
        """config.json's dict at this rank's shape: what its model is built from."""
        if self.tp == 1:
            return hf_config
        return {
            **hf_config,
            "num_attention_heads": len(self.heads),
            "num_key_value_heads": len(self.kv_heads),
            "head_dim": self.head_dim,  # no longer hidden_size / heads
            "intermediate_size": len(self.inter),
            "vocab_size": self.vocab_per_rank,
        }

    def describe(self) -> str:
        """For errors and logs: 'TP 2 rank 1: heads 4-7, KV heads 2-3'."""
        h, kv = self.heads, self.kv_heads
        return (f"TP {self.tp} rank {self.rank}: heads {h.start}-{h.stop - 1}, "
                f"KV heads {kv.start}-{kv.stop - 1}")
