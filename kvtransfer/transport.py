"""The data plane behind one small interface, implementations picked by name.

`grpc` (grpc_transport.py): host-staged, chunked, checksummed streaming over the decode
worker's own gRPC port; works between any two hosts, slowly. `tcp` (tcp_transport.py):
host-staged raw bytes on a dedicated TCP connection per pair, near what the link moves.
`ipc` (ipc_transport.py): the prefill engine copies straight into the decode engine's pool,
mapped through CUDA IPC (or shared memory on CPU) between processes on one node. `ucx`
(ucx_transport.py): UCXX, zero-copy for CUDA buffers (CUDA IPC in a node, RDMA across
nodes). UCX is imported only when `ucx` is chosen. `auto` is no data plane of its own: the
sender picks one per ticket (`candidates`).
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod

_IMPLS = {
    "grpc": ("baton.kvtransfer.grpc_transport", "GrpcSender", "GrpcReceiver"),
    "ucx": ("baton.kvtransfer.ucx_transport", "UcxSender", "UcxReceiver"),
    "tcp": ("baton.kvtransfer.tcp_transport", "TcpSender", "SocketReceiver"),
    "ipc": ("baton.kvtransfer.ipc_transport", "IpcSender", None),
}
# What `auto` tries, fastest first (docs/decisions.md, "KV transfer").
AUTO_ORDER = ("ipc", "ucx", "tcp", "grpc")


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


def candidates(ticket, allowed: tuple[str, ...]) -> list[str]:
    """The data planes a sender tries for `ticket`, in order.

    A ticket that names a transport gets that one. An `auto` ticket gets every transport
    the decode worker offers and this sender may use, fastest first: `ipc` when the ticket
    has an `ipc_domain` (the sender checks that it is its own), `ucx` when it has a UCX
    address, `tcp` when it has a TCP address, and `grpc` always. The sender moves on to the
    next one only when a transport is unavailable before any byte moved."""
    if ticket.transport != "auto":
        return [ticket.transport]
    offered = {"ipc": bool(ticket.ipc_domain and ticket.tcp_address), "ucx": bool(ticket.ucx_address),
               "tcp": bool(ticket.tcp_address), "grpc": True}
    return [name for name in AUTO_ORDER if offered[name] and name in allowed]


def sender_transports(flag: str) -> tuple[str, ...]:
    """The data planes a prefill worker started with `--kv-transfer flag` may use: the one
    it names (and grpc, which every decode worker serves), or with `auto` all of them."""
    return ("grpc", "tcp", "ipc", "ucx") if flag == "auto" else tuple(dict.fromkeys(("grpc", flag)))


def ucx_for_auto() -> bool:
    """Whether an `auto` decode worker opens a UCX listener: only where UCX loads and the
    node has an RDMA device. Without RDMA, UCX between pods moves bytes over TCP, which the
    `tcp` transport does as well, and within a node `ipc` covers CUDA IPC."""
    try:
        if not os.listdir("/sys/class/infiniband"):
            return False
        importlib.import_module("ucxx")
    except (OSError, ImportError):
        return False
    return True


def _load(name: str):
    if name not in _IMPLS:
        raise ValueError(f"unknown KV transport {name!r}; one of {sorted(_IMPLS)}")
    module, sender, receiver = _IMPLS[name]
    mod = importlib.import_module(module)
    return getattr(mod, sender), receiver and getattr(mod, receiver)


def create_sender(name: str, config) -> SenderTransport:
    return _load(name)[0](config)


def create_receiver(name: str, receiver) -> ReceiverTransport:
    """The listener of a data plane (`ipc` has none: it uses the `tcp` listener's)."""
    return _load(name)[1](receiver)
