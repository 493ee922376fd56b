"""Client-level DP, the server's part, with Flower's strategy wrappers: Gaussian noise on the
aggregate of the sites' clipped updates (the sites clip with fedmed.flower.client.mods).

With secure aggregation the server never holds individual updates, so the same Flower functions
are applied around the secure sum instead: noise (and the adaptive clipping-norm update, from the
securely summed norm bits) on the unmasked mean.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace, compute_stdv

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.flower.wire import CLIPPING_MODE
from fedmed.privacy import epsilon_spent

ClientDpStrategy = DifferentialPrivacyClientSideFixedClipping | DifferentialPrivacyClientSideAdaptiveClipping


def sampled_sites(config: RunConfig) -> int:
    """Sites per round, as Flower's sampling picks them (the noise is scaled by this count)."""
    return max(1, round(len(config.site_names) * config.strategy.fraction_train))


def wrap_with_client_dp(strategy: Strategy, config: RunConfig) -> Strategy:
    settings = config.client_dp
    if not settings.enabled:
        return strategy
    if settings.clipping == "adaptive":
        try:
            return DifferentialPrivacyClientSideAdaptiveClipping(
                strategy,
                noise_multiplier=settings.noise_multiplier,
                num_sampled_clients=sampled_sites(config),
                initial_clipping_norm=settings.clipping_norm,
                target_clipped_quantile=settings.target_clipped_quantile,
                clip_norm_lr=settings.clip_norm_lr,
                clipped_count_stddev=settings.clipped_count_stddev,
            )
        except ValueError as error:  # Flower checks the noise split between the update and the count
            raise FedmedError(
                f"client_dp: {error} (run config keys client_dp.clipped_count_stddev and client_dp.noise_multiplier)"
            ) from error
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clipping_norm,
        num_sampled_clients=sampled_sites(config),
    )


def client_dp_round_record(strategy: Strategy) -> dict[str, float]:
    """The noise this round's aggregate received, for rounds.jsonl."""
    if not isinstance(strategy, ClientDpStrategy):
        return {}
    return {
        # Adaptive clipping spends part of the noise on the clipped count: this is what the update got.
        "client_dp_noise_multiplier": float(strategy.noise_multiplier),
        "client_dp_clipping_norm": float(strategy.clipping_norm),
        "client_dp_noise_std": compute_stdv(
            strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients
        ),
    }


def client_level_privacy(strategy: Strategy, config: RunConfig, *, rounds: int, sites: int) -> dict[str, float]:
    """The participant-level (ε, δ) after `rounds` rounds of client-level DP among `sites` sites.

    Each round is the sampled Gaussian mechanism on the sum of the sampled sites' clipped updates, with
    the configured noise multiplier (under adaptive clipping the update's and the clipped count's noise
    together amount to it, Andrew et al. 2021) at sampling rate sampled / sites, accounted with Opacus'
    accountants. Flower samples a fixed number of sites per round; accounting it as Poisson sampling at
    that rate is the usual approximation for DP-FedAvg (McMahan et al. 2018)."""
    if not isinstance(strategy, ClientDpStrategy):
        return {}
    settings = config.client_dp
    rate = min(1.0, strategy.num_sampled_clients / max(sites, 1))
    sigma = settings.noise_multiplier
    history = [(sigma, rate, rounds)]
    epsilon = math.inf if sigma == 0 else epsilon_spent(history, delta=settings.delta, accountant=settings.accountant)
    return {"client_dp_epsilon": epsilon, "client_dp_delta": settings.delta, "client_dp_sample_rate": rate}


def noise_secure_mean(strategy: Strategy, mean_update: list[np.ndarray], *, clipped_count: int, sites: int) -> None:
    """Server side of client-level DP on a securely aggregated mean: add Flower's noise in place and,
    for adaptive clipping, move the clipping norm from the (securely summed) count of clipped updates."""
    if not isinstance(strategy, ClientDpStrategy):
        return
    if isinstance(strategy, DifferentialPrivacyClientSideAdaptiveClipping):
        # Same order as Flower's wrapper: move the norm first, then noise at the new norm.
        strategy._geometric_update(strategy._noisy_fraction(clipped_count, sites))
    add_gaussian_noise_inplace(
        mean_update, compute_stdv(strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients)
    )


def clipping_config(strategy: Strategy, config: RunConfig) -> dict[str, object]:
    """What the sites need to clip: the current norm and the mode."""
    if not isinstance(strategy, ClientDpStrategy):
        return {}
    return {KEY_CLIPPING_NORM: float(strategy.clipping_norm), CLIPPING_MODE: config.client_dp.clipping}
