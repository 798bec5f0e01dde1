"""`baton serve-router`: the OpenAI-compatible router process (uvicorn with uvloop)."""

from __future__ import annotations

import gc
import logging
import signal
import sys


def uvicorn_server(app, config):
    """The uvicorn server for the router's app, as `baton serve-router` (and the in-process
    `baton serve`) runs it, built once everything the process keeps exists: uvloop, the log
    level configured, a graceful shutdown of `config.shutdown_grace_seconds` on SIGTERM or
    SIGINT.

    uvicorn shuts down gracefully on those signals and then re-raises the signal with the
    handlers it found: no-op handlers are installed here, so that the process exits on its
    own status after a clean drain."""
    import uvicorn

    # What exists now (modules, the app, the tokenizer; in-process the engine too) lives as
    # long as the process: frozen, the collector's full passes skip it, and each pass stops
    # the event loop for less.
    gc.collect()
    gc.freeze()
    level = logging.getLogger().getEffectiveLevel()
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", http="httptools",
        log_level=level, access_log=level <= logging.DEBUG,
        timeout_graceful_shutdown=int(config.shutdown_grace_seconds),
        # Streams stay open for a whole generation; never cut an idle keep-alive too soon.
        timeout_keep_alive=30,
    ))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    return server


def main(argv: list[str]) -> int:
    from baton.logs import configure_logging
    from baton.router.config import parse

    config = parse(argv)
    configure_logging()
    from baton.router.app import create_app

    try:
        app = create_app(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"baton serve-router: {exc}", file=sys.stderr)
        return 2
    server = uvicorn_server(app, config)
    server.run()
    return 0 if server.started else 1
