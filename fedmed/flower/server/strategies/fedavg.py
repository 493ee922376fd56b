"""FedAvg (McMahan et al. 2017): the sites' models averaged, weighted by their training examples."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from fedmed.config import RunConfig

from .registry import STRATEGIES


@STRATEGIES.register("fedavg")
def build_fedavg(config: RunConfig, common: dict[str, Any]) -> Strategy:
    return FedAvg(**common)
