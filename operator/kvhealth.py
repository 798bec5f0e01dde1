"""Live KV handoff health, read from the workers' /metrics: the `KVTransferReady` condition.

Every prefill and decode worker exports the handoff metrics of `baton.kvtransfer.metrics`:
`baton:kv_transfer_seconds` (a histogram: its `_count` is the completed handoffs) and
`baton:kv_transfer_failures_total{reason}`, labelled `role`. The prefill side (the sender)
counts every handoff it starts exactly once, completed or failed, so the number started
is read from prefill pods. Both ends count a failed handoff, so failures count by reason,
the larger of the two sides (a reservation that expired unfilled only the decode side
sees). The transport in use is the `transport` label of any
`baton:kv_transfer_*` sample, where workers report one (what an `auto` pair chose);
otherwise the spec's.

The reading tolerates what a worker does not export: a pod that does not answer, or
answers without these families, adds nothing. Pure functions, except `scrape` (HTTP).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from baton.operator.status import Condition

PREFIX = "baton:kv_transfer"
SECONDS = f"{PREFIX}_seconds_count"
FAILURES = f"{PREFIX}_failures_total"
SIDES = ("prefill", "decode")
# The `transport` label of a failure before any data plane was chosen (an expired
# reservation): not a transport in use.
NO_TRANSPORT = "none"
# Failures that say nothing about the data path: a client went away, a worker drains; and
# "aborted", the decode side's echo of a failure whose cause the prefill side counts.
NOT_COUNTED = frozenset({"cancelled", "shutdown", "aborted"})
# More failed handoffs than this share of those started makes the condition False.
MAX_FAILURE_RATE = 0.05
SCRAPE_TIMEOUT_SECONDS = 2.0
# Reasons that judge handoffs that ran; they stand through a window without handoffs.
VERDICTS = ("Healthy", "LayoutMismatch", "HandoffFailures")


@dataclass(frozen=True)
class Side:
    """One side's counters: completed handoffs and failures by reason."""

    completed: float = 0.0
    failures: Mapping[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.completed + sum(self.failures.values())

    def __add__(self, other: Side) -> Side:
        reasons = dict(self.failures)
        for reason, n in other.failures.items():
            reasons[reason] = reasons.get(reason, 0.0) + n
        return Side(self.completed + other.completed, reasons)

    def __sub__(self, before: Side) -> Side:
        return Side(self.completed - before.completed,
                    {r: n - before.failures.get(r, 0.0) for r, n in self.failures.items()
                     if n - before.failures.get(r, 0.0) > 0})

    def went_down(self, before: Side) -> bool:
        return self.completed < before.completed or any(
            self.failures.get(reason, 0.0) < n for reason, n in before.failures.items())


@dataclass(frozen=True)
class Counts:
    """Handoff counters of one pod (cumulative) or of a window (differences).

    Both ends of a failed handoff count it, so the two sides are kept apart: the prefill
    side starts every handoff, and a failure counts once per reason (the larger side).
    """

    prefill: Side = Side()
    decode: Side = Side()
    transports: frozenset[str] = frozenset()

    @property
    def handoffs(self) -> float:
        """Handoffs started: the prefill side's count, else (no prefill pod read) the decode
        side's."""
        return self.prefill.total or self.decode.total

    @property
    def failures(self) -> dict[str, float]:
        """Failed handoffs by reason, those in `NOT_COUNTED` left out."""
        reasons = set(self.prefill.failures) | set(self.decode.failures)
        return {r: max(self.prefill.failures.get(r, 0.0), self.decode.failures.get(r, 0.0))
                for r in sorted(reasons - NOT_COUNTED)}

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.prefill + other.prefill, self.decode + other.decode,
                      self.transports | other.transports)

    def __sub__(self, before: Counts) -> Counts:
        """Counts since `before`; a counter that went down (the pod restarted) counts whole."""
        if self.prefill.went_down(before.prefill) or self.decode.went_down(before.decode):
            return self
        return Counts(self.prefill - before.prefill, self.decode - before.decode,
                      self.transports)


