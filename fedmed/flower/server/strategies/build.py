"""The run's strategy: the registered aggregation rule named by strategy.name, wrapped as the config asks."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedmed.config import RunConfig

from ..client_dp import wrap_with_client_dp
from ..normalized_averaging import NormalizedAveraging
from ..robust import RobustAggregation
from .registry import STRATEGIES, common_arguments


def build_strategy(config: RunConfig) -> Strategy:
    """The registered builder's strategy, inside normalized averaging, the robust rule (robust.rule; not under
    secure aggregation, where the coordinator never holds one update) and client-level DP when enabled."""
    strategy = STRATEGIES.get(config.strategy.name)(config, common_arguments(config))
    if config.strategy.normalized_averaging:
        # Inside any server optimizer's view: FedAvgM and FedAdam step from the normalized average.
        strategy = NormalizedAveraging(strategy)
    if not config.secagg.enabled:
        # Outside normalized averaging: the rule judges the updates as the sites sent them.
        strategy = RobustAggregation(strategy, settings=config.robust, acts=not config.client_dp.enabled)
    # The run config allows client-level DP only around plain fedavg/fedprox (fedmed.config.privacy.check_privacy).
    return wrap_with_client_dp(strategy, config)
