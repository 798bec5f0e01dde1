"""gRPC options of every Baton channel and server, so that both ends agree on keepalive.

A client pings the server every `Keepalive.time_s` while it has calls open (and, with
`permit_without_calls`, while it has none), and drops the connection when a ping is not
answered within `timeout_s`: that is how the router notices a worker that vanished without
closing its connection (a node lost, a partition) during a long quiet call, such as a
`Decode` stream waiting for its handoff. A gRPC server, by default, accepts at most one ping
every five minutes while it sends nothing and none without calls; a client that pings more
often is answered with GOAWAY `too_many_pings`, which fails every call on the connection.
So the servers here accept what the clients send: `server_options` is derived from the
same `Keepalive` as `channel_options`, and both default to one policy.
"""

from __future__ import annotations

from dataclasses import dataclass

# Large enough for a prompt of a million token ids or a big KV chunk on the gRPC data plane.
MAX_MESSAGE_BYTES = 256 << 20


@dataclass(frozen=True)
class Keepalive:
    """Keepalive pings: a client sends one every `time_s` (gRPC sends at most one a second,
    whatever is asked) and gives up on the connection after `timeout_s` without an answer.
    Servers accept pings up to twice as often as `time_s` (timers drift)."""

    time_s: float = 10.0
    timeout_s: float = 5.0
    permit_without_calls: bool = True  # ping idle connections too: a dead peer is found before a call needs it

    def __post_init__(self) -> None:
        if not self.time_s > 0 or not self.timeout_s > 0:
            raise ValueError(f"keepalive time and timeout must be > 0, got {self.time_s}, {self.timeout_s}")


DEFAULT_KEEPALIVE = Keepalive()


def channel_options(keepalive: Keepalive = DEFAULT_KEEPALIVE) -> list[tuple[str, int]]:
    """Options of a client channel: message limits and `keepalive`'s pings."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        # gRPC stops pinging after two pings without data by default; a quiet call could then
        # outlive its peer unnoticed.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(keepalive: Keepalive = DEFAULT_KEEPALIVE) -> list[tuple[str, int]]:
    """Options of a server whose clients ping as `keepalive` says: message limits, and a
    ping policy that accepts those pings."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive.time_s * 1000) // 2),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
    ]
