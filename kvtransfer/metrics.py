"""Prometheus metrics of KV handoffs, shared by every sender and receiver on a registry.

`baton:kv_transfer_seconds` (histogram), `baton:kv_transfer_bytes_total`,
`baton:kv_transfer_failures_total{reason}` and the gauge `baton:kv_transfer_reserved_blocks`
(reserved blocks not yet filled), each labelled `model_name` and `role` (prefill: sender,
decode: receiver). Metrics are created once per registry, so several components (or tests)
in one process share them instead of colliding.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model_name", "role")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0, 10.0, 30.0)


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.seconds = Histogram(
            "baton:kv_transfer_seconds", "Duration of completed KV handoffs.",
            LABELS, buckets=SECONDS_BUCKETS, registry=registry)
        self.bytes = Counter(
            "baton:kv_transfer_bytes", "KV bytes moved by completed handoffs.", LABELS,
            registry=registry)
        self.failures = Counter(
            "baton:kv_transfer_failures", "Failed KV handoffs by reason.", (*LABELS, "reason"),
            registry=registry)
        self.reserved = Gauge(
            "baton:kv_transfer_reserved_blocks", "KV blocks reserved for handoffs and not yet filled.",
            LABELS, registry=registry)


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


class TransferMetrics:
    """The metrics of one component (`role` "prefill" or "decode") of one model."""

    def __init__(self, model_name: str, role: str, registry: CollectorRegistry | None = None):
        registry = REGISTRY if registry is None else registry
        with _lock:
            fam = _by_registry.get(registry)
            if fam is None:
                fam = _by_registry[registry] = _Families(registry)
        labels = {"model_name": model_name, "role": role}
        self._fam, self._labels = fam, labels
        self.seconds = fam.seconds.labels(**labels)
        self.bytes = fam.bytes.labels(**labels)

    def set_reserved_blocks(self, n: int) -> None:
        """The decode side's gauge of reserved, not yet filled blocks."""
        self._fam.reserved.labels(**self._labels).set(n)

    def completed(self, num_bytes: int, seconds: float) -> None:
        self.seconds.observe(seconds)
        self.bytes.inc(num_bytes)

    def failed(self, reason: str) -> None:
        self._fam.failures.labels(**self._labels, reason=reason).inc()
