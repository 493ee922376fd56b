"""[strategy]: how the coordinator aggregates the sites' updates, and the quorum each round needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig


class StrategyConfig(StrictModel):
    # Unset in a run config: fedavgm, or fedavg under client-level DP (RunConfig._default_strategy).
    name: str = Field(
        "fedavgm",
        description="strategy registry key; built in: fedavg, fedprox, fedavgm, fedadam, fedyogi (checked against "
        "the registered strategies when the run starts)",
    )
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of mu/2 * ||w - w_global||^2")
    fedbn: bool = Field(False, description="keep normalization layers site-local (never sent, never aggregated)")
    server_learning_rate: float | None = Field(
        None,
        gt=0,
        description="FedAvgM, FedAdam/FedYogi: server step size; default per strategy: 1.0 for fedavgm, 0.03 (eta) "
        "for fedadam/fedyogi; unused by fedavg/fedprox",
    )
    server_momentum: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="FedAvgM: momentum of the server's step (0: FedAvg with a server learning rate); 0.5 closed most "
        "of the gap to pooled training on the synthetic and IXI federations, 0.9 overshot "
        "(docs/benchmarks/every-site.md)",
    )
    normalized_averaging: bool = Field(
        False,
        description="FedNova-style: average each site's update divided by its local step count, rescaled by the "
        "sites' weighted mean step count, so sites that take more steps do not pull the model further",
    )
    server_beta_1: float = Field(0.9, ge=0, lt=1)
    server_beta_2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)
    min_sites: int | None = Field(None, ge=1, description="quorum per round; default: every site")
    fraction_train: float = Field(1.0, gt=0, le=1)
    round_timeout_s: float = Field(3600.0, gt=0)
    upload_stall_s: float = Field(
        120.0,
        gt=0,
        description="deployment: after the round timeout, how long a site's upload under way may go without a "
        "byte reaching the proxy before the site is dropped",
    )

    @model_validator(mode="after")
    def _prox_needs_mu(self) -> StrategyConfig:
        if self.name == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("strategy 'fedprox' needs proximal_mu > 0 (e.g. 0.01); with 0 it is plain fedavg")
        return self

    @property
    def server_step_size(self) -> float:
        """server_learning_rate, or the strategy's default: FedAvgM steps the full average, FedOpt a small eta."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        # FedAdam's eta 0.03 beat 0.01 (by about 0.07 Dice) and 0.1 on the synthetic and IXI federations
        # (docs/benchmarks/every-site.md).
        return 1.0 if self.name == "fedavgm" else 0.03


def check_quorum(run: RunConfig) -> None:
    """strategy.min_sites cannot ask for more sites than the federation has."""
    if run.site_names and run.strategy.min_sites is not None and run.strategy.min_sites > len(run.site_names):
        raise ValueError(
            f"strategy.min_sites is {run.strategy.min_sites} but the federation has only "
            f"{len(run.site_names)} site(s); lower min_sites"
        )
