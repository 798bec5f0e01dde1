"""OpenTelemetry traces from a real `baton up`, received by an OTLP/gRPC collector that the
test runs itself (opentelemetry-proto's TraceService over real gRPC): one trace per
request, joined across the router (request, queueing), the prefill worker (prefill, KV
transfer) and the decode worker (reserve, decode), under the client's W3C `traceparent`
when it sends one."""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from serving_harness import baton_up, free_port, wait_until


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service.name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> dict[tuple[str, str], object]:
        """{(service, span name): span} of one trace."""
        with self.lock:
            return {(service, span.name): span for service, span in self.spans
                    if span.trace_id == trace_id}


@pytest.fixture(scope="module")
def traced(tiny_model_cache):
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    dep = baton_up("--mode", "disaggregated", "--otlp-traces-endpoint", f"127.0.0.1:{port}")
    yield dep, collector
    dep.stop()
    server.stop(grace=None)


def complete(dep, headers: dict[str, str]) -> None:
    answer = httpx.post(f"{dep.url}/v1/completions", headers=headers, timeout=60, json={
        "model": dep.model, "prompt": "Hello, world! How are you today?", "max_tokens": 4})
    assert answer.status_code == 200, answer.text


def tree(spans: dict) -> list[tuple[str, str, str, str]]:
    return [(*key, s.span_id.hex(), s.parent_span_id.hex()) for key, s in spans.items()]


EXPECTED = {("baton-router", "POST /v1/completions"), ("baton-router", "queue"),
            ("baton-decode", "reserve"),
            ("baton-prefill", "prefill"), ("baton-prefill", "kv_transfer"),
            ("baton-decode", "decode")}


def test_one_trace_joins_router_prefill_kv_transfer_and_decode_under_the_clients_parent(traced):
    dep, collector = traced
    trace_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8)
    complete(dep, {"traceparent": f"00-{trace_id.hex()}-{parent_id.hex()}-01"})
    spans = wait_until(lambda: (lambda t: t if EXPECTED <= set(t) else None)(
        collector.trace(trace_id)), timeout=60, what="the request's spans from every process")
    router = spans["baton-router", "POST /v1/completions"]
    assert router.parent_span_id == parent_id  # the client's span is the router's parent
    by_id = {span.span_id: key for key, span in spans.items()}

    def ancestors(key: tuple[str, str]) -> list[tuple[str, str]]:
        chain = []
        while spans[key].parent_span_id in by_id:
            key = by_id[spans[key].parent_span_id]
            chain.append(key)
        return chain

    # Each worker call hangs under the router's request span (FastAPI adds its own spans
    # in between, the router its queueing), joined over the gRPC metadata.
    for key in (("baton-decode", "reserve"), ("baton-prefill", "prefill"),
                ("baton-decode", "decode")):
        chain = ancestors(key)
        assert chain and chain[0][0] == "baton-router", (key, tree(spans))
        assert chain[-1] == ("baton-router", "POST /v1/completions"), (key, tree(spans))
    assert ancestors(("baton-prefill", "kv_transfer"))[0] == ("baton-prefill", "prefill")
    # The router queues until a decode worker reserved the KV: the reserve call waits in it.
    assert ancestors(("baton-decode", "reserve"))[0] == ("baton-router", "queue")
    # The handoff happens inside the prefill call; decode outlives both.
    prefill, kv = spans["baton-prefill", "prefill"], spans["baton-prefill", "kv_transfer"]
    assert prefill.start_time_unix_nano <= kv.start_time_unix_nano <= kv.end_time_unix_nano
    assert kv.end_time_unix_nano <= prefill.end_time_unix_nano


def test_a_request_without_traceparent_starts_its_own_trace(traced):
    dep, collector = traced
    complete(dep, {})

    def new_root() -> object | None:
        with collector.lock:
            roots = [s for service, s in collector.spans
                     if service == "baton-router" and not s.parent_span_id]
        for root in roots:
            if {("baton-prefill", "prefill"), ("baton-decode", "decode")} <= set(
                    collector.trace(root.trace_id)):
                return root
        return None

    wait_until(new_root, timeout=60, what="a root span with its workers' spans")


def test_polls_make_no_spans(traced):
    """/health, /ready and /metrics (a load balancer's and Prometheus' polls) and the router's
    polls of its workers are not traced: only requests to /v1/ and the worker calls they make."""
    dep, collector = traced
    for path in ("/health", "/ready", "/metrics") * 3:
        httpx.get(f"{dep.url}{path}", timeout=30)
    trace_id = secrets.token_bytes(16)
    complete(dep, {"traceparent": f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"})
    # Spans are exported in the order they end: once this request's are in, the polls' are too.
    wait_until(lambda: EXPECTED <= set(collector.trace(trace_id)), timeout=60, what="the request's spans")
    with collector.lock:
        names = {(service, span.name) for service, span in collector.spans}
        paths = {a.value.string_value for _, span in collector.spans for a in span.attributes
                 if a.key == "url.path"}
    assert all(path.startswith("/v1/") for path in paths), paths
    polls = {(service, name) for service, name in names
             if any(word in name for word in ("/health", "/ready", "/metrics", "Stats", "Info", "Health"))}
    assert not polls, names
