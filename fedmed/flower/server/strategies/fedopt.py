"""FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization"): the averaged update is a
pseudo-gradient for a server-side Adam or Yogi step."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedYogi, Strategy

from fedmed.config import RunConfig

from .registry import STRATEGIES


def _fedopt(config: RunConfig, common: dict[str, Any], *, optimizer: type[FedAdam] | type[FedYogi]) -> Strategy:
    settings = config.strategy
    return optimizer(
        **common,
        eta=settings.server_step_size,
        eta_l=config.train.learning_rate,
        beta_1=settings.server_beta_1,
        beta_2=settings.server_beta_2,
        tau=settings.server_tau,
    )


@STRATEGIES.register("fedadam")
def build_fedadam(config: RunConfig, common: dict[str, Any]) -> Strategy:
    return _fedopt(config, common, optimizer=FedAdam)


@STRATEGIES.register("fedyogi")
def build_fedyogi(config: RunConfig, common: dict[str, Any]) -> Strategy:
    return _fedopt(config, common, optimizer=FedYogi)
