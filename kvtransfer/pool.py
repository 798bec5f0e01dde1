"""`KVPool`: the KV tensor a handoff reads or writes, and who hands out its blocks.

`EnginePool` wraps an `AsyncLLMEngine`: block bookkeeping runs on the engine thread (the
block manager is not thread-safe), while the bytes are copied by the transfer layer on its
own threads, only ever into blocks that are reserved for the handoff and not yet admitted.
`TensorPool` is a bare tensor with its own free list, for benchmarks and protocol tests
that need no model; it goes through exactly the same sender, receiver and transports.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

import torch

from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.layout import KVLayout


class KVPool(ABC):
    """A block-major KV tensor `kv[num_blocks, layers, 2, block_size, kv_heads, head_dim]`."""

    layout: KVLayout
    kv: torch.Tensor

    @abstractmethod
    async def reserve(self, num_tokens: int) -> list[int]:
        """Take the blocks a `num_tokens` prompt needs (contiguous runs preferred).

        Raises HandoffError("no_capacity") when they don't fit now, ("bad_request") when
        they never can."""

    @abstractmethod
    async def release(self, block_ids: list[int]) -> None:
        """Give back blocks from `reserve` that were never admitted."""

    @abstractmethod
    async def num_free_blocks(self) -> int: ...

    async def release_held(self, request_id: str) -> None:
        """Release the blocks an engine keeps for a finished `hold_kv` request."""
        raise NotImplementedError

    async def held_blocks(self, request_id: str) -> list[int] | None:
        raise NotImplementedError

    async def exclusive(self, fn):
        """`fn()` while nothing else reads or writes `kv` (the engine between steps)."""
        return fn()


class EnginePool(KVPool):
    """The KV pool of an `AsyncLLMEngine`."""

    def __init__(self, engine):
        self.engine = engine
        self.kv = engine.kv_cache
        self.layout = KVLayout.from_engine_config(engine.config)

    async def reserve(self, num_tokens: int) -> list[int]:
        from baton.engine.errors import NoCapacityError

        # Shielded: a caller cancelled once the reservation is queued must not leave blocks
        # that nobody owns; they go back as soon as the reservation is made.
        reserving = asyncio.ensure_future(self.engine.run(lambda e: e.reserve_blocks(num_tokens)))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._give_back)
            raise
        except NoCapacityError as exc:
            raise HandoffError("no_capacity", str(exc)) from None
        except ValueError as exc:
            raise HandoffError("bad_request", str(exc)) from None

    def _give_back(self, reserving: asyncio.Future) -> None:
        if not reserving.cancelled() and reserving.exception() is None:
            asyncio.ensure_future(self.release(reserving.result()))

    # Releases run even when the task that asked for them is cancelled meanwhile (a gRPC
    # handler whose call the router cancels while it cleans up): else the blocks stay taken.
    async def release(self, block_ids: list[int]) -> None:
        ids = list(block_ids)
        await self.engine.run(lambda e: e.release_blocks(ids), always=True)

    async def num_free_blocks(self) -> int:
        return await self.engine.run(lambda e: e.block_manager.num_free_blocks)

    async def held_blocks(self, request_id: str) -> list[int] | None:
        return await self.engine.run(lambda e: e.held_blocks(request_id))

    async def release_held(self, request_id: str) -> None:
        await self.engine.run(lambda e: e.release_held(request_id), always=True)

    async def exclusive(self, fn):
        return await self.engine.run(lambda e: fn())


class TensorPool(KVPool):
    """A KV tensor of `num_blocks` blocks with a plain free list (lowest ids first)."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu",
                 kv: torch.Tensor | None = None):
        self.layout = layout
        dtype = getattr(torch, layout.dtype)
        shape = (num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device) if kv is None else kv
        if tuple(self.kv.shape) != shape or self.kv.dtype != dtype:
            raise ValueError(f"kv must be {shape} {dtype}, got {tuple(self.kv.shape)} {self.kv.dtype}")
        self._free = list(range(num_blocks))
        self._lock = asyncio.Lock()

    async def reserve(self, num_tokens: int) -> list[int]:
        n = self.layout.blocks_for(num_tokens)
        if num_tokens < 1 or n > self.kv.shape[0]:
            raise HandoffError("bad_request", f"{num_tokens} tokens do not fit a {self.kv.shape[0]}-block pool")
        async with self._lock:
            if n > len(self._free):
                raise HandoffError("no_capacity", f"{n} KV blocks needed, {len(self._free)} free")
            self._free.sort()
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    async def release(self, block_ids: list[int]) -> None:
        async with self._lock:
            self._free.extend(block_ids)

    async def num_free_blocks(self) -> int:
        return len(self._free)


def as_pool(engine_or_pool) -> KVPool:
    return engine_or_pool if isinstance(engine_or_pool, KVPool) else EnginePool(engine_or_pool)
