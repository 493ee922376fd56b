"""krum and multi_krum (Blanchard et al. 2017): keep the update(s) closest to their n - f - 2 nearest others.

The selection is Flower's (flwr.serverapp.strategy.multikrum.select_multikrum), on distances summed a slice at a
time: Flower's needs every update in memory. The run's strategy then averages the kept updates by weight. Krum keeps
one, Multi-Krum robust.krum_select (default n - f).
"""

from __future__ import annotations

import numpy as np

from ..updates import squared_distances
from .registry import RULES, Aggregation, RoundUpdates


def _select(round_updates: RoundUpdates, *, keep: int) -> Aggregation:
    sites = round_updates.sites
    distances = squared_distances(round_updates.updates, sites)
    closest = max(1, len(sites) - round_updates.settings.byzantine_sites - 2)
    # Each site's score: its distances to its `closest` nearest others (argsort's first is itself).
    scores = [float(np.sum(row[np.argsort(row)[1 : closest + 1]])) for row in distances]
    chosen = np.argsort(scores)[:keep]
    return Aggregation(scales={sites[index]: 1.0 for index in chosen})


@RULES.register("krum")
def krum(round_updates: RoundUpdates) -> Aggregation:
    return _select(round_updates, keep=1)


@RULES.register("multi_krum")
def multi_krum(round_updates: RoundUpdates) -> Aggregation:
    settings = round_updates.settings
    keep = settings.krum_select or max(1, len(round_updates.sites) - settings.byzantine_sites)
    return _select(round_updates, keep=min(keep, len(round_updates.sites)))
