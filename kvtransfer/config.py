"""`TransferConfig`: the knobs of the KV-transfer layer, typed and frozen, one place."""

from __future__ import annotations

from dataclasses import dataclass

from baton.rpc import Keepalive

UCX_PROGRESS_MODES = ("thread", "thread-polling", "polling", "blocking")


@dataclass(frozen=True)
class TransferConfig:
    # gRPC data plane: the stream is cut into chunks, each with its own CRC-32; the sender
    # keeps at most `window_chunks` chunks unacknowledged (back-pressure from the
    # receiver's copies, on top of HTTP/2 flow control). A chunk must fit the receiving
    # server's max_receive_message_length (gRPC's default is 4 MiB; Baton's workers raise it).
    chunk_bytes: int = 1 << 20
    window_chunks: int = 8
    # UCX data plane: a handoff whose source and destination blocks form at most this many
    # regions that are contiguous at both ends is sent one message per region, zero-copy;
    # otherwise the sender gathers the blocks into one staging buffer and the receiver
    # scatters them (one device copy each) so that one message moves everything.
    max_direct_messages: int = 8
    # Split UCX messages larger than this (0: never). Large messages are fastest.
    max_message_bytes: int = 0
    # UCX endpoints (or TCP connections) a sender keeps open to one decode worker (handoffs
    # beyond wait).
    max_endpoints_per_peer: int = 16
    # UCXX progress mode of this process ("thread", "thread-polling", "polling", "blocking");
    # None: UCXX's default or $UCXPY_PROGRESS_MODE. Fixed by the first UCX user in a process.
    ucx_progress_mode: str | None = None
    # TCP data plane: bytes go out in chunks of this size; device pools are staged through
    # two pinned host buffers of this size per connection (copy of one chunk overlaps the
    # socket work of the other).
    tcp_chunk_bytes: int = 8 << 20
    # Sender: the whole handoff (connect, data, verification) must finish within this.
    push_timeout_s: float = 30.0
    # Sender: how long telling the decode worker that a push failed may take.
    abort_timeout_s: float = 2.0
    # Threads that copy and checksum chunks on each side.
    copy_threads: int = 4
    # Pings on the gRPC channels to decode workers (baton/rpc.py: the same on every end).
    keepalive: Keepalive = Keepalive()

    def __post_init__(self):
        for name in ("chunk_bytes", "tcp_chunk_bytes"):
            if not 4096 <= getattr(self, name) <= 256 << 20:
                raise ValueError(f"{name} must be in [4 KiB, 256 MiB], got {getattr(self, name)}")
        for name in ("window_chunks", "max_direct_messages", "max_endpoints_per_peer", "copy_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ucx_progress_mode not in (None, *UCX_PROGRESS_MODES):
            raise ValueError(f"unknown ucx_progress_mode {self.ucx_progress_mode!r}")
        if self.max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {self.max_message_bytes}")
        if self.push_timeout_s <= 0 or self.abort_timeout_s <= 0:
            raise ValueError("push_timeout_s and abort_timeout_s must be > 0")
