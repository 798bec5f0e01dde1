"""`KVLayout`: what a KV pool looks like, and the fingerprint both ends compare.

No torch here (the router forwards tickets that carry a layout). A layout names the model
(its served name), the tensor shape of one block and the tensor layout (`block_major_v1`,
see baton.engine.kv_cache): two pools with equal layouts can exchange blocks byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from baton.kvtransfer.errors import LayoutMismatchError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVLayout:
    """One KV pool's identity and block shape: `[num_layers, 2, block_size, kv_heads, head_dim]`."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    layout: str = "block_major_v1"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; one of {sorted(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fingerprint(self) -> str:
        """16 hex digits that change when any field changes (stable across processes)."""
        text = "|".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check_compatible(self, other: KVLayout) -> None:
        """Raise `LayoutMismatchError` naming the first field where `other` (the peer) differs."""
        for f in dataclasses.fields(self):
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours != theirs:
                raise LayoutMismatchError(f.name, ours, theirs)

    # -- conversions ---------------------------------------------------------------------

    def to_proto(self):
        from baton.protos import kvtransfer_pb2 as pb

        return pb.KVLayout(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, msg) -> KVLayout:
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_engine_config(cls, config) -> KVLayout:
        """The layout of an engine's KV pool (`baton.engine.config.EngineConfig`)."""
        return cls(
            model=config.served_model_name,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=config.block_size,
            dtype=str(config.kv_cache_dtype).removeprefix("torch."),  # fp8 KV: float8_e4m3fn
        )
