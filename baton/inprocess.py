"""The in-process `baton serve`: the router and one colocated engine in one process.

What `baton serve MODEL` runs for one colocated replica (no `--disaggregated`,
`--data-parallel-size 1`): one process serving the OpenAI API, the
engine inside it. The pieces are those of `baton up` (baton/up.py), configured the same way
from the same flags (`up.plan` and `up.router_child` give the worker's and the router's
command lines, parsed here by their own parsers), but joined without gRPC: the router's
worker pool reaches the engine's servicer through `worker/local.py:LocalStub` (direct
calls on this event loop, messages never serialized), so the router's code and the
colocated worker's servicer are the very ones a multi-process deployment runs.

The order is a worker's: build the engine, warm it up (`--warmup`), load `--lora-modules`,
then serve; the HTTP port is bound only then, so `/health` answers 200 only once the engine
is warm, and a ready line ("Baton is ready: URL") follows. `/metrics` serves the router's
metrics and the engine's on the one port (their `role` labels tell them apart). SIGTERM or
Ctrl-C: uvicorn stops taking connections and lets the requests in flight finish for up to
`--shutdown-grace-seconds`, then the engine stops; exit status 0. An engine that dies (a
tensor-parallel rank failed) stops the server the same way, with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from baton import up

# The worker's address in the router's pool: a label in messages, never dialled.
LOCAL_ADDRESS = "in-process:0"


def configs(args: argparse.Namespace, model_dir):
    """(EngineArgs, WorkerOptions, RouterConfig) for `baton up`'s namespace `args` (one
    colocated worker), from the command lines `baton up` would start the two processes with."""
    from baton.router.config import parse as parse_router
    from baton.worker.flags import parse as parse_worker

    (worker,) = up.plan(args, model_dir)
    engine_args, options = parse_worker(worker.argv[1:], args.prog, "colocated")
    router = parse_router(up.router_child(args, model_dir, [worker]).argv[1:])
    return engine_args, options, dataclasses.replace(router, colocated=(LOCAL_ADDRESS,))


def run(args: argparse.Namespace, log_level: str | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C; the exit status. `args`: `baton up`'s namespace for one
    colocated worker (baton/serve.py:to_up); `log_level`: the process's (None: $BATON_LOG_LEVEL)."""
    from baton.logs import configure_logging
    from baton.worker.runtime import load_engine

    prog = args.prog
    prepared = up.prepare(args)
    if prepared is None:
        return 2
    model_dir, key_source = prepared
    engine_args, options, config = configs(args, model_dir)
    configure_logging(log_level)
    engine = load_engine(engine_args, prog)
    if engine is None:
        return 2
    import uvloop

    banner = lambda port: up.ready_banner(  # noqa: E731
        up.local_url(config.host, port), up.model_name(args, model_dir),
        "colocated, in-process: the router and the engine in this process", key_source, not args.model)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(engine, options, config, prog, banner))


async def _serve(engine, options, config, prog: str, banner) -> int:
    from prometheus_client import REGISTRY

    from baton.colocated.service import ColocatedServicer
    from baton.router.app import create_app
    from baton.router.server import uvicorn_server
    from baton.worker.local import LocalStub
    from baton.worker.runtime import ready_servicer, serve_engine

    servicer = await ready_servicer(engine, options, prog, ColocatedServicer)
    if servicer is None:
        await engine.shutdown()
        return 2
    REGISTRY.register(servicer.collector())  # the engine's metrics; the router's go to its own registry
    stub = LocalStub(servicer)
    try:
        app = create_app(config, connect=lambda address: stub, also_exposed=(REGISTRY,))
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        await engine.shutdown()
        return 2
    server = uvicorn_server(app, config)

    async def serve() -> int:
        async def run() -> int:
            try:
                await server.serve()
            except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
                return exc.code if isinstance(exc.code, int) else 1
            return 0 if server.started else 1

        serving = asyncio.ensure_future(run())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]  # the one bound, also for --port 0
            print(banner(port), flush=True)
        return await serving

    return await serve_engine(engine, prog, serve, lambda: setattr(server, "should_exit", True))
