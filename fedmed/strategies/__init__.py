"""Aggregation rules and the partition of a model into shared and site-local parameters."""

from .fedbn import LocalParameterStore, shared_keys
from .names import STRATEGY_NAMES

__all__ = ["STRATEGY_NAMES", "LocalParameterStore", "shared_keys"]
