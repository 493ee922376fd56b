"""FedAvgM (Hsu et al. 2019): the server steps along the averaged update with momentum."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvgM, Strategy

from fedmed.config import RunConfig

from .registry import STRATEGIES


@STRATEGIES.register("fedavgm")
def build_fedavgm(config: RunConfig, common: dict[str, Any]) -> Strategy:
    settings = config.strategy
    return FedAvgM(**common, server_learning_rate=settings.server_step_size, server_momentum=settings.server_momentum)
