"""The strategy registry: `strategy.name` in a run config picks a builder registered here.

A builder takes the run config and the keyword arguments every fedmed strategy shares (`common`: the
sampling fractions and node minimums, which leave the quorum to fedmed's round loop) and returns a
Flower Message-API strategy (flwr.serverapp.strategy.Strategy). build_strategy wraps what it returns
(normalized averaging, client-level DP), so a builder returns the bare aggregation rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedmed.config import RunConfig
from fedmed.core.registry import Registry

StrategyBuilder = Callable[[RunConfig, dict[str, Any]], Strategy]

STRATEGIES = Registry[StrategyBuilder]("strategy", field="strategy.name")


def quorum(config: RunConfig) -> int:
    """Sites that must return an update for a round to count (strategy.min_sites; default: every site)."""
    return config.strategy.min_sites or len(config.site_names)


def common_arguments(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments every builder passes on to its Flower strategy."""
    # fedmed's round loop waits for the quorum itself, with a deadline (Flower's sampling would wait
    # forever); evaluation then goes to every site that is connected.
    return {
        "fraction_train": config.strategy.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": quorum(config),
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


def check_strategy_name(config: RunConfig) -> None:
    """Raise the registry's ConfigError (naming strategy.name and every known strategy) for an unknown name,
    before a run creates anything or trains."""
    STRATEGIES.get(config.strategy.name)
