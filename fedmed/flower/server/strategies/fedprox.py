"""FedProx (Li et al. 2020): FedAvg whose sites add (mu/2)·||w - w_global||² to their loss.

The server aggregates as FedAvg does; Flower sends strategy.proximal_mu in every round's config and
fedmed's sites apply the term (fedmed.site.session).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedProx, Strategy

from fedmed.config import RunConfig

from .registry import STRATEGIES


@STRATEGIES.register("fedprox")
def build_fedprox(config: RunConfig, common: dict[str, Any]) -> Strategy:
    return FedProx(**common, proximal_mu=config.strategy.proximal_mu)
