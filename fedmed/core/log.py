"""The one fedmed logger and its console set-up."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "fedmed"
logger = logging.getLogger(LOGGER_NAME)


def configure_console_logging(level: int = logging.INFO) -> None:
    """Print fedmed's log lines to stderr once, without duplicates from root handlers."""
    if not any(getattr(handler, "_fedmed", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._fedmed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    # Libraries (Opacus, Ray) attach handlers to the root logger; our lines must not print twice.
    logger.propagate = False
