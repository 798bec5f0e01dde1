"""OpenTelemetry traces of a request's walk, exported over OTLP/gRPC (`--otlp-traces-endpoint`).

One trace per HTTP request: the router's span (`POST /v1/...`, the parent a client sent
in a W3C `traceparent` header, if any) and its `queue` (until a decode worker reserved the
prompt's KV); on the workers one span per RPC (`prefill`, `reserve`, `decode`, `generate`)
and `kv_transfer` around a handoff's push. The router
carries the trace context to the workers in the gRPC metadata (`traceparent`), through a
client interceptor on its channels; the workers read it in a server interceptor.

Without an endpoint nothing is configured: OpenTelemetry's default tracer makes no-op
spans, no exporter thread starts, and the gRPC interceptors are not installed. Polls (the
router's `/health`, `/ready`, `/metrics`; its `Stats`, `Info` and `Health` calls to the
workers) never make spans nor carry a trace context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import propagate, trace

_TRACER = "baton"
# Worker RPCs that get a span, by gRPC method name; health, stats and info polls do not.
TRACED_RPCS = {"Prefill": "prefill", "Reserve": "reserve", "Decode": "decode",
               "Generate": "generate"}


_configured = False


def configure(endpoint: str | None, service_name: str) -> None:
    """Export spans to the OTLP/gRPC collector at `endpoint` (host:port or a URL) as
    `service_name`; None leaves tracing off. Call once per process, before serving."""
    global _configured
    if not endpoint:
        return
    _configured = True
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    insecure = not endpoint.startswith("https://")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=insecure), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Flush and stop the exporter (a no-op when tracing is off)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def enabled() -> bool:
    """Whether `configure` set up an exporter in this process."""
    return _configured


def untraced(scope: dict) -> bool:
    """FastAPI's `telemetry={"exclude": ...}`: its own spans only for requests to `/v1/`."""
    return not scope.get("path", "").startswith("/v1/")


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER)


def span(name: str, **attributes: Any):
    """A child span of the current one (context manager)."""
    return tracer().start_as_current_span(name, attributes=attributes)


class TraceRequests:
    """ASGI middleware: one server span per `/v1/` request, child of the client's
    `traceparent` if it sent one, ended once the response (stream included) is sent."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with tracer().start_as_current_span(
                f"{scope['method']} {scope['path']}", context=propagate.extract(headers),
                kind=trace.SpanKind.SERVER) as current:

            async def traced_send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    current.set_attribute("http.response.status_code", message["status"])
                await send(message)

            await self.app(scope, receive, traced_send)


def _rpc_name(method: str | bytes) -> str:
    return (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]


def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    if _rpc_name(details.method) not in TRACED_RPCS:
        return details  # a poll: no trace context, whatever task it runs in
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata[key] = value
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_context(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_context(client_call_details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for the router's channels: the current trace context goes along with
    the traced calls. None while tracing is off."""
    return [_UnaryUnary(), _UnaryStream()] if _configured else []


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for a worker's server (`ServerSpans`). None while tracing is off."""
    return [ServerSpans()] if _configured else []


class ServerSpans(grpc.aio.ServerInterceptor):
    """A worker's span per traced RPC, child of the trace context in the call's metadata."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        name = TRACED_RPCS.get(_rpc_name(handler_call_details.method))
        if handler is None or name is None:
            return handler
        metadata: Mapping[str, str] = {k: v for k, v in handler_call_details.invocation_metadata or ()
                                       if isinstance(v, str)}

        def start():
            return tracer().start_as_current_span(
                name, context=propagate.extract(metadata), kind=trace.SpanKind.SERVER)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                with start():
                    return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def stream(request, context) -> AsyncIterator:
                with start():
                    async for item in behavior(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        return handler
