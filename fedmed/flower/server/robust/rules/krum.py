"""krum and multi_krum (Blanchard et al. 2017): keep the update(s) closest to their n - f - 2 nearest others.

The selection is Flower's (flwr.serverapp.strategy.multikrum.select_multikrum); the run's strategy then
averages the kept updates by weight. Krum keeps one, Multi-Krum robust.krum_select (default n - f).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum

from .registry import RULES, Aggregation, RoundUpdates


def _select(round_updates: RoundUpdates, *, keep: int) -> Aggregation:
    contents = [RecordDict({"update": ArrayRecord({"u": Array(update)})}) for update in round_updates.updates]
    chosen = select_multikrum(
        contents, num_malicious_nodes=round_updates.settings.byzantine_sites, num_nodes_to_select=keep
    )
    kept = {id(content) for content in chosen}
    scales = {site: 1.0 for site, content in zip(round_updates.sites, contents, strict=True) if id(content) in kept}
    return Aggregation(scales=scales)


@RULES.register("krum")
def krum(round_updates: RoundUpdates) -> Aggregation:
    return _select(round_updates, keep=1)


@RULES.register("multi_krum")
def multi_krum(round_updates: RoundUpdates) -> Aggregation:
    settings = round_updates.settings
    keep = settings.krum_select or max(1, len(round_updates.updates) - settings.byzantine_sites)
    return _select(round_updates, keep=min(keep, len(round_updates.updates)))
