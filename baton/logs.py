"""One log format and level ($BATON_LOG_LEVEL) for every Baton process (no torch)."""

from __future__ import annotations

import logging


def configure_logging() -> None:
    from baton.settings import log_level

    logging.basicConfig(level=log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
