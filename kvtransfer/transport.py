"""The data plane behind one small interface, implementations picked by name.

`grpc` (grpc_transport.py): host-staged, chunked, checksummed streaming over the decode
worker's own gRPC port; works between any two hosts. `ucx` (ucx_transport.py): UCXX, zero-copy
for CUDA buffers (CUDA IPC over NVLink in a node, RDMA across nodes), TCP for host memory.
UCX is imported only when `ucx` is chosen.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

_IMPLS = {
    "grpc": ("baton.kvtransfer.grpc_transport", "GrpcSender", "GrpcReceiver"),
    "ucx": ("baton.kvtransfer.ucx_transport", "UcxSender", "UcxReceiver"),
}


class SenderTransport(ABC):
    """The prefill side of a data plane. One per `KVSender`; `send` runs concurrently."""

    name: str

    @abstractmethod
    async def send(self, ticket, rows, src_block_ids: list[int], header) -> None:
        """Move the bytes of `rows[src_block_ids]` into the ticket's blocks, then have the
        decode side verify them and take the first token (`header.first_token`).

        Returns only once the decode side confirmed the handoff. Raises HandoffError
        (`from_peer=True` when the decode side reported it, having failed its end already).
        Cancellation (the sender's timeout) must leave no transfer running."""

    async def close(self) -> None:
        """Drop connections; the sender sends nothing more."""
        return None


class ReceiverTransport(ABC):
    """The decode side of a data plane: feeds a `KVReceiver` through its transport API
    (`begin`, `writing`, `complete`, `fail`)."""

    name: str

    async def start(self, advertise_host: str, port: int) -> str:
        """Start listening if the transport has its own listener; returns its address."""
        return ""

    async def stop(self) -> None:
        """Stop listening and end the transfers in flight."""
        return None


def _load(name: str):
    if name not in _IMPLS:
        raise ValueError(f"unknown KV transport {name!r}; one of {sorted(_IMPLS)}")
    module, sender, receiver = _IMPLS[name]
    mod = importlib.import_module(module)
    return getattr(mod, sender), getattr(mod, receiver)


def create_sender(name: str, config) -> SenderTransport:
    return _load(name)[0](config)


def create_receiver(name: str, receiver) -> ReceiverTransport:
    return _load(name)[1](receiver)
