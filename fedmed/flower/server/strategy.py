"""Flower Message-API strategies built from the run config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedmed.config import RunConfig

from .client_dp import wrap_with_client_dp

# Strategy attributes that must survive a server restart (FedOpt's moments, adaptive clipping norm).
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "clipping_norm")


def quorum(config: RunConfig) -> int:
    return config.strategy.min_sites or len(config.site_names)


def build_strategy(config: RunConfig) -> Strategy:
    settings = config.strategy
    needed = quorum(config)
    # fedmed's round loop waits for the quorum itself, with a deadline (Flower's sampling would wait
    # forever); evaluation then goes to every site that is connected.
    common: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": needed,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    if settings.name == "fedprox":
        return wrap_with_client_dp(FedProx(**common, proximal_mu=settings.proximal_mu), config)
    if settings.name in ("fedadam", "fedyogi"):
        optimizer = FedAdam if settings.name == "fedadam" else FedYogi
        return optimizer(
            **common,
            eta=settings.server_learning_rate,
            eta_l=config.train.learning_rate,
            beta_1=settings.server_beta_1,
            beta_2=settings.server_beta_2,
            tau=settings.server_tau,
        )
    return wrap_with_client_dp(FedAvg(**common), config)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    return {name: getattr(strategy, name) for name in STATEFUL_ATTRIBUTES if hasattr(strategy, name)}


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if hasattr(strategy, name):
            setattr(strategy, name, value)
