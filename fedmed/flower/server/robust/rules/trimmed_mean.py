"""trimmed_mean: per coordinate, the largest and smallest robust.trim_fraction of the updates are cut and the rest
averaged, unweighted (Yin et al. 2018); Flower's FedTrimmedAvg computes it the same way."""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from .registry import RULES, Aggregation, RoundUpdates


@RULES.register("trimmed_mean")
def trimmed_mean(round_updates: RoundUpdates) -> Aggregation:
    cut = int(round_updates.settings.trim_fraction * len(round_updates.updates))
    update = trim_mean(np.stack(round_updates.updates), round_updates.settings.trim_fraction)
    return Aggregation(update=np.asarray(update), record={"trimmed_per_side": cut})
