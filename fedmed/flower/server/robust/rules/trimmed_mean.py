"""trimmed_mean: per coordinate, the largest and smallest robust.trim_fraction of the updates are cut and the rest
averaged, unweighted (Yin et al. 2018); Flower's FedTrimmedAvg computes it the same way."""

from __future__ import annotations

from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from ..updates import reduced
from .registry import RULES, Aggregation, RoundUpdates


@RULES.register("trimmed_mean")
def trimmed_mean(round_updates: RoundUpdates) -> Aggregation:
    fraction = round_updates.settings.trim_fraction
    cut = int(fraction * len(round_updates.sites))
    update = reduced(round_updates.updates, round_updates.sites, lambda block: trim_mean(block, fraction))
    return Aggregation(update=update, record={"trimmed_per_side": cut})
