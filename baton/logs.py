"""One log format and level ($BATON_LOG_LEVEL) for every Baton process (no torch)."""

from __future__ import annotations

import logging


def configure_logging(level: str | None = None) -> None:
    """`level`: the process's log level (None: $BATON_LOG_LEVEL, default INFO)."""
    from baton.settings import log_level

    logging.basicConfig(level=level or log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
