"""Prometheus metrics of the workers and the router (listed in docs/metrics.md); no torch here.

Names follow vLLM's with the `baton:` prefix; every series carries `model_name` and `role`
(prefill, decode, colocated or router). Those with a vLLM counterpart are served under vLLM's
name too (`VLLM_NAMES`, applied by `WithVllmNames` where /metrics is written), so dashboards and
alerts written for vLLM work unchanged. Request latencies are histograms observed where a
request ends; engine state (running, waiting, KV usage, prefix cache and token totals) is
read from the engine at scrape time by `EngineCollector`, so a scrape never sees stale
numbers. `kv_transfer_*` metrics are defined by `baton.kvtransfer` on the same registry.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LABELS = ("model_name", "role")

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 40.0, 50.0, 60.0, 120.0, 300.0)

# Baton's metric family -> the vLLM names it is also served under: the same samples and labels,
# one collection. Two names where vLLM renamed a metric and both are still in use.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "baton:time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "baton:time_per_output_token_seconds": ("vllm:time_per_output_token_seconds",),
    "baton:e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "baton:request_success": ("vllm:request_success",),
    "baton:num_requests_running": ("vllm:num_requests_running",),
    "baton:num_requests_waiting": ("vllm:num_requests_waiting",),
    "baton:kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "baton:prefix_cache_queries": ("vllm:prefix_cache_queries",),
    "baton:prefix_cache_hits": ("vllm:prefix_cache_hits",),
    "baton:prefix_cache_hit_rate": ("vllm:gpu_prefix_cache_hit_rate",),
    "baton:num_preemptions": ("vllm:num_preemptions",),
    "baton:prompt_tokens": ("vllm:prompt_tokens",),
    "baton:generation_tokens": ("vllm:generation_tokens",),
    "baton:spec_decode_num_drafts": ("vllm:spec_decode_num_drafts",),
    "baton:spec_decode_num_draft_tokens": ("vllm:spec_decode_num_draft_tokens",),
    "baton:spec_decode_num_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens",),
}


class RequestMetrics:
    """Latency histograms and token counters observed per finished request."""

    def __init__(self, model_name: str, role: str, registry: CollectorRegistry = REGISTRY,
                 count_tokens: bool = False):
        labels = {"model_name": model_name, "role": role}
        self.ttft = Histogram(
            "baton:time_to_first_token_seconds", "Time from request arrival to its first token.",
            LABELS, buckets=TTFT_BUCKETS, registry=registry).labels(**labels)
        self.tpot = Histogram(
            "baton:time_per_output_token_seconds", "Mean time between output tokens, per request.",
            LABELS, buckets=TPOT_BUCKETS, registry=registry).labels(**labels)
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds", "Time from request arrival to its last token.",
            LABELS, buckets=E2E_BUCKETS, registry=registry).labels(**labels)
        self.success = Counter(
            "baton:request_success", "Finished requests by finish reason.",
            (*LABELS, "finished_reason"), registry=registry)
        self._labels = labels
        # Workers report token totals from the engine (EngineCollector); the router counts
        # what it serves.
        self.prompt_tokens = self.generation_tokens = None
        if count_tokens:
            self.prompt_tokens = Counter(
                "baton:prompt_tokens", "Prompt tokens of served requests.", LABELS,
                registry=registry).labels(**labels)
            self.generation_tokens = Counter(
                "baton:generation_tokens", "Generated tokens of served requests.", LABELS,
                registry=registry).labels(**labels)

    def observe(self, arrival: float, first_token: float | None, end: float, num_output_tokens: int,
                finish_reason: str | None, num_prompt_tokens: int = 0) -> None:
        """Record one finished request (times in seconds on one clock)."""
        if first_token is not None:
            self.ttft.observe(max(0.0, first_token - arrival))
            if num_output_tokens > 1:
                self.tpot.observe(max(0.0, (end - first_token) / (num_output_tokens - 1)))
        self.e2e.observe(max(0.0, end - arrival))
        self.success.labels(**self._labels, finished_reason=finish_reason or "unknown").inc()
        if self.prompt_tokens is not None:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.generation_tokens.inc(num_output_tokens)


class EngineCollector(Collector):
    """Engine gauges and counters, read at scrape time.

    `snapshot()` returns an object with EngineStats' fields (baton.engine.llm_engine) or
    None when the engine cannot answer right now; it runs on the scrape thread.
    """

    def __init__(self, snapshot: Callable[[], Any], model_name: str, role: str):
        self._snapshot = snapshot
        self._label_values = [model_name, role]

    def describe(self):
        # Without describe(), registering would call collect() (and the engine) at once.
        return []

    def collect(self):
        try:
            stats = self._snapshot()
        except Exception:  # a scrape must not fail because the engine is busy or stopping
            log.debug("engine stats unavailable", exc_info=True)
            stats = None
        if stats is None:
            return
        lv = self._label_values

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(lv, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(lv, value)
            return family

        yield gauge("baton:num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("baton:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("baton:kv_cache_usage_perc",
                    "Share of KV blocks in use, 0..1 (requests and reservations).", stats.kv_cache_usage)
        yield counter("baton:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("baton:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)
        yield gauge("baton:prefix_cache_hit_rate", "Prefix cache hits / queries since start, 0..1 (0 before any).",
                    stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0)
        yield counter("baton:num_preemptions", "Running sequences preempted for KV room (recomputed later).",
                      stats.num_preemptions)
        yield counter("baton:prompt_tokens", "Prompt tokens this engine computed or admitted.",
                      stats.prompt_tokens_total)
        yield counter("baton:generation_tokens", "Tokens this engine generated.",
                      stats.generation_tokens_total)
        if getattr(stats, "lora", None) is not None:  # LoRAStats with --enable-lora
            yield from _lora_metrics(stats.lora, lv, counter, gauge)
        if getattr(stats, "spec_num_drafts", None) is not None:  # speculative decoding is on
            yield from _spec_decode_metrics(stats, counter, gauge)


def _spec_decode_metrics(stats: Any, counter: Callable, gauge: Callable):
    drafts, drafted, accepted = stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens
    yield counter("baton:spec_decode_num_drafts", "Verify rounds: a sequence's drafts checked in one step.", drafts)
    yield counter("baton:spec_decode_num_draft_tokens", "Drafted tokens verified.", drafted)
    yield counter("baton:spec_decode_num_accepted_tokens", "Drafted tokens accepted.", accepted)
    yield gauge("baton:spec_decode_acceptance_rate", "Accepted / drafted tokens since start (0 before any).",
                accepted / drafted if drafted else 0.0)
    yield gauge("baton:spec_decode_mean_accepted_length",
                "Tokens a verify round emits on average since start: 1 + accepted / rounds (0 before any).",
                1.0 + accepted / drafts if drafts else 0.0)


def _lora_metrics(lora: Any, lv: list[str], counter: Callable, gauge: Callable):
    yield gauge("baton:lora_adapters_resident", "LoRA adapters in GPU slots.", len(lora.resident))
    yield gauge("baton:lora_adapters_reading", "LoRA adapters being read from disk (requests naming them wait).",
                len(lora.reading))
    yield counter("baton:lora_loads", "LoRA adapters copied from host memory into a GPU slot.", lora.loads)
    yield counter("baton:lora_disk_loads", "LoRA adapter directories read into host memory.", lora.disk_loads)
    yield counter("baton:lora_evictions", "LoRA adapters evicted from a GPU slot.", lora.evictions)
    per_adapter = CounterMetricFamily("baton:lora_requests", "Requests added, per LoRA adapter.",
                                      labels=(*LABELS, "lora_name"))
    for name, count in sorted(lora.requests.items()):
        per_adapter.add_metric([*lv, name], count)
    yield per_adapter


class RouterGauges(Collector):
    """The router's own state: requests in flight, streams admitted but not yet started, and
    its dispatch counters (failovers; where disaggregated prompts were prefilled; KV handoffs
    inside a cell or across)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], model_name: str,
                 failovers: Callable[[], int] = lambda: 0,
                 prefill_decisions: Callable[[], dict[str, int]] = dict,
                 handoff_pairings: Callable[[], dict[str, int]] = dict):
        self._running, self._waiting = running, waiting
        self._failovers, self._prefill_decisions = failovers, prefill_decisions
        self._handoff_pairings = handoff_pairings
        self._lv = [model_name, "router"]

    def describe(self):
        return []

    def collect(self):
        for name, doc, fn in (
            ("baton:num_requests_running", "Requests the router is serving.", self._running),
            ("baton:num_requests_waiting", "Output streams admitted whose first token has not arrived yet.", self._waiting),
        ):
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self._lv, fn())
            yield family
        failovers = CounterMetricFamily(
            "baton:router_failovers", "Output streams resumed on another worker after theirs was lost.",
            labels=LABELS)
        failovers.add_metric(self._lv, self._failovers())
        yield failovers
        decisions = CounterMetricFamily(
            "baton:router_prefill_decisions",
            "Disaggregated output streams by where their prompt was prefilled.", labels=(*LABELS, "decision"))
        for decision, count in self._prefill_decisions().items():
            decisions.add_metric([*self._lv, decision], count)
        yield decisions
        pairings = CounterMetricFamily(
            "baton:router_kv_handoffs",
            "Completed KV handoffs by pairing: same_cell (prefill and decode worker in one cell) or cross_cell.",
            labels=(*LABELS, "pairing"))
        for pairing, count in self._handoff_pairings().items():
            pairings.add_metric([*self._lv, pairing], count)
        yield pairings


