"""The router's FastAPI application: OpenAI endpoints, auth, health, readiness, metrics.

`GET /health` answers 200 while the router process serves (the Kubernetes liveness and
readiness probe: a router without workers still answers requests, with 503s); its body
counts the healthy workers per role. `GET /ready` is 200 only when every role has a
healthy worker (what `baton up` waits for). `/metrics` and the health endpoints need no key.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from baton import __version__, tracing
from baton.metrics import Merged, RequestMetrics, RouterGauges, WithVllmNames
from baton.router import errors
from baton.router.adapters import adapter_routes
from baton.router.api import OpenAIServing
from baton.router.config import RouterConfig
from baton.router.discovery import Discovery, KubernetesDiscovery, StaticDiscovery
from baton.router.dispatch import Dispatcher
from baton.router.edge import BodyLimit, ErrorBoundary, JSONRoute
from baton.router.embeddings import embedding_routes
from baton.router.protocol import ChatCompletionRequest, CompletionRequest
from baton.router.routing import make_policy
from baton.router.tokenization import tokenization_routes
from baton.router.workers import WorkerPool
from baton.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class BearerAuth:
    """ASGI middleware: `/v1/*` needs `Authorization: Bearer <key>` (the scheme in any case,
    as RFC 9110 says; the key compared in constant time). Runs before the body is read, so a
    bad key is a 401 whatever the body is."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    given = value
                    break
            scheme, _, token = given.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._expected):
                response = errors.unauthorized().response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _discovery(config: RouterConfig) -> Discovery:
    if config.discovery == "kubernetes":
        return KubernetesDiscovery(config.namespace, config.services)
    return StaticDiscovery({role: list(config.addresses[role]) for role in config.roles})


def create_app(config: RouterConfig, registry: CollectorRegistry | None = None,
               connect: Callable[[str], object | None] = lambda address: None,
               also_exposed: tuple[CollectorRegistry, ...] = ()) -> FastAPI:
    """The router's app. `registry`: where its metrics go; `connect(address)`: the client of
    a worker (None: gRPC; router/workers.py:WorkerPool); `also_exposed`: registries /metrics
    serves beside `registry` (the engine's, when it runs in this process)."""
    tracing.configure(config.otlp_traces_endpoint, "baton-router")
    tokenizer = Tokenizer(config.model_dir, config.chat_template)
    registry = registry or CollectorRegistry()
    exposed = WithVllmNames(Merged(registry, *also_exposed))
    model_name = config.served_model_names[0]
    pool = WorkerPool(config.roles, config.poll_interval, config.keepalive, connect)
    dispatcher = Dispatcher(pool, make_policy(config.routing_policy), config.disaggregated, config.max_queue,
                            config.max_failovers, config.local_prefill_tokens)
    metrics = RequestMetrics(model_name, "router", registry, count_tokens=True)
    registry.register(RouterGauges(lambda: dispatcher.running, lambda: dispatcher.admission.queued, model_name,
                                   lambda: dispatcher.failovers, lambda: dispatcher.prefill_decisions,
                                   lambda: dispatcher.handoff_pairings))
    serving = OpenAIServing(tokenizer, pool, dispatcher, config.served_model_names, metrics,
                            config.tool_call_parser, config.enable_auto_tool_choice,
                            config.trust_request_chat_template)
    discovery = _discovery(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await discovery.start(pool)
        await pool.start()
        log.info("router for %s (%s) on %s:%d", model_name,
                 "disaggregated" if config.disaggregated else "colocated", config.host, config.port)
        yield
        await discovery.stop()
        await pool.stop()
        serving.close()
        tracing.shutdown()

    app = FastAPI(title="Baton router", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API in front of Baton's prefill and decode workers.",
                  telemetry={"exclude": tracing.untraced})
    errors.install(app)
    app.router.route_class = JSONRoute
    app.state.pool = pool
    app.state.dispatcher = dispatcher

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.serve(body, request)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.serve(body, request)

    app.include_router(embedding_routes(serving))
    app.include_router(tokenization_routes(tokenizer, config.served_model_names,
                                           lambda: pool.model_limits(config.roles),
                                           config.trust_request_chat_template))

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict:
        limits = pool.model_limits(config.roles)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "baton",
                 "root": config.served_model_names[0],
                 "max_model_len": limits[0] if limits else None} for name in config.served_model_names]
        # LoRA adapters every role serves, as vLLM lists them: the base model as parent.
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "baton", "root": name,
                  "parent": config.served_model_names[0], "max_model_len": limits[0] if limits else None}
                 for name in sorted(pool.adapters(config.roles))]
        return {"object": "list", "data": data}

    app.include_router(adapter_routes(pool, config.roles, config.served_model_names))

    @app.get("/health", tags=["operations"])
    async def health() -> dict:
        return {"status": "ok", "mode": "disaggregated" if config.disaggregated else "colocated",
                "workers": pool.summary()}

    @app.get("/ready", tags=["operations"])
    async def ready() -> JSONResponse:
        summary = pool.summary()
        ok = all(summary[role]["healthy"] > 0 for role in config.roles)
        return JSONResponse({"ready": ok, "workers": summary}, status_code=200 if ok else 503)

    # Not async: FastAPI runs it on a thread, so an engine collector that asks the engine
    # thread through this event loop (worker/servicer.py:EngineServicer._snapshot) is answered.
    @app.get("/metrics", tags=["operations"])
    def prometheus() -> Response:
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    # The last added runs first: the key is checked, then the size, before any body is read.
    app.add_middleware(ErrorBoundary)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    if config.otlp_traces_endpoint:
        # Added last, so outermost: its span covers the checks and the whole streamed response.
        app.add_middleware(tracing.TraceRequests)
    return app
