"""`baton serve-router`: the OpenAI-compatible router process (uvicorn with uvloop)."""

from __future__ import annotations

import gc
import logging
import signal
import sys


def main(argv: list[str]) -> int:
    from baton.logs import configure_logging
    from baton.router.config import parse

    config = parse(argv)
    configure_logging()
    import uvicorn

    from baton.router.app import create_app

    try:
        app = create_app(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"baton serve-router: {exc}", file=sys.stderr)
        return 2
    # What exists now (modules, the app, the tokenizer) lives as long as the process: frozen,
    # the collector's full passes skip it, and each pass stops the event loop for less.
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
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal with the
    # handlers it found: with these no-op handlers the process exits 0 after a clean drain.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1
