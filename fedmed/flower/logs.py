"""How much of Flower's own logging reaches the console."""

from __future__ import annotations

import logging


def set_flower_verbosity(verbose: bool) -> None:
    # Importing flwr resets its logger to DEBUG, so import it before setting the level.
    from flwr.supercore.logger import FLOWER_LOGGER

    # Flower narrates every sampling and aggregation step at INFO; fedmed prints its own progress.
    FLOWER_LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING)
