"""median: the coordinate-wise median of the updates (Yin et al. 2018), unweighted, as Flower's FedMedian."""

from __future__ import annotations

import numpy as np

from ..updates import reduced
from .registry import RULES, Aggregation, RoundUpdates


@RULES.register("median")
def median(round_updates: RoundUpdates) -> Aggregation:
    return Aggregation(
        update=reduced(round_updates.updates, round_updates.sites, lambda block: np.median(block, axis=0))
    )
