"""The one error a handoff ends in: `HandoffError(reason, message)`.

`reason` is a short machine-readable word (also the `reason` label of
`baton:kv_transfer_failures_total`); `message` tells a person what happened and what to do.
Both ends of a failed handoff raise it, each with the reason as seen from its side.
"""

from __future__ import annotations

# Every reason a handoff can fail with. Keep in sync with docs/decisions.md, "KV transfer".
REASONS = {
    "layout_mismatch": "the two engines' KV layouts differ (model, shape, block size or dtype)",
    "expired": "the reservation was not filled before its expiry",
    "cancelled": "the decode side cancelled the reservation",
    "aborted": "the sender gave up and told the decode side",
    "unknown_ticket": "the decode side has no such reservation",
    "busy": "another sender is already filling this reservation",
    "bad_request": "the handoff does not match its reservation",
    "checksum": "a chunk arrived corrupted",
    "peer_lost": "the other side went away mid-handoff",
    "timeout": "the other side did not answer in time",
    "no_capacity": "the decode side has no free KV blocks for the reservation",
    "transport_unavailable": "the transport the ticket names cannot be used here",
    "transport": "the data plane failed",
    "shutdown": "this side is shutting down",
}


class HandoffError(Exception):
    """A KV handoff failed. `reason` is one of `REASONS`; the message says what to do."""

    def __init__(self, reason: str, message: str = "", from_peer: bool = False, nothing_sent: bool = False):
        if reason not in REASONS:
            raise ValueError(f"unknown handoff failure reason {reason!r}")
        self.reason = reason
        self.message = message or REASONS[reason]
        # True when the other side reported it (it has already failed its end).
        self.from_peer = from_peer
        # True when it failed before this side sent anything (no connection to the data
        # plane's listener): the reservation is untouched and another transport may fill it.
        self.nothing_sent = nothing_sent
        super().__init__(f"{reason}: {self.message}")

    def __reduce__(self):
        return (HandoffError, (self.reason, self.message, self.from_peer, self.nothing_sent))

    def to_proto(self):
        from baton.protos import common_pb2

        return common_pb2.Error(reason=self.reason, message=self.message)

    @classmethod
    def from_proto(cls, msg, peer: str = "the peer") -> HandoffError:
        reason = msg.reason if msg.reason in REASONS else "transport"
        return cls(reason, f"{peer}: {msg.message}", from_peer=True)


class LayoutMismatchError(HandoffError):
    """Two KV layouts differ; `field` names the first differing field."""

    def __init__(self, field: str, ours, theirs, message: str = ""):
        self.field, self.ours, self.theirs = field, ours, theirs
        super().__init__(
            "layout_mismatch",
            message
            or f"KV layouts differ in {field}: {ours!r} here, {theirs!r} at the peer; "
            "prefill and decode workers must serve the same model with the same block size, dtype and "
            "KV-cache dtype (--kv-cache-dtype)",
        )

    def __reduce__(self):
        return (LayoutMismatchError, (self.field, self.ours, self.theirs, self.message))
