"""Flower's environment as fedmed runs it: no telemetry, no update checks, no runtime installs,
Ray on loopback, and how much of Flower's logging reaches the console. The one place that sets it."""

from __future__ import annotations

import logging
import os

# Sites never phone home, and nothing is installed at run time (apps run from the installed fedmed).
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's single-machine mode: every Ray server binds to loopback instead of all interfaces
    # (the variable's name is historical; it switches off Ray's multi-machine networking on any OS).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def keep_flower_quiet() -> None:
    """Set FLOWER_ENVIRONMENT in this process, before flwr is imported; not overridable: a hospital
    site must not start sending telemetry because of a stray environment variable."""
    os.environ.update(FLOWER_ENVIRONMENT)


def set_flower_verbosity(verbose: bool) -> None:
    # Importing flwr resets its logger to DEBUG, so import it before setting the level.
    from flwr.supercore.logger import FLOWER_LOGGER

    # Flower narrates every sampling and aggregation step at INFO; fedmed prints its own progress.
    FLOWER_LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING)


def largest_message_part() -> int:
    """Bytes of the largest object Flower sends in one request: it splits every array into chunks of
    FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB) and pushes each object on its own, whatever the model's size."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    return int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
