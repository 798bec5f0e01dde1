"""What every worker process shares: the gRPC server, health, /metrics and SIGTERM drain.

`WorkerRuntime.serve()` runs until SIGTERM or SIGINT, then drains: the health service turns
NOT_SERVING and `Stats` reports `draining`, so routers stop sending new work; new work is
refused with UNAVAILABLE (the router retries elsewhere); in-flight calls finish, bounded by
the grace period; then the server stops and `serve()` returns (exit status 0).
No torch here: the role's servicer owns the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import REGISTRY

from baton import tracing
from baton.logs import configure_logging
from baton.metrics import start_metrics_server
from baton.rpc import server_options
from baton.worker.flags import WorkerOptions

log = logging.getLogger(__name__)

# A port taken by another process is an error here, never a port shared with it.
NO_REUSEPORT = [("grpc.so_reuseport", 0)]


class WorkerRuntime:
    """Lifecycle and in-flight accounting of one worker process."""

    def __init__(self, options: WorkerOptions):
        self.options = options
        self.port = options.port  # the gRPC port bound (options.port may be 0)
        self.metrics_port = options.metrics_port
        self.kv_address: str | None = None  # host:port of the UCX listener, once a decode worker started it
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """Count a call as in flight: draining waits until none is left (or the grace ends)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining (shutting down)")

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(
        self,
        register: Callable[[grpc.aio.Server], None],
        collector=None,
        on_started: Callable[[], Awaitable[None]] | None = None,
        on_stopped: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Serve until a stop signal, drain, and return the exit status (0)."""
        opts = self.options
        tracing.configure(opts.otlp_traces_endpoint, f"baton-{opts.role}")
        server = grpc.aio.server(options=server_options(opts.keepalive) + NO_REUSEPORT, interceptors=tracing.server_interceptors())
        register(server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = f"{_grpc_host(opts.host)}:{opts.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError (or port 0)
            raise OSError(f"cannot listen on {address} (is the port in use?)") from exc
        if not self.port:
            raise OSError(f"cannot listen on {address} (is the port in use?)")
        address = f"{_grpc_host(opts.host)}:{self.port}"
        if collector is not None:
            REGISTRY.register(collector)
        try:
            http_server, http_thread = start_metrics_server(opts.metrics_port, opts.host)
        except OSError as exc:
            raise OSError(f"cannot serve /metrics on {opts.host}:{opts.metrics_port}: {exc}") from exc
        self.metrics_port = http_server.server_port
        await server.start()
        if on_started is not None:
            await on_started()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        log.info("%s worker serving gRPC on %s, metrics on :%d", opts.role, address, self.metrics_port)
        # The ports actually bound (any given as 0 was picked by the kernel): `baton up` reads
        # this line rather than choosing free ports itself, which raced.
        kv = f" kv {self.kv_address}" if self.kv_address else ""
        print(f"baton {opts.role} worker ready: grpc {address} metrics :{self.metrics_port}{kv}", flush=True)
        try:
            await self._stop.wait()
            await self._drain(health)
        finally:
            await server.stop(grace=0.5)
            if on_stopped is not None:
                await on_stopped()
            http_server.shutdown()
            http_thread.join(timeout=2)
            tracing.shutdown()
            if collector is not None:
                REGISTRY.unregister(collector)
        log.info("%s worker stopped", opts.role)
        return 0

    async def _drain(self, health: health_aio.HealthServicer) -> None:
        self.draining = True
        await health.enter_graceful_shutdown()
        grace = self.options.shutdown_grace_seconds
        log.info("draining: %d call(s) in flight, grace %.0fs", self._in_flight, grace)
        start = time.monotonic()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("grace period over with %d call(s) in flight; cancelling them", self._in_flight)
        else:
            log.info("drained in %.1fs", time.monotonic() - start)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def load_engine(engine_args, prog: str):
    """The `AsyncLLMEngine` for `engine_args`, or None after printing why it cannot be built
    (a bad model directory or setting: exit status 2)."""
    from baton.engine import AsyncLLMEngine

    try:
        return AsyncLLMEngine.from_engine_args(engine_args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


async def ready_servicer(engine, options: WorkerOptions, prog: str, make_servicer):
    """What a worker does before it serves: warm the engine up (`--warmup`: the worker is
    ready only once its kernels are), build the servicer (`make_servicer(engine, runtime)`)
    and load the `--lora-modules` adapters. None, after printing why, when an adapter cannot
    be loaded (exit status 2)."""
    from baton.engine.warmup import should_warm_up, warm_up

    runtime = WorkerRuntime(options)
    log.info("starting %s worker for %s", options.role, engine.config.served_model_name)
    if should_warm_up(options.warmup, engine.config.device.type):
        await warm_up(engine)
    servicer = make_servicer(engine, runtime)
    for name, path in options.lora_modules:
        try:
            await servicer.adapters.load(name, path)
        except ValueError as exc:
            print(f"{prog}: --lora-modules {name}={path}: {exc}", file=sys.stderr)
            return None
    return servicer


async def serve_engine(engine, prog: str, serve: Callable[[], Awaitable[int]], stop: Callable[[], None]) -> int:
    """Run `serve()` (its exit status) while the engine lives, then shut the engine down. An
    engine that dies (a tensor-parallel rank failed) serves nothing again: `stop()` is called
    so that serving drains and ends, and the status is 1 (after printing why), so the pod (or
    `baton up`) starts a fresh process."""

    async def watch() -> None:
        if await engine.wait_stopped() is not None:
            stop()

    watcher = asyncio.ensure_future(watch())
    try:
        status = await serve()
    finally:
        await engine.shutdown()
        watcher.cancel()
    if engine.died is not None:
        print(f"{prog}: {engine.died}", file=sys.stderr)
        return 1
    return status


def run_worker(argv: list[str], prog: str, role: str, make_servicer) -> int:
    """Entry point of every `baton serve-*` worker command.

    `make_servicer(engine, runtime)` returns an object with `register(server)` (adds its
    gRPC services), `collector()`, and optional async `start()`/`stop()` hooks.
    """
    from baton.worker.flags import parse

    engine_args, options = parse(argv, prog, role)
    configure_logging()
    engine = load_engine(engine_args, prog)
    if engine is None:
        return 2

    async def main() -> int:
        servicer = await ready_servicer(engine, options, prog, make_servicer)
        if servicer is None:
            await engine.shutdown()
            return 2
        runtime = servicer.runtime
        return await serve_engine(engine, prog, lambda: runtime.serve(
            servicer.register,
            collector=servicer.collector(),
            on_started=getattr(servicer, "start", None),
            on_stopped=getattr(servicer, "stop", None),
        ), runtime.request_stop)

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
