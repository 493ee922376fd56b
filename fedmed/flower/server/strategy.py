"""Flower Message-API strategies built from the run config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fedmed.config import RunConfig

from .client_dp import wrap_with_client_dp
from .normalized_averaging import NormalizedAveraging

# Strategy attributes that must survive a server restart (FedOpt's moments, FedAvgM's momentum, adaptive
# clipping norm), wherever they sit in a chain of wrappers.
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")


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
    strategy: Strategy
    if settings.name == "fedprox":
        strategy = FedProx(**common, proximal_mu=settings.proximal_mu)
    elif settings.name == "fedavgm":
        strategy = FedAvgM(
            **common, server_learning_rate=settings.server_step_size, server_momentum=settings.server_momentum
        )
    elif settings.name in ("fedadam", "fedyogi"):
        optimizer = FedAdam if settings.name == "fedadam" else FedYogi
        strategy = optimizer(
            **common,
            eta=settings.server_step_size,
            eta_l=config.train.learning_rate,
            beta_1=settings.server_beta_1,
            beta_2=settings.server_beta_2,
            tau=settings.server_tau,
        )
    else:
        strategy = FedAvg(**common)
    if settings.normalized_averaging:
        # Inside any server optimizer's view: FedAvgM and FedAdam step from the normalized average.
        strategy = NormalizedAveraging(strategy)
    # The run config allows client-level DP only around plain fedavg/fedprox (RunConfig._check_privacy).
    return wrap_with_client_dp(strategy, config)


def _layers(strategy: Strategy) -> Iterator[Strategy]:
    """The strategy and those it wraps (Flower's DP wrappers and fedmed's hold the inner one as `.strategy`)."""
    layer: object = strategy
    while isinstance(layer, Strategy):
        yield layer
        layer = getattr(layer, "strategy", None)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for layer in _layers(strategy):
        for name in STATEFUL_ATTRIBUTES:
            if hasattr(layer, name):
                state.setdefault(name, getattr(layer, name))
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        holder = next((layer for layer in _layers(strategy) if hasattr(layer, name)), None)
        if holder is not None:
            setattr(holder, name, value)
