"""The one fedmed logger and its console set-up."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import IO

from .terminal import is_terminal

LOGGER_NAME = "fedmed"
logger = logging.getLogger(LOGGER_NAME)


def configure_console_logging(level: int = logging.INFO, *, live: bool = False) -> None:
    """Print fedmed's log lines to stderr once, without duplicates from root handlers.

    `live`: the command shows a live display (a progress bar) under the log lines when stderr is a
    terminal. Only commands a person runs in the foreground ask for it; a server or a site daemon whose
    processes share the terminal must not draw one."""
    handler = _console_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._fedmed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler._fedmed_live = live  # type: ignore[attr-defined]
    logger.setLevel(level)
    # Libraries (Opacus, Ray) attach handlers to the root logger; our lines must not print twice.
    logger.propagate = False


def live_console() -> IO[str] | None:
    """The terminal fedmed's log lines go to, when the command asked for a live display and may draw one
    there; None for a pipe, a file, TERM=dumb, or when nothing set up console logging (library use)."""
    handler = _console_handler()
    if handler is None or not getattr(handler, "_fedmed_live", False):
        return None
    return handler.stream if is_terminal(handler.stream) else None


@contextlib.contextmanager
def console_stream(stream: IO[str]) -> Iterator[None]:
    """Send fedmed's console log lines to `stream` while inside (a live display's proxy, which prints
    them above the display instead of through it)."""
    handler = _console_handler()
    if handler is None:
        yield
        return
    previous = handler.stream
    handler.setStream(stream)
    try:
        yield
    finally:
        handler.setStream(previous)


def _console_handler() -> logging.StreamHandler | None:
    return next((h for h in logger.handlers if getattr(h, "_fedmed", False)), None)  # type: ignore[return-value]
