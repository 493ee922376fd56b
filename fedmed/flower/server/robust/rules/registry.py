"""The robust aggregation rules by name (`robust.rule`): one file per rule, each registering itself here.

A rule sees the round's updates (local - global, flattened, by site, read a slice at a time; with their capped
case weights) and
says what the run's strategy aggregates: the updates it keeps, each rescaled (norm bounding, Krum's choice),
which the strategy then averages by weight; or one aggregate update (median, trimmed mean) the strategy
steps from. Either way a server optimizer (FedAvgM's momentum, FedAdam) steps from the robust result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmed.config import RobustConfig
from fedmed.core.registry import Registry

from ..updates import Updates


@dataclass(frozen=True)
class RoundUpdates:
    sites: list[str]
    updates: Updates  # the round's updates by site, among them those of `sites`
    weights: list[float]  # the sites' aggregation weights (their training cases, capped)
    settings: RobustConfig


@dataclass
class Aggregation:
    """A rule's result: `scales` (kept site -> factor on its update) or one aggregate `update`."""

    scales: dict[str, float] | None = None
    update: np.ndarray | None = None  # flat, over the floating-point arrays
    record: dict[str, Any] = field(default_factory=dict)  # what rounds.jsonl keeps about the rule's choice


Rule = Callable[[RoundUpdates], Aggregation]

RULES = Registry[Rule]("aggregation rule", field="robust.rule")