class WithVllmNames:
    """A view of `registry` for exposition: each of its families, followed by a copy under
    every vLLM name `VLLM_NAMES` gives it (same samples, only the name changes)."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        for family in self._registry.collect():
            yield family
            for alias in VLLM_NAMES.get(family.name, ()):
                copy = Metric(alias, family.documentation, family.type, family.unit)
                copy.samples = [s._replace(name=alias + s.name[len(family.name):]) for s in family.samples]
                yield copy

    def restricted_registry(self, names):
        """The `?name[]=` filter of make_wsgi_app, over both names of each sample."""
        return _Restricted(self, frozenset(names))


class Merged:
    """Several registries as one, for exposition: families of one name in more than one of
    them (the router's `baton:num_requests_running` and the engine's, in an in-process
    `baton serve`) become one family holding every series, as the text format needs (one
    HELP and TYPE line per name); their `role` labels keep the series apart."""

    def __init__(self, *registries: CollectorRegistry):
        self._registries = registries

    def collect(self):
        families: dict[str, Metric] = {}
        for registry in self._registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples.extend(family.samples)
        yield from families.values()


class _Restricted:
    def __init__(self, view: WithVllmNames, names: frozenset[str]):
        self._view, self._names = view, names

    def collect(self):
        for family in self._view.collect():
            samples = [s for s in family.samples if s.name in self._names]
            if samples:
                copy = Metric(family.name, family.documentation, family.type, family.unit)
                copy.samples = samples
                yield copy


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the worker's log


def start_metrics_server(port: int, host: str = "0.0.0.0",
                         registry: CollectorRegistry = REGISTRY) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on http://host:port/metrics from a daemon thread, always in the
    Prometheus text format 0.0.4; returns (server, thread) as `start_http_server` does.

    Not OpenMetrics, which a Prometheus asks for first: prometheus_client writes OpenMetrics
    sample names with `:` replaced by `_` (their HELP and TYPE lines keep it), so Prometheus
    would store `baton_num_requests_running` where every query, adapter rule and dashboard
    panel selects `baton:num_requests_running`. The router serves text 0.0.4 as well.
    """
    app = make_wsgi_app(WithVllmNames(registry))

    def text_format(environ: dict, start_response: Callable) -> Any:
        return app({**environ, "HTTP_ACCEPT": "text/plain; version=0.0.4"}, start_response)

    family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(sockaddr[0], port, text_format, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