def parse(text: str) -> Counts:
    """The handoff counters in one worker's Prometheus text exposition."""
    completed = dict.fromkeys(SIDES, 0.0)
    failures: dict[str, dict[str, float]] = {side: {} for side in SIDES}
    transports: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(PREFIX):
                continue
            if sample.labels.get("transport") not in (None, "", NO_TRANSPORT) and sample.value > 0:
                transports.add(sample.labels["transport"])
            side = sample.labels.get("role")
            if side not in SIDES:
                continue
            if sample.name == SECONDS:
                completed[side] += sample.value
            elif sample.name == FAILURES:
                reason = sample.labels.get("reason", "unknown")
                failures[side][reason] = failures[side].get(reason, 0.0) + sample.value
    return Counts(*(Side(completed[side], failures[side]) for side in SIDES),
                  frozenset(transports))


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> Counts | None:
    """GET a worker's /metrics and parse it; None when it does not answer in time."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pod URL)
            return parse(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def metrics_urls(pods: Iterable[Mapping]) -> dict[str, str]:
    """Engine -> its /metrics URL, for running pods with an IP: a worker pod's `metrics`
    port (keyed by the pod's name), and each `metrics-<k>` port of a cell's pod (one per
    engine, keyed `POD/metrics-<k>`)."""
    urls = {}
    for pod in pods:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ip:
            continue
        host = f"[{ip}]" if ":" in ip else ip
        name = pod["metadata"]["name"]
        for container in (pod.get("spec") or {}).get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    urls[name] = f"http://{host}:{port['containerPort']}/metrics"
                elif (port.get("name") or "").startswith("metrics-"):
                    urls[f"{name}/{port['name']}"] = f"http://{host}:{port['containerPort']}/metrics"
    return urls


def window(now: Mapping[str, Counts], before: Mapping[str, Counts] | None) -> Counts:
    """Summed counts since `before` (per pod; pods new since then count whole)."""
    total = Counts()
    for pod, counts in now.items():
        total = total + (counts - before[pod] if before and pod in before else counts)
    return total


def condition(recent: Counts, ever: Counts, spec_transport: str, pods_read: int,
              seconds: float | None, previous: Condition | None = None,
              pods: int | None = None) -> tuple[Condition, dict]:
    """`KVTransferReady` and `status.kvTransfer` from the counts of a window.

    `recent` are the counts of the last `seconds` (None: since the workers started),
    `ever` the cumulative counts, `pods_read` how many of the `pods` running worker pods
    answered (a verdict read from fewer says so). A window without handoffs tells nothing
    new: the `previous` verdict on handoffs stands (failing handoffs stay reported until
    handoffs succeed again).
    """
    transport = ",".join(sorted(recent.transports | ever.transports)) or spec_transport
    failed = {r: n for r, n in recent.failures.items() if n > 0}
    started = max(recent.handoffs, sum(failed.values()))
    report = {"transport": transport, "handoffs": int(started),
              "failures": int(sum(failed.values())),
              "layoutMismatches": int(failed.get("layout_mismatch", 0))}
    if pods_read == 0:
        return Condition("KVTransferReady", None, "NoMetrics",
                         "no prefill or decode pod answered on its metrics port yet"), report
    since = f"in the last {seconds:.0f}s" if seconds else "since the workers started"
    if started == 0 and previous is not None and previous.reason in VERDICTS:
        return previous, report
    state = _verdict(ever, transport, since, failed, started)
    if pods is not None and pods_read < pods:
        state = Condition(state.type, state.status, state.reason,
                          f"{state.message} (read from {pods_read} of {pods} worker pods; "
                          "the others did not answer on their metrics port)")
    return state, report


def _verdict(ever: Counts, transport: str, since: str, failed: Mapping[str, float],
             started: float) -> Condition:
    """The condition for a window with `started` handoffs, `failed` of them by reason."""
    n_failed = sum(failed.values())
    if failed.get("layout_mismatch"):
        return Condition("KVTransferReady", False, "LayoutMismatch", (
            f"{failed['layout_mismatch']:.0f} handoffs {since} failed because the prefill and "
            "decode KV layouts differ (model, KV heads, head size, block size or dtype): give "
            "both roles the same model, model.dtype, engine.blockSize and KV flags in "
            "engine.extraArgs, and run the same worker image on both"))
    if started == 0:
        if ever.handoffs:
            return Condition("KVTransferReady", True, "Idle",
                             f"no handoffs {since}; transport {transport}")
        return Condition("KVTransferReady", None, "NoHandoffsYet",
                         f"no KV handoff has run yet; transport {transport}")
    if n_failed / started > MAX_FAILURE_RATE:
        reasons = ", ".join(f"{r} {n:.0f}" for r, n in sorted(failed.items(), key=lambda x: -x[1]))
        return Condition("KVTransferReady", False, "HandoffFailures", (
            f"{n_failed:.0f} of {started:.0f} handoffs {since} failed ({reasons}) over "
            f"{transport}: see docs/operator.md for each reason; the worker logs name the "
            "peer"))
    return Condition("KVTransferReady", True, "Healthy",
                     f"{started:.0f} handoffs {since}, {n_failed:.0f} failed, over {transport}")
