"""Aggregation rules and the partition of a model into shared and site-local parameters."""

from .fedbn import PERSONALIZED_FILE, LocalParameterStore, shared_keys
from .names import STRATEGY_NAMES

__all__ = ["PERSONALIZED_FILE", "STRATEGY_NAMES", "LocalParameterStore", "shared_keys"]
