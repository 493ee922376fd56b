"""Robustness against a faulty or hostile site: per-site diagnostics, robust rules, quarantine ([robust])."""

from __future__ import annotations

from .aggregation import RobustAggregation, RobustAggregationError, capped_weights
from .diagnostics import Contribution, measure
from .quarantine import QuarantineBook
from .rules import RULES

__all__ = [
    "RULES",
    "Contribution",
    "QuarantineBook",
    "RobustAggregation",
    "RobustAggregationError",
    "capped_weights",
    "measure",
]
