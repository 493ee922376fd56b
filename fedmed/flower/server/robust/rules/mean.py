"""mean: no defence; the run's strategy averages every update as sent (the baseline the others are measured against)."""

from __future__ import annotations

from .registry import RULES, Aggregation, RoundUpdates


@RULES.register("mean")
def mean(round_updates: RoundUpdates) -> Aggregation:
    return Aggregation(scales=dict.fromkeys(round_updates.sites, 1.0))
