"""Prometheus metrics of KV handoffs, shared by every sender and receiver on a registry.

Per handoff, labelled `model_name`, `role` (prefill: sender, decode: receiver) and
`transport` (the data plane that moved the bytes: grpc, tcp, ipc or ucx; `none` for a
failure before one started, such as an unfilled reservation's expiry or a bad ticket):

- `baton:kv_transfer_seconds` (histogram): duration of completed handoffs;
- `baton:kv_transfer_handoff_bytes` (histogram): size of completed handoffs;
- `baton:kv_transfer_bytes_total`: KV bytes moved by completed handoffs;
- `baton:kv_transfer_failures_total{reason}`: failed handoffs by reason.

And `baton:kv_transfer_reserved_blocks` (gauge, `model_name` and `role`): reserved blocks
not yet filled. The count of a histogram by `transport` is which path the handoffs took
(what an `auto` worker chose). Metrics are created once per registry, so several components
(or tests) in one process share them instead of colliding.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter as Tally

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model_name", "role")
HANDOFF_LABELS = (*LABELS, "transport")
NO_TRANSPORT = "none"
SECONDS_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0, 10.0, 30.0)
# 64 KiB to 4 GiB by powers of 4 (a token of an 8B model's KV is 128 KiB in bf16).
BYTES_BUCKETS = tuple(float(1 << (16 + 2 * i)) for i in range(9))


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.seconds = Histogram(
            "baton:kv_transfer_seconds", "Duration of completed KV handoffs.",
            HANDOFF_LABELS, buckets=SECONDS_BUCKETS, registry=registry)
        self.sizes = Histogram(
            "baton:kv_transfer_handoff_bytes", "Size of completed KV handoffs in bytes.",
            HANDOFF_LABELS, buckets=BYTES_BUCKETS, registry=registry)
        self.bytes = Counter(
            "baton:kv_transfer_bytes", "KV bytes moved by completed handoffs.", HANDOFF_LABELS,
            registry=registry)
        self.failures = Counter(
            "baton:kv_transfer_failures", "Failed KV handoffs by reason.", (*HANDOFF_LABELS, "reason"),
            registry=registry)
        self.reserved = Gauge(
            "baton:kv_transfer_reserved_blocks", "KV blocks reserved for handoffs and not yet filled.",
            LABELS, registry=registry)


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


class TransferMetrics:
    """The metrics of one component (`role` "prefill" or "decode") of one model.

    Also keeps plain tallies of its own handoffs (`completed_by_transport`,
    `failed_by_reason`, `last_transport`) for callers that report them without Prometheus."""

    def __init__(self, model_name: str, role: str, registry: CollectorRegistry | None = None):
        registry = REGISTRY if registry is None else registry
        with _lock:
            fam = _by_registry.get(registry)
            if fam is None:
                fam = _by_registry[registry] = _Families(registry)
        self._fam, self._labels = fam, {"model_name": model_name, "role": role}
        self.completed_by_transport: Tally[str] = Tally()
        self.failed_by_reason: Tally[str] = Tally()
        self.last_transport = ""

    def set_reserved_blocks(self, n: int) -> None:
        """The decode side's gauge of reserved, not yet filled blocks."""
        self._fam.reserved.labels(**self._labels).set(n)

    def completed(self, transport: str, num_bytes: int, seconds: float) -> None:
        labels = {**self._labels, "transport": transport}
        self._fam.seconds.labels(**labels).observe(seconds)
        self._fam.sizes.labels(**labels).observe(num_bytes)
        self._fam.bytes.labels(**labels).inc(num_bytes)
        self.completed_by_transport[transport] += 1
        self.last_transport = transport

    def failed(self, reason: str, transport: str | None = None) -> None:
        self._fam.failures.labels(**self._labels, transport=transport or NO_TRANSPORT, reason=reason).inc()
        self.failed_by_reason[reason] += 1
