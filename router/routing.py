"""Routing policies: which worker gets a request. Picked by name (`--routing-policy`).

`load` (default): decode and colocated workers in order of least KV usage, then fewest
requests; prefill workers by prefix affinity (the prompt's first blocks hash to a
preferred worker, so repeated prefixes hit its prefix cache) unless that worker is busier
than the least loaded one by more than `affinity_slack` requests, then by load.
`round-robin`: every role in turn, ignoring load.

A policy only orders candidates; the dispatcher tries them in that order.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence

from baton.router.workers import Worker

AFFINITY_BLOCKS = 4  # how many leading blocks of a prompt decide its prefill worker
CELL_SLACK = 4  # requests a same-cell prefill worker may be busier than the best one


class RoutingPolicy(ABC):
    """Orders candidate workers for one request; must not block or do I/O."""

    @abstractmethod
    def order_decode(self, workers: Sequence[Worker]) -> list[Worker]:
        """Decode or colocated workers, best first."""

    @abstractmethod
    def order_prefill(self, workers: Sequence[Worker], prompt_token_ids: Sequence[int]) -> list[Worker]:
        """Prefill workers for this prompt, best first."""


class LoadPolicy(RoutingPolicy):
    def __init__(self, affinity_slack: int = 4):
        self.affinity_slack = affinity_slack

    def order_decode(self, workers: Sequence[Worker]) -> list[Worker]:
        return sorted(workers, key=lambda w: (round(w.kv_usage(), 2), w.load(), w.address))

    def order_prefill(self, workers: Sequence[Worker], prompt_token_ids: Sequence[int]) -> list[Worker]:
        by_load = sorted(workers, key=lambda w: (w.load(), w.address))
        if len(by_load) < 2:
            return by_load
        block_size = next((w.info.block_size for w in workers if w.info is not None), 16)
        key = prefix_key(prompt_token_ids, block_size)
        if key is None:
            return by_load
        preferred = max(workers, key=lambda w: rendezvous_score(key, w.address))
        if preferred.load() > by_load[0].load() + self.affinity_slack:
            return by_load
        return [preferred] + [w for w in by_load if w is not preferred]


class RoundRobinPolicy(RoutingPolicy):
    def __init__(self):
        self._counter = itertools.count()

    def _rotate(self, workers: Sequence[Worker]) -> list[Worker]:
        ordered = sorted(workers, key=lambda w: w.address)
        if not ordered:
            return []
        start = next(self._counter) % len(ordered)
        return ordered[start:] + ordered[:start]

    def order_decode(self, workers: Sequence[Worker]) -> list[Worker]:
        return self._rotate(workers)

    def order_prefill(self, workers: Sequence[Worker], prompt_token_ids: Sequence[int]) -> list[Worker]:
        return self._rotate(workers)


def prefer_cell(ordered: Sequence[Worker], cell: str, slack: int = CELL_SLACK) -> list[Worker]:
    """Prefill workers `ordered` best first, with the first one of `cell` (the decode
    worker's) moved to the front, so the handoff stays inside the cell (`ipc`), unless it
    is busier than the best by more than `slack` requests. A decode worker in no cell ("")
    leaves the order as it is."""
    ordered = list(ordered)
    mate = next((w for w in ordered if cell and w.cell == cell), None)
    if mate is None or mate is ordered[0] or mate.load() > ordered[0].load() + slack:
        return ordered
    return [mate] + [w for w in ordered if w is not mate]


def prefix_key(token_ids: Sequence[int], block_size: int) -> bytes | None:
    """Hash of the prompt's first full blocks (at most AFFINITY_BLOCKS); None if none is full."""
    num_blocks = min(len(token_ids) // block_size, AFFINITY_BLOCKS)
    if num_blocks == 0:
        return None
    head = token_ids[: num_blocks * block_size]
    return hashlib.blake2b(b"".join(t.to_bytes(4, "little") for t in head), digest_size=16).digest()


def rendezvous_score(key: bytes, address: str) -> int:
    """Highest-random-weight hashing: stable across router replicas and restarts, and
    adding or removing a worker moves only the prefixes that worker gains or loses."""
    digest = hashlib.blake2b(key + address.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


POLICIES = {"load": LoadPolicy, "round-robin": RoundRobinPolicy}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]()
