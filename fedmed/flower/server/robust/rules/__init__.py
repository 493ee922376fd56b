"""Robust aggregation rules by name (robust.rule): adding one is a new file registering it and one import line."""

from __future__ import annotations

from .krum import krum, multi_krum  # noqa: F401 - registers "krum" and "multi_krum"
from .mean import mean  # noqa: F401 - registers "mean"
from .median import median  # noqa: F401 - registers "median"
from .norm_bound import norm_bound  # noqa: F401 - registers "norm_bound"
from .registry import RULES, Aggregation, RoundUpdates, Rule
from .trimmed_mean import trimmed_mean  # noqa: F401 - registers "trimmed_mean"

__all__ = ["RULES", "Aggregation", "RoundUpdates", "Rule"]
