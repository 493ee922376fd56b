"""A strategy's state across a coordinator restart: saved in every checkpoint, restored on resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flwr.serverapp.strategy import Strategy

# Strategy attributes that must survive a server restart (FedOpt's moments, FedAvgM's momentum, adaptive
# clipping norm), wherever they sit in a chain of wrappers.
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")


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
